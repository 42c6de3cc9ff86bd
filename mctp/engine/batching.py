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
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch

from .generation_config import GenerationConfig, slots_needed
from .generator import Generator, JoinTicket
from .segmenter import StreamEvent

__all__ = ["BatchScheduler", "Cohort", "JoinTicket", "RowRequest", "left_pad"]


@dataclass(eq=False)  # compared by identity (tensors have no truth value)
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
    requests: Sequence[RowRequest], width: int = 0
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Stack prompts of different lengths, left-padded.

    Args:
        requests: The rows.
        width: Pad to at least this many columns (columns that are padding in every row: a
            cohort's room for joining prompts).

    Returns:
        ``(input_ids [B, P], attention_mask [B, P] or None when no row is padded,
        prompt_embeds [B, P, H] or None)``.
    """
    p = max(width, *(r.input_ids.shape[1] for r in requests))
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


class _Seat:
    """One request's place in a row: the events routed to it, and whether it is read.

    A row holds several requests one after another (a request joins a row once the previous
    occupant's ``"end"`` was produced), so events are queued per seat, never per row: the
    next occupant never sees its predecessor's unread events.
    """

    __slots__ = ("abandoned", "ended", "queue")

    def __init__(self) -> None:
        self.queue: deque[StreamEvent] = deque()
        self.ended = False  # its "end" was produced (the row is free for the next occupant)
        self.abandoned = False  # its reader left before the end: its events are dropped


class Cohort:
    """Rows generated together on one Generator; each row is read on its own, and waiting
    requests may join the running rows (:meth:`offer`).

    Args:
        generator: The lane (free: no call running on it).
        requests: One to ``generator.max_batch`` compatible requests (rows ``0 .. n - 1``).
        audio_chunk: Audio pieces of this many tokens inside long segments (None: segments).
        between: Called after every event the stream produces, while it is suspended (the
            server's worker admits requests that arrived meanwhile and offers them to the
            running cohorts there, so that they need not wait for the answer being read to
            reach its next chunk); it may call :meth:`offer`, never read rows.

    Raises:
        ValueError: On no requests, more than the lane's ``max_batch``, or incompatible ones.
    """

    def __init__(
        self,
        generator: Generator,
        requests: Sequence[RowRequest],
        *,
        audio_chunk: int | None = None,
        between: Callable[[], None] | None = None,
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
        self.between = between
        ids, mask, embeds = left_pad(requests, self._room(generator, requests))
        self._stream = generator.stream(
            ids.to(generator.device),
            attention_mask=None if mask is None else mask.to(generator.device),
            prompt_embeds=embeds,
            config=requests[0].config,
            audio_chunk=audio_chunk,
        )
        # the seat each row's events go to now (None: the row has no occupant)
        self._rows: list[_Seat | None] = [None] * generator.max_batch
        self._initial = [_Seat() for _ in requests]
        self._rows[: len(requests)] = self._initial
        self._reading = len(requests)  # seats that are read, or will be (not released yet)
        self._tickets: list[JoinTicket] = []  # offered, not claimed yet
        self._joined: dict[int, _Seat] = {}  # id(ticket) -> its seat (joined, not claimed)
        self._successor: dict[int, _Seat] = {}  # row -> claimed seat whose turn comes next
        self.rows = len(requests)
        self.finished = False

    @staticmethod
    def _room(generator: Generator, requests: Sequence[RowRequest]) -> int:
        """The least prompt width the cohort starts with (``EngineConfig.join_room``), so
        that prompts up to that long can join at once: at most half the slots an answer's
        budget leaves free (the rest stays for joins, each of which needs a whole budget
        after the cursor); no room where nothing can join (one row, prompt embeddings), the
        padding would be computed (a cache not indexed by slot) or read (a path whose
        attention reads every slot: whole compiled graphs, a backbone that cannot skip
        slots; see ``key_window``)."""
        first = requests[0]
        engine = generator.engine
        if (
            generator.max_batch < 2
            or not engine.join_room
            or first.prompt_embeds is not None
            or not generator.state.narrowable
            or not generator.path.key_window
        ):
            return 0
        heads = 0 if generator.stack is None else generator.stack.num_heads
        need = slots_needed(first.config, 0, first.config.max_new_tokens, heads, engine)
        return min(engine.join_room, max(generator.max_len - need, 0) // 2)

    def _seat_of_next(self, row: int) -> _Seat:
        """The seat of the request that joined ``row`` after its occupant ended."""
        if row in self._successor:
            return self._successor.pop(row)
        for ticket in self._tickets:
            if ticket.row == row and id(ticket) not in self._joined:
                seat = self._joined[id(ticket)] = _Seat()
                return seat
        raise RuntimeError(f"an event for row {row}, which no request occupies")

    def _advance(self) -> None:
        """One event of the shared stream, routed to its row's current seat (the generator
        computes when its queue is empty)."""
        ev = next(self._stream, None)
        if ev is None:
            self.finished = True
            return
        seat = self._rows[ev.row]
        if seat is None or seat.ended:  # the row's next occupant speaks
            seat = self._rows[ev.row] = self._seat_of_next(ev.row)
        if ev.kind == "end":
            seat.ended = True
        if not seat.abandoned:
            seat.queue.append(ev)
        if self.between is not None:
            self.between()

    def _prune(self) -> None:
        """Forget tickets the stream refused (it ended before they could join)."""
        if any(t.row == -1 for t in self._tickets):
            self._tickets = [t for t in self._tickets if t.row != -1]

    @property
    def load(self) -> int:
        """Rows taken or promised: occupants still generating plus requests waiting to join."""
        self._prune()
        busy = sum(1 for s in self._rows if s is not None and not s.ended)
        return busy + sum(1 for t in self._tickets if t.row is None)

    def offer(self, request: RowRequest) -> JoinTicket | None:
        """Let ``request`` join this running cohort at its next join point (a free row, the
        schedule's phase where a new row can start; see :meth:`mctp.Generator.offer_join`).

        Returns:
            A ticket (its ``row`` is set once joined, -1 if the cohort ended first), or None
            when it cannot join (other settings, ended, not started yet, every row taken, or
            a prompt longer than the running sequence so far).
        """
        if (
            self.finished
            or not self.generator.accepts_joins  # not started yet, or past its last step
            or not request.fits_with(self.first)
            or request.prompt_embeds is not None
            or self.load >= self.generator.max_batch
            # its prompt must fit before the cursor (see _Run.try_join); a longer one would
            # wait here for the sequence to grow while a free lane could start it now
            or request.input_ids.shape[1] > self.generator.buffer.length - 1
        ):
            return None
        ticket = JoinTicket(request)
        self.generator.offer_join(ticket)
        self._tickets.append(ticket)
        return ticket

    def claim(self, ticket: JoinTicket) -> Iterator[StreamEvent]:
        """The events of a ticket's request once it joined.

        Raises:
            ValueError: If the ticket has not joined (yet).
        """
        if ticket.row is None or ticket.row < 0 or ticket not in self._tickets:
            raise ValueError("the ticket has not joined this cohort")
        seat = self._joined.pop(id(ticket), None)
        if seat is None:  # joined, but no event of its row was read yet
            seat = _Seat()
            prev = self._rows[ticket.row]
            if prev is None or prev.ended:
                self._rows[ticket.row] = seat
            else:  # its predecessor's end is still to come out of the stream
                self._successor[ticket.row] = seat
        self._tickets.remove(ticket)
        self._reading += 1
        return _RowEvents(self, seat)

    def pump(self) -> None:
        """Advance one event when no row is being read (requests waiting to join need the
        generation to reach its next join point)."""
        if not self.finished and not self._reading:
            self._advance()

    def events(self, row: int) -> Iterator[StreamEvent]:
        """The events of the request the cohort started in row ``row`` (as ``row=0``),
        ending with its ``"end"``; reading them drives the cohort. Closing this iterator
        early abandons the row; the cohort stops when no row is read any more and no
        request waits to join.

        Raises:
            IndexError: On a row out of range.
        """
        if not 0 <= row < len(self._initial):
            raise IndexError(f"row {row} out of range for a cohort of {len(self._initial)}")
        return _RowEvents(self, self._initial[row])

    def _seat_events(self, seat: _Seat) -> Iterator[StreamEvent]:
        queue = seat.queue
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
            self._release(seat, ended)

    def _release(self, seat: _Seat, ended: bool) -> None:
        """The reader of ``seat`` is gone: drop what it did not read, and drop its events to
        come (its row's next occupant has a seat of its own)."""
        self._reading -= 1
        if not ended:
            seat.queue.clear()
            seat.abandoned = True
        self._prune()
        if not self._reading and not self._tickets:
            self.close()

    def close(self) -> None:
        """Stop the generation (frees the lane)."""
        if not self.finished:
            self._stream.close()
            self.finished = True

    @property
    def busy(self) -> bool:
        """Whether the lane is still in use by this cohort."""
        self._prune()
        if not self.finished and not self._reading and not self._tickets:
            self.close()
        return not self.finished


class _RowEvents:
    """A seat's event iterator; closing it releases the seat even before its first event."""

    def __init__(self, cohort: Cohort, seat: _Seat) -> None:
        self.cohort, self.seat = cohort, seat
        self._events = cohort._seat_events(seat)
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
            self.cohort._release(self.seat, False)


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
        #: given to every cohort started from now on (see :class:`Cohort`)
        self.between: Callable[[], None] | None = None
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
        cohort = Cohort(lane, requests, audio_chunk=self.audio_chunk, between=self.between)
        self._cohorts[self.lanes.index(lane)] = cohort
        return [cohort.events(r) for r in range(cohort.rows)]

    def offer(self, request: RowRequest) -> tuple[Cohort, JoinTicket] | None:
        """Offer ``request`` to the running cohorts (the one with the most free rows first).

        Returns:
            ``(cohort, ticket)`` when a cohort took the offer, else None.
        """
        running = [c for c in self._cohorts.values() if c.busy]
        running.sort(key=lambda c: c.load)
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
