"""The fast path (static shapes for torch.compile / CUDA graphs) gives the eager tokens."""

from __future__ import annotations

import shutil

import pytest
import torch

from mctp import MCTPStack, generate
from mctp.backbones import HFBackbone


@pytest.fixture(scope="module")
def model(tiny_hf):
    bb = HFBackbone(tiny_hf("qwen2"))
    stack = MCTPStack.from_backbone(bb.parts(), 10)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for p in stack.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return bb, stack.eval()


@pytest.mark.parametrize("mode", ["vanilla", "balance", "boost", "turbo"])
def test_fixed_windows_give_the_eager_tokens(model, mode):
    """The windowed (static-shape) computation itself, without a compiler."""
    bb, stack = model
    ids = torch.randint(3, 128, (2, 20))
    ref = generate(bb, stack, ids, mode, 45)
    fast = generate(bb, stack, ids, mode, 45, compile={"backend": "eager"})
    assert torch.equal(fast.sequences, ref.sequences)
    assert [s.tolist() for s in fast.sources] == [s.tolist() for s in ref.sources]


def test_fixed_windows_verified_mode(model):
    bb, stack = model
    ids = torch.randint(3, 128, (1, 20))
    ref = generate(bb, None, ids, "vanilla", 30)
    fast = generate(bb, stack, ids, "vanilla", 30, verify=True, compile={"backend": "eager"})
    assert torch.equal(fast.sequences, ref.sequences)


@pytest.mark.slow
def test_compiled_turbo_gives_the_eager_tokens_without_recompiling(model):
    """Real graphs (aot_eager): traced once, then reused without recompilation."""
    import torch._dynamo

    from mctp import GenerationState

    bb, stack = model
    ids = torch.randint(3, 128, (1, 20))
    other = torch.randint(3, 128, (1, 20))
    ref = generate(bb, stack, ids, "turbo", 40)
    ref_other = generate(bb, stack, other, "turbo", 40)
    torch._dynamo.reset()
    opts = {"backend": "aot_eager"}
    state = GenerationState(bb, batch_size=1, max_len=128)
    first = generate(bb, stack, ids, "turbo", 40, compile=opts, state=state)
    with torch._dynamo.config.patch(error_on_recompile=True):
        second = generate(bb, stack, other, "turbo", 40, compile=opts, state=state)
    assert torch.equal(first.sequences, ref.sequences)
    assert torch.equal(second.sequences, ref_other.sequences)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("g++") is None, reason="Inductor on CPU needs a C++ compiler")
def test_inductor_cpu_turbo_gives_the_eager_tokens(model):
    """Inductor's generated CPU kernels with frozen weights (the CPU setting of the benchmarks)."""
    import torch._dynamo
    import torch._inductor.config as inductor_config

    bb, stack = model
    ids = torch.randint(3, 128, (1, 20), generator=torch.Generator().manual_seed(1))
    ref = generate(bb, stack, ids, "turbo", 40)
    torch._dynamo.reset()
    try:
        with inductor_config.patch(freezing=True):
            fast = generate(bb, stack, ids, "turbo", 40, compile=True, window=11)
    finally:
        torch._dynamo.reset()  # frozen graphs hold this model's weights as constants
    assert torch.equal(fast.sequences, ref.sequences)


@pytest.mark.gpu
def test_cuda_graphs_turbo_matches_eager(model):
    bb, stack = model
    bb, stack = bb.cuda(), stack.cuda()
    try:
        ids = torch.randint(3, 128, (1, 20), device="cuda")
        ref = generate(bb, stack, ids, "turbo", 60)
        fast = generate(bb, stack, ids, "turbo", 60, compile=True)
        assert torch.equal(fast.sequences, ref.sequences)
    finally:
        bb.cpu(), stack.cpu()


def test_state_is_reused_and_checked(model):
    from mctp import GenerationState

    bb, stack = model
    state = GenerationState(bb, batch_size=2, max_len=80)
    ids = torch.randint(3, 128, (2, 10))
    a = generate(bb, stack, ids, "boost", 30, state=state)
    b = generate(bb, stack, ids, "turbo", 30, state=state, audio_heads=False)
    assert torch.equal(a.sequences, generate(bb, stack, ids, "boost", 30).sequences)
    assert torch.equal(b.sequences, generate(bb, stack, ids, "turbo", 30).sequences)
    with pytest.raises(ValueError, match="this call needs batch 1"):
        generate(bb, stack, ids[:1], "boost", 30, state=state)
    with pytest.raises(ValueError, match="needs batch 2 and 111 slots"):
        generate(bb, stack, ids, "boost", 100, state=state)
