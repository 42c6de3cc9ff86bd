"""Load test of ``mctp serve`` on loopback: N concurrent clients for T seconds, bounded.

Each client sends streaming ``/v1/chat/completions`` requests with one of a few spoken
questions (different questions get different answers) and reads the server-sent events. Before
the load, every question's answer is fetched once alone; under load every answer must equal its
own question's reference (same text, same audio samples), so a request that is lost, cut or
mixed up with another one is counted. Reported: requests ok / refused (503) / failed, lost,
mixed, throughput, and p50/p95 first-audio-chunk latency as the client sees it (request sent ->
first audio delta) and as the server measures it, with the waiting part of the server's figure
(arrival -> the request's generation began: queued, or waiting for a row of a running batch).

    python benchmarks/load.py --clients 4 --seconds 20            # starts a tiny server itself
    python benchmarks/load.py --clients 1,4,8 --seconds 20        # side by side, with ratios
    python benchmarks/load.py --clients 1,4,8 --server-args "--max-batch 8 --dtype bfloat16"
    python benchmarks/load.py --url http://127.0.0.1:8000 --clients 8 --seconds 30

With several client counts the runs share one server and the table adds, per count, the
throughput (audio seconds per second) over that of one client and the p95 first-chunk latency
over that of one client. The first chunk is timed from the request's arrival (the server's
figure includes the time the request waited for the engine).

Only loopback addresses are accepted. Loops stop after ``--seconds`` or ``--max-requests``
per client, whichever comes first.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import http.client
import io
import json
import os
import platform
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from ipaddress import ip_address
from typing import Any
from urllib.parse import urlparse

import numpy as np

__all__ = ["LoadReport", "run_load", "start_server"]


def _check_loopback(url: str) -> tuple[str, int]:
    u = urlparse(url)
    host = u.hostname or ""
    ok = host == "localhost"
    if not ok:
        try:
            ok = ip_address(host).is_loopback
        except ValueError:
            ok = False
    if not ok or u.port is None:
        raise ValueError(f"only loopback URLs with a port are allowed, got {url!r}")
    return host, u.port


def _questions(n: int) -> list[str]:
    """``n`` different spoken questions (dummy-codec tones) as base64 WAV."""
    import soundfile as sf
    import torch

    from mctp.codecs import DummyCodec

    codec = DummyCodec(codebook_size=256)
    out = []
    for i in range(n):
        wav = codec.decode(torch.arange(8 + 4 * i) * (i + 1) % 256)
        buf = io.BytesIO()
        sf.write(buf, wav.numpy(), 16000, "PCM_16", format="WAV")
        out.append(base64.b64encode(buf.getvalue()).decode())
    return out


@dataclass
class Answer:
    """What one streamed request returned."""

    status: int
    ids: set[str] = field(default_factory=set)
    text: str = ""
    audio_sha: str = ""
    samples: int = 0
    first_chunk_s: float | None = None
    total_s: float = 0.0
    server_first_chunk_ms: float | None = None
    server_started_ms: float | None = None
    done: bool = False
    expected_samples: int | None = None
    error: str | None = None


def ask(host: str, port: int, question: str, mode: str, timeout: float = 120.0) -> Answer:
    """One streaming chat request with a spoken question; reads the whole event stream."""
    body = {
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "input_audio", "input_audio": {"data": question, "format": "wav"}}
                ],
            }
        ],
        "modalities": ["text", "audio"],
        "audio": {"format": "pcm16"},
        "mode": mode,
        "stream": True,
    }
    t0 = time.perf_counter()
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request(
            "POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"}
        )
        resp = conn.getresponse()
        ans = Answer(status=resp.status)
        if resp.status != 200:
            resp.read()
            return ans
        sha = hashlib.sha256()
        for raw in resp:
            line = raw.decode().strip()
            if not line.startswith("data: "):
                continue
            data = line[6:]
            if data == "[DONE]":
                ans.done = True
                break
            msg = json.loads(data)
            if "error" in msg:  # the server's error event: the request failed
                ans.error = str(msg["error"].get("message", msg["error"]))
                break
            ans.ids.add(msg["id"])
            delta = msg["choices"][0]["delta"]
            audio = delta.get("audio") or {}
            ans.text += delta.get("content") or ""
            ans.text += audio.get("transcript", "")
            if "data" in audio:
                pcm = base64.b64decode(audio["data"])
                if ans.first_chunk_s is None:
                    ans.first_chunk_s = time.perf_counter() - t0
                sha.update(pcm)
                ans.samples += len(pcm) // 2
            if "mctp" in msg:
                ans.server_first_chunk_ms = msg["mctp"]["first_chunk_ms"]
                ans.server_started_ms = msg["mctp"].get("started_ms")
        ans.audio_sha = sha.hexdigest()
        ans.total_s = time.perf_counter() - t0
        return ans
    finally:
        conn.close()


@dataclass
class LoadReport:
    """Result of :func:`run_load`."""

    clients: int
    seconds: float
    sent: int
    ok: int
    refused: int
    failed: int
    lost: int
    mixed: int
    wall_s: float
    audio_s: float
    first_chunk_ms: list[float]
    server_first_chunk_ms: list[float]
    sample_rate: int
    server_started_ms: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    distinct_answers: int = 0
    """Different reference answers among the questions (1: a mixed-up answer cannot be seen)."""

    def _pct(self, xs: list[float], q: float) -> float | None:
        return float(np.percentile(xs, q)) if xs else None

    def summary(self) -> dict[str, Any]:
        """Counts, throughput and latency percentiles."""
        return {
            "clients": self.clients,
            "seconds": self.seconds,
            "sent": self.sent,
            "ok": self.ok,
            "refused_503": self.refused,
            "failed": self.failed,
            "lost": self.lost,
            "mixed": self.mixed,
            "requests_per_s": self.ok / self.wall_s if self.wall_s else 0.0,
            "audio_s_per_s": self.audio_s / self.wall_s if self.wall_s else 0.0,
            "first_chunk_p50_ms": self._pct(self.first_chunk_ms, 50),
            "first_chunk_p95_ms": self._pct(self.first_chunk_ms, 95),
            "server_first_chunk_p50_ms": self._pct(self.server_first_chunk_ms, 50),
            "server_first_chunk_p95_ms": self._pct(self.server_first_chunk_ms, 95),
            "server_started_p50_ms": self._pct(self.server_started_ms, 50),
            "server_started_p95_ms": self._pct(self.server_started_ms, 95),
            "distinct_answers": self.distinct_answers,
        }

    def table(self) -> str:
        """A markdown table of :meth:`summary`."""
        s = self.summary()

        def f(x: Any) -> str:
            return "-" if x is None else (f"{x:.1f}" if isinstance(x, float) else str(x))

        head = ["clients", "seconds", "ok", "503", "failed", "lost", "mixed", "req/s"]
        head += ["audio s/s", "first chunk p50 / p95 (ms)", "server p50 / p95 (ms)"]
        head += ["of it waiting p50 / p95 (ms)"]
        row = [s["clients"], s["seconds"], s["ok"], s["refused_503"], s["failed"], s["lost"]]
        row += [s["mixed"], s["requests_per_s"], s["audio_s_per_s"]]
        row += [
            f"{f(s['first_chunk_p50_ms'])} / {f(s['first_chunk_p95_ms'])}",
            f"{f(s['server_first_chunk_p50_ms'])} / {f(s['server_first_chunk_p95_ms'])}",
            f"{f(s['server_started_p50_ms'])} / {f(s['server_started_p95_ms'])}",
        ]
        return "\n".join(
            [
                "| " + " | ".join(head) + " |",
                "|" + "|".join("---" for _ in head) + "|",
                "| " + " | ".join(f(x) for x in row) + " |",
            ]
        )


def run_load(
    url: str,
    *,
    clients: int = 4,
    seconds: float = 10.0,
    max_requests: int = 1000,
    mode: str = "boost",
    questions: int = 4,
) -> LoadReport:
    """Drive the server at ``url`` with ``clients`` concurrent clients for ``seconds``.

    Args:
        url: A loopback URL (``http://127.0.0.1:PORT``).
        clients: Concurrent clients (threads), each sending one request at a time.
        seconds: How long clients keep starting requests.
        max_requests: Most requests per client.
        mode: Generation mode of every request.
        questions: Distinct spoken questions cycled through.

    Raises:
        ValueError: On a non-loopback URL or non-positive sizes.
        RuntimeError: If a reference request (alone) fails.
    """
    host, port = _check_loopback(url)
    if clients < 1 or seconds <= 0 or max_requests < 1 or questions < 1:
        raise ValueError("clients, seconds, max_requests and questions must be positive")
    qs = _questions(questions)
    refs = []
    for q in qs:
        ref = ask(host, port, q, mode)
        if ref.status != 200 or not ref.done:
            raise RuntimeError(f"reference request failed with HTTP {ref.status}")
        refs.append(ref)
    models = json.loads(_get(host, port, "/v1/models"))
    rate = int(models["data"][0]["mctp"]["sample_rate"])
    results: list[tuple[int, Answer | Exception]] = []
    lock = threading.Lock()
    stop_at = time.monotonic() + seconds

    def client(c: int) -> None:
        for i in range(max_requests):
            if time.monotonic() >= stop_at:
                return
            k = (c + i) % len(qs)
            try:
                ans: Answer | Exception = ask(host, port, qs[k], mode)
            except (OSError, ValueError, http.client.HTTPException) as e:
                ans = e
            with lock:
                results.append((k, ans))

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    ok = refused = failed = lost = mixed = 0
    errors: list[str] = []
    audio_s = 0.0
    lat: list[float] = []
    server_lat: list[float] = []
    server_wait: list[float] = []
    for k, ans in results:
        if isinstance(ans, Exception) or ans.status not in (200, 503) or ans.error:
            failed += 1
            errors.append(repr(ans) if isinstance(ans, Exception) else ans.error or str(ans.status))
        elif ans.status == 503:
            refused += 1
        elif not ans.done:
            lost += 1
        elif (
            len(ans.ids) != 1
            or ans.text != refs[k].text
            or ans.audio_sha != refs[k].audio_sha
            or ans.samples != refs[k].samples
        ):
            mixed += 1
        else:
            ok += 1
            audio_s += ans.samples / rate
            if ans.first_chunk_s is not None:
                lat.append(1000 * ans.first_chunk_s)
            if ans.server_first_chunk_ms is not None:
                server_lat.append(ans.server_first_chunk_ms)
            if ans.server_started_ms is not None:
                server_wait.append(ans.server_started_ms)
    ids = [next(iter(a.ids)) for _, a in results if isinstance(a, Answer) and len(a.ids) == 1]
    mixed += len(ids) - len(set(ids))  # two requests answered under one id
    return LoadReport(
        clients=clients,
        seconds=seconds,
        sent=len(results),
        ok=ok,
        refused=refused,
        failed=failed,
        lost=lost,
        mixed=mixed,
        wall_s=wall,
        audio_s=audio_s,
        first_chunk_ms=lat,
        server_first_chunk_ms=server_lat,
        server_started_ms=server_wait,
        sample_rate=rate,
        errors=errors,
        distinct_answers=len({(r.text, r.audio_sha, r.samples) for r in refs}),
    )


def _get(host: str, port: int, path: str) -> bytes:
    conn = http.client.HTTPConnection(host, port, timeout=10)
    try:
        conn.request("GET", path)
        return conn.getresponse().read()
    finally:
        conn.close()


def start_server(extra: list[str] | None = None, timeout: float = 300.0) -> tuple[str, Any]:
    """Start ``mctp serve`` (tiny default) on a free loopback port; returns (url, process)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "mctp.cli", "serve", "--host", "127.0.0.1", "--port", str(port)]
    cmd += ["--log-level", "warning", *(extra or [])]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}")
        try:
            health = json.loads(_get("127.0.0.1", port, "/health"))
            if health.get("status") == "ready":  # 503 "warming" until the warm-up ran
                return f"http://127.0.0.1:{port}", proc
            time.sleep(0.3)
        except (OSError, ValueError):
            time.sleep(0.3)
    proc.terminate()
    raise TimeoutError("the server did not start")


