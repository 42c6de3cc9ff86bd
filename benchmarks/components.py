"""Costs of the pieces a generation cycle is made of (explains the per-mode numbers).

Times, medians of ``--repeats``, for: one backbone forward over T new tokens (T = 1, 11, 32;
logits of the last position only, static cache), one MCTP head over a backlog of T slots
(decoder block only), the shared lm_head for one row (full vocabulary vs BOA/EOA + audio), and one
4864x896 linear layer over 1 / 11 / 32 rows (GEMM efficiency of the device and dtype).

With ``--compile`` every piece is timed as ``torch.compile`` runs it (static shapes, as the
fast path of ``generate``); ``--max-autotune`` adds Inductor's GEMM templates (with frozen
weights on CPU), the setting of ``benchmarks/modes.py --compile --max-autotune``.

Usage::

    python benchmarks/components.py --config 0.5b --dtype bfloat16 --threads 2
    python benchmarks/components.py --config 0.5b --dtype bfloat16 --threads 2 --compile --max-autotune
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from modes import autotune_mode, build  # benchmarks/modes.py


def timed(fn, repeats: int, device: str) -> float:
    fn()
    out = []
    for _ in range(repeats):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        out.append(time.perf_counter() - t)
    return 1000 * statistics.median(out)


@torch.inference_mode()
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="0.5b")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--compile", action="store_true", help="time compiled pieces")
    p.add_argument("--max-autotune", action="store_true", help="with --compile: GEMM templates")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    dev = args.device
    kw: dict = {"dynamic": False}
    if args.max_autotune:
        kw.update(autotune_mode(dev, cudagraphs=False))  # frozen weights on CPU

    def maybe_compile(fn):
        return torch.compile(fn, **kw) if args.compile else fn

    from mctp import TokenBuffer
    from mctp.engine.fast_path import backbone_step

    backbone, stack, speech, _ = build(args.config, dev, dtype, num_heads=1)
    h = backbone.hidden_size
    buf = TokenBuffer(1, 128, dev)
    buf.start(torch.randint(0, 1000, (1, 32), device=dev))
    cache = backbone.setup_caches(1, 128, device=dev)  # the backbone protocol's decode
    backbone_step(backbone, buf, cache, buf.index[:32])
    buf.append(torch.randint(0, 1000, (1, 32), device=dev))  # slots 32..63 to re-read
    step = maybe_compile(backbone_step)

    def decode(buf, cache, idx):
        return step(backbone, buf, cache, idx)

    rows = []
    for t in (1, 11, 32):
        idx = buf.index[32 : 32 + t]
        rows.append(
            (
                f"backbone forward, {t} new token(s)",
                timed(lambda idx=idx: decode(buf, cache, idx), args.repeats, dev),
            )
        )
    block = stack.heads[0].block
    run_block = maybe_compile(lambda z, rope: block(z, position_embeddings=rope))
    for t in (1, 11, 33):
        z = torch.randn(1, t, h, dtype=dtype, device=dev)
        rope = backbone.base.rotary_emb(z, torch.arange(t, device=dev)[None])
        rows.append(
            (
                f"MCTP head block, backlog of {t}",
                timed(lambda z=z, rope=rope: run_block(z, rope), args.repeats, dev),
            )
        )
    x = torch.randn(1, h, dtype=dtype, device=dev)
    audio = torch.nn.Linear(h, speech.audio_stop - speech.boa, bias=False, device=dev, dtype=dtype)
    audio.weight.data = backbone.lm_head.weight[speech.boa : speech.audio_stop]
    lm_full, lm_audio = maybe_compile(backbone.lm_head), maybe_compile(audio)
    rows.append(
        (
            f"lm_head, 1 row, full vocabulary ({backbone.vocab_size})",
            timed(lambda: lm_full(x), args.repeats, dev),
        )
    )
    rows.append(
        (
            f"lm_head, 1 row, BOA..audio rows ({audio.weight.shape[0]})",
            timed(lambda: lm_audio(x), args.repeats, dev),
        )
    )
    for dt in sorted({dtype, torch.float32}, key=str):
        lin = maybe_compile(torch.nn.Linear(896, 4864, bias=False, device=dev, dtype=dt))
        for r in (1, 11, 32):
            a = torch.randn(r, 896, dtype=dt, device=dev)
            rows.append(
                (
                    f"linear 4864x896, {r} row(s), {str(dt).split('.')[1]}",
                    timed(lambda a=a, lin=lin: lin(a), 4 * args.repeats, dev),
                )
            )
    name = torch.cuda.get_device_name() if dev.startswith("cuda") else "cpu"
    print(
        f"config {args.config}, device {dev} ({name}), dtype {args.dtype}, threads {torch.get_num_threads()}, median of {args.repeats}, "
        f"compile {'off' if not args.compile else kw}\n"
    )
    width = max(len(r[0]) for r in rows)
    print(f"| {'piece'.ljust(width)} | ms |\n| {'-' * width} | --- |")
    for label, ms in rows:
        print(f"| {label.ljust(width)} | {ms:.2f} |")


if __name__ == "__main__":
    main()
