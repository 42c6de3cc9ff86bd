"""Mid-flight joins: a request joins a running streamed call in a free row.

A streamed call (:meth:`Generator.stream <mctp.engine.generator.Generator.stream>`) takes
requests queued with :meth:`~mctp.engine.generator.Generator.offer_join` (a
:class:`JoinTicket`) at join points: right after a backbone token, where a row that starts
there follows its own schedule (:meth:`_Joins._aligned`). :meth:`_Joins.try_join` prefills the
request into a free row and places its first token where the run's last backbone token sits.
:class:`_Joins` is mixed into the schedule loop, :class:`~mctp.engine.run._Run`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..backbone import takes_key_start
from .generation_config import slots_needed
from .sampling import TokenPicker

__all__ = ["JOIN_ALONE_WIDTH", "JoinTicket"]

#: Heads at least this wide read a joining prompt for its row alone by default
#: (``EngineConfig.join_heads_alone=None``). Measured on a 2-core CPU: at width 896 (the 0.5B
#: shape) a 60-token join's cycle took 0.67 s alone against 0.95 s re-read by 7 rows; at width
#: 64 (the tiny default) the extra call per head halved the server's throughput at 8 clients.
JOIN_ALONE_WIDTH = 512


@dataclass(eq=False)  # compared by identity: two tickets may carry equal requests
class JoinTicket:
    """A request waiting to join a running stream (:meth:`Generator.offer_join`).

    Attributes:
        request: A :class:`~mctp.engine.batching.RowRequest`.
        row: None while waiting, the row once joined, -1 when the stream ended first.
        joined_at: ``time.perf_counter()`` when its row was given (its prefill began), once
            joined.
    """

    request: Any
    row: int | None = None
    joined_at: float | None = None


class _Joins:
    """The join half of :class:`~mctp.engine.run._Run` (mixed into it): join points and
    :meth:`try_join`, over the run's state (``gen``, ``cfg``, ``schedule``, ``buffer``,
    ``cache``, ``picker``, ``done``, the per-row tables)."""

    def _aligned(self, i: int) -> bool:
        """Whether a row whose first token (from its own prefill) sits where token ``i`` of
        this run sits would follow its own schedule from there: the sources of tokens
        ``i + 1, i + 2, ...`` equal those of ``1, 2, ...`` (always for Vanilla; after every
        backbone run for Boost and Turbo; Balance only at the start)."""
        sched = self.schedule
        if self.cfg.verify and not sched.uses_mctp:
            return True
        horizon = 2 * sum(sched.ratio) + 2
        return all(sched.head(i + 1 + j) == sched.head(1 + j) for j in range(horizon))

    def try_join(self, request: Any) -> int | None:
        """Put ``request`` (a :class:`~mctp.engine.batching.RowRequest` with this run's
        settings) into a free row now, at a join point: its prompt is written to the row's
        slots just before the cursor, prefilled into that row of the backbone's cache (a
        1-row view), its first token chosen and placed where this run's last backbone token
        sits, and the heads re-read the row's slots at their next chain. From then on the row
        follows its own schedule in step with the others.

        Returns:
            The row, or None when it cannot join now (not a join point, other settings,
            prompt embeddings, no free row, a prompt longer than the cursor, no room, or a
            cache without row views).
        """
        ids = request.input_ids
        if (
            not self.joinable
            or request.config != self.cfg
            or request.prompt_embeds is not None
            or not hasattr(self.cache, "rows")
            # a prompt embedded by the caller covers the rows it came with only
            or self.buffer.prompt_embeds is not None
        ):
            return None
        free = [r for r in range(self.gen.max_batch) if r in self.finished_rows]
        buf = self.buffer
        n, pj = buf.length, ids.shape[1]
        start = n - 1 - pj
        heads = 0 if self.gen.stack is None else self.gen.stack.num_heads
        need = slots_needed(self.cfg, 0, self.cfg.max_new_tokens, heads, self.engine)
        if not free or start < 0 or n - 1 + need > buf.max_len:
            return None
        r = free[0]
        if r >= self.state.active_rows:  # every active row is taken: run one more (or the
            # path's next row count: rows past the active ones are all free, so the lowest free
            # one is the next; the others come back stopped, holding what they held)
            assert r == self.state.active_rows, (r, self.state.active_rows)
            self.state.set_active_rows(self.rows_for(r + 1))
        dev = buf.device
        ids = ids.to(dev)
        with torch.inference_mode():
            buf.ids[r, start : n - 1] = ids[0]
            buf.positions[r, start : n - 1] = torch.arange(pj, device=dev)
            buf.valid[r, :start] = False
            buf.valid[r, start : n - 1] = True
            idx = buf.index[start : n - 1]
            backbone = self.gen.backbone
            # its own prompt's slots only, where the backbone can skip the others
            lo = start if takes_key_start(backbone) else 0
            hidden = backbone.decode(
                backbone.embed(ids),
                buf.positions[r : r + 1, start : n - 1],
                idx,
                buf.valid[r : r + 1, lo : n - 1],
                self.cache.rows(r, r + 1),
                **({"key_start": lo} if lo else {}),
            )
            picker = TokenPicker(
                backbone.vocab_size,
                self.gen.vocab,
                self.cfg.text_sampling,
                self.cfg.audio_sampling_or_text,
                self.picker.generator,
                dev,
                1,
            )
            picker.observe(ids)
            tok = picker(backbone.logits(hidden[:, -1:])[:, -1])
            buf.ids[r, n - 1] = tok[0]
            buf.positions[r, n - 1] = pj
            buf.valid[r, n - 1] = True
            if self.picker.seen is not None:
                self.picker.seen[r] = False
                self.picker.observe_row(r, buf.ids[r : r + 1, start:n])
            if self.state.heads is not None:
                heads = self.state.heads
                alone = self.engine.join_heads_alone
                if alone is None:  # the products outweigh a call per head
                    alone = heads.stack.hidden_size >= JOIN_ALONE_WIDTH
                if alone:
                    heads.join_row(r, start, hidden[0])
                else:
                    heads.replace_row(r, start, hidden[0])
            self.done[r] = bool(self.stop_ids.numel()) and bool(torch.isin(tok, self.stop_ids))
        self.finished_rows.discard(r)
        self.row_start[r] = n - 1
        self.row_prompt[r] = start
        self.row_budget[r] = self.cfg.max_new_tokens
        self.max_new = max(self.max_new, n - 1 - self.prompt_len + self.cfg.max_new_tokens)
        self.joined += 1
        return r
