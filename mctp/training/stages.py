"""Training stages as data: what trains, what is frozen or detached, heads, lr, loss weight.

A :class:`StagePreset` is a frozen, validated description of one stage; :func:`vita_audio_stage`
returns the four VITA-Audio stages (facts of the official scripts):

=====  ============================================  =====  ======  =========  ========
stage  trains                                        heads  lr      MCTP lr x  steps
=====  ============================================  =====  ======  =========  ========
1      every LLM parameter (main loss)               0      6e-5    -          8000
2      head 0 only; LLM frozen, detached, no main    1      1e-3    1          4000
3      the heads (grown from head 0); LLM frozen     10     1e-3    1          8000
4      everything (main + MCTP loss)                 10     5e-5    10         4000
=====  ============================================  =====  ======  =========  ========

:meth:`StagePreset.apply` puts a :class:`~mctp.training.MCTPTrainingModel` into the stage
(grows or creates heads, sets ``requires_grad``) and :meth:`StagePreset.param_groups` builds
the optimizer groups (heads at ``lr * mctp_lr_mult``, no weight decay on biases and norms).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from torch import nn

if TYPE_CHECKING:
    from .model import MCTPTrainingModel

__all__ = ["AUDIO_MODES", "StagePreset", "vita_audio_stage"]

AUDIO_MODES = ("frozen", "train")
"""How the Plus audio encoder / projector behave in a stage."""


@dataclass(frozen=True)
class StagePreset:
    """One training stage.

    Attributes:
        name: Label used in logs.
        num_heads: MCTP heads after :meth:`apply` (0 = none). Missing heads are created from
            the backbone's last layer (no heads yet) or grown as copies of the last head.
        train_backbone: The LLM trains and the main loss counts; False freezes it, drops the
            main loss and detaches its outputs from the heads' graph.
        train_heads: The MCTP heads train.
        detach_mtp_inputs: Always detach the heads' inputs (hidden states and embeddings)
            even when the backbone trains (VITA-Audio-Plus does this in every stage).
        audio_encoder: ``"frozen"`` or ``"train"`` (Plus only: SenseVoice encoder).
        audio_projector: ``"frozen"`` or ``"train"`` (Plus only: the MLP projector).
        lr: Peak learning rate.
        mctp_lr_mult: Learning-rate multiplier of the heads' parameter groups.
        mtp_loss_weight: Weight of the MCTP term (``total = main + w * mean_k``). The stage is
            its one owner: :meth:`apply` puts it on the model. The official value is the
            starting checkpoint's ``mtp_loss_weight``, so the presets leave it None and
            :meth:`apply` refuses a stage with heads until it is set
            (``preset.replace(mtp_loss_weight=w)``).
        weight_decay: AdamW weight decay (never on biases and norm weights).
        max_steps: Optimizer steps of the stage.

    Raises:
        ValueError: On an inconsistent combination (nothing trains, heads that train with
            ``num_heads = 0``, unknown audio modes, non-positive lr or steps).
    """

    name: str
    num_heads: int
    train_backbone: bool
    train_heads: bool = True
    detach_mtp_inputs: bool = False
    audio_encoder: str = "frozen"
    audio_projector: str = "frozen"
    lr: float = 1e-4
    mctp_lr_mult: float = 1.0
    mtp_loss_weight: float | None = None
    weight_decay: float = 0.0
    max_steps: int = 1000

    def __post_init__(self) -> None:
        if self.num_heads < 0:
            raise ValueError(f"num_heads must be >= 0, got {self.num_heads}")
        for field in ("audio_encoder", "audio_projector"):
            if getattr(self, field) not in AUDIO_MODES:
                raise ValueError(
                    f"{field} must be one of {AUDIO_MODES}, got {getattr(self, field)!r}"
                )
        if self.lr <= 0 or self.mctp_lr_mult <= 0 or self.max_steps < 1:
            raise ValueError(
                f"lr ({self.lr}), mctp_lr_mult ({self.mctp_lr_mult}) must be > 0 and max_steps "
                f"({self.max_steps}) >= 1"
            )
        if self.mtp_loss_weight is not None and self.mtp_loss_weight < 0:
            raise ValueError(f"mtp_loss_weight must be >= 0, got {self.mtp_loss_weight}")
        heads = self.train_heads and self.num_heads > 0
        audio = "train" in (self.audio_encoder, self.audio_projector)
        if not (self.train_backbone or heads or audio):
            raise ValueError(f"stage {self.name!r} trains nothing")
        if not self.train_backbone and self.num_heads == 0:
            raise ValueError(
                f"stage {self.name!r}: a frozen backbone without MCTP heads has no loss to train"
            )

    def replace(self, **changes: Any) -> StagePreset:
        """A copy with some fields changed (validated again).

        Raises:
            ValueError: As the constructor; TypeError on unknown fields.
        """
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ applying
    def apply(self, model: MCTPTrainingModel) -> MCTPTrainingModel:
        """Grow/create the heads, set what trains and the loss weight; returns ``model``.

        The only way to set ``train_backbone``, ``detach_mtp_inputs`` (always on for a Plus
        model) and ``mtp_loss_weight`` of a :class:`~mctp.training.MCTPTrainingModel`.

        Raises:
            ValueError: If the model already has more heads than ``num_heads``, the stage has
                heads but no ``mtp_loss_weight``, or it trains an audio part the model does not
                have.
        """
        if self.num_heads and self.mtp_loss_weight is None:
            raise ValueError(
                f"stage {self.name!r} has {self.num_heads} MCTP heads but no mtp_loss_weight; "
                "set it (officially the starting checkpoint's): "
                "stage.replace(mtp_loss_weight=w).apply(model)"
            )
        model.set_num_heads(self.num_heads)
        model.backbone.requires_grad_(self.train_backbone)
        if model.stack is not None:
            model.stack.requires_grad_(self.train_heads)
        for name, mode in (
            ("audio_model", self.audio_encoder),
            ("audio_projection", self.audio_projector),
        ):
            part = getattr(model, name)
            if part is None:
                if mode == "train":
                    raise ValueError(f"stage {self.name!r} trains {name} but the model has none")
                continue
            part.requires_grad_(mode == "train")
        model._set_stage(self)
        return model

    def param_groups(self, model: MCTPTrainingModel) -> list[dict[str, Any]]:
        """AdamW groups of the trainable parameters (``lr``, ``weight_decay`` and a ``name``).

        Returns:
            Non-empty groups: ``backbone``, ``backbone_no_decay``, ``mctp``, ``mctp_no_decay``,
            ``audio``, ``audio_no_decay``.
        """
        parts: list[tuple[str, nn.Module | None, float]] = [
            ("backbone", model.backbone, self.lr),
            ("mctp", model.stack, self.lr * self.mctp_lr_mult),
            ("audio", model.audio_model, self.lr),
            ("audio", model.audio_projection, self.lr),
        ]
        groups: dict[str, dict[str, Any]] = {}
        for tag, module, lr in parts:
            if module is None:
                continue
            for name, p in _trainable(module):
                plain = p.ndim < 2 or name.endswith(".bias")
                key = f"{tag}_no_decay" if plain else tag
                g = groups.setdefault(
                    key,
                    {
                        "name": key,
                        "params": [],
                        "lr": lr,
                        "weight_decay": 0.0 if plain else self.weight_decay,
                    },
                )
                g["params"].append(p)
        return list(groups.values())


def _trainable(module: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    for name, p in module.named_parameters():
        if p.requires_grad:
            yield name, p


_VITA = {
    1: dict(name="stage1", num_heads=0, train_backbone=True, lr=6e-5, max_steps=8000),
    2: dict(name="stage2", num_heads=1, train_backbone=False, lr=1e-3, max_steps=4000),
    3: dict(name="stage3", num_heads=10, train_backbone=False, lr=1e-3, max_steps=8000),
    4: dict(
        name="stage4", num_heads=10, train_backbone=True, lr=5e-5, mctp_lr_mult=10.0, max_steps=4000
    ),
}


def vita_audio_stage(stage: int, *, plus: bool = False, **changes: Any) -> StagePreset:
    """The official VITA-Audio stage ``1..4`` (``plus=True``: the SenseVoice variant).

    For Plus the MTP inputs are always detached, the encoder stays frozen and the projector
    trains in stages 1 and 4 (with the LLM); ``changes`` override any field.

    Raises:
        ValueError: For a stage outside 1..4 or an invalid override.
    """
    if stage not in _VITA:
        raise ValueError(f"VITA-Audio has stages 1..4, got {stage}")
    fields: dict[str, Any] = dict(_VITA[stage])
    if plus:
        fields.update(detach_mtp_inputs=True)
        if fields["train_backbone"]:
            fields.update(audio_projector="train")
    fields.update(changes)
    return StagePreset(**fields)
