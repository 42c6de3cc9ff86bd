"""How a :class:`~mctp.engine.generator.Generator` runs the backbone and the heads: two paths.

:class:`ExactPath` runs every backbone forward and every head over exactly the slots it has
not seen yet (any shape, eager). :class:`FastPath` runs them on fixed shapes (one- and
``window``-slot backbone decodes, ``window``-slot head runs, fixed-size catch-up windows) and
compiles each of those functions once with ``torch.compile(dynamic=False)`` (CUDA graphs on
CUDA through ``mode="reduce-overhead"``). A Generator picks one at construction; the
generation loop calls the same three methods on either.

No global torch setting is changed: every compiled function is a fresh function object with
its own code object, so each has its own compile cache (Dynamo's recompile limit counts per
code object) and the default limit is never reached. Compiled artifacts are reused across
processes by torch's own caches (Inductor's FX-graph cache on disk, on by default), or
explicitly with :func:`save_compile_cache` / :func:`load_compile_cache` (torch's "mega-cache").
"""

from __future__ import annotations

import types
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from ..backbone import Backbone
from .buffer import TokenBuffer
from .decoding import MCTPDecoder

__all__ = ["ExactPath", "FastPath", "backbone_step", "load_compile_cache", "save_compile_cache"]

Sampler = Callable[[torch.Tensor], torch.Tensor]


def backbone_step(
    backbone: Backbone,
    buffer: TokenBuffer,
    cache: Any,
    idx: torch.Tensor,
    all_logits: bool = False,
    visible: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The engine's backbone step: the buffer's slots ``idx [T]`` as tensors (embeddings,
    positions, validity) through :meth:`Backbone.decode`, then the logits. ``visible``: the
    leading slots attention reads (the eager path passes the sequence's length, so a step
    costs what the sequence holds, not what the cache could hold; None on fixed shapes).

    Returns:
        ``(hidden [B, T, H], logits [B, T, V] with all_logits else [B, 1, V])``.
    """
    x = buffer.embed(backbone.embed, idx)
    pos = buffer.positions.index_select(1, idx)
    valid = buffer.valid if visible is None else buffer.valid[:, :visible]
    hidden = backbone.decode(x, pos, idx, valid, cache)
    return hidden, backbone.logits(hidden if all_logits else hidden[:, -1:])


class ExactPath:
    """Eager computation over exact backlogs (the reference; any shape).

    Args:
        backbone: The backbone (see :class:`mctp.backbone.Backbone`).
    """

    #: Chains may be shortened to the tokens still needed.
    fixed_chains = False

    def __init__(self, backbone: Backbone) -> None:
        self.backbone = backbone

    def forward(
        self, buffer: TokenBuffer, cache: Any, start: int, *, all_logits: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Backbone over slots ``start .. buffer.length - 1``.

        Returns:
            ``(hidden [B, T, H], logits [B, T or 1, V])``.
        """
        idx = buffer.index[start : buffer.length]
        return backbone_step(self.backbone, buffer, cache, idx, all_logits, buffer.length)

    def chain(self, decoder: MCTPDecoder, count: int, sampler: Sampler) -> torch.Tensor:
        """Heads ``0..count-1`` over their exact backlogs; returns the tokens ``[B, count]``."""
        return decoder.step(count, sampler=sampler).tokens


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

    The backbone sees two shapes: one token, and a window of ``window`` slots (a multi-token
    re-read is widened to the last ``window`` slots; slots already in the cache are written
    again with the same values). Prompts of ``window .. prefill_windows * window`` slots are
    prefilled as window decodes. Heads run in fixed windows (:meth:`MCTPDecoder.window_chain`)
    after their backlogs caught up in at most ``prefill_windows`` extra windows; where a
    backlog cannot (a short sequence, a long prompt) the exact head path runs instead.

    Args:
        backbone: The backbone.
        device: Where generation runs (CUDA adds ``mode="reduce-overhead"``: CUDA graphs).
        window: Slots per fixed window (``>= 1``).
        prefill_windows: Window decodes allowed for a prefill and per head catch-up.
        compile_options: Extra ``torch.compile`` keyword arguments (e.g. ``backend``); an
            ``{"backend": "eager"}`` runs the fixed shapes without compiling (tests).

    Raises:
        ValueError: On ``window < 1`` or ``prefill_windows < 0``.
    """

    #: Chains always run their full length (static shapes); extra tokens are cut at the end.
    fixed_chains = True

    def __init__(
        self,
        backbone: Backbone,
        *,
        device: torch.device,
        window: int = 16,
        prefill_windows: int = 4,
        compile_options: Mapping[str, Any] | None = None,
    ) -> None:
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        if prefill_windows < 0:
            raise ValueError(f"prefill_windows must be >= 0, got {prefill_windows}")
        self.backbone = backbone
        self.window = window
        self.prefill_windows = prefill_windows
        self.compile_kwargs: dict[str, Any] = {"dynamic": False}
        if device.type == "cuda":
            self.compile_kwargs["mode"] = "reduce-overhead"
        self.compile_kwargs.update(compile_options or {})
        step = self._compile(backbone_step, "mctp_backbone_decode")
        self._decode = lambda buffer, cache, idx, all_logits=False: step(
            backbone, buffer, cache, idx, all_logits
        )
        self._chains: dict[tuple[MCTPDecoder, int], Callable[..., Any]] = {}
        self._fills: dict[tuple[MCTPDecoder, int], Callable[[torch.Tensor], None]] = {}

    def _compile(self, fn: Callable[..., Any], tag: str) -> Callable[..., Any]:
        return torch.compile(_own_code(fn, tag), **self.compile_kwargs)

    # ------------------------------------------------------------------ backbone
    def forward(
        self, buffer: TokenBuffer, cache: Any, start: int, *, all_logits: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Backbone over slots ``start .. buffer.length - 1`` on fixed shapes where possible.

        Returns:
            ``(hidden [B, T, H], logits [B, T or 1, V])``.
        """
        n, w = buffer.length, self.window
        if start == 0 and not all_logits and w <= n <= self.prefill_windows * w:
            return self._windowed_prefill(buffer, cache, n)
        t = n - start
        if start > 0 and 1 < t <= w <= n:
            idx = buffer.index[n - w : n]
            hidden, logits = self._decode(buffer, cache, idx, all_logits=all_logits)
            return hidden[:, -t:], logits[:, -t:] if all_logits else logits
        if t == 1 or start > 0:
            return self._decode(buffer, cache, buffer.index[start:n], all_logits=all_logits)
        # a prompt outside the windowed range: one eager multi-token forward
        idx = buffer.index[start:n]
        return backbone_step(self.backbone, buffer, cache, idx, all_logits, n)

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
            self._fills[key] = self._compile(
                decoder.fill_window(k, self.window), f"mctp_head{k}_fill_w{self.window}"
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
            self._chains[key] = self._compile(
                decoder.window_chain(count, w), f"mctp_chain{count}_w{w}"
            )
        return decoder.run_window(self._chains[key], count, w, sampler).tokens


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
