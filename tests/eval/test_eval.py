"""``mctp eval``: ASR, TTS round trip, spoken QA and heads, with hand-computed expected scores.

The recognisers are stand-ins whose output is known: a stub pipeline that answers from a table,
and a tiny random Whisper that always transcribes ``""``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import soundfile as sf
import torch

from mctp import MCTPStack
from mctp.cli import main
from mctp.codecs import DummyCodec
from mctp.eval import eval_asr, eval_qa, eval_tts, head_acceptance, load_asr_model, run_eval

CODEC = DummyCodec(codebook_size=256)


@dataclass
class Answer:
    text: str
    audio: torch.Tensor
    sample_rate: int = 16000
    first_chunk_s: float | None = 0.01


class TablePipeline:
    """Answers each wav (by file name) or text from a table; records how it was called."""

    def __init__(self, table: dict[str, str]) -> None:
        self.table, self.calls = table, []

    def __call__(self, text=None, audio=None, sample_rate=None, *, task="chat", **kw):
        self.calls.append((task, text, None if audio is None else Path(audio).name))
        key = Path(audio).name if audio is not None else text
        return Answer(self.table[key], CODEC.decode(torch.arange(4)))


def _wav(folder: Path, name: str, n: int = 6) -> str:
    sf.write(folder / name, CODEC.decode(torch.arange(n)).numpy(), 16000)
    return name


def _jsonl(path: Path, items: list[dict]) -> Path:
    path.write_text("".join(json.dumps(i, ensure_ascii=False) + "\n" for i in items))
    return path


def test_asr_wer_and_cer_by_hand(tmp_path):
    items = [
        {"audio": _wav(tmp_path, "a.wav"), "text": "The cat sat."},
        {"audio": _wav(tmp_path, "b.wav"), "text": "hello world"},
    ]
    pipe = TablePipeline({"a.wav": "the cat sat down", "b.wav": "Hello"})
    from mctp.eval import read_jsonl

    out = eval_asr(pipe, read_jsonl(_jsonl(tmp_path / "asr.jsonl", items)))
    assert (out["metric"], out["errors"], out["units"]) == ("wer", 2, 5)
    assert out["value"] == pytest.approx(0.4)
    assert pipe.calls == [("asr", None, "a.wav"), ("asr", None, "b.wav")]
    zh = [{"audio": _wav(tmp_path, "c.wav"), "text": "你好世界", "language": "zh"}]
    out = eval_asr(
        TablePipeline({"c.wav": "你好视界"}), read_jsonl(_jsonl(tmp_path / "zh.jsonl", zh))
    )
    assert out["metric"] == "cer" and out["value"] == pytest.approx(0.25)


def test_spoken_qa_accuracy_by_hand(tmp_path, silent_whisper):
    items = [
        {"audio": _wav(tmp_path, "q1.wav"), "answer": "Paris"},  # LlamaQuestions
        {"audio": _wav(tmp_path, "q2.wav"), "answers": ["Jamaica"]},  # Web Questions
        {"question": "who wrote hamlet", "answer": {"aliases": ["Shakespeare", "W. Shakespeare"]}},
    ]
    pipe = TablePipeline(
        {
            "q1.wav": "The capital is Paris.",
            "q2.wav": "It is in the Caribbean.",
            "who wrote hamlet": "William Shakespeare wrote it",
        }
    )
    from mctp.eval import read_jsonl

    data = read_jsonl(_jsonl(tmp_path / "qa.jsonl", items))
    out = eval_qa(pipe, data)
    assert out["s2t"] == pytest.approx(2 / 3) and out["s2s"] is None
    assert [r["s2t"] for r in out["items"]] == [True, False, True]
    # S->S: the silent Whisper hears nothing in the answers' audio
    out = eval_qa(pipe, data, load_asr_model(silent_whisper))
    assert out["s2t"] == pytest.approx(2 / 3) and out["s2s"] == 0.0


def test_tts_round_trip_with_tiny_whisper(tiny, silent_whisper, tmp_path):
    transcribe = load_asr_model(silent_whisper)
    assert transcribe(torch.zeros(8000), 8000) == ""  # resampled here, no torchaudio needed
    from mctp.eval import read_jsonl

    items = read_jsonl(
        _jsonl(tmp_path / "tts.jsonl", [{"text": "one two three"}, {"text": "four five"}])
    )
    out = eval_tts(tiny, items, transcribe)
    # nothing recognised: 5 deletions out of 5 words
    assert (out["metric"], out["errors"], out["units"], out["value"]) == ("wer", 5, 5, 1.0)
    assert out["first_chunk_ms"] > 0


def test_head_acceptance_taught_and_random(tiny):
    res = tiny("hello who are you", mode="vanilla")
    full = torch.cat([res.prompt_ids, res.generation.tokens[0]])[None]
    assert head_acceptance(tiny, full, res.prompt_ids.numel()) == [1.0] * 10
    torch.manual_seed(1)
    fresh = MCTPStack.from_backbone(tiny.backbone.parts(), 10).eval()
    taught, tiny.stack = tiny.stack, fresh
    try:
        acc = head_acceptance(tiny, full, res.prompt_ids.numel())
    finally:
        tiny.stack = taught
    assert len(acc) == 10 and max(acc[1:]) < 0.5  # untaught heads (head 0 copies the backbone)


def test_mctp_eval_cli_end_to_end(tiny, silent_whisper, tmp_path, capsys):
    asr = _jsonl(
        tmp_path / "asr.jsonl", [{"audio": _wav(tmp_path, "a.wav"), "text": "hello this is"}]
    )
    tts = _jsonl(tmp_path / "tts.jsonl", [{"text": "hello world"}])
    qa = _jsonl(tmp_path / "qa.jsonl", [{"question": "who are you", "answer": "tiny"}])
    out = tmp_path / "eval.json"
    argv = ["eval", "--asr", str(asr), "--tts", str(tts), "--qa", str(qa), "--heads"]
    argv += ["--asr-model", str(silent_whisper), "--out", str(out), "--threads", "1"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "| ASR WER (n=1)" in printed and "head 9 acceptance" in printed
    res = json.loads(out.read_text())
    assert res["tts"]["value"] == 1.0
    # the tiny model answers every text question with its one answer, which contains "tiny"
    assert res["qa"]["s2t"] == 1.0 and res["qa"]["s2s"] == 0.0
    assert res["heads"]["acceptance"] == [1.0] * 10
    assert set(res["heads"]["modes"]) == {"vanilla", "balance", "boost", "turbo"}
    from mctp.eval import error_rate

    item = res["asr"]["items"][0]
    assert res["asr"]["value"] == error_rate([item["ref"]], [item["hyp"]])["value"]


def test_eval_errors(tiny, tmp_path):
    with pytest.raises(ValueError, match="at least one"):
        run_eval(tiny)
    with pytest.raises(ValueError, match="asr-model"):
        run_eval(tiny, tts=tmp_path / "x.jsonl")
    with pytest.raises(FileNotFoundError):
        run_eval(tiny, asr=tmp_path / "missing.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"audio": "a.wav"}\nnot json\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:2"):
        run_eval(tiny, asr=bad)
