"""LoRA on the backbone (through peft) while MCTP heads train fully."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

__all__ = ["add_lora", "trainable_parameter_count"]

_DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def add_lora(
    model: nn.Module,
    *,
    r: int = 16,
    alpha: int = 32,
    dropout: float = 0.0,
    target_modules: Sequence[str] = _DEFAULT_TARGETS,
    **config: Any,
) -> nn.Module:
    """Inject LoRA adapters into a transformers backbone in place and freeze its base weights.

    Build the :class:`~mctp.stack.MCTPStack` *before* calling this: heads copied from the
    backbone afterwards would carry adapters. Parameters outside ``model`` (the heads) are
    untouched, so they keep training fully.

    Args:
        model: The transformers causal LM (e.g. ``HFBackbone.model``).
        r: LoRA rank.
        alpha: LoRA scaling numerator.
        dropout: LoRA dropout.
        target_modules: Names of the linear layers to adapt.
        **config: Further ``peft.LoraConfig`` fields.

    Returns:
        The same ``model`` object, now with adapters (base weights frozen).

    Raises:
        ImportError: If peft is not installed.
    """
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError as e:  # pragma: no cover - peft is a core dependency
        raise ImportError("LoRA needs peft: pip install peft") from e
    cfg = LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(target_modules), **config
    )
    inject_adapter_in_model(cfg, model)
    for name, p in model.named_parameters():
        p.requires_grad = "lora_" in name
    return model


def trainable_parameter_count(module: nn.Module) -> int:
    """Number of parameters with ``requires_grad``."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)
