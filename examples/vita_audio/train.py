"""VITA-Audio's four training stages on transformers' ``Trainer`` (``mctp.training``).

::

    python examples/vita_audio/train.py --config examples/vita_audio/recipes/stage1.yaml \\
        --override model.path=/models/Qwen2.5-7B-Instruct run.out_dir=out/stage1
    torchrun --nproc_per_node 8 examples/vita_audio/train.py --config ...   # DDP
    ... --override run.deepspeed=examples/vita_audio/recipes/deepspeed/zero3.json
    ... --debug    # an error prints as one line; --debug shows its traceback

========  =====================================  ============  ==========================
stage     what trains                            lr            MCTP heads
========  =====================================  ============  ==========================
1         every LLM parameter (main loss)        6e-5          none
2         head 0 only (LLM frozen, detached)     1e-3          1 (copy of the last layer)
3         the heads (LLM frozen, detached)       1e-3          grown to 10 (copies)
4         everything (main + MCTP loss)          5e-5, x10     10
========  =====================================  ============  ==========================

The stage facts are :func:`mctp.training.vita_audio_stage` presets; the recipe loads the
starting model (:func:`vita_audio.checkpoint.load_vita_audio`: an official VITA-Audio folder
or a plain transformers Qwen2 folder), adds the speech tokens when missing, builds the packed
data and hands everything to :class:`mctp.training.MCTPTrainer`. Checkpoints are the
Trainer's own (``run.out_dir/checkpoint-N``: weights, optimizer, scheduler, RNG, data
position), published atomically; ``run.resume: auto`` continues from the newest one. Every
stage ends with ``run.out_dir/final``: an official-format folder (``save_vita_audio``) that the
next stage, ``VitaAudio.from_pretrained`` and the official code load, plus ``final/adapter``
(PEFT format) when LoRA was used. A stage whose ``final`` exists is skipped on a rerun, so a
multi-stage run resumes where it stopped.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import shutil
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

if __package__ in (None, ""):  # run as a script: import ``vita_audio.*``, not ``data``/``model``
    _HERE = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
    sys.path.insert(0, str(_HERE.parent))

from mctp.backbones import HFBackbone, add_lora, extend_vocab
from mctp.codecs import load_codec
from mctp.interleave import InterleaveSchedule
from mctp.training import (
    STAGING_DIR,
    ErrorLog,
    MCTPTrainer,
    MCTPTrainingModel,
    PackedCollator,
    StagePreset,
    assert_finite,
    merged_lora,
    publish,
    save_lora_adapter,
    vita_audio_stage,
)
from vita_audio.checkpoint import EXTRA_PREFIXES, load_vita_audio, save_vita_audio
from vita_audio.config import TrainConfig, load_config, merge_config
from vita_audio.data import AudioCodes, AudioFeatures, ChatRenderer, VitaAudioData
from vita_audio.guards import DiskFullError, checkpoint_problem, disk_guard, one_line
from vita_audio.mixture import DataMixture
from vita_audio.model import load_tokenizer
from vita_audio.tiny import make_tiny_assets

__all__ = [
    "FINAL_DIR",
    "DiskFullError",
    "StageRun",
    "build_stage",
    "check_paths",
    "checkpoint_problem",
    "disk_guard",
    "main",
    "plan_stages",
    "resume_point",
    "run_stage",
]

FINAL_DIR = "final"
"""Sub-folder of a stage's ``out_dir`` holding its official-format result."""


def _is_main() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


@contextlib.contextmanager
def main_first(cfg: TrainConfig) -> Iterator[None]:
    """Run the body on the main process first, then on the others (files it writes are shared)."""
    if _world_size() == 1:
        yield
        return
    from accelerate import PartialState

    with PartialState(cpu=cfg.run.device == "cpu").main_process_first():
        yield


# --------------------------------------------------------------------------- building
@dataclass
class StageRun:
    """Everything one stage needs (built by :func:`build_stage`)."""

    cfg: TrainConfig
    model: MCTPTrainingModel
    preset: StagePreset
    tokenizer: Any
    vocab: Any
    base_config: dict[str, Any] | None
    data: VitaAudioData
    codes: AudioCodes
    schedule: InterleaveSchedule | None
    trainer: MCTPTrainer


