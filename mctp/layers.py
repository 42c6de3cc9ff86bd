"""Small, dependency-free transformer parts with the Hugging Face calling convention.

``DecoderBlock`` is a Llama/Qwen2-style pre-norm block (RMSNorm, grouped-query attention
with rotary embeddings, SwiGLU MLP) whose parameter names equal those of transformers'
``LlamaDecoderLayer``/``Qwen2DecoderLayer`` (``self_attn.q_proj``, ``mlp.gate_proj``,
``input_layernorm``...), so state dicts move freely between the two. It is called exactly
like a transformers 5 decoder layer::

    out = block(x, attention_mask=mask, position_embeddings=(cos, sin), cache=cache)

which lets :class:`~mctp.stack.MCTPStack` drive either kind of block through one code path.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["DecoderBlock", "RMSNorm", "RotaryEmbedding", "apply_rotary", "rotate_half"]


class RMSNorm(nn.Module):
    """Root-mean-square layer norm computed in float32 (as Llama/Qwen2 do).

    Args:
        dim: Size of the last dimension.
        eps: Added to the mean square.
    """

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[..., dim] -> [..., dim]`` in the input dtype."""
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)


class RotaryEmbedding(nn.Module):
    """Rotary position embedding tables in the transformers layout.

    Args:
        head_dim: Per-head size (even).
        base: RoPE theta.

    Raises:
        ValueError: If ``head_dim`` is odd.
    """

    def __init__(self, head_dim: int, base: float = 10000.0) -> None:
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"head_dim ({head_dim}) must be even for rotary embeddings")
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    @torch.no_grad()
    def forward(
        self, x: torch.Tensor, position_ids: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Cos/sin tables for the given positions.

        Args:
            x: Any tensor whose dtype/device the tables take.
            position_ids: ``[B, T]`` long.

        Returns:
            ``(cos, sin)``, each ``[B, T, head_dim]``.
        """
        freqs = position_ids[..., None].float() * self.inv_freq.to(x.device)  # [B, T, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(x.dtype), emb.sin().to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """Swap and negate the two halves of the last dimension."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x [B, heads, T, D]`` by tables ``cos, sin [B, T, D]``."""
    return x * cos[:, None] + rotate_half(x) * sin[:, None]


class Attention(nn.Module):
    """Grouped-query self-attention (SDPA) with the Llama/Qwen2 parameter names.

    Args:
        hidden_size: Model width ``H``.
        num_heads: Query heads.
        num_kv_heads: Key/value heads (divides ``num_heads``).
        head_dim: Per-head size.
        qkv_bias: Biases on q/k/v projections (Qwen2: True, Llama: False).

    Raises:
        ValueError: If ``num_heads`` is not a multiple of ``num_kv_heads``.
    """

    def __init__(
        self, hidden_size: int, num_heads: int, num_kv_heads: int, head_dim: int, qkv_bias: bool
    ) -> None:
        super().__init__()
        if num_heads % num_kv_heads:
            raise ValueError(
                f"num_heads ({num_heads}) must be divisible by num_kv_heads ({num_kv_heads})"
            )
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.layer_idx = 0
        self.q_proj = nn.Linear(hidden_size, num_heads * head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(num_heads * head_dim, hidden_size, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None,
        cache: Any = None,
    ) -> torch.Tensor:
        """``x [B, T, H]`` -> ``[B, T, H]``.

        ``attention_mask`` is a boolean ``[B, 1, T, S]`` (True = may attend) or None for plain
        causal attention; ``cache`` has ``update(k, v, layer_idx) -> (K, V)``.
        """
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = position_embeddings
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        rep = self.num_heads // self.num_kv_heads
        if rep > 1:
            k = k.repeat_interleave(rep, dim=1)
            v = v.repeat_interleave(rep, dim=1)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attention_mask, is_causal=attention_mask is None and t > 1
        )
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))


class MLP(nn.Module):
    """SwiGLU feed-forward: ``down(silu(gate(x)) * up(x))``."""

    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[..., H] -> [..., H]``."""
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderBlock(nn.Module):
    """Pre-norm decoder block, state-dict compatible with Llama/Qwen2 decoder layers.

    Args:
        hidden_size: Model width ``H``.
        num_heads: Query heads.
        num_kv_heads: Key/value heads.
        intermediate_size: MLP width.
        head_dim: Per-head size (default ``hidden_size // num_heads``).
        qkv_bias: Biases on q/k/v (Qwen2 True, Llama False).
        rms_eps: RMSNorm epsilon.
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        num_kv_heads: int,
        intermediate_size: int,
        *,
        head_dim: int | None = None,
        qkv_bias: bool = False,
        rms_eps: float = 1e-6,
    ) -> None:
        super().__init__()
        head_dim = head_dim or hidden_size // num_heads
        self.self_attn = Attention(hidden_size, num_heads, num_kv_heads, head_dim, qkv_bias)
        self.mlp = MLP(hidden_size, intermediate_size)
        self.input_layernorm = RMSNorm(hidden_size, rms_eps)
        self.post_attention_layernorm = RMSNorm(hidden_size, rms_eps)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: Any = None,
        use_cache: bool | None = None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        """One block.

        Args:
            hidden_states: ``[B, T, H]``.
            attention_mask: Boolean ``[B, 1, T, S]`` (True = attend) or None (causal).
            position_ids: Unused (positions enter through ``position_embeddings``).
            cache: Cache with ``update(k, v, layer_idx)``, or None (the name transformers
                layers use from 5.24 on).
            use_cache: Unused; present for signature compatibility.
            position_embeddings: ``(cos, sin)``, each ``[B, T, head_dim]``.
            **kwargs: Ignored extra attention arguments (e.g. flash-attn sequence lengths).

        Returns:
            ``[B, T, H]``.

        Raises:
            ValueError: If ``position_embeddings`` is missing.
        """
        if position_embeddings is None:
            raise ValueError("DecoderBlock needs position_embeddings=(cos, sin)")
        h = hidden_states + self.self_attn(
            self.input_layernorm(hidden_states),
            position_embeddings,
            attention_mask,
            cache,
        )
        return h + self.mlp(self.post_attention_layernorm(h))
