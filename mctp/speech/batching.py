"""``SpeechBatcher``: the server's worker batches prepared speech requests through it."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from .pipeline import SpeechPipeline, SpeechRequest

__all__ = ["SpeechBatcher"]


class SpeechBatcher:
    """Runs :class:`SpeechRequest` of one pipeline in cohorts on its Generators.

    Args:
        pipeline: The pipeline; its :attr:`~SpeechPipeline.engine` gives each Generator
            ``max_batch`` rows.
        lanes: Generators (each runs one cohort at a time; a request arriving while every
            lane is busy waits for the first cohort to end, or joins a running one).
        joins: Let waiting requests join running cohorts in rows freed by answers that
            ended (each joined request still gets exactly its answer alone).

    Raises:
        ValueError: If ``lanes < 1``.
    """

    def __init__(self, pipeline: SpeechPipeline, lanes: int = 2, *, joins: bool = True) -> None:
        from mctp.engine.batching import BatchScheduler

        if lanes < 1:
            raise ValueError(f"lanes must be >= 1, got {lanes}")
        self.pipeline = pipeline
        self.scheduler = BatchScheduler(
            pipeline.generators(lanes), audio_chunk=pipeline.audio_chunk
        )
        self.max_batch = self.scheduler.max_batch
        self.joins = joins

    @property
    def between(self) -> Callable[[], None] | None:
        """Called by running cohorts between their events (the server's worker admits and
        offers new requests there; see :class:`mctp.engine.batching.Cohort`)."""
        return self.scheduler.between

    @between.setter
    def between(self, fn: Callable[[], None] | None) -> None:
        self.scheduler.between = fn

    def accepts(self, request: Any) -> bool:
        """Whether ``request`` is a prepared :class:`SpeechRequest`."""
        return isinstance(request, SpeechRequest)

    def pick(self, requests: Sequence[SpeechRequest]) -> list[int]:
        """Indices of the waiting ``requests`` that start as one cohort: the oldest and every
        later one with equal request settings, at most ``max_batch``
        (:meth:`~mctp.engine.batching.BatchScheduler.pick`)."""
        return self.scheduler.pick([r.row for r in requests], self.max_batch)

    def can_start(self) -> bool:
        """Whether a Generator is free."""
        return self.scheduler.free_lane() is not None

    def offer(self, request: SpeechRequest) -> _Joining | None:
        """Let ``request`` join a running cohort at its next join point.

        Returns:
            A handle (``joined``, ``refused``, ``start()``), or None when no cohort took it.
        """
        if not self.joins:
            return None
        got = self.scheduler.offer(request.row)
        return None if got is None else _Joining(self.pipeline, request, *got)

    def start(self, requests: Sequence[SpeechRequest]) -> list[Iterator[Any]]:
        """Start ``requests`` as one cohort; each gets its chunk iterator.

        Raises:
            RuntimeError: If no Generator is free.
        """
        began = time.perf_counter()
        events = self.scheduler.start([r.row for r in requests])
        for r in requests:
            r.began = began
        return [_Answer(self.pipeline, r, ev) for r, ev in zip(requests, events)]


class _Joining:
    """A request waiting in a running cohort for its join point."""

    def __init__(self, pipeline: SpeechPipeline, request: SpeechRequest, cohort: Any, ticket: Any):
        self.pipeline, self.request, self.cohort, self.ticket = pipeline, request, cohort, ticket

    @property
    def joined(self) -> bool:
        """Whether it has a row now."""
        return self.ticket.row is not None and self.ticket.row >= 0

    @property
    def refused(self) -> bool:
        """Whether the cohort ended before it could join (start it elsewhere)."""
        return self.ticket.row == -1

    def poll(self) -> None:
        """Drive the cohort one event when nobody reads it (so that the join point comes)."""
        self.cohort.pump()

    def start(self) -> Iterator[Any]:
        """Its chunk iterator (once joined)."""
        self.request.began = self.ticket.joined_at
        return _Answer(self.pipeline, self.request, self.cohort.claim(self.ticket))


class _Answer:
    """A request's chunk iterator whose :meth:`close` also gives its row back, even when no
    chunk was asked for yet (closing a generator that never started runs none of its code,
    so the row would stay taken and its cohort would never end)."""

    def __init__(self, pipeline: SpeechPipeline, request: SpeechRequest, events: Any) -> None:
        self._events = events
        self._chunks = pipeline.answer(request, events)

    def __iter__(self) -> _Answer:
        return self

    def __next__(self) -> Any:
        return next(self._chunks)

    def close(self) -> None:
        """Stop the answer and release its row."""
        self._chunks.close()
        self._events.close()
