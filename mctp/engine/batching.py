"""Batched generation of independent requests: cohorts of rows on a few Generators.

A server receives requests one by one; the engine runs them together. A :class:`Cohort` puts
the prompts of several requests into one left-padded batch on a :class:`~mctp.Generator` and
streams it; each request reads its own row (:meth:`Cohort.events`) and stops on its own: its
``"end"`` event (with the row's :class:`~mctp.GenerationResult`) comes as soon as the row
produced a stop id, while the other rows go on. A :class:`BatchScheduler` owns a few
Generators ("lanes", each with ``max_batch`` rows): a request that arrives while one cohort
runs starts a new cohort on a free lane at once, together with every compatible request
waiting at that moment, and the cohorts advance in turns. When no lane is free, a waiting
request joins a running cohort (:meth:`Cohort.offer`) in a free row at the next point where
a new row can begin its schedule in step with the others: after any backbone forward for
Vanilla and verified Vanilla, after every backbone run for Boost and Turbo (Balance's phase
never comes back: its requests wait for a lane). Requests with other request settings (mode,
budget, sampling) never share a cohort.

Everything here runs on the caller's thread (the server's generation worker): nothing is
shared between threads, and a cohort only computes when one of its rows is read.
"""

from __future__ import annotations

import dataclasses
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from .generation_config import GenerationConfig
from .generator import Generator, JoinTicket
from .segmenter import StreamEvent

__all__ = ["BatchScheduler", "Cohort", "JoinTicket", "RowRequest", "left_pad"]


@dataclass
class RowRequest:
    """One request's part of a cohort.

    Attributes:
        input_ids: ``[1, P]`` prompt ids.
        config: Its request settings (rows of one cohort have equal settings).
        prompt_embeds: ``[1, P, H]`` prompt embeddings for the backbone's prefill, or None.
    """

    input_ids: torch.Tensor
    config: GenerationConfig
    prompt_embeds: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.input_ids.ndim != 2 or self.input_ids.shape[0] != 1:
            raise ValueError(f"input_ids must be [1, P], got {tuple(self.input_ids.shape)}")
        if self.prompt_embeds is not None and self.prompt_embeds.shape[:2] != self.input_ids.shape:
            raise ValueError(
                f"prompt_embeds {tuple(self.prompt_embeds.shape)} must be [1, P, H] with "
                f"P = {self.input_ids.shape[1]}"
            )

    def fits_with(self, other: RowRequest) -> bool:
        """Whether both can share a cohort (equal settings, both or neither with embeddings)."""
        return self.config == other.config and (self.prompt_embeds is None) == (
            other.prompt_embeds is None
        )


