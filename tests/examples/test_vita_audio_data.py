"""examples/vita_audio/data.py, mixture.py, packing.py: ChatML rendering, labels, interleaving, packing, mixtures.

Rendering is checked against ids written out by hand with a word-level tokenizer (every word
one id, ``"\\n"`` its own token) extended with the speech vocabulary.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import soundfile as sf
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from vita_audio.data import (
    IGNORE_INDEX,
    AudioCodes,
    ChatRenderer,
    RecordError,
    VitaAudioData,
)
from vita_audio.mixture import DataMixture, DataSource

from mctp.backbones import extend_vocab
from mctp.codecs import AudioError, DummyCodec
from mctp.interleave import InterleaveSchedule
from mctp.training import DataError, ErrorLog, PackedCollator

ROOT = Path(__file__).resolve().parents[2]

WORDS = [f"w{i}" for i in range(20)] + "Convert the speech to text. text speech.".split()
WORDS += ["user", "assistant", "system"]


def _word_tokenizer():
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(dict.fromkeys(["<unk>", "\n", *WORDS]))}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r"\n"), "isolated"), pre_tokenizers.Split(" ", "removed")]
    )
    tok = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>")
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    return tok


@pytest.fixture(scope="module")
def tok_vocab():
    tok = _word_tokenizer()
    return tok, extend_vocab(tok, num_audio_tokens=16)


CODES = {"a.wav": [3, 1, 4, 1, 5, 9, 2, 6, 5, 3], "b.wav": [7, 7, 0], "c.wav": [15, 14, 13, 12, 11]}


def _ids(tok, *words):
    return [tok.convert_tokens_to_ids(w) for w in words]


def _renderer(tok_vocab, ratio=(1, 4, 2, 4)):
    tok, vocab = tok_vocab
    schedule = None if ratio is None else InterleaveSchedule.from_ratio(list(ratio))
    return ChatRenderer(tok, vocab, CODES.__getitem__, schedule)


def _chat(*turns, audios=()):
    return {"messages": [{"role": r, "content": c} for r, c in turns], "audios": list(audios)}


def _turn(tok, role, body):
    return _ids(tok, "<|im_start|>", role, "\n") + body + _ids(tok, "<|im_end|>", "\n")


def test_asr_record_by_hand(tok_vocab):
    tok, v = tok_vocab
    rec = _chat(
        ("user", "Convert the speech to text.\n<|audio|>"),
        ("assistant", "w1 w2 w3"),
        audios=["b.wav"],
    )
    s = _renderer(tok_vocab).render(rec)
    audio = [v.boa, *(v.audio_start + c for c in CODES["b.wav"]), v.eoa]
    user = _turn(tok, "user", _ids(tok, "Convert", "the", "speech", "to", "text.", "\n") + audio)
    answer = _ids(tok, "w1", "w2", "w3")
    assistant = _turn(tok, "assistant", answer)
    assert s.input_ids == user + assistant
    assert s.labels == [IGNORE_INDEX] * (len(user) + 3) + answer + _ids(tok, "<|im_end|>", "\n")
    assert tok.unk_token_id not in s.input_ids


def test_tts_record_prepends_text_and_interleaves(tok_vocab):
    tok, v = tok_vocab
    rec = _chat(
        ("user", "Convert the text to speech.\nw4 w5 w6 w7"),
        ("assistant", "<|audio|>"),
        audios=["a.wav"],
    )
    s = _renderer(tok_vocab, (1, 4, 2, 4)).render(rec)
    a = [v.audio_start + c for c in CODES["a.wav"]]
    t = _ids(tok, "w4", "w5", "w6", "w7")
    # text chunks 1, 2, rest; audio chunks 2, 2, rest (each A counts BOA and EOA)
    body = [t[0], v.boa, *a[:2], v.eoa, *t[1:3], v.boa, *a[2:4], v.eoa, t[3], v.boa, *a[4:], v.eoa]
    prompt = _ids(tok, "Convert", "the", "text", "to", "speech.", "\n")
    user = _turn(tok, "user", prompt + t)
    assert s.input_ids == user + _turn(tok, "assistant", body)
    assert s.labels[len(user) + 3 :] == body + _ids(tok, "<|im_end|>", "\n")
    assert set(s.labels[: len(user) + 3]) == {IGNORE_INDEX}


@pytest.mark.parametrize("ratio", [(1, 4, 3, 8, 4, 10), (1, 10, 4, 10), (1, 10), (2, 3)])
def test_speech_qa_assistant_matches_schedule(tok_vocab, ratio):
    tok, v = tok_vocab
    rec = _chat(
        ("user", "<|audio|>"), ("assistant", "w1 w2 w3 w4 w5\n<|audio|>"), audios=["b.wav", "a.wav"]
    )
    s = _renderer(tok_vocab, ratio).render(rec)
    text = _ids(tok, "w1", "w2", "w3", "w4", "w5", "\n")
    audio = [v.audio_start + c for c in CODES["a.wav"]]
    body = InterleaveSchedule.from_ratio(list(ratio)).interleave(text, audio, v.boa, v.eoa)
    user = _turn(tok, "user", [v.boa, *(v.audio_start + c for c in CODES["b.wav"]), v.eoa])
    assert s.input_ids == user + _turn(tok, "assistant", body)
    trained = [x for x in s.labels if x != IGNORE_INDEX]
    assert trained == body + _ids(tok, "<|im_end|>", "\n")


def test_roles_system_aliases_and_written_order(tok_vocab):
    tok, v = tok_vocab
    rec = _chat(("system", "w0"), ("human", "w1"), ("gpt", "w2 <|audio|> w3"), audios=["b.wav"])
    s = _renderer(tok_vocab, None).render(rec)  # no schedule: the written order
    body = [
        *_ids(tok, "w2"),
        v.boa,
        *(v.audio_start + c for c in CODES["b.wav"]),
        v.eoa,
        *_ids(tok, "w3"),
    ]
    head = _turn(tok, "system", _ids(tok, "w0")) + _turn(tok, "user", _ids(tok, "w1"))
    assert s.input_ids == head + _turn(tok, "assistant", body)
    assert s.labels == [IGNORE_INDEX] * (len(head) + 3) + body + _ids(tok, "<|im_end|>", "\n")


def test_bad_records(tok_vocab):
    r = _renderer(tok_vocab)
    with pytest.raises(RecordError, match="2 <\\|audio\\|> placeholders but 1 audios"):
        r.render(_chat(("user", "<|audio|> <|audio|>"), ("assistant", "w1"), audios=["a.wav"]))
    with pytest.raises(RecordError, match="0 <\\|audio\\|> placeholders but 1 audios"):
        r.render(_chat(("user", "w1"), ("assistant", "w1"), audios=["a.wav"]))
    with pytest.raises(RecordError, match="unknown role 'robot'"):
        r.render(_chat(("robot", "w1"), ("assistant", "w1")))
    with pytest.raises(RecordError, match="holds 2 audios"):
        r.render(
            _chat(("user", "w1"), ("assistant", "<|audio|> <|audio|>"), audios=["a.wav", "b.wav"])
        )
    with pytest.raises(RecordError, match="no 'messages'"):
        r.render({"audios": []})
    tok, v = tok_vocab
    too_big = ChatRenderer(tok, v, lambda p: [16], None)  # code 16 is outside 16 audio tokens
    with pytest.raises(ValueError, match=r"codes must lie in \[0, 16\)"):
        too_big.render(_chat(("user", "<|audio|>"), ("assistant", "w1"), audios=["x.wav"]))


# --------------------------------------------------------------------------- audio files
def _write_mixture(tmp_path, records, name="d.jsonl", errors=None):
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return DataMixture([DataSource("d", (str(path),))], seed=0, errors=errors)


def test_audio_codes_cache_and_file_errors(tmp_path, tok_vocab):
    tok, v = tok_vocab
    codec = DummyCodec(codebook_size=16)
    ids = torch.tensor([5, 0, 15, 7])
    sf.write(tmp_path / "ok.wav", codec.decode(ids).numpy(), 16000, subtype="FLOAT")
    sf.write(tmp_path / "loud.wav", codec.decode(ids).numpy(), 8000, subtype="FLOAT")  # resampled
    (tmp_path / "bad.wav").write_bytes(b"RIFF not really a wav file")
    codes = AudioCodes(codec, root=tmp_path)
    assert codes("ok.wav") == ids.tolist()
    codes.cache["ok.wav"] = [1, 2]  # served from the cache from now on
    assert codes("ok.wav") == [1, 2]
    codes.prefetch(["loud.wav"], progress=False)
    saved = codes.save(tmp_path / "cache.npz")
    assert AudioCodes.load(saved) == codes.cache and AudioCodes.load(tmp_path / "no.npz") == {}
    with pytest.raises(FileNotFoundError):
        codes("missing.wav")
    with pytest.raises(AudioError):
        codes("bad.wav")

    renderer = ChatRenderer(tok, v, codes, InterleaveSchedule.boost())
    good = _chat(("user", "<|audio|>"), ("assistant", "w1"), audios=["ok.wav"])
    records = [good, _chat(("user", "<|audio|>"), ("assistant", "w1"), audios=["missing.wav"])]
    records.append(_chat(("user", "<|audio|>"), ("assistant", "w1"), audios=["bad.wav"]))
    mixture = _write_mixture(tmp_path, records)
    strict = VitaAudioData(mixture, renderer, max_len=64, progress=False)
    with pytest.raises(DataError, match=r"d\.jsonl:[23]: .*(not found|cannot decode)"):
        strict.dataset()
    lenient_mix = _write_mixture(tmp_path, records, errors=ErrorLog("skip"))
    lenient = VitaAudioData(lenient_mix, renderer, max_len=64, progress=False)
    packs = lenient.dataset()
    assert lenient.stats.skipped_errors == 2 and sum(len(p) for p in packs.packs) == 1
    where = sorted(e.split(": ")[0] for e in lenient.errors.skipped)
    assert where == [f"{tmp_path / 'd.jsonl'}:2", f"{tmp_path / 'd.jsonl'}:3"]


# --------------------------------------------------------------------------- packing
samples_st = st.lists(
    st.tuples(st.integers(1, 40), st.sampled_from(["s0", "s1", "s2"])), min_size=0, max_size=40
)


def _pack_all(samples, max_len, pad):
    """Pack ``samples`` (length, stream) with the recipe's planner; rows as the Trainer sees them."""
    from mctp.training import PackedDataset, greedy_packs

    lengths = [n for n, _ in samples]
    packs, too_long = greedy_packs(lengths, [src for _, src in samples], max_len)
    items = {i: [i * 1000 + j for j in range(n)] for i, (n, _) in enumerate(samples)}
    ds = PackedDataset(
        packs,
        lambda i: {"input_ids": items[i], "labels": items[i]},
        max_len=max_len if pad else None,
        pad_id=-7,
    )
    return packs, too_long, [ds[k] for k in range(len(ds))]


