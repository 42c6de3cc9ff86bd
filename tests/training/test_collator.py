"""mctp.training.PackedCollator: position ids restart per sample, attention never crosses them."""

from __future__ import annotations

import pytest
import torch
from training_helpers import samples, tiny_backbone

from mctp.training import PackedCollator


def test_flattened_row_restarts_positions_and_shifts_within_samples():
    feats = [
        {"input_ids": [5, 6, 7], "labels": [-100, 6, 7]},
        {"input_ids": [8, 9], "labels": [8, 9]},
    ]
    b = PackedCollator()(feats)
    assert b["input_ids"].tolist() == [[5, 6, 7, 8, 9]]
    assert b["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    assert "attention_mask" not in b
    # next-token targets stop at the sample end: 7 -> 8 is not a target
    assert b["shift_labels"].tolist() == [[6, 7, -100, 9, -100]]


def test_padded_rows_and_prepacked_positions():
    feats = [
        {"input_ids": [1, 2, 3, 4], "labels": [1, 2, 3, 4], "position_ids": [0, 1, 0, 1]},
        {"input_ids": [5, 6], "labels": [5, 6]},
    ]
    b = PackedCollator(pad_id=0, flatten=False, pad_to_multiple_of=8)(feats)
    assert b["input_ids"].shape == (2, 8)
    assert b["attention_mask"].tolist() == [[1] * 4 + [0] * 4, [1] * 2 + [0] * 6]
    assert b["shift_labels"][0].tolist() == [2, -100, 4, -100, -100, -100, -100, -100]
    assert b["labels"][1, 2:].eq(-100).all()


def test_errors():
    c = PackedCollator(max_len=4)
    with pytest.raises(ValueError, match="empty batch"):
        c([])
    with pytest.raises(ValueError, match="differ in length"):
        c([{"input_ids": [1, 2], "labels": [1]}])
    with pytest.raises(ValueError, match="exceeds max_len 4"):
        c([{"input_ids": [1, 2, 3], "labels": [1, 2, 3]}] * 2)
    with pytest.raises(ValueError, match="start at 0"):
        c([{"input_ids": [1], "labels": [1], "position_ids": [3]}])


def test_packed_forward_equals_separate_forwards(family):
    """Attention never crosses samples: a packed row gives each sample's own hidden states."""
    bb = tiny_backbone(family).eval()
    feats = samples(3)
    b = PackedCollator()(feats)
    with torch.no_grad():
        packed = bb(b["input_ids"], position_ids=b["position_ids"]).hidden[0]
        alone = torch.cat([bb(torch.tensor([f["input_ids"]])).hidden[0] for f in feats])
    torch.testing.assert_close(packed, alone, atol=1e-5, rtol=1e-5)
