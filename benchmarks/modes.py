"""Generation speed per mode: the paper's Table 8 / Table 9 protocol on random weights.

Random-init Qwen2.5-shaped backbones (vocabulary 168,072 = Qwen2.5 + VITA-Audio's speech
tokens) with 10 MCTP heads, a 32-token random prompt, a fixed number of new tokens, greedy,
no stop token. Every mode is measured side by side in one process, the modes interleaved in
round-robin order, and the median of ``--repeats`` runs is reported with its ratio to our own
Vanilla. MCTP modes are reported twice: heads scoring the full vocabulary (as the original) and
heads restricted to BOA/EOA + the 16,384 audio tokens (exact for these modes).

"tok/CPU-s" divides by the CPU time of the process (all its threads) instead of the wall clock:
with ``--threads 1`` it hardly depends on what else the machine runs.

"decode tok/s" leaves the prefill out (tokens after the first over the time after it): the
steady state that the paper's 4096-token runs measure. "First audio" is the time from the call
until the tokens of the first audio segment exist (Table 9's quantity): the end of the
schedule's first m-run for Balance/Boost/Turbo; for Vanilla, the same 11 tokens Boost needs
(text + BOA + 8 audio + EOA) all made by the backbone.

Usage::

    python benchmarks/modes.py --config 0.5b --new-tokens 128 --repeats 3      # CPU
    python benchmarks/modes.py --config 0.5b --new-tokens 128 --compile --max-autotune --window 11
    python benchmarks/modes.py --config 7b --device cuda --dtype bfloat16 --new-tokens 1024 --compile

``--compile`` times the fast path (``EngineConfig(compile=True)``) for every mode, Vanilla
included (``--compile-cache FILE`` reuses the compiled artifacts of an earlier run):
CUDA graphs on CUDA; on CPU ``--max-autotune`` adds Inductor's GEMM templates with frozen
weights (bf16 weights, fp32 arithmetic in registers: the fastest multi-row bf16 GEMM we found on
CPUs without bf16 matrix units, 3.5x faster than eager's at 11 rows). ``--window`` sets the
fixed window of the fast path: 11 = Turbo's backlog (1 backbone token + 10 head tokens); the
longer backlogs of Boost (4 text tokens + 10) catch up in an extra compiled window.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import time
from pathlib import Path
from typing import Any

import torch

CONFIGS = {
    # name: (hidden, layers, heads, kv_heads, intermediate, vocab, tie)
    "tiny": (64, 2, 4, 2, 128, 1024, False),
    "0.5b": (896, 24, 14, 2, 4864, 168072, True),  # Qwen2.5-0.5B shapes
    "7b": (3584, 28, 28, 4, 18944, 168072, False),  # Qwen2.5-7B shapes
}


def qwen2_config(name: str, layers: int | None = None, **overrides: Any) -> Any:
    """The ``Qwen2Config`` of the shape ``name`` (a key of :data:`CONFIGS`), with SDPA
    attention; ``layers`` (default: the shape's) and ``overrides`` replace its fields."""
    from transformers import Qwen2Config

    hidden, n_layers, heads, kv, inter, vocab, tie = CONFIGS[name]
    fields = dict(
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=layers or n_layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        intermediate_size=inter,
        tie_word_embeddings=tie,
        max_position_embeddings=32768,
        rope_theta=1e6,
        rms_norm_eps=1e-6,
    )
    cfg = Qwen2Config(**{**fields, **overrides})
    cfg._attn_implementation = "sdpa"
    return cfg


def build(
    name: str, device: str, dtype: torch.dtype, num_heads: int = 10, layers: int | None = None
):
    from transformers import Qwen2ForCausalLM

    from mctp import MCTPStack
    from mctp.backbones import HFBackbone
    from mctp.speech_vocab import AUDIO_PLACEHOLDER, BOA, EOA, SpeechVocab

    cfg = qwen2_config(name, layers)
    vocab = cfg.vocab_size
    torch.manual_seed(0)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = Qwen2ForCausalLM(cfg).eval()
    finally:
        torch.set_default_dtype(old)
    backbone = HFBackbone(model, verify=False)
    stack = (
        MCTPStack.from_backbone(backbone.parts(), num_heads).to(device=device, dtype=dtype).eval()
    )
    if vocab == 168072:
        speech = SpeechVocab(
            {BOA: 151674, EOA: 151675, AUDIO_PLACEHOLDER: 151684}, 151685, 16384, vocab
        )
    else:
        speech = SpeechVocab(
            {BOA: vocab - 67, EOA: vocab - 66, AUDIO_PLACEHOLDER: vocab - 65}, vocab - 64, 64, vocab
        )
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    return backbone, stack, speech, weight_bytes


def autotune_mode(device: str, *, cudagraphs: bool) -> dict:
    """``torch.compile`` kwargs for Inductor's max-autotune GEMMs (CUDA graphs on CUDA if asked).

    Off CUDA the GEMM templates also need frozen weights: run the compiling calls inside
    :func:`frozen_weights` (Dynamo reads ``torch._inductor.config.freezing`` itself when it
    traces, so ``torch.compile(options={"freezing": True})`` is not enough).
    """
    cuda_graphs = cudagraphs and device.startswith("cuda")
    return {"mode": "max-autotune" if cuda_graphs else "max-autotune-no-cudagraphs"}


def frozen_weights(on: bool):
    """A context in which Inductor freezes weights into the graphs (restored on exit)."""
    import contextlib

    import torch._inductor.config as inductor_config

    return inductor_config.patch(freezing=True) if on else contextlib.nullcontext()


def first_segment_end(mode: str) -> int:
    from mctp.interleave import InterleaveSchedule

    sched = InterleaveSchedule.from_mode("boost" if mode in ("vanilla", "verified") else mode)
    return sched.segment(0)[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", choices=sorted(CONFIGS), default="0.5b")
    p.add_argument(
        "--layers", type=int, default=None, help="backbone layers (default: the config's)"
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--new-tokens", type=int, default=None, help="default: 64 on CPU, 1024 on GPU")
    p.add_argument("--prompt", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument(
        "--modes",
        default="vanilla,balance,boost,turbo",
        help="comma list; add verified to time the lossless mode (its speed depends on how often the heads agree with the backbone: random heads almost never do)",
    )
    p.add_argument("--compile", action="store_true", help="time the fast path (torch.compile)")
    p.add_argument(
        "--max-autotune",
        action="store_true",
        help="with --compile: Inductor max-autotune GEMMs and, on CPU, weights frozen into "
        "every graph (the fast path before packed weights: several GB per graph set)",
    )
    p.add_argument(
        "--no-pack",
        action="store_true",
        help="with --compile: no packed linear weights (mctp.engine.compile_packing) on CPU",
    )
    p.add_argument(
        "--no-regions",
        action="store_true",
        help="with --compile: whole graphs (every layer and head unrolled) instead of one "
        "compiled graph per kind of layer and head (mctp.engine.regions); --max-autotune "
        "implies it (frozen weights cannot be shared)",
    )
    p.add_argument("--window", type=int, default=16, help="fast-path window (with --compile)")
    p.add_argument(
        "--compile-cache",
        default=None,
        help="with --compile: load torch's compile artifacts from this file when it exists and "
        "save them there after the warm-up (a second start of the same shapes warms up fast)",
    )
    p.add_argument(
        "--compile-cache-dir",
        default=None,
        help="with --compile: as --compile-cache, in this folder (FastPath's compile_cache_dir)",
    )
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    p.add_argument(
        "--bandwidth-gbs", type=float, default=None, help="memory bandwidth for the roofline column"
    )
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    n = args.new_tokens or (64 if args.device == "cpu" else 1024)

    t = time.perf_counter()
    backbone, stack, speech, weight_bytes = build(
        args.config, args.device, dtype, layers=args.layers
    )
    build_s = time.perf_counter() - t
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(
        0,
        151000 if backbone.vocab_size > 200000 else backbone.vocab_size - 100,
        (1, args.prompt),
        generator=g,
    )
    prompt = prompt.to(args.device)

    variants: list[tuple[str, str, dict]] = []
    for mode in args.modes.split(","):
        if mode == "vanilla":
            variants.append(("vanilla", "-", {}))
        elif mode == "verified":
            variants.append(("verified", "full", {"verify": True, "mode": "vanilla"}))
        else:
            variants.append((mode, "full", {}))
            variants.append((mode, "audio", {"audio_heads": True}))

    from mctp import (
        EngineConfig,
        GenerationConfig,
        Generator,
        load_compile_cache,
        save_compile_cache,
    )
    from mctp.engine.fast_path import COMPILE_CACHE_FILE

    compile_options: dict = {}
    if args.compile and args.max_autotune:
        compile_options = autotune_mode(args.device, cudagraphs=True)
    frozen = args.compile and args.max_autotune and not args.device.startswith("cuda")
    if args.compile_cache_dir:
        args.compile_cache = str(Path(args.compile_cache_dir) / COMPILE_CACHE_FILE)
    loaded = args.compile and args.compile_cache and load_compile_cache(args.compile_cache)
    base_cfg = GenerationConfig(mode="vanilla", max_new_tokens=n)
    engine = EngineConfig(
        device=args.device,
        max_len=args.prompt + n + 32,
        compile=args.compile,
        compile_options=compile_options,
        window=args.window,
        pack_weights=False if args.no_pack or frozen else None,
        compile_regions=False if args.no_regions or frozen else None,
    )
    # one Generator (caches, buffers, compiled callables) per stack and head vocabulary,
    # reused by every run (audio-only heads change compiled shapes: an engine setting)
    gens = {
        (use_stack, audio): Generator(
            backbone,
            stack if use_stack else None,
            base_cfg,
            engine=engine.replace(audio_heads=audio),
            vocab=speech,
        )
        for use_stack, audio in ((False, False), (True, False), (True, True))
        if speech is not None or not audio
    }
    packed = args.compile and gens[(True, False)].path.packs_weights

    def run(mode: str, kw: dict):
        kw = dict(kw)
        m = kw.pop("mode", mode)
        audio = kw.pop("audio_heads", False)
        gen = gens[(mode != "vanilla", audio)]
        cfg = gen.config.replace(mode=m, **kw)
        cpu = time.process_time()
        res = gen.generate(prompt, config=cfg, sync_timings=True)
        res.cpu_s = time.process_time() - cpu  # CPU time of this process (all its threads)
        return res

    t, cpu = time.perf_counter(), time.process_time()
    with frozen_weights(frozen):
        for mode, _, kw in variants:  # warm-up: the fast path compiles on the first call
            run(mode, kw)
    warm_s, warm_cpu_s = time.perf_counter() - t, time.process_time() - cpu
    if args.compile and args.compile_cache and not loaded:
        try:
            save_compile_cache(args.compile_cache)
        except RuntimeError as err:  # frozen graphs bypass torch's caches: nothing to save
            print(f"compile cache not saved: {err}")
    times: dict[tuple[str, str], list] = {}
    for _ in range(args.repeats):
        for mode, heads, kw in variants:
            res = run(mode, kw)
            end = first_segment_end(mode)
            first = next(s for produced, s in res.cycle_times if produced >= end)
            after = res.total_s - res.cycle_times[0][1]  # everything after the prefill
            decode = (n - res.cycle_times[0][0]) / after
            times.setdefault((mode, heads), []).append((res.total_s, first, res, decode, res.cpu_s))

    # the warm-up calls generate too: what compiling added is the warm-up minus the same
    # calls' steady-state time (their medians)
    steady_s = sum(statistics.median(x[0] for x in xs) for xs in times.values())
    compile_s = warm_s - steady_s
    base = statistics.median(x[0] for x in times[("vanilla", "-")])
    base_decode = statistics.median(x[3] for x in times[("vanilla", "-")])
    dev = (
        torch.cuda.get_device_name()
        if args.device.startswith("cuda")
        else platform.processor() or platform.machine()
    )
    print(
        f"config {args.config} ({weight_bytes / 1e9:.2f} GB backbone weights), device {args.device} ({dev}), "
        f"dtype {args.dtype}, threads {torch.get_num_threads()}, torch {torch.__version__}"
    )
    print(
        f"prompt {args.prompt} tokens, {n} new tokens, greedy, random weights, median of {args.repeats}; "
        f"build {build_s:.1f} s, warm-up {warm_s:.1f} s ({warm_cpu_s:.1f} CPU s; "
        f"{compile_s:.1f} s over the same calls' steady-state {steady_s:.1f} s)"
        + (" (compile cache loaded)" if loaded else "")
        + "; "
        f"compile {(compile_options or True) if args.compile else 'off'}"
        + (", frozen weights" if frozen else "")
        + (", packed weights" if packed else "")
        + (", regions" if args.compile and gens[(False, False)].path.regions is not None else "")
        + (f", window {args.window}" if args.compile else "")
        + "\n"
    )
    cols = (
        "mode",
        "heads",
        "tokens/s",
        "speed-up",
        "decode tok/s",
        "decode x",
        "backbone fwd",
        "MCTP steps",
        "first audio (ms)",
        "tok/CPU-s",
    )
    rows = []
    results = []
    for (mode, heads), xs in times.items():
        total = statistics.median(x[0] for x in xs)
        first = statistics.median(x[1] for x in xs)
        decode = statistics.median(x[3] for x in xs)
        per_cpu = n / statistics.median(x[4] for x in xs)
        res = xs[0][2]
        results.append(
            {"mode": mode, "heads": heads, "tokens_s": n / total, "decode_s": decode}
            | {"tokens_cpu_s": per_cpu}
        )
        rows.append(
            (
                mode,
                heads,
                f"{n / total:.1f}",
                f"{base / total:.2f}x",
                f"{decode:.1f}",
                f"{decode / base_decode:.2f}x",
                str(res.num_backbone_forwards),
                str(res.num_mctp_steps),
                f"{1000 * first:.1f}",
                f"{per_cpu:.1f}",
            )
        )
    widths = [max(len(r[i]) for r in [cols, *rows]) for i in range(len(cols))]
    for r in [cols, tuple("-" * w for w in widths), *rows]:
        print("| " + " | ".join(c.rjust(w) for c, w in zip(r, widths)) + " |")
    if args.json:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        info = {"warm_up_s": warm_s, "warm_up_cpu_s": warm_cpu_s, "build_s": build_s}
        info["warm_up_compile_s"] = compile_s
        info["peak_rss_bytes"] = peak
        info |= {"weight_bytes": weight_bytes, "cache_loaded": bool(loaded), "rows": results}
        Path(args.json).write_text(json.dumps(info, indent=1))
    if args.bandwidth_gbs:
        limit = args.bandwidth_gbs * 1e9 / weight_bytes
        van = n / base
        print(
            f"\nVanilla {van:.1f} tok/s = {100 * van / limit:.0f}% of the weight-streaming limit {limit:.1f} tok/s"
        )


if __name__ == "__main__":
    main()
