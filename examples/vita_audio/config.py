"""Configuration of one training stage (``TrainConfig``) and the recipe YAML reader."""

from __future__ import annotations

import copy
import dataclasses
import logging
import types
import typing
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
    "check_device",
    "load_config",
    "merge_config",
]

logger = logging.getLogger(__name__)

FROZEN_STAGES = (2, 3)  # the LLM is frozen and its outputs detached
DEVICES = ("auto", "cpu", "cuda")


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
        """Build from nested mappings, checking every key and the type of every value.

        Raises:
            ValueError: On an unknown key, a value of the wrong type (the message names the key,
                e.g. ``optim.lr``), a stage outside 1..4 or settings that do not fit together
                (see :meth:`check`).
        """
        if not isinstance(raw, Mapping):
            raise ValueError(f"a stage config must be a mapping, got {type(raw).__name__}")
        unknown = set(raw) - {"stage", *SECTIONS}
        if unknown:
            raise ValueError(f"unknown config keys {sorted(unknown)}")
        parts = {}
        for name, kind in SECTIONS.items():
            values = raw.get(name) or {}
            if not isinstance(values, Mapping):
                raise ValueError(f"'{name}' must be a mapping of keys, got {values!r}")
            hints = typing.get_type_hints(kind)
            if set(values) - set(hints):
                raise ValueError(f"unknown keys in '{name}': {sorted(set(values) - set(hints))}")
            parts[name] = kind(**{k: _typed(f"{name}.{k}", hints[k], v) for k, v in values.items()})
        cfg = cls(stage=_typed("stage", int, raw.get("stage", 1)), **parts)
        cfg.check()
        return cfg

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (printed at start and written to ``out_dir/config.yaml``)."""
        return dataclasses.asdict(self)

    def check(self) -> None:
        """Validate every value and how they fit together (stage, heads, LoRA, batch, ranges,
        choices, dtype, interleave ratio, device).

        Raises:
            ValueError: Naming the key and the value that is wrong.
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
        positive = {
            "optim.max_steps": o.max_steps,
            "data.max_len": self.data.max_len,
            "run.logging_steps": self.run.logging_steps,
        }
        for key, value in positive.items():
            if value < 1:
                raise ValueError(f"{key} must be >= 1, got {value}")
        for key, value in {
            "optim.lr": o.lr,
            "optim.mctp_lr_mult": o.mctp_lr_mult,
            "optim.eps": o.eps,
            "optim.clip": o.clip,
        }.items():
            if not value > 0:
                raise ValueError(f"{key} must be > 0, got {value}")
        if o.weight_decay < 0:
            raise ValueError(f"optim.weight_decay must be >= 0, got {o.weight_decay}")
        nonneg = {
            "run.save_every": self.run.save_every,
            "run.save_total_limit": self.run.save_total_limit,
            "run.eval_every": self.run.eval_every,
            "run.num_workers": self.run.num_workers,
            "data.eval_packs": self.data.eval_packs,
        }
        for key, value in nonneg.items():
            if value < 0:
                raise ValueError(f"{key} must be >= 0, got {value}")
        choices = {
            "data.on_too_long": (self.data.on_too_long, ("skip", "raise")),
            "data.on_error": (self.data.on_error, ("raise", "skip")),
            "model.audio_encoder_mode": (self.model.audio_encoder_mode, (None, "frozen", "train")),
            "model.audio_projector_mode": (
                self.model.audio_projector_mode,
                (None, "frozen", "train"),
            ),
        }
        for key, (value, allowed) in choices.items():
            if value not in allowed:
                raise ValueError(f"{key} must be one of {list(allowed)}, got {value!r}")
        if self.run.save_dtype is not None:
            import torch

            if not isinstance(getattr(torch, self.run.save_dtype, None), torch.dtype):
                raise ValueError(
                    f"run.save_dtype must name a torch dtype (e.g. 'bfloat16'), "
                    f"got {self.run.save_dtype!r}"
                )
        if self.data.interleave is not None:
            from mctp.interleave import InterleaveSchedule

            try:
                schedule = InterleaveSchedule.from_ratio(self.data.interleave)
            except ValueError as e:
                raise ValueError(f"data.interleave {self.data.interleave}: {e}") from e
            if not schedule.uses_mctp:
                raise ValueError(
                    f"data.interleave {self.data.interleave} is Vanilla (no audio layout to "
                    "train); give a ratio such as [1, 10, 4, 10], or null for the written order"
                )
        check_device(self.run.device)
        if self.data.streaming and self.data.eval_packs:
            raise ValueError("data.eval_packs holds out planned packs: not with data.streaming")
        if self.run.eval_every and not self.data.eval_packs:
            raise ValueError("run.eval_every needs data.eval_packs > 0 (the held-out packs)")


