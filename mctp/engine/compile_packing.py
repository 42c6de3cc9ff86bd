"""Pre-packed linear weights shared by every compiled graph (CPU): the GEMM speed of frozen
weights without a frozen copy per graph.

Inductor's ``freezing`` makes the weights constants of each compiled graph and packs them there
(oneDNN's blocked layout, or its own GEMM template's): fast, but every graph (each decode shape,
each chain, each catch-up window) holds its own packed copy of the weights it uses, and
max-autotune benchmarks every product at compile time. Here the weights stay graph inputs and
one post-grad pass (:class:`PackedLinearPass`, given per ``torch.compile`` call through
``options={"post_grad_custom_post_pass": ...}``) replaces each ``mm``/``addmm`` of an input by
a parameter's transpose with ``mctp::packed_linear``: oneDNN's linear over a packed copy of
that weight, made on first use and kept in one table for the process. Every graph reading the
same weight (or the same slice of it: the audio-only rows of the lm_head) shares one packed
copy, so the compiled path holds the weights twice at most (dense + packed), whatever the
number of graphs.

A packed copy is re-made when its weight changed in place (the tensor's version counter);
changes made through ``.data`` bypass the counter: call :func:`release_packed_weights` after
them. The table holds a reference to each packed weight's tensor (so that its memory cannot
be re-used by another tensor while the copy exists); :func:`release_packed_weights` frees all.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any

import torch
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files

__all__ = [
    "PackedLinearPass",
    "gemv_chunks",
    "packed_weight_bytes",
    "packing_available",
    "release_packed_weights",
]

_PACKABLE = (torch.bfloat16, torch.float32)
_aten = torch.ops.aten
_prims = torch.ops.prims


class _PackTable:
    """Packed copies keyed by the weight's memory, shape and strides (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: dict[tuple[Any, ...], tuple[torch.Tensor, int, torch.Tensor, int]] = {}

    def get(self, weight: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        key = (weight.data_ptr(), tuple(weight.shape), tuple(weight.stride()), start, stop)
        version = weight._version
        with self._lock:
            hit = self._entries.get(key)
            if hit is not None and hit[1] == version:
                return hit[2]
            dense = weight.detach()
            rows = dense[start:stop].contiguous()
            packed = torch.ops.mkldnn._reorder_linear_weight(rows)
            nbytes = rows.numel() * rows.element_size()
            # the dense tensor is kept: its memory cannot be re-used under this key meanwhile
            self._entries[key] = (dense, version, packed, nbytes)
            return packed

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def nbytes(self) -> int:
        with self._lock:
            return sum(e[3] for e in self._entries.values())


_TABLE = _PackTable()


def release_packed_weights() -> None:
    """Drop every packed copy (they are re-made on the next compiled call that needs them)."""
    _TABLE.clear()


def packed_weight_bytes() -> int:
    """Bytes of dense weights that have a packed copy now (about the copies' own size)."""
    return _TABLE.nbytes()


def packing_available(device: torch.device | str, dtype: torch.dtype) -> bool:
    """Whether :class:`PackedLinearPass` can run for weights of ``dtype`` on ``device``."""
    return (
        torch.device(device).type == "cpu"
        and dtype in _PACKABLE
        and torch.backends.mkldnn.is_available()
        and (dtype != torch.bfloat16 or torch.ops.mkldnn._is_mkldnn_bf16_supported())
    )


@torch.library.custom_op("mctp::packed_linear", mutates_args=())
def packed_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, start: int, stop: int
) -> torch.Tensor:
    """``x [M, K] @ weight[start:stop].T (+ bias [N])`` -> ``[M, N]`` through the packed copy
    of those rows of the parameter ``weight [V, K]``."""
    packed = _TABLE.get(weight, start, stop)
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


@packed_linear.register_fake
def _packed_linear_fake(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, start: int, stop: int
) -> torch.Tensor:
    return x.new_empty((x.shape[0], len(range(weight.shape[0])[start:stop])))


