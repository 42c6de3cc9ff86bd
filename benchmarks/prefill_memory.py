"""Peak memory of prefilling the longest prompt the server accepts, chunked and not.

One fresh process per (model, prefill_chunk, mode): it builds a random Qwen2 of the given
shape (``benchmarks/modes.py``'s configurations), warms up with a short prompt, then resets
the kernel's peak-RSS mark (``/proc/self/clear_refs``) and generates from a prompt of
``--prompt`` tokens (default: ``ServerConfig.max_prompt_tokens``). The table gives the
resident memory before the long prompt, the peak while it ran, their difference and the
wall time. ``vanilla`` with one new token is the backbone's prefill alone; ``boost`` with 11
(one backbone token, one chain of 10 heads) adds the MCTP heads' first chain, which reads the
whole prompt too.

Linux only (``/proc``). Usage::

    python benchmarks/prefill_memory.py                       # tiny and 0.5b x 4 layers, bf16
    python benchmarks/prefill_memory.py --models 0.5b:24 --chunks none,512 --threads 2
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def child(args: argparse.Namespace) -> None:
    """Measure one configuration in this process; print one JSON line."""
    import gc

    import torch

    sys.path.insert(0, str(HERE))
    from modes import build

    from mctp import generate

    torch.set_num_threads(args.threads)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    name, _, layers = args.model.partition(":")
    backbone, stack, speech, weight_bytes = build(
        name, "cpu", dtype, num_heads=10, layers=int(layers) if layers else None
    )
    backbone.prefill_chunk = None if args.chunk == "none" else int(args.chunk)
    vocab = min(backbone.vocab_size - 100, 1000)  # text ids, below the speech ids
    g = torch.Generator().manual_seed(0)
    short = torch.randint(10, vocab, (1, 16), generator=g)
    long = torch.randint(10, vocab, (1, args.prompt), generator=g)
    run_stack = None if args.mode == "vanilla" else stack
    new = 1 if args.mode == "vanilla" else 11  # boost: one backbone token, one 10-head chain
    generate(backbone, run_stack, short, args.mode, new, vocab=speech)  # warm-up
    gc.collect()
    before = _kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # peak RSS mark := current RSS
    t0 = time.perf_counter()
    generate(backbone, run_stack, long, args.mode, new, vocab=speech)
    seconds = time.perf_counter() - t0
    peak = _kib("VmHWM")
    print(
        json.dumps(
            {
                "model": args.model,
                "dtype": args.dtype,
                "mode": args.mode,
                "chunk": args.chunk,
                "prompt": args.prompt,
                "weights_mib": weight_bytes / 2**20,
                "before_mib": before / 1024,
                "peak_mib": peak / 1024,
                "prefill_mib": (peak - before) / 1024,
                "seconds": seconds,
            }
        )
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="tiny,0.5b:4", help="config[:layers], comma-separated")
    p.add_argument("--chunks", default="none,512", help="prefill_chunk values ('none': off)")
    p.add_argument("--modes", default="vanilla,boost")
    p.add_argument("--prompt", type=int, default=None, help="default: max_prompt_tokens")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--timeout", type=int, default=900, help="seconds per process")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--chunk", help=argparse.SUPPRESS)
    p.add_argument("--mode", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.prompt is None:
        from mctp.serve.protocol import ServerConfig

        args.prompt = ServerConfig().max_prompt_tokens
    if args.child:
        child(args)
        return
    rows = []
    for model in args.models.split(","):
        for mode in args.modes.split(","):
            for chunk in args.chunks.split(","):
                cmd = [
                    sys.executable, __file__, "--child",
                    "--model", model, "--chunk", chunk, "--mode", mode,
                    "--prompt", str(args.prompt),
                    "--dtype", args.dtype, "--threads", str(args.threads),
                ]  # fmt: skip
                done = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
                if done.returncode != 0:
                    print(f"{model} {mode} chunk={chunk}: exit {done.returncode}")
                    print(done.stderr[-2000:])
                    continue
                rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    print(
        f"\nprompt {args.prompt} tokens, {args.dtype}, vanilla 1 / boost 11 new tokens, "
        f"{args.threads} thread(s)\n"
    )
    print(
        "| model | prompt | mode | prefill_chunk | weights MiB | RSS before MiB | peak MiB "
        "| peak - before MiB | s |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['model']} | {r['prompt']} | {r['mode']} | {r['chunk']} | {r['weights_mib']:.1f} | "
            f"{r['before_mib']:.0f} | {r['peak_mib']:.0f} | {r['prefill_mib']:.0f} | "
            f"{r['seconds']:.1f} |"
        )


if __name__ == "__main__":
    main()