@settings(max_examples=60, deadline=None)
@given(samples=samples_st, max_len=st.integers(8, 64), pad=st.booleans())
def test_packing_properties(samples, max_len, pad):
    packs, too_long, rows = _pack_all(samples, max_len, pad)
    fits = [(i, n, src) for i, (n, src) in enumerate(samples) if n <= max_len]
    assert len(too_long) == len(samples) - len(fits)
    seen = {}
    for members, row in zip(packs, rows):
        lengths = [samples[i][0] for i in members]
        num_pad = len(row["input_ids"]) - sum(lengths)
        assert len(row["input_ids"]) == len(row["labels"]) == len(row["position_ids"]) <= max_len
        assert len(row["input_ids"]) == (max_len if pad else sum(lengths))
        assert row["labels"][len(row["labels"]) - num_pad :] == [IGNORE_INDEX] * num_pad
        assert row["input_ids"][len(row["input_ids"]) - num_pad :] == [-7] * num_pad
        starts = [k for k, q in enumerate(row["position_ids"]) if q == 0]  # restart per sample
        assert len(starts) == len(lengths)
        off = 0
        for n in lengths:
            ids = row["input_ids"][off : off + n]
            assert row["position_ids"][off : off + n] == list(range(n))
            assert row["labels"][off : off + n] == ids
            i = ids[0] // 1000
            assert ids == [i * 1000 + j for j in range(n)] and i not in seen
            seen[i] = {samples[k][1] for k in members}
            off += n
        assert row["position_ids"][off:] == list(range(lengths[-1], lengths[-1] + num_pad))
    assert {i: s.pop() for i, s in seen.items() if len(s) == 1} == {i: src for i, _, src in fits}
    for src in {s for _, _, s in fits}:  # a stream keeps its order, packs close only when full
        order = [p for p in packs if samples[p[0]][1] == src]
        flat = [p[0] for p in order]
        assert flat == sorted(flat)
        for a, b in itertools.pairwise(order):
            assert sum(samples[i][0] for i in a) + samples[b[0]][0] > max_len


