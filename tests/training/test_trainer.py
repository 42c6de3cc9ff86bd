"""mctp.training.MCTPTrainer: per-head logs, evaluation, non-finite guard, atomic saves, LoRA."""

from __future__ import annotations

import os

import pytest
import torch
from training_helpers import samples, tiny_backbone
from transformers import TrainerCallback, TrainingArguments

from mctp.training import (
    STAGING_DIR,
    MCTPTrainer,
    MCTPTrainingModel,
    NonFiniteLossError,
    NonFiniteWeightsError,
    PackedCollator,
    merged_lora,
    save_lora_adapter,
    vita_audio_stage,
)


def _trainer(tmp_path, *, stage=4, heads=2, steps=3, family="qwen2", **kw):
    model = MCTPTrainingModel(backbone=tiny_backbone(family))
    preset = vita_audio_stage(stage, num_heads=heads, lr=1e-3, max_steps=steps, mtp_loss_weight=1.0)
    preset.apply(model)
    opts = dict(
        output_dir=str(tmp_path),
        max_steps=steps,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        learning_rate=1e-3,
        logging_steps=1,
        save_steps=1,
        save_total_limit=2,
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
    )
    opts.update(kw.pop("args", {}))
    return MCTPTrainer(
        model=model,
        args=TrainingArguments(**opts),
        stage=preset,
        data_collator=PackedCollator(),
        train_dataset=samples(16),
        **kw,
    )


def test_logs_eval_and_keep_last_n(tmp_path, family):
    t = _trainer(
        tmp_path,
        family=family,
        eval_dataset=samples(4, seed=9),
        args={"eval_strategy": "steps", "eval_steps": 3, "per_device_eval_batch_size": 2},
    )
    t.train()
    logs = [h for h in t.state.log_history if "loss" in h and "eval_loss" not in h]
    assert [h["step"] for h in logs] == [1, 2, 3]
    for h in logs:
        assert {
            "loss_main",
            "loss_head_0",
            "loss_head_1",
            "tokens_per_second",
            "learning_rate",
        } <= set(h)
        assert h["tokens_per_second"] > 0
    ev = next(h for h in t.state.log_history if "eval_loss" in h)
    for k in (0, 1):
        assert 0.0 <= ev[f"eval_agreement_head_{k}"] <= 1.0 and ev[f"eval_loss_head_{k}"] > 0
    assert ev["eval_loss"] > ev["eval_loss_main"]  # main + weight x heads
    assert sorted(os.listdir(tmp_path)) == [STAGING_DIR, "checkpoint-2", "checkpoint-3"]
    assert os.listdir(tmp_path / STAGING_DIR) == []  # every staged save was published


class _Poison(TrainerCallback):
    """Make the backbone output NaN during optimizer step ``at`` (1-based)."""

    def __init__(self, model, at):
        self.at, self.handle, self.model = at, None, model
        self.before = None

    def on_step_begin(self, args, state, control, **kw):
        if state.global_step + 1 == self.at:
            self.before = {n: p.detach().clone() for n, p in self.model.named_parameters()}
            norm = self.model.backbone.base.norm
            self.handle = norm.register_forward_hook(lambda m, i, o: o * float("nan"))

    def on_step_end(self, args, state, control, **kw):
        if self.handle is not None:
            self.handle.remove()
            self.handle = None


def test_nonfinite_loss_stops_with_a_clear_message(tmp_path):
    t = _trainer(tmp_path)
    t.add_callback(_Poison(t.model, at=2))
    with pytest.raises(NonFiniteLossError, match="optimizer step 2"):
        t.train()
    assert sorted(os.listdir(tmp_path)) == [STAGING_DIR, "checkpoint-1"]
    assert all(bool(torch.isfinite(p).all()) for p in t.model.parameters())


def test_nonfinite_loss_skips_the_step(tmp_path):
    t = _trainer(tmp_path, on_nonfinite="skip")
    poison = _Poison(t.model, at=2)
    t.add_callback(poison)
    seen = {}

    class After(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == 2:
                seen.update({n: p.detach().clone() for n, p in t.model.named_parameters()})

    t.add_callback(After())
    t.train()
    assert t.skipped_steps == 1 and t.state.global_step == 3
    assert all(torch.equal(seen[n], poison.before[n]) for n in seen)  # step 2 changed nothing
    assert all(bool(torch.isfinite(p).all()) for p in t.model.parameters())
    assert [h.get("skipped_steps") for h in t.state.log_history if "loss" in h][1] == 1.0


def test_nonfinite_weights_are_never_saved(tmp_path):
    t = _trainer(tmp_path)
    with torch.no_grad():
        t.model.stack.heads[0].proj.weight[0, 0] = float("inf")
    with pytest.raises(NonFiniteWeightsError, match="refusing to save"):
        t.save_model(str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()
    t.state.global_step = 1
    with pytest.raises(NonFiniteWeightsError):
        t._save_checkpoint(t.model, None)  # what train() calls at a save step
    assert not (tmp_path / "checkpoint-1").exists()
    with pytest.raises(NonFiniteLossError, match="optimizer step 1"):  # training stops first
        t.train()


def test_lora_adapter_in_peft_format(tmp_path):
    from peft import PeftModel

    from mctp.backbones import add_lora

    bb = tiny_backbone()
    base = {k: v.clone() for k, v in bb.model.state_dict().items()}
    add_lora(bb.model, r=2, alpha=4, target_modules=["q_proj", "v_proj"])
    with torch.no_grad():
        for n, p in bb.model.named_parameters():
            if "lora_B" in n:
                p.normal_()
    folder = save_lora_adapter(bb.model, tmp_path / "adapter", base_model_name_or_path="base")
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(os.listdir(folder))
    fresh = tiny_backbone().model
    fresh.load_state_dict(base)
    loaded = PeftModel.from_pretrained(fresh, str(folder))
    q_ours = bb.model.model.layers[0].self_attn.q_proj
    q_peft = loaded.base_model.model.model.layers[0].self_attn.q_proj
    torch.testing.assert_close(
        q_peft.get_delta_weight("default"), q_ours.get_delta_weight("default")
    )
    with pytest.raises(ValueError, match="no PEFT adapter"):
        save_lora_adapter(tiny_backbone().model, tmp_path / "none")
    expected = q_ours.get_base_layer().weight + q_ours.get_delta_weight("default")
    with merged_lora(bb.model):
        state = bb.model.state_dict()
        assert not any("lora_" in k for k in state) and set(state) == set(base)
        torch.testing.assert_close(state["model.layers.0.self_attn.q_proj.weight"], expected)
    assert bb.model.model.layers[0].self_attn.q_proj is q_ours  # adapters are back
