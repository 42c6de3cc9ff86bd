"""``generate_stream``: the generation engine, handing out text and audio as they appear."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from mctp.interleave import InterleaveSchedule, Mode

from .generation import _DOC_ARGS, CachedBackbone, GenerationResult, _check_kwargs, _setup
from .sampling import SpeechIds
from .stack import MCTPStack

__all__ = ["StreamEvent", "generate_stream"]


@dataclass
class StreamEvent:
    """One item of :func:`generate_stream`.

    Attributes:
        kind: ``"text"`` (text token ids), ``"audio"`` (one complete audio segment, or a
            partial one when ``audio_chunk`` is set), or ``"end"`` (the row stopped; ``ids``
            empty).
        row: Batch row.
        ids: Token ids (for audio: the audio token ids without BOA/EOA).
        time_s: Seconds since the call started.
        forwards: Backbone forwards run so far (the prefill counts as the first).
        result: On the very last event (``kind == "end"`` of the last row), the full
            :class:`GenerationResult`; None otherwise.
    """

    kind: str
    row: int
    ids: list[int]
    time_s: float
    forwards: int = 0
    result: GenerationResult | None = None


@torch.inference_mode()
def generate_stream(
    backbone: CachedBackbone,
    stack: MCTPStack | None,
    input_ids: torch.Tensor,
    mode: str | Mode | InterleaveSchedule = "boost",
    max_new_tokens: int = 256,
    *,
    audio_chunk: int | None = None,
    **kwargs: Any,
) -> Iterator[StreamEvent]:
    """Like :func:`generate`, but yields events as soon as tokens exist.

    Text tokens come out after every cycle; an audio segment comes out as soon as its EOA
    is produced (in Boost/Turbo: after the first backbone forward plus one MCTP chain), or
    in pieces of ``audio_chunk`` tokens when set (useful for long audio segments). The last
    event carries the :class:`GenerationResult`.
    {args}
        audio_chunk: Emit partial audio segments of this many tokens.

    Yields:
        :class:`StreamEvent`.

    Raises:
        ValueError: As :func:`generate`, and when ``vocab`` is missing (audio events need it).
    """
    _check_kwargs(kwargs)
    kwargs.pop("sync_timings", None)
    speech: SpeechIds | None = kwargs.get("vocab")
    if speech is None:
        raise ValueError("generate_stream needs vocab= (speech ids) to find audio segments")
    if audio_chunk is not None and audio_chunk < 1:
        raise ValueError(f"audio_chunk must be >= 1, got {audio_chunk}")
    t0 = time.perf_counter()
    engine = _setup(backbone, stack, input_ids, mode, max_new_tokens, kwargs)
    buf = engine.buffer
    b = buf.batch_size
    stop = set(engine.stop_ids.tolist())
    read = [engine.prompt_len] * b
    in_audio = [False] * b
    pending: list[list[int]] = [[] for _ in range(b)]
    ended = [False] * b
    cycle_times: list[tuple[int, float]] = []
    prefill_s = 0.0
    for produced in engine.cycles():
        now = time.perf_counter() - t0
        if not cycle_times:
            prefill_s = now
        cycle_times.append((produced, now))
        new = buf.ids[:, engine.prompt_len : engine.end].tolist()  # one read per cycle
        for r in range(b):
            if ended[r]:
                continue
            text: list[int] = []
            for tok in new[r][read[r] - engine.prompt_len :]:
                read[r] += 1
                if in_audio[r]:
                    if tok == speech.eoa:
                        in_audio[r] = False
                        yield StreamEvent("audio", r, pending[r], now, engine.forwards)
                        pending[r] = []
                    else:
                        pending[r].append(tok)
                        if audio_chunk is not None and len(pending[r]) >= audio_chunk:
                            yield StreamEvent("audio", r, pending[r], now, engine.forwards)
                            pending[r] = []
                elif tok == speech.boa:
                    if text:
                        yield StreamEvent("text", r, text, now, engine.forwards)
                        text = []
                    in_audio[r] = True
                else:
                    text.append(tok)
                if tok in stop:
                    ended[r] = True
                    break
            if text:
                yield StreamEvent("text", r, text, now, engine.forwards)
            if ended[r]:
                if pending[r]:
                    yield StreamEvent("audio", r, pending[r], now, engine.forwards)
                    pending[r] = []
                yield StreamEvent("end", r, [], now, engine.forwards)
    result = engine.result(t0, prefill_s, cycle_times, speech)
    for r in range(b):
        if pending[r]:
            yield StreamEvent("audio", r, pending[r], time.perf_counter() - t0, engine.forwards)
    last = [r for r in range(b) if not ended[r]]
    for i, r in enumerate(last):
        final = result if i == len(last) - 1 else None
        yield StreamEvent("end", r, [], time.perf_counter() - t0, engine.forwards, final)
    if not last:
        yield StreamEvent("end", -1, [], time.perf_counter() - t0, engine.forwards, result)


generate_stream.__doc__ = (generate_stream.__doc__ or "").replace("{args}", _DOC_ARGS)