def test_collated_pack_batch():
    _, _, rows = _pack_all([(3, "s")], 8, True)
    batch = PackedCollator(flatten=False)(rows)
    assert {k: tuple(batch[k].shape) for k in ("input_ids", "labels", "position_ids")} == {
        k: (1, 8) for k in ("input_ids", "labels", "position_ids")
    }
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 5, 6, 7]]
    assert batch["labels"].tolist() == [[0, 1, 2] + [-100] * 5]


# --------------------------------------------------------------------------- mixture
def _jsonl(tmp_path, name, n):
    path = tmp_path / f"{name}.jsonl"
    path.write_text("".join(json.dumps({"name": name, "i": i}) + "\n\n" for i in range(n)))
    return str(path)


def test_mixture_ratios_and_determinism(tmp_path):
    qa, asr, text, off = (
        _jsonl(tmp_path, k, n) for k, n in [("qa", 10), ("asr", 40), ("text", 7), ("off", 5)]
    )
    cfg = {
        "dataset": {
            "qa": {"ratio": 2.0, "data_paths": [qa]},
            "asr": {"ratio": 0.5, "num": 15, "data_paths": [asr]},
            "text": {"data_paths": [text]},
            "off": {"ratio": 0.0, "data_paths": [off]},
        }
    }
    m = DataMixture.from_config(cfg, seed=3)
    assert m.counts() == {f"qa:{qa}": 20, f"asr:{asr}": 15, f"text:{text}": 7}
    recs = [(r["name"], r["i"]) for _, _, r, _ in m.records()]
    assert len(recs) == len(m) == 42
    qa_ids = sorted(i for k, i in recs if k == "qa")
    assert qa_ids == sorted(list(range(10)) * 2)  # ratio 2.0: every record twice
    assert len(set(i for k, i in recs if k == "asr")) == 15
    again = DataMixture.from_config(cfg, seed=3)
    assert (again.plan(0) == m.plan(0)).all() and (again.plan(1) == m.plan(1)).all()
    assert not (m.plan(1) == m.plan(0)).all()  # each epoch reshuffled, same multiset
    assert sorted(map(tuple, m.plan(1).tolist())) == sorted(map(tuple, m.plan(0).tolist()))
    assert not (DataMixture.from_config(cfg, seed=4).plan(0) == m.plan(0)).all()
    # stage 4 style overrides: one source at 2.0, everything else 0.05
    s4 = DataMixture.from_config(cfg, seed=3, ratios={"asr": 2.0, "*": 0.05})
    assert s4.counts() == {f"qa:{qa}": 0, f"asr:{asr}": 15, f"text:{text}": 0, f"off:{off}": 0}
    with pytest.raises(ValueError, match="unknown sources"):
        DataMixture.from_config(cfg, ratios={"nope": 1.0})
    with pytest.raises(FileNotFoundError, match="no JSONL file"):
        DataMixture([DataSource("x", (str(tmp_path / "none.jsonl"),))])
    with pytest.raises(ValueError, match="mixture is empty"):
        DataMixture([DataSource("x", (text,), ratio=0.01)])


