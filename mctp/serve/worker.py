"""The server's generation worker: a bounded queue, and one thread that runs many jobs at once.

Every request becomes a :class:`Job`. A single thread owns the model and its caches. A job's
function runs on that thread (a :class:`Preparation`, which only prepares a request, may run on
a preparation thread instead) and returns either an iterator of items (run in turns with the
other jobs) or a request the worker's *batcher* accepts (e.g. a prepared
:class:`~mctp.speech.SpeechRequest`): waiting requests that fit together start as one batch on
a free Generator, each gets its own item iterator, and every running job advances one item per
turn, so that concurrent clients are generated together instead of one after another. When
``max_queue`` jobs are waiting, :meth:`GenerationWorker.submit` raises :class:`QueueFull` (the
server answers 503). A job whose client went away is cancelled: a waiting job is skipped, a
running one stops at its next item.
"""

from __future__ import annotations

import collections
import itertools
import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

__all__ = ["Batcher", "GenerationWorker", "Job", "Preparation", "QueueFull"]

log = logging.getLogger(__name__)

_DONE = object()
_FIRST_ITEMS_PER_TURN = 16  # a job waiting for its first answer takes at most this many a turn


class QueueFull(RuntimeError):
    """The worker's queue is full (the server answers 503)."""


class Preparation:
    """A job function that only prepares its request (decoding and encoding the question's
    audio, rendering and tokenizing the prompt) and returns it for the batcher: no generation
    and nothing owned by the generation thread. A :class:`GenerationWorker` with preparation
    threads runs such jobs there, so that a long question's encoding never stalls the answers
    being generated (one without runs them on its generation thread, as any job).

    Args:
        fn: The function; returns what the job's function returns.
    """

    __slots__ = ("fn",)

    def __init__(self, fn: Callable[[], Any]) -> None:
        self.fn = fn

    def __call__(self) -> Any:
        return self.fn()


@dataclass
class Job:
    """One request: a function returning an iterator of items, and the items it produced.

    Attributes:
        run: Called on the worker thread; returns the item iterator (e.g. speech chunks).
        id: Sequential id.
        cancelled: Set by the client side to abandon the job.
        sink: Called on the worker thread with each item, then with ``Job.DONE``, or with an
            exception raised by ``run``.
    """

    run: Callable[[], Iterator[Any]]
    sink: Callable[[Any], None]
    id: int = 0
    cancelled: threading.Event = field(default_factory=threading.Event)

    DONE = _DONE

    def cancel(self) -> None:
        """Abandon the job (the worker stops it at its next item)."""
        self.cancelled.set()


class Batcher(Protocol):
    """What the worker needs to batch requests (:class:`mctp.speech.SpeechBatcher`)."""

    max_batch: int

    def accepts(self, request: Any) -> bool:
        """Whether ``request`` (what a job's function returned) is batched."""
        ...

    def pick(self, requests: Sequence[Any]) -> list[int]:
        """Indices of the waiting ``requests`` (oldest first) that start together as one
        batch: the oldest and those that fit with it, at most ``max_batch``."""
        ...

    def can_start(self) -> bool:
        """Whether a batch can start now (a Generator is free)."""
        ...

    def start(self, requests: Sequence[Any]) -> list[Iterator[Any]]:
        """Start ``requests`` together; one item iterator per request, in order."""
        ...

    def offer(self, request: Any) -> Any | None:
        """Let ``request`` join a running batch; a handle with ``joined``, ``refused`` and
        ``start()``, or None."""
        ...