def left_pad(
    requests: Sequence[RowRequest],
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Stack prompts of different lengths, left-padded.

    Returns:
        ``(input_ids [B, P], attention_mask [B, P] or None when no row is padded,
        prompt_embeds [B, P, H] or None)``.
    """
    p = max(r.input_ids.shape[1] for r in requests)
    ids = torch.zeros(len(requests), p, dtype=torch.long)
    mask = torch.zeros(len(requests), p, dtype=torch.long)
    embeds = None
    if requests[0].prompt_embeds is not None:
        e0 = requests[0].prompt_embeds
        embeds = e0.new_zeros(len(requests), p, e0.shape[-1])
    for i, r in enumerate(requests):
        n = r.input_ids.shape[1]
        ids[i, p - n :] = r.input_ids[0].cpu()
        mask[i, p - n :] = 1
        if embeds is not None:
            assert r.prompt_embeds is not None
            embeds[i, p - n :] = r.prompt_embeds[0]
    padded = bool((mask == 0).any())
    return ids, (mask if padded else None), embeds


class Cohort:
    """Rows generated together on one Generator; each row is read on its own, and waiting
    requests may join the running rows (:meth:`offer`).

    Args:
        generator: The lane (free: no call running on it).
        requests: One to ``generator.max_batch`` compatible requests (rows ``0 .. n - 1``).
        audio_chunk: Audio pieces of this many tokens inside long segments (None: segments).

    Raises:
        ValueError: On no requests, more than the lane's ``max_batch``, or incompatible ones.
    """

    def __init__(
        self,
        generator: Generator,
        requests: Sequence[RowRequest],
        *,
        audio_chunk: int | None = None,
    ) -> None:
        if not requests:
            raise ValueError("a cohort needs at least one request")
        if len(requests) > generator.max_batch:
            raise ValueError(
                f"{len(requests)} requests exceed the lane's max_batch={generator.max_batch}"
            )
        if not all(r.fits_with(requests[0]) for r in requests):
            raise ValueError("the requests of a cohort must have equal request settings")
        self.generator = generator
        self.first = requests[0]
        ids, mask, embeds = left_pad(requests)
        self._stream = generator.stream(
            ids.to(generator.device),
            attention_mask=None if mask is None else mask.to(generator.device),
            prompt_embeds=embeds,
            config=requests[0].config,
            audio_chunk=audio_chunk,
        )
        self._queues: list[deque[StreamEvent]] = [deque() for _ in range(generator.max_batch)]
        self._readers: set[int] = set(range(len(requests)))  # rows someone reads (or will)
        self._abandoned: set[int] = set()  # rows whose reader left before their end
        self._tickets: list[JoinTicket] = []
        self.rows = len(requests)
        self.finished = False

    def _advance(self) -> None:
        """One event of the shared stream (the generator computes when its queue is empty)."""
        ev = next(self._stream, None)
        if ev is None:
            self.finished = True
            return
        if ev.row in self._abandoned:  # nobody reads it; its end frees the row for a join
            if ev.kind == "end":
                self._abandoned.discard(ev.row)
            return
        self._queues[ev.row].append(ev)

    def offer(self, request: RowRequest) -> JoinTicket | None:
        """Let ``request`` join this running cohort at its next join point (a free row, the
        schedule's phase where a new row can start; see :meth:`mctp.Generator.offer_join`).

        Returns:
            A ticket (its ``row`` is set once joined, -1 if the cohort ended first), or None
            when it cannot join (other settings, ended, or every row taken).
        """
        taken = len(self._readers) + len(self._abandoned) + len(self._tickets)
        if (
            self.finished
            or not request.fits_with(self.first)
            or request.prompt_embeds is not None
            or taken >= self.generator.max_batch
        ):
            return None
        ticket = JoinTicket(request)
        self.generator.offer_join(ticket)
        self._tickets.append(ticket)
        return ticket

    def claim(self, ticket: JoinTicket) -> Iterator[StreamEvent]:
        """The events of a ticket's row once it joined.

        Raises:
            ValueError: If the ticket has not joined (yet).
        """
        if ticket.row is None or ticket.row < 0:
            raise ValueError("the ticket has not joined this cohort")
        self._tickets.remove(ticket)
        self._readers.add(ticket.row)
        return self.events(ticket.row)

    def pump(self) -> None:
        """Advance one event when no row is being read (requests waiting to join need the
        generation to reach its next join point)."""
        if not self.finished and not self._readers:
            self._advance()

    def settle(self) -> None:
        """Forget tickets that were refused (the cohort ended before they could join)."""
        self._tickets = [t for t in self._tickets if t.row != -1]

    def events(self, row: int) -> Iterator[StreamEvent]:
        """Row ``row``'s events (as ``row=0``), ending with its ``"end"``; reading them drives
        the cohort. Closing this iterator early abandons the row; the cohort stops when no
        row is read any more and no request waits to join.

        Raises:
            IndexError: On a row out of range.
        """
        if not 0 <= row < len(self._queues):
            raise IndexError(f"row {row} out of range for a cohort of {len(self._queues)}")
        return _RowEvents(self, row)

    def _row_events(self, row: int) -> Iterator[StreamEvent]:
        queue = self._queues[row]
        ended = False
        try:
            while True:
                while not queue:
                    if self.finished:
                        return
                    self._advance()
                ev = queue.popleft()
                yield dataclasses.replace(ev, row=0, result=None)
                if ev.kind == "end":
                    ended = True
                    return
        finally:
            self._release(row, ended)

    def _release(self, row: int, ended: bool) -> None:
        """The reader of ``row`` is gone. Events already queued past its ``"end"`` belong to
        the request that took the row next (a row is free once its end was produced, maybe
        before its reader read it), so only the old occupant's events are dropped."""
        self._readers.discard(row)
        queue = self._queues[row]
        if not ended:
            ends = [i for i, ev in enumerate(queue) if ev.kind == "end"]
            if ends:  # its end is queued already: drop up to it, keep the next occupant's
                for _ in range(ends[0] + 1):
                    queue.popleft()
            else:
                queue.clear()
                if not self.finished:
                    self._abandoned.add(row)
        if not self._readers and not self._tickets:
            self.close()

    def close(self) -> None:
        """Stop the generation (frees the lane)."""
        if not self.finished:
            self._stream.close()
            self.finished = True

    @property
    def busy(self) -> bool:
        """Whether the lane is still in use by this cohort."""
        if not self.finished and not self._readers and not self._tickets:
            self.close()
        return not self.finished


class _RowEvents:
    """A row's event iterator; closing it releases the row even before its first event."""

    def __init__(self, cohort: Cohort, row: int) -> None:
        self.cohort, self.row = cohort, row
        self._events = cohort._row_events(row)
        self._started = False

    def __iter__(self) -> _RowEvents:
        return self

    def __next__(self) -> StreamEvent:
        self._started = True
        return next(self._events)

    def close(self) -> None:
        """Abandon the row (the cohort stops once no row is read and no request waits)."""
        if self._started:
            self._events.close()
        else:
            self._started = True
            self._events.close()
            self.cohort._release(self.row, False)


class BatchScheduler:
    """Starts cohorts of compatible waiting requests on free lanes.

    Args:
        lanes: Generators of one engine (same backbone, stack and settings); each runs one
            cohort at a time.
        audio_chunk: Passed to every cohort.

    Raises:
        ValueError: On no lanes.
    """

    def __init__(self, lanes: Sequence[Generator], *, audio_chunk: int | None = None) -> None:
        if not lanes:
            raise ValueError("a scheduler needs at least one Generator")
        self.lanes = list(lanes)
        self.audio_chunk = audio_chunk
        self._cohorts: dict[int, Cohort] = {}

    @property
    def max_batch(self) -> int:
        """Rows per cohort."""
        return self.lanes[0].max_batch

    def free_lane(self) -> Generator | None:
        """A lane with no cohort running, or None."""
        for i, lane in enumerate(self.lanes):
            cohort = self._cohorts.get(i)
            if cohort is None or not cohort.busy:
                self._cohorts.pop(i, None)
                return lane
        return None

    def start(self, requests: Sequence[RowRequest]) -> list[Iterator[StreamEvent]]:
        """Start ``requests`` as one cohort on a free lane.

        Returns:
            Each request's event iterator, in order.

        Raises:
            RuntimeError: If no lane is free.
            ValueError: As :class:`Cohort`.
        """
        lane = self.free_lane()
        if lane is None:
            raise RuntimeError("no free lane: wait until a cohort ends")
        cohort = Cohort(lane, requests, audio_chunk=self.audio_chunk)
        self._cohorts[self.lanes.index(lane)] = cohort
        return [cohort.events(r) for r in range(cohort.rows)]

    def offer(self, request: RowRequest) -> tuple[Cohort, JoinTicket] | None:
        """Offer ``request`` to the running cohorts (the one with the most free rows first).

        Returns:
            ``(cohort, ticket)`` when a cohort took the offer, else None.
        """
        running = [c for c in self._cohorts.values() if c.busy]
        running.sort(key=lambda c: len(c._readers) + len(c._tickets))
        for cohort in running:
            ticket = cohort.offer(request)
            if ticket is not None:
                return cohort, ticket
        return None

    @staticmethod
    def pick(waiting: Sequence[RowRequest], limit: int) -> list[int]:
        """Indices of the requests that start together: the oldest one and, in order, every
        later one that fits with it, up to ``limit``."""
        if not waiting:
            return []
        first = waiting[0]
        out = [0]
        for i in range(1, len(waiting)):
            if len(out) >= limit:
                break
            if waiting[i].fits_with(first):
                out.append(i)
        return out
