"""Fixtures for the speech pipeline tests: the tiny default, taught once per test run."""

from __future__ import annotations

import os

import pytest
import torch


@pytest.fixture(scope="session")
def mctp_cache(tmp_path_factory):
    """``MCTP_CACHE`` in the run's temporary folder (the tiny model is taught once per run)."""
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):  # one cache for all workers of the run
        base = base.parent
    path = base / "mctp-cache"
    old = os.environ.get("MCTP_CACHE")
    os.environ["MCTP_CACHE"] = str(path)
    yield path
    if old is None:
        os.environ.pop("MCTP_CACHE", None)
    else:
        os.environ["MCTP_CACHE"] = old


@pytest.fixture(autouse=True)
def one_thread():
    """The tiny model's matrices are too small to share between threads."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tiny(mctp_cache):
    """The default tiny pipeline (dummy codecs)."""
    from mctp.speech import build_tiny_pipeline

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return build_tiny_pipeline()
    finally:
        torch.set_num_threads(n)
