"""Evaluation of speech pipelines (``mctp eval``): ASR WER/CER, TTS round trip, spoken QA, heads.

Needs the ``eval`` extra (jiwer); the TTS round trip and S->S QA need a transformers ASR model.
"""

from .metrics import error_rate, is_chinese, normalize_answer, normalize_text, qa_answers, qa_match
from .run import (
    eval_asr,
    eval_heads,
    eval_qa,
    eval_tts,
    head_acceptance,
    load_asr_model,
    read_jsonl,
    run_eval,
)

__all__ = [
    "error_rate",
    "eval_asr",
    "eval_heads",
    "eval_qa",
    "eval_tts",
    "head_acceptance",
    "is_chinese",
    "load_asr_model",
    "normalize_answer",
    "normalize_text",
    "qa_answers",
    "qa_match",
    "read_jsonl",
    "run_eval",
]
