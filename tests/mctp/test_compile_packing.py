"""Packed linear weights shared by compiled graphs (mctp.engine.compile_packing) and the fast path's
compile options."""

from __future__ import annotations

import shutil

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from mctp.engine.compile_packing import (
    PackedLinearPass,
    gemv_chunks,
    packed_linear,
    packed_weight_bytes,
    packing_available,
    release_packed_weights,
)
from mctp.engine.fast_path import compile_kwargs

needs_inductor = pytest.mark.skipif(
    shutil.which("g++") is None or not packing_available("cpu", torch.float32),
    reason="Inductor on CPU needs a C++ compiler; packing needs oneDNN",
)


def test_compile_kwargs_pack_where_it_applies():
    cpu = torch.device("cpu")
    kw = compile_kwargs(cpu, torch.bfloat16)
    if packing_available(cpu, torch.bfloat16):  # auto: bf16 weights, Inductor, CPU
        assert isinstance(kw["options"]["post_grad_custom_post_pass"], PackedLinearPass)
    assert compile_kwargs(cpu, torch.float32) == {"dynamic": False}  # auto: bf16 only
    eager = compile_kwargs(cpu, torch.bfloat16, compile_options={"backend": "eager"})
    assert eager == {"dynamic": False, "backend": "eager"}
    with pytest.raises(ValueError, match="backend 'eager'"):
        compile_kwargs(cpu, torch.float32, compile_options={"backend": "eager"}, pack_weights=True)
    with pytest.raises(ValueError, match="on cuda"):
        compile_kwargs("cuda", torch.bfloat16, pack_weights=True)
    with pytest.raises(ValueError, match="already set a post_grad_custom_post_pass"):
        opts = {"options": {"post_grad_custom_post_pass": lambda g: None}}
        compile_kwargs(cpu, torch.float32, compile_options=opts, pack_weights=True)
    if packing_available(cpu, torch.float32):  # torch takes a mode or options: mode -> options
        mode = {"mode": "max-autotune-no-cudagraphs"}
        kw = compile_kwargs(cpu, torch.float32, compile_options=mode, pack_weights=True)
        assert "mode" not in kw and kw["options"]["max_autotune"] is True


def test_packed_linear_op_matches_linear():
    """The op itself (eager): rows ``start:stop`` of the weight, bias, fp32."""
    if not packing_available("cpu", torch.float32):
        pytest.skip("oneDNN packing unavailable")
    g = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(5, 8, generator=g), torch.randn(12, 8, generator=g), torch.randn(4)
    out = packed_linear(x, w, b, 3, 7)
    torch.testing.assert_close(out, torch.nn.functional.linear(x, w[3:7], b))
    release_packed_weights()
    assert packed_weight_bytes() == 0


@pytest.mark.slow
@needs_inductor
def test_compiled_graphs_share_one_packed_copy_and_see_weight_updates():
    """Two compiled functions read one packed copy per weight (and per row slice); one-row
    products over big weights run as reductions without a copy; an in-place update of a
    weight is seen by the next call (its copy is re-made, not added)."""
    torch.manual_seed(0)
    up, down = torch.nn.Linear(16, 48), torch.nn.Linear(48, 48, bias=False)

    def fn(x):
        h = down(torch.relu(up(x)))
        return h, torch.nn.functional.linear(h, down.weight[8:24])  # a row slice of a weight

    kw = compile_kwargs("cpu", torch.float32, pack_weights=True)
    f1 = torch.compile(lambda x: fn(x), **kw)
    gemv = PackedLinearPass()
    gemv.gemv_elements = 1  # every one-row product: a reduction over the dense weight
    f2 = torch.compile(lambda x: fn(x), dynamic=False, options={"post_grad_custom_post_pass": gemv})
    release_packed_weights()
    packed = 4 * (48 * 16 + 48 * 48 + 16 * 48)  # up.weight, down.weight, down.weight[8:24]
    xs = [torch.randn(1, 11, 16), torch.randn(1, 16)]
    with torch.inference_mode():
        for f, x, size in ((f2, xs[1], 0), (f1, xs[0], packed)):
            for got, ref in zip(f(x), fn(x)):
                torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
            assert packed_weight_bytes() == size
        with torch.no_grad():
            up.weight.mul_(-2.0)
        for got, ref in zip(f1(xs[0]), fn(xs[0])):
            torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    assert packed_weight_bytes() == packed  # replaced, not added
    release_packed_weights()


