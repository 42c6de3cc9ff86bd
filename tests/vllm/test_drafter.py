"""Verified decoding through vLLM with the cascaded MCTP drafter equals ours, step for step.

For a batch of prompts of different lengths, greedy decoding through vLLM (target + MCTP
drafter, ``method: "mtp"``) must give transformers' greedy tokens, our Vanilla tokens, and the
same number of new tokens at every step as our verified mode with the same heads and draft
length, i.e. the same accepted count at every draft position. The heads are trained only
briefly so that acceptance lies strictly between 0 and 1 (checked: the equality is not
vacuous).
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("vllm", reason="vLLM is not installed (run .ci/vllm for the vLLM tests)")

from vllm_helpers import NUM_HEADS, PROMPTS, close_llm, make_llm, our_steps, vllm_steps

MAX_NEW = 20


def _transformers_greedy(built, prompt: list[int]) -> list[int]:
    model = built.backbone.model
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            max_new_tokens=MAX_NEW,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )
    return out[0, len(prompt) :].tolist()


def _check(built, k: int) -> None:
    from mctp import generate

    llm = make_llm(built.model_dir, built.draft_dir, k)
    try:
        got = vllm_steps(llm, PROMPTS, MAX_NEW)
    finally:
        close_llm(llm)
    drafted = accepted = 0
    distinct: set[int] = set()
    for prompt, (tokens, steps) in zip(PROMPTS, got):
        vanilla = (
            generate(
                built.backbone, None, torch.tensor([prompt]), mode="vanilla", max_new_tokens=MAX_NEW
            )
            .tokens[0]
            .tolist()
        )
        assert tokens == vanilla == _transformers_greedy(built, prompt)
        ours_tokens, ours_steps = our_steps(built, prompt, k, MAX_NEW)
        assert ours_tokens == tokens
        assert steps == ours_steps, f"prompt {prompt}: vLLM {steps} vs ours {ours_steps}"
        distinct |= set(tokens)
        accepted += sum(s - 1 for s in steps[1:])
        drafted += k * (len(steps) - 1)
    assert len(distinct) >= 5
    assert 0 < accepted < drafted, (accepted, drafted)


def test_vita_audio_folder_with_its_heads_matches_ours(vita_built):
    """Official VITA-Audio folder as the target, its own MCTP layers exported as the drafter."""
    _check(vita_built, NUM_HEADS)


def test_llama_heads_match_ours_with_fewer_drafts_than_heads(llama_built):
    """MCTPStack.save_pretrained heads of a Llama backbone; k=2 of 3 heads."""
    _check(llama_built, 2)
