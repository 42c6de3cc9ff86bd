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


@pytest.mark.parametrize(
    ("mode", "prompt_len", "window"),
    [("turbo", 40, 11), ("boost", 30, 11), ("balance", 20, 16), ("vanilla", 33, 11)],
)
def test_reused_state_prefills_and_catches_up_in_windows(model, mode, prompt_len, window):
    """With allocated caches the prompt is prefilled as window decodes and head backlogs longer
    than the window (the first chain's, Boost's 4 text tokens + 10 with window 11) run as extra
    windows: no eager multi-token forward at all, and the same tokens."""
    from mctp import GenerationState
    from mctp.decoding import MCTPDecoder

    bb, stack = model
    g = torch.Generator().manual_seed(prompt_len)
    ids = torch.randint(3, 128, (2, prompt_len), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # a left-padded row
    eager_prefills: list[int] = []
    exact_backlogs: list[int] = []  # eager head runs over their exact backlog
    head, forward_cached = MCTPDecoder._head, type(bb).forward_cached

    def spy_head(self, k, idx, *a):
        if idx.numel() != window:
            exact_backlogs.append(idx.numel())
        return head(self, k, idx, *a)

    def spy_prefill(self, *a, **k):
        eager_prefills.append(1)
        return forward_cached(self, *a, **k)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(MCTPDecoder, "_head", spy_head)
        mp.setattr(type(bb), "forward_cached", spy_prefill)
        ref = generate(bb, stack, ids, mode, 40, attention_mask=mask)
        state = GenerationState(bb, batch_size=2, max_len=128)
        kw = dict(attention_mask=mask, compile={"backend": "eager"}, window=window, state=state)
        generate(bb, stack, ids, mode, 40, **kw)  # the first call allocates the caches
        eager_prefills.clear(), exact_backlogs.clear()
        fast = generate(bb, stack, ids, mode, 40, **kw)
        assert not eager_prefills and not exact_backlogs
        off = generate(bb, stack, ids, mode, 40, **kw, prefill_windows=0)
        assert eager_prefills == [1]
        assert (max(exact_backlogs, default=0) > window) == (mode != "vanilla")
    assert torch.equal(fast.sequences, ref.sequences)
    assert torch.equal(off.sequences, ref.sequences)


def test_catch_up_plan_expected_windows(model):
    """Window starts per head for hand-checked backlogs (chain window of head k: n+k-W..n+k-1)."""
    from mctp import GenerationState

    bb, stack = model
    state = GenerationState(bb, batch_size=1, max_len=128)
    dec = state.decoder(stack)
    assert dec._catch_up_plan(10, 11, 4) is None  # caches not allocated yet
    generate(bb, stack, torch.randint(3, 128, (1, 30)), "turbo", 12, state=state)
    dec = state.decoder(stack)  # reset: head k has seen nothing but its first slot k + 1
    state.buffer.length = 31
    # head 0 must cover slots 1..19 before its chain window 20..30: windows at 1 and 9 (moved back)
    assert dec._catch_up_plan(3, 11, 4) == [[1, 9], [2, 10], [3, 11]]
    assert dec._catch_up_plan(3, 11, 1) is None  # needs 2 windows per head
    # the window would start before slot 1: it starts at 1 and reaches into the chain window
    state.buffer.length = 21
    assert dec._catch_up_plan(2, 16, 4) == [[1], [1]]
    state.buffer.length = 16
    assert dec._catch_up_plan(2, 16, 4) is None  # no room for a chain window (n - W < 1)
    state.buffer.length = 31
    dec.next_index[:2] = [20, 21]  # backlogs already within the window
    assert dec._catch_up_plan(2, 11, 4) == [[], []]


def test_prefill_windows_is_checked(model):
    bb, stack = model
    with pytest.raises(ValueError, match="prefill_windows must be >= 0"):
        generate(bb, stack, torch.randint(3, 128, (1, 8)), "turbo", 4, prefill_windows=-1)


@pytest.mark.slow
def test_compiled_turbo_gives_the_eager_tokens_without_recompiling(model):
    """Real graphs (aot_eager): traced on the first calls of a state (the first allocates the
    caches, the second traces the windowed prefill and catch-up), then reused as they are."""
    import torch._dynamo

    from mctp import GenerationState

    bb, stack = model
    prompts = [torch.randint(3, 128, (1, 20)) for _ in range(3)]
    refs = [generate(bb, stack, ids, "turbo", 40) for ids in prompts]
    torch._dynamo.reset()
    opts = {"backend": "aot_eager"}
    state = GenerationState(bb, batch_size=1, max_len=128)
    outs = [generate(bb, stack, ids, "turbo", 40, compile=opts, state=state) for ids in prompts[:2]]
    with torch._dynamo.config.patch(error_on_recompile=True):
        outs.append(generate(bb, stack, prompts[2], "turbo", 40, compile=opts, state=state))
    for out, ref in zip(outs, refs):
        assert torch.equal(out.sequences, ref.sequences)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("g++") is None, reason="Inductor on CPU needs a C++ compiler")
def test_inductor_cpu_turbo_gives_the_eager_tokens(model):
    """Inductor's generated CPU kernels with frozen weights (the CPU setting of the benchmarks)."""
    import torch._dynamo
    import torch._inductor.config as inductor_config

    from mctp import GenerationState

    bb, stack = model
    ids = torch.randint(3, 128, (1, 20), generator=torch.Generator().manual_seed(1))
    ref = generate(bb, stack, ids, "turbo", 40)
    torch._dynamo.reset()
    try:
        with inductor_config.patch(freezing=True):
            state = GenerationState(bb, batch_size=1, max_len=128)
            kw = dict(compile=True, window=11, state=state)
            first = generate(bb, stack, ids, "turbo", 40, **kw)
            second = generate(bb, stack, ids, "turbo", 40, **kw)  # windowed prefill, catch-up
    finally:
        torch._dynamo.reset()  # frozen graphs hold this model's weights as constants
    assert torch.equal(first.sequences, ref.sequences)
    assert torch.equal(second.sequences, ref.sequences)


@pytest.mark.gpu
def test_cuda_graphs_turbo_matches_eager(model):
    bb, stack = model
    bb, stack = bb.cuda(), stack.cuda()
    try:
        from mctp import GenerationState

        ids = torch.randint(3, 128, (1, 40), device="cuda")
        ref = generate(bb, stack, ids, "turbo", 60)
        state = GenerationState(bb, batch_size=1, max_len=128, device="cuda")
        for _ in range(3):  # allocate; capture the windowed prefill and catch-up; replay
            fast = generate(bb, stack, ids, "turbo", 60, compile=True, state=state)
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
