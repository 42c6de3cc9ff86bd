"""Training MCTP heads (and the backbone) with transformers' ``Trainer`` (``mctp.training``).

The engine is transformers' ``Trainer``: ``torchrun``/``accelerate launch`` with DDP, FSDP or
DeepSpeed work unchanged. This package adds the MCTP loss and its normalisation
(:class:`MCTPTrainer`, :class:`MCTPTrainingModel`), the packed-batch collator
(:class:`PackedCollator`), stage presets as data (:class:`StagePreset`,
:func:`vita_audio_stage`), JSONL data through ``datasets`` with file/line errors
(:class:`JsonlFile`, :class:`PackedDataset`) and exports (:func:`save_lora_adapter`).

Names load lazily: ``import mctp.training`` imports neither transformers nor datasets;
install them with ``pip install 'mctp[train]'``.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS: dict[str, str] = {
    "AUDIO_MODES": "stages",
    "DataError": "data",
    "ErrorLog": "data",
    "IGNORE_INDEX": "collator",
    "JsonlFile": "data",
    "MCTPTrainer": "trainer",
    "MCTPTrainingModel": "model",
    "NonFiniteLossError": "trainer",
    "NonFiniteWeightsError": "trainer",
    "PackedCollator": "collator",
    "PackedDataset": "data",
    "PRIVATE_TRAINER_METHODS": "trainer",
    "STAGING_DIR": "trainer",
    "StagePreset": "stages",
    "assert_finite": "export",
    "check_transformers_api": "trainer",
    "greedy_packs": "data",
    "merged_lora": "export",
    "publish": "trainer",
    "save_lora_adapter": "export",
    "scan_jsonl": "data",
    "vita_audio_stage": "stages",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'mctp.training' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
