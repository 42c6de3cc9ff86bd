"""Built-in demonstration: ``python -m mctp.demo`` (no download, well under a minute on a
2-core CPU).

It builds a small random Qwen2-shaped speech LM (8 layers, width 128, fp32) with 10 MCTP
heads, teaches it for a few seconds to recite one interleaved text+audio answer (so that its
audio segments are real BOA ... EOA segments), printing the loss as it goes, then

1. generates the answer in every mode and prints a table (tokens/s, speed-up over Vanilla,
   backbone forwards, MCTP steps, time to the first complete audio segment), and
2. streams the Boost generation and writes every event to ``<out>/stream_events.jsonl``
   plus the audio (rendered by the dummy codec) to ``<out>/stream_audio.wav``.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path

import torch

__all__ = ["build_demo_model", "main", "teach_answer"]

BOA, EOA, PLACEHOLDER, EOS = 250, 251, 249, 2
AUDIO_CONTEXT_ID = 248  # <|context_of_audio|>: VITA-Audio-Plus's encoder-frame placeholder
AUDIO_START, NUM_AUDIO = 252, 64


def teach_answer(
    backbone: torch.nn.Module,
    stack: torch.nn.Module,
    prompt: torch.Tensor,
    answer: list[int],
    *,
    steps: int,
    lr: float,
    progress: Callable[[int, float], None] | None = None,
) -> None:
    """Train backbone and heads (Adam, full batch) to continue ``prompt [1, P]`` with ``answer``.

    The loss is the library's one stage loss (:func:`mctp.total_loss`: the backbone's LM loss on
    the answer plus :func:`mctp.mctp_loss`, every sum over the answer's labelled tokens); both
    models are left in eval mode.

    Args:
        backbone: The backbone (trained in place).
        stack: The MCTP heads (trained in place).
        prompt: ``[1, P]`` prompt ids.
        answer: The continuation to learn.
        steps: Adam steps.
        lr: Learning rate.
        progress: Called as ``progress(step, loss)`` after every step.
    """
    from mctp import mctp_loss, total_loss

    seq = torch.cat([prompt, torch.tensor([answer], device=prompt.device)], dim=1)
    labels = seq.clone()
    labels[:, : prompt.shape[1]] = -100
    opt = torch.optim.Adam([*backbone.parameters(), *stack.parameters()], lr=lr)
    backbone.train()
    stack.train()
    for step in range(steps):
        out = backbone(seq, labels=labels)
        loss = total_loss(
            out.loss, mctp_loss(stack, out.hidden, seq, labels), backbone_frozen=False
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
        if progress is not None:
            progress(step + 1, float(loss.detach()))
    backbone.eval()
    stack.eval()


def build_demo_model(
    *,
    train_steps: int = 90,
    seed: int = 0,
    hidden: int = 128,
    layers: int = 8,
    num_audio: int = NUM_AUDIO,
    lr: float = 3e-3,
    progress: Callable[[int, float], None] | None = None,
):
    """A small Qwen2 backbone + 10 heads taught to recite one Boost-layout answer.

    The default size (8 layers of width 128, fp32) is where MCTP's point shows on a laptop
    CPU: a head is one decoder layer, the backbone eight, so Turbo makes 11 tokens for the
    price of about two backbone forwards; teaching takes seconds.

    Args:
        train_steps: Adam steps of :func:`teach_answer`.
        seed: Seed of the weights, the prompt and the answer.
        hidden: Model width.
        layers: Backbone decoder layers.
        num_audio: Audio tokens ``<|audio_k|>`` (a codec's codebook size).
        lr: Learning rate.
        progress: See :func:`teach_answer`.

    Returns:
        ``(backbone, stack, vocab, prompt [1, P], answer ids)``.
    """
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from mctp import MCTPStack
    from mctp.backbones import HFBackbone
    from mctp.interleave import InterleaveSchedule
    from mctp.speech_vocab import AUDIO_CONTEXT, AUDIO_PLACEHOLDER, SpeechVocab
    from mctp.speech_vocab import BOA as BOA_S
    from mctp.speech_vocab import EOA as EOA_S

    torch.manual_seed(seed)
    cfg = Qwen2Config(
        vocab_size=AUDIO_START + num_audio,
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
    audio = torch.randint(AUDIO_START, AUDIO_START + num_audio, (40,), generator=g).tolist()
    answer = [*InterleaveSchedule.boost().interleave(text, audio, BOA, EOA), EOS]
    teach_answer(backbone, stack, prompt, answer, steps=train_steps, lr=lr, progress=progress)
    vocab = SpeechVocab(
        special={
            BOA_S: BOA,
            EOA_S: EOA,
            AUDIO_PLACEHOLDER: PLACEHOLDER,
            AUDIO_CONTEXT: AUDIO_CONTEXT_ID,
        },
        audio_start=AUDIO_START,
        num_audio=num_audio,
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
    p.add_argument("--train-steps", type=int, default=90)
    args = p.parse_args(argv)

    from mctp import generate, generate_stream
    from mctp.codecs import DummyCodec

    torch.set_num_threads(max(1, min(4, torch.get_num_threads())))
    t = time.perf_counter()
    print(
        f"teaching a 8-layer, 128-wide Qwen2 speech LM and 10 MCTP heads one spoken answer "
        f"({args.train_steps} Adam steps, threads {torch.get_num_threads()})",
        flush=True,
    )

    def progress(step: int, loss: float) -> None:
        if step % 10 == 0 or step == args.train_steps:
            print(f"  step {step:3d}/{args.train_steps}  loss {loss:.3f}", flush=True)

    backbone, stack, vocab, prompt, answer = build_demo_model(
        train_steps=args.train_steps, progress=progress
    )
    print(
        f"taught in {time.perf_counter() - t:.1f} s (answer: {len(answer)} tokens); "
        f"generating it in every mode, {args.repeats} runs each\n",
        flush=True,
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
        "\nexact: the generated tokens equal the taught answer. A head is one decoder layer and "
        "the backbone eight,\nso the MCTP modes make most tokens for an eighth of a backbone "
        "forward; verified mode checks every draft\nwith the backbone (lossless). Speed at real "
        "shapes: docs/benchmarks.md"
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
