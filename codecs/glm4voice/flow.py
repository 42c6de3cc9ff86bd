"""Token -> mel flow model of the GLM-4-Voice decoder (CosyVoice-v1 ``MaskedDiffWithXvec``).

Pipeline for one utterance (prompt tokens first, then the new tokens)::

    ids -> input_embedding -> BlockConformerEncoder -> encoder_proj (D -> 80)
        -> InterpolateRegulator (nearest resize to the mel length, 4 x conv+GroupNorm+Mish,
           1x1 conv) = mu                                          [1, 80, T_mel]
    spks = spk_embed_affine_layer(normalize(x-vector))             [1, 80]
    cond = prompt mel in the first P frames, zeros elsewhere       [1, 80, T_mel]
    mel  = Euler-integrated conditional flow matching from noise z, with classifier-free
           guidance; the first P (prompt) frames are dropped.

The mel length follows GLM-4-Voice's fork exactly: ``T_mel = int(n_tokens / frame_rate *
22050 / 256)`` evaluated in float32 on the total (prompt + new) token count.

Attribute paths equal the checkpoint keys of ``flow.pt``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import FlowConfig
from .flow_encoder import BlockConformerEncoder
from .flow_estimator import FlowEstimator

__all__ = [
    "ConditionalFlowMatching",
    "InterpolateRegulator",
    "TokenToMelFlow",
    "build_flow",
    "mel_frame_count",
]


def mel_frame_count(
    n_tokens: int, frame_rate: float, sample_rate: int = 22050, hop_length: int = 256
) -> int:
    """Mel frames the flow produces for ``n_tokens`` tokens (prompt + new).

    Reproduces the original's float32 tensor arithmetic
    ``int(int32(n) / frame_rate * sample_rate / hop_length)``.

    Args:
        n_tokens: Token count (>= 0).
        frame_rate: Tokens per second.
        sample_rate: Output sample rate (22050 in the original, where it is a literal).
        hop_length: Samples per mel frame (256 in the original, where it is a literal).

    Returns:
        The frame count.

    Raises:
        ValueError: If ``n_tokens`` is negative.
    """
    if n_tokens < 0:
        raise ValueError(f"n_tokens must be >= 0, got {n_tokens}")
    n = torch.tensor([n_tokens], dtype=torch.int32)
    return int((n / frame_rate * sample_rate / hop_length).int().item())


class InterpolateRegulator(nn.Module):
    """Nearest-neighbour resize to the mel length followed by a small conv stack.

    Args:
        channels: Channels in and inside the stack.
        num_layers: Number of conv(k=3) + GroupNorm + Mish stages.
        out_channels: Channels of the final 1x1 conv.
        groups: GroupNorm groups.
    """

    def __init__(
        self, *, channels: int, num_layers: int, out_channels: int, groups: int = 1
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for _ in range(num_layers):
            layers += [
                nn.Conv1d(channels, channels, 3, 1, 1),
                nn.GroupNorm(groups, channels),
                nn.Mish(),
            ]
        layers.append(nn.Conv1d(channels, out_channels, 1, 1))
        self.model = nn.Sequential(*layers)

    def forward(self, h: torch.Tensor, length: int) -> torch.Tensor:
        """``[B, N, C]`` token features -> ``[B, out_channels, length]`` frame features."""
        x = F.interpolate(h.transpose(1, 2).contiguous(), size=length, mode="nearest")
        return self.model(x)


class ConditionalFlowMatching(nn.Module):
    """Euler ODE solver of conditional flow matching with classifier-free guidance.

    ``x_{k+1} = x_k + dt_k * ((1 + r) v(x_k, mu, t_k, spks, cond) - r v(x_k, 0, t_k, 0, 0))``
    on the grid ``t = 1 - cos(pi/2 * linspace(0, 1, n + 1))`` (cosine schedule).

    Args:
        estimator: The vector-field network (key ``decoder.estimator``).
        inference_cfg_rate: Guidance rate ``r`` (0 disables the unconditional pass).
        t_scheduler: ``"cosine"`` or ``"linear"``.

    Raises:
        ValueError: On an unknown scheduler.
    """

    def __init__(
        self, *, estimator: FlowEstimator, inference_cfg_rate: float, t_scheduler: str = "cosine"
    ) -> None:
        super().__init__()
        if t_scheduler not in ("cosine", "linear"):
            raise ValueError(f"t_scheduler must be 'cosine' or 'linear', got {t_scheduler!r}")
        self.estimator = estimator
        self.inference_cfg_rate = inference_cfg_rate
        self.t_scheduler = t_scheduler

    def time_grid(self, n_timesteps: int, device: torch.device | None = None) -> torch.Tensor:
        """``[n_timesteps + 1]`` float32 integration times from 0 to 1."""
        t = torch.linspace(0, 1, n_timesteps + 1, device=device)
        if self.t_scheduler == "cosine":
            t = 1 - torch.cos(t * 0.5 * torch.pi)
        return t

    def forward(
        self,
        z: torch.Tensor,
        mu: torch.Tensor,
        spks: torch.Tensor,
        cond: torch.Tensor,
        n_timesteps: int,
    ) -> torch.Tensor:
        """Integrate from noise ``z`` to a mel.

        Args:
            z: ``[1, M, T]`` initial noise.
            mu: ``[1, M, T]`` length-regulated encoder output.
            spks: ``[1, S]`` projected speaker embedding.
            cond: ``[1, M, T]`` prompt condition.
            n_timesteps: Euler steps (>= 1).

        Returns:
            ``[1, M, T]`` mel.

        Raises:
            ValueError: If ``n_timesteps < 1``.
        """
        if n_timesteps < 1:
            raise ValueError(f"n_timesteps must be >= 1, got {n_timesteps}")
        t_span = self.time_grid(n_timesteps, device=mu.device)
        rate = self.inference_cfg_rate
        if rate > 0:  # conditional and unconditional (zeroed mu/spks/cond) passes in one batch
            mu, spks, cond = (torch.cat([a, torch.zeros_like(a)]) for a in (mu, spks, cond))
        x = z
        t, dt = t_span[0], t_span[1] - t_span[0]
        for step in range(1, n_timesteps + 1):
            if rate > 0:
                both = self.estimator(torch.cat([x, x]), mu, t, spks, cond)
                v = (1.0 + rate) * both[:1] - rate * both[1:]
            else:
                v = self.estimator(x, mu, t, spks, cond)
            x = x + dt * v
            t = t + dt
            if step < n_timesteps:
                dt = t_span[step + 1] - t
        return x


class TokenToMelFlow(nn.Module):
    """Speech tokens (+ optional prompt) -> 80-bin mel at ``sample_rate / hop_length`` fps.

    Args:
        vocab_size: Number of token ids.
        input_size: Token embedding width.
        output_size: Mel bins ``M``.
        spk_embed_dim: Speaker x-vector width.
        input_frame_rate: Tokens per second.
        encoder: The token encoder.
        length_regulator: The regulator (``encoder_proj`` output -> mel rate).
        decoder: The flow-matching solver holding the estimator.
        sample_rate: Output sample rate used in the frame arithmetic.
        hop_length: Samples per frame used in the frame arithmetic.
    """

    def __init__(
        self,
        *,
        vocab_size: int,
        input_size: int,
        output_size: int,
        spk_embed_dim: int,
        input_frame_rate: float,
        encoder: BlockConformerEncoder,
        length_regulator: InterpolateRegulator,
        decoder: ConditionalFlowMatching,
        sample_rate: int = 22050,
        hop_length: int = 256,
    ) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.output_size = output_size
        self.spk_embed_dim = spk_embed_dim
        self.input_frame_rate = input_frame_rate
        self.sample_rate = sample_rate
        self.hop_length = hop_length
        self.input_embedding = nn.Embedding(vocab_size, input_size)
        self.spk_embed_affine_layer = nn.Linear(spk_embed_dim, output_size)
        self.encoder = encoder
        self.encoder_proj = nn.Linear(encoder.output_size, output_size)
        self.length_regulator = length_regulator
        self.decoder = decoder

    def num_frames(self, n_tokens: int) -> int:
        """Mel frames for ``n_tokens`` tokens in one call (see :func:`mel_frame_count`)."""
        return mel_frame_count(n_tokens, self.input_frame_rate, self.sample_rate, self.hop_length)

    def project_speaker(self, embedding: torch.Tensor) -> torch.Tensor:
        """L2-normalise an x-vector and project it: ``[1, spk_embed_dim]`` -> ``[1, M]``."""
        return self.spk_embed_affine_layer(F.normalize(embedding, dim=1))

    def encode(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids -> ``mu``, the length-regulated encoder output.

        Args:
            ids: ``[1, N]`` long, prompt tokens followed by new tokens.

        Returns:
            ``[1, M, num_frames(N)]``.
        """
        h = self.encoder(self.input_embedding(ids.clamp(min=0)))
        return self.length_regulator(self.encoder_proj(h), self.num_frames(ids.shape[1]))

    def forward(
        self,
        ids: torch.Tensor,
        z: torch.Tensor,
        *,
        prompt_mel: torch.Tensor | None = None,
        embedding: torch.Tensor | None = None,
        n_timesteps: int = 10,
    ) -> torch.Tensor:
        """Generate the mel of the tokens after the prompt.

        Args:
            ids: ``[1, N]`` long, prompt tokens followed by the new tokens.
            z: ``[1, M, num_frames(N)]`` initial noise.
            prompt_mel: ``[1, M, P]`` mel of the prompt tokens (``P < num_frames(N)``), or
                None for no prompt.
            embedding: ``[1, spk_embed_dim]`` speaker x-vector; None = zeros (GLM-4-Voice).
            n_timesteps: Euler steps.

        Returns:
            ``[1, M, num_frames(N) - P]``.

        Raises:
            ValueError: If ``z`` or ``prompt_mel`` do not fit the frame count.
        """
        frames = self.num_frames(ids.shape[1])
        if tuple(z.shape) != (1, self.output_size, frames):
            raise ValueError(
                f"z must have shape {(1, self.output_size, frames)}, got {tuple(z.shape)}"
            )
        p = 0 if prompt_mel is None else prompt_mel.shape[-1]
        if p >= frames:
            raise ValueError(
                f"prompt mel ({p} frames) must be shorter than the output ({frames} frames)"
            )
        if embedding is None:
            embedding = torch.zeros(1, self.spk_embed_dim, device=z.device, dtype=z.dtype)
        spks = self.project_speaker(embedding)
        mu = self.encode(ids)
        cond = torch.zeros_like(mu)
        if prompt_mel is not None:
            cond[:, :, :p] = prompt_mel
        mel = self.decoder(z, mu, spks, cond, n_timesteps)
        return mel[:, :, p:]


