"""MCTP heads for a frozen GLM-4-Voice-9B by self-distillation (VITA-Audio's stages 2 and 3).

No labelled speech is needed: the model answers a list of prompts greedily (its own text and
audio tokens, in its own 13/26 interleave), and the heads learn to continue those answers.
The backbone stays frozen, so the main loss is dropped and only the heads train:

* stage 2 (:func:`mctp.training.vita_audio_stage` ``2``): one head, created as a copy of the
  backbone's last layer;
* stage 3 (``3``): ``num_heads`` heads grown as copies of the trained head 0.

Both stages run on :class:`mctp.training.MCTPTrainer` (transformers' ``Trainer``:
``torchrun``/``accelerate`` and DeepSpeed work unchanged). On the real model::

    PYTHONPATH=examples torchrun --nproc-per-node 8 -m glm4_voice.train \\
        --model glm-4-voice-9b --prompts prompts.txt --out glm4-voice-heads \\
        --num-heads 10 --stage2-steps 4000 --stage3-steps 8000 --batch-size 8 --bf16

``prompts.txt`` holds one text instruction per line; the answers are generated on each rank
before training (``--max-new-tokens`` each). The heads are written with
``MCTPStack.save_pretrained`` and load with ``GLM4Voice.from_pretrained(model, heads=out)``.
"""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mctp import MCTPStack

from .model import GLM4Voice

__all__ = ["DistillConfig", "distill", "main", "train_heads"]


@dataclass(frozen=True)
class DistillConfig:
    """Settings of the two stages.

    Attributes:
        num_heads: Heads after stage 3.
        stage2_steps: Optimizer steps of stage 2 (official: 4000).
        stage3_steps: Optimizer steps of stage 3 (official: 8000).
        lr: Peak learning rate of both stages (official: 1e-3).
        batch_size: Answers per micro-batch (packed into one row).
        grad_accum: Micro-batches per optimizer step.
        warmup_ratio: Linear warm-up share of each stage (official: 3%).
        bf16: Mixed precision (None: on CUDA only).
        seed: Seed of the Trainer.
        out_dir: Trainer scratch folder (None: a temporary one).
        logging_steps: Log every this many steps.

    Raises:
        ValueError: On non-positive sizes, steps or learning rate.
    """

    num_heads: int = 10
    stage2_steps: int = 4000
    stage3_steps: int = 8000
    lr: float = 1e-3
    batch_size: int = 8
    grad_accum: int = 1
    warmup_ratio: float = 0.03
    bf16: bool | None = None
    seed: int = 0
    out_dir: str | None = None
    logging_steps: int = 50

    def __post_init__(self) -> None:
        sizes = (self.num_heads, self.stage2_steps, self.stage3_steps, self.batch_size)
        if min(sizes) < 1 or self.grad_accum < 1:
            raise ValueError(
                "num_heads, stage2_steps, stage3_steps, batch_size and grad_accum must be >= 1, "
                f"got {sizes} and {self.grad_accum}"
            )
        if self.lr <= 0 or not 0 <= self.warmup_ratio < 1:
            raise ValueError(
                f"lr must be > 0 and warmup_ratio in [0, 1), got {self.lr}, {self.warmup_ratio}"
            )


def distill(
    llm: GLM4Voice, prompts: Sequence[str | Sequence[int]], *, max_new_tokens: int = 512
) -> list[dict[str, list[int]]]:
    """The model's own greedy answers as training rows.

    Args:
        llm: The model (its heads, if any, are not used).
        prompts: Text instructions or audio codes, one turn each.
        max_new_tokens: Answer budget.

    Returns:
        Rows ``{"input_ids": prompt + answer, "labels": [-100] * len(prompt) + answer}``.

    Raises:
        ValueError: If ``prompts`` is empty or an answer is empty.
    """
    if not prompts:
        raise ValueError("distill needs at least one prompt")
    rows = []
    for p in prompts:
        ids = llm.encode(p)
        answer = llm.generate(ids, mode="vanilla", max_new_tokens=max_new_tokens).tokens[0]
        if answer.numel() == 0:
            raise ValueError(f"the model gave an empty answer to {p!r}")
        prompt = ids[0].tolist()
        rows.append(
            {
                "input_ids": prompt + answer.tolist(),
                "labels": [-100] * len(prompt) + answer.tolist(),
            }
        )
    return rows


