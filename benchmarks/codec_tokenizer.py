"""Real-time factor of the GLM-4-Voice speech tokenizer at the released size (random weights).

The encoder has the released shapes (128 mels, d_model 1280, 20 heads, ffn 5120, 16 layers
built, 1500 positions, codebook 16384); weights are random, which does not change the
amount of work. RTF = processing time / audio duration (lower is faster; < 1 is faster than
real time). The time covers the whole ``encode`` call: log-mel front end, encoder and
codebook search. Example::

    python benchmarks/codec_tokenizer.py --repeats 3 --threads 2
    python benchmarks/codec_tokenizer.py --device cuda --dtypes float32 bfloat16
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from mctp.codecs.glm4voice.tokenizer import GLM4VoiceTokenizer, build_feature_extractor
from mctp.codecs.glm4voice.whisper_vq import WhisperVQEncoder

RELEASED_SIZES = {
    "num_mel_bins": 128,
    "d_model": 1280,
    "num_heads": 20,
    "ffn_dim": 5120,
    "num_layers": 16,
    "max_source_positions": 1500,
    "codebook_size": 16384,
    "pooling_kernel_size": 4,
    "pooling_position": 16,
    "causal_block_size": 200,
}
SAMPLE_RATE = 16000


def build_tokenizer(device: str, dtype: torch.dtype, seed: int = 0) -> GLM4VoiceTokenizer:
    """Released-size tokenizer with random N(0, 0.02^2) weights (LayerNorm weights 1).

    Args:
        device: Target device.
        dtype: Encoder dtype.
        seed: Seed of the weights.

    Returns:
        The tokenizer.
    """
    with torch.device("meta"):
        encoder = WhisperVQEncoder(**RELEASED_SIZES)
    encoder = encoder.to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, param in encoder.named_parameters():
            if "layer_norm.weight" in name:
                param.fill_(1.0)
            else:
                param.normal_(0.0, 0.02, generator=gen)
    encoder = encoder.to(dtype)
    extractor = build_feature_extractor({"feature_size": RELEASED_SIZES["num_mel_bins"]})
    return GLM4VoiceTokenizer(encoder, extractor)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_encode(tok: GLM4VoiceTokenizer, seconds: float, repeats: int, device: str) -> list[float]:
    """Wall times of ``repeats`` calls of ``tok.encode`` on ``seconds`` of audio.

    Args:
        tok: The tokenizer.
        seconds: Audio duration.
        repeats: Number of timed calls.
        device: Device (for CUDA synchronisation).

    Returns:
        One time in seconds per call.
    """
    gen = torch.Generator().manual_seed(1)
    audio = 0.1 * torch.randn(int(seconds * SAMPLE_RATE), generator=gen)
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        ids = tok.encode([audio], progress=False)
        _sync(device)
        times.append(time.perf_counter() - start)
        assert len(ids[0]) == -(-audio.numel() // tok.samples_per_id)
    return times


def main(argv: list[str] | None = None) -> None:
    """Run the benchmark and print a markdown table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, nargs="+", default=[5.0, 30.0])
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per row (median)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--dtypes",
        nargs="+",
        default=None,
        help="float32 / bfloat16 / float16 (default: float32 on CPU, float32 and bfloat16 on CUDA)",
    )
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.threads < 1:
        parser.error("--repeats and --threads must be positive")
    torch.set_num_threads(args.threads)
    dtypes = args.dtypes or (
        ["float32", "bfloat16"] if args.device.startswith("cuda") else ["float32"]
    )

    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    print(f"torch {torch.__version__}, device {name}, threads {torch.get_num_threads()}")
    print("| device | dtype | threads | audio (s) | ids | median time (s) | RTF |")
    print("|---|---|---|---|---|---|---|")
    for dtype_name in dtypes:
        dtype = getattr(torch, dtype_name)
        tok = build_tokenizer(args.device, dtype)
        time_encode(tok, min(args.seconds), 1, args.device)  # warm-up
        for seconds in args.seconds:
            med = statistics.median(time_encode(tok, seconds, args.repeats, args.device))
            ids = -(-int(seconds * SAMPLE_RATE) // tok.samples_per_id)
            print(
                f"| {args.device} | {dtype_name} | {torch.get_num_threads()} | {seconds:g} | {ids} "
                f"| {med:.3f} | {med / seconds:.3f} |",
                flush=True,
            )
        del tok


if __name__ == "__main__":
    main()
