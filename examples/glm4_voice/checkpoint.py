"""Load a GLM-4-Voice-9B folder as released onto transformers' own ``GlmForCausalLM``.

GLM-4-Voice-9B ships THUDM's ChatGLM remote-code layout (``config.json`` with
``model_type: "chatglm"``, ``modeling_chatglm.py``). Its forward is the GLM-4 one, which
transformers implements natively as ``GlmForCausalLM`` (``model_type: "glm"``); this module
converts the released keys and config onto it, so the model runs on
:class:`~mctp.backbones.HFBackbone`'s fast path with no remote code.

Facts of the released format (read from the public model files):

* transformer: pre-norm RMSNorm blocks, ``num_layers`` 40, hidden 4096, 32 query heads of
  ``kv_channels`` 128 and ``multi_query_group_num`` 2 key/value groups (query head ``h`` reads
  group ``h // 16``), SwiGLU MLP of ``ffn_hidden_size`` 13696 with the gate and up
  projections fused (gate first), a bias on the fused QKV projection only, final RMSNorm,
  untied output layer; ``layernorm_epsilon`` 3.90625e-08, ``padded_vocab_size`` 168960.
* rotary: on the first half of each head (64 of 128 dims), adjacent pairs ``(0, 1), (2, 3),
  ...`` rotated, base ``10000 * rope_ratio`` (``rope_ratio`` 1).
* keys, converted as follows (``{i}`` = layer):

==========================================================  ===========================================
released key                                                ``GlmForCausalLM`` key
==========================================================  ===========================================
``transformer.embedding.word_embeddings.weight``            ``model.embed_tokens.weight``
``transformer.encoder.layers.{i}.input_layernorm.weight``   ``model.layers.{i}.input_layernorm.weight``
``...self_attention.query_key_value.{weight,bias}``         ``...self_attn.{q,k,v}_proj.*`` (split
                                                            ``[heads*D, groups*D, groups*D]``)
``...self_attention.dense.weight``                          ``...self_attn.o_proj.weight``
``...post_attention_layernorm.weight``                      ``...post_attention_layernorm.weight``
``...mlp.dense_h_to_4h.weight``                             ``...mlp.gate_up_proj.weight``
``...mlp.dense_4h_to_h.weight``                             ``...mlp.down_proj.weight``
``transformer.encoder.final_layernorm.weight``              ``model.norm.weight``
``transformer.output_layer.weight``                         ``lm_head.weight``
``transformer.rotary_pos_emb.inv_freq`` (if stored)         not loaded: recomputed, checked equal
==========================================================  ===========================================

Loading is strict: a key missing from the folder, a key the conversion does not know, or a
tensor of the wrong shape raises :class:`mctp.CheckpointError` listing all of them; a
config of another architecture (or one whose options change the forward) raises
:class:`ValueError` naming the field.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mctp.checkpoint import CheckpointError, load_strict, read_state_dict

__all__ = [
    "FORWARD_OPTIONS",
    "RELEASED_SHAPE",
    "ChatGLMShape",
    "convert_state_dict",
    "glm_config",
    "load_glm4_voice",
    "read_shape",
]

FORWARD_OPTIONS: dict[str, Any] = {
    "rmsnorm": True,
    "add_qkv_bias": True,
    "add_bias_linear": False,
    "multi_query_attention": True,
    "original_rope": True,
    "post_layer_norm": True,
    "apply_residual_connection_post_layernorm": False,
}
"""Released ChatGLM options the conversion relies on (another value changes the forward)."""

RELEASED_SHAPE: dict[str, int] = {
    "hidden_size": 4096,
    "num_layers": 40,
    "num_heads": 32,
    "num_kv_groups": 2,
    "head_dim": 128,
    "ffn_hidden_size": 13696,
    "vocab_size": 168960,
}
"""GLM-4-Voice-9B's sizes (``load_glm4_voice(..., expect=RELEASED_SHAPE)`` checks them)."""

_PREFIX = "transformer."
_INV_FREQ = "transformer.rotary_pos_emb.inv_freq"


