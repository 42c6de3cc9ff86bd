"""What :class:`~mctp.speech.SpeechPipeline` hands out: streamed chunks and the final result."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["Prompt", "SpeechChunk", "SpeechResult"]


@dataclass
class SpeechResult:
    """A finished answer.

    Attributes:
        text: The answer's text.
        audio: ``[S]`` float32 waveform of the whole spoken answer.
        sample_rate: Sample rate of ``audio`` (the decoder's).
        mode: The schedule's ratio list the answer was generated with.
        first_chunk_s: Seconds from the call until the first non-empty waveform chunk (None
            when the answer has no audio).
        first_text_s: Seconds until the first text.
        total_s: Seconds for the whole call (input encoding, generation, decoding).
        num_tokens: Generated tokens (text, audio, tags and the stop token).
        num_audio_tokens: Generated audio tokens.
        tokens_per_s: Generated tokens per second of generation.
        finish_reason: ``"stop"`` (a stop token) or ``"length"`` (``max_new_tokens`` ran out).
        generation: The generator's own result (forwards, MCTP steps, sources), if any.
        prompt_ids: ``[P]`` the prompt the model read.
        stray_tokens: Ids the model put in the wrong kind of segment (not audio inside an
            audio segment, audio among the text); skipped, logged, counted here.
        started_s: Seconds from the request's arrival until its generation began (the
            waiting part of ``first_chunk_s``: in the server's queue, or for a row of a
            running batch); None where not measured.
    """

    text: str
    audio: torch.Tensor
    sample_rate: int
    mode: list[int]
    first_chunk_s: float | None
    first_text_s: float | None
    total_s: float
    num_tokens: int
    num_audio_tokens: int
    tokens_per_s: float
    finish_reason: str
    generation: Any = field(default=None, repr=False)
    prompt_ids: torch.Tensor | None = field(default=None, repr=False)
    stray_tokens: int = 0
    started_s: float | None = None

    @property
    def duration_s(self) -> float:
        """Length of ``audio`` in seconds."""
        return self.audio.numel() / self.sample_rate


@dataclass
class SpeechChunk:
    """One item of :meth:`SpeechPipeline.stream`.

    Attributes:
        kind: ``"text"`` (new text in ``text``), ``"audio"`` (new samples in ``audio``) or
            ``"end"`` (the answer is complete; ``result`` is set).
        time_s: Seconds since the call started.
        text: The new text (``"text"`` chunks).
        audio: ``[S]`` float32 new samples at the decoder's rate (``"audio"`` chunks).
        result: The :class:`SpeechResult` (``"end"`` chunk).
    """

    kind: str
    time_s: float
    text: str = ""
    audio: torch.Tensor | None = None
    result: SpeechResult | None = None


@dataclass
class Prompt:
    """A rendered prompt: ``input_ids [1, P]`` and, for encoder input, ``prompt_embeds [1, P, H]``."""

    input_ids: torch.Tensor
    prompt_embeds: torch.Tensor | None = None
