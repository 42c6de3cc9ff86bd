"""HTTP, SSE and browser helpers for the server tests (loopback only)."""

from __future__ import annotations


def free_port() -> int:
    """A free TCP port on the loopback interface."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_healthy(url: str, proc=None, timeout: float = 120.0) -> None:
    """Poll ``url/health`` until it answers 200 (or fail with the server's output)."""
    import time
    import urllib.request

    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}:\n{proc.stdout.read()}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(f"{url} did not become healthy in {timeout} s")


def request(
    url: str, path: str, body: bytes | dict | None = None, *, timeout: float = 60.0
) -> tuple[int, dict[str, str], bytes]:
    """One HTTP request (POST when ``body`` is given); returns (status, headers, body)."""
    import http.client
    import json
    from urllib.parse import urlparse

    u = urlparse(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=timeout)
    try:
        if body is None:
            conn.request("GET", path)
        else:
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
            conn.request("POST", path, data, {"Content-Type": "application/json"})
        r = conn.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        conn.close()


def post_json(url: str, path: str, body: dict, **kw) -> tuple[int, dict]:
    """POST JSON, parse the JSON answer."""
    import json

    status, _, data = request(url, path, body, **kw)
    return status, json.loads(data)


def sse_events(data: bytes) -> list:
    """Parse a server-sent-events body into JSON objects (``[DONE]`` kept as a string)."""
    import json

    out = []
    for block in data.decode().split("\n\n"):
        block = block.strip()
        if not block:
            continue
        assert block.startswith("data: "), block
        payload = block[6:]
        out.append(payload if payload == "[DONE]" else json.loads(payload))
    return out


def wav_b64(wav, sample_rate: int) -> str:
    """A waveform as base64 16-bit WAV bytes."""
    import base64
    import io

    import soundfile as sf

    buf = io.BytesIO()
    sf.write(
        buf, wav.numpy() if hasattr(wav, "numpy") else wav, sample_rate, "PCM_16", format="WAV"
    )
    return base64.b64encode(buf.getvalue()).decode()


class InProcessServer:
    """A real uvicorn server on 127.0.0.1 running ``app`` in a background thread."""

    def __init__(self, app) -> None:
        import threading

        import uvicorn

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> InProcessServer:
        self.thread.start()
        wait_healthy(self.url, timeout=60)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(10)


class Chromium:
    """Headless Debian ``chromium`` driven over the DevTools protocol (websocket-client)."""

    def __init__(self, url: str, profile: str) -> None:
        import subprocess
        import time
        from pathlib import Path

        self.proc = subprocess.Popen(
            [
                "chromium",
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
                "--autoplay-policy=no-user-gesture-required",
                "--use-fake-ui-for-media-stream",
                "--use-fake-device-for-media-stream",
                "--remote-debugging-address=127.0.0.1",
                "--remote-debugging-port=0",
                f"--user-data-dir={profile}",
                url,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        port_file = Path(profile) / "DevToolsActivePort"
        end = time.monotonic() + 60
        while not port_file.is_file() or not port_file.read_text().strip():
            if time.monotonic() > end or self.proc.poll() is not None:
                self.close()
                raise RuntimeError("chromium did not start its DevTools endpoint")
            time.sleep(0.1)
        self.devtools = int(port_file.read_text().split()[0])
        self.ws = None
        self._id = 0
        while self.ws is None:
            for target in self._targets():
                if target.get("type") == "page" and target.get("url", "").startswith(url):
                    import websocket

                    self.ws = websocket.create_connection(
                        target["webSocketDebuggerUrl"], timeout=60, suppress_origin=True
                    )
            if self.ws is None:
                if time.monotonic() > end:
                    self.close()
                    raise RuntimeError("chromium did not open the page")
                time.sleep(0.1)

    def _targets(self) -> list:
        import json
        import urllib.request

        with urllib.request.urlopen(f"http://127.0.0.1:{self.devtools}/json/list", timeout=5) as r:
            return json.loads(r.read())

    def send(self, method: str, **params):
        """One DevTools command; returns its result (events in between are skipped)."""
        import json

        self._id += 1
        self.ws.send(json.dumps({"id": self._id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == self._id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg["result"]

    def eval(self, expression: str):
        """Evaluate JavaScript in the page and return its value."""
        res = self.send(
            "Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True
        )
        if "exceptionDetails" in res:
            raise RuntimeError(f"{expression}: {res['exceptionDetails']}")
        return res["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 60.0):
        """Poll a JavaScript expression until it is truthy; return its value."""
        import time

        end = time.monotonic() + timeout
        last = None
        while time.monotonic() < end:
            try:
                value = self.eval(expression)
            except RuntimeError as e:  # e.g. the page is still loading
                value, last = None, e
            if value:
                return value
            time.sleep(0.1)
        where = self.eval("document.location.href + ' ' + document.body.innerText.slice(0, 300)")
        raise TimeoutError(f"{expression} stayed falsy for {timeout} s at {where} ({last})")

    def close(self) -> None:
        if getattr(self, "ws", None) is not None:
            self.ws.close()
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except Exception:
            self.proc.kill()
            self.proc.wait()
