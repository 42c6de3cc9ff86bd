"""The web page in a real headless Chromium (Debian's ``chromium``) against the running server.

Skipped only when ``chromium`` is not installed (``apt-get install -y chromium``).
"""

from __future__ import annotations

import base64
import re
import shutil
import time

import pytest
import soundfile as sf
import torch
from mctp_serve_helpers import Chromium, post_json, wav_b64

from mctp.codecs import DummyCodec


@pytest.fixture
def browser(server, tmp_path):
    if shutil.which("chromium") is None:
        pytest.skip("chromium is not installed (apt-get install -y chromium)")
    b = Chromium(server + "/", str(tmp_path / "profile"))
    yield b
    b.close()


def test_upload_plays_the_streamed_answer_and_shows_latency(server, browser, tmp_path):
    question = tmp_path / "question.wav"
    wav = DummyCodec(codebook_size=256).decode(torch.arange(16))
    sf.write(question, wav.numpy(), 16000)
    b = browser
    b.wait_for(
        "document.readyState === 'complete' && document.getElementById('model').textContent === 'mctp-tiny'"
    )
    # upload the file through the real <input type=file>
    root = b.send("DOM.getDocument")["root"]["nodeId"]
    node = b.send("DOM.querySelector", nodeId=root, selector="#file")["nodeId"]
    b.send("DOM.setFileInputFiles", nodeId=node, files=[str(question)])
    status = b.wait_for("document.getElementById('input-status').textContent")
    assert status == "loaded question.wav"
    b.eval("document.getElementById('mode').value = 'turbo'")
    b.eval("document.getElementById('send').click()")
    assert (
        b.wait_for(
            "['done', 'error'].includes(document.body.dataset.state) && document.body.dataset.state"
        )
        == "done"
    ), b.eval("document.getElementById('status').textContent")
    latency = b.eval("document.getElementById('latency').textContent")
    assert re.fullmatch(r"\d+ ms", latency), latency
    server_latency = b.eval("document.getElementById('server-latency').textContent")
    assert re.fullmatch(r"\d+ ms", server_latency), server_latency
    # the page shows the answer the API gives for the same file
    part = {"type": "input_audio", "input_audio": {"data": wav_b64(wav, 16000), "format": "wav"}}
    body = {"messages": [{"role": "user", "content": [part]}], "mode": "turbo"}
    status, out = post_json(server, "/v1/chat/completions", body)
    answer = out["choices"][0]["message"]["content"]
    assert answer.startswith("hello")
    assert b.eval("document.getElementById('answer').textContent") == answer
    # the whole answer is in the player and it plays
    b.wait_for("document.getElementById('player').currentTime > 0", timeout=30)
    duration = b.eval("document.getElementById('player').duration")
    assert abs(duration - out["mctp"]["num_audio_tokens"] * 1280 / 16000) < 0.01
    assert b.eval("document.getElementById('player').played.length") >= 1
    shot = base64.b64decode(b.send("Page.captureScreenshot", format="png")["data"])
    assert shot.startswith(b"\x89PNG")
    (tmp_path / "page.png").write_bytes(shot)


def test_microphone_recording_is_answered(browser):
    """Chromium's fake capture device (a beep) stands in for the microphone."""
    b = browser
    b.wait_for(
        "document.readyState === 'complete' && document.getElementById('model').textContent === 'mctp-tiny'"
    )
    b.eval("document.getElementById('record').click()")
    b.wait_for("document.getElementById('input-status').textContent === 'recording...'")
    time.sleep(1.0)
    b.eval("document.getElementById('stop').click()")
    b.wait_for("document.getElementById('input-status').textContent === 'recorded'")
    b.eval("document.getElementById('send').click()")
    state = b.wait_for(
        "['done', 'error'].includes(document.body.dataset.state) && document.body.dataset.state"
    )
    assert state == "done", b.eval("document.getElementById('status').textContent")
    assert re.fullmatch(r"\d+ ms", b.eval("document.getElementById('latency').textContent"))
    assert b.eval("document.getElementById('answer').textContent").startswith("hello")
