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


@pytest.mark.parametrize("regions", [True, False], ids=["regions", "whole"])
@pytest.mark.parametrize(("mode", "window"), [("turbo", 5), ("turbo", 8), ("boost", 3)])
def test_windows_shorter_than_a_chain_give_the_eager_tokens(model, mode, window, regions):
    """A window shorter than the chain (``window < heads - 1``) cannot hold the slots the chain
    itself produces: its head backlogs must not be caught up into slots that have no token yet.
    Such chains run exactly; before, heads >= window read a stale token and Turbo and Boost
    diverged from the eager path (float64: not a rounding difference)."""
    bb, stack = model
    bb64, stack64 = __import__("copy").deepcopy((bb, stack))
    bb64.double()
    stack64.double()
    ids = torch.randint(3, 128, (1, 6), generator=torch.Generator().manual_seed(1))
    ref = generate(bb64, stack64, ids, mode, 40)
    fast = generate(
        bb64, stack64, ids, mode, 40,
        compile=True, compile_options={"backend": "eager"}, window=window, compile_regions=regions,
    )  # fmt: skip
    assert torch.equal(fast.sequences, ref.sequences)


@pytest.mark.parametrize("mode", ["vanilla", "boost", "turbo"])
def test_compiled_layers_see_one_token_or_one_window_whatever_the_lengths(model, mode, monkeypatch):
    """Prompts shorter than the window and re-reads no window holds run eagerly: the compiled
    layer graph sees only 1-token and ``window``-slot calls (one more shape per re-read length
    before, each a compile at serving time), and the tokens stay the eager ones."""
    from mctp import GenerationConfig, Generator
    from mctp.engine.regions import BlockRegions

    bb, stack = model
    seen: set[int] = set()
    slots: set[int] = set()
    block = BlockRegions.block

    def spy(self, blk, x, **kwargs):
        seen.add(x.shape[1])
        slots.add(kwargs["keys"].shape[2])
        assert kwargs["attention_mask"].shape[-1] == kwargs["keys"].shape[2]
        return block(self, blk, x, **kwargs)

    monkeypatch.setattr(BlockRegions, "block", spy)
    head_slots: set[int] = set()
    head = BlockRegions.head

    def head_spy(self, *args, **kwargs):
        head_slots.add(kwargs["keys"].shape[2])
        assert kwargs["attention_mask"].shape[-1] == kwargs["keys"].shape[2]
        return head(self, *args, **kwargs)

    monkeypatch.setattr(BlockRegions, "head", head_spy)
    g = torch.Generator().manual_seed(7)
    cfg = GenerationConfig(mode=mode, max_new_tokens=30)
    gen = Generator(
        bb, stack, cfg, max_len=128, compile=True, compile_options={"backend": "eager"}, window=8
    )
    for n in (3, 5, 7, 12, 40):
        ids = torch.randint(3, 128, (1, n), generator=g)
        ref = generate(bb, stack, ids, mode, 30)
        assert torch.equal(gen.generate(ids).sequences, ref.sequences), n
    assert 8 in seen and seen <= {1, 8}, sorted(seen)
    # and they read the slots the sequence holds, not all 128 (one graph for every count)
    # (Turbo's 11-token re-reads exceed this window and run eagerly: only its prefills here)
    assert max(slots) < 128 and (mode == "turbo" or len(slots) > 10), sorted(slots)
    if mode != "vanilla":  # the heads' windows too
        assert head_slots and max(head_slots) < 128 and len(head_slots) > 5, sorted(head_slots)


def test_fixed_windows_verified_mode(model):
    bb, stack = model
    ids = torch.randint(3, 128, (1, 20))
    ref = generate(bb, None, ids, "vanilla", 30)
    fast = generate(bb, stack, ids, "vanilla", 30, verify=True, compile={"backend": "eager"})
    assert torch.equal(fast.sequences, ref.sequences)


def _eager(window: int, **kw) -> dict:
    """Fast-path settings that run the fixed shapes without a compiler."""
    return dict(compile=True, compile_options={"backend": "eager"}, window=window, **kw)


