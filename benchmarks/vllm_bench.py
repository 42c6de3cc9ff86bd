"""vLLM vs our Generator on CPU, same machine and weights: tokens/s at 1 and 8 concurrent prompts.

Rows: vLLM plain greedy; vLLM with the MCTP drafter (``mctp export vllm``, verified, ``k``
drafts); our Generator Vanilla, verified (``draft_len=k``) and Turbo (``[1, 10]``, unverified).
The model is a random Qwen2-shaped model (fp32) whose 10 heads are trained briefly on the
backbone's own greedy continuations, so acceptance is whatever that gives (printed). Prompts
have equal lengths; "8 concurrent" is one batch of 8 for our Generator and 8 requests batched
by vLLM's scheduler. Medians over ``--repeats`` timed runs after one warm-up run each.

Run in the vLLM venv (``.ci/vllm`` builds ``.venv-vllm``)::

    VLLM_ENABLE_V1_MULTIPROCESSING=0 VLLM_CPU_KVCACHE_SPACE=1 \\
        .venv-vllm/bin/python benchmarks/vllm_bench.py --device cpu
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")

SHAPES = {
    # CPU-sized default; 0.5b/7b are Qwen2.5 shapes (random weights) for benchmarks/gpu_vllm.sh
    "small": dict(
        hidden_size=128,
        intermediate_size=352,
        num_hidden_layers=4,
        num_attention_heads=2,
        num_key_value_heads=1,
        vocab_size=1024,
    ),
    "0.5b": dict(
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        vocab_size=151936,
    ),
    "7b": dict(
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        vocab_size=152064,
    ),
}


def cpu_name() -> str:
    """CPU model and the vector flags that matter here (``lscpu``)."""
    try:
        info = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return platform.processor() or "unknown CPU"
    fields = dict(line.split(":", 1) for line in info.splitlines() if ":" in line)
    name = fields.get("Model name", "?").strip()
    cores = fields.get("CPU(s)", "?").strip()
    flags = set(fields.get("Flags", "").split())
    shown = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]
    return f"{name}, {cores} CPU(s), flags: {' '.join(shown) or 'none of avx2/avx512'}"


def build(root: Path, shape: str, heads: int, steps: int, device: str) -> tuple:
    """Random Qwen2 model + ``heads`` briefly trained heads, saved and exported for vLLM."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from mctp import MCTPStack, generate, mctp_loss
    from mctp.backbones import HFBackbone
    from mctp.vllm.export import export_drafter

    torch.manual_seed(0)
    cfg = Qwen2Config(
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        rope_theta=1e6,
        eos_token_id=None,
        bos_token_id=None,
        **SHAPES[shape],
    )
    model = Qwen2ForCausalLM(cfg)
    with torch.no_grad():  # sharper random model: greedy continuations the heads can learn
        for p in model.parameters():
            if p.ndim == 2:
                p.mul_(3.0)
    model = model.to(device).eval()
    backbone = HFBackbone(model)
    stack = MCTPStack.from_backbone(backbone.parts(), heads)
    g = torch.Generator().manual_seed(1)
    prompts = torch.randint(0, cfg.vocab_size, (8, 8), generator=g).to(device)
    seqs = generate(backbone, None, prompts, mode="vanilla", max_new_tokens=32).sequences
    with torch.no_grad():
        hidden = backbone(seqs).hidden
    opt = torch.optim.Adam(stack.parameters(), lr=2e-3)
    stack.train()
    for _ in range(steps):
        loss = mctp_loss(stack, hidden, seqs, seqs.clone()).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    stack.eval()
    model.save_pretrained(root / "model")
    stack.save_pretrained(root / "heads")
    export_drafter(root / "heads", root / "draft", backbone=root / "model")
    return backbone, stack, cfg.vocab_size


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="small")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--draft-len", type=int, default=3, help="k for vLLM+drafter and verified")
    ap.add_argument("--train-steps", type=int, default=30)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument(
        "--gpu-memory-utilization",
        type=float,
        default=0.35,
        help="vLLM's share of GPU memory (our Generator's model stays resident beside it)",
    )
    args = ap.parse_args()

    from vllm import LLM, SamplingParams

    from mctp import generate
    from mctp.vllm import VLLM_VERSION

    dtype = getattr(torch, args.dtype)
    k, n = args.draft_len, args.new_tokens
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        backbone, stack, vocab = build(root, args.shape, 10, args.train_steps, args.device)
        print(f"built in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        backbone.model.to(dtype)
        stack.to(dtype)
        g = torch.Generator().manual_seed(2)
        prompts = torch.randint(0, vocab, (8, args.prompt_len), generator=g)
        rows: dict[str, dict[int, float]] = {}
        accept: dict[str, str] = {}

        for batch in (1, 8):
            ids = prompts[:batch].to(args.device)
            for name, kw in (
                ("ours Vanilla", dict(mode="vanilla")),
                (f"ours verified (k={k})", dict(mode="vanilla", verify=True, draft_len=k)),
                ("ours Turbo [1,10] (unverified)", dict(mode="turbo")),
            ):
                st = None if name == "ours Vanilla" else stack
                res = {}

                def run(kw=kw, st=st, ids=ids, res=res):
                    res["r"] = generate(backbone, st, ids, max_new_tokens=n, **kw)

                secs = timed(run, args.repeats)
                rows.setdefault(name, {})[batch] = batch * n / secs
                print(f"{name}, {batch} prompt(s): {batch * n / secs:.1f} tok/s", file=sys.stderr)
                r = res["r"]
                if r.num_drafted:
                    accept[name] = f"{r.num_accepted / r.num_drafted:.2f}"

        extra = {}
        if args.device != "cpu":
            extra["gpu_memory_utilization"] = args.gpu_memory_utilization
        params = SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True, detokenize=False)
        for name, spec in (
            ("vLLM plain", None),
            (
                f"vLLM + MCTP drafter (k={k})",
                {"method": "mtp", "model": str(root / "draft"), "num_speculative_tokens": k},
            ),
        ):
            llm = LLM(
                model=str(root / "model"),
                dtype=args.dtype,
                enforce_eager=True,
                skip_tokenizer_init=True,
                max_model_len=args.prompt_len + n + 16,
                max_num_seqs=8,
                seed=0,
                speculative_config=spec,
                disable_log_stats=False,
                **extra,
            )
            for batch in (1, 8):
                inputs = [{"prompt_token_ids": p.tolist()} for p in prompts[:batch]]

                def run(inputs=inputs, llm=llm):
                    outs = llm.generate(inputs, params, use_tqdm=False)
                    assert all(len(o.outputs[0].token_ids) == n for o in outs)

                secs = timed(run, args.repeats)
                rows.setdefault(name, {})[batch] = batch * n / secs
                print(f"{name}, {batch} prompt(s): {batch * n / secs:.1f} tok/s", file=sys.stderr)
            if spec is not None:
                accept[name] = _vllm_acceptance(llm)
            from vllm.distributed import cleanup_dist_env_and_memory

            llm.llm_engine.engine_core.shutdown()
            del llm
            cleanup_dist_env_and_memory()

    import vllm

    print(
        f"device: {args.device} ({cpu_name() if args.device == 'cpu' else torch.cuda.get_device_name()})"
    )
    print(
        f"vllm {vllm.__version__} (plugin pin {VLLM_VERSION}), torch {torch.__version__}, "
        f"torch threads {torch.get_num_threads()}, python {sys.version.split()[0]}"
    )
    print(
        f"shape {args.shape} {SHAPES[args.shape]}, dtype {args.dtype}, prompt {args.prompt_len}"
        f" tokens, {n} new tokens, greedy, median of {args.repeats}"
    )
    print()
    print("| engine | tok/s, 1 prompt | tok/s, 8 concurrent | draft acceptance |")
    print("|---|---:|---:|---:|")
    base = rows["vLLM plain"]
    for name, r in rows.items():
        print(
            f"| {name} | {r[1]:.1f} ({r[1] / base[1]:.2f}x) | {r[8]:.1f} ({r[8] / base[8]:.2f}x)"
            f" | {accept.get(name, '-')} |"
        )
    print()
    print("(x = ratio to vLLM plain at the same concurrency, measured in this run)")


def _vllm_acceptance(llm) -> str:
    """Accepted / drafted tokens from vLLM's spec-decode counters (all runs of this engine)."""
    drafted = accepted = 0
    for metric in llm.get_metrics():
        if metric.name == "vllm:spec_decode_num_draft_tokens":
            drafted += metric.value
        elif metric.name == "vllm:spec_decode_num_accepted_tokens":
            accepted += metric.value
    return f"{accepted / drafted:.2f}" if drafted else "-"


if __name__ == "__main__":
    main()