def test_pass_leaves_activations_alone():
    """A product of two activations (no parameter involved) is not rewritten."""
    graph = torch.fx.Graph()
    a, b = graph.placeholder("a"), graph.placeholder("b")
    for node, shape in ((a, (3, 4)), (b, (5, 4))):
        node.meta["val"] = torch.empty(shape)
    t = graph.call_function(torch.ops.aten.permute.default, (b, [1, 0]))
    mm = graph.call_function(torch.ops.aten.mm.default, (a, t))
    graph.output(mm)
    PackedLinearPass()(graph)  # no tracing context: no static inputs known, nothing packed
    assert [n.target for n in graph.nodes if n.op == "call_function"] == [
        torch.ops.aten.permute.default,
        torch.ops.aten.mm.default,
    ]


@given(k=st.integers(1, 20000), chunk=st.integers(1, 4096))
def test_gemv_chunks_split_a_long_reduction_into_equal_parts(k, chunk):
    parts = gemv_chunks(k, chunk)
    assert k % parts == 0
    lanes = 16 if k % 16 == 0 else 1
    fits = [p for p in range(-(-k // chunk), k + 1) if k % p == 0 and (k // p) % lanes == 0]
    if k <= chunk or not fits:
        assert parts == 1
    else:  # the fewest equal parts of at most `chunk` (in 16s when k is in 16s)
        assert parts == fits[0] and k // parts <= chunk
    assert gemv_chunks(4864, 1024) == 8  # the 0.5B shape's down_proj: 8 parts of 608


def test_gemv_chunks_refuses_a_chunk_below_one():
    with pytest.raises(ValueError, match="chunk must be >= 1"):
        gemv_chunks(64, 0)


def _one_row_product(k: int, n: int) -> tuple[torch.fx.Graph, torch.fx.Node, torch.fx.Node]:
    graph = torch.fx.Graph()
    x, w = graph.placeholder("x"), graph.placeholder("w")
    x.meta["val"], w.meta["val"] = torch.empty(1, k), torch.empty(n, k)
    t = graph.call_function(torch.ops.aten.permute.default, (w, [1, 0]))
    t.meta["val"] = torch.empty(k, n)
    mm = graph.call_function(torch.ops.aten.mm.default, (x, t))
    mm.meta["val"] = torch.empty(1, n)
    graph.output(mm)
    return graph, x, w


@pytest.mark.parametrize("chunk, sums", [(4096, 1), (32, 2)])
def test_one_row_product_becomes_a_reduction_summed_in_parts(chunk, sums):
    """A one-row product over a long ``K`` is summed over ``K / chunk`` slices, then over
    their partial sums, and still equals the product."""
    graph, _, _ = _one_row_product(96, 8)
    gemv = PackedLinearPass()
    gemv.gemv_elements, gemv.gemv_chunk = 1, chunk
    gemv(graph)
    targets = [n.target for n in graph.nodes if n.op == "call_function"]
    assert torch.ops.aten.mm.default not in targets
    assert targets.count(torch.ops.aten.sum.dim_IntList) == sums
    if sums == 2:
        views = [n.args[1] for n in graph.nodes if n.target == torch.ops.aten.view.default]
        assert [1, 3, 32] in views and [8, 3, 32] in views
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(1, 96, generator=g), torch.randn(8, 96, generator=g)
    out = torch.fx.GraphModule(torch.nn.Module(), graph)(x, w)
    torch.testing.assert_close(out, x @ w.T, rtol=1e-5, atol=1e-5)


def test_settings_of_the_pass_change_its_cache_key_and_repr():
    """Inductor's caches key on ``uuid``, FastPaths share regions by ``repr``: passes with
    other settings must not hit each other's graphs."""
    a, b = PackedLinearPass(), PackedLinearPass()
    assert a.uuid() == b.uuid() and repr(a) == repr(b)
    b.gemv_chunk = 64
    assert a.uuid() != b.uuid() and repr(a) != repr(b)
