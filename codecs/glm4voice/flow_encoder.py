"""Block conformer token encoder of the GLM-4-Voice flow model.

Layout of CosyVoice's ``BlockConformerEncoder`` as the GLM-4-Voice decoder configures it:
a linear input layer (Linear + LayerNorm, then ``x * sqrt(D)``), ESPnet-style relative
positional encodings, pre-norm layers made of block-causal relative-position
self-attention and a feed-forward block (no convolution module, no macaron feed-forward),
and a final LayerNorm. Token ``i`` may attend to token ``j`` iff ``j // block <= i // block``.

Attribute paths equal the checkpoint keys under ``encoder.`` in ``flow.pt``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "BlockConformerEncoder",
    "ConformerLayer",
    "FeedForward",
    "LinearInput",
    "RelPositionBlockAttention",
    "block_causal_mask",
    "relative_positions",
]

_ACTIVATIONS = {"swish": nn.SiLU, "relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh}


def relative_positions(
    length: int, dim: int, *, device: torch.device | None = None
) -> torch.Tensor:
    """Sinusoidal encodings of the relative positions ``length-1, ..., 0, ..., -(length-1)``.

    Args:
        length: Sequence length ``T``.
        dim: Encoding width ``D`` (even).
        device: Where to build the table.

    Returns:
        ``[1, 2T-1, D]`` float32; row ``k`` encodes relative position ``T-1-k`` (sin on even,
        cos on odd channels).
    """
    pos = torch.arange(length - 1, -length, -1, dtype=torch.float32, device=device)[:, None]
    freq = torch.exp(
        torch.arange(0, dim, 2, dtype=torch.float32, device=device) * -(math.log(10000.0) / dim)
    )
    angle = pos * freq  # [2T-1, D/2]
    table = torch.empty(2 * length - 1, dim, dtype=torch.float32, device=device)
    table[:, 0::2] = torch.sin(angle)
    table[:, 1::2] = torch.cos(angle)
    return table[None]


def block_causal_mask(
    length: int, block_size: int, *, device: torch.device | None = None
) -> torch.Tensor:
    """Attention mask of the block conformer: key ``j`` visible from query ``i`` iff ``j//B <= i//B``.

    Args:
        length: Sequence length ``T``.
        block_size: Block size ``B`` in tokens.
        device: Where to build the mask.

    Returns:
        ``[T, T]`` bool, True where attention is allowed.
    """
    block = torch.arange(length, device=device) // block_size
    return block[None, :] <= block[:, None]


class LinearInput(nn.Module):
    """Input layer: ``LayerNorm(Linear(x)) * sqrt(D)`` (keys ``embed.out.0``, ``embed.out.1``).

    Args:
        input_size: Input width.
        output_size: Model width ``D``.
    """

    def __init__(self, *, input_size: int, output_size: int) -> None:
        super().__init__()
        self.out = nn.Sequential(
            nn.Linear(input_size, output_size), nn.LayerNorm(output_size, eps=1e-5)
        )
        self.scale = math.sqrt(output_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, T, input_size]`` -> ``[B, T, D]``."""
        return self.out(x) * self.scale