def _static_rows(node: torch.fx.Node, static: set[str]) -> tuple[torch.fx.Node, int, int] | None:
    """``(parameter input, start, stop)`` when ``node`` is a parameter input of the graph or
    one row slice of it (step 1); None otherwise."""
    if node.op == "placeholder":
        return (node, 0, node.meta["val"].shape[0]) if node.name in static else None
    if node.op != "call_function" or node.target != _aten.slice.Tensor:
        return None
    base, dim, start, stop, *step = (*node.args, *([None] * (5 - len(node.args))))
    if not (isinstance(base, torch.fx.Node) and base.op == "placeholder" and base.name in static):
        return None
    rows = base.meta["val"].shape[0]
    if dim != 0 or step[0] not in (None, 1) or node.kwargs:
        return None
    r = range(rows)[slice(start, stop)]
    return base, r.start, r.stop


def gemv_chunks(k: int, chunk: int) -> int:
    """Into how many equal parts a one-row product's reduction of length ``k`` is split so
    that each is at most ``chunk`` long: the fewest that divide ``k`` (into multiples of 16,
    a vector's bf16 lanes, when ``k`` is one); 1 when ``k <= chunk`` or no such split exists.

    Inductor sums a long reduction in a cascade (for accuracy) that halves its speed: the
    0.5B shape's ``down_proj`` (``k`` = 4,864) streams at 12 GB/s in one piece and at 26 GB/s
    in 8 parts of 608 (2-core AMD EPYC, AVX-512-BF16; docs/compile.md).
    """
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    if k <= chunk:
        return 1
    lanes = 16 if k % 16 == 0 else 1
    for parts in range(-(-k // chunk), k // lanes + 1):
        if k % parts == 0 and (k // parts) % lanes == 0:
            return parts
    return 1


def _gemv(
    graph: torch.fx.Graph,
    node: torch.fx.Node,
    x: torch.fx.Node,
    rows: torch.fx.Node,
    bias: torch.fx.Node | None,
    parts: int = 1,
) -> torch.fx.Node:
    """``x [1, K] @ rows [N, K].T (+ bias)`` as one fp32 multiply-and-sum that Inductor fuses
    into a kernel streaming the dense ``rows`` once (inserted before ``node``); with
    ``parts > 1`` (``rows`` contiguous) the sum runs over ``parts`` slices of ``K`` first, then
    over their partial sums."""
    fake = torch._guards.detect_fake_mode([x.meta["val"]])
    out_dtype = node.meta["val"].dtype

    def add(target: Any, *args: Any) -> torch.fx.Node:
        new = graph.call_function(target, args)
        vals = [a.meta["val"] if isinstance(a, torch.fx.Node) else a for a in args]
        with fake or contextlib.nullcontext():
            new.meta["val"] = target(*vals)
        return new

    with graph.inserting_before(node):
        x32 = add(_prims.convert_element_type.default, x, torch.float32)
        w32 = add(_prims.convert_element_type.default, rows, torch.float32)
        if parts > 1:
            n, k = rows.meta["val"].shape
            x32 = add(_aten.view.default, x32, [1, parts, k // parts])
            w32 = add(_aten.view.default, w32, [n, parts, k // parts])
            partial = add(_aten.sum.dim_IntList, add(_aten.mul.Tensor, x32, w32), [2])
            summed = add(_aten.sum.dim_IntList, partial, [1])
        else:
            summed = add(_aten.sum.dim_IntList, add(_aten.mul.Tensor, x32, w32), [1])
        if bias is not None:
            summed = add(_aten.add.Tensor, summed, bias)
        out = add(_prims.convert_element_type.default, summed, out_dtype)
        return add(_aten.view.default, out, [1, -1])


class PackedLinearPass(CustomGraphPass):
    """Post-grad pass: ``mm(x, W.T)`` / ``addmm(b, x, W.T)`` with ``W`` a parameter input (or
    a row slice of one) of a packable dtype on CPU -> ``mctp::packed_linear(x, W, b)``.

    Give it per compile call:
    ``torch.compile(fn, options={"post_grad_custom_post_pass": PackedLinearPass()})``.
    One-row products (weights of at least ``gemv_elements``: every layer's, the lm_head, its
    audio rows) become a multiply-and-sum over the dense weight instead: streaming it once is
    faster than the packed product at one row, and the lm_head gets no packed copy.
    Parameters are recognised as the graph's static inputs (Dynamo marks module parameters and
    buffers static); activations are never packed. Its :meth:`uuid` hashes this file, so
    Inductor's caches stay valid across processes.
    """

    #: One-row products with weights of at least this many elements become a streaming
    #: reduction over the dense weight: on the 0.5B shape (2-core AMD EPYC, AVX-512-BF16) it
    #: streams the 168,072 x 896 lm_head at 36 GB/s against oneDNN's packed one-row product
    #: at about 20 GB/s, and a whole one-token decode runs 1.3x faster with it for every
    #: layer's products too (docs/compile.md).
    gemv_elements = 2**16
    #: Such reductions longer than this are summed in parts (:func:`gemv_chunks`).
    gemv_chunk = 1024

    def __call__(self, graph: torch.fx.Graph) -> None:
        ctx = torch._guards.TracingContext.try_get()
        meta = getattr(ctx, "fw_metadata", None)
        indices = set(getattr(meta, "static_input_indices", None) or ())
        inputs = [n for n in graph.nodes if n.op == "placeholder"]
        static = {n.name for i, n in enumerate(inputs) if i in indices}
        for node in list(graph.nodes):
            if node.op != "call_function" or node.kwargs:
                continue
            if node.target == _aten.mm.default:
                bias, (x, wt) = None, node.args
            elif node.target == _aten.addmm.default and len(node.args) == 3:
                bias, x, wt = node.args
            else:
                continue
            if not (
                isinstance(wt, torch.fx.Node)
                and wt.target == _aten.permute.default
                and list(wt.args[1]) == [1, 0]  # type: ignore[arg-type]
            ):
                continue
            rows_node: torch.fx.Node = wt.args[0]  # type: ignore[assignment]
            val, out = rows_node.meta.get("val"), node.meta.get("val")
            if (
                val is None
                or out is None
                or val.device.type != "cpu"
                or val.ndim != 2
                or val.dtype not in _PACKABLE
                or x.meta["val"].dtype != val.dtype  # type: ignore[union-attr]
                or (bias is not None and bias.meta["val"].ndim != 1)  # type: ignore[union-attr]
            ):
                continue
            found = _static_rows(rows_node, static)
            if x.meta["val"].shape[0] == 1 and val.numel() >= self.gemv_elements:  # type: ignore[union-attr]
                # plain math on the graph's inputs: any weight, a parameter or not (the
                # audio rows of a shared lm_head reached through a dict are not static)
                k = val.shape[1]  # type: ignore[union-attr]
                dense = tuple(val.stride()) == (k, 1)  # type: ignore[union-attr]
                parts = gemv_chunks(k, self.gemv_chunk) if dense else 1
                new = _gemv(graph, node, x, rows_node, bias, parts)
            elif found is None:
                continue
            else:
                w, start, stop = found
                with graph.inserting_before(node):
                    new = graph.call_function(
                        torch.ops.mctp.packed_linear.default, (x, w, bias, start, stop)
                    )
                new.meta.update(node.meta)
            node.replace_all_uses_with(new)
            graph.erase_node(node)
            for dead in (wt, wt.args[0]):
                if isinstance(dead, torch.fx.Node) and dead.op != "placeholder" and not dead.users:
                    graph.erase_node(dead)

    def uuid(self) -> bytes:
        """A key for Inductor's caches: changes with this file and with the pass's settings."""
        settings = repr((self.gemv_elements, self.gemv_chunk)).encode()
        return get_hash_for_files((__file__,)) + settings

    def __repr__(self) -> str:  # part of the key under which FastPaths share regions
        return f"PackedLinearPass(gemv_elements={self.gemv_elements}, gemv_chunk={self.gemv_chunk})"
