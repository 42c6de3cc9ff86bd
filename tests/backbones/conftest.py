"""Fixtures for backbone tests."""

from __future__ import annotations

import pytest


@pytest.fixture(params=["qwen2", "llama"])
def family(request) -> str:
    """The two model families every backbone test runs on."""
    return request.param
