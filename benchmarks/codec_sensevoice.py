"""Speed of the SenseVoiceSmall adapter at the released sizes (random weights, no download).

Builds a SenseVoiceSmall-shaped encoder (560 -> 512, 4 heads, FFN 2048, 50 + 20 SANM blocks,
FSMN kernel 11; 16 query rows) plus the VITA-Audio-Plus projector (512 -> ``--hidden``) in
memory, then times, per utterance length: the Kaldi front end (fbank + LFR + CMVN), the
encoder forward, and the projector, and prints a markdown table with the real-time factor
(RTF = compute time / audio duration). The FFN width 2048 is the SenseVoice code's default;
read your release's ``config.yaml`` for the exact value.

    python benchmarks/codec_sensevoice.py                       # CPU, float32
    python benchmarks/codec_sensevoice.py --device cuda --dtype bfloat16
"""

from __future__ import annotations

import argparse
import time

import torch

from mctp.codecs.projector import MLPProjector
from mctp.codecs.sensevoice.encoder import SenseVoiceEncoder, build_sensevoice_model
from mctp.codecs.sensevoice.frontend import SenseVoiceFrontend

RELEASED_CONFIG = {
    "encoder": "SenseVoiceEncoderSmall",
    "encoder_conf": {
        "output_size": 512,
        "attention_heads": 4,
        "linear_units": 2048,
        "num_blocks": 50,
        "tp_blocks": 20,
        "kernel_size": 11,
        "sanm_shfit": 0,
        "normalize_before": True,
    },
    "frontend": "WavFrontend",
    "frontend_conf": {"fs": 16000, "window": "hamming", "n_mels": 80, "frame_length": 25,
                      "frame_shift": 10, "lfr_m": 7, "lfr_n": 6},
}  # fmt: skip


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _timed(fn, device: torch.device, repeats: int) -> float:  # type: ignore[no-untyped-def]
    fn()  # warm-up
    _sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    _sync(device)
    return (time.perf_counter() - start) / repeats


def main() -> None:
    """Parse arguments, build the model, print the table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--seconds", type=float, nargs="+", default=[2.0, 10.0, 30.0])
    ap.add_argument("--batch", type=int, default=1, help="utterances per encoder forward")
    ap.add_argument("--hidden", type=int, default=3584, help="LLM hidden size of the projector")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    torch.manual_seed(0)
    model = build_sensevoice_model(RELEASED_CONFIG).to(device=device, dtype=dtype)
    frontend = SenseVoiceFrontend(shift=torch.full((560,), -12.0), scale=torch.full((560,), 0.3))
    encoder = SenseVoiceEncoder(model=model, frontend=frontend, batch_size=args.batch)
    projector = MLPProjector(512, args.hidden).to(device=device, dtype=dtype).eval()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"device={device} dtype={args.dtype} threads={torch.get_num_threads()} "
          f"encoder params={n_params / 1e6:.1f}M batch={args.batch}")  # fmt: skip
    print()
    print("| audio (s) | frames (F+4) | front end (ms) | encoder (ms) | projector (ms) | RTF |")
    print("|---:|---:|---:|---:|---:|---:|")
    g = torch.Generator().manual_seed(0)
    for seconds in args.seconds:
        wavs = [0.1 * torch.randn(int(seconds * 16000), generator=g) for _ in range(args.batch)]
        feats = [frontend(w) for w in wavs]
        t_front = _timed(
            lambda ws=wavs: [frontend(w) for w in ws], torch.device("cpu"), args.repeats
        )
        t_enc = _timed(lambda fs=feats: encoder.encode_features(fs), device, args.repeats)
        frames = encoder.encode_features(feats)
        with torch.no_grad():
            t_proj = _timed(lambda fr=frames: [projector(f) for f in fr], device, args.repeats)
        total = t_front + t_enc + t_proj
        rtf = total / (seconds * args.batch)
        print(f"| {seconds:g} x {args.batch} | {frames[0].shape[0]} | {1e3 * t_front:.1f} | "
              f"{1e3 * t_enc:.1f} | {1e3 * t_proj:.1f} | {rtf:.3f} |")  # fmt: skip


if __name__ == "__main__":
    main()
