"""1-D U-Net transformer that estimates the flow-matching vector field.

Layout of CosyVoice-v1's ``ConditionalDecoder`` (built from Matcha-TTS / diffusers blocks):
a sinusoidal time embedding and MLP, a down path of (ResNet block, transformer blocks,
stride-2 conv), middle stages, an up path with skip connections and transposed convs, a
final conv block and a 1x1 projection. Inputs ``x``, ``mu``, the speaker vector and the
condition are stacked on the channel axis.

This port decodes one unpadded utterance at a time (CFG doubles the batch), so the
original's length masks are all ones and are left out: multiplying by them is exact.

Attribute paths equal the checkpoint keys under ``decoder.estimator.`` in ``flow.pt``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "ConvBlock",
    "FlowEstimator",
    "ResnetBlock",
    "TimeMLP",
    "TransformerBlock",
    "sinusoidal_time_embedding",
]


def sinusoidal_time_embedding(t: torch.Tensor, dim: int, scale: float = 1000.0) -> torch.Tensor:
    """Time embedding ``[sin(s t w_k), cos(s t w_k)]`` with ``w_k = 10000^(-k/(dim/2-1))``.

    Args:
        t: ``[]`` or ``[B]`` flow times in ``[0, 1]``.
        dim: Embedding width (even, >= 4).
        scale: Multiplier of ``t``.

    Returns:
        ``[B, dim]`` (``B = 1`` for a scalar ``t``).
    """
    t = t.reshape(-1).float()
    half = dim // 2
    freq = torch.exp(torch.arange(half, device=t.device).float() * -(math.log(10000) / (half - 1)))
    arg = scale * t[:, None] * freq[None]
    return torch.cat((arg.sin(), arg.cos()), dim=-1)


class TimeMLP(nn.Module):
    """``linear_2(silu(linear_1(emb)))``.

    Args:
        in_channels: Width of the sinusoidal embedding.
        dim: Output width.
    """

    def __init__(self, *, in_channels: int, dim: int) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(in_channels, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        """``[B, in_channels]`` -> ``[B, dim]``."""
        return self.linear_2(F.silu(self.linear_1(emb)))


class ConvBlock(nn.Module):
    """Conv1d(k=3) + GroupNorm(8) + Mish (keys ``block.0``, ``block.1``).

    Args:
        dim: Input channels.
        dim_out: Output channels (a multiple of 8).
    """

    def __init__(self, *, dim: int, dim_out: int) -> None:
        super().__init__()
        self.block = nn.Sequential(
            nn.Conv1d(dim, dim_out, 3, padding=1), nn.GroupNorm(8, dim_out), nn.Mish()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, dim, T]`` -> ``[B, dim_out, T]``."""
        return self.block(x)


class ResnetBlock(nn.Module):
    """Two conv blocks with the time embedding added between them, plus a 1x1 residual.

    Args:
        dim: Input channels.
        dim_out: Output channels.
        time_dim: Width of the time embedding.
    """

    def __init__(self, *, dim: int, dim_out: int, time_dim: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Mish(), nn.Linear(time_dim, dim_out))
        self.block1 = ConvBlock(dim=dim, dim_out=dim_out)
        self.block2 = ConvBlock(dim=dim_out, dim_out=dim_out)
        self.res_conv = nn.Conv1d(dim, dim_out, 1)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        """``[B, dim, T]``, ``[1 or B, time_dim]`` -> ``[B, dim_out, T]``."""
        h = self.block1(x) + self.mlp(temb)[:, :, None]
        return self.block2(h) + self.res_conv(x)


class _GeluProjection(nn.Module):
    def __init__(self, dim: int, hidden: int, approximate: str) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, hidden)
        self.approximate = approximate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.proj(x), approximate=self.approximate)


