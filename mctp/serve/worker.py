"""One generation worker for the server: a bounded queue of jobs, run one at a time.

Every request becomes a :class:`Job`; a single thread runs the jobs in order (the model and
its caches are used by one request at a time), so concurrent clients queue instead of
fighting over the CPU/GPU. When ``max_queue`` jobs are waiting, :meth:`GenerationWorker.submit`
raises :class:`QueueFull` (the server answers 503). A job whose client went away is cancelled:
a waiting job is skipped, a running one stops at its next chunk, and the worker moves on.
"""

from __future__ import annotations

import itertools
import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

__all__ = ["GenerationWorker", "Job", "QueueFull"]

_DONE = object()


class QueueFull(RuntimeError):
    """The worker's queue is full (the server answers 503)."""


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


class GenerationWorker:
    """Runs jobs one at a time on a background thread, with a bounded waiting queue.

    Args:
        max_queue: Jobs that may wait (besides the running one) before :meth:`submit` refuses.

    Raises:
        ValueError: If ``max_queue < 1``.
    """

    def __init__(self, max_queue: int = 8) -> None:
        if max_queue < 1:
            raise ValueError(f"max_queue must be >= 1, got {max_queue}")
        self.max_queue = max_queue
        self._queue: queue.Queue[Job | None] = queue.Queue(maxsize=max_queue)
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self.running: Job | None = None
        self.completed = 0
        self.cancelled = 0
        self.failed = 0
        self._thread = threading.Thread(target=self._loop, name="mctp-generation", daemon=True)
        self._thread.start()

    @property
    def waiting(self) -> int:
        """Jobs in the queue (not counting the running one)."""
        return self._queue.qsize()

    @property
    def busy(self) -> bool:
        """Whether a job is running."""
        return self.running is not None

    def submit(self, run: Callable[[], Iterator[Any]], sink: Callable[[Any], None]) -> Job:
        """Queue a job.

        Raises:
            QueueFull: If ``max_queue`` jobs are already waiting.
        """
        job = Job(run=run, sink=sink, id=next(self._ids))
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            raise QueueFull(
                f"the server is busy: {self.max_queue} requests are waiting; retry later"
            ) from None
        return job

    def close(self, timeout: float = 5.0) -> None:
        """Stop the thread after the jobs already queued."""
        self._queue.put(None)
        self._thread.join(timeout)

    def _loop(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            if job.cancelled.is_set():
                self.cancelled += 1
                continue
            self.running = job
            error: Exception | None = None
            try:
                items = job.run()
                for item in items:
                    if job.cancelled.is_set():
                        close = getattr(items, "close", None)
                        if close is not None:
                            close()
                        break
                    job.sink(item)
            except Exception as e:  # handed to the request that caused it
                error = e
            # the worker is free (and counted) before the request hears that it is done
            self.running = None
            if error is not None:
                self.failed += 1
                job.sink(error)
            elif job.cancelled.is_set():
                self.cancelled += 1
            else:
                self.completed += 1
                job.sink(Job.DONE)