@dataclass(frozen=True)
class ChatGLMShape:
    """The sizes of a ChatGLM (GLM-4) ``config.json``, validated.

    Attributes:
        hidden_size: Model width ``H``.
        num_layers: Decoder layers.
        num_heads: Query heads.
        num_kv_groups: Key/value groups (``multi_query_group_num``).
        head_dim: Per-head width (``kv_channels``).
        ffn_hidden_size: MLP width (each of gate and up).
        vocab_size: Embedding and output rows (``padded_vocab_size``).
        eps: RMSNorm epsilon (``layernorm_epsilon``).
        rope_ratio: Rotary base multiplier (base ``10000 * rope_ratio``).
        seq_length: Context length.
        eos_token_id: Stop ids of the config.
        pad_token_id: Padding id of the config.
    """

    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_groups: int
    head_dim: int
    ffn_hidden_size: int
    vocab_size: int
    eps: float
    rope_ratio: float
    seq_length: int
    eos_token_id: tuple[int, ...]
    pad_token_id: int | None

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any], where: str = "config.json") -> ChatGLMShape:
        """Validate a ChatGLM config dict.

        Raises:
            ValueError: If it is not ``model_type: "chatglm"``, lacks a size, has an option the
                conversion does not reproduce, or inconsistent sizes.
        """
        model_type = cfg.get("model_type")
        if model_type != "chatglm":
            raise ValueError(
                f"{where}: model_type is {model_type!r}, GLM-4-Voice-9B is 'chatglm' (THUDM's "
                "ChatGLM layout); this loader reads only that architecture"
            )
        need = (
            "hidden_size",
            "num_layers",
            "num_attention_heads",
            "multi_query_group_num",
            "kv_channels",
            "ffn_hidden_size",
            "padded_vocab_size",
            "layernorm_epsilon",
        )
        missing = [k for k in need if k not in cfg]
        if missing:
            raise ValueError(f"{where}: missing ChatGLM field(s) {missing}")
        for key, want in FORWARD_OPTIONS.items():
            got = cfg.get(key, want)
            if got != want:
                raise ValueError(
                    f"{where}: {key}={got!r} but GLM-4-Voice has {key}={want!r}; the conversion "
                    "onto GlmForCausalLM would not reproduce that forward"
                )
        if cfg.get("rope_scaling"):
            raise ValueError(f"{where}: rope_scaling={cfg['rope_scaling']!r} is not GLM-4-Voice's")
        eos = cfg.get("eos_token_id")
        eos_ids = () if eos is None else tuple(eos) if isinstance(eos, list) else (int(eos),)
        shape = cls(
            hidden_size=int(cfg["hidden_size"]),
            num_layers=int(cfg["num_layers"]),
            num_heads=int(cfg["num_attention_heads"]),
            num_kv_groups=int(cfg["multi_query_group_num"]),
            head_dim=int(cfg["kv_channels"]),
            ffn_hidden_size=int(cfg["ffn_hidden_size"]),
            vocab_size=int(cfg["padded_vocab_size"]),
            eps=float(cfg["layernorm_epsilon"]),
            rope_ratio=float(cfg.get("rope_ratio", 1)),
            seq_length=int(cfg.get("seq_length", 8192)),
            eos_token_id=eos_ids,
            pad_token_id=cfg.get("pad_token_id"),
        )
        if shape.num_heads * shape.head_dim != shape.hidden_size:
            raise ValueError(
                f"{where}: num_attention_heads x kv_channels = {shape.num_heads} x "
                f"{shape.head_dim} != hidden_size {shape.hidden_size}"
            )
        if shape.num_heads % shape.num_kv_groups:
            raise ValueError(
                f"{where}: {shape.num_heads} heads do not split into "
                f"{shape.num_kv_groups} key/value groups"
            )
        if shape.head_dim % 4:
            raise ValueError(f"{where}: kv_channels {shape.head_dim} must be a multiple of 4")
        return shape

    def check(self, expect: Mapping[str, int], where: str) -> None:
        """Compare sizes with ``expect`` (e.g. :data:`RELEASED_SHAPE`).

        Raises:
            ValueError: Naming every size that differs.
        """
        bad = [
            f"{k}={getattr(self, k)} (expected {v})"
            for k, v in expect.items()
            if getattr(self, k) != v
        ]
        if bad:
            raise ValueError(f"{where} is not the expected GLM-4-Voice size: {', '.join(bad)}")