def check_device(device: str) -> None:
    """Refuse a ``run.device`` that is unknown or not present on this machine.

    Raises:
        ValueError: For a name other than ``auto``, ``cpu`` or ``cuda``, or ``cuda`` on a machine
            where torch sees no CUDA device (training would silently run on the CPU).
    """
    if device not in DEVICES:
        raise ValueError(f"run.device must be one of {list(DEVICES)}, got {device!r}")
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise ValueError(
                "run.device is 'cuda' but torch sees no CUDA device on this machine "
                "(use run.device=cpu, or auto)"
            )


SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "data": DataConfig,
    "optim": OptimConfig,
    "run": RunConfig,
}
"""Top-level sections of a stage config and their dataclasses."""


def _kind(tp: Any) -> str:
    """A readable name of a type annotation (``int``, ``a number``, ``str or null``)."""
    if tp is Any:
        return "anything"
    if tp is float:
        return "a number"
    args = typing.get_args(tp)
    origin = typing.get_origin(tp)
    if origin in (types.UnionType, typing.Union):
        return " or ".join("null" if a is type(None) else _kind(a) for a in args)
    if origin is not None:
        return getattr(origin, "__name__", str(origin)) + (
            "[" + ", ".join(_kind(a) for a in args) + "]" if args else ""
        )
    return getattr(tp, "__name__", str(tp))


def _typed(key: str, tp: Any, value: Any) -> Any:
    """``value`` checked against the annotation ``tp`` (YAML 1.1 strings like ``1e-4`` read as
    numbers; a tuple from a list).

    Raises:
        ValueError: Naming ``key``, the expected type and the value.
    """

    def bad() -> ValueError:
        return ValueError(f"{key} must be {_kind(tp)}, got {value!r}")

    if tp is Any:
        return value
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (types.UnionType, typing.Union):
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _typed(key, a, value)
            except ValueError:
                continue
        raise bad()
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad()
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise bad()
    if tp is float:
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                raise bad() from None
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        raise bad()
    if tp is str:
        if isinstance(value, str):
            return value
        raise bad()
    if origin is dict:
        if not isinstance(value, Mapping):
            raise bad()
        return {str(k): _typed(f"{key}.{k}", args[1], v) for k, v in value.items()}
    if origin is list:
        if not isinstance(value, list | tuple):
            raise bad()
        return [_typed(f"{key}[{i}]", args[0], v) for i, v in enumerate(value)]
    if origin is tuple:
        if not isinstance(value, list | tuple) or len(value) != len(args):
            raise bad()
        return tuple(_typed(f"{key}[{i}]", a, v) for i, (a, v) in enumerate(zip(args, value)))
    raise TypeError(f"no check for {tp!r} ({key})")  # pragma: no cover - a new field type


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


