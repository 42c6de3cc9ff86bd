"""``MCTPTrainer``: transformers' ``Trainer`` with the MCTP loss, per-head logs and safe saves.

Why ``Trainer`` (and not a loop of our own on accelerate): the official VITA-Audio trainer is
a transformers ``Trainer``, so its loss normalisation (``num_items_in_batch``: the labelled
tokens of the whole accumulated batch over all data-parallel ranks), LR schedules, resume
logic and checkpoint layout are reproduced by construction; and ``Trainer`` runs unchanged
under ``torchrun``/``accelerate launch`` with DDP, FSDP and DeepSpeed ZeRO (all through
accelerate), reports to TensorBoard/W&B and only lets the main process write. This class adds
only what MCTP needs:

* :meth:`compute_loss`: the stage loss of :func:`mctp.total_loss` and :func:`mctp.mctp_loss`
  (``main + w * mean_k``, every summed cross-entropy over ``num_items_in_batch``) from
  :class:`~mctp.training.MCTPTrainingModel`; per-head sums are accumulated and logged as
  ``loss_main``, ``loss_head_<k>`` (token means over all ranks) with ``tokens_per_second``.
* a non-finite guard: before every optimizer step all ranks agree whether a micro-batch loss or
  the gradients were NaN/inf; then the run stops with :class:`NonFiniteLossError`
  (``on_nonfinite="stop"``) or the update is skipped (``"skip"``: gradients dropped).
* :meth:`evaluate`: held-out loss per head and each head's greedy agreement with the backbone
  (how often head ``k``'s argmax equals the backbone's argmax for the same next token).
* atomic checkpoints: ``Trainer`` writes ``checkpoint-N`` into ``output_dir/.staging`` and the
  main process renames it into place when complete (a kill mid-save leaves no
  ``checkpoint-N``); non-finite weights are never saved (:class:`NonFiniteWeightsError`).
* optimizer groups from a :class:`~mctp.training.StagePreset` (heads at ``lr x mctp_lr_mult``).

It extends ``Trainer`` through its public points (``compute_loss``, ``create_optimizer``,
``log``, ``evaluate``, ``save_model``, ``train``, callbacks, ``TrainingArguments``) and two
private methods no public point replaces, listed in :data:`PRIVATE_TRAINER_METHODS` and
checked at construction (:func:`check_transformers_api`): ``_save_checkpoint`` (the staged,
atomic checkpoint) and ``_save`` (one copy of tied weights, which safetensors requires).
"""

from __future__ import annotations

import copy
import math
import os
import shutil
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

try:
    from transformers import Trainer, TrainerCallback
except ImportError as e:  # pragma: no cover - transformers is a core dependency
    raise ImportError("mctp.training needs transformers: pip install 'mctp[train]'") from e

if TYPE_CHECKING:
    from .stages import StagePreset

__all__ = [
    "PRIVATE_TRAINER_METHODS",
    "STAGING_DIR",
    "MCTPTrainer",
    "NonFiniteLossError",
    "NonFiniteWeightsError",
    "check_transformers_api",
]

STAGING_DIR = ".staging"
"""Sub-folder of ``output_dir`` where checkpoints are written before being renamed into place."""

PRIVATE_TRAINER_METHODS: dict[str, tuple[str, ...]] = {
    "_save_checkpoint": ("self", "model", "trial"),
    "_save": ("self", "output_dir", "state_dict"),
}
"""The private ``transformers.Trainer`` methods :class:`MCTPTrainer` overrides, with the
parameters it relies on (no public extension point replaces them; docs/training.md lists the
transformers versions they are tested with):

* ``_save_checkpoint(model, trial)`` writes ``checkpoint-N`` (weights, optimizer, scheduler,
  RNG, trainer state) in one go; the override stages it in ``output_dir/.staging`` and renames
  it into place when complete, so a kill mid-save never leaves a torn ``checkpoint-N``
  (``on_save`` callbacks run only after the folder was written in place);
* ``_save(output_dir, state_dict)`` is where every engine (plain, FSDP, DeepSpeed) hands the
  weights to safetensors, which refuses tensors sharing memory: the override keeps one name of
  each tied weight."""