def stage_preset(cfg: TrainConfig, checkpoint_weight: float) -> StagePreset:
    """The official preset of ``cfg.stage`` with the recipe's numbers.

    The MCTP loss weight is the recipe's ``model.mtp_loss_weight`` when set, else the starting
    checkpoint's ``mtp_loss_weight`` (as the official trainer).
    """
    o, m = cfg.optim, cfg.model
    changes: dict[str, Any] = dict(
        num_heads=m.num_heads,
        lr=o.lr,
        mctp_lr_mult=o.mctp_lr_mult,
        weight_decay=o.weight_decay,
        max_steps=o.max_steps,
        mtp_loss_weight=checkpoint_weight if m.mtp_loss_weight is None else m.mtp_loss_weight,
    )
    if m.audio_encoder_mode is not None:
        changes["audio_encoder"] = m.audio_encoder_mode
    if m.audio_projector_mode is not None:
        changes["audio_projector"] = m.audio_projector_mode
    return vita_audio_stage(cfg.stage, plus=m.audio_encoder is not None, **changes)


def build_model(
    cfg: TrainConfig, codec: Any
) -> tuple[MCTPTrainingModel, StagePreset, Any, Any, Any]:
    """Load the starting model, add speech tokens, apply the stage (heads, what trains, LoRA).

    Returns:
        ``(model, preset, tokenizer, vocab, base_config)``.

    Raises:
        ValueError: If the vocabulary must grow under existing heads, or the codec's codebook
            exceeds the vocabulary's audio tokens.
    """
    m = cfg.model
    ckpt = load_vita_audio(
        m.path, device="cpu", dtype=torch.float32, attn_implementation=m.attn_implementation
    )
    base_config = ckpt.config if ckpt.config.get("model_type") != "qwen2" else None
    tok = load_tokenizer(m.tokenizer or m.path)
    backbone, stack = ckpt.backbone, ckpt.stack
    rows = backbone.vocab_size
    plus = m.audio_encoder is not None
    vocab = extend_vocab(tok, backbone.model, num_audio_tokens=codec.codebook_size, plus=plus)
    if vocab.vocab_size != rows:  # resized: re-wrap so the backbone sees the new lm_head
        if stack is not None:
            raise ValueError("the vocabulary must grow but the checkpoint already has heads")
        backbone = HFBackbone(backbone.model)
    if codec.codebook_size > vocab.num_audio:
        raise ValueError(f"codec codebook {codec.codebook_size} > {vocab.num_audio} audio tokens")
    audio: dict[str, Any] = {}
    if plus:
        audio = plus_parts(m.audio_encoder, ckpt.extra, backbone.hidden_size)
        audio.pop("encoder")
        audio.update(audio_placeholder_id=vocab.audio_context)
    model = MCTPTrainingModel(backbone=backbone, stack=stack, **audio)
    preset = stage_preset(cfg, ckpt.mtp_loss_weight)
    preset.apply(model)
    if m.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    if m.lora:
        add_lora(backbone.model, **m.lora)  # after the heads were copied
        if cfg.stage == 1:  # the new speech-token rows must learn: embeddings train fully
            backbone.model.get_input_embeddings().requires_grad_(True)
            backbone.model.get_output_embeddings().requires_grad_(True)
    return model, preset, tok, vocab, base_config


def plus_parts(folder: str, extra: Mapping[str, torch.Tensor], hidden_size: int) -> dict[str, Any]:
    """VITA-Audio-Plus: SenseVoice query table + encoder and the MLP projector.

    The encoder comes from the SenseVoiceSmall ``folder``; both are overwritten by the starting
    checkpoint's ``model.audio_model.*`` / ``model.audio_projection.*`` tensors when it has them
    (an official Plus folder), else the projector starts fresh.

    Returns:
        ``MCTPTrainingModel`` keyword arguments (``audio_model``, ``audio_projection``,
        ``audio_queries``).

    Raises:
        CheckpointError: If the checkpoint's audio tensors do not fit the modules.
    """
    from mctp.checkpoint import load_strict
    from mctp.codecs import MLPProjector
    from mctp.codecs.sensevoice import SenseVoiceEncoder
    from mctp.codecs.sensevoice.encoder import query_ids

    encoder = SenseVoiceEncoder.from_pretrained(folder)
    audio_model = encoder.model.train()
    projector = MLPProjector(encoder.output_dim, hidden_size)
    for prefix, module in (("model.audio_model.", audio_model), (EXTRA_PREFIXES[1], projector)):
        state = {k[len(prefix) :]: v for k, v in extra.items() if k.startswith(prefix)}
        if state:
            load_strict(module, state, ignore=("ctc.*",), what=f"{prefix}* of the checkpoint")
    return {
        "audio_model": audio_model,
        "audio_projection": projector,
        "audio_queries": query_ids(encoder.language, encoder.text_norm),
        "encoder": encoder,
    }


