"""The fast path (static shapes for torch.compile / CUDA graphs) gives the eager tokens."""

from __future__ import annotations

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

    bb, stack = model
    ids = torch.randint(3, 128, (1, 20))
    ref = generate(bb, stack, ids, "turbo", 40)
    torch._dynamo.reset()
    opts = {"backend": "aot_eager"}
    first = generate(bb, stack, ids, "turbo", 40, compile=opts)
    with torch._dynamo.config.patch(error_on_recompile=True):
        second = generate(bb, stack, ids, "turbo", 40, compile=opts)
    assert torch.equal(first.sequences, ref.sequences)
    assert torch.equal(second.sequences, ref.sequences)


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
