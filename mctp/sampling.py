"""Token choice without host synchronisation (greedy, temperature, top-k, top-p, penalties).

Everything here works on ``[B, V]`` logits and returns ``[B]`` ids on the same device
without calling ``.item()``; random draws use the exponential-race trick
(``argmax(p / Exp(1))``), which is a multinomial sample that stays on the device.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

__all__ = ["Sampler", "SamplingConfig", "apply_repetition_penalty", "greedy", "sample_logits"]

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
        ValueError: On a non-positive temperature, negative top_k, top_p outside (0, 1] or a
            non-positive penalty.
    """

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0

    def __post_init__(self) -> None:
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.repetition_penalty <= 0:
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
