"""Comparisons of tiny-recipe runs (losses per logged step, final weights) for the slow tests."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

STAGES = (1, 2, 3, 4)
NUMBERS = ("loss", "loss_main", "grad_norm", "learning_rate")


def trajectory(out: Path, stage: int) -> list[dict[str, float]]:
    """Logged training numbers of a stage, from its last checkpoint's trainer_state.json."""
    folder = out / f"stage{stage}"
    last = max(folder.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    history = json.loads((last / "trainer_state.json").read_text())["log_history"]
    rows = []
    for h in history:
        if "loss" in h and "train_runtime" not in h:
            rows.append({k: v for k, v in h.items() if k in NUMBERS or k.startswith("loss_head_")})
    return rows


def final_weights(out: Path, stage: int) -> dict[str, torch.Tensor]:
    """Tensors of the stage's official-format final folder."""
    return load_file(out / f"stage{stage}" / "final" / "model.safetensors")
