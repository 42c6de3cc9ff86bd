"""Module guards dropped from the regional block graphs, before and after in one process.

"Before": a block's graph keeps Dynamo's guards on modules (its meta template and the template's
submodules' attributes) and drops only those on globals, as the shared functions (logits, head
token) still do; "after": the default, ``mctp.engine.fast_path._template_guards`` (neither
globals nor modules; the guards on tensors and grad mode stay). Each variant has its own
backbone of the same seed (regions are shared per backbone), the tokens of both are checked
equal, and the variants take turns run by run. Prints a table of medians; no test asserts it.

Usage::

    python benchmarks/guards_ab.py --layers 24 --runs 7
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    import modes

    from mctp import EngineConfig, GenerationConfig, Generator
    from mctp.engine import fast_path

    torch.set_num_threads(args.threads)
    layers, runs = args.layers, args.runs
    prompt = torch.randint(0, 151000, (1, 32), generator=torch.Generator().manual_seed(0))
    n = 64
    kinds = ("vanilla", "turbo", "turbo-audio")
    orig = fast_path._template_guards
    gens, outs = {}, {}
    for name in ("before", "after"):
        backbone, stack, speech, _ = modes.build("0.5b", "cpu", torch.bfloat16, layers=layers)
        if name == "before":
            fast_path._template_guards = torch.compiler.skip_guard_on_globals_unsafe
        try:
            for kind in kinds:
                g = Generator(
                    backbone,
                    None if kind == "vanilla" else stack,
                    GenerationConfig(mode=kind.split("-")[0], max_new_tokens=n),
                    engine=EngineConfig(
                        device="cpu",
                        max_len=32 + n + 32,
                        compile=True,
                        window=11,
                        audio_heads=kind.endswith("audio"),
                    ),
                    vocab=speech,
                )
                t = time.perf_counter()
                outs[(name, kind)] = g.generate(prompt).sequences
                print(name, kind, "warm", round(time.perf_counter() - t, 1), flush=True)
                gens[(name, kind)] = g
        finally:
            fast_path._template_guards = orig
    for kind in kinds:
        if not torch.equal(outs[("before", kind)], outs[("after", kind)]):
            raise SystemExit(f"{kind}: before and after give different tokens")
    times = {k: [] for k in gens}
    for _ in range(runs):
        for kind in kinds:
            for name in ("before", "after"):
                g = gens[(name, kind)]
                t = time.perf_counter()
                g.generate(prompt)
                times[(name, kind)].append(time.perf_counter() - t)
    print(
        f"\n0.5B shape, {layers} layers, bf16, {args.threads} threads, {n} new tokens, "
        f"median of {runs} runs taking turns\n"
    )
    print("| mode | before tok/s | after tok/s | after / before |")
    print("| --- | ---: | ---: | ---: |")
    for kind in kinds:
        b = statistics.median(times[("before", kind)])
        a = statistics.median(times[("after", kind)])
        print(f"| {kind} | {n / b:.1f} | {n / a:.1f} | {b / a:.2f}x |")


if __name__ == "__main__":
    main()
