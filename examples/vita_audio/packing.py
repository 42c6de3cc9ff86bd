"""Per-stream packing of rendered samples into ``[1, L]`` training batches.

As the official code: samples of one stream (JSONL file) are concatenated until the next would
overflow ``max_len``; position ids restart at 0 per sample; padding gets label -100 and
positions continuing the last sample.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .data import IGNORE_INDEX, Sample

__all__ = ["Pack", "Packer"]


@dataclass
@dataclass
class Pack:
    """Samples of one stream concatenated (and padded) to at most ``max_len`` tokens.

    Attributes:
        input_ids, labels, position_ids: ``[L]`` lists; position ids restart at 0 per sample.
        lengths: Length of each sample, in order.
        source: The stream (JSONL file) the samples came from.
        num_pad: Padding tokens at the end (label -100).
    """

    input_ids: list[int]
    labels: list[int]
    position_ids: list[int]
    lengths: list[int]
    source: str
    num_pad: int = 0

    def batch(self) -> dict[str, torch.Tensor]:
        """``{"input_ids", "labels", "position_ids"}``, each a ``[1, L]`` long tensor."""
        return {
            k: torch.tensor([getattr(self, k)], dtype=torch.long)
            for k in ("input_ids", "labels", "position_ids")
        }


class Packer:
    """Per-stream packing: append until the next sample would overflow, then emit.

    Args:
        max_len: Tokens per pack (official 8192; 2048 in stage 4 per DESIGN).
        pad_id: Id used for padding.
        pad: Pad every pack to ``max_len`` (fixed shapes, the official behaviour).
        on_too_long: ``"skip"`` (count in :attr:`skipped`) or ``"raise"`` for a sample longer
            than ``max_len``.

    Raises:
        ValueError: On ``max_len < 1`` or an unknown ``on_too_long``.
    """

    def __init__(
        self, max_len: int = 8192, *, pad_id: int = 0, pad: bool = True, on_too_long: str = "skip"
    ) -> None:
        if max_len < 1:
            raise ValueError(f"max_len must be >= 1, got {max_len}")
        if on_too_long not in ("skip", "raise"):
            raise ValueError(f"on_too_long must be 'skip' or 'raise', got {on_too_long!r}")
        self.max_len, self.pad_id, self.pad, self.on_too_long = max_len, pad_id, pad, on_too_long
        self.skipped = 0
        self._open: dict[str, list[Sample]] = {}

    def add(self, sample: Sample, source: str = "") -> Pack | None:
        """Add a sample to its stream; returns the stream's previous pack if it had to close.

        Raises:
            ValueError: If the sample is longer than ``max_len`` and ``on_too_long="raise"``,
                or its ids and labels differ in length.
        """
        if len(sample.input_ids) != len(sample.labels):
            raise ValueError(f"ids ({len(sample.input_ids)}) and labels ({len(sample.labels)})")
        if len(sample) > self.max_len or len(sample) == 0:
            if self.on_too_long == "raise" and len(sample):
                raise ValueError(f"a sample of {len(sample)} tokens exceeds max_len {self.max_len}")
            self.skipped += 1
            return None
        buf = self._open.setdefault(source, [])
        out = None
        if sum(map(len, buf)) + len(sample) > self.max_len:
            out = self._close(source)
            buf = self._open.setdefault(source, [])
        buf.append(sample)
        return out

    def flush(self) -> list[Pack]:
        """Close every open stream (end of the data)."""
        return [self._close(s) for s in list(self._open) if self._open[s]]

    def _close(self, source: str) -> Pack:
        samples = self._open.pop(source)
        ids = [t for s in samples for t in s.input_ids]
        labels = [t for s in samples for t in s.labels]
        pos = [p for s in samples for p in range(len(s))]
        pad = self.max_len - len(ids) if self.pad else 0
        ids += [self.pad_id] * pad
        labels += [IGNORE_INDEX] * pad
        pos += list(range(pos[-1] + 1, pos[-1] + 1 + pad))
        return Pack(ids, labels, pos, [len(s) for s in samples], source, pad)
