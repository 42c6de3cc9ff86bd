"""examples/vita_audio/train.py on mctp.training: stage semantics, exports, loss weight, recipes.

The multi-process, FSDP and kill/resume runs of the tiny recipe are in tests/training.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from vita_audio.checkpoint import load_vita_audio, save_vita_audio
from vita_audio.config import TrainConfig, load_config
from vita_audio.model import VitaAudio
from vita_audio.tiny import make_tiny_assets
from vita_audio.train import FINAL_DIR, build_stage, run_stage

ROOT = Path(__file__).resolve().parents[2]

TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
TINY.update(num_key_value_heads=2, max_position_embeddings=256)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return make_tiny_assets(tmp_path_factory.mktemp("assets"), seed=0, records=4, **TINY)


def _cfg(assets, out, stage, *, path=None, heads=0, steps=2, **sections):
    raw = {
        "stage": stage,
        "model": {"path": path or assets["model"], "num_heads": heads},
        "data": {"mixture": assets["mixture"], "interleave": [1, 4, 2, 4], "max_len": 128},
        "optim": {"lr": 1e-3, "max_steps": steps, "global_batch": 2, "warmup_ratio": 0.0},
        "run": {"out_dir": str(out), "device": "cpu", "progress": False, "report_to": "none"},
    }
    for name, values in sections.items():
        raw[name].update(values)
    return TrainConfig.from_dict(raw)


def _snapshot(module):
    return {n: p.detach().clone() for n, p in module.named_parameters()}


@pytest.fixture(scope="module")
def stage1_final(assets, tmp_path_factory):
    return run_stage(_cfg(assets, tmp_path_factory.mktemp("s1"), 1, steps=1))


def test_stage1_trains_the_llm_and_exports(assets, stage1_final):
    ckpt = load_vita_audio(stage1_final)
    assert ckpt.stack is None and ckpt.config["num_nextn_predict_layers"] == 0
    assert ckpt.backbone.vocab_size > 100  # speech tokens were added
    model = VitaAudio.from_pretrained(stage1_final)
    assert model.tokenizer is not None and model.vocab.num_audio == 64
    info = json.loads((stage1_final / "mctp_stage.json").read_text())
    assert info["stage"] == 1 and info["steps"] == 1


def test_stage2_freezes_the_llm_trains_head0_and_loads(assets, tmp_path, stage1_final):
    cfg = _cfg(
        assets,
        tmp_path,
        2,
        path=str(stage1_final),
        heads=1,
        run={"eval_every": 2},
        data={"eval_packs": 1},
    )
    run = build_stage(cfg)
    m = run.model
    assert not m.train_backbone and m.num_heads == 1
    last = m.backbone.base.layers[-1].state_dict()
    assert all(torch.equal(v, m.stack.heads[0].block.state_dict()[k]) for k, v in last.items())
    llm, heads = _snapshot(m.backbone), _snapshot(m.stack)
    run.trainer.train()
    opt = run.trainer.optimizer
    assert sorted(g["name"] for g in opt.param_groups) == ["mctp", "mctp_no_decay"]
    assert all(torch.equal(v, dict(m.backbone.named_parameters())[k]) for k, v in llm.items())
    assert all(not torch.equal(v, dict(m.stack.named_parameters())[k]) for k, v in heads.items())
    history = run.trainer.state.log_history
    assert any("eval_agreement_head_0" in h and "eval_loss_head_0" in h for h in history)
    assert all("loss_head_0" in h for h in history if "loss" in h and "train_runtime" not in h)


def test_checkpoint_mtp_loss_weight_unless_overridden(assets, tmp_path, stage1_final):
    ckpt = load_vita_audio(stage1_final)
    from mctp import MCTPStack

    stack = MCTPStack.from_backbone(ckpt.backbone.parts(), 1)
    tok = VitaAudio.from_pretrained(stage1_final).tokenizer
    start = save_vita_audio(
        ckpt.backbone, stack, tmp_path / "start", mtp_loss_weight=0.3, tokenizer=tok
    )
    cfg = _cfg(assets, tmp_path / "a", 3, path=str(start), heads=2)
    cfg.model.gradient_checkpointing = True
    run = build_stage(cfg)
    assert run.model.backbone.is_gradient_checkpointing
    assert run.model.mtp_loss_weight == pytest.approx(0.3) and run.model.num_heads == 2
    assert run.preset.mtp_loss_weight == pytest.approx(0.3)
    override = _cfg(
        assets, tmp_path / "b", 3, path=str(start), heads=2, model={"mtp_loss_weight": 0.7}
    )
    assert build_stage(override).model.mtp_loss_weight == pytest.approx(0.7)


def test_stage4_lora_exports_merged_official_weights_and_a_peft_adapter(
    assets, tmp_path, stage1_final
):
    from peft import PeftModel

    lora = {"r": 2, "alpha": 4, "target_modules": ["q_proj", "v_proj"]}
    cfg = _cfg(assets, tmp_path, 4, path=str(stage1_final), heads=2, model={"lora": lora})
    cfg.optim.mctp_lr_mult = 10.0
    folder = run_stage(cfg)
    assert folder == tmp_path / FINAL_DIR
    final = load_vita_audio(folder)  # strict: official keys only, merged LoRA
    assert final.stack.num_heads == 2
    base = load_vita_audio(stage1_final).backbone.model
    adapted = PeftModel.from_pretrained(base, str(folder / "adapter"))
    merged = adapted.merge_and_unload()
    torch.testing.assert_close(
        merged.model.layers[0].self_attn.q_proj.weight,
        final.backbone.base.layers[0].self_attn.q_proj.weight,
        rtol=1e-5,
        atol=1e-6,
    )
    assert run_stage(cfg) == folder  # complete: not run again


def test_config_errors_and_overrides(assets, tmp_path):
    with pytest.raises(ValueError, match="stage 1 trains the LLM alone"):
        _cfg(assets, tmp_path, 1, heads=1)
    with pytest.raises(ValueError, match="must be >= 1"):
        _cfg(assets, tmp_path, 3, heads=0)
    with pytest.raises(ValueError, match="unknown keys in 'optim'"):
        _cfg(assets, tmp_path, 1, optim={"learning_rate": 1.0})
    with pytest.raises(ValueError, match="freezes the LLM"):
        _cfg(assets, tmp_path, 2, heads=1, model={"lora": {"r": 2}})
    with pytest.raises(ValueError, match="multiple of"):
        _cfg(assets, tmp_path, 1, optim={"global_batch": 3, "per_device_batch": 2})
    with pytest.raises(ValueError, match="on_nonfinite"):
        _cfg(assets, tmp_path, 1, run={"on_nonfinite": "ignore"})
    with pytest.raises(ValueError, match="eval_packs"):
        _cfg(assets, tmp_path, 1, run={"eval_every": 5})
    cfg = load_config(
        ROOT / "examples/vita_audio/recipes/stage4.yaml",
        ["optim.lr=1e-4", "model.path=/x", "run.out_dir=o", "data.max_len=64"],
    )
    assert TrainConfig.from_dict(cfg).optim.lr == 1e-4 and cfg["data"]["max_len"] == 64


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
    assert c.model.gradient_checkpointing and c.run.resume == "auto"
    assert c.model.mtp_loss_weight is None  # the checkpoint's, as officially


def test_tiny_recipe_runs_with_gradient_checkpointing():
    cfg = load_config(ROOT / "examples/vita_audio/recipes/tiny.yaml")
    assert cfg["model"]["gradient_checkpointing"] is True and cfg["run"]["resume"] == "auto"


def test_plus_stage_trains_the_projector_and_exports_the_audio_parts(
    assets, tmp_path, fixtures_dir
):
    sensevoice = str(fixtures_dir / "sensevoice")
    cfg = _cfg(assets, tmp_path, 1, steps=1, model={"audio_encoder": sensevoice})
    run = build_stage(cfg)
    m = run.model
    assert m.is_plus and m.detach_mtp_inputs and m.audio_placeholder_id == run.vocab.audio_context
    assert not any(p.requires_grad for p in m.audio_model.parameters())  # encoder frozen
    rows = [run.trainer.train_dataset[i] for i in range(len(run.trainer.train_dataset))]
    with_audio = [r for r in rows if r["audio_features"]]
    assert with_audio  # ASR / speech-QA questions carry encoder features
    for r in with_audio:
        slots = sum(x == m.audio_placeholder_id for x in r["input_ids"])
        assert slots == sum(f.shape[0] + 4 for f in r["audio_features"])
    before = {n: p.detach().clone() for n, p in m.audio_projection.named_parameters()}
    run.trainer.train()
    assert all(not torch.equal(before[n], p) for n, p in m.audio_projection.named_parameters())
    from vita_audio.train import export_stage

    folder = export_stage(run, tmp_path / FINAL_DIR)
    ckpt = load_vita_audio(folder)
    assert ckpt.config["model_type"] == "qwen2_mtp_sensevoice"
    proj = {
        k.removeprefix("model.audio_projection."): v
        for k, v in ckpt.extra.items()
        if "projection" in k
    }
    assert proj.keys() == m.audio_projection.state_dict().keys()
    assert all(torch.equal(v, m.audio_projection.state_dict()[k]) for k, v in proj.items())
    # the next stage starts from the exported audio parts
    nxt = build_stage(
        _cfg(
            assets,
            tmp_path / "s2",
            2,
            path=str(folder),
            heads=1,
            model={"audio_encoder": sensevoice},
        )
    )
    assert all(torch.equal(v, nxt.model.audio_projection.state_dict()[k]) for k, v in proj.items())
    assert not any(p.requires_grad for p in nxt.model.audio_projection.parameters())


def test_streaming_data_trains(assets, tmp_path):
    cfg = _cfg(assets, tmp_path, 1, steps=2, data={"streaming": True}, run={"num_workers": 0})
    run = build_stage(cfg)
    assert not hasattr(run.trainer.train_dataset, "__len__")
    run.trainer.train()
    assert run.trainer.state.global_step == 2
    with pytest.raises(ValueError, match=r"not with data\.streaming"):
        _cfg(assets, tmp_path, 1, data={"streaming": True, "eval_packs": 1})