def training_arguments(cfg: TrainConfig) -> Any:
    """transformers ``TrainingArguments`` of the stage (engine, schedule, saving, logging).

    Raises:
        ValueError: If ``optim.global_batch`` is not a multiple of ``per_device_batch x ranks``.
    """
    from transformers import TrainingArguments

    o, r = cfg.optim, cfg.run
    per_step = o.per_device_batch * _world_size()
    if o.global_batch % per_step:
        raise ValueError(
            f"optim.global_batch ({o.global_batch}) must be a multiple of per_device_batch x "
            f"processes ({o.per_device_batch} x {_world_size()})"
        )
    report = r.report_to
    if report is None:
        report = ["tensorboard"] + (["wandb"] if importlib.util.find_spec("wandb") else [])
    cuda = torch.cuda.is_available() and r.device != "cpu"
    return TrainingArguments(
        output_dir=r.out_dir,
        max_steps=o.max_steps,
        per_device_train_batch_size=o.per_device_batch,
        per_device_eval_batch_size=o.per_device_batch,
        gradient_accumulation_steps=o.global_batch // per_step,
        learning_rate=o.lr,
        weight_decay=o.weight_decay,
        adam_beta1=o.betas[0],
        adam_beta2=o.betas[1],
        adam_epsilon=o.eps,
        max_grad_norm=o.clip,
        lr_scheduler_type="cosine",
        warmup_steps=o.warmup_ratio,
        save_strategy="steps",
        save_steps=r.save_every or o.max_steps,
        save_total_limit=r.save_total_limit or None,
        eval_strategy="steps" if r.eval_every else "no",
        eval_steps=r.eval_every or None,
        logging_steps=r.logging_steps,
        report_to=report,
        disable_tqdm=not r.progress,
        seed=r.seed,
        use_cpu=r.device == "cpu",
        bf16=cuda if r.bf16 is None else r.bf16,
        dataloader_num_workers=r.num_workers,
        deepspeed=r.deepspeed,
        fsdp=r.fsdp,
        fsdp_config=r.fsdp_config if r.fsdp else None,
        remove_unused_columns=False,
        ddp_find_unused_parameters=False,
    )