class _FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int, approximate: str) -> None:
        super().__init__()
        # Index 1 of the original is a parameterless dropout (off at inference).
        self.net = nn.ModuleList(
            [
                _GeluProjection(dim, dim * mult, approximate),
                nn.Identity(),
                nn.Linear(dim * mult, dim),
            ]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.net:
            x = layer(x)
        return x


class _SelfAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, head_dim: int) -> None:
        super().__init__()
        inner = num_heads * head_dim
        self.num_heads = num_heads
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_k = nn.Linear(dim, inner, bias=False)
        self.to_v = nn.Linear(dim, inner, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(inner, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = (
            proj(x).view(b, t, self.num_heads, -1).transpose(1, 2)
            for proj in (self.to_q, self.to_k, self.to_v)
        )
        out = F.scaled_dot_product_attention(q, k, v)  # [B, H, T, head_dim]
        return self.to_out[0](out.transpose(1, 2).reshape(b, t, -1))


class TransformerBlock(nn.Module):
    """Pre-norm self-attention + GELU feed-forward (x4), channels-last.

    Args:
        dim: Channels.
        num_heads: Attention heads.
        head_dim: Width of one head (``num_heads * head_dim`` need not equal ``dim``).
        act_fn: ``"gelu"`` or ``"gelu-approximate"``.

    Raises:
        ValueError: On another activation.
    """

    def __init__(self, *, dim: int, num_heads: int, head_dim: int, act_fn: str = "gelu") -> None:
        super().__init__()
        approximate = {"gelu": "none", "gelu-approximate": "tanh"}.get(act_fn)
        if approximate is None:
            raise ValueError(f"act_fn must be 'gelu' or 'gelu-approximate', got {act_fn!r}")
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = _SelfAttention(dim, num_heads, head_dim)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = _FeedForward(dim, 4, approximate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, T, dim]`` -> ``[B, T, dim]``."""
        x = x + self.attn1(self.norm1(x))
        return x + self.ff(self.norm3(x))


class _Downsample(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.conv = nn.Conv1d(dim, dim, 3, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class _Upsample(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.conv = nn.ConvTranspose1d(dim, dim, 4, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def _stage(
    resnet: nn.Module, dim: int, n_blocks: int, heads: int, head_dim: int, act: str
) -> list[nn.Module]:
    blocks = nn.ModuleList(
        TransformerBlock(dim=dim, num_heads=heads, head_dim=head_dim, act_fn=act)
        for _ in range(n_blocks)
    )
    return [resnet, blocks]


class FlowEstimator(nn.Module):
    """The U-Net vector-field estimator ``v(x, mu, t, spks, cond)``.

    Args:
        in_channels: Stacked input channels (``x``, ``mu``, speaker, condition).
        out_channels: Output channels (mel bins).
        channels: Widths of the down path, each a multiple of 8.
        attention_head_dim: Width of one attention head.
        n_blocks: Transformer blocks per stage.
        num_mid_blocks: Middle stages.
        num_heads: Attention heads.
        act_fn: Feed-forward activation of the transformer blocks.

    Raises:
        ValueError: If ``channels`` is empty or not made of multiples of 8.
    """

    def __init__(
        self,
        *,
        in_channels: int,
        out_channels: int,
        channels: tuple[int, ...],
        attention_head_dim: int,
        n_blocks: int,
        num_mid_blocks: int,
        num_heads: int,
        act_fn: str = "gelu",
    ) -> None:
        super().__init__()
        if not channels or any(c % 8 for c in channels):
            raise ValueError(f"channels must be a non-empty list of multiples of 8, got {channels}")
        self.in_channels = in_channels
        time_dim = channels[0] * 4
        self.time_mlp = TimeMLP(in_channels=in_channels, dim=time_dim)
        stage_args = (n_blocks, num_heads, attention_head_dim, act_fn)

        self.down_blocks = nn.ModuleList()
        prev = in_channels
        for i, ch in enumerate(channels):
            last = i == len(channels) - 1
            resnet = ResnetBlock(dim=prev, dim_out=ch, time_dim=time_dim)
            down = nn.Conv1d(ch, ch, 3, padding=1) if last else _Downsample(ch)
            self.down_blocks.append(nn.ModuleList([*_stage(resnet, ch, *stage_args), down]))
            prev = ch

        self.mid_blocks = nn.ModuleList(
            nn.ModuleList(
                _stage(ResnetBlock(dim=prev, dim_out=prev, time_dim=time_dim), prev, *stage_args)
            )
            for _ in range(num_mid_blocks)
        )

        self.up_blocks = nn.ModuleList()
        widths = (*channels[::-1], channels[0])
        for i in range(len(channels)):
            last = i == len(channels) - 1
            out = widths[i + 1]
            resnet = ResnetBlock(dim=2 * widths[i], dim_out=out, time_dim=time_dim)
            up = nn.Conv1d(out, out, 3, padding=1) if last else _Upsample(out)
            self.up_blocks.append(nn.ModuleList([*_stage(resnet, out, *stage_args), up]))

        self.final_block = ConvBlock(dim=channels[0], dim_out=channels[0])
        self.final_proj = nn.Conv1d(channels[0], out_channels, 1)

    @staticmethod
    def _transformers(blocks: nn.ModuleList, x: torch.Tensor) -> torch.Tensor:
        x = x.transpose(1, 2)  # [B, T, C]
        for block in blocks:
            x = block(x)
        return x.transpose(1, 2)

    def forward(
        self,
        x: torch.Tensor,
        mu: torch.Tensor,
        t: torch.Tensor,
        spks: torch.Tensor,
        cond: torch.Tensor,
    ) -> torch.Tensor:
        """Estimate the vector field.

        Args:
            x: ``[B, M, T]`` current sample.
            mu: ``[B, M, T]`` encoder output (length-regulated).
            t: ``[]`` flow time.
            spks: ``[B, S]`` projected speaker embedding.
            cond: ``[B, M, T]`` prompt mel (zeros outside the prompt).

        Returns:
            ``[B, M, T]``.
        """
        temb = self.time_mlp(sinusoidal_time_embedding(t, self.in_channels).to(x.dtype))
        spk = spks[:, :, None].expand(-1, -1, x.shape[-1])
        h = torch.cat([x, mu, spk, cond], dim=1)

        skips = []
        for resnet, blocks, down in self.down_blocks:
            h = self._transformers(blocks, resnet(h, temb))
            skips.append(h)
            h = down(h)
        for resnet, blocks in self.mid_blocks:
            h = self._transformers(blocks, resnet(h, temb))
        for resnet, blocks, up in self.up_blocks:
            skip = skips.pop()
            h = torch.cat([h[:, :, : skip.shape[-1]], skip], dim=1)
            h = up(self._transformers(blocks, resnet(h, temb)))
        return self.final_proj(self.final_block(h))
