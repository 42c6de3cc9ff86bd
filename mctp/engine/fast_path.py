"""How a :class:`~mctp.engine.generator.Generator` runs the backbone and the heads: two paths.

:class:`ExactPath` runs every backbone forward and every head over exactly the slots it has
not seen yet (any shape, eager). :class:`FastPath` runs them on fixed shapes (one- and
``window``-slot backbone decodes, ``window``-slot head runs, fixed-size catch-up windows) and
compiles each of those functions once with ``torch.compile(dynamic=False)`` (CUDA graphs on
CUDA through ``mode="reduce-overhead"``). A Generator picks one at construction; the
generation loop calls the same three methods on either.

On CPU (by default) the compiled unit is a block, not a whole step: one graph per kind of
decoder layer and of MCTP head, shared by all layers, heads and chain lengths
(:mod:`mctp.engine.regions`), with the loops in Python; on CUDA whole steps and chains are
compiled (CUDA graphs). On CPU the linear layers of every compiled graph read one packed copy
of each weight (:mod:`mctp.engine.compile_packing`, a post-grad pass given per compile call):
no frozen copy of the weights per graph, and no max-autotune benchmarking at compile time (see
docs/compile.md for what each costs).

No global torch setting is changed: options go to each ``torch.compile`` call, and every
compiled function is a fresh function object with its own code object, so each has its own
compile cache (Dynamo's recompile limit counts per code object) and the default limit is never
reached. Compiled artifacts are reused across processes by torch's own caches (Inductor's
FX-graph cache on disk, on by default), or explicitly with :func:`save_compile_cache` /
:func:`load_compile_cache` (torch's "mega-cache"), or by ``FastPath(compile_cache_dir=...)``.
"""

from __future__ import annotations

import functools
import threading
import types
import weakref
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ..backbone import Backbone, takes_key_start
from .buffer import TokenBuffer
from .compile_packing import PackedLinearPass, packing_available
from .decoding import MCTPDecoder, head_token, slots_read
from .regions import BlockRegions

__all__ = [
    "COMPILE_CACHE_FILE",
    "ExactPath",
    "FastPath",
    "backbone_step",
    "compile_kwargs",
    "load_compile_cache",
    "save_compile_cache",
]

#: The file :class:`FastPath` reads and writes in its ``compile_cache_dir``.
COMPILE_CACHE_FILE = "mctp_compile_cache.bin"

Sampler = Callable[[torch.Tensor], torch.Tensor]


