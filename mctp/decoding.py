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

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .cache import KVCache, static_buffer
from .compat import call_block
from .masks import additive, decode_mask, default_position_ids
from .sampling import greedy
from .stack import MCTPStack

__all__ = ["ChainOutput", "MCTPDecoder", "TokenBuffer"]


class TokenBuffer:
    """The sequence being decoded: ids, position ids and validity in ``[B, S]`` buffers.

    Args:
        batch_size: ``B``.
        max_len: ``S``, prompt plus everything that will be generated.
        device: Where the buffers live.

    Raises:
        ValueError: On non-positive sizes.
    """

    def __init__(
        self, batch_size: int, max_len: int, device: torch.device | str | None = None
    ) -> None:
        if batch_size < 1 or max_len < 2:
            raise ValueError(f"batch_size ({batch_size}) must be >= 1 and max_len ({max_len}) >= 2")
        self.batch_size, self.max_len = batch_size, max_len
        self.ids = torch.zeros(batch_size, max_len, dtype=torch.long, device=device)
        self.positions = torch.zeros(batch_size, max_len, dtype=torch.long, device=device)
        self.valid = torch.zeros(batch_size, max_len, dtype=torch.bool, device=device)
        self.index = torch.arange(max_len, device=device)
        for t in (self.ids, self.positions, self.valid, self.index):
            static_buffer(t)
        self.length = 0
        self.prompt_len = 0
        self.prompt_embeds: torch.Tensor | None = None
        self.heads_read_prompt_embeds = False

    @property
    def device(self) -> torch.device:
        """Device of the buffers."""
        return self.ids.device

    def embed(
        self,
        embedding: Callable[[torch.Tensor], torch.Tensor],
        idx: torch.Tensor,
        *,
        for_heads: bool = False,
    ) -> torch.Tensor:
        """Input embeddings ``[B, T, H]`` of slots ``idx [T]``: ``embedding(ids)``, with the
        prompt's own embeddings where :meth:`start` was given ``prompt_embeds``.

        With ``for_heads`` (the MCTP heads' inputs) the prompt embeddings are used only when
        :meth:`start` was given ``heads_read_prompt_embeds=True``: by default heads embed the
        token ids, placeholders included, as VITA-Audio-Plus does.
        """
        x = embedding(self.ids.index_select(1, idx))
        if self.prompt_embeds is None or (for_heads and not self.heads_read_prompt_embeds):
            return x
        p = self.prompt_len
        given = self.prompt_embeds.index_select(1, idx.clamp(max=p - 1)).to(x.dtype)
        return torch.where((idx < p)[None, :, None], given, x)

    def start(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        *,
        heads_read_prompt_embeds: bool = False,
    ) -> None:
        """Load the prompt ``[B, P]`` (left padding marked by ``attention_mask`` zeros).

        Args:
            input_ids: ``[B, P]`` prompt ids.
            attention_mask: ``[B, P]`` (1 = real token), for left-padded batches.
            prompt_embeds: ``[B, P, H]`` embeddings to use for the prompt instead of the
                token embeddings (e.g. audio-encoder frames over placeholders), read by the
                backbone's prefill. The MCTP heads embed the prompt's token ids (VITA-Audio-Plus
                semantics) unless ``heads_read_prompt_embeds``.
            heads_read_prompt_embeds: Opt-in: the MCTP heads read ``prompt_embeds`` too (for
                heads trained that way, see ``inputs_embeds`` of :meth:`MCTPStack.forward`).

        Raises:
            ValueError: On a wrong batch size, an empty prompt or one that fills the buffer,
                or ``heads_read_prompt_embeds`` without ``prompt_embeds``.
        """
        b, p = input_ids.shape
        if b != self.batch_size:
            raise ValueError(f"buffer batch size is {self.batch_size}, prompt has {b} rows")
        if p < 1:
            raise ValueError("the prompt must hold at least one token")
        if p >= self.max_len:
            raise ValueError(
                f"prompt length {p} leaves no room in a buffer of {self.max_len} slots"
            )
        if attention_mask is not None and attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"attention_mask {tuple(attention_mask.shape)} must match input_ids {tuple(input_ids.shape)}"
            )
        self.ids[:, :p] = input_ids
        self.positions[:, :p] = default_position_ids(input_ids, attention_mask)
        self.valid[:, :p] = True if attention_mask is None else attention_mask.bool()
        self.length = p
        if prompt_embeds is not None and prompt_embeds.shape[:2] != (b, p):
            raise ValueError(
                f"prompt_embeds must be [B, P, H] with B, P = {(b, p)}, got {tuple(prompt_embeds.shape)}"
            )
        if heads_read_prompt_embeds and prompt_embeds is None:
            raise ValueError("heads_read_prompt_embeds=True needs prompt_embeds")
        self.prompt_embeds = prompt_embeds
        self.heads_read_prompt_embeds = heads_read_prompt_embeds
        self.prompt_len = p

    def append(self, ids: torch.Tensor) -> None:
        """Append ``ids [B, T]`` (positions continue from each row's last position).

        Raises:
            ValueError: If the buffer would overflow.
        """
        t = ids.shape[1]
        n = self.length
        if n + t > self.max_len:
            raise ValueError(f"sequence would reach {n + t} tokens, buffer holds {self.max_len}")
        self.ids[:, n : n + t] = ids
        step = torch.arange(1, t + 1, device=self.device)
        self.positions[:, n : n + t] = self.positions[:, n - 1 : n] + step
        self.valid[:, n : n + t] = True
        self.length = n + t

    def truncate(self, length: int) -> None:
        """Forget everything from slot ``length`` on.

        Raises:
            ValueError: If ``length`` is not in ``[1, self.length]``.
        """
        if not 1 <= length <= self.length:
            raise ValueError(f"truncate length must be in [1, {self.length}], got {length}")
        self.length = length


