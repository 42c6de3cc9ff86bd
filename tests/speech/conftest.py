"""Speech pipeline tests: the tiny default (fixtures `tiny`, `mctp_cache` in tests/conftest.py)."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every test here runs the tiny model on one torch thread (see tests/conftest.py)."""
    yield