def backbone_step(
    backbone: Backbone,
    buffer: TokenBuffer,
    cache: Any,
    idx: torch.Tensor,
    all_logits: bool = False,
    visible: int | None = None,
    regions: BlockRegions | None = None,
    logits: Callable[[Backbone, torch.Tensor], torch.Tensor] | None = None,
    key_start: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The engine's backbone step: the buffer's slots ``idx [T]`` as tensors (embeddings,
    positions, validity) through :meth:`Backbone.decode`, then the logits. ``visible``: the
    leading slots attention reads (the eager path passes the sequence's length, so a step
    costs what the sequence holds, not what the cache could hold; None on fixed shapes).
    The regional path gives ``regions`` (every layer through its compiled graph) and
    ``logits`` (a compiled ``(backbone, hidden) -> logits``); embeddings, masks and rotary
    tables stay eager then. ``key_start``: the first slot any row still reads (the eager
    path, and regions with a symbolic slot dimension; only for backbones that
    ``supports_key_start``), at most the first slot of ``idx``.

    Returns:
        ``(hidden [B, T, H], logits [B, T, V] with all_logits else [B, 1, V])``.
    """
    x = buffer.embed(backbone.embed, idx)
    pos = buffer.positions.index_select(1, idx)
    valid = buffer.valid if visible is None else buffer.valid[:, key_start:visible]
    extra: dict[str, Any] = {}  # only what the backbone's protocol needs to be told
    if key_start:
        extra["key_start"] = key_start
    if regions is not None:
        extra["regions"] = regions
    hidden = backbone.decode(x, pos, idx, valid, cache, **extra)
    last = hidden if all_logits else hidden[:, -1:]
    return hidden, backbone.logits(last) if logits is None else logits(backbone, last)


def _logits(backbone: Backbone, hidden: torch.Tensor) -> torch.Tensor:
    """``backbone.logits(hidden)`` (a function of its own to compile: the regional path)."""
    return backbone.logits(hidden)


def _compile_with(kwargs: Mapping[str, Any], fn: Callable[..., Any], tag: str) -> Any:
    """``torch.compile`` of a copy of ``fn`` with a code object of its own (named ``tag``)."""
    kw = dict(kwargs)
    if "options" in kw:  # torch.compile pops keys from the dict it is given: a copy each time
        kw["options"] = dict(kw["options"])
    return torch.compile(_own_code(fn, tag), **kw)


def _template_guards(entries: Sequence[Any]) -> list[bool]:
    """Dynamo guard filter of a block's graph: neither the guards on globals nor those on
    modules (the graph's only module is its own meta template, the same object on every call
    and never changed); the guards on tensors (shapes, dtypes, strides) and grad mode stay."""
    no_globals = torch.compiler.skip_guard_on_globals_unsafe(entries)
    no_modules = torch.compiler.skip_guard_on_all_nn_modules_unsafe(entries)
    return [a and b for a, b in zip(no_globals, no_modules, strict=True)]


def _compile_region(
    kwargs: Mapping[str, Any],
    fn: Callable[..., Any],
    tag: str,
    guards: Callable[[Sequence[Any]], list[bool]] = torch.compiler.skip_guard_on_globals_unsafe,
) -> Any:
    """:func:`_compile_with` for a regional graph, whose Dynamo guards skip global names.

    A region is called once per layer and head (24 + 10 times a token on the 0.5B shape), and
    Dynamo checks every guard of a compiled function on every call: for a decoder layer
    several hundred, nearly all on module-level names (``torch``, transformers' functions,
    builtins; about 66 us a call on a 24-layer tiny model).
    ``torch.compiler.skip_guard_on_globals_unsafe`` keeps the guards on the call's own
    arguments (tensor shapes, dtypes and strides, the template block and its settings) and the
    grad mode, and drops those on globals, which the engine never rebinds: a library function
    replaced after the first compiled call (monkeypatching transformers) would not be seen.
    A block's graph also drops the guards on modules (``guards``: :func:`_template_guards`).
    Not with a compile ``mode`` (torch takes a mode or options).
    """
    kw = dict(kwargs)
    if "mode" not in kw:
        kw["options"] = {
            "guard_filter_fn": guards,
            **(kw.get("options") or {}),
        }
    return _compile_with(kw, fn, tag)


#: Regions compile their layers and heads for any number of cache slots, and the regional
#: path's steps read only the slots a sequence holds (the eager path's habit). Set before a
#: Generator is built (benchmarks/decode_ab.py compares both).
DYNAMIC_SLOTS = True

# backbone -> {compile options: regions}; every FastPath of a backbone with the same options
# (the lanes of a server, the head vocabularies of a benchmark) shares one set of graphs
_REGIONS: weakref.WeakKeyDictionary[Any, dict[str, BlockRegions]] = weakref.WeakKeyDictionary()
_REGIONS_LOCK = threading.Lock()


def _shared_regions(backbone: Backbone, kwargs: Mapping[str, Any]) -> BlockRegions:
    """The :class:`BlockRegions` of ``backbone`` for these compile arguments (made once).

    Keyed weakly by the backbone: the regions hold its layers and heads, never the backbone
    object, so they go when it goes. Arguments whose ``repr`` names an object's address get
    regions of their own (no sharing, still correct)."""
    key = repr(sorted(kwargs.items()))
    with _REGIONS_LOCK:
        per_backbone = _REGIONS.setdefault(backbone, {})
        if key not in per_backbone:
            per_backbone[key] = BlockRegions(
                functools.partial(_compile_region, dict(kwargs)),
                compile_template=functools.partial(
                    _compile_region, dict(kwargs), guards=_template_guards
                ),
                options=kwargs.get("options"),
                dynamic_slots=DYNAMIC_SLOTS,  # steps read the slots in use (FastPath)
            )
        return per_backbone[key]


class ExactPath:
    """Eager computation over exact backlogs (the reference; any shape).

    Args:
        backbone: The backbone (see :class:`mctp.backbone.Backbone`).
    """

    #: Chains may be shortened to the tokens still needed.
    fixed_chains = False

    def __init__(self, backbone: Backbone) -> None:
        self.backbone = backbone
        #: Steps skip the slots before the first one a live row reads (``key_start``), where
        #: the backbone can (the same rule as :attr:`FastPath.key_window`).
        self.key_window = takes_key_start(backbone)

    def forward(
        self,
        buffer: TokenBuffer,
        cache: Any,
        start: int,
        *,
        all_logits: bool = False,
        key_start: int = 0,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Backbone over slots ``start .. buffer.length - 1``, attention reading the slots
        from ``key_start`` on (0 where the backbone cannot skip slots).

        Returns:
            ``(hidden [B, T, H], logits [B, T or 1, V])``.
        """
        idx = buffer.index[start : buffer.length]
        key_start = key_start if self.key_window else 0
        return backbone_step(
            self.backbone, buffer, cache, idx, all_logits, buffer.length, key_start=key_start
        )

    def chain(self, decoder: MCTPDecoder, count: int, sampler: Sampler) -> torch.Tensor:
        """Heads ``0..count-1`` over their exact backlogs; returns the tokens ``[B, count]``."""
        return decoder.step(count, sampler=sampler).tokens

    def rows_for(self, needed: int, capacity: int) -> int:
        """Rows a step runs while its first ``needed`` of ``capacity`` rows are in use: just
        those (any shape runs eagerly)."""
        return needed


def _own_code(fn: Callable[..., Any], tag: str) -> Callable[..., Any]:
    """``fn`` as a new function object with a code object of its own (named ``tag``)."""
    if isinstance(fn, types.MethodType):
        bound_self, fn = fn.__self__, fn.__func__
    else:
        bound_self = None
    code = fn.__code__.replace(co_name=tag, co_qualname=tag)
    new = types.FunctionType(code, fn.__globals__, tag, fn.__defaults__, fn.__closure__)
    new.__kwdefaults__ = fn.__kwdefaults__
    return new if bound_self is None else types.MethodType(new, bound_self)


class FastPath:
    """Fixed-shape computation, compiled: what makes MCTP fast where overhead dominates.

    The backbone's compiled calls see two shapes: one token, and a window of ``window`` slots
    (a multi-token re-read is widened to the last ``window`` slots; slots already in the cache
    are written again with the same values). Prompts of ``window .. prefill_windows * window``
    slots are prefilled as window decodes; other prompts, and re-reads no window holds (while
    the sequence is shorter than the window, or longer than it), run eagerly. Heads run in
    fixed windows (:meth:`MCTPDecoder.window_chain`) after their backlogs caught up in at most
    ``prefill_windows`` extra windows; where a backlog cannot (a short sequence, a long
    prompt, a chain of more than ``window + 1`` heads) the exact head path runs instead.

    Args:
        backbone: The backbone.
        device: Where generation runs (CUDA adds ``mode="reduce-overhead"``: CUDA graphs).
        window: Slots per fixed window (``>= 1``).
        prefill_windows: Window decodes allowed for a prefill and per head catch-up.
        compile_options: Extra ``torch.compile`` keyword arguments (e.g. ``backend``); an
            ``{"backend": "eager"}`` runs the fixed shapes without compiling (tests).
        pack_weights: Packed linear weights shared by all graphs (:func:`compile_kwargs`).
            None: on wherever they apply (Inductor on CPU, bf16 weights).
        compile_cache_dir: A folder for torch's compiled artifacts: loaded here when it holds
            them (:data:`COMPILE_CACHE_FILE`), written by :meth:`save_compile_cache` after the
            warm-up, so that the next process skips Inductor's code generation.
        regions: Regional compilation (:mod:`mctp.engine.regions`): one compiled graph per
            kind of decoder layer and one per kind of MCTP head, shared by all layers and all
            heads, plus compiled logits, with the loops over layers and heads in Python. Far
            less to compile than whole unrolled graphs (seconds instead of minutes on the 0.5B
            shape), at a little per-call overhead. None: on for CPU where the backbone supports
            it (:attr:`~mctp.backbones.HFBackbone.supports_regions`), off on CUDA (CUDA graphs
            want whole steps).

    Raises:
        ValueError: On ``window < 1`` or ``prefill_windows < 0``, ``regions=True`` for a
            backbone without regions, or as :func:`compile_kwargs`.
        RuntimeError: If ``compile_cache_dir`` holds a file that is not a compile cache.
    """

    #: Whole graphs read every slot (fixed shapes): no ``key_start`` window. Regions with a
    #: symbolic slot dimension set it True per instance (see ``__init__``).
    key_window = False

    def __init__(
        self,
        backbone: Backbone,
        *,
        device: torch.device,
        window: int = 16,
        prefill_windows: int = 4,
        compile_options: Mapping[str, Any] | None = None,
        pack_weights: bool | None = None,
        compile_cache_dir: str | Path | None = None,
        regions: bool | None = None,
    ) -> None:
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        supported = bool(getattr(backbone, "supports_regions", False))
        if regions and not supported:
            raise ValueError(
                f"regions=True: {type(backbone).__name__} cannot run its layers as compiled "
                "regions (the fast HF backbone can; use regions=False)"
            )
        if regions is None:
            regions = supported and torch.device(device).type == "cpu"
        if prefill_windows < 0:
            raise ValueError(f"prefill_windows must be >= 0, got {prefill_windows}")
        self.backbone = backbone
        self.window = window
        self.prefill_windows = prefill_windows
        weight = getattr(getattr(backbone, "lm_head", None), "weight", None)
        dtype = weight.dtype if isinstance(weight, torch.Tensor) else torch.float32
        self.compile_kwargs = compile_kwargs(
            device, dtype, compile_options=compile_options, pack_weights=pack_weights
        )
        self.compile_cache_dir = None if compile_cache_dir is None else Path(compile_cache_dir)
        #: Whether artifacts were loaded from ``compile_cache_dir``.
        self.cache_loaded = self.compile_cache_dir is not None and load_compile_cache(
            self.compile_cache_dir / COMPILE_CACHE_FILE
        )
        self._chains: dict[tuple[MCTPDecoder, int], Callable[..., Any]] = {}
        self._fills: dict[tuple[MCTPDecoder, int], Callable[[torch.Tensor], None]] = {}
        #: The regional graphs (None: whole graphs per shape and chain).
        self.regions = _shared_regions(backbone, self.compile_kwargs) if regions else None
        #: Whole graphs need every chain at its full length (static shapes); regions run
        #: only the heads a chain needs (each head's graph has the same shape anyway).
        self.fixed_chains = not regions
        if self.regions is not None:
            logits = self.regions.function(_logits, "mctp_backbone_logits")
            dynamic = self.regions.dynamic_slots

            def visible(buffer: TokenBuffer) -> int | None:
                # graphs for any number of slots read the slots in use, else all of them
                return slots_read(buffer.length, buffer.max_len) if dynamic else None

            def decode(
                buffer: TokenBuffer,
                cache: Any,
                idx: torch.Tensor,
                all_logits: bool = False,
                key_start: int = 0,
            ) -> tuple[torch.Tensor, torch.Tensor]:
                return backbone_step(
                    backbone,
                    buffer,
                    cache,
                    idx,
                    all_logits,
                    visible(buffer),
                    self.regions,
                    logits,
                    key_start=key_start,
                )

            self._decode = decode
            #: Graphs for any number of slots also start their reads at the first slot a
            #: live row reads (``key_start``), where the backbone can.
            self.key_window = dynamic and takes_key_start(backbone)
        else:
            step = self._compile(backbone_step, "mctp_backbone_decode")
            self._decode = lambda buffer, cache, idx, all_logits=False, key_start=0: step(
                backbone, buffer, cache, idx, all_logits
            )

    @property
    def packs_weights(self) -> bool:
        """Whether the compiled graphs read packed linear weights."""
        return "post_grad_custom_post_pass" in self.compile_kwargs.get("options", {})

    def _compile(self, fn: Callable[..., Any], tag: str) -> Callable[..., Any]:
        return _compile_with(self.compile_kwargs, fn, tag)

    def rows_for(self, needed: int, capacity: int) -> int:
        """Rows a step runs while its first ``needed`` of ``capacity`` rows are in use.

        Whole graphs run all ``capacity`` rows (one compiled shape set; CUDA graphs). Regions
        run 1 row for a lone request (the 1-row speed; one more shape set compiled, at the
        first lone call or the warm-up) and all rows otherwise: two row counts bound the
        number of shapes compiled per graph.
        """
        return 1 if needed == 1 and self.regions is not None else capacity

    def save_compile_cache(self) -> Path:
        """Write this process's compiled artifacts to ``compile_cache_dir`` (after a warm-up).

        Returns:
            The file written.

        Raises:
            ValueError: If the FastPath has no ``compile_cache_dir``.
            RuntimeError: If nothing was compiled yet.
        """
        if self.compile_cache_dir is None:
            raise ValueError("this FastPath has no compile_cache_dir to save to")
        return save_compile_cache(self.compile_cache_dir / COMPILE_CACHE_FILE)

    # ------------------------------------------------------------------ backbone
    def forward(
        self,
        buffer: TokenBuffer,
        cache: Any,
        start: int,
        *,
        all_logits: bool = False,
        key_start: int = 0,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Backbone over slots ``start .. buffer.length - 1`` on fixed shapes where possible;
        with :attr:`key_window`, attention reads from ``key_start`` on (or from the first
        slot a widened window computes, if earlier).

        Returns:
            ``(hidden [B, T, H], logits [B, T or 1, V])``.
        """
        n, w = buffer.length, self.window
        key_start = key_start if self.key_window else 0
        if start == 0 and not all_logits and w <= n <= self.prefill_windows * w:
            return self._windowed_prefill(buffer, cache, n)
        t = n - start
        if start > 0 and 1 < t <= w <= n:
            idx = buffer.index[n - w : n]
            hidden, logits = self._decode(
                buffer, cache, idx, all_logits=all_logits, key_start=min(key_start, n - w)
            )
            return hidden[:, -t:], logits[:, -t:] if all_logits else logits
        if t == 1:
            return self._decode(
                buffer, cache, buffer.index[start:n], all_logits=all_logits, key_start=key_start
            )
        # a prompt outside the windowed range, or a re-read that no window holds (a sequence
        # shorter than the window, a backlog longer than it): one eager multi-token forward,
        # so that the compiled shapes stay one token and one window whatever the lengths
        idx = buffer.index[start:n]
        return backbone_step(
            self.backbone, buffer, cache, idx, all_logits, n, key_start=min(key_start, start)
        )

    def _windowed_prefill(
        self, buffer: TokenBuffer, cache: Any, n: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Prefill in windows ``[0, w), [w, 2w), ...``, the last moved back to end at ``n``."""
        w = self.window
        parts, done = [], 0
        logits = None
        while done < n:
            end = min(done + w, n)
            hidden, logits = self._decode(buffer, cache, buffer.index[end - w : end])
            parts.append(hidden[:, w - (end - done) :].clone())  # graph outputs get reused
            done = end
        assert logits is not None
        return torch.cat(parts, dim=1), logits

    # ------------------------------------------------------------------ heads
    def _fill(self, decoder: MCTPDecoder, k: int) -> Callable[[torch.Tensor], None]:
        key = (decoder, k)
        if key not in self._fills:
            fill = decoder.fill_window(k, self.window, self.regions)
            self._fills[key] = (
                fill
                if self.regions is not None  # the head's graph inside is compiled already
                else self._compile(fill, f"mctp_head{k}_fill_w{self.window}")
            )
        return self._fills[key]

    def chain(self, decoder: MCTPDecoder, count: int, sampler: Sampler) -> torch.Tensor:
        """Heads ``0..count-1`` in one compiled fixed-window chain (after compiled catch-up
        windows for long backlogs); the exact chain where windows do not fit yet.

        Returns:
            The tokens ``[B, count]``.
        """
        w = self.window
        if self.prefill_windows > 0:
            decoder.catch_up(count, w, self.prefill_windows, lambda k: self._fill(decoder, k))
        if not decoder.window_ready(count, w):
            return decoder.step(count, sampler=sampler).tokens
        key = (decoder, count)
        if key not in self._chains:
            self._chains[key] = self._window_chain(decoder, count)
        return decoder.run_window(self._chains[key], count, w, sampler).tokens

    def _window_chain(self, decoder: MCTPDecoder, count: int) -> Callable[..., Any]:
        """The fixed-window chain of heads ``0..count-1``: compiled whole, or, with regions,
        each head's block and its logits and token through the shared compiled graphs."""
        w = self.window
        if self.regions is None:
            return self._compile(decoder.window_chain(count, w), f"mctp_chain{count}_w{w}")
        stack, step = decoder.stack, self.regions.function(head_token, "mctp_head_token")
        return decoder.window_chain(count, w, self.regions, lambda h, pick: step(stack, h, pick))


def compile_kwargs(
    device: torch.device | str,
    dtype: torch.dtype,
    *,
    compile_options: Mapping[str, Any] | None = None,
    pack_weights: bool | None = None,
) -> dict[str, Any]:
    """The ``torch.compile`` keyword arguments of the fast path.

    ``dynamic=False`` always; ``mode="reduce-overhead"`` (CUDA graphs) on CUDA; then
    ``compile_options``. With packed weights (Inductor on CPU: ``pack_weights=True``, or
    None with bf16 weights) Inductor gets :class:`~mctp.engine.compile_packing.PackedLinearPass` as
    its ``post_grad_custom_post_pass`` option (a ``mode`` becomes its option set, as torch
    takes either a mode or options).

    Args:
        device: Where the graphs run.
        dtype: The weights' dtype.
        compile_options: Extra ``torch.compile`` keyword arguments.
        pack_weights: True / False / None (auto).

    Raises:
        ValueError: If ``pack_weights=True`` where packing cannot apply (not CPU, a dtype
            oneDNN cannot pack, a backend other than Inductor, or another post-grad pass).
    """
    device = torch.device(device)
    kw: dict[str, Any] = {"dynamic": False}
    if device.type == "cuda":
        kw["mode"] = "reduce-overhead"
    kw.update(compile_options or {})
    backend = kw.get("backend", "inductor")
    options = dict(kw.get("options") or {})
    why_not = None
    if backend != "inductor":
        why_not = f"backend {backend!r} (packing is an Inductor pass)"
    elif not packing_available(device, dtype):
        why_not = f"{dtype} weights on {device.type} (oneDNN packs bf16/fp32 on CPU)"
    elif options.get("post_grad_custom_post_pass") is not None:
        why_not = "compile_options already set a post_grad_custom_post_pass"
    if pack_weights is None:
        pack_weights = why_not is None and dtype == torch.bfloat16
    if pack_weights:
        if why_not is not None:
            raise ValueError(f"pack_weights=True cannot apply: {why_not}")
        mode = kw.pop("mode", None)
        if mode is not None:
            options = {**torch._inductor.list_mode_options(mode, kw["dynamic"]), **options}
        options["post_grad_custom_post_pass"] = PackedLinearPass()
        kw["options"] = options
    return kw


def save_compile_cache(path: str | Path) -> Path:
    """Write every compiled artifact of this process (torch's mega-cache: Inductor kernels,
    FX graphs, AOTAutograd results) to ``path`` so that another process can skip compiling.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        RuntimeError: If torch has no artifacts to save (nothing was compiled).
    """
    saved = torch.compiler.save_cache_artifacts()
    if saved is None:
        raise RuntimeError("nothing compiled in this process: no compile cache to save")
    data, _info = saved
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(data)
    return out


def load_compile_cache(path: str | Path) -> bool:
    """Load artifacts written by :func:`save_compile_cache` before compiling the same shapes.

    Returns:
        False when ``path`` does not exist (a first start), True once loaded.

    Raises:
        RuntimeError: If the file is not a torch compile-cache blob.
    """
    p = Path(path)
    if not p.is_file():
        return False
    try:
        info = torch.compiler.load_cache_artifacts(p.read_bytes())
    except Exception as e:  # torch raises several types for a bad blob
        raise RuntimeError(f"{p} is not a torch compile cache: {e}") from e
    if info is None:  # torch logs why (e.g. a checksum mismatch) and returns None
        raise RuntimeError(f"{p} is not a torch compile cache (torch could not read it)")
    return True