def build_stage(cfg: TrainConfig, callbacks: Sequence[Any] = ()) -> StageRun:
    """Model, data and ``MCTPTrainer`` of one stage (nothing is trained yet).

    Raises:
        ValueError, FileNotFoundError, DataError: As the model, data and Trainer builders.
    """
    torch.manual_seed(cfg.run.seed)
    d = cfg.data
    codec = load_codec(d.codec, **d.codec_kwargs)
    model, preset, tok, vocab, base_config = build_model(cfg, codec)
    args = training_arguments(cfg)  # before the data: sets up the process group
    cache = AudioCodes.load(d.code_cache) if d.code_cache else {}
    codes = AudioCodes(codec, root=d.audio_root, cache=cache)
    schedule = InterleaveSchedule.from_ratio(d.interleave) if d.interleave else None
    features = None
    if cfg.model.audio_encoder is not None:
        from mctp.codecs.sensevoice import SenseVoiceEncoder

        features = AudioFeatures(
            SenseVoiceEncoder.from_pretrained(cfg.model.audio_encoder), root=d.audio_root
        )
    renderer = ChatRenderer(tok, vocab, codes, schedule, features=features)
    with main_first(cfg):
        mixture = DataMixture.from_config(
            d.mixture,
            seed=cfg.run.seed,
            ratios=d.ratios,
            errors=ErrorLog(d.on_error),
            streaming=d.streaming,
        )
    pad_id = tok.pad_token_id
    data = VitaAudioData(
        mixture,
        renderer,
        max_len=d.max_len,
        pad=d.pad,
        pad_id=0 if pad_id is None else pad_id,
        on_too_long=d.on_too_long,
        progress=cfg.run.progress and _is_main(),
    )
    if d.prefetch:
        codes.prefetch(mixture.audio_paths(), progress=cfg.run.progress and _is_main())
    eval_ds = None
    if d.streaming:
        train_ds: Any = data.stream()
    else:
        packs = data.dataset()
        g = cfg.optim.global_batch
        held = packs.packs[len(packs.packs) - d.eval_packs :] if d.eval_packs else []
        usable = (len(packs.packs) - len(held)) // g * g  # whole optimizer steps only
        if usable == 0:
            raise ValueError(
                f"{len(packs.packs)} packs ({d.eval_packs} held out) do not fill one optimizer "
                f"step of optim.global_batch={g}"
            )
        if held:
            eval_ds = type(packs)(held, packs.render, max_len=packs.max_len, pad_id=packs.pad_id)
        packs.packs = packs.packs[:usable]
        train_ds = packs
    trainer = MCTPTrainer(
        model=model,
        args=args,
        stage=preset,
        on_nonfinite=cfg.run.on_nonfinite,
        data_collator=PackedCollator(pad_id=data.pad_id, flatten=False),
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        callbacks=list(callbacks),
    )
    return StageRun(cfg, model, preset, tok, vocab, base_config, data, codes, schedule, trainer)


# --------------------------------------------------------------------------- running
def _inference_mode(run: StageRun) -> list[int] | None:
    """The training ratio when the heads can run it, else the official default ``[1, N]``."""
    n = run.model.num_heads
    if n == 0:
        return None
    s = run.schedule
    if s is not None and s.max_heads <= n:
        return list(s.ratio)
    return [1, n]


def export_stage(run: StageRun, folder: Path) -> Path:
    """Write the stage result (official format, tokenizer, LoRA adapter) atomically to ``folder``.

    Raises:
        NonFiniteWeightsError: If a weight is NaN or infinite (nothing is written).
    """
    t = run.trainer
    staged = folder.parent / STAGING_DIR / folder.name
    model = run.model
    if t.is_fsdp_enabled or t.is_deepspeed_enabled:  # sharded weights: gather (all ranks)
        state = t.accelerator.get_state_dict(t.model_wrapped)
        if t.is_world_process_zero():
            codec = load_codec(run.cfg.data.codec, **run.cfg.data.codec_kwargs)
            model = build_model(run.cfg, codec)[0]
            model.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
    if t.is_world_process_zero():
        assert_finite(model, f"stage {run.cfg.stage}'s final model")
        if staged.exists():
            shutil.rmtree(staged)
        dtype = getattr(torch, run.cfg.run.save_dtype) if run.cfg.run.save_dtype else None
        lora = run.cfg.model.lora
        with merged_lora(model.backbone.model) if lora else contextlib.nullcontext():
            extra = {}
            if model.is_plus:
                for prefix, part in (
                    (EXTRA_PREFIXES[0], model.audio_model),
                    (EXTRA_PREFIXES[1], model.audio_projection),
                ):
                    extra.update({prefix + k: v for k, v in part.state_dict().items()})
            save_vita_audio(
                model.backbone,
                model.stack,
                staged,
                extra=extra,
                mtp_loss_weight=model.mtp_loss_weight,
                dtype=dtype,
                base_config=run.base_config,
                tokenizer=run.tokenizer,
                mtp_inference_mode=_inference_mode(run),
            )
        if lora:
            save_lora_adapter(
                model.backbone.model, staged / "adapter", base_model_name_or_path=run.cfg.model.path
            )
        (staged / "mctp_stage.json").write_text(
            json.dumps(
                {"stage": run.cfg.stage, "steps": t.state.global_step, "config": run.cfg.to_dict()},
                indent=2,
            )
            + "\n"
        )
        publish(str(staged), str(folder))
        if run.cfg.data.code_cache:
            run.codes.save(run.cfg.data.code_cache)
    t.accelerator.wait_for_everyone()
    return folder


