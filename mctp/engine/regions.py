"""Regional compilation: one compiled graph per block shape, shared by every layer and head.

The whole-graph fast path compiles each backbone decode shape with every layer unrolled, and
each MCTP chain with every head unrolled: compile time and the size of the generated code grow
with the depth (24 layers, 10 heads and 10 chain lengths on the 0.5B shape), and a second
process must trace all of it again. Here a decoder block is the unit instead: blocks of the
same class, parameter shapes and settings run through one compiled function whose weights are
inputs, so a 24-layer backbone compiles one layer graph per shape, and the ten heads one head
graph, whatever the number of layers, heads and chain lengths.

How: every block is called through ``torch.func.functional_call`` on a *template*, a copy of
the first such block on the meta device (no memory), with the real block's parameters and
buffers passed as a dict. Dynamo guards on the template (always the same object) and on the
tensors' shapes, dtypes and strides, not on which layer they belong to, so the graph traced
for one layer serves all of them. The block's KV cache is passed as tensors (its key and value
buffers and the slots to write) and wrapped inside the graph in a one-layer
:class:`~mctp.engine.cache.KVCache`, which ignores the block's ``layer_idx``. Parameters stay
parameters, so the packed-weights pass of :mod:`mctp.engine.compile_packing` sees them as
static inputs and packs them as in the whole graphs.

Blocks share a graph when they agree on their class, every parameter's and buffer's name,
shape, dtype and device, and every plain setting (ints, floats, strings, bools, None) of every
submodule except ``layer_idx``, which the engine's caches make irrelevant: a sliding-window
layer and a full layer of a hybrid model get graphs of their own. A block's kind is read at
its first call: its parameters are read anew on every call, but a plain setting changed later
(say a layer's ``sliding_window``) keeps the graph of the old one; build a new Generator after
such a change.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..compat import call_block
from .cache import KVCache
from .masks import additive

__all__ = ["BlockRegions", "block_key"]

Compile = Callable[[Callable[..., Any], str], Callable[..., Any]]

_PLAIN = (bool, int, float, str, type(None))
_IGNORED = frozenset({"layer_idx", "training"})


def block_key(module: nn.Module) -> tuple[Any, ...]:
    """What decides whether two blocks can share a compiled graph (see the module docstring)."""
    tensors = tuple(
        (name, tuple(t.shape), t.dtype, t.device.type, isinstance(t, nn.Parameter))
        for name, t in (*module.named_parameters(), *module.named_buffers())
    )
    settings = tuple(
        (name, type(sub).__qualname__, type(sub).__module__,
         tuple(sorted(
             (k, v) for k, v in vars(sub).items()
             if not k.startswith("_") and k not in _IGNORED and isinstance(v, _PLAIN)
         )))
        for name, sub in module.named_modules()
    )  # fmt: skip
    return tensors, settings


def _meta_template(module: nn.Module) -> nn.Module:
    """A copy of ``module`` whose parameters and buffers are on the meta device (no memory);
    everything else (configs, functions) is shared with the original, not copied, so that a
    setting changed on the original config at run time is seen by the template too."""
    memo: dict[int, Any] = {}
    for sub in module.modules():
        for name, value in vars(sub).items():
            if name in ("_parameters", "_buffers", "_modules"):
                continue
            if not isinstance(value, (nn.Module, torch.Tensor)):
                memo[id(value)] = value
        for p in sub._parameters.values():
            if p is not None and id(p) not in memo:
                memo[id(p)] = nn.Parameter(
                    torch.empty_like(p, device="meta"), requires_grad=p.requires_grad
                )
        for b in sub._buffers.values():
            if b is not None and id(b) not in memo:
                memo[id(b)] = torch.empty_like(b, device="meta")
    return copy.deepcopy(module, memo)


def _functional(template: nn.Module, weights: dict[str, torch.Tensor], *args: Any) -> Any:
    """The compiled function: ``template``'s forward over ``weights`` (one block's tensors)."""
    return torch.func.functional_call(template, weights, args)


def _call(
    block: nn.Module,
    x: torch.Tensor,
    mask: Any,
    position_ids: torch.Tensor,
    rope: Any,
    keys: torch.Tensor,
    values: torch.Tensor,
    slots: torch.Tensor,
) -> torch.Tensor:
    """``block`` over ``x [B, T, H]`` with a one-layer cache over ``keys, values`` that it
    writes at ``slots [T]``."""
    return call_block(
        block,
        x,
        attention_mask=mask,
        position_ids=position_ids,
        position_embeddings=rope,
        cache=KVCache.over(keys, values, slots),
    )


class _Block(nn.Module):
    """A backbone decoder layer called the engine's way over a one-layer cache view."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block

    def forward(
        self,
        x: torch.Tensor,
        mask: Any,
        position_ids: torch.Tensor,
        rope: Any,
        keys: torch.Tensor,
        values: torch.Tensor,
        slots: torch.Tensor,
    ) -> torch.Tensor:
        return _call(self.block, x, mask, position_ids, rope, keys, values, slots)