def _cpu() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return platform.processor() or platform.machine()
    keep = ("Model name", "CPU(s)", "Flags")
    lines = [line for line in out.splitlines() if line.split(":")[0].strip() in keep]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Command line (see the module docstring)."""
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--url", default=None, help="a running server (loopback); None: start one")
    p.add_argument(
        "--clients", default="4", help="concurrent clients, or a comma list run side by side"
    )
    p.add_argument(
        "--server-args", default="", help="extra `mctp serve` flags for the server started here"
    )
    p.add_argument("--seconds", type=float, default=10.0, help="how long to send requests")
    p.add_argument("--max-requests", type=int, default=1000, help="most requests per client")
    p.add_argument("--mode", default="boost", help="generation mode")
    p.add_argument("--json", default=None, help="write the summary here")
    args = p.parse_args(argv)
    counts = [int(c) for c in str(args.clients).split(",")]
    proc = None
    url = args.url
    if url is None:
        extra = ["--max-queue", str(max(8, 2 * max(counts))), *args.server_args.split()]
        url, proc = start_server(extra)
    reps = []
    try:
        for n in counts:
            reps.append(
                run_load(
                    url,
                    clients=n,
                    seconds=args.seconds,
                    max_requests=args.max_requests,
                    mode=args.mode,
                )
            )
        health = json.loads(_get(*_check_loopback(url), "/health"))
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(10)
    print(_cpu())
    print(f"python {platform.python_version()}; server flags: {args.server_args or '(defaults)'}")
    print(f"server engine: {health.get('engine')}; batches run: {health.get('batches')}, ")
    print(f"most rows in one batch: {health.get('max_rows_seen')}")
    for rep in reps:
        print(rep.table())
    if len(reps) > 1:
        base = reps[0].summary()
        print("\n| clients | throughput / 1 client | p95 first chunk / 1 client |")
        print("|---|---|---|")
        for rep in reps:
            s = rep.summary()
            thr = s["audio_s_per_s"] / base["audio_s_per_s"] if base["audio_s_per_s"] else 0.0
            p95 = (
                s["first_chunk_p95_ms"] / base["first_chunk_p95_ms"]
                if base["first_chunk_p95_ms"]
                else 0.0
            )
            print(f"| {s['clients']} | {thr:.2f}x | {p95:.2f}x |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump([r.summary() for r in reps], f, indent=2)
    if reps and reps[0].distinct_answers < 2:
        print(
            "note: every question got the same answer alone, so an answer given to the wrong "
            "request would pass unseen (lost and failed requests are still counted)"
        )
    for rep in reps:
        for err in sorted(set(rep.errors)):
            print(f"{rep.clients} clients, failed: {err}", file=sys.stderr)
    if any(r.lost or r.mixed or r.failed for r in reps):
        sys.exit(1)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