@dataclass
class ChainOutput:
    """Result of :meth:`MCTPDecoder.step`.

    Attributes:
        tokens: ``[B, K]`` vocabulary ids, one per head run, in order.
        logits: ``[B, K, V']`` the heads' logits (output vocabulary), when requested.
    """

    tokens: torch.Tensor
    logits: torch.Tensor | None


class MCTPDecoder:
    """Generation-time state of an MCTP stack: per-head static KV caches and input states.

    Args:
        stack: The trained heads.
        buffer: The shared token buffer (also read and written by the backbone runner).
        dtype: Dtype of the hidden-state buffers (the model's compute dtype).
    """

    def __init__(
        self, stack: MCTPStack, buffer: TokenBuffer, *, dtype: torch.dtype | None = None
    ) -> None:
        self.stack = stack
        self.buffer = buffer
        n, b, s = stack.num_heads, buffer.batch_size, buffer.max_len
        dtype = dtype or stack.heads[0].proj.weight.dtype
        # hidden[k] holds h^k: the backbone's output for k = 0, head k-1's output otherwise
        self.hidden = static_buffer(
            torch.zeros(n, b, s, stack.hidden_size, dtype=dtype, device=buffer.device)
        )
        self.caches = [KVCache(1, b, s, single_layer=True) for _ in range(n)]
        self.next_index = [k + 1 for k in range(n)]
        self.backbone_length = 0
        self._compiled: dict[tuple[int, int], Callable] = {}
        self._fills: dict[tuple[int, int], Callable] = {}
        self._length = static_buffer(torch.zeros((), dtype=torch.long, device=buffer.device))
        self._fill_start = static_buffer(torch.zeros((), dtype=torch.long, device=buffer.device))

    def reset(self) -> None:
        """Forget all progress (the buffers stay allocated)."""
        self.next_index = [k + 1 for k in range(self.stack.num_heads)]
        self.backbone_length = 0

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

    @torch.inference_mode()
    def step(
        self,
        num_heads: int | None = None,
        *,
        sampler: Callable[[torch.Tensor], torch.Tensor] = greedy,
        forced: torch.Tensor | None = None,
        return_logits: bool = False,
        window: int | None = None,
        catch_up: int = 0,
    ) -> ChainOutput:
        """Run heads ``0..K-1`` once each, appending one token per head to the buffer.

        Requires the backbone states of every slot but the last (the token the last backbone
        forward produced), see :meth:`write_backbone`.

        Args:
            num_heads: ``K`` (default all heads).
            sampler: ``logits [B, V'] -> local ids [B]`` (default greedy).
            forced: ``[B, K]`` vocabulary ids to append instead of the chosen ones (teacher
                forcing); the logits are still those of the heads.
            return_logits: Also return the heads' logits.
            window: Run every head on exactly this many slots (its unseen slots plus
                already-seen ones before them) when possible: static shapes for
                ``torch.compile``/CUDA graphs (see :meth:`compile_chain`). Falls back to the
                exact-backlog path when a head's backlog is longer than the window, its cache
                is not allocated yet, or the sequence is shorter than the window.
            catch_up: With ``window``: a head whose backlog is longer than the window (the
                first chain after a prefill) first processes the excess in at most this many
                extra windows of ``window`` slots (fixed shapes too, see :meth:`compile_chain`)
                instead of falling back to the exact-backlog path. 0 = never.

        Returns:
            :class:`ChainOutput`.

        Raises:
            ValueError: On a bad ``num_heads``, missing backbone states, a full buffer or a
                badly shaped ``forced``.
        """
        stack, buf = self.stack, self.buffer
        k_run = stack.num_heads if num_heads is None else num_heads
        if not 1 <= k_run <= stack.num_heads:
            raise ValueError(f"num_heads must be in [1, {stack.num_heads}], got {k_run}")
        if buf.length + k_run > buf.max_len:
            raise ValueError(
                f"{k_run} more tokens do not fit: {buf.length} of {buf.max_len} slots used"
            )
        if self.backbone_length < buf.length - 1:
            raise ValueError(
                f"backbone states cover {self.backbone_length} slots but {buf.length - 1} are needed"
            )
        if forced is not None and forced.shape != (buf.batch_size, k_run):
            raise ValueError(
                f"forced must be [B, K] = {(buf.batch_size, k_run)}, got {tuple(forced.shape)}"
            )
        tokens, all_logits = [], []
        n0 = buf.length
        if window is not None and forced is None and catch_up > 0:
            self._catch_up(k_run, window, catch_up)
        if window is not None and forced is None and self._window_ok(k_run, window):
            run = self._compiled.get((k_run, window)) or self._window_chain(k_run, window)
            toks, logits = run(self._length.fill_(n0), sampler)  # a kernel, not a host copy
            buf.length = n0 + k_run
            self.next_index[:k_run] = [n0 + k for k in range(k_run)]
            tokens, all_logits = list(toks.unbind(1)), list(logits.unbind(1))
        else:
            for k in range(k_run):
                n = buf.length
                c = self.next_index[k]
                if c > n - 1:
                    raise RuntimeError(
                        f"head {k} has already seen slot {n - 1}; truncate() before re-running"
                    )
                tok, logits = self._head(
                    k, buf.index[c:n], sampler, None if forced is None else forced[:, k]
                )
                buf.length = n + 1
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
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Head ``k`` processes slots ``idx [T]`` and writes its token to slot ``idx[-1] + 1``.

        Everything is indexed by tensors (no host integers), so the same code runs eagerly,
        under ``torch.compile`` and inside a CUDA graph.

        Returns:
            ``(token [B], logits [B, V'])``.
        """
        stack, buf = self.stack, self.buffer
        h, pos = self._head_states(k, idx)
        logits = stack.head_logits(h[:, -1])  # [B, V']
        tok = stack.to_global_ids(sampler(logits)) if forced is None else forced
        nxt = idx[-1:] + 1
        buf.ids.index_copy_(1, nxt, tok[:, None])
        buf.positions.index_copy_(1, nxt, pos[:, -1:] + 1)
        buf.valid.index_copy_(1, nxt, torch.ones_like(buf.valid[:, :1]))
        return tok, logits

    def _head_states(self, k: int, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Head ``k``'s block over slots ``idx [T]``: writes its cache and ``h^{k+1}``.

        Returns:
            ``(normed outputs [B, T, H], positions [B, T])``.
        """
        stack, buf = self.stack, self.buffer
        head = stack.heads[k]
        pos = buf.positions.index_select(1, idx)
        prev = self.hidden[k].index_select(1, idx - 1)  # h^k_{t-1}
        z = head.fuse(buf.embed(stack.embed, idx, for_heads=True), prev)
        cache = self.caches[k]
        cache.set_positions(idx)
        mask = additive(decode_mask(idx, buf.valid & (buf.positions > k)), z.dtype)
        y = call_block(
            head.block,
            z,
            attention_mask=mask,
            position_ids=pos,
            position_embeddings=stack.position_embeddings(z, pos),
            cache=cache,
        )
        h = stack.norm(y)
        if k + 1 < stack.num_heads:
            self.hidden[k + 1].index_copy_(1, idx, h.to(self.hidden.dtype))
        return h, pos

    def _window_ok(self, k_run: int, window: int) -> bool:
        """Whether heads ``0..K-1`` can run on fixed windows of ``window`` slots now."""
        n = self.buffer.length
        if n - window < 1:
            return False
        for k in range(k_run):
            if not self.caches[k].allocated or n + k - self.next_index[k] > window:
                return False
        return True

    def _window_chain(
        self, k_run: int, window: int
    ) -> Callable[
        [torch.Tensor, Callable[[torch.Tensor], torch.Tensor]], tuple[torch.Tensor, torch.Tensor]
    ]:
        """The chain of heads ``0..K-1`` on fixed windows (static shapes: compile/graph it).

        Head ``k`` processes the ``window`` slots ending at ``n + k - 1`` (``n`` = length
        before the chain, a 0-d tensor), re-computing slots it has already seen: their inputs
        are unchanged, so the cache entries written again are the same.
        """
        offsets = torch.arange(window, device=self.buffer.device) - window

        def chain(
            n: torch.Tensor, sampler: Callable[[torch.Tensor], torch.Tensor]
        ) -> tuple[torch.Tensor, torch.Tensor]:
            toks, logits = [], []
            for k in range(k_run):
                tok, lg = self._head(k, offsets + (n + k), sampler, None)
                toks.append(tok)
                logits.append(lg)
            return torch.stack(toks, dim=1), torch.stack(logits, dim=1)

        return chain

    def _catch_up_plan(self, k_run: int, window: int, limit: int) -> list[list[int]] | None:
        """Window starts per head that bring every backlog down to ``window`` (None: not possible).

        Head ``k``'s chain window will cover slots ``e = n + k - window .. n + k - 1``; slots
        ``next_index[k] .. e - 1`` are processed first, in windows of ``window`` slots. The last
        one is moved back to end at ``e`` (re-computing seen slots, which changes nothing), or,
        where that would start before slot 1, starts at slot 1 and reaches into the chain's
        window: those slots get provisional entries that the chain overwrites before any query
        reads them (a head only reads cache slots up to the one it is computing).
        """
        n = self.buffer.length
        if n - window < 1:
            return None
        plan: list[list[int]] = []
        for k in range(k_run):
            if not self.caches[k].allocated:
                return None  # allocated by the first (exact-backlog) run
            e, s = n + k - window, self.next_index[k]
            starts: list[int] = []
            while s < e:
                starts.append(max(1, min(s, e - window)))
                s = starts[-1] + window
            if len(starts) > limit:
                return None
            plan.append(starts)
        return plan

    def _catch_up(self, k_run: int, window: int, limit: int) -> None:
        plan = self._catch_up_plan(k_run, window, limit)
        if plan is None or not any(plan):
            return
        n = self.buffer.length
        for k, starts in enumerate(plan):
            for a in starts:
                fill = self._fills.get((k, window)) or self._fill(k, window)
                fill(self._fill_start.fill_(a))
            if starts:
                self.next_index[k] = n + k - window

    def _fill(self, k: int, window: int) -> Callable[[torch.Tensor], None]:
        """Head ``k`` over the ``window`` slots from a 0-d start tensor (no token produced)."""
        offsets = torch.arange(window, device=self.buffer.device)

        def fill(start: torch.Tensor) -> None:
            self._head_states(k, offsets + start)

        return fill

    def compile_chain(self, k_run: int, window: int, **compile_kwargs: object) -> None:
        """``torch.compile`` the windowed chain of ``k_run`` heads (used by ``step(window=)``)
        and each of these heads' catch-up window (used by ``step(catch_up=)``).

        On CUDA pass ``mode="reduce-overhead"`` to capture the whole chain as one CUDA graph.
        """
        self._compiled[(k_run, window)] = torch.compile(
            self._window_chain(k_run, window), **compile_kwargs
        )
        for k in range(k_run):
            if (k, window) not in self._fills:
                self._fills[(k, window)] = torch.compile(self._fill(k, window), **compile_kwargs)