def _check_override_key(item: str, parts: list[str]) -> None:
    """Refuse an override key that names no setting of a stage config.

    Raises:
        ValueError: Naming the override and the key that is wrong.
    """
    head = parts[0]
    if head in ("stage", "stages"):
        if len(parts) > 1 and head == "stage":
            raise ValueError(f"override {item!r}: 'stage' takes a value (stage=N), not sub-keys")
        return
    if head == "tiny":
        return  # checked against make_tiny_assets' arguments by train.py
    if head not in SECTIONS:
        raise ValueError(
            f"override {item!r}: unknown section {head!r}; known: "
            f"{['stage', 'stages', 'tiny', *SECTIONS]}"
        )
    if len(parts) == 1:
        raise ValueError(f"override {item!r}: '{head}' is a section; name a key ({head}.KEY=...)")
    hints = typing.get_type_hints(SECTIONS[head])
    if parts[1] not in hints:
        raise ValueError(
            f"override {item!r}: unknown key {head}.{parts[1]}; known: {sorted(hints)}"
        )
    tp = hints[parts[1]]
    nested = tp is Any or dict in (
        typing.get_origin(tp),
        *map(typing.get_origin, typing.get_args(tp)),
    )
    if len(parts) > 2 and not nested:
        raise ValueError(
            f"override {item!r}: {head}.{parts[1]} takes a value ({_kind(tp)}), not sub-keys"
        )


def _set(node: dict[str, Any], parts: list[str], value: Any, item: str) -> None:
    for i, p in enumerate(parts[:-1]):
        child = node.setdefault(p, {})
        if not isinstance(child, dict):
            where = ".".join(parts[: i + 1])
            raise ValueError(f"override {item!r}: {where} is {child!r}, not a section")
        node = child
    node[parts[-1]] = value


def _get(node: Any, parts: list[str]) -> tuple[bool, Any]:
    for p in parts:
        if not isinstance(node, dict) or p not in node:
            return False, None
        node = node[p]
    return True, node


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Read a recipe YAML and apply ``key.sub=value`` overrides (values parsed as YAML).

    An override is the last word: when the recipe's ``stages`` list sets the same key in some
    stages (e.g. ``optim.lr`` in every stage of ``tiny.yaml``), the override replaces it in those
    stages too, and a warning names them. ``stages.N.key=value`` (N from 0) changes one stage.

    Raises:
        ValueError: On an override without ``=``, a key that names no setting (unknown section or
            key, sub-keys under a plain value such as ``optim.max_steps.x=1``), a stage index out
            of range, or a recipe file that is not a YAML mapping.
        FileNotFoundError: If ``path`` does not exist.
    """
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no recipe file {path}")
    try:
        cfg = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ValueError(f"{path} is not valid YAML: {' '.join(str(e).split())}") from e
    if not isinstance(cfg, dict):
        raise ValueError(f"{path} must hold a mapping of settings, got {type(cfg).__name__}")
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"override {item!r} is not key=value")
        parts = key.strip().split(".")
        if any(not p for p in parts):
            raise ValueError(f"override {item!r}: empty part in key {key!r}")
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ValueError(f"override {item!r}: the value is not YAML ({e})") from e
        stages = cfg.get("stages")
        if parts[0] == "stages" and len(parts) > 1:
            if not isinstance(stages, list) or not parts[1].isdigit():
                raise ValueError(
                    f"override {item!r}: stages.N.key needs a 'stages' list and an index N"
                )
            n = int(parts[1])
            if n >= len(stages):
                raise ValueError(
                    f"override {item!r}: the recipe has {len(stages)} stages (N from 0)"
                )
            if len(parts) > 2:
                _check_override_key(item, parts[2:])
                _set(stages[n], parts[2:], value, item)
            else:
                stages[n] = value
            continue
        _check_override_key(item, parts)
        _set(cfg, parts, value, item)
        if parts[0] != "stages" and isinstance(stages, list):
            shadowed = [
                i
                for i, st in enumerate(stages)
                if _get(st, parts)[0] and _get(st, parts)[1] != value
            ]
            for i in shadowed:
                _set(stages[i], parts, copy.deepcopy(value), item)
            if shadowed:
                logger.warning(
                    "override %s also replaces the value that stages %s of %s set",
                    item,
                    [stages[i].get("stage", i + 1) for i in shadowed],
                    path.name,
                )
    return cfg
