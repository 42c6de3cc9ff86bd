"""Tiny random transformers models (no download) for backbone and generation tests."""

from __future__ import annotations

import pytest
import torch


def tiny_model(family: str, *, vocab: int = 128, attn: str = "sdpa", seed: int = 0):
    """A tiny random causal LM of the given family ('qwen2', 'llama', 'qwen3', 'mistral')."""
    import transformers as tf

    common = dict(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    cfg_cls, model_cls = {
        "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM),
        "llama": (tf.LlamaConfig, tf.LlamaForCausalLM),
        "qwen3": (tf.Qwen3Config, tf.Qwen3ForCausalLM),
        "mistral": (tf.MistralConfig, tf.MistralForCausalLM),
    }[family]
    extra = {"sliding_window": None} if family == "mistral" else {}
    if family == "qwen3":
        extra["head_dim"] = 8
    cfg = cfg_cls(**common, **extra)
    cfg._attn_implementation = attn
    torch.manual_seed(seed)
    model = model_cls(cfg).eval()
    # sharper random weights so greedy choices are well separated
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.mul_(8.0)
    return model


@pytest.fixture(params=["qwen2", "llama"])
def family(request) -> str:
    return request.param
