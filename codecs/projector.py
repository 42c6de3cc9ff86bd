"""MLP projector from audio-encoder frames to LLM embeddings, and the placeholder scatter.

VITA-Audio-Plus projects every SenseVoiceSmall output frame (query frames included) with
``LayerNorm(D) -> Linear(D->H, no bias) -> GELU -> Linear(H->H, no bias)`` (no downsampling)
and writes the results over the ``<|context_of_audio|>`` placeholders that sit between
``<|begin_of_audio|>`` and ``<|end_of_audio|>`` in the prompt, at prefill only.

Checkpoint keys: ``pre_proj_layernorm.{weight,bias}``, ``mlp.0.weight``, ``mlp.2.weight``.
In the full VITA-Audio-Plus LLM checkpoint (``Qwen2MTPSenseVoiceForCausalLM``) the same
tensors carry the prefix ``model.audio_projection.`` (see :data:`VITA_AUDIO_PLUS_PREFIX`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from mctp.checkpoint import CheckpointError, load_strict, read_state_dict, strip_prefix

from ._loading import check_finite

__all__ = [
    "VITA_AUDIO_PLUS_PREFIX",
    "MLPProjector",
    "load_projector_state_dict",
    "scatter_audio_embeddings",
]

VITA_AUDIO_PLUS_PREFIX = "model.audio_projection."
"""Key prefix of the projector inside the VITA-Audio-Plus LLM checkpoint."""

_KEYS = ("pre_proj_layernorm.weight", "pre_proj_layernorm.bias", "mlp.0.weight", "mlp.2.weight")


class MLPProjector(nn.Module):
    """``LayerNorm(D, eps) -> Linear(D->H, bias=False) -> GELU (erf) -> Linear(H->H, bias=False)``.

    Args:
        input_dim: Encoder frame width D (512 for SenseVoiceSmall).
        hidden_size: LLM hidden size H.
        eps: LayerNorm epsilon.

    Raises:
        ValueError: If a size is not positive.
    """

    def __init__(self, input_dim: int, hidden_size: int, *, eps: float = 1e-5) -> None:
        super().__init__()
        if input_dim < 1 or hidden_size < 1:
            raise ValueError(
                f"sizes must be positive, got input_dim={input_dim}, hidden_size={hidden_size}"
            )
        self.input_dim = input_dim
        self.hidden_size = hidden_size
        self.pre_proj_layernorm = nn.LayerNorm(input_dim, eps=eps)
        self.mlp = nn.Sequential(
            nn.Linear(input_dim, hidden_size, bias=False),
            nn.GELU(),
            nn.Linear(hidden_size, hidden_size, bias=False),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[..., D]`` -> ``[..., H]`` (every frame is projected; no downsampling).

        Raises:
            ValueError: If the last dimension is not ``input_dim``.
        """
        if x.shape[-1] != self.input_dim:
            raise ValueError(
                f"expected frames of width {self.input_dim}, got shape {tuple(x.shape)}"
            )
        return self.mlp(self.pre_proj_layernorm(x))

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike[str],
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        eps: float = 1e-5,
    ) -> MLPProjector:
        """Build a projector whose sizes are read from a checkpoint, and load it strictly.

        Args:
            path: A ``.safetensors`` file holding the projector (bare keys or keys under
                :data:`VITA_AUDIO_PLUS_PREFIX`), or a folder with ``model.safetensors`` or a
                sharded ``model.safetensors.index.json`` (e.g. the VITA-Audio-Plus release);
                see :func:`load_projector_state_dict`.
            device: Target device.
            dtype: Target dtype.
            eps: LayerNorm epsilon (1e-5 in VITA-Audio-Plus; not stored in checkpoints).

        Raises:
            FileNotFoundError: If no checkpoint is found.
            ValueError: If a checkpoint file cannot be read.
            CheckpointError: If tensors are missing, unexpected or inconsistently shaped.
        """
        state = load_projector_state_dict(path)
        first = state.get("mlp.0.weight")
        if first is None or first.ndim != 2:
            raise CheckpointError(
                f"MLPProjector ({path}; sizes are read from a 2-D mlp.0.weight)",
                missing=[k for k in _KEYS if k not in state],
                unexpected=[k for k in state if k not in _KEYS],
            )
        hidden, dim = first.shape
        model = cls(int(dim), int(hidden), eps=eps)
        check_finite(state, f"MLPProjector ({path})")
        load_strict(model, state, what=f"MLPProjector ({path})")
        return model.to(device=device, dtype=dtype)

    def load(self, path: str | os.PathLike[str]) -> MLPProjector:
        """Load weights into this projector (sizes must match).

        Args:
            path: As in :meth:`from_pretrained`.

        Returns:
            ``self``.

        Raises:
            FileNotFoundError: If no checkpoint is found.
            ValueError: If a checkpoint file cannot be read.
            CheckpointError: On missing, unexpected or mis-shaped tensors.
        """
        state = load_projector_state_dict(path)
        check_finite(state, f"MLPProjector ({path})")
        load_strict(self, state, what=f"MLPProjector ({path})")
        return self


