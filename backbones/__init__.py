"""Adapters that make any Hugging Face causal LM an MCTP backbone."""
