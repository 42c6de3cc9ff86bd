"""Tiny Qwen2/Llama backbones and samples for the mctp.training tests (imported by them)."""

from __future__ import annotations

import torch

VOCAB = 64


def tiny_backbone(family: str = "qwen2", seed: int = 0):
    """A 2-layer width-32 random causal LM of ``family`` wrapped as an HFBackbone."""
    import transformers

    from mctp.backbones import HFBackbone

    names = {
        "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
        "llama": ("LlamaConfig", "LlamaForCausalLM"),
    }
    cfg_cls, model_cls = (getattr(transformers, n) for n in names[family])
    cfg = cfg_cls(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    return HFBackbone(model_cls(cfg))


def samples(n: int, seed: int = 1, lo: int = 4, hi: int = 14) -> list[dict[str, list[int]]]:
    """``n`` random samples; labels are the ids with the first two positions unscored."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        k = int(torch.randint(lo, hi, (1,), generator=g))
        ids = torch.randint(0, VOCAB, (k,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [-100, -100, *ids[2:]]})
    return out
