"""The compiled CPU path's cost: peak memory, cold and cached warm-up, speed, per strategy.

Runs ``benchmarks/modes.py --compile`` once per strategy in a fresh process (one at a time,
never two together), each with an empty Inductor cache folder of its own, and, with
``--second``, once more in a second process that reuses that folder and the strategy's
compile-cache folder (``FastPath(compile_cache_dir=...)``). Strategies:

* ``frozen``: ``--max-autotune`` -- weights frozen into every graph, Inductor's GEMM
  templates autotuned (the fast path before :mod:`mctp.engine.compile_packing`).
* ``regions``: the default -- one compiled graph per kind of decoder layer and of MCTP head,
  shared by all layers and heads (:mod:`mctp.engine.regions`), with packed weights.
* ``packed``: ``--no-regions`` -- whole graphs per decode shape and chain (every layer and
  head unrolled); weights stay graph inputs, one packed copy per weight shared by every graph
  (oneDNN), one-row products as streaming reductions.
* ``plain``: ``--no-pack`` -- regions with torch's own GEMMs (weights as graph inputs).

Peak RSS is the child's own ``ru_maxrss``; warm-up is the time of the first call per
variant (compiling), also as CPU seconds of the process; "compiling" is the warm-up minus the
steady-state time of the same calls (the warm-up calls generate their tokens too). Speeds are medians of
``--repeats`` runs, as tokens per wall-clock second and per CPU second (robust to other load
with ``--threads 1``).

Usage::

    python benchmarks/compile_memory.py --layers 4 --strategies frozen,regions,packed --threads 1
    python benchmarks/compile_memory.py --strategies frozen,regions --second --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
FLAGS = {
    "frozen": ["--max-autotune"],
    "regions": [],
    "packed": ["--no-regions"],
    "plain": ["--no-pack"],
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="0.5b")
    p.add_argument("--layers", type=int, default=None)
    p.add_argument("--strategies", default="frozen,regions")
    p.add_argument("--modes", default="vanilla,balance,boost,turbo")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--window", type=int, default=11)
    p.add_argument(
        "--second",
        action="store_true",
        help="also time a second, cached process (not for frozen: it caches nothing)",
    )
    p.add_argument("--timeout", type=int, default=1800, help="seconds per process")
    p.add_argument("--workdir", default=None, help="cache folders (default: a temporary one)")
    args = p.parse_args()

    work = Path(args.workdir or tempfile.mkdtemp(prefix="mctp_compile_"))
    rows = []
    for strategy in args.strategies.split(","):
        base = work / strategy
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(base / "inductor")}
        # frozen graphs bypass torch's caches: a second process would compile all again
        for run in ("cold", "second") if args.second and strategy != "frozen" else ("cold",):
            out = base / f"{run}.json"
            cmd = [
                sys.executable,
                str(HERE / "modes.py"),
                "--config", args.config,
                "--modes", args.modes,
                "--new-tokens", str(args.new_tokens),
                "--repeats", str(args.repeats),
                "--threads", str(args.threads),
                "--window", str(args.window),
                "--compile",
                "--compile-cache-dir", str(base / "compile_cache"),
                "--json", str(out),
                *FLAGS[strategy],
                *(["--layers", str(args.layers)] if args.layers else []),
            ]  # fmt: skip
            print("$", " ".join(cmd), flush=True)
            done = subprocess.run(cmd, env=env, timeout=args.timeout, text=True)
            if done.returncode != 0:
                print(f"{strategy}/{run}: exit status {done.returncode}", flush=True)
                continue
            rows.append((strategy, run, json.loads(out.read_text())))

    variants = [(r["mode"], r["heads"]) for r in rows[0][2]["rows"]] if rows else []
    cols = ["strategy", "process", "weights GB", "peak RSS GB", "warm-up s", "warm-up CPU s"]
    cols += ["compiling s"]
    cols += [f"{m}/{h} tok/s" for m, h in variants]
    cols += [f"{m}/{h} tok/CPU-s" for m, h in variants]
    table = []
    for strategy, run, info in rows:
        speed = {(r["mode"], r["heads"]): r for r in info["rows"]}
        table.append(
            [
                strategy,
                run,
                f"{info['weight_bytes'] / 1e9:.2f}",
                f"{info['peak_rss_bytes'] / 1e9:.2f}",
                f"{info['warm_up_s']:.1f}",
                f"{info['warm_up_cpu_s']:.1f}",
                f"{info['warm_up_compile_s']:.1f}",
                *(f"{speed[v]['tokens_s']:.1f}" for v in variants),
                *(f"{speed[v]['tokens_cpu_s']:.1f}" for v in variants),
            ]
        )
    print()
    print("| " + " | ".join(cols) + " |")
    print("|" + "|".join(" --- " for _ in cols) + "|")
    for row in table:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
