"""SenseVoiceSmall's SANM encoder: self-attention with an FSMN memory branch.

Module attribute paths equal FunASR's checkpoint keys below ``encoder.``:
``encoders0.0.self_attn.linear_q_k_v.weight``, ``encoders.{i}.self_attn.fsmn_block.weight``,
``tp_encoders.{i}.feed_forward.w_1.*``, ``after_norm.*``, ``tp_norm.*``. The modules only
receive sizes; the config is read in :mod:`mctp.codecs.sensevoice.encoder`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

__all__ = [
    "PositionwiseFeedForward",
    "SANMEncoderLayer",
    "SANMSelfAttention",
    "SenseVoiceEncoderSmall",
    "sinusoidal_positions",
]


def sinusoidal_positions(
    length: int, dim: int, *, device: torch.device | None = None, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """SenseVoice's absolute positions ``1..length``: ``[sin | cos]`` halves.

    The timescales are ``exp(-k * ln(10000) / (dim/2 - 1))`` for ``k = 0..dim/2-1``; computed
    in float32 and cast to ``dtype``.

    Returns:
        ``[length, dim]``.

    Raises:
        ValueError: If ``dim`` is odd or smaller than 4.
    """
    if dim % 2 or dim < 4:
        raise ValueError(f"positional encoding needs an even dim >= 4, got {dim}")
    half = dim // 2
    step = math.log(10000.0) / (half - 1)
    inv = torch.exp(torch.arange(half, device=device, dtype=torch.float32) * -step)  # [half]
    pos = torch.arange(1, length + 1, device=device, dtype=torch.float32)  # [L]
    angles = pos[:, None] * inv[None, :]  # [L, half]
    return torch.cat([angles.sin(), angles.cos()], dim=-1).to(dtype)


class _LayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32 and cast back (FunASR's SenseVoice does the same)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.layer_norm(
            x.float(), self.normalized_shape, self.weight.float(), self.bias.float(), self.eps
        )
        return out.to(x.dtype)


class SANMSelfAttention(nn.Module):
    """Multi-head self-attention plus an FSMN memory branch (a depthwise conv over the values).

    ``out = linear_out(softmax(q k^T / sqrt(d_k)) v) + (v + fsmn_block(pad(v)))``, with padded
    frames zeroed before the conv and in the memory output, and excluded as attention keys.

    Args:
        num_heads: Attention heads.
        input_dim: Input width (560 for the first block, else ``dim``).
        dim: Attention width (``output_size``).
        kernel_size: FSMN kernel (11 in SenseVoiceSmall).
        sanm_shift: Extra left context of the FSMN kernel (0: centred).
        dropout: Dropout on the attention weights and the memory branch (training only).

    Raises:
        ValueError: If ``dim`` is not divisible by ``num_heads`` or the kernel/shift do not fit.
    """

    def __init__(
        self,
        *,
        num_heads: int,
        input_dim: int,
        dim: int,
        kernel_size: int,
        sanm_shift: int = 0,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if num_heads < 1 or dim % num_heads:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        left = (kernel_size - 1) // 2 + sanm_shift
        right = kernel_size - 1 - left
        if kernel_size < 1 or sanm_shift < 0 or right < 0:
            raise ValueError(
                f"kernel_size ({kernel_size}) and sanm_shift ({sanm_shift}) give padding "
                f"({left}, {right}); need kernel_size >= 1 and 0 <= sanm_shift <= kernel_size // 2"
            )
        self.num_heads = num_heads
        self.dim = dim
        self.pad = (left, right)
        self.dropout = dropout
        self.linear_q_k_v = nn.Linear(input_dim, 3 * dim)
        self.linear_out = nn.Linear(dim, dim)
        self.fsmn_block = nn.Conv1d(dim, dim, kernel_size, groups=dim, bias=False)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Attend over the valid frames.

        Args:
            x: ``[B, T, input_dim]``.
            mask: ``[B, T]`` bool, True on valid (non-padding) frames.

        Returns:
            ``[B, T, dim]``.
        """
        q, k, v = self.linear_q_k_v(x).split(self.dim, dim=-1)  # 3 x [B, T, D]
        keep = mask[..., None].to(v.dtype)  # [B, T, 1]
        v_valid = v * keep
        memory = self.fsmn_block(F.pad(v_valid.transpose(1, 2), self.pad)).transpose(1, 2)
        memory = F.dropout(memory + v_valid, self.dropout, self.training) * keep  # [B, T, D]
        q, k, v = (rearrange(t, "b t (h d) -> b h t d", h=self.num_heads) for t in (q, k, v))
        ctx = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask[:, None, None, :],
            dropout_p=self.dropout if self.training else 0.0,
        )  # [B, H, T, d]
        return self.linear_out(rearrange(ctx, "b h t d -> b t (h d)")) + memory


