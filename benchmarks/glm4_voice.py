"""GLM-4-Voice-9B with MCTP heads: first-audio latency per schedule, random weights.

GLM-4-Voice answers with its own interleave: 13 text tokens, then 26 audio tokens, and its
speech decoder starts on the first 10 audio tokens. The first sound therefore needs the first
23 answer tokens (13 text + 10 audio). This script builds ``GlmForCausalLM`` at the
GLM-4-Voice-9B shape (hidden 4096, 40 layers, 32 heads / 2 key-value groups of 128, MLP 13696,
vocabulary 168,960; ``--layers``/``--hidden``/... shrink it) with random weights and 26 MCTP
heads, and measures side by side, in one process, modes interleaved round-robin:

* ``vanilla``: the backbone makes every token (the released model);
* ``native [13, 26]``: the backbone writes the 13 text tokens, a chain of 26 heads the audio
  run (GLM-4-Voice's own interleave as an MCTP schedule);
* ``turbo [1, 10]``: one backbone forward, then 10 heads, repeating;
* ``turbo [1, 10] verified``: the same, every head token checked by the backbone (output equals
  Vanilla's; with random heads almost nothing is accepted: the worst case).

Per mode: backbone forwards and time until the first 23 answer tokens exist (the first audio
block, when the heads reproduce the model's tokens, as trained heads aim to), and time and
tokens/s for ``--new-tokens``. Greedy, no stop token, median of ``--repeats``.

Usage::

    python benchmarks/glm4_voice.py --hidden 1024 --layers 8 --heads 8 --ffn 3424 --repeats 3  # CPU
    python benchmarks/glm4_voice.py --device cuda --dtype bfloat16 --new-tokens 256            # 9B
"""

from __future__ import annotations

import argparse
import platform
import statistics
import subprocess
import sys
import time

import torch

FIRST_AUDIO_TOKENS = 13 + 10  # text run + the decoder's first block
TEXT_BEFORE_AUDIO = 13


