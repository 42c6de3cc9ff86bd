"""The two changes to the regional CPU path of this round, before and after in one process.

"Before": one-row products reduce over the whole ``K`` at once (``PackedLinearPass.gemv_chunk``
off) and the regional graphs keep Dynamo's guards on globals; "after": the defaults (long
``K`` summed in parts, :func:`mctp.engine.compile_packing.gemv_chunks`; guards on globals
dropped, ``mctp.engine.fast_path._compile_region``). Both Generators share the backbone, the
heads and the packed weights; the variants take turns run by run, so the machine's drift
hits them alike. Prints a table of medians. No test asserts these numbers.

Usage::

    python benchmarks/decode_ab.py --layers 24 --runs 7
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
    from mctp.engine.compile_packing import PackedLinearPass

    torch.set_num_threads(args.threads)
    backbone, stack, speech, _ = modes.build("0.5b", "cpu", torch.bfloat16, layers=args.layers)
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, 151000, (1, 32), generator=g)
    n = 64
    base = GenerationConfig(mode="vanilla", max_new_tokens=n)
    kinds = ("vanilla", "turbo", "turbo-audio")

    def engine(chunk: int, audio: bool) -> EngineConfig:
        gemv = PackedLinearPass()
        gemv.gemv_chunk = chunk  # its repr differs: the variants get regions of their own
        return EngineConfig(
            device="cpu",
            max_len=32 + n + 32,
            compile=True,
            window=11,
            audio_heads=audio,
            compile_options={"options": {"post_grad_custom_post_pass": gemv}},
        )

    def generators(chunk: int) -> dict[str, Generator]:
        return {
            k: Generator(
                backbone,
                stack if k != "vanilla" else None,
                base,
                engine=engine(chunk, k == "turbo-audio"),
                vocab=speech,
            )
            for k in kinds
        }

    region = fast_path._compile_region
    fast_path._compile_region = fast_path._compile_with  # "before": every guard kept
    try:
        variants = {"before": generators(10**9)}
    finally:
        fast_path._compile_region = region
    variants["after"] = generators(PackedLinearPass.gemv_chunk)

    def run(gen: Generator, kind: str) -> None:
        gen.generate(prompt, config=gen.config.replace(mode=kind.split("-")[0]))

    for name, gens in variants.items():
        for kind, gen in gens.items():
            t = time.perf_counter()
            run(gen, kind)
            print(f"{name} {kind}: warm-up {time.perf_counter() - t:.1f} s", flush=True)
    times: dict[tuple[str, str], list[float]] = {(v, k): [] for v in variants for k in kinds}
    for _ in range(args.runs):
        for kind in kinds:
            for name in variants:
                t = time.perf_counter()
                run(variants[name][kind], kind)
                times[(name, kind)].append(time.perf_counter() - t)
    print(
        f"\n0.5B shape, {args.layers} layers, bf16, {args.threads} threads, {n} new tokens, "
        f"median of {args.runs} runs taking turns\n"
    )
    print("| mode | before tok/s | after tok/s | after / before |")
    print("| --- | ---: | ---: | ---: |")
    for kind in kinds:
        b = statistics.median(times[("before", kind)])
        a = statistics.median(times[("after", kind)])
        print(f"| {kind} | {n / b:.1f} | {n / a:.1f} | {b / a:.2f}x |")


if __name__ == "__main__":
    main()
