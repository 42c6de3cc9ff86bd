"""One-token decode products on CPU, side by side in one process: how fast a stack of
decoder MLPs (RMSNorm, gate/up, SiLU, down; one row, bf16) streams its weights through each
compiled form the fast path can use.

* ``reduction``: weights as graph inputs, one-row products as streaming multiply-and-sum
  reductions (:class:`mctp.engine.compile_packing.PackedLinearPass` with its long-``K`` split
  turned off, the fast path before it);
* ``reduction in parts``: the same with a long ``K`` summed in parts (the default,
  :func:`mctp.engine.compile_packing.gemv_chunks`: the 0.5B shape's ``down_proj``, ``K`` =
  4,864, in 8 parts of 608);
* ``frozen template``: weights frozen into the graph and Inductor's GEMM template chosen by
  max-autotune (``--frozen``; one packed weight copy per graph, see docs/compile.md).

Every form is compiled first, then the forms take turns call by call (``--calls`` each), so
that the machine's drift hits them alike; the table gives medians, the weights' bytes per
second and the ratio to ``reduction``. No test asserts these numbers.

Usage::

    python benchmarks/gemv.py --threads 2 --frozen
"""

from __future__ import annotations

import argparse
import contextlib
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from modes import CONFIGS  # the shapes of the modes table

LAYERS = {"0.5b": 24, "7b": 4}  # MLPs in the stack by default (all of 0.5B's; 4 of 7B's 28)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", choices=sorted(LAYERS), default="0.5b")
    ap.add_argument("--layers", type=int, help="MLPs in the stack (default: the shape's)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--calls", type=int, default=60)
    ap.add_argument("--frozen", action="store_true", help="also the frozen GEMM template")
    args = ap.parse_args()

    import torch._inductor.config as inductor_config
    from transformers import Qwen2Config
    from transformers.models.qwen2.modeling_qwen2 import Qwen2MLP, Qwen2RMSNorm

    from mctp.engine.compile_packing import PackedLinearPass

    torch.set_num_threads(args.threads)
    hidden, _, _, _, inter, _, _ = CONFIGS[args.shape]
    layers = args.layers or LAYERS[args.shape]
    cfg = Qwen2Config(hidden_size=hidden, intermediate_size=inter)

    class Stack(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.mlps = torch.nn.ModuleList(Qwen2MLP(cfg) for _ in range(layers))
            self.norms = torch.nn.ModuleList(Qwen2RMSNorm(hidden) for _ in range(layers))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            for norm, mlp in zip(self.norms, self.mlps):
                x = x + mlp(norm(x))
            return x

    torch.manual_seed(0)
    stack = Stack().to(torch.bfloat16).eval().requires_grad_(False)
    x = torch.randn(1, 1, hidden, dtype=torch.bfloat16)
    weight_bytes = sum(p.numel() * p.element_size() for p in stack.mlps.parameters())

    def reduction(chunk: int):
        gemv = PackedLinearPass()
        gemv.gemv_chunk = chunk
        # a code object per form: Dynamo keeps compiled code per code object
        fn = eval("lambda x: stack(x)", {"stack": stack})
        return torch.compile(fn, dynamic=False, options={"post_grad_custom_post_pass": gemv})

    forms: dict[str, tuple] = {
        "reduction": (reduction(10**9), contextlib.nullcontext()),
        "reduction in parts": (reduction(PackedLinearPass.gemv_chunk), contextlib.nullcontext()),
    }
    if args.frozen:
        fn = eval("lambda x: stack(x)", {"stack": stack})
        compiled = torch.compile(fn, dynamic=False, mode="max-autotune-no-cudagraphs")
        forms["frozen template"] = (compiled, inductor_config.patch(freezing=True))
    with torch.no_grad():
        ref = stack(x).float()
        for name, (fn, ctx) in forms.items():
            t = time.perf_counter()
            with ctx:
                out = fn(x).float()
            err = (out - ref).abs().max().item()
            print(
                f"{name}: compiled in {time.perf_counter() - t:.1f} s, max |diff| to eager {err:.3g}"
            )
        times: dict[str, list[float]] = {name: [] for name in forms}
        for _ in range(args.calls):
            for name, (fn, _) in forms.items():
                t = time.perf_counter()
                fn(x)
                times[name].append(time.perf_counter() - t)

    print(
        f"\n{args.shape} MLP x {layers} (hidden {hidden}, intermediate {inter}, one row, bf16), "
        f"{weight_bytes / 1e6:.0f} MB of weights; {platform.processor() or platform.machine()}, "
        f"{args.threads} threads, torch {torch.__version__}; median of {args.calls} calls, "
        "taking turns\n"
    )
    base = statistics.median(times["reduction"])
    print("| form | ms per call | ms per MLP | GB/s | speed vs reduction |")
    print("| ---- | ----------- | ---------- | ---- | ------------------ |")
    for name, ts in times.items():
        t = statistics.median(ts)
        print(
            f"| {name} | {t * 1e3:.2f} | {t / layers * 1e3:.3f} | {weight_bytes / t / 1e9:.1f} "
            f"| {base / t:.2f}x |"
        )


if __name__ == "__main__":
    main()
