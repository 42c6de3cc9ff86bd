"""Configuration of one training stage (``TrainConfig``) and the recipe YAML reader."""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "FROZEN_STAGES",
    "DataConfig",
    "ModelConfig",
    "OptimConfig",
    "RunConfig",
    "TrainConfig",
    "load_config",
    "merge_config",
]

FROZEN_STAGES = (2, 3)  # the LLM is frozen and its outputs detached


@dataclass
class ModelConfig:
    """Which model to start from and its MCTP heads."""

    path: str | None = None  # official VITA-Audio folder, or a transformers Qwen2 folder
    tokenizer: str | None = None  # default: ``path``
    num_heads: int = 0  # stage 1: 0; stage 2: 1 (created); stage 3/4: 10 (grown from head 0)
    mtp_loss_weight: float | None = None  # None: the checkpoint's mtp_loss_weight (official)
    attn_implementation: str = "sdpa"
    gradient_checkpointing: bool = False
    lora: dict[str, Any] | None = None  # add_lora kwargs (r, alpha, ...); stages 1 and 4 only
    audio_encoder: str | None = None  # Plus: SenseVoiceSmall folder (encoder + am.mvn)
    audio_encoder_mode: str | None = None  # "frozen" / "train" (default: the stage preset's)
    audio_projector_mode: str | None = None  # "frozen" / "train" (default: the stage preset's)


@dataclass
class DataConfig:
    """Where the records come from and how they become packs."""

    mixture: Any = None  # official mixture yaml path, or its mapping ({"dataset": {...}})
    ratios: dict[str, float] | None = None  # source name -> ratio overrides ("*": the rest)
    codec: str = "dummy"  # load_codec folder or name (e.g. the glm-4-voice-tokenizer folder)
    codec_kwargs: dict[str, Any] = field(default_factory=dict)
    audio_root: str | None = None  # relative audio paths are taken from here
    interleave: list[int] | None = field(default_factory=lambda: [1, 10, 4, 10])
    max_len: int = 8192
    pad: bool = True
    code_cache: str | None = None  # .npz cache of audio codes (read at start, written at the end)
    prefetch: bool = False  # tokenize every audio file before training
    on_too_long: str = "skip"
    on_error: str = "raise"  # malformed records: "raise" (file:line) or "skip" with a warning
    eval_packs: int = 0  # packs held out (from the end of the plan) for eval_every
    streaming: bool = False  # read the JSONL files with datasets' streaming mode


@dataclass
class OptimConfig:
    """AdamW + transformers' cosine schedule with warmup."""

    lr: float = 6e-5
    mctp_lr_mult: float = 1.0  # stage 4: 10 (a separate param group for the heads)
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.0  # not applied to biases and norm weights
    warmup_ratio: float = 0.03
    max_steps: int = 8000
    global_batch: int = 256  # packs per optimizer step over all processes
    per_device_batch: int = 1  # packs per forward on one process (the rest: accumulation)
    clip: float = 1.0


@dataclass
class RunConfig:
    """Output, checkpoints, resume, engine, logging."""

    out_dir: str = "out/vita_audio"
    save_every: int = 0  # optimizer steps between checkpoints (0: only at the end)
    save_total_limit: int = 2
    save_dtype: str | None = None  # final folder dtype, e.g. "bfloat16" (checkpoints stay fp32)
    resume: str | None = "auto"  # "auto" (latest checkpoint in out_dir), a folder, or null
    seed: int = 42
    device: str = "auto"  # "cpu" forces the CPU; "auto": the accelerator when there is one
    bf16: bool | None = None  # None: on CUDA only
    progress: bool = True
    report_to: list[str] | str | None = None  # None: tensorboard (+ wandb when installed)
    logging_steps: int = 1
    eval_every: int = 0  # optimizer steps between evaluations (needs data.eval_packs)
    num_workers: int = 0  # DataLoader workers
    on_nonfinite: str = "stop"  # "stop" or "skip" the step
    deepspeed: str | None = None  # a DeepSpeed JSON (recipes/deepspeed/zero2.json, zero3.json)
    fsdp: bool = False  # FSDP2 full shard (with fsdp_config)
    fsdp_config: dict[str, Any] | str | None = None  # e.g. recipes/fsdp/full_shard.json


