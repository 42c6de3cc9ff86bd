"""``mctp eval``: ASR, TTS round trip, spoken QA and per-head acceptance of a speech pipeline.

Data files are JSONL, one item a line; relative audio paths are read next to the file:

* ASR: ``{"audio": "a.wav", "text": "reference", "language": "en"}`` (``language`` optional;
  Chinese is scored by CER).
* TTS: ``{"text": "what to say"}``; the pipeline speaks it, an ASR model (any transformers
  ``automatic-speech-recognition`` model folder) transcribes it, WER/CER against the text.
* Spoken QA in the LlamaQuestions / Web Questions / TriviaQA style:
  ``{"audio": "q.wav", "question": "...", "answer": "..." | [...] | {"aliases": [...]},
  "answers": [...]}``; the question is spoken when ``audio`` is there, else given as text.
  Accuracy S->T scores the text answer, S->S (with an ASR model) the transcribed speech.
* Heads: each MCTP head's acceptance (how often its greedy choice equals the token the backbone
  itself generates k+2 tokens ahead, teacher-forced over Vanilla answers) and tokens/s and
  first-chunk latency per mode.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .metrics import error_rate, qa_answers, qa_match

__all__ = [
    "eval_asr",
    "eval_heads",
    "eval_qa",
    "eval_tts",
    "load_asr_model",
    "read_jsonl",
    "run_eval",
]

MODES = ("vanilla", "balance", "boost", "turbo")


def read_jsonl(path: str | Path, limit: int | None = None) -> list[dict[str, Any]]:
    """Items of a JSONL file, relative ``audio`` paths made absolute.

    Raises:
        FileNotFoundError: If the file does not exist.
        ValueError: On a line that is not a JSON object (with its line number), or no items.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    items = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except ValueError as e:
            raise ValueError(f"{path}:{n}: not JSON: {e}") from None
        if not isinstance(item, dict):
            raise ValueError(f"{path}:{n}: expected a JSON object")
        if isinstance(item.get("audio"), str):
            item["audio"] = str((path.parent / item["audio"]).resolve())
        items.append(item)
        if limit is not None and len(items) >= limit:
            break
    if not items:
        raise ValueError(f"{path} holds no items")
    return items


def load_asr_model(path: str | Path, *, device: str = "cpu") -> Callable[[torch.Tensor, int], str]:
    """A transcriber ``(wav [S], sample_rate) -> text`` from a transformers ASR model folder.

    Audio is resampled here (soxr) to the model's feature rate.

    Raises:
        FileNotFoundError: If the folder does not exist.
    """
    from transformers import pipeline

    from mctp.codecs import resample

    if not Path(path).is_dir():
        raise FileNotFoundError(f"ASR model folder not found: {path}")
    asr = pipeline("automatic-speech-recognition", model=str(path), device=device)
    rate = int(asr.feature_extractor.sampling_rate)

    def transcribe(wav: torch.Tensor, sample_rate: int) -> str:
        if wav.numel() == 0:
            return ""
        x = resample(wav.float(), int(sample_rate), rate) if sample_rate != rate else wav.float()
        out = asr({"raw": x.numpy().astype(np.float32), "sampling_rate": rate})
        return str(out["text"]).strip()

    return transcribe


def _progress(items: Sequence[Any], desc: str) -> Any:
    from tqdm import tqdm

    return tqdm(items, desc=desc, disable=None, file=sys.stderr)