def cpu_info() -> str:
    """CPU model and its AVX-512 / AMX flags (lscpu)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return platform.processor() or platform.machine()
    model = next(
        (ln.split(":", 1)[1].strip() for ln in out.splitlines() if "Model name" in ln), "?"
    )
    flags = next((ln.split(":", 1)[1].split() for ln in out.splitlines() if "Flags" in ln), [])
    keep = [f for f in flags if f.startswith(("avx512", "amx", "avx2"))]
    return f"{model}; flags {' '.join(keep)}"


def build(args: argparse.Namespace, dtype: torch.dtype):
    """Random GLM-4-Voice-shaped backbone, 26 heads and the audio id range."""
    from transformers import GlmConfig, GlmForCausalLM

    from mctp import MCTPStack
    from mctp.backbones import HFBackbone

    cfg = GlmConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.ffn,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_groups,
        head_dim=args.hidden // args.heads,
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 10000.0,
            "partial_rotary_factor": 0.5,
        },
        rms_norm_eps=3.90625e-08,
        attention_bias=True,
        max_position_embeddings=8192,
        tie_word_embeddings=False,
        pad_token_id=None,
    )
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(args.device):
            model = GlmForCausalLM(cfg).eval()
    finally:
        torch.set_default_dtype(old)
    backbone = HFBackbone(model, verify=False)
    stack = MCTPStack.from_backbone(backbone.parts(), 26).to(device=args.device, dtype=dtype)
    # the released audio ids: 16384 tokens from 151552 (a small vocabulary: its last 64 ids)
    audio = (
        (151552, 151552 + 16384) if args.vocab >= 151552 + 16384 else (args.vocab - 64, args.vocab)
    )
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    return backbone, stack.eval(), audio, weight_bytes


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--layers", type=int, default=40)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-groups", type=int, default=2)
    p.add_argument("--ffn", type=int, default=13696)
    p.add_argument("--vocab", type=int, default=168960)
    p.add_argument("--prompt", type=int, default=64, help="prompt tokens")
    p.add_argument("--new-tokens", type=int, default=None, help="default: 48 on CPU, 256 on GPU")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    n = args.new_tokens or (256 if args.device.startswith("cuda") else 48)
    if n < FIRST_AUDIO_TOKENS:
        p.error(f"--new-tokens must be >= {FIRST_AUDIO_TOKENS}")
    dtype = getattr(torch, args.dtype)

    from mctp import generate
    from mctp.interleave import InterleaveSchedule

    t0 = time.perf_counter()
    backbone, stack, rng, weight_bytes = build(args, dtype)
    build_s = time.perf_counter() - t0
    print(f"built in {build_s:.1f} s", file=sys.stderr, flush=True)
    modes = {
        "vanilla": (InterleaveSchedule.vanilla(), False),
        "native [13, 26]": (
            InterleaveSchedule([13, 26], tagged=False, audio_range=rng, num_heads=26),
            False,
        ),
        "turbo [1, 10]": (InterleaveSchedule([1, 10], tagged=False, audio_range=rng), False),
        "turbo [1, 10] verified": (
            InterleaveSchedule([1, 10], tagged=False, audio_range=rng),
            True,
        ),
    }
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, rng[0], (1, args.prompt), generator=g).to(args.device)

    def run(sched: InterleaveSchedule, verify: bool):
        return generate(
            backbone,
            stack if sched.uses_mctp else None,
            prompt,
            mode=sched,
            max_new_tokens=n,
            verify=verify,
            eos_token_id=None,
            sync_timings=True,
        )

    t0 = time.perf_counter()
    for name, (sched, verify) in modes.items():  # warm-up: allocations, kernels
        run(sched, verify)
        print(f"warm-up {name}: {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
    warm_s = time.perf_counter() - t0
    rows: dict[str, list] = {m: [] for m in modes}
    for _ in range(args.repeats):
        for name, (sched, verify) in modes.items():
            res = run(sched, verify)
            first = next(s for produced, s in res.cycle_times if produced >= FIRST_AUDIO_TOKENS)
            rows[name].append((first, res.total_s, res))
            print(f"{name}: {res.total_s:.2f} s", file=sys.stderr, flush=True)

    dev = torch.cuda.get_device_name() if args.device.startswith("cuda") else cpu_info()
    print(
        f"GLM-4-Voice shape: hidden {args.hidden}, layers {args.layers}, heads {args.heads}/"
        f"{args.kv_groups} kv, ffn {args.ffn}, vocab {args.vocab} ({weight_bytes / 1e9:.2f} GB "
        f"backbone weights), 26 MCTP heads; device {args.device} ({dev}), dtype {args.dtype}, "
        f"threads {torch.get_num_threads()}, torch {torch.__version__}"
    )
    print(
        f"prompt {args.prompt} tokens, {n} new tokens, greedy, random weights, median of "
        f"{args.repeats}; build {build_s:.1f} s, warm-up {warm_s:.1f} s"
    )
    print(
        f"first audio = the first {FIRST_AUDIO_TOKENS} answer tokens ({TEXT_BEFORE_AUDIO} text "
        "tokens before the first audio token in GLM-4-Voice's pattern + the decoder's first "
        "10-token block)"
    )
    print()
    head = (
        "| mode | backbone fwd to first audio | first audio (ms) | vs vanilla | "
        f"{n} tokens (ms) | tok/s | vs vanilla | accepted / drafted |"
    )
    print(head)
    print("|" + "---|" * 8)
    base_first = statistics.median(r[0] for r in rows["vanilla"])
    base_total = statistics.median(r[1] for r in rows["vanilla"])
    for name, (sched, verify) in modes.items():
        first = statistics.median(r[0] for r in rows[name])
        total = statistics.median(r[1] for r in rows[name])
        res = rows[name][-1][2]
        if verify:
            fwd = "-"  # depends on acceptance
            acc = f"{res.num_accepted} / {res.num_drafted}"
        else:
            fwd = str(sched.cost(FIRST_AUDIO_TOKENS)[0])
            acc = "-"
        print(
            f"| {name} | {fwd} | {1000 * first:.1f} | {base_first / first:.2f}x | "
            f"{1000 * total:.1f} | {n / total:.1f} | {base_total / total:.2f}x | {acc} |"
        )


if __name__ == "__main__":
    main()