def _arguments(cfg: DistillConfig, steps: int, out_dir: str, cuda: bool) -> Any:
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=out_dir,
        max_steps=steps,
        per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        learning_rate=cfg.lr,
        weight_decay=0.0,
        adam_beta1=0.9,
        adam_beta2=0.95,
        adam_epsilon=1e-8,
        max_grad_norm=1.0,
        lr_scheduler_type="cosine",
        warmup_steps=cfg.warmup_ratio,
        save_strategy="no",
        logging_steps=cfg.logging_steps,
        report_to=[],
        disable_tqdm=True,
        seed=cfg.seed,
        use_cpu=not cuda,
        bf16=cuda if cfg.bf16 is None else cfg.bf16,
        remove_unused_columns=False,
        ddp_find_unused_parameters=False,
    )


def train_heads(
    llm: GLM4Voice, rows: Sequence[dict[str, list[int]]], cfg: DistillConfig
) -> MCTPStack:
    """Train heads on a frozen backbone: stage 2 (one head), then stage 3 (``num_heads``).

    Args:
        llm: The model; its heads are replaced by the trained ones.
        rows: Training rows (:func:`distill`).
        cfg: Stage settings.

    Returns:
        The trained heads (eval mode), also set as ``llm.stack``.

    Raises:
        ValueError: If ``rows`` is empty, or the model already has more heads than
            ``cfg.num_heads``.
    """
    from mctp.training import MCTPTrainer, MCTPTrainingModel, PackedCollator, vita_audio_stage

    if not rows:
        raise ValueError("train_heads needs at least one row")
    model = MCTPTrainingModel(backbone=llm.backbone, stack=llm.stack)
    cuda = llm.device.type == "cuda"
    pad = llm.vocab.special.get("<|endoftext|>", 0)
    with tempfile.TemporaryDirectory() as scratch:
        out_dir = cfg.out_dir or scratch
        for stage, steps, heads in ((2, cfg.stage2_steps, 1), (3, cfg.stage3_steps, cfg.num_heads)):
            preset = vita_audio_stage(stage, num_heads=heads, lr=cfg.lr, max_steps=steps)
            # the backbone is frozen (no main term): the weight only scales the heads' loss
            preset = preset.replace(mtp_loss_weight=1.0)
            preset.apply(model)
            model.stack.to(device=llm.device)
            trainer = MCTPTrainer(
                model=model,
                args=_arguments(cfg, steps, f"{out_dir}/stage{stage}", cuda),
                stage=preset,
                data_collator=PackedCollator(pad_id=pad, flatten=True),
                train_dataset=list(rows),
            )
            trainer.train()
    llm.stack = model.stack.eval()
    llm.backbone.eval()
    return llm.stack


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: distill answers, train heads, save them."""
    p = argparse.ArgumentParser(prog="glm4_voice.train", description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="released GLM-4-Voice-9B folder")
    p.add_argument("--prompts", required=True, help="text file, one instruction per line")
    p.add_argument("--out", required=True, help="folder for the heads")
    p.add_argument("--num-heads", type=int, default=10)
    p.add_argument("--stage2-steps", type=int, default=4000)
    p.add_argument("--stage3-steps", type=int, default=8000)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--trust-remote-code", action="store_true", help="released tiktoken tokenizer")
    a = p.parse_args(argv)
    dtype = torch.bfloat16 if a.bf16 else None
    llm = GLM4Voice.from_pretrained(
        a.model, dtype=dtype, device=a.device, trust_remote_code=a.trust_remote_code
    )
    prompts = [line.strip() for line in Path(a.prompts).read_text().splitlines() if line.strip()]
    rows = distill(llm, prompts, max_new_tokens=a.max_new_tokens)
    cfg = DistillConfig(
        num_heads=a.num_heads,
        stage2_steps=a.stage2_steps,
        stage3_steps=a.stage3_steps,
        lr=a.lr,
        batch_size=a.batch_size,
        grad_accum=a.grad_accum,
        bf16=a.bf16,
    )
    train_heads(llm, rows, cfg).save_pretrained(a.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
