"""VITA-Audio's four training stages as one short recipe (``main(cfg)``) and a CLI.

::

    python examples/vita_audio/train.py --config examples/vita_audio/recipes/stage1.yaml \\
        --override model.path=/models/Qwen2.5-7B-Instruct run.out_dir=out/stage1

========  =====================================  ============  ==========================
stage     what trains                            lr            MCTP heads
========  =====================================  ============  ==========================
1         every LLM parameter (main loss)        6e-5          none
2         head 0 only (LLM frozen, detached)     1e-3          1 (copy of the last layer)
3         the heads (LLM frozen, detached)       1e-3          grown to 10 (copies)
4         everything (main + MCTP loss)          5e-5, x10     10
========  =====================================  ============  ==========================

The starting model is loaded with :func:`vita_audio.checkpoint.load_vita_audio` (an official
VITA-Audio folder, or a plain transformers Qwen2 folder for stage 1) and the speech tokens are
added with :func:`mctp.backbones.extend_vocab` when missing. Checkpoints are written in the
official format with :func:`save_vita_audio` plus ``trainer_state.pt`` (optimizer, scheduler,
step, consumed batches, RNG), so the next stage, the official code or a resumed run can load
them. One process; the global batch is reached by gradient accumulation
(``optim.global_batch`` packs per optimizer step).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import shutil
import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from itertools import islice
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

if __package__ in (None, ""):  # run as a script: import ``vita_audio.*``, not ``data``/``model``
    _HERE = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
    sys.path.insert(0, str(_HERE.parent))

from mctp.backbones import HFBackbone, add_lora, extend_vocab
from mctp.codecs import load_codec
from mctp.interleave import InterleaveSchedule
from mctp.losses import mctp_loss, total_loss
from mctp.stack import MCTPStack
from vita_audio.checkpoint import load_vita_audio, save_vita_audio
from vita_audio.config import FROZEN_STAGES, TrainConfig, load_config, merge_config
from vita_audio.data import AudioCodes, ChatRenderer, VitaAudioData
from vita_audio.mixture import DataMixture
from vita_audio.model import load_tokenizer
from vita_audio.packing import Packer
from vita_audio.tiny import make_tiny_assets

__all__ = ["Trainer", "main"]

STATE_FILE = "trainer_state.pt"


# --------------------------------------------------------------------------- pieces
def warmup_cosine(warmup: int, total: int) -> Any:
    """LR factor: linear warmup over ``warmup`` steps, then cosine from 1 to 0 at ``total``."""

    def factor(step: int) -> float:
        if step < warmup:
            return step / max(1, warmup)
        progress = (step - warmup) / max(1, total - warmup)
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))

    return factor


def param_groups(
    named: Iterable[tuple[str, nn.Parameter]], lr: float, weight_decay: float, tag: str
) -> list[dict[str, Any]]:
    """Trainable params in two AdamW groups: decayed matrices, undecayed biases and norms."""
    decay, plain = [], []
    for name, p in named:
        if p.requires_grad:
            (plain if p.ndim < 2 or name.endswith(".bias") else decay).append(p)
    groups = [
        {"name": tag, "params": decay, "lr": lr, "weight_decay": weight_decay},
        {"name": f"{tag}_no_decay", "params": plain, "lr": lr, "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


def ensure_heads(backbone: HFBackbone, stack: MCTPStack | None, n: int) -> MCTPStack | None:
    """Stage 2 creates head 0 from the last layer; stage 3 grows copies of the last head.

    Raises:
        ValueError: If the checkpoint already has more than ``n`` heads.
    """
    if n == 0:
        return None
    if stack is None:
        return MCTPStack.from_backbone(backbone.parts(), n)
    if stack.num_heads > n:
        raise ValueError(f"the checkpoint has {stack.num_heads} MCTP heads, model.num_heads={n}")
    if stack.num_heads < n:
        stack.grow(n - stack.num_heads)
    return stack


@contextlib.contextmanager
def merged_lora(model: nn.Module) -> Iterator[None]:
    """Temporarily replace LoRA layers by plain Linears holding ``W + delta`` (for saving)."""
    swaps = []
    for name, mod in list(model.named_modules()):
        if hasattr(mod, "get_delta_weight") and hasattr(mod, "get_base_layer"):
            base = mod.get_base_layer()
            merged = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None)
            with torch.no_grad():
                w = base.weight + sum(mod.get_delta_weight(a) for a in mod.active_adapters)
            merged.weight = nn.Parameter(w.detach(), requires_grad=False)
            merged.bias = base.bias
            parent_name, _, attr = name.rpartition(".")
            parent = model.get_submodule(parent_name)
            setattr(parent, attr, merged)
            swaps.append((parent, attr, mod))
    try:
        yield
    finally:
        for parent, attr, mod in swaps:
            setattr(parent, attr, mod)


def latest_checkpoint(out_dir: Path) -> Path | None:
    """The ``checkpoint-N`` folder with the largest ``N`` that holds a trainer state."""
    found = [p for p in out_dir.glob("checkpoint-*") if (p / STATE_FILE).is_file()]
    return max(found, key=lambda p: int(p.name.split("-")[-1]), default=None)


# --------------------------------------------------------------------------- trainer
class Trainer:
    """Everything one stage needs: model, heads, data, optimizer, schedule, checkpoints.

    Args:
        cfg: The stage's configuration.

    Raises:
        ValueError: On an inconsistent configuration (see :meth:`TrainConfig.check`), a codec
            whose codebook exceeds the vocabulary's audio tokens, or a vocabulary that must grow
            under existing heads.
        FileNotFoundError: If ``run.resume`` names a missing checkpoint.
    """

    def __init__(self, cfg: TrainConfig) -> None:
        cfg.check()
        self.cfg = cfg
        torch.manual_seed(cfg.run.seed)
        want = cfg.run.device
        self.device = torch.device(
            ("cuda" if torch.cuda.is_available() else "cpu") if want == "auto" else want
        )
        self.out_dir = Path(cfg.run.out_dir)
        self.frozen = cfg.stage in FROZEN_STAGES
        self.step_count = 0
        self.micro_batches = 0
        self.history: list[dict[str, Any]] = []

        state = None
        resume = cfg.run.resume
        ckpt = latest_checkpoint(self.out_dir) if resume == "auto" else resume
        if ckpt is not None:
            if not (Path(ckpt) / STATE_FILE).is_file():
                raise FileNotFoundError(f"no {STATE_FILE} in the resume checkpoint {ckpt}")
            state = torch.load(Path(ckpt) / STATE_FILE, map_location="cpu", weights_only=False)
        start = cfg.model.path if state is None or cfg.model.lora else str(ckpt)

        self.codec = load_codec(cfg.data.codec, **cfg.data.codec_kwargs)
        self._build_model(start)
        if state is not None and cfg.model.lora:
            self._load_trainable(state["trainable"])
        self._build_optimizer()
        self._build_data()
        if state is not None:
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            self.step_count, self.micro_batches = state["step"], state["micro_batches"]
            torch.set_rng_state(state["rng"])

    # ------------------------------------------------------------------ building
    def _build_model(self, path: str) -> None:
        cfg = self.cfg.model
        ckpt = load_vita_audio(
            path,
            device=self.device,
            dtype=torch.float32,
            attn_implementation=cfg.attn_implementation,
        )
        self.base_config = ckpt.config if ckpt.config.get("model_type") != "qwen2" else None
        tok = load_tokenizer(cfg.tokenizer or path)
        backbone, stack = ckpt.backbone, ckpt.stack
        rows = backbone.vocab_size
        vocab = extend_vocab(tok, backbone.model, num_audio_tokens=self.codec.codebook_size)
        if vocab.vocab_size != rows:  # resized: re-wrap so the backbone sees the new lm_head
            if stack is not None:
                raise ValueError("the vocabulary must grow but the checkpoint already has heads")
            backbone = HFBackbone(backbone.model)
        if self.codec.codebook_size > vocab.num_audio:
            raise ValueError(
                f"codec codebook {self.codec.codebook_size} > {vocab.num_audio} audio tokens"
            )
        stack = ensure_heads(backbone, stack, cfg.num_heads)
        if cfg.gradient_checkpointing:
            enable = getattr(backbone.model, "activation_checkpointing_enable", None)
            (enable or backbone.model.gradient_checkpointing_enable)(
                gradient_checkpointing_kwargs={"use_reentrant": False}
            )
        backbone.requires_grad_(not self.frozen)
        backbone.train(not self.frozen)
        if stack is not None:
            stack.requires_grad_(True).train()
        if cfg.lora:
            add_lora(backbone.model, **cfg.lora)  # after the heads were copied
            if self.cfg.stage == 1:  # the new speech-token rows must learn: embeddings train fully
                backbone.model.get_input_embeddings().requires_grad_(True)
                backbone.model.get_output_embeddings().requires_grad_(True)
        self.tokenizer, self.vocab, self.backbone, self.stack = tok, vocab, backbone, stack

    def _trainable(self) -> Iterator[tuple[str, nn.Parameter]]:
        yield from ((f"backbone.{n}", p) for n, p in self.backbone.named_parameters())
        if self.stack is not None:
            yield from ((f"stack.{n}", p) for n, p in self.stack.named_parameters())

    def _load_trainable(self, saved: Mapping[str, torch.Tensor]) -> None:
        params = {n: p for n, p in self._trainable() if p.requires_grad}
        if set(saved) != set(params):
            raise ValueError(f"trainable params differ: {sorted(set(saved) ^ set(params))[:5]}")
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(saved[n])

    def _build_optimizer(self) -> None:
        o = self.cfg.optim
        groups = param_groups(self.backbone.named_parameters(), o.lr, o.weight_decay, "backbone")
        if self.stack is not None:
            lr = o.lr * o.mctp_lr_mult
            groups += param_groups(self.stack.named_parameters(), lr, o.weight_decay, "mctp")
        self.params = [p for g in groups for p in g["params"]]
        self.optimizer = torch.optim.AdamW(groups, lr=o.lr, betas=o.betas, eps=o.eps)
        warmup = math.ceil(o.warmup_ratio * o.max_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, warmup_cosine(warmup, o.max_steps)
        )

    def _build_data(self) -> None:
        d = self.cfg.data
        cache = AudioCodes.load(d.code_cache) if d.code_cache else {}
        self.codes = AudioCodes(self.codec, root=d.audio_root, cache=cache)
        schedule = InterleaveSchedule.from_ratio(d.interleave) if d.interleave else None
        renderer = ChatRenderer(self.tokenizer, self.vocab, self.codes, schedule)
        mixture = DataMixture.from_config(d.mixture, seed=self.cfg.run.seed, ratios=d.ratios)
        pad_id = self.tokenizer.pad_token_id
        packer = Packer(
            d.max_len, pad_id=0 if pad_id is None else pad_id, pad=d.pad, on_too_long=d.on_too_long
        )
        self.data = VitaAudioData(
            mixture, renderer, packer, on_error=d.on_error, progress=self.cfg.run.progress
        )
        if d.prefetch:
            self.codes.prefetch(mixture.audio_paths())
        self.schedule = schedule

    # ------------------------------------------------------------------ training
    def loss(self, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Stage loss of one ``[1, L]`` batch and the detached per-head CE (or None)."""
        ids, labels, pos = (
            batch[k].to(self.device) for k in ("input_ids", "labels", "position_ids")
        )
        amp = torch.autocast(self.device.type, torch.bfloat16, enabled=self.device.type == "cuda")
        with amp:
            if self.frozen:
                with torch.no_grad():
                    out = self.backbone(ids, position_ids=pos)
            else:
                out = self.backbone(ids, position_ids=pos, labels=labels)
            mtp = None
            if self.stack is not None:
                mtp = mctp_loss(
                    self.stack,
                    out.hidden,
                    ids,
                    labels,
                    position_ids=pos,
                    weight=self.cfg.model.mtp_loss_weight,
                    detach_backbone=self.frozen,
                )
            loss = total_loss(out.loss, mtp, backbone_frozen=self.frozen)
        return loss, None if mtp is None else mtp.per_head

    def step(self, batches: Iterator[Mapping[str, torch.Tensor]]) -> dict[str, Any]:
        """One optimizer step over ``optim.global_batch`` micro-batches drawn from ``batches``.

        Returns:
            ``{"step", "loss", "per_head", "lr", "grad_norm"}`` (also appended to ``history``).
        """
        accum = self.cfg.optim.global_batch
        total, heads = 0.0, None
        for batch in islice(batches, accum):
            loss, per_head = self.loss(batch)
            (loss / accum).backward()
            total += loss.item() / accum
            if per_head is not None:
                heads = per_head / accum if heads is None else heads + per_head / accum
            self.micro_batches += 1
        norm = torch.nn.utils.clip_grad_norm_(self.params, self.cfg.optim.clip)
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step_count += 1
        rec = {
            "step": self.step_count,
            "loss": total,
            "per_head": None if heads is None else [round(h, 4) for h in heads.tolist()],
            "lr": lr,
            "grad_norm": float(norm),
        }
        self.history.append(rec)
        return rec

    def fit(self) -> Path:
        """Train until ``optim.max_steps``, checkpointing; returns the last checkpoint folder."""
        o, r = self.cfg.optim, self.cfg.run
        batches = self.data.batches()
        if self.micro_batches:  # resume: replay the data stream up to where it stopped
            skip = tqdm(
                range(self.micro_batches), desc="skipping seen batches", disable=not r.progress
            )
            for _ in zip(skip, batches):
                pass
        bar = tqdm(
            range(self.step_count, o.max_steps),
            desc=f"stage {self.cfg.stage}",
            disable=not r.progress,
        )
        last = None
        self.out_dir.mkdir(parents=True, exist_ok=True)
        with (self.out_dir / "log.jsonl").open("a") as log:
            for _ in bar:
                rec = self.step(batches)
                log.write(json.dumps(rec) + "\n")
                post = {"loss": f"{rec['loss']:.4f}", "lr": f"{rec['lr']:.2e}"}
                if rec["per_head"]:
                    post["heads"] = " ".join(f"{h:.3f}" for h in rec["per_head"])
                bar.set_postfix(post)
                if r.save_every and self.step_count % r.save_every == 0:
                    last = self.save()
        if last is None or not last.name.endswith(f"-{self.step_count}"):
            last = self.save()
        return last

    # ------------------------------------------------------------------ checkpoints
    def _inference_mode(self) -> list[int] | None:
        """The training ratio for generation_config.json, when the heads can run it."""
        s = self.schedule
        if s is None or self.stack is None or s.max_heads > self.stack.num_heads:
            return None
        return list(s.ratio)

    def save(self) -> Path:
        """Write ``out_dir/checkpoint-<step>`` (official format + trainer state) and rotate."""
        r = self.cfg.run
        folder = self.out_dir / f"checkpoint-{self.step_count}"
        dtype = getattr(torch, r.save_dtype) if r.save_dtype else None
        lora = merged_lora(self.backbone.model) if self.cfg.model.lora else contextlib.nullcontext()
        with lora:
            save_vita_audio(
                self.backbone,
                self.stack,
                folder,
                mtp_loss_weight=self.cfg.model.mtp_loss_weight,
                dtype=dtype,
                base_config=self.base_config,
                tokenizer=self.tokenizer,
                mtp_inference_mode=self._inference_mode(),
            )
        state = {
            "step": self.step_count,
            "micro_batches": self.micro_batches,
            "stage": self.cfg.stage,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": torch.get_rng_state(),
            "trainable": (
                {n: p.detach().cpu() for n, p in self._trainable() if p.requires_grad}
                if self.cfg.model.lora
                else None
            ),
        }
        torch.save(state, folder / STATE_FILE)
        if self.cfg.data.code_cache:
            self.codes.save(self.cfg.data.code_cache)
        if r.save_total_limit > 0:
            older = sorted(
                (p for p in self.out_dir.glob("checkpoint-*") if p != folder),
                key=lambda p: int(p.name.split("-")[-1]),
            )
            for old in older[: max(0, len(older) - (r.save_total_limit - 1))]:
                shutil.rmtree(old)
        return folder


