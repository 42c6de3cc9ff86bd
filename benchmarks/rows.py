"""A lone request on a batched engine against a 1-row engine, and a full batch (one process).

Builds two pipelines from one model folder (``--max-batch 1`` and ``--max-batch N``) with the
same engine settings, warms both up, then times, run after run taking turns: one request on the
1-row engine, one request on the N-row engine, N requests on the N-row engine. Prints tokens per
second (all rows together for the batch), medians over ``--runs``. Wall clock; no test asserts
these numbers.

    python benchmarks/recite_model.py --shape 0.5b --out /tmp/recite-0.5b
    python benchmarks/rows.py --model /tmp/recite-0.5b --compile --runs 5
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from mctp import EngineConfig
from mctp.speech import build_folder_pipeline


def _tokens_per_s(pipe, n: int, mode: str) -> float:
    """``n`` requests as one ``generate`` call on the pipeline's first Generator."""
    gen = pipe.generators(1)[0]
    reqs = [pipe.open("hello", mode=mode) for _ in range(n)]
    ids = torch.cat([r.row.input_ids for r in reqs])
    t = time.perf_counter()
    res = gen.generate(ids, config=reqs[0].row.config)
    return sum(len(t) for t in res.tokens) / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="model folder (benchmarks/recite_model.py)")
    ap.add_argument("--mode", default="turbo")
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--compile", action="store_true", help="the compiled fast path")
    ap.add_argument("--max-len", type=int, default=512)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    pipes = {}
    for b in (1, args.max_batch):
        engine = EngineConfig(
            dtype=args.dtype, compile=args.compile, max_len=args.max_len, max_batch=b
        )
        pipes[b] = build_folder_pipeline(model=args.model, mode=args.mode, engine=engine)
        print(f"warm-up, max_batch={b}: {pipes[b].warmup([args.mode]):.1f} s", flush=True)
    b = args.max_batch
    rows = {
        ("max_batch=1", 1): [],
        (f"max_batch={b}", 1): [],
        (f"max_batch={b}", b): [],
    }
    for _ in range(args.runs):
        for engine, n in rows:
            rows[engine, n].append(_tokens_per_s(pipes[int(engine.split("=")[1])], n, args.mode))
    print(f"\n| engine | requests | tokens/s (median of {args.runs}) | runs |")
    print("|---|---:|---:|---|")
    for (engine, n), v in rows.items():
        runs = ", ".join(f"{x:.1f}" for x in v)
        print(f"| {engine} | {n} | {statistics.median(v):.1f} | {runs} |")


if __name__ == "__main__":
    main()