@pytest.mark.parametrize(
    ("mode", "prompt_len", "window"),
    [("turbo", 40, 11), ("boost", 30, 11), ("vanilla", 33, 11)],
)
def test_first_call_prefills_and_catches_up_in_windows(model, mode, prompt_len, window):
    """Caches exist before the prefill, so already the first call of a fresh Generator
    prefills the prompt as window decodes and lets head backlogs longer than the window (the
    first chain's, Boost's 4 text tokens + 10 with window 11) catch up in extra windows: no
    eager multi-token forward and no exact-backlog head run at all, and the same tokens."""
    from mctp import GenerationConfig, Generator
    from mctp.engine.decoding import MCTPDecoder

    bb, stack = model
    g = torch.Generator().manual_seed(prompt_len)
    ids = torch.randint(3, 128, (2, prompt_len), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # a left-padded row
    shapes: list[int] = []  # slots of every backbone decode
    exact_chains: list[int] = []  # eager head chains over exact backlogs
    decode, step = type(bb).decode, MCTPDecoder.step

    def spy_decode(self, embeds, positions, slots, valid, cache, **kw):
        shapes.append(slots.numel())
        return decode(self, embeds, positions, slots, valid, cache, **kw)

    def spy_step(self, *a, **k):
        exact_chains.append(1)
        return step(self, *a, **k)

    ref = generate(bb, stack, ids, mode, 26, attention_mask=mask)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(type(bb), "decode", spy_decode)
        mp.setattr(MCTPDecoder, "step", spy_step)
        cfg = GenerationConfig(mode=mode, max_new_tokens=26)
        gen = Generator(bb, stack, cfg, max_batch=2, max_len=128, **_eager(window))
        fast = gen.generate(ids, attention_mask=mask)
        assert set(shapes) <= {1, window} and not exact_chains
        again = gen.generate(ids, attention_mask=mask)
        shapes.clear()
        off = Generator(
            bb, stack, cfg, max_batch=2, max_len=128, **{**_eager(window), "prefill_windows": 0}
        )
        res_off = off.generate(ids, attention_mask=mask)
        assert shapes[0] == prompt_len  # one eager prefill
        assert bool(exact_chains) == (mode != "vanilla")
    for res in (fast, again, res_off):
        assert torch.equal(res.sequences, ref.sequences)


def test_catch_up_plan_expected_windows(model):
    """Window starts per head for hand-checked backlogs (chain window of head k: n+k-W..n+k-1)."""
    from mctp import MCTPDecoder, TokenBuffer

    _, stack = model
    buf = TokenBuffer(1, 128)
    dec = MCTPDecoder(stack, buf)  # head k has seen nothing but its first slot k + 1
    buf.start(torch.randint(3, 128, (1, 31)))
    # head 0 must cover slots 1..19 before its chain window 20..30: windows at 1 and 9 (moved back)
    assert dec.catch_up_plan(3, 11, 4) == [[1, 9], [2, 10], [3, 11]]
    assert dec.catch_up_plan(3, 11, 1) is None  # needs 2 windows per head
    # the window would start before slot 1: it starts at 1 and reaches into the chain window
    buf.truncate(21)
    assert dec.catch_up_plan(2, 16, 4) == [[1], [1]]
    buf.truncate(16)
    assert dec.catch_up_plan(2, 16, 4) is None  # no room for a chain window (n - W < 1)
    buf.start(torch.randint(3, 128, (1, 31)))
    dec.next_index[:2] = [20, 21]  # backlogs already within the window
    assert dec.catch_up_plan(2, 11, 4) == [[], []]


def test_prefill_windows_is_checked(model):
    bb, stack = model
    with pytest.raises(ValueError, match="prefill_windows must be >= 0"):
        generate(bb, stack, torch.randint(3, 128, (1, 8)), "turbo", 4, prefill_windows=-1)


def test_compiling_changes_no_global_torch_setting(model):
    """A compiled run (Dynamo traces the decodes, the chain and the catch-up windows) leaves
    torch._dynamo's configuration exactly as it was, and still gives the eager tokens."""
    import torch._dynamo

    bb, stack = model
    ids = torch.randint(3, 128, (1, 20))
    ref = generate(bb, stack, ids, "turbo", 12)
    before = torch._dynamo.config.get_config_copy()
    fast = generate(bb, stack, ids, "turbo", 12, compile={"backend": "eager"}, window=11)
    assert torch._dynamo.config.get_config_copy() == before
    assert torch.equal(fast.sequences, ref.sequences)


@pytest.mark.slow
def test_compiled_turbo_gives_the_eager_tokens_without_recompiling(model):
    """Real graphs (aot_eager): traced on the first call of a Generator (windowed prefill and
    catch-up included), then reused as they are."""
    import torch._dynamo

    from mctp import GenerationConfig, Generator

    bb, stack = model
    prompts = [torch.randint(3, 128, (1, 20)) for _ in range(3)]
    refs = [generate(bb, stack, ids, "turbo", 40) for ids in prompts]
    torch._dynamo.reset()
    cfg = GenerationConfig(mode="turbo", max_new_tokens=40)
    gen = Generator(bb, stack, cfg, max_len=128, compile={"backend": "aot_eager"})
    outs = [gen.generate(prompts[0])]
    with torch._dynamo.config.patch(error_on_recompile=True):
        outs += [gen.generate(ids) for ids in prompts[1:]]
    for out, ref in zip(outs, refs):
        assert torch.equal(out.sequences, ref.sequences)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("g++") is None, reason="Inductor on CPU needs a C++ compiler")
