"""mctp.training.stages: stage presets as data, applied to a model, optimizer groups."""

from __future__ import annotations

import pytest
import torch
from training_helpers import tiny_backbone

from mctp.training import MCTPTrainingModel, StagePreset, vita_audio_stage


def test_vita_audio_stage_facts():
    got = {
        s: (p.num_heads, p.train_backbone, p.lr, p.mctp_lr_mult, p.max_steps)
        for s in (1, 2, 3, 4)
        for p in [vita_audio_stage(s)]
    }
    assert got == {
        1: (0, True, 6e-5, 1.0, 8000),
        2: (1, False, 1e-3, 1.0, 4000),
        3: (10, False, 1e-3, 1.0, 8000),
        4: (10, True, 5e-5, 10.0, 4000),
    }
    assert all(vita_audio_stage(s).mtp_loss_weight is None for s in (1, 2, 3, 4))  # checkpoint's
    plus = vita_audio_stage(4, plus=True)
    assert (
        plus.detach_mtp_inputs
        and plus.audio_projector == "train"
        and plus.audio_encoder == "frozen"
    )
    assert vita_audio_stage(2, plus=True).audio_projector == "frozen"


def test_invalid_presets():
    with pytest.raises(ValueError, match=r"stages 1\.\.4"):
        vita_audio_stage(5)
    with pytest.raises(ValueError, match="no loss to train"):
        StagePreset(name="x", num_heads=0, train_backbone=False, audio_projector="train")
    with pytest.raises(ValueError, match="trains nothing"):
        StagePreset(name="x", num_heads=2, train_backbone=False, train_heads=False)
    with pytest.raises(ValueError, match="audio_encoder"):
        StagePreset(name="x", num_heads=0, train_backbone=True, audio_encoder="maybe")
    with pytest.raises(ValueError, match="lr"):
        vita_audio_stage(1, lr=0.0)


def test_apply_grows_heads_freezes_and_groups():
    model = MCTPTrainingModel(backbone=tiny_backbone())
    with pytest.raises(RuntimeError, match="no training stage applied"):
        model.train_backbone  # noqa: B018 - the stage is the settings' one owner
    with pytest.raises(ValueError, match="no mtp_loss_weight"):
        vita_audio_stage(2, num_heads=1).apply(model)
    assert model.stage is None and model.num_heads == 0  # the refused stage changed nothing
    vita_audio_stage(2, num_heads=1, mtp_loss_weight=0.25).apply(model)
    assert model.num_heads == 1 and not model.train_backbone and model.mtp_loss_weight == 0.25
    with pytest.raises(AttributeError):
        model.mtp_loss_weight = 1.0  # only StagePreset.apply sets it
    assert not any(p.requires_grad for p in model.backbone.parameters())
    last = model.backbone.base.layers[-1].state_dict()
    assert all(torch.equal(v, model.stack.heads[0].block.state_dict()[k]) for k, v in last.items())
    with torch.no_grad():
        model.stack.heads[0].proj.weight.add_(1.0)  # "trained" head 0
    s3 = vita_audio_stage(3, num_heads=3, mtp_loss_weight=0.5)
    assert s3.apply(model) is model
    assert model.num_heads == 3 and model.mtp_loss_weight == 0.5
    for head in model.stack.heads[1:]:
        assert torch.equal(head.proj.weight, model.stack.heads[0].proj.weight)
    s4 = vita_audio_stage(4, num_heads=3, weight_decay=0.1, mtp_loss_weight=0.5)
    s4.apply(model)
    groups = {g["name"]: g for g in s4.param_groups(model)}
    assert set(groups) == {"backbone", "backbone_no_decay", "mctp", "mctp_no_decay"}
    assert groups["mctp"]["lr"] == pytest.approx(5e-4) and groups["backbone"]["lr"] == 5e-5
    assert (
        groups["backbone"]["weight_decay"] == 0.1 and groups["mctp_no_decay"]["weight_decay"] == 0
    )
    assert all(p.ndim == 1 for p in groups["backbone_no_decay"]["params"])
    with pytest.raises(ValueError, match="has 3 MCTP heads"):
        s3.replace(num_heads=2).apply(model)
