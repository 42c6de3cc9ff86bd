"""SIGKILL the tiny 4-stage recipe at several points (during saves too), resume, compare.

The resumed run must log the same losses and end with bit-identical fp32 weights in every
stage's final folder as the uninterrupted run (``tiny_reference``).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from recipe_checks import STAGES, final_weights, trajectory

from mctp.training import STAGING_DIR

DRIVER = Path(__file__).with_name("recipe_driver.py")


ROOT = Path(__file__).resolve().parents[2]
CPU_COMMAND = "python examples/vita_audio/train.py --config examples/vita_audio/recipes/tiny.yaml"


def _run(out: Path, kill: str = "") -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    if kill:
        cmd = [sys.executable, str(DRIVER), str(out), kill]
    else:  # TRAINING.md's CPU command (without progress bars and TensorBoard files)
        cmd = [sys.executable, *CPU_COMMAND.split()[1:]]
        cmd += ["--override", f"run.out_dir={out}", "run.progress=false", "run.report_to=none"]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)


@pytest.mark.slow
def test_sigkill_and_resume_equal_the_uninterrupted_run(tmp_path, tiny_reference):
    out = tmp_path / "run"
    # 1: killed while writing stage 1's checkpoint-3 (half an optimizer.pt on disk)
    p = _run(out, "save:1:3:optimizer.pt")
    assert p.returncode == -signal.SIGKILL, p.stderr[-2000:]
    s1 = out / "stage1"
    assert (s1 / "checkpoint-2").is_dir() and not (s1 / "checkpoint-3").exists()
    assert (s1 / STAGING_DIR / "checkpoint-3" / "optimizer.pt").is_file()  # the torn save
    # 2: resumes stage 1 mid-stage from checkpoint-2; killed after stage 3's checkpoint-2
    p = _run(out, "saved:3:2")
    assert p.returncode == -signal.SIGKILL, p.stderr[-2000:]
    assert (out / "stage2" / "final" / "config.json").is_file()
    assert (out / "stage3" / "checkpoint-2").is_dir() and not (out / "stage3" / "final").exists()
    # 3: resumes stage 3 mid-stage; killed while its final folder is being written
    p = _run(out, "export:3")
    assert p.returncode == -signal.SIGKILL, p.stderr[-2000:]
    assert not (out / "stage3" / "final").exists()
    assert (out / "stage3" / STAGING_DIR / "final" / "model.safetensors").is_file()
    assert "stage 1: already complete" in p.stdout and "stage 2: already complete" in p.stdout
    # 4: re-exports stage 3 from its last checkpoint, runs stage 4 (TRAINING.md's CPU command)
    p = _run(out)
    assert p.returncode == 0 and "stage 4: step 3" in p.stdout, p.stderr[-3000:]
    for stage in STAGES:
        assert trajectory(out, stage) == trajectory(tiny_reference, stage), stage
        ref, got = final_weights(tiny_reference, stage), final_weights(out, stage)
        assert ref.keys() == got.keys()
        assert all(torch.equal(ref[k], got[k]) for k in ref), stage
        assert all(v.dtype == torch.float32 for v in got.values())
    assert [len(list((out / f"stage{s}").glob("checkpoint-*"))) for s in STAGES] == [2, 2, 2, 2]
    sys.path.insert(0, str(ROOT / "examples"))
    from vita_audio.model import VitaAudio

    heads = [VitaAudio.from_pretrained(out / f"stage{s}" / "final").stack for s in STAGES]
    assert [0 if h is None else h.num_heads for h in heads] == [0, 1, 4, 4]


def test_training_md_lists_the_tested_cpu_commands():
    text = (ROOT / "examples/vita_audio/TRAINING.md").read_text()
    assert CPU_COMMAND in text
    from test_distributed import TORCHRUN_COMMAND

    assert TORCHRUN_COMMAND in text