def check_transformers_api() -> None:
    """Check that ``transformers.Trainer`` still has the private methods MCTPTrainer extends.

    Raises:
        RuntimeError: Naming the method, when the installed transformers release removed it or
            changed its parameters.
    """
    import inspect

    import transformers

    for name, params in PRIVATE_TRAINER_METHODS.items():
        method = getattr(Trainer, name, None)
        if method is None:
            raise RuntimeError(
                f"transformers {transformers.__version__} has no Trainer.{name}, which "
                "MCTPTrainer overrides (see docs/training.md for the tested versions)"
            )
        have = tuple(inspect.signature(method).parameters)
        if have != params:
            raise RuntimeError(
                f"transformers {transformers.__version__} changed Trainer.{name}{have}; "
                f"MCTPTrainer overrides Trainer.{name}{params} (see docs/training.md)"
            )


class NonFiniteLossError(RuntimeError):
    """A training loss or gradient was NaN or infinite (``on_nonfinite="stop"``)."""


class NonFiniteWeightsError(RuntimeError):
    """A save was refused because some weights are NaN or infinite."""


class _Guard(TrainerCallback):
    """Agrees over all ranks on non-finite losses/gradients before each optimizer step."""

    def __init__(self, trainer: MCTPTrainer) -> None:
        self.trainer = trainer

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        t = self.trainer
        model = t.model
        local = float(t._bad_losses)
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        if grads and not bool(torch.isfinite(torch.stack([g.float().norm() for g in grads]).sum())):
            local += 1.0
        flag = torch.tensor([local], device=args.device)
        if args.world_size > 1:
            flag = t.accelerator.reduce(flag, reduction="sum")
        t._bad_losses = 0
        if float(flag.item()) == 0.0:
            return
        step = state.global_step + 1
        losses = ", ".join(f"{x:.4g}" for x in t._step_losses) or "n/a"
        if t.on_nonfinite == "stop":
            raise NonFiniteLossError(
                f"non-finite loss or gradient at optimizer step {step} (micro-batch losses on this "
                f"rank: {losses}); stopping. Nothing of this step was applied or saved. Lower the "
                "learning rate, check the data, or pass on_nonfinite='skip' to skip such steps."
            )
        for p in model.parameters():
            p.grad = None  # AdamW leaves parameters without gradients untouched
        t.skipped_steps += 1
        if args.should_log:
            print(f"[mctp] step {step}: non-finite loss or gradient ({losses}); update skipped")

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.trainer._step_losses = []


