"""``GenerationResult``: what one generation returns (ids, sources, counts, timings)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

__all__ = ["GenerationResult"]


@dataclass
class GenerationResult:
    """What a generation returns.

    Attributes:
        sequences: ``[B, P + G]`` prompt and generated ids (``pad_id`` after a row stopped).
            All tensors of the result are on the CPU and are ordinary (not inference) tensors.
        tokens: Per row, the generated ids up to and including the first stop id.
        sources: Per row, who produced each of ``tokens``: -1 the backbone, ``k`` MCTP head k.
        num_backbone_forwards: Backbone forwards including the prefill.
        num_mctp_steps: MCTP head runs (each run of one head produces one token).
        num_drafted: Verified mode: drafted tokens the backbone checked.
        num_accepted: Verified mode: drafted tokens that were kept.
        prefill_s: Seconds spent in the prefill.
        total_s: Seconds for the whole call.
        first_audio_s: Seconds from the start until the first complete audio segment
            (its EOA) of any row, or None.
        cycle_times: ``(tokens generated so far, seconds)`` after every cycle.
    """

    sequences: torch.Tensor
    tokens: list[torch.Tensor]
    sources: list[torch.Tensor]
    num_backbone_forwards: int
    num_mctp_steps: int
    num_drafted: int = 0
    num_accepted: int = 0
    prefill_s: float = 0.0
    total_s: float = 0.0
    first_audio_s: float | None = None
    cycle_times: list[tuple[int, float]] = field(default_factory=list)

    @property
    def acceptance_rate(self) -> float | None:
        """Accepted / drafted tokens in verified mode (None otherwise)."""
        return self.num_accepted / self.num_drafted if self.num_drafted else None

    @property
    def tokens_per_s(self) -> float:
        """Generated tokens (all rows) per second of the whole call."""
        return sum(t.numel() for t in self.tokens) / self.total_s if self.total_s > 0 else 0.0