def test_pipeline_packs_per_stream(tmp_path, tok_vocab):
    a = tmp_path / "a.jsonl"
    b = tmp_path / "b.jsonl"
    a.write_text(
        "".join(json.dumps(_chat(("user", "w1"), ("assistant", "w2 w3"))) + "\n" for _ in range(5))
    )
    b.write_text(
        "".join(json.dumps(_chat(("user", "w4 w5"), ("assistant", "w6"))) + "\n" for _ in range(3))
    )
    mixture = DataMixture([DataSource("a", (str(a),)), DataSource("b", (str(b),))], seed=1)
    data = VitaAudioData(mixture, _renderer(tok_vocab), max_len=40, pad_id=0, progress=False)
    ds = data.dataset()
    assert sum(len(p) for p in ds.packs) == 8 and data.stats.records == 8
    for members in ds.packs:  # one stream per pack
        assert len({f for f, _ in members}) == 1
    rows = [ds[i] for i in range(len(ds))]
    assert all(len(r["input_ids"]) == 40 for r in rows)
    streamed = VitaAudioData(
        DataMixture(
            [DataSource("a", (str(a),)), DataSource("b", (str(b),))], seed=1, streaming=True
        ),
        _renderer(tok_vocab),
        max_len=40,
        progress=False,
    ).stream()
    it = iter(streamed)
    first = [next(it) for _ in range(len(rows) + 1)]  # runs into the second epoch
    assert sorted(map(str, first[: len(rows)])) == sorted(map(str, rows))