def read_shape(folder: str | os.PathLike[str]) -> ChatGLMShape:
    """Read and validate ``folder/config.json``.

    Raises:
        FileNotFoundError: If there is no ``config.json``.
        ValueError: As :meth:`ChatGLMShape.from_config`, or on unreadable JSON.
    """
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{folder} has no config.json (not a GLM-4-Voice-9B folder)")
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err
    return ChatGLMShape.from_config(cfg, str(path))


def glm_config(shape: ChatGLMShape) -> Any:
    """The transformers ``GlmConfig`` computing the same forward as the ChatGLM config."""
    from transformers import GlmConfig

    return GlmConfig(
        vocab_size=shape.vocab_size,
        hidden_size=shape.hidden_size,
        intermediate_size=shape.ffn_hidden_size,
        num_hidden_layers=shape.num_layers,
        num_attention_heads=shape.num_heads,
        num_key_value_heads=shape.num_kv_groups,
        head_dim=shape.head_dim,
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 10000.0 * shape.rope_ratio,
            "partial_rotary_factor": 0.5,
        },
        rms_norm_eps=shape.eps,
        attention_bias=True,
        max_position_embeddings=shape.seq_length,
        tie_word_embeddings=False,
        pad_token_id=shape.pad_token_id,
        eos_token_id=list(shape.eos_token_id) or None,
        hidden_act="silu",
    )


def _inv_freq(shape: ChatGLMShape) -> torch.Tensor:
    """The released rotary buffer: ``1 / base^(2j / (D/2))`` for ``j < D/4``."""
    dim = shape.head_dim // 2
    base = 10000.0 * shape.rope_ratio
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))


def convert_state_dict(
    state_dict: Mapping[str, torch.Tensor], shape: ChatGLMShape, where: str = "checkpoint"
) -> dict[str, torch.Tensor]:
    """Released ChatGLM keys -> ``GlmForCausalLM`` keys (the QKV projection split in three).

    Args:
        state_dict: The folder's tensors under their released names.
        shape: The folder's validated config.
        where: Name used in errors.

    Returns:
        A new dict under ``GlmForCausalLM`` names.

    Raises:
        CheckpointError: On keys that are not released ChatGLM keys, or a QKV tensor of the
            wrong size, or a stored rotary buffer that differs from the config's.
    """
    out: dict[str, torch.Tensor] = {}
    unexpected: list[str] = []
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = []
    q = shape.num_heads * shape.head_dim
    kv = shape.num_kv_groups * shape.head_dim
    layer_map = {
        "input_layernorm.weight": "input_layernorm.weight",
        "post_attention_layernorm.weight": "post_attention_layernorm.weight",
        "self_attention.dense.weight": "self_attn.o_proj.weight",
        "mlp.dense_h_to_4h.weight": "mlp.gate_up_proj.weight",
        "mlp.dense_4h_to_h.weight": "mlp.down_proj.weight",
    }
    for key, value in state_dict.items():
        if key == _INV_FREQ:
            want = _inv_freq(shape)
            if value.shape != want.shape or not torch.allclose(value.float(), want, rtol=1e-4):
                mismatched.append((key, tuple(value.shape), tuple(want.shape)))
            continue
        if key == "transformer.embedding.word_embeddings.weight":
            out["model.embed_tokens.weight"] = value
        elif key == "transformer.encoder.final_layernorm.weight":
            out["model.norm.weight"] = value
        elif key == "transformer.output_layer.weight":
            out["lm_head.weight"] = value
        elif key.startswith("transformer.encoder.layers."):
            rest = key[len("transformer.encoder.layers.") :]
            idx, _, name = rest.partition(".")
            if not idx.isdigit():
                unexpected.append(key)
                continue
            prefix = f"model.layers.{int(idx)}."
            if name in layer_map:
                out[prefix + layer_map[name]] = value
            elif name in (
                "self_attention.query_key_value.weight",
                "self_attention.query_key_value.bias",
            ):
                kind = name.rsplit(".", 1)[1]
                if value.shape[0] != q + 2 * kv:
                    mismatched.append((key, tuple(value.shape), (q + 2 * kv, *value.shape[1:])))
                    continue
                qv, kvv, vv = value.split([q, kv, kv], dim=0)
                out[prefix + f"self_attn.q_proj.{kind}"] = qv
                out[prefix + f"self_attn.k_proj.{kind}"] = kvv
                out[prefix + f"self_attn.v_proj.{kind}"] = vv
            else:
                unexpected.append(key)
        else:
            unexpected.append(key)
    if unexpected or mismatched:
        raise CheckpointError(f"GLM-4-Voice's ChatGLM layout ({where})", (), unexpected, mismatched)
    return out


