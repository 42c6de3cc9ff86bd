"""``VLLMEngine``: token ids streamed from vLLM's async engine (engine core in its own
process, the plugin loaded there through the entry point), concurrent requests batched.

The engine is the session's one (``speech_server`` in conftest.py: the speech folder with its
MCTP drafter), driven here on the server's event loop, where its async engine lives.
"""

from __future__ import annotations

import asyncio

import pytest
import torch

pytest.importorskip("vllm", reason="vLLM is not installed (run .ci/vllm for the vLLM tests)")

from vllm_helpers import NUM_HEADS, PROMPTS

MAX_NEW = 16


def test_stream_concurrent_prompts_greedy_and_eos(speech_server):
    from transformers import AutoModelForCausalLM

    from mctp import generate
    from mctp.backbones import HFBackbone

    backbone = HFBackbone(AutoModelForCausalLM.from_pretrained(speech_server.model_dir).eval())
    want = [
        generate(backbone, None, torch.tensor([p]), mode="vanilla", max_new_tokens=MAX_NEW)
        .tokens[0]
        .tolist()
        for p in PROMPTS
    ]
    # an eos id that first occurs mid-answer in prompt 1's greedy output
    eos = next(t for i, t in enumerate(want[1]) if i >= 3 and t not in want[1][:i])
    cut = want[1].index(eos) + 1
    engine = speech_server.engine.engine
    assert engine.num_speculative_tokens == NUM_HEADS

    async def collect(prompt, eos_ids=()):
        chunks = []
        async for new in engine.stream(prompt, max_new_tokens=MAX_NEW, eos_token_ids=eos_ids):
            chunks.append(new)
        return chunks

    async def early_exit():
        async for _ in engine.stream(PROMPTS[0], max_new_tokens=MAX_NEW):
            break  # leaving the stream aborts the request

    async def run():
        outs = await asyncio.gather(*(collect(p) for p in PROMPTS))
        stopped = await collect(PROMPTS[1], (eos,))
        await early_exit()
        again = await collect(PROMPTS[0])
        return outs, stopped, again

    outs, stopped, again = speech_server.run(run())
    for chunks, ref in zip(outs, want):
        assert [t for c in chunks for t in c] == ref
    assert any(len(c) > 1 for chunks in outs for c in chunks)  # accepted drafts arrive together
    assert [t for c in stopped for t in c] == want[1][:cut]
    assert [t for c in again for t in c] == want[0]
    assert engine.max_running > 1  # vLLM's scheduler ran the four prompts together


def test_stream_refuses_bad_arguments():
    from mctp.vllm.engine import VLLMEngine

    engine = VLLMEngine.__new__(VLLMEngine)  # argument checks run before the engine is used

    async def first(**kw):
        async for _ in engine.stream(**kw):
            pass

    with pytest.raises(ValueError, match="prompt_ids is empty"):
        asyncio.run(first(prompt_ids=[], max_new_tokens=4))
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1"):
        asyncio.run(first(prompt_ids=[1], max_new_tokens=0))