def test_inductor_cpu_packed_weights_give_the_eager_tokens(model):
    """Inductor's CPU kernels with packed linear weights shared by every graph (the default
    CPU fast path for bf16; forced here on the fp32 test model): the eager tokens, twice.
    (It replaces the frozen-weights test: ``freezing`` is torch's own feature, which the
    fast path only passes on.)"""
    import torch._dynamo
    import torch._inductor.config

    from mctp import GenerationConfig, Generator
    from mctp.engine.compile_packing import (
        packed_weight_bytes,
        packing_available,
        release_packed_weights,
    )

    if not packing_available("cpu", torch.float32):
        pytest.skip("oneDNN packing unavailable")
    bb, stack = model
    ids = torch.randint(3, 128, (1, 20), generator=torch.Generator().manual_seed(1))
    ref = generate(bb, stack, ids, "turbo", 40)
    torch._dynamo.reset()
    release_packed_weights()
    cfg = GenerationConfig(mode="turbo", max_new_tokens=40)
    gen = Generator(bb, stack, cfg, max_len=128, compile=True, window=11, pack_weights=True)
    inductor_before = torch._inductor.config.get_config_copy()
    first, second = gen.generate(ids), gen.generate(ids)
    assert torch._inductor.config.get_config_copy() == inductor_before  # options per call
    assert torch.equal(first.sequences, ref.sequences)
    assert torch.equal(second.sequences, ref.sequences)
    dense = sum(p.numel() * p.element_size() for p in [*bb.parameters(), *stack.parameters()])
    assert 0 < packed_weight_bytes() <= dense  # one packed copy at most, whatever the graphs
    release_packed_weights()


@pytest.mark.gpu
def test_cuda_graphs_turbo_matches_eager(model):
    bb, stack = model
    bb, stack = bb.cuda(), stack.cuda()
    try:
        from mctp import GenerationConfig, Generator

        ids = torch.randint(3, 128, (1, 40), device="cuda")
        ref = generate(bb, stack, ids, "turbo", 60)
        cfg = GenerationConfig(mode="turbo", max_new_tokens=60)
        gen = Generator(bb, stack, cfg, max_len=128, device="cuda", compile=True)
        for _ in range(3):  # capture (windowed prefill and catch-up included); replay
            fast = gen.generate(ids)
            assert torch.equal(fast.sequences, ref.sequences)
    finally:
        bb.cpu(), stack.cpu()


