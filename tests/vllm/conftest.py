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
def qwen2_built(tmp_path_factory) -> Built:
    return build(tmp_path_factory.mktemp("qwen2"), "qwen2")


@pytest.fixture(scope="session")
def llama_built(tmp_path_factory) -> Built:
    return build(tmp_path_factory.mktemp("llama"), "llama", seed=1)


@pytest.fixture(scope="session")
def vita_built(tmp_path_factory) -> Built:
    return build_vita(tmp_path_factory.mktemp("vita"))
