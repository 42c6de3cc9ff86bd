"""A random tiny GLM-4-Voice folder in the released format (for tests and docs; nothing is
downloaded).

The folder holds a ``config.json`` with the released ChatGLM fields (``model_type:
"chatglm"``, ``auto_map`` to the remote code, the forward options), ``model.safetensors``
under the released key names (``transformer.encoder.layers.{i}.self_attention.
query_key_value.weight``, ...) and a word-level tokenizer with GLM-4's special tokens and
contiguous ``<|audio_k|>`` tokens. The released tokenizer is a tiktoken file read by remote
code; the stand-in is a ``tokenizer.json`` with the same special and audio tokens, so
:meth:`~glm4_voice.vocab.GLM4VoiceVocab.from_tokenizer` reads both the same way.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .vocab import SPECIAL_TOKENS

__all__ = ["TINY_SIZES", "make_glm4_voice_tokenizer", "make_tiny_glm4_voice", "tiny_config"]

TINY_SIZES: dict[str, int] = {
    "hidden_size": 64,
    "num_layers": 2,
    "num_attention_heads": 4,
    "multi_query_group_num": 2,
    "kv_channels": 16,
    "ffn_hidden_size": 96,
}
"""Sizes of the default tiny fake (GQA 4 heads / 2 groups, head dim 16)."""


def make_glm4_voice_tokenizer(words: Sequence[str], num_audio: int) -> Any:
    """A word-level tokenizer: ``<unk>``, ``"\\n"``, ``words``, GLM-4's specials, audio tokens.

    Args:
        words: Plain words (space separated in text).
        num_audio: Number of ``<|audio_k|>`` tokens (contiguous ids after the specials).
    """
    from tokenizers import AddedToken, Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    table = {w: i for i, w in enumerate(dict.fromkeys(["<unk>", "\n", *words]))}
    core = Tokenizer(models.WordLevel(table, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r"\n"), "isolated"), pre_tokenizers.Split(" ", "removed")]
    )
    core.add_special_tokens([AddedToken(t, special=True) for t in SPECIAL_TOKENS])
    core.add_special_tokens([AddedToken(f"<|audio_{k}|>", special=True) for k in range(num_audio)])
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        unk_token="<unk>",
        pad_token="<|endoftext|>",
        eos_token="<|user|>",
    )


def tiny_config(vocab_size: int, tokenizer: Any, **sizes: int) -> dict[str, Any]:
    """A ``config.json`` dict in the released GLM-4-Voice-9B layout at tiny sizes."""
    ids = tokenizer.get_vocab()
    s = {**TINY_SIZES, **sizes}
    return {
        "_name_or_path": "tiny-glm-4-voice",
        "architectures": ["ChatGLMModel"],
        "auto_map": {
            "AutoConfig": "configuration_chatglm.ChatGLMConfig",
            "AutoModel": "modeling_chatglm.ChatGLMForConditionalGeneration",
            "AutoModelForCausalLM": "modeling_chatglm.ChatGLMForConditionalGeneration",
            "AutoModelForSeq2SeqLM": "modeling_chatglm.ChatGLMForConditionalGeneration",
            "AutoModelForSequenceClassification": "modeling_chatglm.ChatGLMForSequenceClassification",
        },
        "add_bias_linear": False,
        "add_qkv_bias": True,
        "apply_query_key_layer_scaling": True,
        "apply_residual_connection_post_layernorm": False,
        "attention_dropout": 0.0,
        "attention_softmax_in_fp32": True,
        "bias_dropout_fusion": True,
        "classifier_dropout": None,
        "eos_token_id": [ids["<|endoftext|>"], ids["<|user|>"], ids["<|observation|>"]],
        "ffn_hidden_size": s["ffn_hidden_size"],
        "fp32_residual_connection": False,
        "hidden_dropout": 0.0,
        "hidden_size": s["hidden_size"],
        "kv_channels": s["kv_channels"],
        "layernorm_epsilon": 3.90625e-08,
        "model_type": "chatglm",
        "multi_query_attention": True,
        "multi_query_group_num": s["multi_query_group_num"],
        "num_attention_heads": s["num_attention_heads"],
        "num_hidden_layers": s["num_layers"],
        "num_layers": s["num_layers"],
        "original_rope": True,
        "pad_token_id": ids["<|endoftext|>"],
        "padded_vocab_size": vocab_size,
        "post_layer_norm": True,
        "rmsnorm": True,
        "rope_ratio": 1,
        "seq_length": 8192,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "transformers_version": "4.44.1",
        "use_cache": True,
        "vocab_size": vocab_size,
    }


def released_tensors(
    cfg: dict[str, Any], *, seed: int = 0, cycle: Sequence[int] = (), bigram: float = 0.0
) -> dict[str, torch.Tensor]:
    """Random tensors under the released key names for ``cfg`` (fp32).

    Args:
        cfg: The config dict.
        seed: Seed of the weights.
        cycle: Token ids; with ``bigram > 0`` the output layer is pulled towards predicting
            ``cycle[j + 1]`` after ``cycle[j]``, so
            greedy decoding of a random tiny model walks a long path instead of repeating
            one token.
        bigram: Strength of that pull (0: purely random).
    """
    g = torch.Generator().manual_seed(seed)
    h, f, v = cfg["hidden_size"], cfg["ffn_hidden_size"], cfg["padded_vocab_size"]
    d, heads, groups = cfg["kv_channels"], cfg["num_attention_heads"], cfg["multi_query_group_num"]
    qkv = (heads + 2 * groups) * d

    def rnd(*shape: int, std: float) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * std

    def norm(n: int) -> torch.Tensor:
        return 1.0 + rnd(n, std=0.1)

    out = {"transformer.embedding.word_embeddings.weight": rnd(v, h, std=1.0)}
    for i in range(cfg["num_layers"]):
        p = f"transformer.encoder.layers.{i}."
        out[p + "input_layernorm.weight"] = norm(h)
        out[p + "self_attention.query_key_value.weight"] = rnd(qkv, h, std=h**-0.5)
        out[p + "self_attention.query_key_value.bias"] = rnd(qkv, std=0.1)
        out[p + "self_attention.dense.weight"] = rnd(h, heads * d, std=0.5 * (heads * d) ** -0.5)
        out[p + "post_attention_layernorm.weight"] = norm(h)
        out[p + "mlp.dense_h_to_4h.weight"] = rnd(2 * f, h, std=h**-0.5)
        out[p + "mlp.dense_4h_to_h.weight"] = rnd(h, f, std=0.5 * f**-0.5)
    out["transformer.encoder.final_layernorm.weight"] = norm(h)
    head = rnd(v, h, std=2 * h**-0.5)
    if bigram and cycle:
        emb = out["transformer.embedding.word_embeddings.weight"]
        prev = torch.full((v,), -1, dtype=torch.long)
        for a, b in zip(cycle, [*cycle[1:], cycle[0]], strict=True):
            prev[b] = a
        rows = prev >= 0
        head[rows] += bigram * emb[prev[rows]] / h**0.5
    out["transformer.output_layer.weight"] = head
    return out


def make_tiny_glm4_voice(
    folder: str | Path,
    *,
    seed: int = 0,
    num_words: int = 40,
    num_audio: int = 64,
    vocab_pad: int = 8,
    bigram: float = 2.0,
    **sizes: int,
) -> Path:
    """Write a random tiny GLM-4-Voice folder in the released format.

    Args:
        folder: Output folder (created).
        seed: Seed of the weights.
        num_words: Plain words ``w0 .. w{n-1}`` of the tokenizer.
        num_audio: ``<|audio_k|>`` tokens (the released model has 16384).
        vocab_pad: Extra embedding rows past the tokenizer (as ``padded_vocab_size`` pads).
        bigram: Pull of the output layer towards GLM-4-Voice's pattern: a path of 13 words,
            26 audio tokens, 13 words, 26 audio tokens (then back to the start), so greedy
            decoding of the random model speaks like the released one (0: purely random).
        **sizes: Overrides of :data:`TINY_SIZES` (ChatGLM field names).

    Returns:
        The folder.
    """
    from safetensors.torch import save_file

    root = Path(folder)
    root.mkdir(parents=True, exist_ok=True)
    words = [f"w{i}" for i in range(num_words)] + ["streaming_transcription"]
    tok = make_glm4_voice_tokenizer(words, num_audio)
    cfg = tiny_config(len(tok) + vocab_pad, tok, **sizes)
    (root / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    ids = tok.get_vocab()
    text = [ids[f"w{i}"] for i in range(min(num_words, 26))]
    audio = [ids[f"<|audio_{k}|>"] for k in range(min(num_audio, 52))]
    cycle = text[:13] + audio[:26] + text[13:26] + audio[26:52]
    tensors = released_tensors(cfg, seed=seed, cycle=cycle, bigram=bigram)
    save_file(tensors, str(root / "model.safetensors"), {"format": "pt"})
    tok.save_pretrained(root)
    return root
