"""Losses: chunked cross-entropy equals the plain one, the one normalisation (sums over
``num_items_in_batch``), the total's rules, and the exported loss equals the trainer's."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mctp import MCTPLoss, chunked_cross_entropy, mctp_loss, total_loss
from mctp.losses import count_items


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
    # the main term: token mean x its count / num_items_in_batch
    got = total_loss(main, None, backbone_frozen=False, main_count=3, num_items_in_batch=12)
    assert float(got) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="main_count is required"):
        total_loss(main, None, backbone_frozen=False, num_items_in_batch=12)
    mtp = MCTPLoss.from_sums(torch.tensor([3.0, 2.0]), torch.tensor([3, 2]), 6)
    with pytest.raises(ValueError, match=r"normalised by 6 items.*num_items_in_batch=5"):
        total_loss(main, mtp, backbone_frozen=True, num_items_in_batch=5)


def test_from_sums_is_the_official_normalisation():
    sums, counts = torch.tensor([6.0, 3.0, 1.0]), torch.tensor([4, 3, 1])
    res = MCTPLoss.from_sums(sums, counts, 5, weight=0.5)
    assert float(res.loss) == pytest.approx(0.5 * (6 / 5 + 3 / 5 + 1 / 5) / 3)
    assert res.per_head.tolist() == pytest.approx([1.5, 1.0, 1.0])  # token means, for logs
    assert float(res.num_items) == 5.0
    with pytest.raises(ValueError, match="N >= 1"):
        MCTPLoss.from_sums(torch.zeros(0), torch.zeros(0), 5)
    with pytest.raises(ValueError, match="disagree"):
        MCTPLoss.from_sums(sums, counts[:2], 5)


def test_count_items_counts_next_token_targets_within_samples():
    labels = torch.tensor([[-100, 5, 6, 7, 8, 9, -100]])
    pos = torch.tensor([[0, 1, 2, 3, 0, 1, 2]])
    # targets: 5 6 7 | (7 ends its sample) | 9 -100 | (last)
    assert int(count_items(labels, pos)) == 4
    assert int(count_items(labels)) == 5  # one sample: 8 follows 7


def _trained_setup(stage: int, weight: float):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from mctp.backbones import HFBackbone
    from mctp.training import MCTPTrainingModel, PackedCollator, vita_audio_stage

    torch.manual_seed(0)
    cfg = Qwen2Config(
        vocab_size=48,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
    )
    model = MCTPTrainingModel(backbone=HFBackbone(Qwen2ForCausalLM(cfg)))
    vita_audio_stage(stage, num_heads=3, mtp_loss_weight=weight).apply(model)
    with torch.no_grad():  # heads that differ from the last layer and from each other
        for p in model.stack.parameters():
            p.add_(0.05 * torch.randn_like(p))
    g = torch.Generator().manual_seed(1)
    feats = []
    for n in (9, 6, 11):
        ids = torch.randint(0, 48, (n,), generator=g).tolist()
        feats.append({"input_ids": ids, "labels": [-100, -100, *ids[2:]]})
    return model, PackedCollator()(feats)


@pytest.mark.parametrize("stage", [2, 4])
def test_the_exported_loss_gives_the_trainers_number(stage, tmp_path):
    """mctp_loss + total_loss on the same batch == MCTPTrainer.compute_loss, with this batch's
    count and with a larger accumulated num_items_in_batch."""
    from transformers import TrainingArguments

    from mctp.training import MCTPTrainer

    model, batch = _trained_setup(stage, 0.3)
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True)
    trainer = MCTPTrainer(model=model, args=args, stage=model.stage)
    own = int(batch["shift_labels"].ne(-100).sum())
    assert int(count_items(batch["labels"], batch["position_ids"])) == own
    assert len({*model(**batch)["head_counts"].tolist(), own}) > 1  # counts differ
    frozen = stage != 4
    for items in (None, 3 * own):
        expected = trainer.compute_loss(model, dict(batch), num_items_in_batch=items)
        out = model.backbone(
            batch["input_ids"], position_ids=batch["position_ids"], labels=batch["labels"]
        )
        mtp = mctp_loss(
            model.stack,
            out.hidden,
            batch["input_ids"],
            batch["labels"],
            position_ids=batch["position_ids"],
            weight=0.3,
            num_items_in_batch=items,
            detach_backbone=frozen,
        )
        got = total_loss(
            out.loss,
            mtp,
            backbone_frozen=frozen,
            main_count=out.num_targets,
            num_items_in_batch=items,
        )
        assert torch.equal(got, expected), (stage, items, float(got), float(expected))
    # README's call (one whole batch): out.loss + mctp_loss(...).loss is the same number
    if stage == 4:
        readme = (
            out.loss
            + mctp_loss(
                model.stack,
                out.hidden,
                batch["input_ids"],
                batch["labels"],
                position_ids=batch["position_ids"],
                weight=0.3,
            ).loss
        )
        assert torch.equal(readme, trainer.compute_loss(model, dict(batch)))
