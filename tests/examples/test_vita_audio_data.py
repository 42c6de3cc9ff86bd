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
    Sample,
    VitaAudioData,
)
from vita_audio.mixture import DataMixture, DataSource
from vita_audio.packing import Packer

from mctp.backbones import extend_vocab
from mctp.codecs import AudioError, DummyCodec
from mctp.interleave import InterleaveSchedule

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
def _write_mixture(tmp_path, records, name="d.jsonl"):
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return DataMixture([DataSource("d", (str(path),))], seed=0)


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
    strict = VitaAudioData(mixture, renderer, Packer(64), progress=False)
    with pytest.raises(RecordError, match=r"d\.jsonl:\d: .*(not found|cannot decode)"):
        list(strict.packs())
    lenient = VitaAudioData(mixture, renderer, Packer(64), on_error="skip", progress=False)
    packs = list(lenient.packs())
    assert lenient.stats.skipped_errors == 2 and sum(len(p.lengths) for p in packs) == 1


# --------------------------------------------------------------------------- packing
samples_st = st.lists(
    st.tuples(st.integers(1, 40), st.sampled_from(["s0", "s1", "s2"])), min_size=0, max_size=40
)


@settings(max_examples=60, deadline=None)
@given(samples=samples_st, max_len=st.integers(8, 64), pad=st.booleans())
def test_packing_properties(samples, max_len, pad):
    packer = Packer(max_len, pad_id=-7, pad=pad)
    packs = []
    for i, (n, src) in enumerate(samples):  # sample i: ids i*1000 + 0..n-1, labels = ids
        ids = [i * 1000 + j for j in range(n)]
        done = packer.add(Sample(ids, list(ids)), src)
        packs += [done] if done else []
    packs += packer.flush()
    fits = [(i, n, src) for i, (n, src) in enumerate(samples) if n <= max_len]
    assert packer.skipped == len(samples) - len(fits)
    seen = {}
    for p in packs:
        assert len(p.input_ids) == len(p.labels) == len(p.position_ids) <= max_len
        assert len(p.input_ids) == (max_len if pad else sum(p.lengths)) and p.num_pad == len(
            p.input_ids
        ) - sum(p.lengths)
        assert p.labels[len(p.labels) - p.num_pad :] == [IGNORE_INDEX] * p.num_pad
        assert p.input_ids[len(p.input_ids) - p.num_pad :] == [-7] * p.num_pad
        starts = [k for k, q in enumerate(p.position_ids) if q == 0]  # restart at every sample
        assert len(starts) == len(p.lengths)
        off = 0
        for n in p.lengths:
            ids = p.input_ids[off : off + n]
            assert (
                p.position_ids[off : off + n] == list(range(n)) and p.labels[off : off + n] == ids
            )
            i = ids[0] // 1000
            assert ids == [i * 1000 + j for j in range(n)] and i not in seen
            seen[i] = p.source
            off += n
        assert p.position_ids[off:] == list(range(p.lengths[-1], p.lengths[-1] + p.num_pad))
    assert seen == {i: src for i, _, src in fits}  # every fitting sample exactly once, own stream
    for src in {s for _, _, s in fits}:  # a stream keeps its order, packs close only when full
        order = [p for p in packs if p.source == src]
        flat = [p.input_ids[0] // 1000 for p in order]
        assert flat == sorted(flat)
        for a, b in itertools.pairwise(order):
            assert sum(a.lengths) + b.lengths[0] > max_len


def test_packing_policy_and_batch():
    with pytest.raises(ValueError, match="exceeds max_len 4"):
        Packer(4, on_too_long="raise").add(Sample([1] * 5, [1] * 5))
    with pytest.raises(ValueError, match="on_too_long"):
        Packer(4, on_too_long="truncate")
    packer = Packer(8, pad_id=0)
    assert packer.add(Sample([1, 2, 3], [-100, 2, 3])) is None
    (pack,) = packer.flush()
    batch = pack.batch()
    assert {k: tuple(t.shape) for k, t in batch.items()} == {
        k: (1, 8) for k in ("input_ids", "labels", "position_ids")
    }
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 5, 6, 7]]
    assert batch["labels"].tolist() == [[-100, 2, 3] + [-100] * 5]


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
    recs = [(r["name"], r["i"]) for _, _, r in m.records()]
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
    with pytest.raises(FileNotFoundError, match="data file not found"):
        DataMixture([DataSource("x", (str(tmp_path / "none.jsonl"),))])
    with pytest.raises(ValueError, match="mixture is empty"):
        DataMixture([DataSource("x", (text,), ratio=0.01)])


def test_pipeline_batches_per_stream(tmp_path, tok_vocab):
    a = tmp_path / "a.jsonl"
    b = tmp_path / "b.jsonl"
    a.write_text(
        "".join(json.dumps(_chat(("user", "w1"), ("assistant", "w2 w3"))) + "\n" for _ in range(5))
    )
    b.write_text(
        "".join(json.dumps(_chat(("user", "w4 w5"), ("assistant", "w6"))) + "\n" for _ in range(3))
    )
    mixture = DataMixture([DataSource("a", (str(a),)), DataSource("b", (str(b),))], seed=1)
    data = VitaAudioData(mixture, _renderer(tok_vocab), Packer(40, pad_id=0), progress=False)
    packs = list(data.packs())
    assert sum(len(p.lengths) for p in packs) == 8 and data.stats.records == 8
    for p in packs:  # one stream per pack: every sample of a pack renders identically
        first = p.input_ids[: p.lengths[0]]
        assert all(
            p.input_ids[sum(p.lengths[:k]) : sum(p.lengths[: k + 1])] == first
            for k in range(len(p.lengths))
        )
    stream = data.batches()
    first_epoch = [next(stream) for _ in range(len(packs) + 1)]  # runs into epoch 1
    assert all(x["input_ids"].shape == (1, 40) for x in first_epoch)


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