@dataclass
class TrainConfig:
    """One stage of the recipe (see train.py)."""

    stage: int = 1
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> TrainConfig:
        """Build from nested mappings.

        Raises:
            ValueError: On unknown keys, a stage outside 1..4 or head counts that do not fit it.
        """
        sections = {"model": ModelConfig, "data": DataConfig, "optim": OptimConfig}
        sections["run"] = RunConfig
        unknown = set(raw) - {"stage", *sections}
        if unknown:
            raise ValueError(f"unknown config keys {sorted(unknown)}")
        parts = {}
        for name, kind in sections.items():
            values = dict(raw.get(name) or {})
            known = {f.name for f in dataclasses.fields(kind)}
            if set(values) - known:
                raise ValueError(f"unknown keys in '{name}': {sorted(set(values) - known)}")
            for f in dataclasses.fields(kind):  # YAML 1.1 reads 1e-4 as a string
                if "float" in str(f.type) and isinstance(values.get(f.name), str):
                    values[f.name] = float(values[f.name])
            if "betas" in values:
                values["betas"] = tuple(float(b) for b in values["betas"])
            parts[name] = kind(**values)
        cfg = cls(stage=int(raw.get("stage", 1)), **parts)
        cfg.check()
        return cfg

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (printed at start and written to ``out_dir/config.yaml``)."""
        return dataclasses.asdict(self)

    def check(self) -> None:
        """Validate the stage against the heads and LoRA settings.

        Raises:
            ValueError: If they do not fit.
        """
        s, n = self.stage, self.model.num_heads
        if s not in (1, 2, 3, 4):
            raise ValueError(f"stage must be 1, 2, 3 or 4, got {s}")
        if s == 1 and n != 0:
            raise ValueError(f"stage 1 trains the LLM alone: model.num_heads must be 0, got {n}")
        if s in FROZEN_STAGES and n < 1:
            raise ValueError(f"stage {s} trains MCTP heads: model.num_heads must be >= 1, got {n}")
        if s in FROZEN_STAGES and self.model.lora:
            raise ValueError(f"stage {s} freezes the LLM: LoRA on it would train nothing")
        if self.model.path is None:
            raise ValueError("model.path is required (a VITA-Audio or Qwen2 folder)")
        if self.data.mixture is None:
            raise ValueError("data.mixture is required")
        o = self.optim
        if o.global_batch < 1 or o.per_device_batch < 1 or o.global_batch % o.per_device_batch:
            raise ValueError(
                f"optim.global_batch ({o.global_batch}) must be a positive multiple of "
                f"optim.per_device_batch ({o.per_device_batch})"
            )
        if not 0 <= o.warmup_ratio < 1:
            raise ValueError(f"optim.warmup_ratio must lie in [0, 1), got {o.warmup_ratio}")
        if self.run.on_nonfinite not in ("stop", "skip"):
            raise ValueError(
                f"run.on_nonfinite must be 'stop' or 'skip', got {self.run.on_nonfinite!r}"
            )
        if self.data.streaming and self.data.eval_packs:
            raise ValueError("data.eval_packs holds out planned packs: not with data.streaming")
        if self.run.eval_every and not self.data.eval_packs:
            raise ValueError("run.eval_every needs data.eval_packs > 0 (the held-out packs)")


def merge_config(base: dict[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    """A deep copy of ``base`` with ``update`` merged in (nested mappings merged key by key)."""
    out = copy.deepcopy(base)
    for k, v in update.items():
        out[k] = (
            merge_config(out[k], v)
            if isinstance(v, Mapping) and isinstance(out.get(k), dict)
            else v
        )
    return out


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Read a recipe YAML and apply ``key.sub=value`` overrides (values parsed as YAML).

    Raises:
        ValueError: On an override without ``=``.
    """
    import yaml

    cfg = yaml.safe_load(Path(path).read_text()) or {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"override {item!r} is not key=value")
        *parents, leaf = key.strip().split(".")
        node = cfg
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = yaml.safe_load(value)
    return cfg