def test_generator_is_reused_and_checked(model):
    from mctp import GenerationConfig, Generator

    bb, stack = model
    gen = Generator(bb, stack, GenerationConfig(mode="boost", max_new_tokens=30), max_batch=2,
                    max_len=80)  # fmt: skip
    ids = torch.randint(3, 128, (2, 10))
    a = gen.generate(ids)
    b = gen.generate(ids, config=gen.config.replace(mode="turbo"))
    assert torch.equal(a.sequences, generate(bb, stack, ids, "boost", 30).sequences)
    assert torch.equal(b.sequences, generate(bb, stack, ids, "turbo", 30).sequences)
    assert torch.equal(gen.generate(ids).sequences, a.sequences)
    # fewer rows than max_batch: padded to it, the answer is the row's own
    assert torch.equal(gen.generate(ids[:1]).sequences, a.sequences[:1])
    with pytest.raises(ValueError, match="3 rows; this engine runs at most max_batch=2"):
        gen.generate(torch.cat([ids, ids[:1]]))
    with pytest.raises(ValueError, match="needs 111 cache slots, max_len is 80"):
        gen.generate(ids, max_new_tokens=100)
    with pytest.raises(TypeError, match="compile"):  # an engine setting is no request setting
        gen.generate(ids, config=gen.config.replace(compile=True))
    gen.reset()
    assert torch.equal(gen.generate(ids).sequences, a.sequences)


def test_compile_cache_files_are_checked(tmp_path):
    from mctp import load_compile_cache
    from mctp.engine.fast_path import COMPILE_CACHE_FILE, FastPath

    assert load_compile_cache(tmp_path / "none.bin") is False  # a first start: nothing to load
    bad = tmp_path / "bad.bin"
    bad.write_bytes(b"not a cache")
    with pytest.raises(RuntimeError, match="is not a torch compile cache"):
        load_compile_cache(bad)
    bb = object.__new__(HFBackbone)  # FastPath only compiles its decode lazily
    torch.nn.Module.__init__(bb)
    fresh = FastPath(bb, device=torch.device("cpu"), compile_cache_dir=tmp_path / "new")
    assert fresh.cache_loaded is False
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / COMPILE_CACHE_FILE).write_bytes(b"not a cache")
    with pytest.raises(RuntimeError, match="is not a torch compile cache"):
        FastPath(bb, device=torch.device("cpu"), compile_cache_dir=tmp_path / "bad")
    with pytest.raises(ValueError, match="no compile_cache_dir"):
        FastPath(bb, device=torch.device("cpu")).save_compile_cache()


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("g++") is None, reason="Inductor on CPU needs a C++ compiler")
def test_compile_cache_carries_artifacts_to_another_process(tmp_path):
    """A process compiles a schedule (packed weights) and saves torch's artifacts in its
    ``compile_cache_dir``; a second process with an empty Inductor cache loads them, its
    Inductor compiles hit the cache (the packing pass is part of the cache key, not a bypass),
    and it generates the same tokens."""
    import os
    import subprocess
    import sys

    code = """
import sys, torch
from torch._dynamo.utils import counters
from transformers import Qwen2Config, Qwen2ForCausalLM
from mctp import GenerationConfig, Generator, MCTPStack
from mctp.backbones import HFBackbone
from mctp.engine.fast_path import FastPath
from mctp.interleave import InterleaveSchedule
torch.manual_seed(0)
cfg = Qwen2Config(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2)
bb = HFBackbone(Qwen2ForCausalLM(cfg).eval())
stack = MCTPStack.from_backbone(bb.parts(), 2).eval()
config = GenerationConfig(mode=InterleaveSchedule.from_ratio([1, 2]), max_new_tokens=8)
gen = Generator(bb, stack, config, max_len=32, compile=True, window=3,
                compile_cache=sys.argv[1], pack_weights=True)
path = gen.path
ids = gen.generate(torch.arange(3, 9)[None]).tokens[0].tolist()
if not path.cache_loaded:
    path.save_compile_cache()
print(path.cache_loaded, counters["inductor"]["fxgraph_cache_miss"] == 0,
      counters["inductor"]["fxgraph_cache_hit"] > 0, ids)
"""
    cache = tmp_path / "cc"
    outs = []
    for i in range(2):
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / f"inductor{i}")}
        run = subprocess.run(
            [sys.executable, "-c", code, str(cache)],
            capture_output=True,
            text=True,
            timeout=900,
            env=env,
        )
        assert run.returncode == 0, run.stderr[-3000:]
        outs.append(run.stdout.strip().splitlines()[-1])
    # the first process compiles (its own Inductor cache starts empty: misses; graphs that
    # happen to be equal may still hit), the second compiles nothing: every graph is a hit
    assert outs[0].startswith("False False") and outs[1].startswith("True True True")
    assert outs[0].split(" ", 3)[3] == outs[1].split(" ", 3)[3]
