"""transformers config classes for the two model types the plugin serves.

``qwen2_mtp`` (official VITA-Audio) and ``mtp`` (``mctp export vllm`` drafters) are not
transformers model types; vLLM reads configs through ``AutoConfig``, so the plugin registers
these (a Qwen2 config with the official MTP fields, and a plain config holding the exported
fields).
"""

from __future__ import annotations

from typing import Any

from transformers import PretrainedConfig, Qwen2Config

__all__ = ["MCTPDrafterConfig", "VitaAudioConfig", "register_configs"]


class VitaAudioConfig(Qwen2Config):
    """Official VITA-Audio config: Qwen2 fields plus ``num_nextn_predict_layers``."""

    model_type = "qwen2_mtp"

    def __init__(
        self, num_nextn_predict_layers: int = 0, mtp_loss_weight: float = 1.0, **kwargs: Any
    ) -> None:
        self.num_nextn_predict_layers = num_nextn_predict_layers
        self.mtp_loss_weight = mtp_loss_weight
        super().__init__(**kwargs)


class MCTPDrafterConfig(PretrainedConfig):
    """Config of an exported drafter folder (fields as written by :mod:`mctp.vllm.export`)."""

    model_type = "mtp"


def register_configs() -> None:
    """Register both model types with ``AutoConfig`` (idempotent)."""
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    for cls in (VitaAudioConfig, MCTPDrafterConfig):
        if cls.model_type not in CONFIG_MAPPING:
            AutoConfig.register(cls.model_type, cls)
