"""Adapters that make any Hugging Face causal LM an MCTP backbone (``mctp.backbones``).

The speech vocabulary names (``SpeechVocab``, ``AUDIO_PLACEHOLDER``, ``BOA``, ...) are defined
in the core, :mod:`mctp.speech_vocab`, and re-exported here so that
``from mctp.backbones import SpeechVocab`` keeps working; new code imports them from the core.
"""

from mctp.speech_vocab import (
    AUDIO_CONTEXT,
    AUDIO_PLACEHOLDER,
    BOA,
    EOA,
    SPECIAL_TOKENS,
    SPECIAL_TOKENS_PLUS,
    SpeechVocab,
    audio_token,
)

from .generic import GenericHFBackbone
from .hf import BackboneOutput, FastHFBackbone, HFBackbone
from .lora import add_lora, trainable_parameter_count
from .vocab import extend_vocab

__all__ = [
    "AUDIO_CONTEXT",
    "AUDIO_PLACEHOLDER",
    "BOA",
    "EOA",
    "SPECIAL_TOKENS",
    "SPECIAL_TOKENS_PLUS",
    "BackboneOutput",
    "FastHFBackbone",
    "GenericHFBackbone",
    "HFBackbone",
    "SpeechVocab",
    "add_lora",
    "audio_token",
    "extend_vocab",
    "trainable_parameter_count",
]
