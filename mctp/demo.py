"""Built-in demonstration: ``python -m mctp.demo`` (no download, a few seconds on a laptop CPU).

It builds a small random Qwen2-shaped speech LM with 10 MCTP heads, teaches it for a few
seconds to recite one interleaved text+audio answer (so that its audio segments are real
BOA ... EOA segments), then

1. generates the answer in every mode and prints a table (tokens/s, speed-up over Vanilla,
   backbone forwards, MCTP steps, time to the first complete audio segment), and
2. streams the Boost generation and writes every event to ``<out>/stream_events.jsonl``
   plus the audio (rendered by the dummy codec) to ``<out>/stream_audio.wav``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

__all__ = ["build_demo_model", "main", "teach_answer"]

BOA, EOA, PLACEHOLDER, EOS = 250, 251, 249, 2
AUDIO_START, NUM_AUDIO = 252, 64


def teach_answer(
    backbone: torch.nn.Module,
    stack: torch.nn.Module,
    prompt: torch.Tensor,
    answer: list[int],
    *,
    steps: int,
    lr: float,
) -> None:
    """Train backbone and heads (Adam, full batch) to continue ``prompt [1, P]`` with ``answer``.

    The loss is the backbone's LM loss on the answer plus the MCTP loss; both models are left
    in eval mode.
    """
    from mctp import mctp_loss

    seq = torch.cat([prompt, torch.tensor([answer], device=prompt.device)], dim=1)
    labels = seq.clone()
    labels[:, : prompt.shape[1]] = -100
    opt = torch.optim.Adam([*backbone.parameters(), *stack.parameters()], lr=lr)
    backbone.train()
    stack.train()
    for _ in range(steps):
        out = backbone(seq, labels=labels)
        loss = out.loss + mctp_loss(stack, out.hidden, seq, labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    backbone.eval()
    stack.eval()


def build_demo_model(*, train_steps: int = 150, seed: int = 0, hidden: int = 64, layers: int = 2):
    """A tiny Qwen2 backbone + 10 heads taught to recite one Boost-layout answer.

    Returns:
        ``(backbone, stack, vocab, prompt [1, P], answer ids)``.
    """
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from mctp import MCTPStack
    from mctp.backbones import AUDIO_PLACEHOLDER, HFBackbone, SpeechVocab
    from mctp.backbones import BOA as BOA_S
    from mctp.backbones import EOA as EOA_S
    from mctp.interleave import InterleaveSchedule

    torch.manual_seed(seed)
    cfg = Qwen2Config(
        vocab_size=AUDIO_START + NUM_AUDIO,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=False,
    )
    cfg._attn_implementation = "sdpa"
    model = Qwen2ForCausalLM(cfg)
    backbone = HFBackbone(model)
    stack = MCTPStack.from_backbone(backbone.parts(), 10)
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(3, 200, (1, 8), generator=g)
    text = torch.randint(3, 200, (13,), generator=g).tolist()
    audio = torch.randint(AUDIO_START, AUDIO_START + NUM_AUDIO, (40,), generator=g).tolist()
    answer = [*InterleaveSchedule.boost().interleave(text, audio, BOA, EOA), EOS]
    teach_answer(backbone, stack, prompt, answer, steps=train_steps, lr=1e-2)
    vocab = SpeechVocab(
        special={BOA_S: BOA, EOA_S: EOA, AUDIO_PLACEHOLDER: PLACEHOLDER},
        audio_start=AUDIO_START,
        num_audio=NUM_AUDIO,
        vocab_size=cfg.vocab_size,
    )
    return backbone, stack, vocab, prompt, answer


def main(argv: list[str] | None = None) -> None:
    """Run the demonstration (see the module docstring)."""
    p = argparse.ArgumentParser(prog="python -m mctp.demo", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--out", type=Path, default=Path("out"), help="folder for the streamed events and audio"
    )
    p.add_argument("--repeats", type=int, default=3, help="timed runs per mode (median reported)")
    p.add_argument("--train-steps", type=int, default=150)
    args = p.parse_args(argv)

    from mctp import generate, generate_stream
    from mctp.codecs import DummyCodec

    torch.set_num_threads(max(1, min(4, torch.get_num_threads())))
    t = time.perf_counter()
    backbone, stack, vocab, prompt, answer = build_demo_model(train_steps=args.train_steps)
    print(
        f"built and taught the demo model in {time.perf_counter() - t:.1f} s "
        f"(answer: {len(answer)} tokens, threads {torch.get_num_threads()})\n"
    )

    rows = []
    runs: dict[str, list] = {}
    modes = ["vanilla", "balance", "boost", "turbo", "verified"]
    for _ in range(args.repeats):  # interleave modes so that drifts hit all of them alike
        for mode in modes:
            kw = {"verify": True} if mode == "verified" else {}
            res = generate(
                backbone,
                stack,
                prompt,
                "vanilla" if mode == "verified" else mode,
                len(answer),
                vocab=vocab,
                eos_token_id=EOS,
                **kw,
            )
            runs.setdefault(mode, []).append(res)
    base = None
    for mode in modes:
        res = sorted(runs[mode], key=lambda r: r.total_s)[len(runs[mode]) // 2]
        ok = res.tokens[0].tolist() == answer
        tps = res.tokens_per_s
        base = base or tps
        ttfa = f"{1000 * res.first_audio_s:.1f}" if res.first_audio_s is not None else "-"
        acc = f"{res.acceptance_rate:.2f}" if res.acceptance_rate is not None else "-"
        rows.append(
            (
                mode,
                f"{tps:.0f}",
                f"{tps / base:.2f}x",
                str(res.num_backbone_forwards),
                str(res.num_mctp_steps),
                ttfa,
                acc,
                "yes" if ok else "NO",
            )
        )
    head = (
        "mode",
        "tokens/s",
        "speed-up",
        "backbone fwd",
        "MCTP steps",
        "first audio (ms)",
        "accept",
        "exact",
    )
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    for r in [head, tuple("-" * w for w in widths), *rows]:
        print("| " + " | ".join(c.rjust(w) for c, w in zip(r, widths)) + " |")

    print(
        "\n(a 64-wide 2-layer model costs framework overhead, not arithmetic, so the modes run at "
        "about the same speed here;\n the columns to read are the forward counts, the first audio "
        "segment and exactness. Speed at real shapes: docs/benchmarks.md)"
    )
    args.out.mkdir(parents=True, exist_ok=True)
    codec = DummyCodec(codebook_size=NUM_AUDIO)
    audio = []
    with open(args.out / "stream_events.jsonl", "w") as f:
        for ev in generate_stream(
            backbone, stack, prompt, "boost", len(answer), vocab=vocab, eos_token_id=EOS
        ):
            f.write(
                json.dumps(
                    {
                        "kind": ev.kind,
                        "row": ev.row,
                        "ids": ev.ids,
                        "ms": round(1000 * ev.time_s, 2),
                    }
                )
                + "\n"
            )
            if ev.kind == "audio":
                audio.append(codec.decode(vocab.to_codes(ev.ids)))
    import soundfile as sf

    wav = torch.cat(audio) if audio else torch.zeros(0)
    sf.write(args.out / "stream_audio.wav", wav.numpy(), codec.sample_rate)
    print(
        f"\nwrote {args.out / 'stream_events.jsonl'} and {args.out / 'stream_audio.wav'} "
        f"({wav.numel() / codec.sample_rate:.2f} s of dummy-codec audio)"
    )


if __name__ == "__main__":
    main()