class GenerationWorker:
    """Runs jobs on one background thread, batching what its batcher accepts, with a bounded
    waiting queue.

    Args:
        max_queue: Jobs that may wait (not yet running) before :meth:`submit` refuses.
        batcher: Groups accepted requests into batches (None: every job's function must
            return an iterator; jobs still run in turns).
        turn: Called around every item a running job produces (e.g. the pipeline's torch
            thread setting), as a context manager factory; None for none.
        first: Which item counts as a job's first answer (e.g. its first audio chunk; default
            any item). Jobs that have not produced it go first in every turn and keep the turn
            until they do, so a request that just started or joined reaches its first answer
            in as few turns as the generation allows; the others' items are computed in the
            same batched steps and wait in their queues meanwhile.
        prepare: Threads that run :class:`Preparation` jobs (preparation threads) instead of
            the generation thread; 0: none (other jobs' functions always run on the generation
            thread). With two or more, a short request is not held behind a long question's
            encoding. The threads share Python's interpreter lock: preparing runs beside the
            generation where either waits in native code (torch's operations, a codec's
            encoder).

    Raises:
        ValueError: If ``max_queue < 1`` or ``prepare < 0``.
    """

    def __init__(
        self,
        max_queue: int = 8,
        *,
        batcher: Batcher | None = None,
        turn: Callable[[], Any] | None = None,
        first: Callable[[Any], bool] | None = None,
        prepare: int = 0,
    ) -> None:
        if max_queue < 1:
            raise ValueError(f"max_queue must be >= 1, got {max_queue}")
        if prepare < 0:
            raise ValueError(f"prepare must be >= 0 threads, got {prepare}")
        self.max_queue = max_queue
        self.batcher = batcher
        self._turn = turn
        self._first = first
        self._answered: set[int] = set()  # ids of running jobs that produced their first answer
        self._queue: collections.deque[Job] = collections.deque()
        # jobs taken from the queue whose function runs now (counted as waiting: without them
        # the queue's bound would let one more in while a job is being admitted)
        self._admitting = 0
        # Preparation jobs: queued for the preparation thread, being prepared there, prepared
        # (with what their function returned or raised) and not taken by the generation thread
        self._to_prepare: collections.deque[Job] = collections.deque()
        self._preparing = 0
        self._prepared: collections.deque[tuple[Job, Any, Exception | None]] = collections.deque()
        lock = threading.RLock()
        self._cond = threading.Condition(lock)  # the generation thread waits on it
        self._prep_cond = threading.Condition(lock)  # the preparation thread waits on it
        self._closing = False
        self._ids = itertools.count(1)
        self._active: list[tuple[Job, Iterator[Any]]] = []
        self._waiting: list[tuple[Job, Any]] = []  # accepted requests not started yet
        self._joining: list[tuple[Job, Any, Any]] = []  # (job, request, join handle)
        self.joined = 0
        self.completed = 0
        self.cancelled = 0
        self.failed = 0
        self.batches = 0
        self.max_rows_seen = 0
        self._in_between = False
        self._admitted: list[tuple[Job, Iterator[Any]]] = []  # unbatched jobs admitted in a turn
        if batcher is not None and hasattr(batcher, "between"):
            batcher.between = self._between_events  # type: ignore[attr-defined]
        self._thread = threading.Thread(target=self._loop, name="mctp-generation", daemon=True)
        self._thread.start()
        self._prep_threads = [
            threading.Thread(target=self._prepare_loop, name=f"mctp-preparation-{i}", daemon=True)
            for i in range(prepare)
        ]
        for t in self._prep_threads:
            t.start()

    @property
    def waiting(self) -> int:
        """Jobs not running yet (queued, being prepared or admitted, prepared and waiting, or
        waiting to join a batch)."""
        return (
            len(self._queue)
            + len(self._to_prepare)
            + self._preparing
            + len(self._prepared)
            + self._admitting
            + len(self._waiting)
            + len(self._joining)
        )

    @property
    def _arrived(self) -> bool:
        """Whether jobs wait for the generation thread to admit them (queued, or prepared)."""
        return bool(self._queue or self._prepared)

    @property
    def prepares(self) -> int:
        """Threads that run :class:`Preparation` jobs (0: the generation thread runs them)."""
        return len(self._prep_threads)

    @property
    def running(self) -> int:
        """Jobs producing items now."""
        return len(self._active)

    @property
    def busy(self) -> bool:
        """Whether a job is running."""
        return bool(self._active)

    @property
    def active_jobs(self) -> list[Job]:
        """The jobs producing items now."""
        return [job for job, _ in self._active]

    def submit(self, run: Callable[[], Any], sink: Callable[[Any], None]) -> Job:
        """Queue a job.

        Raises:
            QueueFull: If ``max_queue`` jobs are already waiting.
        """
        job = Job(run=run, sink=sink, id=next(self._ids))
        with self._cond:
            if self.waiting >= self.max_queue:
                raise QueueFull(
                    f"the server is busy: {self.max_queue} requests are waiting; retry later"
                )
            if self._prep_threads and isinstance(run, Preparation):
                self._to_prepare.append(job)
                self._prep_cond.notify()
            else:
                self._queue.append(job)
                self._cond.notify()
        return job

    def close(self, timeout: float = 5.0) -> None:
        """Stop the threads after the jobs already queued."""
        with self._cond:
            self._closing = True
            self._cond.notify()
            self._prep_cond.notify_all()
        for t in self._prep_threads:
            t.join(timeout)
        self._thread.join(timeout)

    # ------------------------------------------------------------------ the preparation thread
    def _prepare_loop(self) -> None:
        """A preparation thread: run Preparation jobs' functions (oldest first) and hand the
        results to the generation thread (a job cancelled before its turn is handed over
        unprepared)."""
        while True:
            with self._cond:
                while not self._to_prepare:
                    if self._closing:
                        return
                    self._prep_cond.wait()
                job = self._to_prepare.popleft()
                self._preparing += 1
            out, error = None, None
            try:
                if not job.cancelled.is_set():
                    out = job.run()
            except Exception as e:  # handed to the request that caused it
                error = e
            except BaseException as e:  # (e.g. SystemExit) this thread must outlive it
                error = RuntimeError(f"preparing the request raised {type(e).__name__}: {e}")
            with self._cond:  # prepared and no longer being prepared, in one step
                self._preparing -= 1
                self._prepared.append((job, out, error))
                self._cond.notify()

    # ------------------------------------------------------------------ the thread
    def _loop(self) -> None:
        while True:
            with self._cond:
                while not (self._arrived or self._active or self._waiting or self._joining):
                    if self._closing and not (self._to_prepare or self._preparing):
                        return
                    self._cond.wait()
                new = self._take_queued()
            try:
                for job, prepared in new:
                    self._admit(job, prepared)
                self._offer_joins()  # a running batch with room first: its steps are shared
                self._start_batches()
                self._turns()
                self._settle_joins()
            except Exception as e:  # a fault of the worker itself: fail its jobs, keep serving
                log.exception("generation worker fault; failing the requests it held")
                self._fail_all(e)

    def _between_events(self) -> None:
        """Called by a running batch between two of its events (on this thread, the batch
        suspended): jobs that arrived meanwhile are admitted and offered to the running
        batches now, not after the item being produced, so that they reach the next join
        point. Batches are not started here (that happens between turns)."""
        if self._in_between or not self._arrived:
            return
        self._in_between = True
        try:
            self._admit_arrivals()
        finally:
            self._in_between = False

    def _admit_arrivals(self) -> None:
        """Admit the jobs queued now and offer them to the running batches."""
        with self._cond:
            new = self._take_queued()
        for job, prepared in new:
            self._admit(job, prepared)
        self._offer_joins()

    def _fail_all(self, error: Exception) -> None:
        """Hand ``error`` to every job the worker holds and forget them (their batches are
        closed), so that a fault never leaves a client waiting."""
        held = [job for job, _ in self._active] + [job for job, _ in self._waiting]
        held += [job for job, _, _ in self._joining]
        for _, items in self._active:
            close = getattr(items, "close", None)
            if close is not None:
                try:
                    close()
                except Exception:  # already broken; the error is reported below
                    log.exception("closing a failed job's items")
        self._active, self._waiting, self._joining = [], [], []
        with self._cond:  # (called from the top of the loop: no admission runs now)
            self._admitting = 0
        self._answered.clear()
        for job in held:
            self._fail(job, error)

    def _take_queued(self) -> list[tuple[Job, tuple[Any, Exception | None] | None]]:
        """Empty the queue and take the prepared jobs (the caller holds the lock), in the
        order they came: ``(job, None)`` for a job whose function runs here, ``(job, (out,
        error))`` for a prepared one. The jobs count as waiting until :meth:`_admit` placed
        each."""
        new: list[tuple[Job, tuple[Any, Exception | None] | None]] = [
            (job, None) for job in self._queue
        ]
        new += [(job, (out, error)) for job, out, error in self._prepared]
        new.sort(key=lambda entry: entry[0].id)
        self._queue.clear()
        self._prepared.clear()
        self._admitting += len(new)
        return new

    def _admit(self, job: Job, prepared: tuple[Any, Exception | None] | None = None) -> None:
        """Place what a job's function returned (from :meth:`_take_queued`; run here unless
        ``prepared`` holds its result or error); the job stops counting as being admitted
        when it is placed, cancelled or failed."""
        placed = False
        try:
            if job.cancelled.is_set():
                self.cancelled += 1
                return
            try:
                if prepared is None:
                    out = job.run()
                else:
                    out, error = prepared
                    if error is not None:
                        raise error
                batched = self.batcher is not None and self.batcher.accepts(out)
                items = None if batched else iter(out)
            except Exception as e:  # handed to the request that caused it
                self._fail(job, e)
                return
            with self._cond:  # placed and no longer being admitted, in one step
                if items is None:
                    self._waiting.append((job, out))
                else:
                    entry = (job, items)
                    self._active.append(entry)
                    self._admitted.append(entry)  # kept by a turn running now (see _turns)
                self._admitting -= 1
                placed = True
        finally:
            if not placed:
                with self._cond:
                    self._admitting -= 1

    def _start_batches(self) -> None:
        b = self.batcher
        while b is not None and self._waiting:
            self._waiting = [(j, r) for j, r in self._waiting if not self._drop_cancelled(j)]
            if not self._waiting or not b.can_start():
                return
            picked = b.pick([r for _, r in self._waiting])
            jobs = [self._waiting[i] for i in picked]
            for i in reversed(picked):
                del self._waiting[i]
            try:
                iterators = b.start([r for _, r in jobs])
            except Exception as e:
                for job, _ in jobs:
                    self._fail(job, e)
                continue
            self.batches += 1
            self.max_rows_seen = max(self.max_rows_seen, len(jobs))
            self._active.extend((job, it) for (job, _), it in zip(jobs, iterators))

    def _offer_joins(self) -> None:
        """Requests that found no free Generator join a running batch at its next join point."""
        b = self.batcher
        if b is None or not self._waiting:
            return
        still = []
        for job, req in self._waiting:
            try:
                handle = b.offer(req)
            except Exception as e:  # handed to the request that caused it
                self._fail(job, e)
                continue
            if handle is None:
                still.append((job, req))
            else:
                self._joining.append((job, req, handle))
        self._waiting = still

    def _settle_joins(self, poll: bool = True) -> list[tuple[Job, Iterator[Any]]]:
        """Joined requests start producing; refused ones wait again (first in line).

        Args:
            poll: Drive the batches of requests still waiting to join when nobody reads them.

        Returns:
            The jobs that joined now (also added to the running jobs).
        """
        pending, back, joined = [], [], []
        for job, req, handle in self._joining:
            if job.cancelled.is_set() and not handle.joined:
                pending.append((job, req, handle))  # left in the ticket; dropped when settled
                if handle.refused:
                    pending.pop()
                    self.cancelled += 1
                continue
            if handle.joined:
                try:
                    items = handle.start()
                except Exception as e:  # handed to the request that caused it
                    self._fail(job, e)
                    continue
                self.joined += 1
                joined.append((job, items))
            elif handle.refused:
                back.append((job, req))
            else:
                if poll:
                    handle.poll()
                pending.append((job, req, handle))
        self._joining = pending
        self._waiting = back + self._waiting
        self._active.extend(joined)
        return joined

    def _fail(self, job: Job, error: Exception) -> None:
        """Hand ``error`` to the job it belongs to (its request answers with it), counted."""
        self.failed += 1
        job.sink(error)

    def _drop_cancelled(self, job: Job) -> bool:
        if job.cancelled.is_set():
            self.cancelled += 1
            return True
        return False

    def _turns(self) -> None:
        """Every running job produces one item (or ends); jobs still waiting for their first
        answer go first and produce items until they have it (at most
        ``_FIRST_ITEMS_PER_TURN``: a text-only answer does not hold the turn to its end)."""
        fresh = [(j, it) for j, it in self._active if j.id not in self._answered]
        rest = [(j, it) for j, it in self._active if j.id in self._answered]
        turn = collections.deque(fresh + rest)
        still: list[tuple[Job, Iterator[Any]]] = []
        self._admitted = []
        while turn:
            job, items = turn.popleft()
            if self._arrived:  # arrived during the turn: offered to a running batch at once
                self._admit_arrivals()
            for n in range(1, _FIRST_ITEMS_PER_TURN + 1):
                item = self._item(job, items)
                if item is _DONE:
                    self._answered.discard(job.id)
                    break
                if job.id in self._answered:
                    still.append((job, items))
                    break
                if self._first is None or self._first(item):
                    self._answered.add(job.id)
                if job.id in self._answered or n == _FIRST_ITEMS_PER_TURN:
                    still.append((job, items))
                    break
            if self._joining:  # joined during that item: its first answer comes next
                turn.extendleft(reversed(self._settle_joins(poll=False)))
        # unbatched jobs admitted during the turn (between items or a batch's events) run
        # from the next turn on
        self._active = still + self._admitted
        self._admitted = []

    def _item(self, job: Job, items: Iterator[Any]) -> Any:
        """The job's next item, handed to its sink; ``_DONE`` when it ended (finished,
        failed or cancelled)."""
        if job.cancelled.is_set():
            close = getattr(items, "close", None)
            if close is not None:
                close()
            self.cancelled += 1
            return _DONE
        try:
            if self._turn is None:
                item = next(items)
            else:
                with self._turn():
                    item = next(items)
        except StopIteration:
            self.completed += 1
            job.sink(Job.DONE)
            return _DONE
        except Exception as e:  # handed to the request that caused it
            self._fail(job, e)
            return _DONE
        job.sink(item)
        return item
