"""The speech vocabulary in the core (mctp.speech_vocab): ids, checks, the old import path."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import mctp
import mctp.backbones
import mctp.speech_vocab as sv
from mctp.speech_vocab import AUDIO_CONTEXT, AUDIO_PLACEHOLDER, BOA, EOA, SpeechVocab

ROOT = Path(__file__).resolve().parents[2]


def _vocab(**kw) -> SpeechVocab:
    special = {BOA: 10, EOA: 11, AUDIO_PLACEHOLDER: 12}
    return SpeechVocab(
        **{"special": special, "audio_start": 20, "num_audio": 8, "vocab_size": 32, **kw}
    )


def test_ids_and_codes():
    v = _vocab()
    assert (v.boa, v.eoa, v.audio_placeholder, v.audio_context, v.audio_stop) == (
        10,
        11,
        12,
        None,
        28,
    )
    assert v.from_codes([0, 7]).tolist() == [20, 27]
    assert v.to_codes(torch.tensor([20, 27])).tolist() == [0, 7]
    assert v.is_audio(torch.tensor([19, 20, 27, 28])).tolist() == [False, True, True, False]
    assert v.mctp_output_vocab() == [10, 11, *range(20, 28)]
    plus = _vocab(special={BOA: 10, EOA: 11, AUDIO_CONTEXT: 13, AUDIO_PLACEHOLDER: 12})
    assert plus.audio_context == 13
    assert sv.audio_token(5) == "<|audio_5|>"
    assert sv.SPECIAL_TOKENS_PLUS.index(AUDIO_CONTEXT) == sv.SPECIAL_TOKENS_PLUS.index(EOA) + 1


def test_bad_vocabularies_name_the_setting():
    with pytest.raises(ValueError, match=r"needs the special token <\|end_of_audio\|>"):
        _vocab(special={BOA: 10, AUDIO_PLACEHOLDER: 12})
    with pytest.raises(ValueError, match="num_audio must be >= 1, got 0"):
        _vocab(num_audio=0)
    with pytest.raises(ValueError, match=r"audio ids \[20, 40\) exceed vocab_size 32"):
        _vocab(num_audio=20)
    with pytest.raises(ValueError, match=r"ids \[11\] are not audio tokens \[20, 28\)"):
        _vocab().to_codes([20, 11])
    with pytest.raises(ValueError, match=r"codes must lie in \[0, 8\), got \[-1, 3\]"):
        _vocab().from_codes([3, -1])


def test_old_import_path_re_exports_the_same_objects():
    for name in sv.__all__:
        assert getattr(mctp.backbones, name) is getattr(sv, name), name
    assert mctp.SpeechVocab is SpeechVocab
    from mctp.backbones import extend_vocab  # stays in the adapter (it resizes a model)

    assert extend_vocab.__module__ == "mctp.backbones.vocab"


def test_core_vocabulary_needs_no_transformers():
    code = (
        "import sys, mctp.speech_vocab\n"
        "print([m for m in ('transformers', 'mctp.backbones') if m in sys.modules])"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