def main(cfg: Mapping[str, Any]) -> list[Trainer]:
    """Run one stage, or the ``stages`` list in order (each starts from the previous result).

    A ``tiny`` section first writes a random tiny Qwen2 and a synthetic dataset into
    ``run.out_dir/assets`` and points ``model.path`` and ``data.mixture`` at them.

    Returns:
        The trainers, one per stage run.

    Raises:
        ValueError, FileNotFoundError: As :class:`TrainConfig` and :class:`Trainer`.
    """
    cfg = dict(cfg)
    stages = cfg.pop("stages", None) or [{}]
    tiny = cfg.pop("tiny", None)
    if tiny is not None:
        out = Path(cfg.get("run", {}).get("out_dir", "out/vita_audio"))
        assets = make_tiny_assets(out / "assets", **tiny)
        cfg = merge_config(
            cfg, {"model": {"path": assets["model"]}, "data": {"mixture": assets["mixture"]}}
        )
    trainers, previous = [], None
    for i, overrides in enumerate(stages):
        raw = merge_config(cfg, overrides)
        if len(stages) > 1:
            run = raw.setdefault("run", {})
            run["out_dir"] = str(
                Path(run.get("out_dir", "out/vita_audio")) / f"stage{raw.get('stage', i + 1)}"
            )
        if previous is not None:
            raw = merge_config(raw, {"model": {"path": str(previous), "tokenizer": None}})
        trainer = Trainer(TrainConfig.from_dict(raw))
        previous = trainer.fit()
        print(f"stage {trainer.cfg.stage}: {trainer.history[-1]} -> {previous}")
        trainers.append(trainer)
    return trainers


def _cli(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="VITA-Audio training recipe (stages 1-4)")
    parser.add_argument("--config", required=True, help="recipe YAML (recipes/stageN.yaml)")
    parser.add_argument("--override", nargs="*", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    main(load_config(args.config, args.override))


if __name__ == "__main__":
    _cli()
