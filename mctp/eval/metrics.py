"""Scores: WER/CER (jiwer) with text normalisation, and the spoken-QA answer match.

Normalisation before WER: lower case, punctuation removed (apostrophes inside words kept),
whitespace collapsed. Chinese text is scored by CER over its characters with punctuation and
spaces removed (as the paper's Chinese benchmarks report CER).

Spoken QA (LlamaQuestions, Web Questions, TriviaQA): the paper (Section 4.2) scores the text
answer "directly" without spelling out the rule; we use the rule of the open evaluation scripts
of these benchmarks: after SQuAD-style normalisation (lower case, punctuation and the articles
``a``/``an``/``the`` removed, whitespace collapsed) a response is correct when any reference
answer occurs in it as a whole-word sequence.
"""

from __future__ import annotations

import re
import string
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

__all__ = [
    "error_rate",
    "is_chinese",
    "normalize_answer",
    "normalize_text",
    "qa_answers",
    "qa_match",
]

_CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def _strip_punct(text: str, keep: str = "") -> str:
    return "".join(
        " "
        if (unicodedata.category(c).startswith("P") or c in string.punctuation) and c not in keep
        else c
        for c in text
    )


def is_chinese(text: str) -> bool:
    """Whether ``text`` contains CJK ideographs (scored by CER)."""
    return bool(_CJK.search(text))


def normalize_text(text: str, *, chinese: bool = False) -> str:
    """Text as scored by WER (words separated by one space) or, for Chinese, CER (no spaces)."""
    text = unicodedata.normalize("NFKC", text).lower()
    if chinese:
        return re.sub(r"\s+", "", _strip_punct(text))
    text = re.sub(r"(?<!\w)'|'(?!\w)", " ", text)  # quotes, not in-word apostrophes
    return " ".join(_strip_punct(text, keep="'").split())


def error_rate(
    references: Sequence[str], hypotheses: Sequence[str], *, chinese: bool | None = None
) -> dict[str, Any]:
    """Corpus WER (or CER for Chinese) over normalised texts.

    Args:
        references: Reference texts.
        hypotheses: Recognised texts, one per reference.
        chinese: Score by CER; default: when any reference contains CJK ideographs.

    Returns:
        ``{"metric": "wer"|"cer", "value": errors / reference units, "errors": int,
        "units": int, "n": items}``.

    Raises:
        ValueError: If the lists differ in length, are empty, or all references normalise to
            nothing.
    """
    import jiwer

    if len(references) != len(hypotheses):
        raise ValueError(f"{len(references)} references but {len(hypotheses)} hypotheses")
    if not references:
        raise ValueError("nothing to score")
    cjk = any(is_chinese(r) for r in references) if chinese is None else chinese
    refs = [normalize_text(r, chinese=cjk) for r in references]
    hyps = [normalize_text(h, chinese=cjk) for h in hypotheses]
    keep = [i for i, r in enumerate(refs) if r]
    if not keep:
        raise ValueError("every reference is empty after normalisation")
    refs = [refs[i] for i in keep]
    hyps = [hyps[i] for i in keep]
    out = jiwer.process_characters(refs, hyps) if cjk else jiwer.process_words(refs, hyps)
    errors = out.substitutions + out.deletions + out.insertions
    units = out.substitutions + out.deletions + out.hits
    return {
        "metric": "cer" if cjk else "wer",
        "value": errors / units,
        "errors": int(errors),
        "units": int(units),
        "n": len(refs),
    }


def normalize_answer(text: str) -> str:
    """SQuAD-style: lower case, punctuation and articles removed, whitespace collapsed."""
    text = _strip_punct(unicodedata.normalize("NFKC", text).lower())
    return " ".join(_ARTICLES.sub(" ", text).split())


def qa_answers(record: Mapping[str, Any]) -> list[str]:
    """Reference answers of one QA record in any of the three benchmarks' layouts.

    Accepted: ``"answer"`` as a string, a list, or TriviaQA's object (``aliases``,
    ``normalized_aliases``, ``value``); ``"answers"`` as a list (Web Questions).

    Raises:
        ValueError: If the record holds no answer.
    """
    found: list[str] = []
    for key in ("answer", "answers"):
        value = record.get(key)
        if isinstance(value, str):
            found.append(value)
        elif isinstance(value, Mapping):
            for k in ("value", "aliases", "normalized_aliases"):
                v = value.get(k)
                found += [v] if isinstance(v, str) else list(v or [])
        elif isinstance(value, Iterable):
            found += [str(v) for v in value]
    found = [a for a in dict.fromkeys(found) if normalize_answer(a)]
    if not found:
        raise ValueError(f"no answer in the record (keys: {sorted(record)})")
    return found


def qa_match(response: str, answers: Sequence[str]) -> bool:
    """Whether any normalised answer occurs in the normalised response as whole words."""
    resp = f" {normalize_answer(response)} "
    return any(f" {a} " in resp for a in (normalize_answer(x) for x in answers) if a)
