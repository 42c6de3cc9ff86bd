"""Token choice: greedy, top-k/top-p, repetition penalty (against transformers), TokenPicker."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from mctp import SamplingConfig, TokenPicker, greedy, sample_logits
from mctp.engine.sampling import apply_repetition_penalty


def test_greedy_takes_the_first_maximum():
    logits = torch.tensor([[0.0, 2.0, 2.0, 1.0], [3.0, 0.0, 0.0, 3.0]])
    assert greedy(logits).tolist() == [1, 0]


def test_top_k_and_top_p_keep_only_their_tokens():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(400, 1)
    g = torch.Generator().manual_seed(0)
    k2 = sample_logits(logits, SamplingConfig(do_sample=True, top_k=2), g)
    assert set(k2.tolist()) == {0, 1}
    p = sample_logits(logits, SamplingConfig(do_sample=True, top_p=0.79), g)
    assert set(p.tolist()) == {0, 1}  # 0.5 + 0.3 reaches 0.79: token 2 is dropped
    free = sample_logits(logits, SamplingConfig(do_sample=True), g)
    assert set(free.tolist()) == {0, 1, 2, 3}


def test_repetition_penalty_matches_transformers():
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 20, generator=g)
    seen_ids = torch.tensor([[3, 4, 4, 9], [0, 19, 5, 5]])
    ref = RepetitionPenaltyLogitsProcessor(1.3)(seen_ids, logits.clone())
    seen = torch.zeros(2, 20, dtype=torch.bool).scatter(1, seen_ids, True)
    torch.testing.assert_close(apply_repetition_penalty(logits, seen, 1.3), ref)


def test_picker_resamples_only_audio_picks_with_the_audio_setting():
    speech = SimpleNamespace(boa=4, eoa=5, audio_start=6, audio_stop=10)
    hot = SamplingConfig(do_sample=True, temperature=100.0)
    picker = TokenPicker(10, speech, SamplingConfig(), hot, torch.Generator().manual_seed(0),
                         torch.device("cpu"), 300)  # fmt: skip
    text_top = torch.zeros(300, 10)
    text_top[:, 2] = 5.0  # greedy picks text id 2: kept
    assert picker(text_top).tolist() == [2] * 300
    audio_top = torch.zeros(300, 10)
    audio_top[:, 7] = 5.0  # greedy picks audio id 7: redrawn among audio ids only
    got = picker(audio_top)
    assert set(got.tolist()) <= set(range(6, 10)) and len(set(got.tolist())) > 1


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"temperature": 0.0}, "temperature must be > 0"),
        ({"top_k": -1}, "top_k must be >= 0"),
        ({"top_p": 0.0}, r"top_p must be in \(0, 1\]"),
        ({"repetition_penalty": 0.0}, "repetition_penalty must be > 0"),
    ],
)
def test_out_of_range_values_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingConfig(**kwargs)


def test_wrong_types_raise():
    with pytest.raises(TypeError, match="temperature must be a number"):
        SamplingConfig(temperature="0.7")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="top_k must be an int"):
        SamplingConfig(top_k=2.0)  # type: ignore[arg-type]
