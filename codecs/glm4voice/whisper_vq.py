"""Whisper-VQ encoder of GLM-4-Voice's speech tokenizer: log-mel frames -> codebook ids.

The network is the front half of a Whisper encoder with three changes (GLM-4-Voice,
``speech_tokenizer/modeling_whisper.py``):

* both convolutions are causal (``kernel - 1`` zeros on the left, none on the right);
* attention is block-causal: full inside blocks of ``causal_block_size`` positions,
  causal across blocks, padded keys excluded;
* after layer ``pooling_position`` the sequence is average-pooled by ``pooling_kernel_size``,
  and after the last built layer (``quantize_position``) every frame is replaced by the id
  of its nearest codeword (squared L2 distance).

Module attribute paths equal the released checkpoint's key names (without the
``model.encoder.`` prefix), so ``load_state_dict`` takes the tensors as they are.
Configuration files are read elsewhere (:mod:`mctp.codecs.glm4voice.tokenizer`); this
module only receives sizes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["VQEncoderOutput", "WhisperVQEncoder", "block_causal_mask", "nearest_codeword"]

_CONV_KERNEL = 3
_CONV2_STRIDE = 2


@dataclass
class VQEncoderOutput:
    """Result of :meth:`WhisperVQEncoder.forward`.

    Attributes:
        ids: ``[B, N]`` long, nearest-codeword ids (also at padded positions).
        mask: ``[B, N]`` bool, True where the id belongs to real audio (keep these).
        features: ``[B, N, D]`` pooled hidden states right before quantisation.
    """

    ids: torch.Tensor
    mask: torch.Tensor
    features: torch.Tensor


def block_causal_mask(valid: torch.Tensor, block_size: int | None) -> torch.Tensor:
    """Boolean attention mask: full inside blocks, causal across them, padded keys excluded.

    Query ``i`` may attend key ``j`` iff ``valid[j]`` and (``j <= i`` or ``i`` and ``j`` lie in
    the same block of ``block_size`` positions). ``block_size=None`` means one block (full
    attention over the valid keys).

    Args:
        valid: ``[B, T]`` bool, True for positions holding real audio.
        block_size: Block length in positions, or None.

    Returns:
        ``[B, 1, T, T]`` bool, True where attention is allowed (SDPA's convention).

    Raises:
        ValueError: If ``valid`` is not 2-D or ``block_size`` is not positive.
    """
    if valid.ndim != 2:
        raise ValueError(f"valid must be [B, T], got shape {tuple(valid.shape)}")
    if block_size is not None and block_size < 1:
        raise ValueError(f"block_size must be positive or None, got {block_size}")
    length = valid.shape[1]
    pos = torch.arange(length, device=valid.device)
    if block_size is None:
        allowed = torch.ones(length, length, dtype=torch.bool, device=valid.device)
    else:
        block = pos // block_size
        allowed = (pos[None, :] <= pos[:, None]) | (block[:, None] == block[None, :])  # [Tq, Tk]
    return (allowed[None] & valid[:, None, :].bool())[:, None]  # [B, 1, Tq, Tk]


def nearest_codeword(hidden: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Index of the nearest codeword of every vector, in float32.

    Distances are ``||c||^2 + ||h||^2 - 2 h.c`` (the arithmetic of the original tokenizer);
    the smallest wins.

    Args:
        hidden: ``[..., D]`` vectors.
        codebook: ``[K, D]`` codewords.

    Returns:
        ``[...]`` long ids in ``[0, K)``.

    Raises:
        ValueError: If the last dimensions differ.
    """
    if hidden.shape[-1] != codebook.shape[-1]:
        raise ValueError(
            f"vector size {hidden.shape[-1]} does not match codeword size {codebook.shape[-1]}"
        )
    flat = hidden.reshape(-1, hidden.shape[-1]).float()  # [M, D]
    words = codebook.float()  # [K, D]
    norms = words.pow(2).sum(dim=1)[None, :] + flat.pow(2).sum(dim=1, keepdim=True)  # [M, K]
    dist = torch.addmm(norms, flat, words.t(), beta=1.0, alpha=-2.0)  # [M, K]
    return dist.argmin(dim=1).reshape(hidden.shape[:-1])


class VQSelfAttention(nn.Module):
    """Multi-head self-attention with Whisper's projections (``k_proj`` has no bias).

    Args:
        d_model: Model width ``D``.
        num_heads: Number of heads; must divide ``d_model``.

    Raises:
        ValueError: If ``num_heads`` does not divide ``d_model``.
    """

    def __init__(self, *, d_model: int, num_heads: int) -> None:
        super().__init__()
        if num_heads < 1 or d_model % num_heads:
            raise ValueError(f"num_heads ({num_heads}) must divide d_model ({d_model})")
        self.num_heads = num_heads
        self.q_proj = nn.Linear(d_model, d_model)
        self.k_proj = nn.Linear(d_model, d_model, bias=False)
        self.v_proj = nn.Linear(d_model, d_model)
        self.out_proj = nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Attend.

        Args:
            x: ``[B, T, D]``.
            mask: ``[B, 1, T, T]`` bool, True where attention is allowed.

        Returns:
            ``[B, T, D]``.
        """
        b, t, d = x.shape
        h = self.num_heads

        def heads(y: torch.Tensor) -> torch.Tensor:
            return y.view(b, t, h, d // h).transpose(1, 2)  # [B, H, T, d/H]

        out = F.scaled_dot_product_attention(
            heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x)), attn_mask=mask
        )
        return self.out_proj(out.transpose(1, 2).reshape(b, t, d))


class VQEncoderLayer(nn.Module):
    """Pre-LayerNorm Whisper encoder layer (exact GELU feed-forward).

    Args:
        d_model: Model width ``D``.
        num_heads: Attention heads.
        ffn_dim: Hidden size of the feed-forward block.
        layer_norm_eps: LayerNorm epsilon.
    """

    def __init__(
        self, *, d_model: int, num_heads: int, ffn_dim: int, layer_norm_eps: float
    ) -> None:
        super().__init__()
        self.self_attn = VQSelfAttention(d_model=d_model, num_heads=num_heads)
        self.self_attn_layer_norm = nn.LayerNorm(d_model, eps=layer_norm_eps)
        self.fc1 = nn.Linear(d_model, ffn_dim)
        self.fc2 = nn.Linear(ffn_dim, d_model)
        self.final_layer_norm = nn.LayerNorm(d_model, eps=layer_norm_eps)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Run the layer.

        Args:
            x: ``[B, T, D]``.
            mask: ``[B, 1, T, T]`` bool attention mask.

        Returns:
            ``[B, T, D]``.
        """
        x = x + self.self_attn(self.self_attn_layer_norm(x), mask)
        return x + self.fc2(F.gelu(self.fc1(self.final_layer_norm(x))))


class WhisperVQEncoder(nn.Module):
    """GLM-4-Voice's quantising Whisper encoder (only the layers up to the codebook).

    Mel frames are downsampled by 2 (conv2 stride) and then by ``pooling_kernel_size``, so
    one id covers ``2 * pooling_kernel_size`` mel frames (8 frames = 80 ms = 12.5 Hz with the
    released sizes).

    Args:
        num_mel_bins: Mel bins ``M`` of the input features (128 released).
        d_model: Model width ``D`` (1280 released).
        num_heads: Attention heads (20 released).
        ffn_dim: Feed-forward hidden size (5120 released).
        num_layers: Layers to build and run, i.e. the config's ``quantize_position`` (16).
        max_source_positions: Rows of ``embed_positions`` (1500 = 30 s at 50 Hz).
        codebook_size: Codewords ``K`` (``quantize_vocab_size``, 16384 released).
        pooling_kernel_size: Average-pooling factor (4 released; 1 = no pooling).
        pooling_position: Pool after this many layers (1-based, ``<= num_layers``); None
            means after the last one (the released setting: 16 of 16).
        causal_block_size: Attention block length in positions before pooling (200 = 4 s);
            divided by ``pooling_kernel_size`` for layers after pooling. None = full attention.
        layer_norm_eps: LayerNorm epsilon.

    Raises:
        ValueError: On non-positive sizes, ``num_heads`` not dividing ``d_model``, a pooling
            position outside ``[1, num_layers]``, or a block that pooling shrinks to zero.
    """

    def __init__(
        self,
        *,
        num_mel_bins: int,
        d_model: int,
        num_heads: int,
        ffn_dim: int,
        num_layers: int,
        max_source_positions: int,
        codebook_size: int,
        pooling_kernel_size: int = 4,
        pooling_position: int | None = None,
        causal_block_size: int | None = 200,
        layer_norm_eps: float = 1e-5,
    ) -> None:
        super().__init__()
        sizes = {
            "num_mel_bins": num_mel_bins,
            "d_model": d_model,
            "num_heads": num_heads,
            "ffn_dim": ffn_dim,
            "num_layers": num_layers,
            "max_source_positions": max_source_positions,
            "codebook_size": codebook_size,
            "pooling_kernel_size": pooling_kernel_size,
        }
        bad = {k: v for k, v in sizes.items() if not isinstance(v, int) or v < 1}
        if bad:
            raise ValueError(f"sizes must be positive integers, got {bad}")
        pooling_position = num_layers if pooling_position is None else pooling_position
        if not 1 <= pooling_position <= num_layers:
            raise ValueError(
                f"pooling_position ({pooling_position}) must lie in [1, num_layers={num_layers}]"
            )
        if causal_block_size is not None:
            if causal_block_size < 1:
                raise ValueError(
                    f"causal_block_size must be positive or None, got {causal_block_size}"
                )
            if pooling_position < num_layers and causal_block_size // pooling_kernel_size < 1:
                raise ValueError(
                    f"causal_block_size ({causal_block_size}) is smaller than pooling_kernel_size "
                    f"({pooling_kernel_size}); layers after pooling would get empty blocks"
                )
        self.num_mel_bins = num_mel_bins
        self.d_model = d_model
        self.max_source_positions = max_source_positions
        self.codebook_size = codebook_size
        self.pooling_kernel_size = pooling_kernel_size
        self.pooling_position = pooling_position
        self.causal_block_size = causal_block_size

        self.conv1 = nn.Conv1d(num_mel_bins, d_model, _CONV_KERNEL)
        self.conv2 = nn.Conv1d(d_model, d_model, _CONV_KERNEL, stride=_CONV2_STRIDE)
        self.embed_positions = nn.Embedding(max_source_positions, d_model)
        self.layers = nn.ModuleList(
            VQEncoderLayer(
                d_model=d_model, num_heads=num_heads, ffn_dim=ffn_dim, layer_norm_eps=layer_norm_eps
            )
            for _ in range(num_layers)
        )
        self.codebook = nn.Embedding(codebook_size, d_model)

    @property
    def frames_per_id(self) -> int:
        """Mel frames per output id (``conv2 stride * pooling_kernel_size``, 8 released)."""
        return _CONV2_STRIDE * self.pooling_kernel_size

    @property
    def max_frames(self) -> int:
        """Longest input in mel frames that the position table covers (3000 released)."""
        return self.max_source_positions * _CONV2_STRIDE

    def _causal_conv(self, conv: nn.Conv1d, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(conv(F.pad(x, (_CONV_KERNEL - 1, 0))))

    def forward(
        self, features: torch.Tensor, frame_mask: torch.Tensor | None = None
    ) -> VQEncoderOutput:
        """Tokenize a batch of log-mel spectrograms.

        Args:
            features: ``[B, M, F]`` log-mel features (``M = num_mel_bins``), cast to the
                module's dtype.
            frame_mask: ``[B, F]`` bool/int, nonzero for frames of real audio (padding is on
                the right). None means all frames are real.

        Returns:
            :class:`VQEncoderOutput` with ``N = ceil(ceil(F / 2) / pooling_kernel_size)``
            positions (``F / 8`` when ``F`` is a multiple of 8).

        Raises:
            ValueError: If the shapes are inconsistent, the input is longer than
                ``max_frames`` or a sequence has no real frame.
        """
        if features.ndim != 3 or features.shape[1] != self.num_mel_bins:
            raise ValueError(
                f"features must be [B, {self.num_mel_bins}, F], got {tuple(features.shape)}"
            )
        batch, _, frames = features.shape
        if frames > self.max_frames:
            raise ValueError(
                f"{frames} mel frames exceed the {self.max_frames} the position table covers "
                f"(max_source_positions={self.max_source_positions}); cut the audio into chunks"
            )
        if frame_mask is None:
            frame_mask = torch.ones(batch, frames, dtype=torch.bool, device=features.device)
        if tuple(frame_mask.shape) != (batch, frames):
            raise ValueError(
                f"frame_mask must be [{batch}, {frames}], got {tuple(frame_mask.shape)}"
            )
        frame_mask = frame_mask.bool()
        if not bool(frame_mask[:, 0].all()):
            raise ValueError("every sequence needs at least one real frame at position 0")

        x = features.to(self.conv1.weight.dtype)
        x = self._causal_conv(self.conv2, self._causal_conv(self.conv1, x))  # [B, D, T]
        x = x.transpose(1, 2)  # [B, T, D]
        x = x + self.embed_positions.weight[: x.shape[1]]
        valid = frame_mask[:, ::_CONV2_STRIDE]  # [B, T]
        block = self.causal_block_size
        mask = block_causal_mask(valid, block)
        for index, layer in enumerate(self.layers):
            x = layer(x, mask)
            if index + 1 == self.pooling_position:
                k = self.pooling_kernel_size
                pad = -x.shape[1] % k
                x = F.avg_pool1d(F.pad(x.transpose(1, 2), (0, pad)), k).transpose(1, 2)  # [B, N, D]
                valid = valid[:, ::k]
                block = None if block is None else block // k
                if index + 1 < len(self.layers):
                    mask = block_causal_mask(valid, block)
        ids = nearest_codeword(x, self.codebook.weight)  # [B, N]
        return VQEncoderOutput(ids=ids, mask=valid, features=x)
