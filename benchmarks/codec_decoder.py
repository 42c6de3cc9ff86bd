"""Speed of the GLM-4-Voice decoder adapter at the released sizes (random weights).

Measures, per device: real-time factor of offline ``decode`` for 2 s and 10 s of ids (flow and
HiFT timed separately too) and the latency of the first streaming chunk (25 ids, the web
demo's first block), with 10 Euler steps by default.

    python benchmarks/codec_decoder.py                 # CPU (+ CUDA if available)
    python benchmarks/codec_decoder.py --repeats 3 --n-timesteps 10 --threads 2

No weights are downloaded: the modules are built from ``RELEASED_CONFIG`` (the released
``config.yaml`` values, sources below) with PyTorch's default random init.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable

import torch
from tqdm import tqdm

from mctp.codecs.glm4voice.config import parse_decoder_config
from mctp.codecs.glm4voice.decoder import GLM4VoiceDecoder
from mctp.codecs.glm4voice.flow import build_flow
from mctp.codecs.glm4voice.hift import build_hift

# Released GLM-4-Voice decoder sizes. Sources:
#  [G] config.yaml of the released glm-4-voice-decoder (huggingface.co/THUDM/glm-4-voice-decoder;
#      a verbatim copy is in github.com/susameddin/sympatheia, glm-4-voice-decoder/config.yaml):
#      vocab_size 16384, input_frame_rate 12.5, BlockConformerEncoder output_size 512,
#      attention_heads 8, linear_units 2048, num_blocks 6, block_size 10; estimator channels
#      [256, 256], attention_head_dim 64, n_blocks 4, num_mid_blocks 12, num_heads 8, gelu;
#      HiFT base_channels 512, f0 cond_channels 512, the rest as below.
#  [C] CosyVoice-v1 examples/libritts/cosyvoice/conf/cosyvoice.yaml (FunAudioLLM/CosyVoice):
#      identical flow estimator, length regulator, CFM and HiFT values (the GLM decoder is a
#      retrained CosyVoice-v1 flow + HiFT); its flow encoder is a plain ConformerEncoder.
#  [D] shared/DESIGN.md: token embedding 16384x512, 6 blocks 512-d 8 heads, block 10.
RELEASED_CONFIG = """\
sample_rate: 22050                          # [G]
spk_embed_dim: 192                          # [G]
flow: !new:cosyvoice.flow.flow.MaskedDiffWithXvec
    input_size: 512                         # [G][D]
    output_size: 80
    spk_embed_dim: !ref <spk_embed_dim>
    vocab_size: 16384                       # [G][D]
    input_frame_rate: 12.5                  # [G]
    encoder: !new:cosyvoice.transformer.encoder.BlockConformerEncoder
        output_size: 512                    # [G][D]
        attention_heads: 8                  # [G][D]
        linear_units: 2048                  # [G]
        num_blocks: 6                       # [G][D]
        normalize_before: True
        input_layer: 'linear'
        pos_enc_layer_type: 'rel_pos_espnet'
        selfattention_layer_type: 'block_rel_selfattn'
        block_size: 10                      # [G][D]
        input_size: 512
        use_cnn_module: False
        macaron_style: False
    length_regulator: !new:cosyvoice.flow.length_regulator.InterpolateRegulator
        channels: 80                        # [G][C]
        sampling_ratios: [1, 1, 1, 1]       # [G][C]
    decoder: !new:cosyvoice.flow.flow_matching.ConditionalCFM
        in_channels: 240
        n_spks: 1
        spk_emb_dim: 80
        cfm_params: !new:omegaconf.DictConfig
            content:
                solver: 'euler'
                t_scheduler: 'cosine'       # [G][C]
                inference_cfg_rate: 0.7     # [G][C]
        estimator: !new:cosyvoice.flow.decoder.ConditionalDecoder
            in_channels: 320
            out_channels: 80
            channels: [256, 256]            # [G][C]
            attention_head_dim: 64          # [G][C]
            n_blocks: 4                     # [G][C]
            num_mid_blocks: 12              # [G][C]
            num_heads: 8                    # [G][C]
            act_fn: 'gelu'                  # [G][C]
hift: !new:cosyvoice.hifigan.generator.HiFTGenerator
    in_channels: 80
    base_channels: 512                      # [G][C]
    nb_harmonics: 8                         # [G][C]
    sampling_rate: !ref <sample_rate>
    nsf_alpha: 0.1
    nsf_sigma: 0.003
    nsf_voiced_threshold: 10
    upsample_rates: [8, 8]                  # [G][C]
    upsample_kernel_sizes: [16, 16]         # [G][C]
    istft_params:
        n_fft: 16                           # [G][C]
        hop_len: 4                          # [G][C]
    resblock_kernel_sizes: [3, 7, 11]       # [G][C]
    resblock_dilation_sizes: [[1, 3, 5], [1, 3, 5], [1, 3, 5]]
    source_resblock_kernel_sizes: [7, 11]   # [G][C]
    source_resblock_dilation_sizes: [[1, 3, 5], [1, 3, 5]]
    lrelu_slope: 0.1
    audio_limit: 0.99
    f0_predictor: !new:cosyvoice.hifigan.f0_predictor.ConvRNNF0Predictor
        num_class: 1
        in_channels: 80
        cond_channels: 512                  # [G][C]
