"""StreamSegmenter (tokens -> typed events) and the docs' streaming-decoder loop."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from mctp import StreamSegmenter, generate_stream

SPEECH = SimpleNamespace(boa=100, eoa=101, audio_start=102, audio_stop=128)


def _kinds(events):
    return [(e.kind, e.row, e.ids) for e in events]


def test_segments_text_audio_and_one_end_per_row():
    seg = StreamSegmenter(SPEECH, 2, stop_ids=[2])
    out = seg.feed(0, [5, 6, 100, 110, 111], 0.1, 1)
    assert _kinds(out) == [("text", 0, [5, 6])]
    out = seg.feed(0, [112, 101, 7, 2, 9], 0.2, 2)  # tokens after the stop id are ignored
    assert _kinds(out) == [("audio", 0, [110, 111, 112]), ("text", 0, [7, 2]), ("end", 0, [])]
    assert seg.feed(0, [8], 0.3, 3) == []
    # a stop id inside an audio segment closes it and is text; the last row's end waits
    out = seg.feed(1, [100, 120, 2], 0.3, 3)
    assert _kinds(out) == [("audio", 1, [120]), ("text", 1, [2])]
    final = seg.finish(0.4, 3, result="R")  # type: ignore[arg-type]
    assert _kinds(final) == [("end", 1, [])] and final[-1].result == "R"
    assert seg.finish(0.5, 3) == []


def test_finish_flushes_open_audio_and_closes_open_rows():
    seg = StreamSegmenter(SPEECH, 2, audio_chunk=2)
    out = seg.feed(0, [100, 103, 104, 105], 0.1, 1)
    assert _kinds(out) == [("audio", 0, [103, 104])]
    final = seg.finish(0.2, 1, result="R")  # type: ignore[arg-type]
    assert _kinds(final) == [("audio", 0, [105]), ("end", 0, []), ("end", 1, [])]
    assert [e.result for e in final] == [None, None, "R"]


def test_bad_arguments():
    with pytest.raises(ValueError, match="audio_chunk must be >= 1"):
        StreamSegmenter(SPEECH, 1, audio_chunk=0)
    with pytest.raises(ValueError, match="row 1 out of range"):
        StreamSegmenter(SPEECH, 1).feed(1, [3], 0.0, 0)


@pytest.mark.parametrize("rows", [1, 2])
def test_generation_stopping_at_eos_ends_each_row_once(toy, rows):
    """The streaming-decoder loop of docs/codecs.md: one final push per row, never two."""
    ids = torch.cat([toy.prompt] * rows)
    ends = []
    for ev in generate_stream(
        toy.backbone, toy.stack, ids, "boost", 80, vocab=toy.vocab, eos_token_id=2
    ):
        if ev.kind == "end":
            ends.append(ev.row)
    assert sorted(ends) == list(range(rows))


def test_docs_streaming_decoder_loop_runs(toy):
    from mctp.codecs import DummyCodec

    dec = DummyCodec(codebook_size=26)
    stream = dec.stream()
    pushed = []
    for ev in generate_stream(
        toy.backbone, toy.stack, toy.prompt, "boost", 80, vocab=toy.vocab, eos_token_id=2
    ):
        if ev.kind == "audio":
            pushed.append(stream.push(toy.vocab.to_codes(ev.ids)))
        elif ev.kind == "end":
            pushed.append(stream.push(torch.zeros(0, dtype=torch.long), final=True))
    assert sum(w.numel() for w in pushed) > 0
