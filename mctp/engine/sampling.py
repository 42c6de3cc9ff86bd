"""Token choice without host synchronisation (greedy, temperature, top-k, top-p, penalties).

Everything here works on ``[B, V]`` logits and returns ``[B]`` ids on the same device
without calling ``.item()``; random draws use the exponential-race trick
(``argmax(p / Exp(1))``), which is a multinomial sample that stays on the device.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch

__all__ = [
    "Sampler",
    "SamplingConfig",
    "SpeechIds",
    "TokenPicker",
    "apply_repetition_penalty",
    "greedy",
    "sample_logits",
]

Sampler = Callable[[torch.Tensor], torch.Tensor]


def greedy(logits: torch.Tensor) -> torch.Tensor:
    """``[B, V] -> [B]`` argmax ids (first maximum on ties, like transformers)."""
    return logits.argmax(dim=-1)


@dataclass(frozen=True)
class SamplingConfig:
    """How to pick a token from logits.

    Attributes:
        do_sample: False = greedy (the other fields except the penalty are ignored).
        temperature: Divides the logits (> 0).
        top_k: Keep the k most likely tokens (0 = off).
        top_p: Keep the smallest set with cumulative probability >= top_p (1.0 = off).
        repetition_penalty: transformers' CTRL-style penalty on already generated ids (1.0 = off).

    Raises:
        ValueError: On a NaN or infinite number, a non-positive temperature, negative top_k,
            top_p outside (0, 1] or a non-positive penalty.
        TypeError: On a value of the wrong type (e.g. a string temperature).
    """

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0

    def __post_init__(self) -> None:
        if not isinstance(self.do_sample, bool):
            raise TypeError(f"do_sample must be a bool, got {self.do_sample!r}")
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool):
            raise TypeError(f"top_k must be an int, got {self.top_k!r}")
        for name in ("temperature", "top_p", "repetition_penalty"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                raise TypeError(f"{name} must be a number, got {value!r}")
            if not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")


def apply_repetition_penalty(
    logits: torch.Tensor, seen: torch.Tensor, penalty: float
) -> torch.Tensor:
    """transformers' repetition penalty: seen ids' positive logits / p, negative * p.

    Args:
        logits: ``[B, V]``.
        seen: ``[B, V]`` bool, ids already present in the sequence.
        penalty: > 0; 1.0 leaves the logits unchanged.

    Returns:
        ``[B, V]`` new logits.
    """
    if penalty == 1.0:
        return logits
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def sample_logits(
    logits: torch.Tensor, config: SamplingConfig, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Pick ``[B]`` ids from ``[B, V]`` logits (penalties must already be applied).

    Args:
        logits: ``[B, V]``.
        config: Sampling settings.
        generator: Random source for reproducible sampling (on the logits' device).

    Returns:
        ``[B]`` long ids.
    """
    if not config.do_sample:
        return greedy(logits)
    x = logits.float() / config.temperature
    if config.top_k > 0 and config.top_k < x.shape[-1]:
        kth = torch.topk(x, config.top_k, dim=-1).values[..., -1:]
        x = x.masked_fill(x < kth, float("-inf"))
    if config.top_p < 1.0:
        sorted_x, order = torch.sort(x, dim=-1, descending=True)
        probs = sorted_x.softmax(dim=-1)
        # drop a token when the mass before it already reaches top_p (the top token always stays)
        drop_sorted = (probs.cumsum(dim=-1) - probs) >= config.top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        x = x.masked_fill(drop, float("-inf"))
    probs = x.softmax(dim=-1)
    race = torch.empty_like(probs).exponential_(1.0, generator=generator)
    return (probs / race).argmax(dim=-1)


class SpeechIds(Protocol):
    """Ids of the speech tokens (e.g. :class:`mctp.SpeechVocab`)."""

    boa: int
    eoa: int
    audio_start: int
    audio_stop: int


class TokenPicker:
    """Chooses tokens from logits, on the device, with separate text and audio settings.

    The text setting picks first (it decides the modality); when that pick is an audio token
    and the audio setting differs, the token is drawn again among the audio tokens with the
    audio setting. Greedy/greedy is plain argmax.

    Args:
        vocab_size: Full vocabulary size ``V``.
        speech: Speech ids (for the audio range), or None (one setting for everything).
        text: Setting for text tokens (and every token without ``speech``).
        audio: Setting for audio tokens.
        generator: Random source.
        device: Where the bookkeeping tensors live.
        batch_size: ``B`` (for the repetition-penalty history).
    """

    def __init__(
        self,
        vocab_size: int,
        speech: SpeechIds | None,
        text: SamplingConfig,
        audio: SamplingConfig,
        generator: torch.Generator | None,
        device: torch.device,
        batch_size: int,
    ) -> None:
        self.text, self.audio, self.generator = text, audio, generator
        self.split = speech is not None and audio != text
        penalty = text.repetition_penalty != 1.0 or audio.repetition_penalty != 1.0
        self.seen = (
            torch.zeros(batch_size, vocab_size, dtype=torch.bool, device=device)
            if penalty
            else None
        )
        self.is_audio = None
        if speech is not None:
            ids = torch.arange(vocab_size, device=device)
            self.is_audio = (ids >= speech.audio_start) & (ids < speech.audio_stop)

    def observe(self, ids: torch.Tensor) -> None:
        """Mark ``ids [B', T]`` as seen (for the repetition penalty) by the leading ``B'`` rows
        (the rows a step ran)."""
        if self.seen is not None:
            self.seen[: ids.shape[0]].scatter_(1, ids, True)

    def observe_row(self, row: int, ids: torch.Tensor) -> None:
        """Mark ``ids [1, T]`` as seen by row ``row`` alone (a row that joined a batch)."""
        if self.seen is not None:
            self.seen[row].scatter_(0, ids[0], True)

    def __call__(self, logits: torch.Tensor, index: torch.Tensor | None = None) -> torch.Tensor:
        """``logits [B', V']`` of the leading ``B'`` rows over vocabulary ids ``index`` (None =
        all) -> local ids ``[B']``."""
        seen = None if self.seen is None else self.seen[: logits.shape[0]]
        if seen is not None and index is not None:
            seen = seen[:, index]
        text_logits = logits
        if seen is not None:
            text_logits = apply_repetition_penalty(logits, seen, self.text.repetition_penalty)
        choice = sample_logits(text_logits, self.text, self.generator)
        if not self.split:
            return choice
        assert self.is_audio is not None
        audio_mask = self.is_audio if index is None else self.is_audio[index]
        audio_logits = (
            logits
            if seen is None
            else apply_repetition_penalty(logits, seen, self.audio.repetition_penalty)
        )
        audio_choice = sample_logits(
            audio_logits.masked_fill(~audio_mask, float("-inf")), self.audio, self.generator
        )
        return torch.where(audio_mask[choice], audio_choice, choice)