class PositionwiseFeedForward(nn.Module):
    """``w_2(dropout(relu(w_1(x))))``.

    Args:
        dim: Input/output width.
        hidden_dim: Inner width (``linear_units``).
        dropout: Inner dropout (training only).
    """

    def __init__(self, dim: int, hidden_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.w_1 = nn.Linear(dim, hidden_dim)
        self.w_2 = nn.Linear(hidden_dim, dim)
        self.dropout = dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[..., dim]`` -> ``[..., dim]``."""
        return self.w_2(F.dropout(F.relu(self.w_1(x)), self.dropout, self.training))


class SANMEncoderLayer(nn.Module):
    """One SANM block: (pre-)norm -> SANM attention -> residual -> norm -> FFN -> residual.

    The attention residual is skipped when ``input_dim != dim`` (the first block, 560 -> D).

    Args:
        input_dim: Input width.
        dim: Output width.
        num_heads: Attention heads.
        ffn_dim: Feed-forward inner width.
        kernel_size: FSMN kernel.
        sanm_shift: FSMN left shift.
        normalize_before: Pre-norm (True in SenseVoiceSmall) or post-norm.
        dropout: Residual and FFN dropout.
        attention_dropout: Attention/memory dropout.

    Raises:
        ValueError: For post-norm with ``input_dim != dim`` (undefined in the original) or
            invalid attention sizes.
    """

    def __init__(
        self,
        *,
        input_dim: int,
        dim: int,
        num_heads: int,
        ffn_dim: int,
        kernel_size: int,
        sanm_shift: int = 0,
        normalize_before: bool = True,
        dropout: float = 0.0,
        attention_dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if not normalize_before and input_dim != dim:
            raise ValueError(f"post-norm needs input_dim == dim, got {input_dim} != {dim}")
        self.self_attn = SANMSelfAttention(
            num_heads=num_heads,
            input_dim=input_dim,
            dim=dim,
            kernel_size=kernel_size,
            sanm_shift=sanm_shift,
            dropout=attention_dropout,
        )
        self.feed_forward = PositionwiseFeedForward(dim, ffn_dim, dropout)
        self.norm1 = _LayerNorm(input_dim)
        self.norm2 = _LayerNorm(dim)
        self.residual_attn = input_dim == dim
        self.normalize_before = normalize_before
        self.dropout = dropout

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``[B, T, input_dim]``, mask ``[B, T]`` bool -> ``[B, T, dim]``."""
        h = self.norm1(x) if self.normalize_before else x
        h = F.dropout(self.self_attn(h, mask), self.dropout, self.training)
        x = x + h if self.residual_attn else h
        if not self.normalize_before:
            x = self.norm1(x)
        h = self.norm2(x) if self.normalize_before else x
        x = x + F.dropout(self.feed_forward(h), self.dropout, self.training)
        if not self.normalize_before:
            x = self.norm2(x)
        return x


class SenseVoiceEncoderSmall(nn.Module):
    """SenseVoiceSmall's encoder: ``encoders0`` (1 block, input_size -> D), ``encoders``
    (num_blocks - 1), ``after_norm``, ``tp_encoders`` (tp_blocks), ``tp_norm``.

    The input is scaled by ``sqrt(output_size)`` and sinusoidal positions ``1..T`` of width
    ``input_size`` are added before the first block.

    Args:
        input_size: Feature width (``n_mels * lfr_m`` = 560).
        output_size: Model width D (512 released).
        attention_heads: Heads per block.
        linear_units: Feed-forward inner width.
        num_blocks: Blocks in ``encoders0`` + ``encoders`` (50 released).
        tp_blocks: Blocks in ``tp_encoders`` (20 released).
        kernel_size: FSMN kernel.
        sanm_shift: FSMN left shift (config key ``sanm_shfit``).
        normalize_before: Pre-norm blocks.
        dropout_rate: Residual/FFN dropout (training only).
        attention_dropout_rate: Attention dropout (training only).

    Raises:
        ValueError: On a non-positive size, ``num_blocks < 1`` or ``tp_blocks < 0``.
    """

    def __init__(
        self,
        *,
        input_size: int,
        output_size: int,
        attention_heads: int,
        linear_units: int,
        num_blocks: int,
        tp_blocks: int = 0,
        kernel_size: int = 11,
        sanm_shift: int = 0,
        normalize_before: bool = True,
        dropout_rate: float = 0.0,
        attention_dropout_rate: float = 0.0,
    ) -> None:
        super().__init__()
        if (
            min(input_size, output_size, attention_heads, linear_units, num_blocks) < 1
            or tp_blocks < 0
        ):
            raise ValueError(
                f"invalid SenseVoice encoder sizes: input_size={input_size}, output_size={output_size}, "
                f"attention_heads={attention_heads}, linear_units={linear_units}, "
                f"num_blocks={num_blocks} (>= 1), tp_blocks={tp_blocks} (>= 0)"
            )
        if input_size % 2:
            raise ValueError(
                f"input_size must be even for the positional encoding, got {input_size}"
            )
        self.input_size = input_size
        self.output_size = output_size

        def block(in_dim: int) -> SANMEncoderLayer:
            return SANMEncoderLayer(
                input_dim=in_dim,
                dim=output_size,
                num_heads=attention_heads,
                ffn_dim=linear_units,
                kernel_size=kernel_size,
                sanm_shift=sanm_shift,
                normalize_before=normalize_before,
                dropout=dropout_rate,
                attention_dropout=attention_dropout_rate,
            )

        self.encoders0 = nn.ModuleList([block(input_size)])
        self.encoders = nn.ModuleList([block(output_size) for _ in range(num_blocks - 1)])
        self.after_norm = _LayerNorm(output_size)
        self.tp_encoders = nn.ModuleList([block(output_size) for _ in range(tp_blocks)])
        self.tp_norm = _LayerNorm(output_size)

    def forward(self, xs: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Encode a right-padded batch.

        Args:
            xs: ``[B, T, input_size]`` (query frames already prepended).
            lengths: ``[B]`` valid lengths (``<= T``).

        Returns:
            ``[B, T, output_size]``; rows past each length are padding (undefined values).
        """
        t = xs.shape[1]
        mask = torch.arange(t, device=xs.device)[None, :] < lengths.to(xs.device)[:, None]  # [B, T]
        x = xs * self.output_size**0.5
        x = x + sinusoidal_positions(t, self.input_size, device=xs.device, dtype=xs.dtype)
        for layer in (*self.encoders0, *self.encoders):
            x = layer(x, mask)
        x = self.after_norm(x)
        for layer in self.tp_encoders:
            x = layer(x, mask)
        return self.tp_norm(x)