class MCTPTrainer(Trainer):
    """transformers ``Trainer`` for :class:`~mctp.training.MCTPTrainingModel`.

    Args:
        *args: As ``transformers.Trainer`` (model, args, data_collator, train_dataset, ...).
        stage: Optimizer groups come from ``stage.param_groups(model)`` (heads at
            ``lr x mctp_lr_mult``); None: the default transformers groups.
        on_nonfinite: ``"stop"`` (raise :class:`NonFiniteLossError`) or ``"skip"`` the update.
        shuffle: Shuffle the training set with ``args.seed`` (transformers' default sampler);
            False (default) keeps the dataset's own order (it is already mixed with a seed),
            which makes N ranks see exactly the batches one process would: the trainer uses a
            copy of ``args`` with the public ``train_sampling_strategy="sequential"`` (when
            ``args`` asks for transformers' default ``"random"`` and the dataset has a length).
        **kwargs: As ``transformers.Trainer``.

    Raises:
        ValueError: On an unknown ``on_nonfinite``, or ``"skip"`` under DeepSpeed (which owns
            the optimizer step).
        RuntimeError: If the installed transformers lacks a private method it extends
            (:func:`check_transformers_api`), or divides gradients twice under gradient
            accumulation (before 5.5.4).
    """

    def __init__(
        self,
        *args: Any,
        stage: StagePreset | None = None,
        on_nonfinite: str = "stop",
        shuffle: bool = False,
        **kwargs: Any,
    ) -> None:
        if on_nonfinite not in ("stop", "skip"):
            raise ValueError(f"on_nonfinite must be 'stop' or 'skip', got {on_nonfinite!r}")
        check_transformers_api()
        super().__init__(*args, **kwargs)
        if self.accelerator.gradient_accumulation_steps != 1:
            import transformers

            raise RuntimeError(
                f"transformers {transformers.__version__} hands gradient accumulation to "
                "accelerate, which divides every gradient by the accumulation steps on top of "
                "the num_items_in_batch normalisation (wrong updates; fixed in transformers "
                "5.5.4): upgrade transformers"
            )
        sized = hasattr(self.train_dataset, "__len__")
        if not shuffle and sized and self.args.train_sampling_strategy == "random":
            self.args = copy.copy(self.args)  # the caller's arguments stay as they were
            self.args.train_sampling_strategy = "sequential"
        if on_nonfinite == "skip" and self.is_deepspeed_enabled:
            raise ValueError("on_nonfinite='skip' is not available under DeepSpeed; use 'stop'")
        self.stage = stage
        self.on_nonfinite = on_nonfinite
        self.shuffle = shuffle
        self.skipped_steps = 0
        self._bad_losses = 0
        self._step_losses: list[float] = []
        self._acc: dict[str, torch.Tensor] = {}
        self._acc_time = time.perf_counter()
        self.add_callback(_Guard(self))

    # ------------------------------------------------------------------ optimizer, data
    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        """AdamW over the stage's parameter groups (transformers' default without a stage)."""
        if self.stage is None or self.optimizer is not None:
            return super().create_optimizer(model)
        groups = self.stage.param_groups(self.model)
        if not groups:
            raise ValueError(f"stage {self.stage.name!r}: no parameter requires a gradient")
        a = self.args
        self.optimizer = torch.optim.AdamW(
            groups, lr=self.stage.lr, betas=(a.adam_beta1, a.adam_beta2), eps=a.adam_epsilon
        )
        return self.optimizer

    # ------------------------------------------------------------------ loss and logs
    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, Any]:
        """The stage loss normalised by ``num_items_in_batch`` (scaled for rank averaging)."""
        outputs = model(**inputs, num_items_in_batch=num_items_in_batch)
        loss = outputs["loss"]
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * self.accelerator.num_processes
        if model.training:
            self._accumulate(outputs, inputs)
            value = float(loss.detach())
            self._step_losses.append(value)
            if not math.isfinite(value):
                self._bad_losses += 1
        return (loss, outputs) if return_outputs else loss

    def _accumulate(self, outputs: dict[str, Any], inputs: dict[str, Any]) -> None:
        stats = {
            "main_sum": outputs["main_sum"].float().reshape(1),
            "main_count": outputs["main_count"].float().reshape(1),
            "head_sums": outputs["head_sums"].float().reshape(-1),
            "head_counts": outputs["head_counts"].float().reshape(-1),
            "tokens": torch.tensor([float(inputs["input_ids"].numel())]),
        }
        for k, v in stats.items():
            v = v.detach().to(self.args.device)
            self._acc[k] = v if k not in self._acc else self._acc[k] + v

    def _reduce(self, values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self.args.world_size <= 1:
            return values
        return {
            k: self.accelerator.reduce(v.contiguous(), reduction="sum") for k, v in values.items()
        }

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add ``loss_main``, ``loss_head_<k>``, ``tokens_per_second`` to training logs."""
        if "loss" in logs and self._acc:
            acc = self._reduce(self._acc)
            now = time.perf_counter()
            main_count = float(acc["main_count"].sum())
            if self.model.train_backbone and main_count:
                logs["loss_main"] = float(acc["main_sum"].sum()) / main_count
            for k, (s, c) in enumerate(zip(acc["head_sums"].tolist(), acc["head_counts"].tolist())):
                logs[f"loss_head_{k}"] = s / max(c, 1.0)
            logs["tokens_per_second"] = float(acc["tokens"].sum()) / max(now - self._acc_time, 1e-9)
            if self.skipped_steps:
                logs["skipped_steps"] = float(self.skipped_steps)
            self._acc, self._acc_time = {}, now
        super().log(logs, start_time)

    # ------------------------------------------------------------------ evaluation
    def evaluate(
        self,
        eval_dataset: Any = None,
        ignore_keys: Sequence[str] | None = None,
        metric_key_prefix: str = "eval",
    ) -> dict[str, float]:
        """Held-out loss (main and per head) and each head's greedy agreement with the backbone.

        Returns:
            ``{prefix}_loss`` (the stage loss of :func:`mctp.total_loss` with the whole set as
            one batch: every summed cross-entropy over the set's labelled-token count),
            ``{prefix}_loss_main``, ``{prefix}_loss_head_<k>`` and
            ``{prefix}_agreement_head_<k>`` (fraction of head ``k``'s scored positions where its
            argmax equals the backbone's argmax for the same next token).
        """
        loader = self.get_eval_dataloader(eval_dataset)
        model = self.model_wrapped if self.model_wrapped is not None else self.model
        inner = self.model
        was_training = inner.training
        inner.eval()
        acc: dict[str, torch.Tensor] = {}
        n = inner.num_heads
        with torch.no_grad():
            for batch in loader:
                batch = {
                    k: v.to(self.args.device) if isinstance(v, torch.Tensor) else v
                    for k, v in batch.items()
                }
                out = model(**batch, return_logits=n > 0)
                stats = {
                    "main_sum": out["main_sum"].float().reshape(1),
                    "main_count": out["main_count"].float().reshape(1),
                    "head_sums": out["head_sums"].float().reshape(-1),
                    "head_counts": out["head_counts"].float().reshape(-1),
                }
                if n:
                    targets = out["head_targets"]  # [N, B, T]
                    scored = targets != -100
                    backbone = out["logits"].argmax(-1)  # [B, T]
                    heads = inner.stack.to_global_ids(out["head_logits"].argmax(-1))  # [N, B, T]
                    same = (heads == backbone.unsqueeze(0)) & scored
                    stats["agree"] = same.flatten(1).sum(1).float()
                for k, v in stats.items():
                    acc[k] = v if k not in acc else acc[k] + v
        inner.train(was_training)
        if not acc:
            raise ValueError("the evaluation set is empty")
        acc = self._reduce({k: v.to(self.args.device) for k, v in acc.items()})
        from mctp.losses import MCTPLoss, total_loss

        count = acc["main_count"].sum()
        main = acc["main_sum"].sum() / count.clamp_min(1)
        p = metric_key_prefix
        metrics: dict[str, float] = {f"{p}_loss_main": float(main)}
        mtp = None
        if n:  # the whole set as one batch: every sum over its labelled-token count
            mtp = MCTPLoss.from_sums(
                acc["head_sums"], acc["head_counts"], count, weight=inner.mtp_loss_weight
            )
            for k in range(n):
                metrics[f"{p}_loss_head_{k}"] = float(mtp.per_head[k])
                metrics[f"{p}_agreement_head_{k}"] = float(
                    acc["agree"][k] / acc["head_counts"][k].clamp_min(1)
                )
        metrics[f"{p}_loss"] = float(
            total_loss(main, mtp, backbone_frozen=not inner.train_backbone)
        )
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(
            self.args, self.state, self.control, metrics
        )
        return metrics

    # ------------------------------------------------------------------ saving
    def _check_finite(self) -> None:
        bad = [n for n, p in self.model.named_parameters() if not bool(torch.isfinite(p).all())]
        flag = torch.tensor([float(len(bad))], device=self.args.device)
        if self.args.world_size > 1:
            flag = self.accelerator.reduce(flag, reduction="sum")
        if float(flag.item()):
            raise NonFiniteWeightsError(
                f"refusing to save: {len(bad)} parameter tensors hold NaN/inf on this rank "
                f"(e.g. {bad[:3]}); the last saved checkpoint is intact"
            )

    def _save_checkpoint(self, model: nn.Module, trial: Any) -> None:
        """Write ``checkpoint-N`` into the staging folder, then rename it into place.

        A private ``Trainer`` method (see :data:`PRIVATE_TRAINER_METHODS`): transformers writes
        the folder under ``args.output_dir``, which points at the staging folder meanwhile.
        """
        self._check_finite()
        run_dir = self.args.output_dir
        name = f"checkpoint-{self.state.global_step}"
        staged = os.path.join(run_dir, STAGING_DIR, name)
        if self.args.should_save and os.path.isdir(staged):
            shutil.rmtree(staged)
        self.accelerator.wait_for_everyone()
        self.args.output_dir = os.path.join(run_dir, STAGING_DIR)
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self.args.output_dir = run_dir
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            publish(staged, os.path.join(run_dir, name))
            from transformers.trainer_utils import rotate_checkpoints

            rotate_checkpoints(
                output_dir=run_dir,
                save_total_limit=self.args.save_total_limit,
                best_model_checkpoint=self.state.best_model_checkpoint,
                use_mtime=False,
            )
        self.accelerator.wait_for_everyone()

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """``Trainer.save_model`` after checking that every weight is finite.

        Raises:
            NonFiniteWeightsError: If some weight is NaN or infinite.
        """
        self._check_finite()
        super().save_model(output_dir, _internal_call)

    def train(
        self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any
    ) -> Any:
        """``Trainer.train`` after checking that a resumed checkpoint fills every weight.

        Args:
            resume_from_checkpoint: As ``Trainer.train`` (a folder, True for the newest
                ``checkpoint-N`` of ``output_dir``, or None).
            *args: As ``Trainer.train``.
            **kwargs: As ``Trainer.train``.

        Raises:
            RuntimeError: If the checkpoint's weight names miss or add keys (tied/aliased
                names aside); checked on the safetensors files (FSDP and DeepSpeed
                checkpoints are checked by their engines).
        """
        folder = resume_from_checkpoint
        if folder is True:
            from transformers.trainer_utils import get_last_checkpoint

            folder = get_last_checkpoint(self.args.output_dir)  # None: transformers raises
        if isinstance(folder, str | os.PathLike):
            self._check_checkpoint_keys(str(folder))
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def _check_checkpoint_keys(self, folder: str) -> None:
        keys = _checkpoint_keys(folder)
        if keys is None:
            return
        state = self.model.state_dict()
        owners: dict[tuple[int, int], str] = {}
        for k, v in state.items():
            owners.setdefault(_storage_key(v), k)
        missing = [k for k in state if k not in keys and owners.get(_storage_key(state[k])) == k]
        unexpected = sorted(keys - set(state))
        if missing or unexpected:
            raise RuntimeError(
                f"the checkpoint {folder} does not match the model: missing {missing[:5]}, "
                f"unexpected {unexpected[:5]}"
            )

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """One name per tied weight, then ``Trainer._save`` (see :data:`PRIVATE_TRAINER_METHODS`)."""
        if state_dict is None and self.args.should_save:
            state_dict = self.model.state_dict()
        if state_dict is not None:  # tied weights appear twice; safetensors refuses shared memory
            seen: set[tuple[int, int]] = set()
            unique = {}
            for k, v in state_dict.items():
                key = _storage_key(v)
                if key in seen:
                    continue
                seen.add(key)
                unique[k] = v
            state_dict = unique
        super()._save(output_dir, state_dict)


def _checkpoint_keys(folder: str) -> set[str] | None:
    """Weight names of a checkpoint folder's safetensors files (None without any)."""
    import json

    from safetensors import safe_open

    single = os.path.join(folder, "model.safetensors")
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(single):
        with safe_open(single, framework="pt") as f:
            return set(f.keys())
    if os.path.isfile(index):
        with open(index) as f:
            return set(json.load(f)["weight_map"])
    return None


def _storage_key(t: torch.Tensor) -> tuple[int, int]:
    """Identifies tensors sharing memory (tied or doubly registered weights)."""
    if t.device.type == "meta":
        return (id(t), 0)
    return (t.untyped_storage().data_ptr(), t.storage_offset())


def publish(staged: str, final: str) -> None:
    """Atomically move a complete folder ``staged`` to ``final`` (replacing an older one).

    Raises:
        FileNotFoundError: If ``staged`` does not exist.
    """
    if not os.path.isdir(staged):
        raise FileNotFoundError(f"nothing staged at {staged}")
    for root, _, files in os.walk(staged):  # data on disk before the rename makes it visible
        for f in files:
            with open(os.path.join(root, f), "rb") as fh:
                os.fsync(fh.fileno())
    old = None
    if os.path.exists(final):
        old = final + ".old"
        if os.path.exists(old):
            shutil.rmtree(old)
        os.replace(final, old)
    os.replace(staged, final)
    dir_fd = os.open(os.path.dirname(final) or ".", os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    if old is not None:
        shutil.rmtree(old)