def resume_point(cfg: TrainConfig) -> str | None:
    """The checkpoint the stage continues from (``run.resume``), checked before training.

    ``auto`` takes the newest ``checkpoint-N`` of ``run.out_dir`` that can be read, printing
    each newer one it skips and why (a truncated or corrupt file); a named folder must load.

    Raises:
        FileNotFoundError: If ``run.resume`` names a missing folder.
        ValueError: If the named folder cannot be read (the file and the reader's error).
    """
    resume, out = cfg.run.resume, Path(cfg.run.out_dir)
    if resume is None:
        return None
    if resume != "auto":
        if not Path(resume).is_dir():
            raise FileNotFoundError(f"run.resume names a missing checkpoint folder: {resume}")
        problem = checkpoint_problem(resume)
        if problem:
            raise ValueError(f"run.resume={resume} cannot be resumed from: {problem}")
        return resume
    found = [p for p in out.glob("checkpoint-*") if p.is_dir() and p.name[11:].isdigit()]
    for folder in sorted(found, key=lambda p: int(p.name[11:]), reverse=True):
        problem = checkpoint_problem(folder)
        if problem is None:
            return str(folder)
        if _is_main():
            print(f"stage {cfg.stage}: skipping checkpoint {folder}: {problem}", file=sys.stderr)
    return None


def _describe_launch(run: StageRun) -> str:
    """Processes, batch split and device the Trainer derived (printed at start).

    Raises:
        RuntimeError: If the Trainer's world size differs from the launcher's ``WORLD_SIZE``.
    """
    a = run.trainer.args
    if a.world_size != _world_size():
        raise RuntimeError(
            f"the launcher set WORLD_SIZE={_world_size()} but the Trainer runs {a.world_size} "
            "processes"
        )
    return (
        f"stage {run.cfg.stage}: {a.world_size} process{'es' if a.world_size > 1 else ''} on "
        f"{a.device.type}, global batch {run.cfg.optim.global_batch} = per_device_batch "
        f"{a.per_device_train_batch_size} x {a.world_size} processes x gradient accumulation "
        f"{a.gradient_accumulation_steps}"
    )


def run_stage(cfg: TrainConfig, callbacks: Sequence[Any] = ()) -> Path:
    """Train one stage (resuming from its newest readable checkpoint) and export ``final``.

    A stage whose ``final`` folder exists is not run again. At start rank 0 prints the config,
    the number of processes and the gradient accumulation derived from it.

    Returns:
        The stage's ``final`` folder.

    Raises:
        NonFiniteLossError: On a NaN/inf loss with ``run.on_nonfinite: stop``.
        FileNotFoundError: If ``run.resume`` names a missing folder.
        ValueError: If ``run.resume`` names a folder that cannot be read.
        DiskFullError: If the disk fills up during a checkpoint or the export.
    """
    out = Path(cfg.run.out_dir)
    final = out / FINAL_DIR
    if (final / "config.json").is_file():
        if _is_main():
            print(f"stage {cfg.stage}: already complete -> {final}")
        return final
    resume = resume_point(cfg)
    with disk_guard(out):
        if _is_main():
            print(f"stage {cfg.stage} config:\n{json.dumps(cfg.to_dict(), indent=2, default=str)}")
            out.mkdir(parents=True, exist_ok=True)
            (out / "config.json").write_text(
                json.dumps(cfg.to_dict(), indent=2, default=str) + "\n"
            )
        run = build_stage(cfg, callbacks)
        launch = _describe_launch(run)
        if _is_main():
            m = run.model
            counts = {
                name: sum(p.numel() for p in part.parameters() if p.requires_grad)
                for name, part in (("backbone", m.backbone), ("heads", m.stack))
                if part is not None
            }
            ds = run.trainer.train_dataset
            print(
                f"{launch}\nstage {cfg.stage}: {run.preset}\n  trainable parameters {counts}, "
                f"mtp_loss_weight {m.mtp_loss_weight}, "
                f"{len(ds) if hasattr(ds, '__len__') else 'streamed'} packs, "
                f"{run.data.errors.summary()}, resume from {resume}",
                flush=True,
            )
        run.trainer.train(resume_from_checkpoint=resume)
        folder = export_stage(run, final)
    if _is_main():
        last = next((h for h in reversed(run.trainer.state.log_history) if "loss" in h), {})
        print(f"stage {cfg.stage}: step {run.trainer.state.global_step} {last} -> {folder}")
    return folder


