"""Fixtures of the mctp.training tests; their helpers live in training_helpers.py."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(params=["qwen2", "llama"])
def family(request) -> str:
    """Both backbone families the training API is tested on."""
    return request.param


@pytest.fixture(scope="session")
def tiny_reference(tmp_path_factory):
    """The tiny 4-stage recipe run once, uninterrupted, in this process (1 thread, 1 process)."""
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))
    from recipe_driver import RECIPE_OVERRIDES, ROOT
    from vita_audio.config import load_config
    from vita_audio.train import main

    out = tmp_path_factory.mktemp("reference")
    torch.set_num_threads(1)
    cfg = load_config(
        ROOT / "examples/vita_audio/recipes/tiny.yaml", [f"run.out_dir={out}", *RECIPE_OVERRIDES]
    )
    main(cfg)
    return out
