"""Packed-batch collation: samples -> ``[B, L]`` tensors whose attention never crosses samples."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["IGNORE_INDEX", "PackedCollator"]

IGNORE_INDEX = -100


def _as_list(value: Any, name: str) -> list[int]:
    if isinstance(value, torch.Tensor):
        value = value.reshape(-1).tolist()
    elif hasattr(value, "tolist"):
        value = value.tolist()
    if not isinstance(value, (list, tuple)):
        raise TypeError(f"'{name}' must be a sequence of ints, got {type(value).__name__}")
    return [int(v) for v in value]


@dataclass
class PackedCollator:
    """Collate samples (or already packed rows) into a batch for :class:`MCTPTrainingModel`.

    Each feature is a mapping with ``input_ids`` and ``labels`` (equal lengths, -100 = not
    scored) and, for a row that already holds several packed samples, ``position_ids``
    restarting at 0 per sample. Without ``position_ids`` a feature is one sample
    (positions ``0..n-1``).

    With ``flatten=True`` the features of a micro-batch are concatenated into ONE row
    ``[1, sum n_i]`` (padding-free packing: position ids restart per sample, which is where
    :class:`~mctp.backbones.HFBackbone` and :class:`~mctp.MCTPStack` cut attention).
    With ``flatten=False`` rows are right-padded to the longest one and an
    ``attention_mask`` marks the real tokens.

    The batch also holds ``shift_labels`` ``[B, L]``: the next-token target of every position
    (``labels[t+1]`` when ``t+1`` continues ``t``'s sample, else -100). transformers'
    ``Trainer`` counts them for ``num_items_in_batch``, so the loss is normalised by the
    labelled tokens of the whole accumulated batch.

    VITA-Audio-Plus features may carry ``audio_features``: a list of ``[F_j, D]`` encoder
    inputs (one per audio of the sample, in order); they are gathered over the batch into
    ``audio_features [A, F_max, D]`` (zero padded) and ``audio_feature_lengths [A]``.

    Args:
        pad_id: Id written into padded slots.
        flatten: Concatenate the micro-batch into one row (see above).
        max_len: Refuse rows longer than this (None: no limit).
        pad_to_multiple_of: Round padded row lengths up to a multiple of this.

    Raises:
        ValueError: (on call) On an empty batch, ids/labels/positions of different lengths,
            an empty sample, a row longer than ``max_len``, or mixed presence of audio.
        TypeError: (on call) On a field that is not a sequence of ints.
    """

    pad_id: int = 0
    flatten: bool = True
    max_len: int | None = None
    pad_to_multiple_of: int | None = None

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        """Collate ``features``.

        Returns:
            ``input_ids``, ``labels``, ``position_ids``, ``shift_labels`` (each ``[B, L]``
            long; ``B = 1`` when flattening), ``attention_mask`` ``[B, L]`` when rows were
            padded, and the audio fields when present.
        """
        if len(features) == 0:
            raise ValueError("cannot collate an empty batch")
        rows: list[tuple[list[int], list[int], list[int]]] = []
        for i, f in enumerate(features):
            ids = _as_list(f["input_ids"], "input_ids")
            labels = _as_list(f["labels"], "labels")
            pos = (
                _as_list(f["position_ids"], "position_ids")
                if f.get("position_ids") is not None
                else list(range(len(ids)))
            )
            if not ids:
                raise ValueError(f"feature {i} is empty")
            if not len(ids) == len(labels) == len(pos):
                raise ValueError(
                    f"feature {i}: input_ids ({len(ids)}), labels ({len(labels)}) and "
                    f"position_ids ({len(pos)}) differ in length"
                )
            if pos[0] != 0:
                raise ValueError(f"feature {i}: position_ids must start at 0, got {pos[0]}")
            rows.append((ids, labels, pos))
        if self.flatten:
            rows = [tuple([t for r in rows for t in r[k]] for k in range(3))]  # type: ignore[misc]
        longest = max(len(r[0]) for r in rows)
        if self.max_len is not None and longest > self.max_len:
            raise ValueError(f"a row of {longest} tokens exceeds max_len {self.max_len}")
        width = longest
        if self.pad_to_multiple_of:
            m = self.pad_to_multiple_of
            width = -(-width // m) * m
        padded = any(len(r[0]) != width for r in rows)
        b = len(rows)
        input_ids = torch.full((b, width), self.pad_id, dtype=torch.long)
        labels = torch.full((b, width), IGNORE_INDEX, dtype=torch.long)
        position_ids = torch.zeros((b, width), dtype=torch.long)
        mask = torch.zeros((b, width), dtype=torch.long)
        for j, (ids, lab, pos) in enumerate(rows):
            n = len(ids)
            input_ids[j, :n] = torch.tensor(ids)
            labels[j, :n] = torch.tensor(lab)
            position_ids[j, :n] = torch.tensor(pos)
            mask[j, :n] = 1
        batch = {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}
        if padded:
            batch["attention_mask"] = mask
        batch["shift_labels"] = shift_labels(labels, position_ids, mask if padded else None)
        audio = [f.get("audio_features") for f in features]
        if any(a is not None for a in audio):
            if any(a is None for a in audio):
                raise ValueError("some features carry audio_features and others do not")
            frames = [torch.as_tensor(x, dtype=torch.float32) for a in audio for x in a]
            if frames:
                batch["audio_features"] = torch.nn.utils.rnn.pad_sequence(frames, batch_first=True)
                batch["audio_feature_lengths"] = torch.tensor([x.shape[0] for x in frames])
        return batch


def shift_labels(
    labels: torch.Tensor, position_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Next-token targets ``[B, T]`` that never cross a packed sample (see ``mctp.shift_targets``)."""
    from mctp.stack import shift_targets

    return shift_targets(labels, position_ids, attention_mask)