def build_flow(
    cfg: FlowConfig, *, sample_rate: int = 22050, hop_length: int = 256
) -> TokenToMelFlow:
    """Build the flow model from its config (weights left at their default init).

    Args:
        cfg: Sizes from ``config.yaml``.
        sample_rate: Output sample rate for the frame arithmetic.
        hop_length: Samples per mel frame for the frame arithmetic.

    Returns:
        The module, in eval mode.
    """
    enc = cfg.encoder
    encoder = BlockConformerEncoder(
        input_size=enc.input_size,
        output_size=enc.output_size,
        attention_heads=enc.attention_heads,
        linear_units=enc.linear_units,
        num_blocks=enc.num_blocks,
        block_size=enc.block_size,
        activation=enc.activation,
        key_bias=enc.key_bias,
    )
    est = cfg.estimator
    estimator = FlowEstimator(
        in_channels=est.in_channels,
        out_channels=est.out_channels,
        channels=est.channels,
        attention_head_dim=est.attention_head_dim,
        n_blocks=est.n_blocks,
        num_mid_blocks=est.num_mid_blocks,
        num_heads=est.num_heads,
        act_fn=est.act_fn,
    )
    flow = TokenToMelFlow(
        vocab_size=cfg.vocab_size,
        input_size=cfg.input_size,
        output_size=cfg.output_size,
        spk_embed_dim=cfg.spk_embed_dim,
        input_frame_rate=cfg.input_frame_rate,
        encoder=encoder,
        length_regulator=InterpolateRegulator(
            channels=cfg.regulator_channels,
            num_layers=cfg.regulator_layers,
            out_channels=cfg.regulator_out_channels,
            groups=cfg.regulator_groups,
        ),
        decoder=ConditionalFlowMatching(
            estimator=estimator,
            inference_cfg_rate=cfg.inference_cfg_rate,
            t_scheduler=cfg.t_scheduler,
        ),
        sample_rate=sample_rate,
        hop_length=hop_length,
    )
    return flow.eval()
