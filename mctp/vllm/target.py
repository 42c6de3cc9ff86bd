"""An official VITA-Audio folder (``model_type: qwen2_mtp``) as a vLLM target model.

The official checkpoint keeps its ``N`` MCTP layers after the ``L`` backbone layers
(``num_hidden_layers = L + N``) and adds ``mtp_projs``/``mtp_embed_norms``/``mtp_hidden_norms``.
vLLM serves the backbone: this class builds vLLM's Qwen2 model with ``L`` layers and loads the
folder as it is, leaving the MCTP tensors to the drafter (``mctp export vllm`` writes them as
one). The VITA-Audio-Plus variant (``qwen2_mtp_sensevoice``) is refused: its audio encoder
does not run inside vLLM here.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

import torch
from vllm.model_executor.models.qwen2 import Qwen2ForCausalLM

__all__ = ["VitaAudioForCausalLM"]

_LAYER = re.compile(r"^model\.layers\.(\d+)\.")
_MTP_PREFIXES = ("mtp_projs.", "mtp_embed_norms.", "mtp_hidden_norms.")


def backbone_layers(config: Any) -> int:
    """``L`` of an official config (``num_hidden_layers - num_nextn_predict_layers``).

    Raises:
        ValueError: If the config is not a VITA-Audio (``qwen2_mtp``) config or has no backbone
            layers.
    """
    model_type = getattr(config, "model_type", None)
    if model_type == "qwen2_mtp_sensevoice":
        raise ValueError(
            "VITA-Audio-Plus (qwen2_mtp_sensevoice) feeds SenseVoice frames into the backbone; "
            "the vLLM plugin serves qwen2_mtp folders only"
        )
    if model_type != "qwen2_mtp":
        raise ValueError(f"expected a VITA-Audio config (qwen2_mtp), got {model_type!r}")
    cached = getattr(config, "mctp_backbone_layers", None)
    if cached is not None:
        return int(cached)
    n = int(getattr(config, "num_nextn_predict_layers", 0) or 0)
    total = int(config.num_hidden_layers)
    if not 0 <= n < total:
        raise ValueError(
            f"num_nextn_predict_layers={n} leaves no backbone layer of num_hidden_layers={total}"
        )
    return total - n


class VitaAudioForCausalLM(Qwen2ForCausalLM):
    """vLLM's Qwen2 over the first ``L`` layers of an official VITA-Audio folder.

    Raises:
        ValueError: If the folder is not a ``qwen2_mtp`` folder.
    """

    def __init__(self, *, vllm_config: Any, prefix: str = "") -> None:
        config = vllm_config.model_config.hf_config
        num_layers = backbone_layers(config)
        config.mctp_backbone_layers = num_layers
        config.num_hidden_layers = num_layers  # vLLM builds (and caches KV for) L layers
        self.num_backbone_layers = num_layers
        super().__init__(vllm_config=vllm_config, prefix=prefix)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Load the backbone tensors; the MCTP layers and ``mtp_*`` tensors are the drafter's.

        Raises:
            ValueError: On VITA-Audio-Plus audio-encoder tensors.
        """
        num_layers = self.num_backbone_layers

        def backbone() -> Iterable[tuple[str, torch.Tensor]]:
            for name, tensor in weights:
                if name.startswith(_MTP_PREFIXES):
                    continue
                if name.startswith(("model.audio_model.", "model.audio_projection.")):
                    raise ValueError(f"{name}: VITA-Audio-Plus tensors are not served by vLLM")
                m = _LAYER.match(name)
                if m and int(m.group(1)) >= num_layers:
                    continue
                yield name, tensor

        return super().load_weights(backbone())
