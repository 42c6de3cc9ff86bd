"""Exports at the end of a stage: LoRA adapters in PEFT's own format, finiteness checks."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

__all__ = ["assert_finite", "merged_lora", "save_lora_adapter"]


def assert_finite(module: nn.Module, what: str = "the model") -> None:
    """Raise unless every parameter and buffer of ``module`` is finite.

    Raises:
        mctp.training.NonFiniteWeightsError: Naming up to five offending tensors.
    """
    from .trainer import NonFiniteWeightsError

    bad = [
        n
        for n, t in [*module.named_parameters(), *module.named_buffers()]
        if t.is_floating_point() and not bool(torch.isfinite(t).all())
    ]
    if bad:
        raise NonFiniteWeightsError(f"{what} holds NaN/inf in {len(bad)} tensors: {bad[:5]}")


def save_lora_adapter(
    model: nn.Module, folder: str | Path, *, base_model_name_or_path: str | None = None
) -> Path:
    """Write the LoRA adapters injected into ``model`` as a PEFT adapter folder.

    The folder holds ``adapter_config.json`` and ``adapter_model.safetensors`` exactly as
    ``PeftModel.save_pretrained`` writes them, so ``PeftModel.from_pretrained(base, folder)``
    loads them onto a fresh base model.

    Args:
        model: A transformers model with adapters (``mctp.backbones.add_lora`` /
            ``peft.inject_adapter_in_model``).
        folder: Output folder (created).
        base_model_name_or_path: Recorded in the config (the stage's starting model).

    Returns:
        The folder.

    Raises:
        ValueError: If ``model`` carries no PEFT adapter.
        NonFiniteWeightsError: If an adapter weight is NaN or infinite.
    """
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    configs = getattr(model, "peft_config", None)
    if not configs:
        raise ValueError("the model carries no PEFT adapter (peft_config is missing)")
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    for name, config in configs.items():
        target = out if name == "default" else out / name
        target.mkdir(parents=True, exist_ok=True)
        state = get_peft_model_state_dict(model, adapter_name=name)
        tensors = {f"base_model.model.{k}": v.detach().cpu().contiguous() for k, v in state.items()}
        bad = [k for k, v in tensors.items() if not bool(torch.isfinite(v).all())]
        if bad:
            from .trainer import NonFiniteWeightsError

            raise NonFiniteWeightsError(f"adapter {name!r} holds NaN/inf in {bad[:5]}")
        save_file(tensors, target / "adapter_model.safetensors", metadata={"format": "pt"})
        config.base_model_name_or_path = base_model_name_or_path
        config.save_pretrained(str(target))
        json.loads((target / "adapter_config.json").read_text())  # written and readable
    return out


@contextlib.contextmanager
def merged_lora(model: nn.Module) -> Iterator[None]:
    """Temporarily replace every LoRA layer by a plain ``Linear`` holding ``W + delta``.

    Inside the block ``model.state_dict()`` has the base model's keys and merged weights (what
    an official-format export needs); the adapters are put back on exit, untouched.
    """
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