def plan_stages(cfg: Mapping[str, Any]) -> list[TrainConfig]:
    """Every stage's :class:`TrainConfig`, all checked before anything is written or trained.

    Each entry of the ``stages`` list is merged over the shared settings; with several stages
    each gets ``run.out_dir/stage<N>`` and starts from the previous stage's ``final`` folder.
    A ``tiny`` section stands in for ``model.path`` and ``data.mixture`` (written by
    :func:`main`).

    Raises:
        ValueError: Naming the stage and the key, for any setting of any stage that is unknown,
            of the wrong type or out of range (a typo in the last stage fails before the
            first stage trains), or for an unknown ``tiny`` setting.
    """
    cfg = dict(cfg)
    stages = cfg.pop("stages", None) or [{}]
    if not isinstance(stages, list) or not all(isinstance(x, Mapping) for x in stages):
        raise ValueError(f"'stages' must be a list of mappings (one per stage), got {stages!r}")
    tiny = cfg.pop("tiny", None)
    if tiny is not None:
        _check_tiny(tiny)
        cfg = merge_config(cfg, {"model": {"path": "-"}, "data": {"mixture": "-"}})
    configs: list[TrainConfig] = []
    previous: Path | None = None
    for i, overrides in enumerate(stages):
        raw = merge_config(cfg, overrides)
        if len(stages) > 1:
            run = raw.setdefault("run", {})
            if not isinstance(run, dict):
                raise ValueError(f"'run' must be a mapping of keys, got {run!r}")
            run["out_dir"] = str(
                Path(run.get("out_dir", "out/vita_audio")) / f"stage{raw.get('stage', i + 1)}"
            )
        if previous is not None:
            raw = merge_config(raw, {"model": {"path": str(previous), "tokenizer": None}})
        try:
            stage = TrainConfig.from_dict(raw)
        except ValueError as e:
            if len(stages) == 1:
                raise
            raise ValueError(f"stages[{i}] (stage {raw.get('stage', '?')}): {e}") from e
        configs.append(stage)
        previous = Path(stage.run.out_dir) / FINAL_DIR
    return configs


def check_paths(configs: Sequence[TrainConfig]) -> None:
    """Refuse files and folders that the stages name but that are not there, before any trains.

    Checked in every stage: ``data.mixture`` (when a path), ``data.audio_root``,
    ``model.audio_encoder``, ``run.deepspeed`` and ``run.fsdp_config`` (when a path); the first
    stage's ``model.path`` (later stages start from the previous ``final``).

    Raises:
        FileNotFoundError: Naming the stage, the key and the path.
    """
    for i, c in enumerate(configs):
        wanted: list[tuple[str, Any, str]] = [
            ("data.mixture", c.data.mixture, "file"),
            ("data.audio_root", c.data.audio_root, "dir"),
            ("model.audio_encoder", c.model.audio_encoder, "dir"),
            ("run.deepspeed", c.run.deepspeed, "file"),
            ("run.fsdp_config", c.run.fsdp_config, "file"),
        ]
        if i == 0:
            wanted.append(("model.path", c.model.path, "dir"))
        for key, value, kind in wanted:
            if not isinstance(value, str | os.PathLike):
                continue
            ok = Path(value).is_file() if kind == "file" else Path(value).is_dir()
            if not ok:
                raise FileNotFoundError(
                    f"stage {c.stage}: {key} names a missing {'file' if kind == 'file' else 'folder'}"
                    f": {value}"
                )


FSDP2_ACCELERATE = "1.6.0"
"""The first accelerate release whose FSDP plugin takes ``fsdp_version`` (FSDP2)."""


