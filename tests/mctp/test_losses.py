"""Losses: chunked cross-entropy equals the plain one (values and gradients), the total's rules."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mctp import MCTPLoss, chunked_cross_entropy, total_loss


@pytest.mark.parametrize("chunk", [1, 3, 100])
def test_chunked_cross_entropy_equals_the_plain_one(chunk):
    g = torch.Generator().manual_seed(0)
    head = torch.nn.Linear(8, 11)
    hidden = torch.randn(2, 5, 8, generator=g, requires_grad=True)
    targets = torch.randint(0, 11, (2, 5), generator=g)
    targets[0, 1] = targets[1, 4] = -100
    total, count = chunked_cross_entropy(hidden, targets, head, chunk_size=chunk)
    ref = F.cross_entropy(head(hidden).flatten(0, 1), targets.flatten(), reduction="sum")
    torch.testing.assert_close(total, ref)
    assert int(count) == 8
    (g1,) = torch.autograd.grad(total, hidden)
    (g2,) = torch.autograd.grad(ref, hidden)
    torch.testing.assert_close(g1, g2)


def test_nothing_to_score_keeps_the_graph():
    hidden = torch.randn(1, 3, 4, requires_grad=True)
    total, count = chunked_cross_entropy(
        hidden, torch.full((1, 3), -100), torch.nn.Linear(4, 5), chunk_size=2
    )
    assert float(total) == 0.0 and int(count) == 0 and total.requires_grad


def test_bad_shapes_raise():
    with pytest.raises(ValueError, match="disagree"):
        chunked_cross_entropy(torch.randn(1, 3, 4), torch.zeros(1, 2, dtype=torch.long), abs)
    with pytest.raises(ValueError, match="chunk_size must be >= 1"):
        chunked_cross_entropy(
            torch.randn(1, 3, 4), torch.zeros(1, 3, dtype=torch.long), abs, chunk_size=0
        )


def test_total_loss_rules():
    main = torch.tensor(2.0)
    mtp = MCTPLoss(torch.tensor(0.5), torch.tensor([0.5]), torch.tensor([3]))
    assert float(total_loss(main, mtp, backbone_frozen=False)) == 2.5
    assert float(total_loss(main, mtp, backbone_frozen=True)) == 0.5  # main loss dropped
    assert float(total_loss(main, None, backbone_frozen=False)) == 2.0
    with pytest.raises(ValueError, match="nothing to train"):
        total_loss(main, None, backbone_frozen=True)
    with pytest.raises(ValueError, match="main_loss is required"):
        total_loss(None, mtp, backbone_frozen=False)