class _Head(nn.Module):
    """An MCTP head (fusion, block) and the shared final norm, over a one-layer cache view."""

    def __init__(self, head: nn.Module, norm: nn.Module) -> None:
        super().__init__()
        self.head = head
        self.norm = norm

    def forward(
        self,
        embeds: torch.Tensor,
        prev: torch.Tensor,
        mask: torch.Tensor,  # [B, 1, T, S] bool: made additive in the block's dtype here
        position_ids: torch.Tensor,
        rope: Any,
        keys: torch.Tensor,
        values: torch.Tensor,
        slots: torch.Tensor,
    ) -> torch.Tensor:
        z = self.head.fuse(embeds, prev)
        mask = additive(mask, z.dtype)
        return self.norm(_call(self.head.block, z, mask, position_ids, rope, keys, values, slots))


class BlockRegions:
    """Runs decoder blocks and MCTP heads through compiled graphs shared by equal blocks.

    Weights must stay graph inputs: Inductor's freezing (which makes them constants of a
    graph) is refused, in ``options`` at construction and globally at a block's first call.

    Args:
        compile: ``(fn, name) -> compiled fn``, e.g. ``FastPath``'s compile with its options;
            ``lambda fn, name: fn`` runs the same code eagerly (tests). Compiles the shared
            functions (:meth:`function`) and, unless ``compile_template`` is given, the blocks.
        compile_template: The same for a block's graph, called once per distinct block (see
            :func:`block_key`) with a function of its own, which only ever sees its own meta
            template: Dynamo's guards on the template module can be dropped there (the
            engine's compile does), which they cannot in :meth:`function`, whose callers pass
            different modules (a full and an audio-only head stack). None: ``compile``.
        options: The Inductor options ``compile`` uses (checked for ``freezing``).
        dynamic_slots: Compile the layers' and heads' graphs for any number of cache slots
            read (the slot dimension of keys, values and mask is symbolic), so that a step may
            read only the slots a sequence holds; False: every call reads the same number.

    Raises:
        ValueError: If ``options`` turn freezing on.
    """

    def __init__(
        self,
        compile: Compile,
        *,
        compile_template: Compile | None = None,
        options: dict[str, Any] | None = None,
        dynamic_slots: bool = False,
    ) -> None:
        if (options or {}).get("freezing"):
            raise ValueError(
                "regional compilation cannot use Inductor's 'freezing' option (one graph serves "
                "many blocks, so weights must stay inputs)"
            )
        self._compile = compile
        self._compile_template = compile_template or compile
        self.dynamic_slots = dynamic_slots
        # block key -> (meta template, compiled function)
        self._graphs: dict[tuple[Any, ...], tuple[nn.Module, Callable[..., Any]]] = {}
        # id(block) -> (the block, its wrapper's graph call); the block is kept so that its
        # id cannot be reused while the entry exists
        self._wrappers: dict[tuple[int, ...], tuple[Any, Callable[..., Any]]] = {}
        self._functions: dict[str, Callable[..., Any]] = {}

    def function(self, fn: Callable[..., Any], tag: str) -> Callable[..., Any]:
        """``fn`` compiled once for these regions (e.g. the logits of every caller)."""
        if tag not in self._functions:
            self._functions[tag] = self._compile(fn, tag)
        return self._functions[tag]

    @property
    def num_graphs(self) -> int:
        """Distinct compiled functions so far (one per kind of block)."""
        return len(self._graphs)

    def _graph(
        self, ident: tuple[int, ...], keep: Any, make: Callable[[], nn.Module]
    ) -> Callable[..., Any]:
        """The compiled call of the block(s) ``keep`` (identified by ``ident``), made on first
        use: ``make()`` wraps them, the wrapper's kind picks (or makes) the graph."""
        hit = self._wrappers.get(ident)
        if hit is not None:
            return hit[1]
        if _freezing():
            raise RuntimeError(
                "regional compilation cannot run with Inductor's freezing on (torch._inductor."
                "config.freezing or a 'freezing' compile option): a frozen graph would keep the "
                "first block's weights for every block; turn freezing off or use whole graphs "
                "(EngineConfig(compile_regions=False))"
            )
        wrapper = make()
        key = (type(wrapper).__name__, block_key(wrapper))
        if key not in self._graphs:
            tag = f"mctp_region{len(self._graphs)}_{type(wrapper).__name__.strip('_').lower()}"
            self._graphs[key] = (
                _meta_template(wrapper),
                self._compile_template(_functional, tag),
            )
        template, fn = self._graphs[key]
        graph = lambda *args: fn(template, _weights(wrapper), *args)  # noqa: E731
        self._wrappers[ident] = (keep, graph)
        return graph

    def _mark_slots(self, keys: torch.Tensor, values: torch.Tensor, mask: Any) -> None:
        """With :attr:`dynamic_slots`, one graph for every number of slots read: the slot
        dimension of ``keys, values [B, kv_heads, S, D]`` and ``mask [B, 1, T, S]`` is marked
        symbolic (where a shape forces a value, Dynamo keeps it; no error)."""
        if self.dynamic_slots:
            for t, dim in ((keys, 2), (values, 2), (mask, 3)):
                if isinstance(t, torch.Tensor):
                    torch._dynamo.maybe_mark_dynamic(t, dim)

    def block(
        self,
        block: nn.Module,
        x: torch.Tensor,
        *,
        attention_mask: Any,
        position_ids: torch.Tensor,
        position_embeddings: Any,
        keys: torch.Tensor,
        values: torch.Tensor,
        slots: torch.Tensor,
    ) -> torch.Tensor:
        """One backbone decoder layer over ``x [B, T, H]``, writing its keys and values
        (``keys, values [B, kv_heads, S, D]``, this layer's cache buffers) at ``slots [T]``.

        Returns:
            ``[B, T, H]``.
        """
        graph = self._graph((id(block),), block, lambda: _Block(block))
        self._mark_slots(keys, values, attention_mask)
        return graph(x, attention_mask, position_ids, position_embeddings, keys, values, slots)

    def head(
        self,
        head: nn.Module,
        norm: nn.Module,
        embeds: torch.Tensor,
        prev: torch.Tensor,
        *,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        position_embeddings: Any,
        keys: torch.Tensor,
        values: torch.Tensor,
        slots: torch.Tensor,
    ) -> torch.Tensor:
        """One MCTP head over embeddings and previous states ``[B, T, H]``, then ``norm``;
        ``attention_mask [B, 1, T, S]`` is boolean (True = attend).

        Returns:
            The normed outputs ``[B, T, H]``.
        """
        graph = self._graph((id(head), id(norm)), (head, norm), lambda: _Head(head, norm))
        self._mark_slots(keys, values, attention_mask)
        return graph(
            embeds, prev, attention_mask, position_ids, position_embeddings, keys, values, slots
        )


def _freezing() -> bool:
    """Whether Inductor's global freezing setting is on now."""
    return bool(getattr(torch._inductor.config, "freezing", False))


def _weights(module: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors ``functional_call`` hands the template: read anew on every call, so a
    parameter replaced on the real block (not only changed in place) is used at once."""
    out = dict(module.named_parameters())
    out.update(module.named_buffers())
    return out