def check_fsdp(configs: Sequence[TrainConfig], accelerate_version: str | None = None) -> None:
    """Refuse ``run.fsdp`` with an accelerate too old for FSDP2, before anything trains.

    transformers hands ``fsdp_version`` to accelerate's plugin, which accelerate takes from
    1.6.0 on; older ones (our DDP floor is 1.3.0) failed deep inside the Trainer with a
    ``TypeError`` on every rank.

    Args:
        configs: The stages.
        accelerate_version: The installed version (None: read it).

    Raises:
        ValueError: Naming the stage, the installed version and the one needed.
    """
    stages = [c.stage for c in configs if c.run.fsdp]
    if not stages:
        return
    if accelerate_version is None:
        import accelerate

        accelerate_version = accelerate.__version__
    from packaging.version import Version

    if Version(accelerate_version) < Version(FSDP2_ACCELERATE):
        raise ValueError(
            f"stage {stages[0]}: run.fsdp (FSDP2) needs accelerate >= {FSDP2_ACCELERATE}, "
            f"installed {accelerate_version} (pip install 'accelerate>={FSDP2_ACCELERATE}')"
        )


def _check_tiny(tiny: Any) -> None:
    """Refuse ``tiny`` settings that ``make_tiny_assets`` would ignore or fail on late."""
    from transformers import Qwen2Config

    if not isinstance(tiny, Mapping):
        raise ValueError(f"'tiny' must be a mapping of settings, got {tiny!r}")
    known = {"seed", "records", *Qwen2Config().to_dict()}
    unknown = sorted(set(tiny) - known)
    if unknown:
        raise ValueError(f"unknown keys in 'tiny': {unknown} (seed, records or Qwen2Config fields)")


def main(cfg: Mapping[str, Any], callbacks: Sequence[Any] = ()) -> list[Path]:
    """Run one stage, or the ``stages`` list in order (each starts from the previous ``final``).

    Every stage's settings are checked first (:func:`plan_stages`, :func:`check_paths`), so a
    mistake in the last stage stops the run before the first trains. A ``tiny`` section then
    writes a random tiny Qwen2 and a synthetic dataset into ``run.out_dir/assets`` and points
    ``model.path`` and ``data.mixture`` at them.

    Args:
        cfg: The recipe (nested mappings, see :class:`~vita_audio.config.TrainConfig`).
        callbacks: Extra transformers ``TrainerCallback`` objects for every stage.

    Returns:
        The ``final`` folder of every stage.

    Raises:
        ValueError, FileNotFoundError: As :func:`plan_stages` and :func:`run_stage`.
        DiskFullError: If the disk fills up while a checkpoint or result is written.
    """
    configs = plan_stages(cfg)
    check_fsdp(configs)  # before the tiny assets are made
    tiny = cfg.get("tiny")
    if tiny is not None:
        out = Path(cfg.get("run", {}).get("out_dir", "out/vita_audio"))
        with main_first(configs[0]), disk_guard(out):
            if _is_main() or not (out / "assets" / "assets.json").is_file():
                assets = make_tiny_assets(out / "assets", **tiny)
                if _is_main():
                    (out / "assets" / "assets.json").write_text(json.dumps(assets))
            assets = json.loads((out / "assets" / "assets.json").read_text())
        rest = {k: v for k, v in cfg.items() if k != "tiny"}
        configs = plan_stages(
            merge_config(
                rest, {"model": {"path": assets["model"]}, "data": {"mixture": assets["mixture"]}}
            )
        )
    check_paths(configs)
    return [run_stage(c, callbacks) for c in configs]


def _cli(argv: Sequence[str] | None = None) -> int:
    """The command line: one line per error on stderr (the traceback with ``--debug``).

    Returns:
        The exit status: 0, 1 on an error, 130 when interrupted.
    """
    parser = argparse.ArgumentParser(description="VITA-Audio training recipe (stages 1-4)")
    parser.add_argument("--config", required=True, help="recipe YAML (recipes/stageN.yaml)")
    parser.add_argument("--override", nargs="*", default=[], metavar="KEY=VALUE")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    args = parser.parse_args(argv)
    try:
        main(load_config(args.config, args.override))
    except KeyboardInterrupt:
        if args.debug:
            raise
        print("train.py: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if args.debug:
            raise
        rank = f"[rank {os.environ['RANK']}] " if _world_size() > 1 else ""
        print(
            f"train.py: error: {rank}{one_line(e)} (--debug shows the traceback)", file=sys.stderr
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(_cli())