def eval_asr(pipe: Any, items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Transcribe every item's audio with the pipeline's ASR prompt and score it.

    Returns:
        ``{"metric", "value", "errors", "units", "n", "items": [{"ref", "hyp"}]}`` (CER when
        the references are Chinese or ``language`` is ``zh``).

    Raises:
        ValueError: On an item without ``audio`` or ``text``.
    """
    refs, hyps = [], []
    for item in _progress(items, "asr"):
        if "audio" not in item or "text" not in item:
            raise ValueError(f"an ASR item needs audio and text, got keys {sorted(item)}")
        hyps.append(pipe(audio=item["audio"], task="asr").text)
        refs.append(item["text"])
    chinese = True if all(i.get("language") == "zh" for i in items) else None
    score = error_rate(refs, hyps, chinese=chinese)
    score["items"] = [{"ref": r, "hyp": h} for r, h in zip(refs, hyps)]
    return score


def eval_tts(
    pipe: Any, items: Sequence[dict[str, Any]], transcribe: Callable[[torch.Tensor, int], str]
) -> dict[str, Any]:
    """Speak every item's text, transcribe the audio, score against the text.

    Returns:
        As :func:`eval_asr`, plus ``first_chunk_ms`` (mean over items with audio).

    Raises:
        ValueError: On an item without ``text``.
    """
    refs, hyps, latency = [], [], []
    for item in _progress(items, "tts"):
        if "text" not in item:
            raise ValueError(f"a TTS item needs text, got keys {sorted(item)}")
        res = pipe(item["text"], task="tts")
        hyps.append(transcribe(res.audio, res.sample_rate))
        refs.append(item["text"])
        if res.first_chunk_s is not None:
            latency.append(1000 * res.first_chunk_s)
    chinese = True if all(i.get("language") == "zh" for i in items) else None
    score = error_rate(refs, hyps, chinese=chinese)
    score["items"] = [{"ref": r, "hyp": h} for r, h in zip(refs, hyps)]
    score["first_chunk_ms"] = float(np.mean(latency)) if latency else None
    return score


def eval_qa(
    pipe: Any,
    items: Sequence[dict[str, Any]],
    transcribe: Callable[[torch.Tensor, int], str] | None = None,
) -> dict[str, Any]:
    """Spoken QA accuracy: S->T on the text answer and, with ``transcribe``, S->S.

    Returns:
        ``{"s2t": accuracy, "s2s": accuracy or None, "n", "items": [...]}``.

    Raises:
        ValueError: On an item with neither ``audio`` nor ``question``, or without answers.
    """
    rows = []
    for item in _progress(items, "qa"):
        answers = qa_answers(item)
        if "audio" in item:
            res = pipe(audio=item["audio"])
        elif "question" in item:
            res = pipe(item["question"])
        else:
            raise ValueError(f"a QA item needs audio or question, got keys {sorted(item)}")
        row: dict[str, Any] = {
            "answers": answers,
            "text": res.text,
            "s2t": qa_match(res.text, answers),
        }
        if transcribe is not None:
            row["speech"] = transcribe(res.audio, res.sample_rate)
            row["s2s"] = qa_match(row["speech"], answers)
        rows.append(row)
    s2s = [r["s2s"] for r in rows if "s2s" in r]
    return {
        "s2t": sum(r["s2t"] for r in rows) / len(rows),
        "s2s": sum(s2s) / len(s2s) if s2s else None,
        "n": len(rows),
        "items": rows,
    }


@torch.inference_mode()
def head_acceptance(pipe: Any, sequence: torch.Tensor, prompt_len: int) -> list[float]:
    """Per head, the share of answer positions where its greedy token equals the actual token.

    Teacher-forced over ``sequence [1, T]`` (prompt + a Vanilla answer): head ``k`` at
    position ``t`` reads the chain's state and ``x_t`` and is right when it predicts ``x_{t+1}``.

    Raises:
        ValueError: If the pipeline has no MCTP heads or the answer is too short.
    """
    if pipe.stack is None:
        raise ValueError("the model has no MCTP heads")
    seq = sequence.to(pipe.device)
    labels = seq.clone()
    labels[:, :prompt_len] = -100
    out = pipe.backbone(seq)
    heads = pipe.stack(out.hidden, seq, labels=labels, return_logits=True)
    acc = []
    for k, logits in enumerate(heads.logits):
        target = heads.targets[k]
        mask = target != -100
        if not bool(mask.any()):
            raise ValueError(f"the answer is too short to score head {k}")
        pred = logits.argmax(-1)
        if pipe.stack.output_vocab is not None:
            pred = pipe.stack.output_vocab.index[pred]
        acc.append(float((pred[mask] == target[mask]).float().mean()))
    return acc


def eval_heads(pipe: Any, prompts: Sequence[str], modes: Sequence[str] = MODES) -> dict[str, Any]:
    """Per-head acceptance (over Vanilla answers to ``prompts``) and speed per mode.

    Returns:
        ``{"acceptance": [per head], "modes": {mode: {"tokens_per_s", "first_chunk_ms"}}}``.

    Raises:
        ValueError: If the model has no MCTP heads or ``prompts`` is empty.
    """
    if not prompts:
        raise ValueError("no prompts")
    per_head: list[list[float]] = []
    speed: dict[str, dict[str, list[float]]] = {
        m: {"tokens_per_s": [], "first_chunk_ms": []} for m in modes
    }
    for text in _progress(list(prompts), "heads"):
        for mode in modes:
            res = pipe(text, mode=mode)
            speed[mode]["tokens_per_s"].append(res.tokens_per_s)
            if res.first_chunk_s is not None:
                speed[mode]["first_chunk_ms"].append(1000 * res.first_chunk_s)
            if mode == "vanilla":
                answer = res.generation.tokens[0]
                full = torch.cat([res.prompt_ids.cpu(), answer])[None]
                per_head.append(head_acceptance(pipe, full, res.prompt_ids.numel()))
    return {
        "acceptance": [float(np.mean(col)) for col in zip(*per_head)],
        "modes": {
            m: {
                "tokens_per_s": float(np.median(v["tokens_per_s"])),
                "first_chunk_ms": float(np.median(v["first_chunk_ms"]))
                if v["first_chunk_ms"]
                else None,
            }
            for m, v in speed.items()
        },
    }


def _table(results: dict[str, Any]) -> str:
    rows: list[tuple[str, str]] = []
    if "asr" in results:
        r = results["asr"]
        rows.append((f"ASR {r['metric'].upper()} (n={r['n']})", f"{100 * r['value']:.2f}%"))
    if "tts" in results:
        r = results["tts"]
        rows.append(
            (f"TTS round-trip {r['metric'].upper()} (n={r['n']})", f"{100 * r['value']:.2f}%")
        )
    if "qa" in results:
        r = results["qa"]
        rows.append((f"spoken QA S->T accuracy (n={r['n']})", f"{100 * r['s2t']:.1f}%"))
        if r["s2s"] is not None:
            rows.append((f"spoken QA S->S accuracy (n={r['n']})", f"{100 * r['s2s']:.1f}%"))
    if "heads" in results:
        r = results["heads"]
        for k, a in enumerate(r["acceptance"]):
            rows.append((f"head {k} acceptance", f"{100 * a:.1f}%"))
        for m, v in r["modes"].items():
            fc = "-" if v["first_chunk_ms"] is None else f"{v['first_chunk_ms']:.1f} ms"
            rows.append((f"{m}: tokens/s, first chunk", f"{v['tokens_per_s']:.1f}, {fc}"))
    width = max([len(a) for a, _ in rows] + [6])
    vwidth = max([len(b) for _, b in rows] + [5])
    lines = [
        f"| {'metric'.ljust(width)} | {'value'.rjust(vwidth)} |",
        f"|{'-' * (width + 2)}|{'-' * (vwidth + 2)}|",
    ]
    lines += [f"| {a.ljust(width)} | {b.rjust(vwidth)} |" for a, b in rows]
    return "\n".join(lines)


def run_eval(
    pipe: Any,
    *,
    asr: str | Path | None = None,
    tts: str | Path | None = None,
    qa: str | Path | None = None,
    heads: bool = False,
    asr_model: str | Path | None = None,
    out: str | Path | None = None,
    limit: int | None = None,
    head_prompts: Sequence[str] = ("hello who are you", "tell me about the weather today"),
) -> dict[str, Any]:
    """Run the chosen evaluations, print a table and write JSON.

    Args:
        pipe: A :class:`~mctp.speech.SpeechPipeline`.
        asr: ASR JSONL.
        tts: TTS JSONL (needs ``asr_model``).
        qa: Spoken-QA JSONL (S->S too when ``asr_model`` is given).
        heads: Measure head acceptance and per-mode speed.
        asr_model: transformers ASR model folder.
        out: JSON file to write (None: none).
        limit: First N items of each file.
        head_prompts: Text prompts for ``heads``.

    Returns:
        ``{"asr": ..., "tts": ..., "qa": ..., "heads": ...}`` for the evaluations run.

    Raises:
        ValueError: If nothing is selected, or TTS is asked without ``asr_model``.
        FileNotFoundError: On a missing data file or model folder.
    """
    if not (asr or tts or qa or heads):
        raise ValueError("choose at least one of --asr, --tts, --qa, --heads")
    if tts and asr_model is None:
        raise ValueError("the TTS round trip needs --asr-model (a transformers ASR model folder)")
    transcribe = load_asr_model(asr_model) if asr_model is not None else None
    results: dict[str, Any] = {}
    if asr:
        results["asr"] = eval_asr(pipe, read_jsonl(asr, limit))
    if tts:
        assert transcribe is not None
        results["tts"] = eval_tts(pipe, read_jsonl(tts, limit), transcribe)
    if qa:
        results["qa"] = eval_qa(pipe, read_jsonl(qa, limit), transcribe)
    if heads:
        results["heads"] = eval_heads(pipe, list(head_prompts))
    print(_table(results))
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(
            json.dumps(results, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
        )
        print(f"wrote {out}")
    return results
