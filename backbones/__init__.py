"""Adapters that make any Hugging Face causal LM an MCTP backbone (``mctp.backbones``)."""

from .hf import BackboneOutput, HFBackbone

__all__ = ["BackboneOutput", "HFBackbone"]
