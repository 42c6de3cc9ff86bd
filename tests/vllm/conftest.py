"""Fixtures of the vLLM tests; the builders live in vllm_helpers.py. Importable without vLLM:
each test module skips itself (pytest.importorskip) when vLLM is not installed."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

HERE = str(Path(__file__).resolve().parent)
if HERE not in sys.path:
    sys.path.insert(0, HERE)

from vllm_helpers import Built, build, build_vita  # noqa: E402


@pytest.fixture(scope="session")
def qwen2_built(vita_built, tmp_path_factory) -> Built:
    """The VITA-Audio fixture's backbone and heads as a transformers Qwen2 folder + heads."""
    from mctp.vllm.export import export_drafter

    root = tmp_path_factory.mktemp("qwen2")
    vita_built.backbone.model.save_pretrained(root / "model")
    vita_built.stack.save_pretrained(root / "heads")
    export_drafter(root / "heads", root / "draft", backbone=root / "model")
    return Built(
        root / "model", root / "heads", root / "draft", vita_built.backbone, vita_built.stack
    )


@pytest.fixture(scope="session")
def llama_built(tmp_path_factory) -> Built:
    return build(tmp_path_factory.mktemp("llama"), "llama", seed=1)


@pytest.fixture(scope="session")
def vita_built(tmp_path_factory) -> Built:
    return build_vita(tmp_path_factory.mktemp("vita"))
