"""examples/vita_audio/train.py: the four stages, checkpoints, resume and the CLI on tiny models.

Every run starts from a random tiny Qwen2 folder with a word-level tokenizer and a synthetic
ASR/TTS/speech-QA/text dataset (DummyCodec audio), written by ``make_tiny_assets``.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from vita_audio.checkpoint import load_vita_audio
from vita_audio.config import TrainConfig, load_config
from vita_audio.tiny import make_tiny_assets
from vita_audio.train import STATE_FILE, Trainer, warmup_cosine

ROOT = Path(__file__).resolve().parents[2]

TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
TINY.update(num_key_value_heads=2, max_position_embeddings=256)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return make_tiny_assets(tmp_path_factory.mktemp("assets"), seed=0, records=6, **TINY)


def _cfg(assets, out, stage, *, path=None, heads=0, steps=3, **sections):
    raw = {
        "stage": stage,
        "model": {"path": path or assets["model"], "num_heads": heads},
        "data": {"mixture": assets["mixture"], "interleave": [1, 4, 2, 4], "max_len": 128},
        "optim": {"lr": 1e-3, "max_steps": steps, "global_batch": 2, "warmup_ratio": 0.0},
        "run": {"out_dir": str(out), "device": "cpu", "progress": False, "save_total_limit": 0},
    }
    for name, values in sections.items():
        raw[name].update(values)
    return TrainConfig.from_dict(raw)


def _snapshot(module):
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _changed(before, module):
    return [n for n, p in module.named_parameters() if not torch.equal(before[n], p)]


@pytest.fixture(scope="module")
def stage2_ckpt(assets, tmp_path_factory):
    trainer = Trainer(_cfg(assets, tmp_path_factory.mktemp("s2"), 2, heads=1, steps=1))
    return trainer.fit()


def test_stage1_trains_the_llm_alone(assets, tmp_path):
    t = Trainer(_cfg(assets, tmp_path, 1))
    assert t.stack is None and not t.frozen
    assert t.vocab.num_audio == 64 and t.backbone.vocab_size == t.vocab.vocab_size  # extended
    before = _snapshot(t.backbone)
    folder = t.fit()
    assert folder.name == "checkpoint-3" and len(t.history) == 3
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in t.history)
    assert len(_changed(before, t.backbone)) == len(before)  # every LLM parameter moved
    ckpt = load_vita_audio(folder)
    assert ckpt.stack is None and ckpt.config["num_nextn_predict_layers"] == 0


def test_stage2_freezes_llm_and_trains_one_head(assets, tmp_path):
    t = Trainer(_cfg(assets, tmp_path, 2, heads=1))
    assert t.frozen and t.stack.num_heads == 1
    last = t.backbone.base.layers[-1].state_dict()
    assert all(torch.equal(v, t.stack.heads[0].block.state_dict()[k]) for k, v in last.items())
    assert not any(p.requires_grad for p in t.backbone.parameters())
    assert [g["name"] for g in t.optimizer.param_groups] == ["mctp", "mctp_no_decay"]
    llm, heads = _snapshot(t.backbone), _snapshot(t.stack)
    t.fit()
    assert _same(llm, _snapshot(t.backbone))  # bit-identical LLM (embeddings, lm_head included)
    assert len(_changed(heads, t.stack)) == len(heads)
    assert all(h["per_head"] is not None and len(h["per_head"]) == 1 for h in t.history)


def test_stage3_grows_heads_from_head0(assets, tmp_path, stage2_ckpt):
    t = Trainer(_cfg(assets, tmp_path, 3, path=str(stage2_ckpt), heads=4))
    trained = load_vita_audio(stage2_ckpt).stack.heads[0].state_dict()
    assert t.stack.num_heads == 4
    for head in t.stack.heads:  # 1..3 are copies of the trained head 0
        assert all(torch.equal(v, head.state_dict()[k]) for k, v in trained.items())
    llm, heads = _snapshot(t.backbone), _snapshot(t.stack)
    folder = t.fit()
    assert _same(llm, _snapshot(t.backbone))
    assert len(_changed(heads, t.stack)) == len(heads)
    assert len(t.history[-1]["per_head"]) == 4
    assert load_vita_audio(folder).stack.num_heads == 4


def test_stage4_mctp_group_and_loss_decreases(assets, tmp_path, stage2_ckpt):
    optim = {"lr": 5e-4, "mctp_lr_mult": 10.0, "max_steps": 1000, "global_batch": 1}
    t = Trainer(_cfg(assets, tmp_path, 4, path=str(stage2_ckpt), heads=2, optim=optim))
    groups = {g["name"]: g["lr"] for g in t.optimizer.param_groups}
    assert groups["mctp"] == groups["mctp_no_decay"] == pytest.approx(5e-3)
    assert groups["backbone"] == groups["backbone_no_decay"] == pytest.approx(5e-4)
    stacked = {
        id(p) for g in t.optimizer.param_groups if g["name"].startswith("mctp") for p in g["params"]
    }
    assert stacked == {id(p) for p in t.stack.parameters()}
    batch = next(t.data.batches())
    llm = _snapshot(t.backbone)
    losses = [t.step(iter([batch]))["loss"] for _ in range(6)]  # one repeated batch
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0] - 0.1
    assert _changed(llm, t.backbone)  # the LLM trains in stage 4


def test_checkpoint_resume_is_exact(assets, tmp_path):
    run = {"save_every": 2, "seed": 7}
    straight = Trainer(_cfg(assets, tmp_path / "a", 2, heads=1, steps=4, run=run))
    straight.fit()
    assert (tmp_path / "a" / "checkpoint-2" / STATE_FILE).is_file()
    resume = dict(run, resume=str(tmp_path / "a" / "checkpoint-2"))
    again = Trainer(_cfg(assets, tmp_path / "b", 2, heads=1, steps=4, run=resume))
    assert again.step_count == 2 and again.micro_batches == 4
    assert {float(s["step"]) for s in again.optimizer.state.values()} == {2.0}
    assert not _same(_snapshot(again.stack), _snapshot(straight.stack))
    again.fit()
    assert again.step_count == 4
    assert _same(_snapshot(again.stack), _snapshot(straight.stack))
    assert [h["loss"] for h in again.history] == [h["loss"] for h in straight.history[2:]]
    auto = Trainer(_cfg(assets, tmp_path / "a", 2, heads=1, steps=4, run=dict(run, resume="auto")))
    assert auto.step_count == 4 and _same(_snapshot(auto.stack), _snapshot(straight.stack))


def test_lora_stage4_saves_merged_official_weights(assets, tmp_path, stage2_ckpt):
    lora = {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}
    t = Trainer(_cfg(assets, tmp_path, 4, path=str(stage2_ckpt), heads=1, model={"lora": lora}))
    assert [g["name"] for g in t.optimizer.param_groups] == ["backbone", "mctp", "mctp_no_decay"]
    assert all("lora_" in n for n, p in t.backbone.named_parameters() if p.requires_grad)
    folder = t.fit()
    ckpt = load_vita_audio(folder)  # strict: official key names only, no lora_* keys
    q = t.backbone.base.layers[0].self_attn.q_proj
    merged = q.get_base_layer().weight + q.get_delta_weight("default")
    assert torch.allclose(ckpt.backbone.base.layers[0].self_attn.q_proj.weight, merged, atol=1e-6)
    assert not torch.allclose(merged, q.get_base_layer().weight)
    again = Trainer(
        _cfg(
            assets,
            tmp_path,
            4,
            path=str(stage2_ckpt),
            heads=1,
            model={"lora": lora},
            run={"resume": "auto"},
        )
    )
    assert again.step_count == 3
    assert _same(
        {n: p for n, p in again.backbone.named_parameters() if "lora_" in n},
        {n: p for n, p in t.backbone.named_parameters() if "lora_" in n},
    )


def test_config_errors_and_overrides(assets, tmp_path):
    with pytest.raises(ValueError, match="stage 1 trains the LLM alone"):
        _cfg(assets, tmp_path, 1, heads=1)
    with pytest.raises(ValueError, match="must be >= 1"):
        _cfg(assets, tmp_path, 3, heads=0)
    with pytest.raises(ValueError, match="unknown keys in 'optim'"):
        _cfg(assets, tmp_path, 1, optim={"learning_rate": 1.0})
    with pytest.raises(ValueError, match="freezes the LLM"):
        _cfg(assets, tmp_path, 2, heads=1, model={"lora": {"r": 2}})
    cfg = load_config(
        ROOT / "examples/vita_audio/recipes/stage4.yaml",
        ["optim.lr=1e-4", "model.path=/x", "run.out_dir=o", "data.max_len=64"],
    )
    assert (
        TrainConfig.from_dict(cfg).optim.lr == 1e-4
        and cfg["data"]["max_len"] == 64
        and cfg["optim"]["mctp_lr_mult"] == 10
    )
    f = warmup_cosine(3, 13)
    assert [f(0), f(3), f(8), f(13)] == pytest.approx([0.0, 1.0, 0.5, 0.0])


@pytest.mark.parametrize("stage", [1, 2, 3, 4])
def test_stage_recipes_parse(stage):
    cfg = load_config(ROOT / f"examples/vita_audio/recipes/stage{stage}.yaml", ["model.path=/m"])
    c = TrainConfig.from_dict(cfg)
    lr, heads, mult = {
        1: (6e-5, 0, 1.0),
        2: (1e-3, 1, 1.0),
        3: (1e-3, 10, 1.0),
        4: (5e-5, 10, 10.0),
    }[stage]
    assert (c.stage, c.optim.lr, c.model.num_heads, c.optim.mctp_lr_mult) == (
        stage,
        lr,
        heads,
        mult,
    )
    assert c.optim.betas == (0.9, 0.95) and c.optim.eps == 1e-8 and c.optim.clip == 1.0
    assert c.optim.warmup_ratio == 0.03 and c.optim.global_batch == 256


def test_cli_tiny_recipe_end_to_end(tmp_path):
    out = tmp_path / "tiny"
    cmd = [
        sys.executable,
        str(ROOT / "examples/vita_audio/train.py"),
        "--config",
        str(ROOT / "examples/vita_audio/recipes/tiny.yaml"),
        "--override",
        f"run.out_dir={out}",
        "run.progress=false",
    ]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for stage in (1, 2, 3, 4):
        assert f"stage {stage}: " in proc.stdout
    final = load_vita_audio(out / "stage4" / "checkpoint-3")
    assert final.stack is not None and final.stack.num_heads == 4
