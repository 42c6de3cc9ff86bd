"""Fixtures for the server tests: the tiny default (taught once per run) and a real server."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # mctp_serve_helpers

from mctp_serve_helpers import free_port, wait_healthy


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every test here runs the tiny model on one torch thread (see tests/conftest.py)."""
    yield


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
