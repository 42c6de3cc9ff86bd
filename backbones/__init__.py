"""Adapters that make any Hugging Face causal LM an MCTP backbone (``mctp.backbones``)."""

from .generic import GenericHFBackbone
from .hf import BackboneOutput, FastHFBackbone, HFBackbone
from .lora import add_lora, trainable_parameter_count
from .vocab import (
    AUDIO_CONTEXT,
    AUDIO_PLACEHOLDER,
    BOA,
    EOA,
    SPECIAL_TOKENS,
    SPECIAL_TOKENS_PLUS,
    SpeechVocab,
    audio_token,
    extend_vocab,
)

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
