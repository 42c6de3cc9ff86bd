"""A :class:`~mctp.engine.generator.Generator`'s streamed call: tokens become events.

``_StreamLoop._events`` runs the schedule loop (:class:`~mctp.engine.run._Run`), reads the new
tokens once per cycle, turns them into :class:`~mctp.engine.segmenter.StreamEvent` per row
(text tokens, audio segments, one ``end`` per row with its own result), and lets queued
requests join at join points (:mod:`mctp.engine.joins`). Mixed into the Generator, whose
``stream`` and ``generate(streamer=...)`` call it.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import torch

from .generation_config import GenerationConfig
from .run import _Run, _sync
from .segmenter import StreamEvent, StreamSegmenter


class _NoAudio:
    """Speech ids that never occur (segmenting text-only streams for a streamer)."""

    boa = eoa = audio_start = audio_stop = -1


class _StreamLoop:
    """The streaming half of :class:`~mctp.engine.generator.Generator` (mixed into it)."""

    @torch.inference_mode()  # applied around each step of the iterator, not between them
    def _events(
        self,
        input_ids: torch.Tensor,
        cfg: GenerationConfig,
        attention_mask: torch.Tensor | None,
        prompt_embeds: torch.Tensor | None,
        heads_read: bool,
        generator: torch.Generator | None,
        audio_chunk: int | None,
        streamer: Any,
    ) -> Iterator[StreamEvent]:
        with self._acquire():
            t0 = time.perf_counter()
            run = _Run(self, cfg, input_ids, attention_mask, prompt_embeds, heads_read, generator)
            speech = self.vocab
            seg = StreamSegmenter(
                speech if speech is not None else _NoAudio(),
                self.max_batch,
                cfg.eos_token_id,
                audio_chunk=audio_chunk,
            )
            for r in run.finished_rows:  # padding rows: nothing to say until a request joins
                seg.retire(r)
            if streamer is not None:
                streamer.put(input_ids.detach().cpu())
            buf, p = self.buffer, run.prompt_len
            read = 0
            cycle_times: list[tuple[int, float]] = []

            def row_events(r: int, evs: list[StreamEvent]) -> Iterator[StreamEvent]:
                for ev in evs:
                    if streamer is not None and ev.kind == "text":
                        streamer.put(torch.tensor(ev.ids))
                    if ev.kind == "end":
                        ev.row_result = run.result(t0, cycle_times, rows=[r])
                        run.finished_rows.add(r)
                    yield ev

            self._join_open = True
            try:
                for produced in run.cycles():
                    now = time.perf_counter() - t0
                    cycle_times.append((produced, now))
                    lo, hi = p + read, run.end
                    new = buf.ids[:, lo:hi].tolist()  # one read per cycle (active rows)
                    read = hi - p
                    for r in range(self.max_batch):
                        if seg.ended(r):
                            continue
                        assert r < len(new), "a row still streaming is not being run"
                        first, stop = run.row_start[r], run.row_start[r] + run.row_budget[r]
                        ids = new[r][max(first, lo) - lo : max(min(stop, hi) - lo, 0)]
                        evs = seg.feed(r, ids, now, run.forwards)
                        if hi >= stop and not seg.ended(r):  # the row's own budget is spent
                            evs += seg.end(r, now, run.forwards)
                        yield from row_events(r, evs)
                    run.fit_rows()
                    if run.joinable:
                        for ticket in list(self._joins):
                            given = time.perf_counter()
                            r = run.try_join(ticket.request)
                            if r is None:
                                continue
                            self._joins.remove(ticket)
                            ticket.row, ticket.joined_at = r, given
                            held = seg.take_held()  # not the last row to end after all
                            if held is not None:
                                yield from row_events(held.row, [held])
                            seg.reopen(r)
                            tok0 = [int(buf.ids[r, run.row_start[r]])]
                            yield from row_events(r, seg.feed(r, tok0, now, run.forwards))
            finally:
                self._join_open = False
                for ticket in self._joins:  # the run ended before they could join
                    ticket.row = -1
                self._joins.clear()
            _sync(self.device)
            result = run.result(t0, cycle_times)
            if streamer is not None:
                streamer.end()
            for ev in seg.finish(time.perf_counter() - t0, run.forwards, result):
                if ev.kind == "end" and ev.row_result is None:
                    ev.row_result = run.result(t0, cycle_times, rows=[ev.row])
                yield ev