def load_projector_state_dict(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Read the projector tensors from a checkpoint file or folder, without the LLM prefix.

    If any key starts with :data:`VITA_AUDIO_PLUS_PREFIX`, only those keys are read (the rest
    of an LLM checkpoint is skipped, shards without them are not opened) and the prefix is
    removed; otherwise every key is returned as is.

    Args:
        path: Anything :func:`mctp.checkpoint.read_state_dict` reads: a ``.safetensors`` (or
            ``torch.load``) file, or a folder with ``model.safetensors``, a sharded
            ``model.safetensors.index.json`` or a single ``*.safetensors`` file.

    Returns:
        Key -> tensor (CPU).

    Raises:
        FileNotFoundError: If no checkpoint is found, or a sharded checkpoint holds no tensor
            under the prefix.
        ValueError: If a file cannot be read.
        CheckpointError: If a ``torch.load`` file does not hold a state dict of tensors.
    """
    prefixed = read_state_dict(path, keep=lambda key: key.startswith(VITA_AUDIO_PLUS_PREFIX))
    if prefixed:
        return strip_prefix(prefixed, (VITA_AUDIO_PLUS_PREFIX,))
    indexes = sorted(Path(path).glob("*.index.json"))  # none when ``path`` is a file
    if indexes:  # a sharded LLM checkpoint without the projector: fail before reading it
        raise FileNotFoundError(f"{indexes[0]} lists no tensor under {VITA_AUDIO_PLUS_PREFIX!r}")
    return read_state_dict(path)  # a bare projector checkpoint


def scatter_audio_embeddings(
    inputs_embeds: torch.Tensor,
    input_ids: torch.Tensor,
    audio_frames: Sequence[torch.Tensor],
    placeholder_id: int,
) -> torch.Tensor:
    """Write projected audio frames over the placeholder tokens' embeddings.

    Placeholders are filled in row-major order (sample 0 left to right, then sample 1, ...)
    with the rows of ``torch.cat(audio_frames)``: list the audios in the order they appear in
    the batch. The result is a new tensor (``inputs_embeds`` is not modified) and is
    differentiable with respect to both ``inputs_embeds`` and the frames.

    Args:
        inputs_embeds: ``[B, L, H]`` token embeddings.
        input_ids: ``[B, L]`` token ids.
        audio_frames: ``[F_i, H]`` projected frames, one tensor per audio.
        placeholder_id: Id of the placeholder token (``<|context_of_audio|>`` in
            VITA-Audio-Plus; ``F_i`` of them per audio, including the 4 query frames).

    Returns:
        ``[B, L, H]`` embeddings with the placeholder rows replaced (frames cast to the
        dtype/device of ``inputs_embeds``).

    Raises:
        ValueError: If the shapes disagree, a frame tensor is not ``[F, H]``, or the number of
            placeholders differs from the total number of frames.
    """
    if inputs_embeds.ndim != 3 or input_ids.shape != inputs_embeds.shape[:2]:
        raise ValueError(
            f"expected inputs_embeds [B, L, H] and input_ids [B, L], got {tuple(inputs_embeds.shape)} "
            f"and {tuple(input_ids.shape)}"
        )
    hidden = inputs_embeds.shape[-1]
    for i, f in enumerate(audio_frames):
        if f.ndim != 2 or f.shape[1] != hidden:
            raise ValueError(
                f"audio_frames[{i}] must be [F, {hidden}] (hidden size of inputs_embeds), got {tuple(f.shape)}"
            )
    mask = input_ids == placeholder_id  # [B, L]
    num_slots = int(mask.sum())
    num_frames = sum(int(f.shape[0]) for f in audio_frames)
    if num_slots != num_frames:
        raise ValueError(
            f"input_ids hold {num_slots} placeholders (id {placeholder_id}) but audio_frames hold "
            f"{num_frames} frames in total"
        )
    if num_frames == 0:
        return inputs_embeds.clone()
    frames = torch.cat(
        [f.to(device=inputs_embeds.device, dtype=inputs_embeds.dtype) for f in audio_frames]
    )
    out = inputs_embeds.clone()
    out[mask] = frames  # index_put on a fresh tensor: autograd flows to both inputs
    return out
