"""Fixtures for the server tests: the tiny default (taught once per run) and a real server."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # mctp_serve_helpers

from mctp_serve_helpers import free_port, wait_healthy


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


@pytest.fixture(scope="session")
def server(mctp_cache, tiny):
    """``mctp serve`` (the console script's code, tiny default) on 127.0.0.1 in a subprocess.

    Small limits so that the tests can cross them: 3 s of audio, 1 MiB bodies.
    """
    import subprocess
    import sys

    port = free_port()
    cmd = [sys.executable, "-m", "mctp.cli", "serve", "--host", "127.0.0.1", "--port", str(port)]
    cmd += ["--max-audio-s", "3", "--max-body-mb", "1", "--log-level", "warning"]
    env = {**os.environ, "MCTP_CACHE": str(mctp_cache)}
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
