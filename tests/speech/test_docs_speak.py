"""docs/speak.md: its shell examples run as written (the ```python blocks run in tests/test_docs.py).

The ```bash blocks run in order with ``bash -e`` in a scratch folder that links the repository's
``tests/`` (for the fixture paths). The block that only starts ``mctp serve`` runs in the
background on a free loopback port (the docs' port 8000 is replaced everywhere), and the later
blocks talk to it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import soundfile as sf

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "speak.md"
FENCE = re.compile(r"^```bash\n(.*?)^```", re.DOTALL | re.MULTILINE)


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_bash_blocks_run(mctp_cache, tmp_path):
    blocks = FENCE.findall(DOC.read_text())
    assert len(blocks) >= 4
    (tmp_path / "tests").symlink_to(ROOT / "tests")
    port = str(_port())
    env = {**os.environ, "MCTP_CACHE": str(mctp_cache)}
    if shutil.which("mctp") is None:  # not installed as a console script: same code via -m
        shim = tmp_path / "bin" / "mctp"
        shim.parent.mkdir()
        shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m mctp.cli "$@"\n')
        shim.chmod(0o755)
        env["PATH"] = f"{shim.parent}{os.pathsep}{env['PATH']}"
    server = None
    outputs = []
    try:
        for block in blocks:
            script = block.replace("8000", port)
            if script.strip().startswith("mctp serve") and script.strip().count("\n") == 0:
                cmd = script.strip() + " --log-level warning"
                server = subprocess.Popen(
                    ["bash", "-c", f"exec {cmd}"],
                    cwd=tmp_path,
                    env=env,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
                end = time.monotonic() + 120
                while True:
                    try:
                        urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                        break
                    except OSError:
                        assert server.poll() is None, "mctp serve exited"
                        assert time.monotonic() < end, "mctp serve did not start"
                        time.sleep(0.2)
                continue
            out = subprocess.run(
                ["bash", "-e", "-c", script],
                cwd=tmp_path,
                env=env,
                capture_output=True,
                text=True,
                timeout=300,
            )
            assert out.returncode == 0, f"{script}\n{out.stdout}\n{out.stderr}"
            outputs.append(out.stdout)
    finally:
        if server is not None:
            server.terminate()
            server.wait(10)
    assert server is not None, "the docs start no server"
    text = "\n".join(outputs)
    assert "first audio chunk:" in text and "tokens/s:" in text
    assert sf.info(tmp_path / "answer.wav").samplerate == 16000
    assert sf.info(tmp_path / "hello.wav").samplerate == 22050
    assert sf.info(tmp_path / "speech.wav").frames > 0
    assert '"status":"ready"' in text and "data: [DONE]" in text
    assert '"object":"chat.completion"' in text
    res = json.loads((tmp_path / "eval.json").read_text())
    assert res["qa"]["s2t"] == 1.0 and len(res["heads"]["acceptance"]) == 10