"""


def build_released_decoder(device: str, dtype: torch.dtype, n_timesteps: int) -> GLM4VoiceDecoder:
    """Random-weight decoder at the released sizes.

    Args:
        device: Target device.
        dtype: Parameter dtype.
        n_timesteps: Euler steps.

    Returns:
        The decoder.
    """
    cfg = parse_decoder_config(RELEASED_CONFIG)
    flow = build_flow(cfg.flow, sample_rate=cfg.sample_rate, hop_length=cfg.hift.hop_length)
    hift = build_hift(cfg.hift)
    flow.to(device=device, dtype=dtype)
    hift.to(device=device, dtype=dtype)
    return GLM4VoiceDecoder(
        flow, hift, sample_rate=cfg.sample_rate, n_timesteps=n_timesteps, config=cfg
    )


def _timed(fn: Callable[[], object], device: str, repeats: int) -> float:
    """Median wall time (s) of ``fn`` over ``repeats`` runs."""
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _run_device(device: str, args: argparse.Namespace) -> list[dict[str, object]]:
    dec = build_released_decoder(device, getattr(torch, args.dtype), args.n_timesteps)
    n_params = sum(p.numel() for m in (dec.flow, dec.hift) for p in m.parameters())
    print(f"[{device}] {n_params / 1e6:.1f}M parameters (flow + HiFT)", file=sys.stderr)
    gen = torch.Generator().manual_seed(args.seed)
    threads = torch.get_num_threads() if device == "cpu" else "-"
    common = {"device": device, "dtype": args.dtype, "threads": threads, "steps": args.n_timesteps}
    rows: list[dict[str, object]] = []
    cases = [(f"offline {s:g} s", round(s * dec.frame_rate)) for s in args.durations]
    for label, n_ids in tqdm(cases, desc=f"{device} offline", file=sys.stderr):
        ids = torch.randint(0, dec.codebook_size, (n_ids,), generator=gen)
        audio_s = dec.num_samples(n_ids) / dec.sample_rate
        mel = dec.decode_mel(ids, n_timesteps=1)
        for _ in range(args.warmup):  # same shapes as the timed runs (oneDNN primitives, allocator)
            dec.decode_mel(ids, n_timesteps=1)
            dec.vocode(mel)
        t_flow = _timed(lambda ids=ids: dec.decode_mel(ids), device, args.repeats)
        t_hift = _timed(lambda mel=mel: dec.vocode(mel), device, args.repeats)
        total = t_flow + t_hift
        rows.append(
            {
                **common,
                "case": f"{label} ({n_ids} ids)",
                "audio_s": audio_s,
                "flow_ms": 1e3 * t_flow,
                "hift_ms": 1e3 * t_hift,
                "total_ms": 1e3 * total,
                "rtf": total / audio_s,
            }
        )
    ids = torch.randint(0, dec.codebook_size, (args.first_chunk,), generator=gen)
    out: list[torch.Tensor] = []

    def first_chunk() -> None:
        out[:] = [dec.stream().push(ids, final=False)]

    for _ in range(args.warmup):
        dec.stream().push(ids, final=False)
    t_first = _timed(first_chunk, device, args.repeats)
    audio_s = out[0].numel() / dec.sample_rate
    rows.append(
        {
            **common,
            "case": f"stream 1st chunk ({args.first_chunk} ids)",
            "audio_s": audio_s,
            "flow_ms": float("nan"),
            "hift_ms": float("nan"),
            "total_ms": 1e3 * t_first,
            "rtf": t_first / audio_s,
        }
    )
    return rows


def run(args: argparse.Namespace) -> list[dict[str, object]]:
    """Run every case on CPU (and CUDA when available); one row per (device, case).

    Offline ``decode`` is exactly ``decode_mel`` followed by ``vocode``, so the two are timed
    separately and the total is their sum. Each case is first run untimed on the same shapes
    (the flow with one Euler step, which creates the same kernels at a tenth of the cost).

    Args:
        args: Parsed command-line flags.

    Returns:
        Table rows.
    """
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() and not args.cpu_only else [])
    return [row for device in devices for row in _run_device(device, args)]


def format_table(rows: list[dict[str, object]]) -> str:
    """Markdown table of the rows."""
    head = "| case | device | dtype | threads | Euler steps | audio (s) | flow (ms) | HiFT (ms) | total (ms) | RTF |"
    lines = [head, "|" + "---|" * 10]
    for r in rows:

        def ms(v: object) -> str:
            return "-" if v != v else f"{v:.0f}"  # NaN -> "-"

        lines.append(
            f"| {r['case']} | {r['device']} | {r['dtype']} | {r['threads']} | {r['steps']} | "
            f"{r['audio_s']:.2f} | {ms(r['flow_ms'])} | {ms(r['hift_ms'])} | {ms(r['total_ms'])} | "
            f"{r['rtf']:.3f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--durations", type=float, nargs="+", default=[2.0, 10.0], help="seconds of ids"
    )
    parser.add_argument("--first-chunk", type=int, default=25, help="ids in the first stream chunk")
    parser.add_argument("--n-timesteps", type=int, default=10, help="Euler steps")
    parser.add_argument("--repeats", type=int, default=1, help="timed runs per case (median)")
    parser.add_argument(
        "--warmup", type=int, default=1, help="untimed runs per case (flow with 1 Euler step)"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--cpu-only", action="store_true", help="skip CUDA even if available")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    print(format_table(run(args)))


if __name__ == "__main__":
    main()