def test_malformed_kinds_are_reported_with_file_and_line(tmp_path, tok_vocab, caplog):
    bad = [
        {"audios": []},  # no messages
        {"messages": []},  # empty conversation
        {"messages": [{"role": "robot", "content": "w1"}]},
        {"messages": [{"role": "user", "content": 5}]},
        _chat(("user", "<|audio|>"), ("assistant", "w1")),  # placeholder without audio
    ]
    lines = [json.dumps(_chat(("user", "w1"), ("assistant", "w2")))] + [json.dumps(r) for r in bad]
    lines.insert(2, "{broken")
    path = tmp_path / "m.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=rf"{path}:3: invalid JSON"):
        DataMixture([DataSource("m", (str(path),))])
    mixture = DataMixture([DataSource("m", (str(path),))], errors=ErrorLog("skip"))
    strict = tmp_path / "s.jsonl"
    strict.write_text("\n".join(lines[:2] + lines[3:]) + "\n")
    with pytest.raises(DataError, match=rf"{strict}:[2-6]: "):  # first bad one met
        VitaAudioData(
            DataMixture([DataSource("s", (str(strict),))]), _renderer(tok_vocab), max_len=64
        ).dataset()
    data = VitaAudioData(mixture, _renderer(tok_vocab), max_len=64, progress=False)
    with caplog.at_level("WARNING"):
        ds = data.dataset()
    assert len(ds.packs) == 1 and data.errors.summary().startswith("skipped 6 malformed records")
    assert sorted(int(e.split(": ")[0].rsplit(":", 1)[1]) for e in data.errors.skipped) == [
        2,
        3,
        4,
        5,
        6,
        7,
    ]
    assert f"{path}:3" in caplog.text and "skipped 6 malformed records" in caplog.text


def test_asr_with_the_glm4voice_tokenizer(fixtures_dir):
    """The real GLM-4-Voice adapter (golden tiny folder, 256 codes) plugs into the pipeline."""
    from mctp.codecs import load_codec

    folder = fixtures_dir / "glm4voice-tokenizer"
    codec = load_codec(folder)
    tok = _word_tokenizer()
    vocab = extend_vocab(tok, num_audio_tokens=codec.codebook_size)
    codes = AudioCodes(codec, root=folder / "inputs")
    renderer = ChatRenderer(tok, vocab, codes, InterleaveSchedule.boost())
    rec = _chat(
        ("user", "Convert the speech to text.\n<|audio|>"),
        ("assistant", "w1"),
        audios=["en_fox.wav"],
    )
    s = renderer.render(rec)
    gold = json.loads((folder / "expected" / "en_fox.json").read_text())
    start = s.input_ids.index(vocab.boa) + 1
    assert s.input_ids[start : start + len(gold) + 1] == [vocab.audio_start + c for c in gold] + [
        vocab.eoa
    ]
