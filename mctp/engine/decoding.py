"""Incremental (cached) decoding of an :class:`~mctp.stack.MCTPStack`.

Every head keeps a static KV cache over the whole sequence and lags the stream: when
head ``k`` runs, it first processes every position it has not seen yet, pairing the
recorded input states ``h^k_{t-1}`` with the tokens ``x_t`` actually in the sequence, so
its cache always equals what the teacher-forced training forward computes on the final
sequence (this is what VITA-Audio's generation does; the tests check the equivalence).

Sequence indices are slots of fixed buffers (``[B, S]``), shared with the backbone's
cache through :class:`TokenBuffer`; lengths are host integers derived from the schedule,
so the loop never waits on the device.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..compat import call_block
from .buffer import TokenBuffer
from .cache import KVCache, check_active_rows, static_buffer
from .masks import additive, decode_mask
from .sampling import greedy

if TYPE_CHECKING:
    from ..stack import MCTPStack
    from .regions import BlockRegions

__all__ = ["ChainOutput", "HeadToken", "MCTPDecoder", "TokenBuffer", "WindowChain", "head_token"]

WindowChain = Callable[
    [torch.Tensor, Callable[[torch.Tensor], torch.Tensor]], tuple[torch.Tensor, torch.Tensor]
]
"""``(n: 0-d long tensor, sampler) -> (tokens [B, K], logits [B, K, V'])``: a fixed-shape chain."""


HeadToken = Callable[
    [torch.Tensor, Callable[[torch.Tensor], torch.Tensor]], tuple[torch.Tensor, torch.Tensor]
]
"""``(h [B, H], sampler) -> (vocabulary ids [B], logits [B, V'])``: a head's output step."""


def head_token(
    stack: MCTPStack, h: torch.Tensor, sampler: Callable[[torch.Tensor], torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """A head's logits over the output vocabulary and the token ``sampler`` picks from them
    (a vocabulary id): ``h [B, H]`` -> ``(ids [B], logits [B, V'])``."""
    logits = stack.head_logits(h)
    return stack.to_global_ids(sampler(logits)), logits


@dataclass
class ChainOutput:
    """Result of :meth:`MCTPDecoder.step`.

    Attributes:
        tokens: ``[B, K]`` vocabulary ids, one per head run, in order.
        logits: ``[B, K, V']`` the heads' logits (output vocabulary), when requested.
    """

    tokens: torch.Tensor
    logits: torch.Tensor | None


def _kv_layout(block: nn.Module) -> tuple[int, int] | None:
    """``(kv_heads, head_dim)`` of a decoder block's attention, or None when not readable."""
    attn = getattr(block, "self_attn", None)
    k_proj = getattr(attn, "k_proj", None)
    if attn is None or not isinstance(k_proj, nn.Linear):
        return None
    head_dim = getattr(attn, "head_dim", None)
    if not head_dim:
        cfg = getattr(attn, "config", None)
        heads = getattr(cfg, "num_attention_heads", None)
        if not heads:
            return None
        head_dim = cfg.hidden_size // heads
    if k_proj.out_features % int(head_dim):
        return None
    return k_proj.out_features // int(head_dim), int(head_dim)


class MCTPDecoder:
    """Generation-time state of an MCTP stack: per-head static KV caches and input states.

    The heads' caches are allocated here, up front, when the head blocks' attention layout
    can be read (transformers decoder layers and :class:`mctp.layers.DecoderBlock`); other
    blocks allocate on their first run.

    Two ways to run a chain of heads: :meth:`step` processes every head's exact backlog (any
    shape); :meth:`window_chain` builds a fixed-shape chain (``window`` slots per head) that a
    caller may compile, run with :meth:`run_window`. The token buffer's cursor only moves
    through :class:`~mctp.engine.buffer.TokenBuffer` methods.

    Args:
        stack: The trained heads.
        buffer: The shared token buffer (also read and written by the backbone runner).
        dtype: Dtype of the hidden-state buffers and caches (default: the heads' dtype).
        prefill_chunk: A head's backlog longer than this many slots (the prompt, at the first
            chain) runs in pieces of this size, so that no attention score or mask larger
            than ``[B, heads, prefill_chunk, S]`` exists at once; the result is the same.
            None: one piece.

    Raises:
        ValueError: On a ``prefill_chunk`` that is not None or a positive int.
    """

    def __init__(
        self,
        stack: MCTPStack,
        buffer: TokenBuffer,
        *,
        dtype: torch.dtype | None = None,
        prefill_chunk: int | None = None,
    ) -> None:
        if prefill_chunk is not None and (
            not isinstance(prefill_chunk, int)
            or isinstance(prefill_chunk, bool)
            or prefill_chunk < 1
        ):
            raise ValueError(f"prefill_chunk must be None or an int >= 1, got {prefill_chunk!r}")
        self.prefill_chunk = prefill_chunk
        self.stack = stack
        self.buffer = buffer
        n, b, s = stack.num_heads, buffer.capacity, buffer.max_len
        dtype = dtype or stack.heads[0].proj.weight.dtype
        # hidden[k] holds h^k: the backbone's output for k = 0, head k-1's output otherwise
        self._all_hidden = static_buffer(
            torch.zeros(n, b, s, stack.hidden_size, dtype=dtype, device=buffer.device)
        )
        self.hidden = self._all_hidden  # its active rows (see set_active_rows)
        self.caches = []
        for head in stack.heads:
            cache = KVCache(1, b, s, single_layer=True)
            layout = _kv_layout(head.block)
            if layout is not None:
                cache.allocate(*layout, dtype=dtype, device=buffer.device)
            self.caches.append(cache)
        self.next_index = [k + 1 for k in range(n)]
        self.backbone_length = 0
        #: The first slot any row still reads (the eager path's attention skips the slots
        #: before it); set by the engine, 0 = every slot.
        self.key_start = 0
        self._length = static_buffer(torch.zeros((), dtype=torch.long, device=buffer.device))
        self._fill_start = static_buffer(torch.zeros((), dtype=torch.long, device=buffer.device))

    def set_active_rows(self, rows: int) -> None:
        """Run the leading ``rows`` rows only: the hidden-state buffer and every head's cache
        become views of those rows (see :meth:`TokenBuffer.set_active_rows`).

        Raises:
            ValueError: If ``rows`` is not in ``[1, capacity]``.
        """
        cap = self._all_hidden.shape[1]
        check_active_rows(rows, cap)
        self.hidden = self._all_hidden if rows == cap else self._all_hidden[:, :rows]
        for cache in self.caches:
            cache.set_active_rows(rows)

    def reset(self) -> None:
        """Forget all progress (the buffers stay allocated)."""
        self.next_index = [k + 1 for k in range(self.stack.num_heads)]
        self.backbone_length = 0
        self.key_start = 0

    def start_at(self, slot: int) -> None:
        """Begin a sequence whose first ``slot`` slots are padding no row reads: the backbone's
        states start there, head ``k`` reads from ``slot + k + 1`` on (as for a row that
        starts at ``slot``, see :meth:`replace_row`)."""
        self.reset()
        self.next_index = [slot + k + 1 for k in range(self.stack.num_heads)]
        self.backbone_length = slot

    def truncate(self, length: int) -> None:
        """Roll every head back so that slots ``>= length`` count as unseen.

        Raises:
            ValueError: If ``length < 1``.
        """
        if length < 1:
            raise ValueError(f"truncate length must be >= 1, got {length}")
        # slot length-1 is processed again: its output predicts the next token
        self.next_index = [min(c, max(length - 1, k + 1)) for k, c in enumerate(self.next_index)]
        self.backbone_length = min(self.backbone_length, length)

    def _check_row_states(self, start: int, hidden: torch.Tensor) -> int:
        """``T`` of a joining row's states ``hidden [T, H]`` from slot ``start``.

        Raises:
            ValueError: If they reach past the backbone states of the other rows.
        """
        t = hidden.shape[0]
        if start + t > self.backbone_length:
            raise ValueError(
                f"row states reach slot {start + t}; backbone states cover {self.backbone_length}"
            )
        return t

    def replace_row(self, row: int, start: int, hidden: torch.Tensor) -> None:
        """A new sequence took row ``row`` from slot ``start`` on (a request joining a running
        batch): record its backbone states ``hidden [T, H]`` for slots ``start ..
        start + T - 1`` and let every head re-read from there (head ``k`` from ``start + k +
        1``, where the row's positions exceed ``k``). The other rows' entries at those slots
        are computed again from the same inputs.

        Raises:
            ValueError: If the states reach past the backbone states of the other rows.
        """
        t = self._check_row_states(start, hidden)
        self.hidden[0, row, start : start + t] = hidden.to(self.hidden.dtype)
        self.next_index = [min(c, start + k + 1) for k, c in enumerate(self.next_index)]

    def join_row(self, row: int, start: int, hidden: torch.Tensor) -> None:
        """Like :meth:`replace_row`, but the heads catch up on the new row alone: every head
        runs over the row's own slots up to where it stands for the other rows (a 1-row pass,
        in pieces of ``prefill_chunk``), so the next chain goes on from there for all rows
        instead of re-reading the new prompt's slots for every row. Falls back to
        :meth:`replace_row` where the heads' progress is not a chain (head ``k`` more than one
        slot ahead of head ``k - 1``) or a head's cache is not allocated yet.

        Args:
            row: The row the new sequence took.
            start: Its first slot.
            hidden: ``[T, H]`` its backbone states for slots ``start .. start + T - 1``.

        Raises:
            ValueError: If the states reach past the backbone states of the other rows.
        """
        t = self._check_row_states(start, hidden)
        stops = self.next_index
        work = [(k, start + k + 1, c) for k, c in enumerate(stops) if c > start + k + 1]
        chained = all(stops[k] <= stops[k - 1] + 1 for k in range(1, len(stops)))
        if (
            not chained
            or stops[0] > start + t + 1  # head 0 would read states the row does not have
            or self.buffer.prompt_embeds is not None
            or any(not self.caches[k].allocated for k, _, _ in work)
        ):
            self.replace_row(row, start, hidden)
            return
        self._all_hidden[0, row, start : start + t] = hidden.to(self._all_hidden.dtype)
        if not work:
            return
        view = copy.copy(self)  # the same heads over row `row` alone
        view.buffer = self.buffer.row_view(row)
        view.hidden = self._all_hidden[:, row : row + 1]
        view.caches = [cache.rows(row, row + 1) for cache in self.caches]
        index = self.buffer.index
        for k, lo, stop in work:
            lo = view._read_ahead(k, lo, stop)
            view._head_states(k, index[lo:stop], visible=stop, first=lo)

    def _read_ahead(self, k: int, start: int, stop: int) -> int:
        """Head ``k`` over a long backlog ``start .. stop - 1``: every ``prefill_chunk`` piece
        but the last (the eager path); returns where the last piece begins."""
        piece = self.prefill_chunk
        while piece is not None and stop - start > piece:
            self._head_states(
                k, self.buffer.index[start : start + piece], visible=start + piece, first=start
            )
            start += piece
        return start

    def write_backbone(self, start: int, hidden: torch.Tensor) -> None:
        """Record backbone last hidden states ``[B, T, H]`` for slots ``start..start+T-1``.

        Raises:
            ValueError: If the states would leave a gap or overflow the buffer.
        """
        t = hidden.shape[1]
        if start > self.backbone_length:
            raise ValueError(
                f"backbone states start at {start} but only {self.backbone_length} slots are filled"
            )
        if start + t > self.buffer.max_len:
            raise ValueError(
                f"backbone states reach slot {start + t}, buffer holds {self.buffer.max_len}"
            )
        self.hidden[0, :, start : start + t] = hidden.to(self.hidden.dtype)
        self.backbone_length = start + t

    def _check_chain(self, k_run: int) -> None:
        buf = self.buffer
        if not 1 <= k_run <= self.stack.num_heads:
            raise ValueError(f"num_heads must be in [1, {self.stack.num_heads}], got {k_run}")
        if buf.length + k_run > buf.max_len:
            raise ValueError(
                f"{k_run} more tokens do not fit: {buf.length} of {buf.max_len} slots used"
            )
        if self.backbone_length < buf.length - 1:
            raise ValueError(
                f"backbone states cover {self.backbone_length} slots but {buf.length - 1} are needed"
            )

    @torch.inference_mode()
    def step(
        self,
        num_heads: int | None = None,
        *,
        sampler: Callable[[torch.Tensor], torch.Tensor] = greedy,
        forced: torch.Tensor | None = None,
        return_logits: bool = False,
    ) -> ChainOutput:
        """Run heads ``0..K-1`` once each over their exact backlogs, appending one token per
        head to the buffer.

        Requires the backbone states of every slot but the last (the token the last backbone
        forward produced), see :meth:`write_backbone`.

        Args:
            num_heads: ``K`` (default all heads).
            sampler: ``logits [B, V'] -> local ids [B]`` (default greedy).
            forced: ``[B, K]`` vocabulary ids to append instead of the chosen ones (teacher
                forcing); the logits are still those of the heads.
            return_logits: Also return the heads' logits.

        Returns:
            :class:`ChainOutput`.

        Raises:
            ValueError: On a bad ``num_heads``, missing backbone states, a full buffer or a
                badly shaped ``forced``.
            RuntimeError: If a head already saw the last slot (call :meth:`truncate` first).
        """
        buf = self.buffer
        k_run = self.stack.num_heads if num_heads is None else num_heads
        self._check_chain(k_run)
        if forced is not None and forced.shape != (buf.batch_size, k_run):
            raise ValueError(
                f"forced must be [B, K] = {(buf.batch_size, k_run)}, got {tuple(forced.shape)}"
            )
        tokens, all_logits = [], []
        for k in range(k_run):
            n = buf.length
            c = self.next_index[k]
            if c > n - 1:
                raise RuntimeError(
                    f"head {k} has already seen slot {n - 1}; truncate() before re-running"
                )
            c = self._read_ahead(k, c, n)
            tok, logits = self._head(
                k,
                buf.index[c:n],
                sampler,
                None if forced is None else forced[:, k],
                visible=n,
                first=c,
            )
            buf.advance(1)
            self.next_index[k] = n
            tokens.append(tok)
            all_logits.append(logits)
        return ChainOutput(
            tokens=torch.stack(tokens, dim=1),
            logits=torch.stack(all_logits, dim=1) if return_logits else None,
        )

    # ------------------------------------------------------------------ head runs
    def _head(
        self,
        k: int,
        idx: torch.Tensor,
        sampler: Callable[[torch.Tensor], torch.Tensor],
        forced: torch.Tensor | None,
        visible: int | None = None,
        regions: BlockRegions | None = None,
        token_step: HeadToken | None = None,
        *,
        first: int = 0,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Head ``k`` processes slots ``idx [T]`` and writes its token to slot ``idx[-1] + 1``.

        Everything is indexed by tensors (no host integers), so the same code runs eagerly,
        under ``torch.compile`` and inside a CUDA graph. ``visible``: the leading slots the
        attention reads (the eager path: the sequence's length; None on fixed shapes), from
        ``min(key_start, first)`` on (``first``: ``idx[0]`` as a host int; 0 reads them all).
        ``regions`` / ``token_step``: the head's block, and its logits and token (default
        :func:`head_token`), through compiled graphs (regional compilation).

        Returns:
            ``(token [B], logits [B, V'])``.
        """
        stack, buf = self.stack, self.buffer
        h, pos = self._head_states(k, idx, visible, regions, first=first)
        if forced is not None:
            tok, logits = forced, stack.head_logits(h[:, -1])  # [B, V']
        elif token_step is not None:
            tok, logits = token_step(h[:, -1], sampler)
        else:
            tok, logits = head_token(stack, h[:, -1], sampler)
        buf.write_next(idx[-1:] + 1, tok[:, None], pos[:, -1:] + 1)
        return tok, logits

    def _head_states(
        self,
        k: int,
        idx: torch.Tensor,
        visible: int | None = None,
        regions: BlockRegions | None = None,
        *,
        first: int = 0,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Head ``k``'s block over slots ``idx [T]``: writes its cache and ``h^{k+1}``
        (through ``regions``' compiled head graph where given and the cache allows). With
        ``visible`` (the eager path) attention reads slots ``min(key_start, first) ..
        visible - 1``, ``first`` being ``idx[0]`` as a host int (a query never loses its own
        slot); 0 reads them all.

        Returns:
            ``(normed outputs [B, T, H], positions [B, T])``.
        """
        stack, buf = self.stack, self.buffer
        head = stack.heads[k]
        pos = buf.positions.index_select(1, idx)
        prev = self.hidden[k].index_select(1, idx - 1)  # h^k_{t-1}
        embeds = buf.embed(stack.embed, idx, for_heads=True)
        cache = self.caches[k]
        lo = 0 if visible is None else min(self.key_start, first)
        cache.set_positions(idx, visible=visible, start=lo)
        keys = buf.valid & (buf.positions > k)
        if visible is not None:
            keys = keys[:, lo:visible]
        mask = decode_mask(idx, keys, key_start=lo)
        buffers = None if regions is None else cache.layer(0)
        if buffers is not None:
            assert regions is not None
            h = regions.head(
                head,
                stack.norm,
                embeds,
                prev,
                attention_mask=mask,
                position_ids=pos,
                # the tables in the dtype of the fusion's output (what the eager branch gives)
                position_embeddings=stack.position_embeddings(
                    prev.new_empty(0, dtype=head.proj.weight.dtype), pos
                ),
                keys=buffers[0],
                values=buffers[1],
                slots=buffers[2],
            )
        else:
            z = head.fuse(embeds, prev)
            y = call_block(
                head.block,
                z,
                attention_mask=additive(mask, z.dtype),
                position_ids=pos,
                position_embeddings=stack.position_embeddings(z, pos),
                cache=cache,
            )
            h = stack.norm(y)
        if k + 1 < stack.num_heads:
            self.hidden[k + 1].index_copy_(1, idx, h.to(self.hidden.dtype))
        return h, pos

    # ------------------------------------------------------------------ fixed-shape runs
    def _windows_fit(self, k_run: int, window: int) -> bool:
        """Whether a chain of ``k_run`` heads can run on windows of ``window`` slots at all:
        the sequence is longer than the window and ``window >= K - 1`` (see
        :meth:`window_ready`)."""
        return self.buffer.length - window >= 1 and window >= k_run - 1

    def window_ready(self, k_run: int, window: int) -> bool:
        """Whether heads ``0..K-1`` can run on fixed windows of ``window`` slots now: every
        backlog fits the window, the caches exist, the sequence is longer than the window, and
        the window reaches back to the chain's first new slot for every head (``window >=
        K - 1``: head ``k``'s window ends at ``n + k - 1`` and must start at ``n`` or before,
        or the slots between, whose tokens the chain itself produces, would never be read)."""
        n = self.buffer.length
        if not self._windows_fit(k_run, window):
            return False
        for k in range(k_run):
            if not self.caches[k].allocated or n + k - self.next_index[k] > window:
                return False
        return True

    def window_chain(
        self,
        k_run: int,
        window: int,
        regions: BlockRegions | None = None,
        token_step: HeadToken | None = None,
    ) -> WindowChain:
        """The chain of heads ``0..K-1`` on fixed windows (static shapes: compile/graph it,
        or give ``regions`` and a compiled ``token_step`` (``(h [B, H], sampler) ->
        (vocabulary ids [B], logits [B, V'])``, e.g. a compiled :func:`head_token`) to run
        each head's block and output through compiled graphs shared by all heads).

        Head ``k`` processes the ``window`` slots ending at ``n + k - 1`` (``n`` = length
        before the chain, a 0-d tensor), re-computing slots it has already seen: their inputs
        are unchanged, so the cache entries written again are the same. Run it with
        :meth:`run_window`.
        """
        offsets = torch.arange(window, device=self.buffer.device) - window
        # regions compiled for any number of slots: head k reads the slots up to its window's
        # last one (``n + k``, from the buffer's host-side length), not all of them
        dynamic = regions is not None and regions.dynamic_slots

        def chain(
            n: torch.Tensor, sampler: Callable[[torch.Tensor], torch.Tensor]
        ) -> tuple[torch.Tensor, torch.Tensor]:
            toks, logits = [], []
            n0 = self.buffer.length if dynamic else 0
            for k in range(k_run):
                seen = slots_read(n0 + k, self.buffer.max_len) if dynamic else None
                # with a symbolic slot dimension the reads also start at key_start (if set)
                first = max(n0 + k - window, 0) if dynamic else 0
                tok, lg = self._head(
                    k, offsets + (n + k), sampler, None, seen, regions, token_step, first=first
                )
                toks.append(tok)
                logits.append(lg)
            return torch.stack(toks, dim=1), torch.stack(logits, dim=1)

        return chain

    @torch.inference_mode()
    def run_window(
        self,
        chain: WindowChain,
        k_run: int,
        window: int,
        sampler: Callable[[torch.Tensor], torch.Tensor] = greedy,
    ) -> ChainOutput:
        """Run ``chain`` (from :meth:`window_chain` for ``k_run`` heads and ``window``, possibly
        compiled) and advance the buffer by ``k_run`` tokens.

        Raises:
            ValueError: As :meth:`step`, or when :meth:`window_ready` is False.
        """
        self._check_chain(k_run)
        if not self.window_ready(k_run, window):
            raise ValueError(f"heads 0..{k_run - 1} cannot run on windows of {window} slots now")
        n0 = self.buffer.length
        toks, logits = chain(self._length.fill_(n0), sampler)  # a kernel, not a host copy
        self.buffer.advance(k_run)
        self.next_index[:k_run] = [n0 + k for k in range(k_run)]
        return ChainOutput(tokens=toks, logits=logits)

    def catch_up_plan(self, k_run: int, window: int, limit: int) -> list[list[int]] | None:
        """Window starts per head that bring every backlog down to ``window`` (None: not possible).

        Head ``k``'s chain window will cover slots ``e = n + k - window .. n + k - 1``; slots
        ``next_index[k] .. e - 1`` are processed first, in windows of ``window`` slots. The last
        one is moved back to end at ``e`` (re-computing seen slots, which changes nothing), or,
        where that would start before slot 1, starts at slot 1 and reaches into the chain's
        window: those slots get provisional entries that the chain overwrites before any query
        reads them (a head only reads cache slots up to the one it is computing).

        None also when ``window < K - 1``: head ``k``'s catch-up would then reach slots ``>=
        n`` (tokens the chain has not produced yet) and its chain window would not cover them
        again.
        """
        n = self.buffer.length
        if not self._windows_fit(k_run, window):
            return None
        plan: list[list[int]] = []
        for k in range(k_run):
            if not self.caches[k].allocated:
                return None
            e, s = n + k - window, self.next_index[k]
            starts: list[int] = []
            while s < e:
                starts.append(max(1, min(s, e - window)))
                s = starts[-1] + window
            if len(starts) > limit:
                return None
            plan.append(starts)
        return plan

    def fill_window(
        self, k: int, window: int, regions: BlockRegions | None = None
    ) -> Callable[[torch.Tensor], None]:
        """Head ``k`` over the ``window`` slots from a 0-d start tensor (no token produced);
        a fixed-shape function to compile, run by :meth:`catch_up` (or, with ``regions``, one
        that runs the head through their compiled graph)."""
        offsets = torch.arange(window, device=self.buffer.device)
        dynamic = regions is not None and regions.dynamic_slots  # see window_chain

        def fill(start: torch.Tensor) -> None:
            # (a host read of the start: regions run on CPU unless asked for on CUDA)
            first = int(start) if dynamic else 0
            seen = slots_read(first + window, self.buffer.max_len) if dynamic else None
            self._head_states(k, offsets + start, seen, regions=regions, first=first)

        return fill

    @torch.inference_mode()
    def catch_up(
        self,
        k_run: int,
        window: int,
        limit: int,
        fill: Callable[[int], Callable[[torch.Tensor], None]],
    ) -> bool:
        """Bring every backlog of heads ``0..K-1`` down to ``window`` slots with at most
        ``limit`` windows per head (:meth:`catch_up_plan`), running ``fill(k)`` (e.g. a compiled
        :meth:`fill_window`). Returns whether the plan was possible (nothing runs otherwise)."""
        plan = self.catch_up_plan(k_run, window, limit)
        if plan is None:
            return False
        n = self.buffer.length
        for k, starts in enumerate(plan):
            for a in starts:
                fill(k)(self._fill_start.fill_(a))
            if starts:
                self.next_index[k] = n + k - window
        return True


def slots_read(stop: int, max_len: int) -> int:
    """The slots a step over slots before ``stop`` reads where the compiled graphs take any
    number of them (regions with ``dynamic_slots``): at least 2 (a symbolic size is never 0
    or 1), at most ``max_len``."""
    return min(max(stop, 2), max_len)