def load_glm4_voice(
    folder: str | os.PathLike[str],
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    expect: Mapping[str, int] | None = None,
) -> Any:
    """Build ``GlmForCausalLM`` from a released GLM-4-Voice-9B folder, strictly.

    Args:
        folder: The model folder (``config.json`` + ``model*.safetensors``).
        dtype: Weight dtype (default: as stored).
        device: Where the model lives.
        expect: Sizes the folder must have (e.g. :data:`RELEASED_SHAPE`), None: any size.

    Returns:
        The model (eval mode).

    Raises:
        FileNotFoundError: If the folder, its config or its weights are missing.
        ValueError: For another architecture, unsupported options, or sizes that differ
            from ``expect``.
        mctp.CheckpointError: On missing, unexpected or mis-shaped tensors.
    """
    from transformers import GlmForCausalLM

    where = str(folder)
    shape = read_shape(folder)
    if expect is not None:
        shape.check(expect, where)
    state = convert_state_dict(read_state_dict(folder), shape, where)
    first = next(iter(state.values()), None)
    dtype = dtype or (first.dtype if first is not None else torch.float32)
    with torch.device("meta"):
        model = GlmForCausalLM(glm_config(shape))
    model = model.to(dtype).to_empty(device=device)
    # Non-persistent buffers (rotary inv_freq) were created on meta: recompute them.
    rotary = model.model.rotary_emb
    inv_freq, _ = rotary.compute_default_rope_parameters(rotary.config, torch.device(device))
    rotary.inv_freq = inv_freq
    rotary.original_inv_freq = inv_freq.clone()
    # load_state_dict copies (and casts) each CPU tensor into its parameter on ``device``
    try:
        load_strict(model, state, what=f"GLM-4-Voice ({where})")
    except CheckpointError as err:
        raise CheckpointError(
            f"GLM-4-Voice ({where}); released names: transformer.* (see "
            "examples/glm4_voice/checkpoint.py)",
            sorted({_released_name(k) for k in err.missing}),
            err.unexpected,
            err.mismatched,
        ) from None
    return model.eval()


def _released_name(key: str) -> str:
    """Released name of a ``GlmForCausalLM`` key (for error messages)."""
    table = {
        "model.embed_tokens.weight": "transformer.embedding.word_embeddings.weight",
        "model.norm.weight": "transformer.encoder.final_layernorm.weight",
        "lm_head.weight": "transformer.output_layer.weight",
    }
    if key in table:
        return table[key]
    if key.startswith("model.layers."):
        idx, _, name = key[len("model.layers.") :].partition(".")
        name = (
            name.replace("self_attn.o_proj", "self_attention.dense")
            .replace("mlp.gate_up_proj", "mlp.dense_h_to_4h")
            .replace("mlp.down_proj", "mlp.dense_4h_to_h")
        )
        for p in ("q_proj", "k_proj", "v_proj"):
            name = name.replace(f"self_attn.{p}", "self_attention.query_key_value")
        return f"transformer.encoder.layers.{idx}.{name}"
    return key
