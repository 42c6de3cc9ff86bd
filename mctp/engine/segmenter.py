"""From generated tokens to typed stream events: text tokens, audio segments, one end per row.

:class:`StreamSegmenter` is pure bookkeeping (no model, no tensors): feed it each row's new
token ids as they appear and it returns the events they complete. The generator drives it;
so can a server replaying stored ids.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from .result import GenerationResult
    from .sampling import SpeechIds

__all__ = ["EventKind", "StreamEvent", "StreamSegmenter"]

EventKind = Literal["text", "audio", "end"]


@dataclass
class StreamEvent:
    """One item of :func:`mctp.generate_stream` / :meth:`mctp.Generator.stream`.

    Attributes:
        kind: ``"text"`` (text token ids, stop id included), ``"audio"`` (one complete audio
            segment, or a piece of ``audio_chunk`` tokens when set) or ``"end"`` (the row
            stopped or reached ``max_new_tokens``; ``ids`` empty). Every row gets exactly one
            ``"end"``, after all of its other events.
        row: Batch row.
        ids: Token ids (for audio: the audio token ids without BOA/EOA).
        time_s: Seconds since the call started.
        forwards: Backbone forwards run so far (the prefill counts as the first).
        result: On the very last event of the call (the last row's ``"end"``), the full
            :class:`~mctp.GenerationResult`; None otherwise.
        row_result: On every ``"end"`` that the generator emits: this row's own
            :class:`~mctp.GenerationResult` (one row), available as soon as the row stops
            while other rows go on; None on other events and from a bare segmenter.
    """

    kind: EventKind
    row: int
    ids: list[int]
    time_s: float
    forwards: int = 0
    result: GenerationResult | None = None
    row_result: GenerationResult | None = None


class StreamSegmenter:
    """Turns each row's token ids into text / audio / end events.

    A BOA opens an audio segment and its EOA closes it (the tags are not part of ``ids``);
    everything outside a segment is text. A stop id ends the row: an open audio segment is
    flushed, the text up to and including the stop id is emitted, then the row's ``"end"``. The last row to
    end has its ``"end"`` held back until :meth:`finish` so that it can carry the result.

    Args:
        speech: Speech ids (``boa``, ``eoa``).
        batch_size: Rows.
        stop_ids: Ids that end a row.
        audio_chunk: Emit audio in pieces of this many tokens (None: whole segments).

    Raises:
        ValueError: On ``batch_size < 1`` or ``audio_chunk < 1``.
    """

    def __init__(
        self,
        speech: SpeechIds,
        batch_size: int,
        stop_ids: Iterable[int] = (),
        *,
        audio_chunk: int | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if audio_chunk is not None and audio_chunk < 1:
            raise ValueError(f"audio_chunk must be >= 1, got {audio_chunk}")
        self.boa, self.eoa = speech.boa, speech.eoa
        self.stop = set(stop_ids)
        self.audio_chunk = audio_chunk
        self.batch_size = batch_size
        self._in_audio = [False] * batch_size
        self._pending: list[list[int]] = [[] for _ in range(batch_size)]
        self._ended = [False] * batch_size
        self._held: StreamEvent | None = None

    def ended(self, row: int) -> bool:
        """Whether ``row`` ended (a stop id, its budget, or :meth:`retire`)."""
        return self._ended[row]

    def retire(self, row: int) -> None:
        """Count ``row`` as ended without any event (a padding row of a batch)."""
        self._ended[row] = True
        self._pending[row] = []
        self._in_audio[row] = False

    def reopen(self, row: int) -> None:
        """Start ``row`` afresh (a new request took it): its events begin again."""
        self._ended[row] = False
        self._pending[row] = []
        self._in_audio[row] = False

    def take_held(self) -> StreamEvent | None:
        """The ``"end"`` held back for the result, handed out now (a row is about to be
        reopened, so it was not the last one after all)."""
        held, self._held = self._held, None
        return held

    def end(self, row: int, time_s: float, forwards: int) -> list[StreamEvent]:
        """End ``row`` now (its budget is spent): partial audio flushed, then its ``"end"``."""
        if self._ended[row]:
            return []
        self._ended[row] = True
        return self._close(row, time_s, forwards)

    def feed(self, row: int, ids: Iterable[int], time_s: float, forwards: int) -> list[StreamEvent]:
        """New ids of ``row`` (in order); returns the events they complete.

        Raises:
            ValueError: On a row out of range.
        """
        if not 0 <= row < self.batch_size:
            raise ValueError(f"row {row} out of range for batch size {self.batch_size}")
        if self._ended[row]:
            return []
        out: list[StreamEvent] = []
        text: list[int] = []
        pending = self._pending[row]
        for tok in ids:
            if tok in self.stop:  # a stop id is text, also where it cuts an audio segment short
                if self._in_audio[row]:
                    self._in_audio[row] = False
                    if pending:
                        out.append(StreamEvent("audio", row, pending, time_s, forwards))
                        pending = self._pending[row] = []
                text.append(tok)
                self._ended[row] = True
                break
            if self._in_audio[row]:
                if tok == self.eoa:
                    self._in_audio[row] = False
                    out.append(StreamEvent("audio", row, pending, time_s, forwards))
                    pending = self._pending[row] = []
                else:
                    pending.append(tok)
                    if self.audio_chunk is not None and len(pending) >= self.audio_chunk:
                        out.append(StreamEvent("audio", row, pending, time_s, forwards))
                        pending = self._pending[row] = []
            elif tok == self.boa:
                if text:
                    out.append(StreamEvent("text", row, text, time_s, forwards))
                    text = []
                self._in_audio[row] = True
            else:
                text.append(tok)
        if text:
            out.append(StreamEvent("text", row, text, time_s, forwards))
        if self._ended[row]:
            out.extend(self._close(row, time_s, forwards))
        return out

    def _close(self, row: int, time_s: float, forwards: int) -> list[StreamEvent]:
        out = []
        if self._pending[row]:
            out.append(StreamEvent("audio", row, self._pending[row], time_s, forwards))
            self._pending[row] = []
        end = StreamEvent("end", row, [], time_s, forwards)
        if all(self._ended):  # the last row: its end waits for the result
            self._held = end
        else:
            out.append(end)
        return out

    def finish(
        self, time_s: float, forwards: int, result: GenerationResult | None = None
    ) -> list[StreamEvent]:
        """Close every row still open (partial audio flushed, then its ``"end"``); the very
        last event carries ``result``."""
        out: list[StreamEvent] = []
        for row in range(self.batch_size):
            if not self._ended[row]:
                self._ended[row] = True
                out.extend(self._close(row, time_s, forwards))
        if self._held is not None:
            self._held.result = result
            out.append(self._held)
            self._held = None
        return out
