"""A change to the regional CPU path, before and after in one process (full 0.5B shape, bf16).

``--change parts-and-globals`` (second round): "before", one-row products reduce over the whole
``K`` at once (``PackedLinearPass.gemv_chunk`` off) and the regional graphs keep Dynamo's
guards on globals; "after", the defaults (long ``K`` summed in parts,
:func:`mctp.engine.compile_packing.gemv_chunks`; guards on globals dropped,
``mctp.engine.fast_path._compile_region``; since the third round also the block graphs'
guards on modules). Both variants share the backbone, the heads and
the packed weights (their compile options differ, so they get regions of their own).

``--change module-guards`` (third round): "before", a block's graph keeps Dynamo's guards on
modules and drops only those on globals, as the shared functions still do; "after", the
default ``mctp.engine.fast_path._template_guards`` (neither; the guards on tensors and grad
mode stay). Each variant has its own backbone of the same seed (regions are shared per
backbone and compile options).

``--change dynamic-slots`` (fifth round): "before", the layers' graphs read every cache slot
(``mctp.engine.fast_path.DYNAMIC_SLOTS`` off); "after", the default: one graph for any number
of slots, each step reading the slots the sequence holds. Each variant has its own backbone of
the same seed. ``--max-len`` sets the cache (the default, prompt + answer + 32, leaves little
to skip; a server's 4,096 much more).

The tokens of both variants are checked equal (``dynamic-slots``: counted, as SDPA then sums
over other blocks of slots and bf16 rounds differently), and the variants take turns run by run, so the
machine's drift hits them alike. Prints a table of medians. No test asserts these numbers.

Usage::

    python benchmarks/decode_ab.py --change parts-and-globals --layers 24 --runs 7
    python benchmarks/decode_ab.py --change module-guards --layers 24 --runs 7
    python benchmarks/decode_ab.py --change dynamic-slots --layers 24 --runs 7 --max-len 1024
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

KINDS = ("vanilla", "turbo", "turbo-audio")
NEW_TOKENS = 64


@contextlib.contextmanager
def _patched(module: object, name: str, value: object) -> Iterator[None]:
    """``module.name = value`` inside the block (the variant's graphs are compiled there)."""
    old = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, old)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--change", choices=["parts-and-globals", "module-guards", "dynamic-slots"], required=True
    )
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-len", type=int, default=None, help="cache slots (default: P + 96)")
    args = ap.parse_args()

    import modes

    from mctp import EngineConfig, GenerationConfig, Generator
    from mctp.engine import fast_path
    from mctp.engine.compile_packing import PackedLinearPass

    torch.set_num_threads(args.threads)
    n = NEW_TOKENS
    prompt = torch.randint(0, 151000, (1, 32), generator=torch.Generator().manual_seed(0))
    shared = modes.build("0.5b", "cpu", torch.bfloat16, layers=args.layers)

    def generators(parts, chunk: int | None) -> dict[str, Generator]:
        backbone, stack, speech, _ = parts
        options = {}
        if chunk is not None:
            gemv = PackedLinearPass()
            gemv.gemv_chunk = chunk  # its repr differs: the variants get regions of their own
            options = {"compile_options": {"options": {"post_grad_custom_post_pass": gemv}}}
        return {
            kind: Generator(
                backbone,
                None if kind == "vanilla" else stack,
                GenerationConfig(mode=kind.split("-")[0], max_new_tokens=n),
                engine=EngineConfig(
                    device="cpu",
                    max_len=args.max_len or 32 + n + 32,
                    compile=True,
                    window=11,
                    audio_heads=kind == "turbo-audio",
                    **options,
                ),
                vocab=speech,
            )
            for kind in KINDS
        }

    # name -> (model, gemv chunk, the context its Generators are built and compiled in)
    if args.change == "parts-and-globals":

        def every_guard(kwargs, fn, tag, guards=None):  # "before": every guard kept
            return fast_path._compile_with(kwargs, fn, tag)

        plan = {
            "before": (shared, 10**9, lambda: _patched(fast_path, "_compile_region", every_guard)),
            "after": (shared, PackedLinearPass.gemv_chunk, contextlib.nullcontext),
        }
    elif args.change == "dynamic-slots":
        other = modes.build("0.5b", "cpu", torch.bfloat16, layers=args.layers)
        plan = {
            "before": (other, None, lambda: _patched(fast_path, "DYNAMIC_SLOTS", False)),
            "after": (shared, None, contextlib.nullcontext),
        }
    else:
        globals_only = torch.compiler.skip_guard_on_globals_unsafe
        other = modes.build("0.5b", "cpu", torch.bfloat16, layers=args.layers)
        plan = {
            "before": (other, None, lambda: _patched(fast_path, "_template_guards", globals_only)),
            "after": (shared, None, contextlib.nullcontext),
        }

    gens: dict[str, dict[str, Generator]] = {}
    tokens = {}
    for name, (parts, chunk, context) in plan.items():
        with (
            context()
        ):  # the regions take their compile functions when built, compile at first call
            gens[name] = generators(parts, chunk)
            for kind, gen in gens[name].items():
                t = time.perf_counter()
                tokens[(name, kind)] = gen.generate(prompt).sequences
                print(f"{name} {kind}: warm-up {time.perf_counter() - t:.1f} s", flush=True)
    for kind in KINDS:
        before, after = tokens[("before", kind)], tokens[("after", kind)]
        if args.change == "dynamic-slots":  # SDPA sums over other blocks of slots: rounding
            same = int((before == after).sum()) if before.shape == after.shape else 0
            print(f"{kind}: {same} of {before.numel()} tokens equal before and after")
        elif not torch.equal(before, after):
            raise SystemExit(f"{kind}: before and after give different tokens")
    times: dict[tuple[str, str], list[float]] = {(v, k): [] for v in plan for k in KINDS}
    for _ in range(args.runs):
        for kind in KINDS:
            for name in plan:
                t = time.perf_counter()
                gens[name][kind].generate(prompt)
                times[(name, kind)].append(time.perf_counter() - t)
    print(
        f"\n{args.change}: 0.5B shape, {args.layers} layers, bf16, {args.threads} threads, "
        f"{n} new tokens, median of {args.runs} runs taking turns\n"
    )
    print("| mode | before tok/s | after tok/s | after / before |")
    print("| --- | ---: | ---: | ---: |")
    for kind in KINDS:
        b = statistics.median(times[("before", kind)])
        a = statistics.median(times[("after", kind)])
        print(f"| {kind} | {n / b:.1f} | {n / a:.1f} | {b / a:.2f}x |")
    # what the guards cost, read directly (the tok/s above move within the machine's noise for
    # changes of a few percent): Dynamo's cache lookups of one Vanilla call under the profiler
    from torch.profiler import ProfilerActivity, profile

    print("\n| variant | Dynamo cache lookups (Vanilla, one call) | us per lookup | ms per token |")
    print("| --- | ---: | ---: | ---: |")
    for name in plan:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            gens[name]["vanilla"].generate(prompt)
        lookups = [e for e in prof.key_averages() if e.key == "TorchDynamo Cache Lookup"]
        count = sum(e.count for e in lookups)
        total_us = sum(e.cpu_time_total for e in lookups)
        per = total_us / count if count else 0.0
        print(f"| {name} | {count} | {per:.1f} | {total_us / 1000 / n:.2f} |")


if __name__ == "__main__":
    main()
