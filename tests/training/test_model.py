"""mctp.training.MCTPTrainingModel: loss normalisation over accumulation, stages, the Plus path."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from training_helpers import VOCAB, samples, tiny_backbone

from mctp.training import MCTPTrainingModel, PackedCollator, vita_audio_stage

PLACEHOLDER = VOCAB - 1


def _model(family: str, stage: int, heads: int = 2, weight: float = 1.0) -> MCTPTrainingModel:
    model = MCTPTrainingModel(backbone=tiny_backbone(family))
    n = heads if stage > 1 else 0
    vita_audio_stage(stage, num_heads=n, mtp_loss_weight=weight).apply(model)
    return model


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("stage", [2, 4])
def test_accumulated_loss_equals_one_big_batch(family, stage):
    """Two micro-batches normalised by num_items_in_batch == one batch of both (loss and grads)."""
    model = _model(family, stage)
    collate = PackedCollator()
    feats = samples(6)
    parts = [collate(feats[:2]), collate(feats[2:])]
    items = sum(int(p["shift_labels"].ne(-100).sum()) for p in parts)
    total = 0.0
    for p in parts:
        loss = model(**p, num_items_in_batch=items)["loss"]
        loss.backward()
        total += float(loss)
    accumulated = _grads(model)
    model.zero_grad()
    whole = model(**collate(feats))
    whole["loss"].backward()
    assert total == pytest.approx(float(whole["loss"]), rel=1e-5)
    assert accumulated.keys() == _grads(model).keys() and accumulated
    for name, g in _grads(model).items():
        torch.testing.assert_close(accumulated[name], g, rtol=1e-4, atol=1e-6, msg=name)
    # a per-micro-batch mean (what the old loop did) is a different number
    means = sum(float(model(**p)["loss"]) for p in parts) / 2
    assert abs(means - float(whole["loss"])) > 1e-4


def test_loss_terms_and_frozen_backbone(family):
    model = _model(family, 4, heads=3, weight=0.5)
    out = model(**PackedCollator()(samples(3)))
    n = out["main_count"].clamp_min(1)
    expected = out["main_sum"] / n + 0.5 * (out["head_sums"] / n).mean()
    assert float(out["loss"]) == pytest.approx(float(expected), rel=1e-6)
    assert out["head_counts"].tolist() == sorted(out["head_counts"].tolist(), reverse=True)
    frozen = _model(family, 2, heads=1)
    out = frozen(**PackedCollator()(samples(3)))
    out["loss"].backward()
    assert not any(p.grad is not None for p in frozen.backbone.parameters())
    assert all(p.grad is not None for p in frozen.stack.parameters())


# --------------------------------------------------------------------------- Plus
FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


@pytest.fixture(scope="module")
def sensevoice():
    from mctp.codecs.sensevoice import SenseVoiceEncoder
    from mctp.codecs.sensevoice.encoder import query_ids

    enc = SenseVoiceEncoder.from_pretrained(FIXTURES / "sensevoice")
    feats = torch.from_numpy(np.load(FIXTURES / "sensevoice/expected/en.feats.npy"))[:5]
    return enc.model, query_ids("auto", "woitn"), feats


def _plus(sensevoice, stage: int, heads: int = 2) -> MCTPTrainingModel:
    from mctp.codecs import MLPProjector

    audio_model, queries, _ = sensevoice
    torch.manual_seed(3)
    model = MCTPTrainingModel(
        backbone=tiny_backbone("qwen2"),
        audio_model=copy.deepcopy(audio_model),
        audio_projection=MLPProjector(audio_model.encoder.output_size, 32),
        audio_placeholder_id=PLACEHOLDER,
        audio_queries=queries,
    )
    n = heads if stage > 1 else 0
    vita_audio_stage(stage, plus=True, num_heads=n, mtp_loss_weight=1.0).apply(model)
    return model


def _plus_batch(sensevoice):
    _, _, feats = sensevoice
    frames = feats.shape[0] + 4
    ids = [3, 4, *([PLACEHOLDER] * frames), 5, *range(6, 16)]
    labels = [-100] * (3 + frames) + ids[3 + frames :]
    return PackedCollator()([{"input_ids": ids, "labels": labels, "audio_features": [feats]}])


def test_plus_frames_reach_backbone_only_and_mtp_inputs_are_detached(sensevoice):
    model = _plus(sensevoice, 4)
    assert model.detach_mtp_inputs and model.is_plus
    assert not any(p.requires_grad for p in model.audio_model.parameters())  # encoder frozen
    assert all(p.requires_grad for p in model.audio_projection.parameters())  # trains in stage 4
    batch = _plus_batch(sensevoice)
    out = model(**batch)
    out["loss"].backward()
    both = {n: p.grad.clone() for n, p in model.audio_projection.named_parameters()}
    assert all(bool(g.abs().sum() > 0) for g in both.values())
    # the heads add nothing to the projector's gradient: their inputs are detached
    model.zero_grad()
    vita_audio_stage(4, plus=True, num_heads=2, mtp_loss_weight=0.0).apply(model)
    model(**batch)["loss"].backward()
    for n, p in model.audio_projection.named_parameters():
        torch.testing.assert_close(p.grad, both[n], rtol=0, atol=0)
    # backbone states use the frames; the heads embed the placeholder ids (official semantics)
    with torch.no_grad():
        again = model(**batch)
        plain = model.backbone(batch["input_ids"], position_ids=batch["position_ids"])
        embeds = model._embed(
            batch["input_ids"], batch["audio_features"], batch["audio_feature_lengths"]
        )
        hidden = model.backbone(
            batch["input_ids"], position_ids=batch["position_ids"], inputs_embeds=embeds
        ).hidden
        assert not torch.allclose(hidden, plain.hidden)
        heads = model.stack(
            hidden,
            batch["input_ids"],
            position_ids=batch["position_ids"],
            labels=batch["labels"],
            return_logits=False,
        )
    torch.testing.assert_close(again["head_sums"], heads.loss_sums)


def test_plus_stage_modes_and_errors(sensevoice):
    model = _plus(sensevoice, 2, heads=1)
    assert not any(p.requires_grad for p in model.audio_projection.parameters())
    vita_audio_stage(4, plus=True, num_heads=1, audio_encoder="train", mtp_loss_weight=1.0).apply(
        model
    )
    assert all(p.requires_grad for p in model.audio_model.parameters())
    with pytest.raises(ValueError, match="no audio_features"):
        b = _plus_batch(sensevoice)
        del b["audio_features"], b["audio_feature_lengths"]
        model(**b)
    with pytest.raises(ValueError, match="together"):
        MCTPTrainingModel(backbone=tiny_backbone(), audio_placeholder_id=3)
    plain = MCTPTrainingModel(backbone=tiny_backbone())
    with pytest.raises(ValueError, match="trains audio_projection"):
        vita_audio_stage(4, plus=True, num_heads=1, mtp_loss_weight=1.0).apply(plain)


def test_gradient_checkpointing_gives_the_same_loss_and_gradients(family):
    feats = samples(3)
    results = []
    for checkpointing in (False, True):
        model = _model(family, 4)
        if checkpointing:
            model.gradient_checkpointing_enable()
            assert model.backbone.is_gradient_checkpointing
        model.train()
        out = model(**PackedCollator()(feats))
        out["loss"].backward()
        results.append((float(out["loss"]), _grads(model)))
    (a, ga), (b, gb) = results
    assert a == pytest.approx(b, rel=1e-6) and ga.keys() == gb.keys()
    for k in ga:
        torch.testing.assert_close(ga[k], gb[k], rtol=1e-5, atol=1e-7, msg=k)
