"""The tiny recipe under torchrun (2 gloo CPU processes, DDP and FSDP); the DeepSpeed configs.

Two processes with the same global batch (1 pack per process per step instead of 2 packs
accumulated in one process) must log the same losses (1e-5) and end with the same weights;
only rank 0 writes checkpoints, the final folders and the TensorBoard logs.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from native_abort import run_torchrun
from recipe_checks import STAGES, final_weights, trajectory

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
TORCHRUN_COMMAND = (
    "torchrun --standalone --nproc_per_node 2 examples/vita_audio/train.py "
    "--config examples/vita_audio/recipes/tiny.yaml"
)


def _torchrun(
    script: Path, *args: str, out: Path, overrides: tuple[str, ...] = ()
) -> subprocess.CompletedProcess:
    """Run ``script`` on 2 gloo processes writing to ``out`` (plus config ``overrides``); one
    fresh retry after a rank's native abort (:mod:`native_abort`)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    return run_torchrun(
        [*cmd, str(script), *args, "--override", f"run.out_dir={out}", "run.progress=false",
         *overrides],
        before_retry=lambda: shutil.rmtree(out, ignore_errors=True),
        timeout=400,
        env=env,
        cwd=ROOT,
    )  # fmt: skip


def _close(a: list[dict[str, float]], b: list[dict[str, float]], tol: float = 1e-5) -> None:
    assert len(a) == len(b) and len(a) > 0
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            assert abs(x[k] - y[k]) <= tol * max(1.0, abs(y[k])), (k, x[k], y[k])


@pytest.mark.slow
def test_two_gloo_processes_equal_one(tmp_path, tiny_reference):
    out = tmp_path / "ddp"
    # TRAINING.md's CPU command, with the output folder and no progress bars
    cli, *args = TORCHRUN_COMMAND.split()[4:]
    p = _torchrun(ROOT / cli, *args, out=out)
    assert p.returncode == 0, p.stderr[-4000:]
    assert p.stdout.count("stage 1 config:") == 1  # config printed once, by rank 0
    assert p.stdout.count("stage 4: step 3") == 1
    for stage in STAGES:
        _close(trajectory(out, stage), trajectory(tiny_reference, stage))
        ref, got = final_weights(tiny_reference, stage), final_weights(out, stage)
        assert ref.keys() == got.keys()
        for k in ref:
            torch.testing.assert_close(got[k], ref[k], rtol=1e-5, atol=1e-6, msg=k)
        folder = out / f"stage{stage}"
        events = list((folder / "runs").rglob("events.out.tfevents.*"))
        assert len(events) == 1, events  # one TensorBoard writer
        ckpt = max(folder.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
        assert json.loads((ckpt / "trainer_state.json").read_text())["global_step"] == 3
        assert not list(folder.glob("*.old")) and not list((folder / ".staging").iterdir())


def _accelerate_has_fsdp2() -> bool:
    import accelerate
    from packaging.version import Version

    return Version(accelerate.__version__) >= Version("1.6.0")


@pytest.mark.slow
@pytest.mark.skipif(not _accelerate_has_fsdp2(), reason="FSDP2 needs accelerate >= 1.6.0")
def test_fsdp_full_shard_on_cpu_equals_one_process(tmp_path, tiny_reference):
    """FSDP2 full shard runs on CPU/gloo here: same losses and final weights as one process."""
    out = tmp_path / "fsdp"
    cli, *args = TORCHRUN_COMMAND.split()[4:]
    fsdp = ["run.fsdp=true", "run.fsdp_config=examples/vita_audio/recipes/fsdp/full_shard.json"]
    p = _torchrun(ROOT / cli, *args, out=out, overrides=tuple(fsdp))
    assert p.returncode == 0, p.stderr[-4000:]
    for stage in STAGES:
        _close(trajectory(out, stage), trajectory(tiny_reference, stage))
        ref, got = final_weights(tiny_reference, stage), final_weights(out, stage)
        assert ref.keys() == got.keys()  # gathered from the shards for the official folder
        for k in ref:
            torch.testing.assert_close(got[k], ref[k], rtol=1e-5, atol=1e-6, msg=k)


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_configs_pass_deepspeed_validation(stage):
    """The shipped ZeRO configs, filled by transformers' integration, pass DeepSpeed's checks."""
    pytest.importorskip("deepspeed")
    from types import SimpleNamespace

    from deepspeed.runtime.config import DeepSpeedConfig
    from transformers import TrainingArguments
    from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig

    path = ROOT / f"examples/vita_audio/recipes/deepspeed/zero{stage}.json"
    args = TrainingArguments(
        output_dir="unused",
        use_cpu=True,
        per_device_train_batch_size=1,
        gradient_accumulation_steps=8,
        max_grad_norm=1.0,
        report_to="none",
    )
    hf = HfTrainerDeepSpeedConfig(json.loads(path.read_text()))
    hf.trainer_config_process(args)
    hf.trainer_config_finalize(
        args, SimpleNamespace(config=SimpleNamespace(hidden_size=3584)), 8000
    )
    ds = DeepSpeedConfig(hf.config)
    assert ds.zero_optimization_stage == stage
    assert (ds.train_batch_size, ds.gradient_accumulation_steps, ds.gradient_clipping) == (
        8,
        8,
        1.0,
    )
    broken = json.loads(path.read_text())
    broken["zero_optimization"]["stage"] = 7
    hf = HfTrainerDeepSpeedConfig(broken)
    hf.trainer_config_process(args)
    hf.trainer_config_finalize(args, SimpleNamespace(config=SimpleNamespace(hidden_size=64)), 10)
    with pytest.raises(Exception):  # noqa: B017 - DeepSpeed's own validation rejects it
        DeepSpeedConfig(hf.config)