class RelPositionBlockAttention(nn.Module):
    """Multi-head self-attention with Transformer-XL relative positions and a block mask.

    ``score[i, j] = ((q_i + u) . k_j + (q_i + v) . p_{i-j}) / sqrt(d_k)`` where ``p_r`` is the
    projected encoding of relative position ``r``.

    Args:
        dim: Model width ``D``.
        num_heads: Number of heads ``H`` (``D % H == 0``).
        key_bias: Whether ``linear_k`` has a bias.

    Raises:
        ValueError: If ``dim`` is not divisible by ``num_heads``.
    """

    def __init__(self, *, dim: int, num_heads: int, key_bias: bool = True) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.linear_q = nn.Linear(dim, dim)
        self.linear_k = nn.Linear(dim, dim, bias=key_bias)
        self.linear_v = nn.Linear(dim, dim)
        self.linear_out = nn.Linear(dim, dim)
        self.linear_pos = nn.Linear(dim, dim, bias=False)
        self.pos_bias_u = nn.Parameter(torch.zeros(num_heads, self.head_dim))
        self.pos_bias_v = nn.Parameter(torch.zeros(num_heads, self.head_dim))

    def forward(self, x: torch.Tensor, pos: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        """Attend.

        Args:
            x: ``[B, T, D]`` normalised input.
            pos: ``[1, 2T-1, D]`` relative position table (see :func:`relative_positions`).
            allowed: ``[T, T]`` or ``[B, T, T]`` bool, True where attention is allowed.

        Returns:
            ``[B, T, D]``.
        """
        b, t, _ = x.shape
        h, d = self.num_heads, self.head_dim
        q = self.linear_q(x).view(b, t, h, d)
        k = self.linear_k(x).view(b, t, h, d).transpose(1, 2)  # [B, H, T, d]
        v = self.linear_v(x).view(b, t, h, d).transpose(1, 2)
        p = self.linear_pos(pos).view(1, 2 * t - 1, h, d).transpose(1, 2)  # [1, H, 2T-1, d]
        q_u = (q + self.pos_bias_u).transpose(1, 2)
        q_v = (q + self.pos_bias_v).transpose(1, 2)
        bd = torch.matmul(q_v, p.transpose(-2, -1)).contiguous()  # [B, H, T, 2T-1]
        # Column T-1-i+j of row i holds relative position i-j: read it through a strided view.
        bd = bd.as_strided(
            (b, h, t, t),
            (bd.stride(0), bd.stride(1), bd.stride(2) - 1, 1),
            bd.storage_offset() + t - 1,
        )
        bias = bd / math.sqrt(d)
        bias = bias.masked_fill(~allowed.view(-1, 1, t, t), float("-inf"))
        out = F.scaled_dot_product_attention(q_u, k, v, attn_mask=bias, scale=1.0 / math.sqrt(d))
        return self.linear_out(out.transpose(1, 2).reshape(b, t, h * d))


class FeedForward(nn.Module):
    """``w_2(act(w_1(x)))``.

    Args:
        dim: Model width.
        hidden: Hidden width.
        activation: ``"swish"``, ``"relu"``, ``"gelu"`` or ``"tanh"``.

    Raises:
        ValueError: On an unknown activation.
    """

    def __init__(self, *, dim: int, hidden: int, activation: str = "swish") -> None:
        super().__init__()
        if activation not in _ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; known: {sorted(_ACTIVATIONS)}")
        self.w_1 = nn.Linear(dim, hidden)
        self.act = _ACTIVATIONS[activation]()
        self.w_2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[..., dim]`` -> ``[..., dim]``."""
        return self.w_2(self.act(self.w_1(x)))


class ConformerLayer(nn.Module):
    """Pre-norm layer: ``x += attn(norm_mha(x)); x += ff(norm_ff(x))``.

    Args:
        self_attn: The attention block.
        feed_forward: The feed-forward block.
        dim: Model width (for the two LayerNorms).
    """

    def __init__(
        self, *, self_attn: RelPositionBlockAttention, feed_forward: FeedForward, dim: int
    ) -> None:
        super().__init__()
        self.self_attn = self_attn
        self.feed_forward = feed_forward
        self.norm_mha = nn.LayerNorm(dim, eps=1e-5)
        self.norm_ff = nn.LayerNorm(dim, eps=1e-5)

    def forward(self, x: torch.Tensor, pos: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        """``[B, T, D]`` -> ``[B, T, D]`` (see :meth:`RelPositionBlockAttention.forward`)."""
        x = x + self.self_attn(self.norm_mha(x), pos, allowed)
        return x + self.feed_forward(self.norm_ff(x))


class BlockConformerEncoder(nn.Module):
    """Token encoder: input layer, ``num_blocks`` conformer layers, final LayerNorm.

    Args:
        input_size: Width of the token embeddings.
        output_size: Model width ``D``.
        attention_heads: Attention heads.
        linear_units: Feed-forward hidden width.
        num_blocks: Number of layers.
        block_size: Attention block size in tokens.
        activation: Feed-forward activation.
        key_bias: Whether ``linear_k`` has a bias.

    Raises:
        ValueError: If ``output_size`` is not divisible by ``attention_heads`` or
            ``block_size < 1``.
    """

    def __init__(
        self,
        *,
        input_size: int,
        output_size: int,
        attention_heads: int,
        linear_units: int,
        num_blocks: int,
        block_size: int,
        activation: str = "swish",
        key_bias: bool = True,
    ) -> None:
        super().__init__()
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.output_size = output_size
        self.block_size = block_size
        self.embed = LinearInput(input_size=input_size, output_size=output_size)
        self.encoders = nn.ModuleList(
            ConformerLayer(
                self_attn=RelPositionBlockAttention(
                    dim=output_size, num_heads=attention_heads, key_bias=key_bias
                ),
                feed_forward=FeedForward(
                    dim=output_size, hidden=linear_units, activation=activation
                ),
                dim=output_size,
            )
            for _ in range(num_blocks)
        )
        self.after_norm = nn.LayerNorm(output_size, eps=1e-5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Encode one unpadded sequence (or a batch of equal-length ones).

        Args:
            x: ``[B, T, input_size]`` token embeddings.

        Returns:
            ``[B, T, D]``.
        """
        t = x.shape[1]
        x = self.embed(x)
        pos = relative_positions(t, self.output_size, device=x.device).to(x.dtype)
        allowed = block_causal_mask(t, self.block_size, device=x.device)
        for layer in self.encoders:
            x = layer(x, pos, allowed)
        return self.after_norm(x)
