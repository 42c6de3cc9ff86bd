"""HiFT vocoder of the GLM-4-Voice decoder (CosyVoice ``HiFTGenerator``): mel -> 22,050 Hz.

Neural-source-filter + iSTFTNet: a conv F0 predictor gives F0 per mel frame; a harmonic
source (fundamental + ``nb_harmonics`` overtones, additive noise) is built at the output
rate and analysed by an STFT; the mel goes through ``conv_pre`` and transposed-conv
upsampling stages, each fused with the downsampled source spectrum and averaged
multi-receptive-field resblocks (Snake activations); ``conv_post`` predicts log-magnitude
and phase of an ``n_fft``/``hop_len`` iSTFT; the waveform is clamped to ``audio_limit``.

Weight norm: the checkpoint stores the old ``torch.nn.utils.weight_norm`` pairs
``weight_g`` ``[out, 1, 1]`` / ``weight_v`` (norm over every dim but 0). :class:`WNConv1d`
keeps exactly these two parameters, so strict loading checks the original key names, and
folds ``weight = g * v / ||v||`` into a non-persistent buffer whenever a state dict is loaded
(and on :meth:`WNConv1d.refresh_weight`), not on every forward.

Randomness (see the golden README): ``SineGen`` draws the harmonic phases
``U(-pi, pi)`` of shape ``[B, H+1, 1]`` (fundamental's phase then set to 0), then the additive
noise ``randn [B, H+1, L]``; the source module draws ``randn [B, L, 1]`` that the output does
not use. :class:`HarmonicSource` draws the same shapes in the same order from the generator it
is given (None = PyTorch's global generator), or uses zeros when ``noise=False``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import HiFTConfig

__all__ = [
    "ConvF0Predictor",
    "HarmonicSource",
    "HiFTVocoder",
    "ResBlock",
    "Snake",
    "WNConv1d",
    "build_hift",
]


class WNConv1d(nn.Module):
    """Weight-normalised (transposed) 1-D convolution with the original parameter names.

    Args:
        in_channels: Input channels.
        out_channels: Output channels.
        kernel_size: Kernel width.
        stride: Stride.
        padding: Padding.
        dilation: Dilation (plain convolution only).
        transposed: Transposed convolution (weight ``[in, out, k]``) instead of a plain one.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        *,
        stride: int = 1,
        padding: int = 0,
        dilation: int = 1,
        transposed: bool = False,
    ) -> None:
        super().__init__()
        shape = (
            (in_channels, out_channels, kernel_size)
            if transposed
            else (out_channels, in_channels, kernel_size)
        )
        self.weight_g = nn.Parameter(torch.ones(shape[0], 1, 1))
        self.weight_v = nn.Parameter(torch.empty(shape).normal_(0.0, 0.01))
        self.bias = nn.Parameter(torch.zeros(out_channels))
        self.register_buffer("weight", torch.empty(shape), persistent=False)
        self.stride, self.padding, self.dilation, self.transposed = (
            stride,
            padding,
            dilation,
            transposed,
        )
        self.register_load_state_dict_post_hook(WNConv1d._after_load)
        self.refresh_weight()

    @staticmethod
    def _after_load(module: nn.Module, _incompatible: object) -> None:
        assert isinstance(module, WNConv1d)
        module.refresh_weight()

    @torch.no_grad()
    def refresh_weight(self) -> None:
        """Fold ``weight = weight_g * weight_v / ||weight_v||`` (norm over dims 1, 2)."""
        v = self.weight_v.float()
        w = v * (self.weight_g.float() / v.norm(dim=(1, 2), keepdim=True))
        self.weight.copy_(w.to(self.weight.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, C_in, T]`` -> ``[B, C_out, T']``."""
        if self.transposed:
            return F.conv_transpose1d(x, self.weight, self.bias, self.stride, self.padding)
        return F.conv1d(x, self.weight, self.bias, self.stride, self.padding, self.dilation)


class Snake(nn.Module):
    """``x + sin(alpha x)^2 / (alpha + 1e-9)`` with a per-channel ``alpha`` (linear scale).

    Args:
        channels: Number of channels.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.alpha = nn.Parameter(torch.ones(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, C, T]`` -> ``[B, C, T]``."""
        alpha = self.alpha[None, :, None]
        return x + (1.0 / (alpha + 1e-9)) * torch.sin(x * alpha).pow(2)


class ResBlock(nn.Module):
    """HiFi-GAN residual block: per dilation ``x += conv2(snake(conv1_d(snake(x))))``.

    Args:
        channels: Channels.
        kernel_size: Kernel width (odd).
        dilations: One dilated conv pair per entry.
    """

    def __init__(self, *, channels: int, kernel_size: int, dilations: tuple[int, ...]) -> None:
        super().__init__()
        self.convs1 = nn.ModuleList(
            WNConv1d(
                channels, channels, kernel_size, dilation=d, padding=(kernel_size * d - d) // 2
            )
            for d in dilations
        )
        self.convs2 = nn.ModuleList(
            WNConv1d(channels, channels, kernel_size, padding=(kernel_size - 1) // 2)
            for _ in dilations
        )
        self.activations1 = nn.ModuleList(Snake(channels) for _ in dilations)
        self.activations2 = nn.ModuleList(Snake(channels) for _ in dilations)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, C, T]`` -> ``[B, C, T]``."""
        for c1, c2, a1, a2 in zip(self.convs1, self.convs2, self.activations1, self.activations2):
            x = x + c2(a2(c1(a1(x))))
        return x


class ConvF0Predictor(nn.Module):
    """F0 (Hz) per mel frame: 5 x (weight-normed conv k=3 + ELU), linear, ``abs``.

    Args:
        in_channels: Mel bins.
        cond_channels: Conv width.
    """

    def __init__(self, *, in_channels: int, cond_channels: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for i in range(5):
            layers += [
                WNConv1d(in_channels if i == 0 else cond_channels, cond_channels, 3, padding=1),
                nn.ELU(),
            ]
        self.condnet = nn.Sequential(*layers)
        self.classifier = nn.Linear(cond_channels, 1)

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        """``[B, M, T]`` -> ``[B, T]`` non-negative F0."""
        return self.classifier(self.condnet(mel).transpose(1, 2)).squeeze(-1).abs()


class HarmonicSource(nn.Module):
    """NSF source: ``tanh(l_linear(sines))`` with sines of F0 x (1..H+1) (key ``m_source``).

    Args:
        sampling_rate: Sample rate (Hz).
        nb_harmonics: Overtones above the fundamental.
        sine_amp: Sine amplitude (``nsf_alpha``).
        noise_std: Noise std in voiced samples (unvoiced: ``sine_amp / 3``).
        voiced_threshold: F0 above which a sample is voiced.
    """

    def __init__(
        self,
        *,
        sampling_rate: int,
        nb_harmonics: int,
        sine_amp: float,
        noise_std: float,
        voiced_threshold: float,
    ) -> None:
        super().__init__()
        self.sampling_rate = sampling_rate
        self.n_sines = nb_harmonics + 1
        self.sine_amp = sine_amp
        self.noise_std = noise_std
        self.voiced_threshold = voiced_threshold
        self.l_linear = nn.Linear(self.n_sines, 1)

    def forward(
        self, f0: torch.Tensor, *, noise: bool = True, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Build the excitation.

        Args:
            f0: ``[B, 1, L]`` F0 in Hz at the output rate.
            noise: Draw the random phases and noise; False uses zeros (deterministic).
            generator: Generator to draw from (its device is used for the draws, then moved);
                None = PyTorch's global generator for ``f0``'s device.

        Returns:
            ``[B, 1, L]`` float32 source.
        """
        f0 = f0.float()
        b, _, length = f0.shape
        k = torch.arange(1, self.n_sines + 1, device=f0.device, dtype=torch.float32)[None, :, None]
        step = f0 * k / self.sampling_rate  # [B, H+1, L] cycles per sample
        theta = 2 * math.pi * (torch.cumsum(step, dim=-1) % 1)
        if noise:
            draw_dev = generator.device if generator is not None else f0.device
            u = torch.rand((b, self.n_sines, 1), generator=generator, device=draw_dev)
            low, high = torch.tensor(-math.pi), torch.tensor(math.pi)
            phase = (low.to(draw_dev) + u * (high - low).to(draw_dev)).to(f0.device)
            phase[:, 0, :] = 0
            normal = torch.randn(
                (b, self.n_sines, length), generator=generator, device=draw_dev
            ).to(f0.device)
            # The original also draws randn [B, L, 1] here; it does not reach the output.
            torch.randn((b, length, 1), generator=generator, device=draw_dev)
        else:
            phase = torch.zeros((b, self.n_sines, 1), device=f0.device)
            normal = None
        sines = self.sine_amp * torch.sin(theta + phase)
        uv = (f0 > self.voiced_threshold).float()
        sines = sines * uv
        if normal is not None:
            sines = sines + (uv * self.noise_std + (1 - uv) * self.sine_amp / 3) * normal
        merged = torch.tanh(self.l_linear(sines.transpose(1, 2).to(self.l_linear.weight.dtype)))
        return merged.transpose(1, 2).float()


class HiFTVocoder(nn.Module):
    """Mel ``[B, M, T]`` -> waveform ``[B, T * hop_length]`` (CosyVoice ``HiFTGenerator``).

    Args:
        in_channels: Mel bins.
        base_channels: Width after ``conv_pre``.
        upsample_rates: Transposed-conv strides.
        upsample_kernel_sizes: Transposed-conv kernels.
        resblock_kernel_sizes: Resblock kernels per stage.
        resblock_dilation_sizes: Resblock dilations per stage.
        source_resblock_kernel_sizes: Source resblock kernel per stage.
        source_resblock_dilation_sizes: Source resblock dilations per stage.
        n_fft: iSTFT size.
        hop_len: iSTFT hop.
        lrelu_slope: Leaky-ReLU slope inside the stages.
        audio_limit: Output clamp.
        m_source: The harmonic source.
        f0_predictor: The F0 predictor.

    Raises:
        ValueError: If the per-stage lists differ in length.
    """

    def __init__(
        self,
        *,
        in_channels: int,
        base_channels: int,
        upsample_rates: tuple[int, ...],
        upsample_kernel_sizes: tuple[int, ...],
        resblock_kernel_sizes: tuple[int, ...],
        resblock_dilation_sizes: tuple[tuple[int, ...], ...],
        source_resblock_kernel_sizes: tuple[int, ...],
        source_resblock_dilation_sizes: tuple[tuple[int, ...], ...],
        n_fft: int,
        hop_len: int,
        lrelu_slope: float,
        audio_limit: float,
        m_source: HarmonicSource,
        f0_predictor: ConvF0Predictor,
    ) -> None:
        super().__init__()
        stages = len(upsample_rates)
        if (
            not (len(upsample_kernel_sizes) == len(source_resblock_kernel_sizes) == stages)
            or len(source_resblock_dilation_sizes) != stages
        ):
            raise ValueError("upsample rates/kernels and source resblocks need one entry per stage")
        if len(resblock_kernel_sizes) != len(resblock_dilation_sizes):
            raise ValueError("resblock_kernel_sizes and resblock_dilation_sizes differ in length")
        self.n_fft, self.hop_len = n_fft, hop_len
        self.hop_length = math.prod(upsample_rates) * hop_len
        self.lrelu_slope, self.audio_limit = lrelu_slope, audio_limit
        self.num_kernels = len(resblock_kernel_sizes)
        self.m_source = m_source
        self.f0_predictor = f0_predictor
        self.conv_pre = WNConv1d(in_channels, base_channels, 7, padding=3)
        self.ups = nn.ModuleList(
            WNConv1d(
                base_channels >> i,
                base_channels >> (i + 1),
                k,
                stride=u,
                padding=(k - u) // 2,
                transposed=True,
            )
            for i, (u, k) in enumerate(zip(upsample_rates, upsample_kernel_sizes))
        )
        # Source spectrum (n_fft + 2 channels) is brought to each stage's rate.
        down = [math.prod(upsample_rates[i + 1 :]) for i in range(stages)]
        self.source_downs = nn.ModuleList()
        self.source_resblocks = nn.ModuleList()
        for i, (u, k, d) in enumerate(
            zip(down, source_resblock_kernel_sizes, source_resblock_dilation_sizes)
        ):
            ch = base_channels >> (i + 1)
            if u == 1:
                self.source_downs.append(nn.Conv1d(n_fft + 2, ch, 1, 1))
            else:
                self.source_downs.append(nn.Conv1d(n_fft + 2, ch, u * 2, u, padding=u // 2))
            self.source_resblocks.append(ResBlock(channels=ch, kernel_size=k, dilations=d))
        self.resblocks = nn.ModuleList(
            ResBlock(channels=base_channels >> (i + 1), kernel_size=k, dilations=d)
            for i in range(stages)
            for k, d in zip(resblock_kernel_sizes, resblock_dilation_sizes)
        )
        self.conv_post = WNConv1d(base_channels >> stages, n_fft + 2, 7, padding=3)

    def source(
        self, mel: torch.Tensor, *, noise: bool = True, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """F0 and harmonic source of a mel.

        Args:
            mel: ``[B, M, T]``.
            noise: See :meth:`HarmonicSource.forward`.
            generator: See :meth:`HarmonicSource.forward`.

        Returns:
            ``(f0 [B, T], source [B, 1, T * hop_length])``.
        """
        f0 = self.f0_predictor(mel)
        f0_up = f0.float().repeat_interleave(self.hop_length, dim=-1)[:, None]  # nearest upsampling
        return f0, self.m_source(f0_up, noise=noise, generator=generator)

    def forward(
        self,
        mel: torch.Tensor,
        *,
        cache_source: torch.Tensor | None = None,
        noise: bool = True,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Vocode.

        Args:
            mel: ``[B, M, T]``.
            cache_source: ``[B, 1, C]`` source samples that overwrite the first ``C`` samples
                of the new source (streaming continuity), or None.
            noise: Random source draws (True) or zeros (False).
            generator: Generator for the draws (None = PyTorch's global generator).

        Returns:
            ``(wav [B, T * hop_length] float32, source [B, 1, T * hop_length] float32)``.

        Raises:
            ValueError: If ``cache_source`` is longer than the new source.
        """
        _, s = self.source(mel, noise=noise, generator=generator)
        if cache_source is not None and cache_source.shape[-1] > 0:
            if cache_source.shape[-1] > s.shape[-1]:
                raise ValueError(
                    f"cache_source ({cache_source.shape[-1]} samples) is longer than the source "
                    f"({s.shape[-1]} samples)"
                )
            s[:, :, : cache_source.shape[-1]] = cache_source
        window = torch.hann_window(self.n_fft, periodic=True, device=s.device)
        spec = torch.stft(
            s[:, 0], self.n_fft, self.hop_len, self.n_fft, window=window, return_complex=True
        )
        s_stft = torch.cat([spec.real, spec.imag], dim=1).to(mel.dtype)  # [B, n_fft + 2, frames]

        x = self.conv_pre(mel)
        for i, up in enumerate(self.ups):
            x = up(F.leaky_relu(x, self.lrelu_slope))
            if i == len(self.ups) - 1:
                x = F.pad(x, (1, 0), mode="reflect")
            x = x + self.source_resblocks[i](self.source_downs[i](s_stft))
            blocks = self.resblocks[i * self.num_kernels : (i + 1) * self.num_kernels]
            acc = blocks[0](x)
            for block in blocks[1:]:
                acc = acc + block(x)
            x = acc / self.num_kernels
        x = self.conv_post(F.leaky_relu(x)).float()
        bins = self.n_fft // 2 + 1
        magnitude = torch.exp(x[:, :bins]).clamp(max=1e2)
        phase = torch.sin(x[:, bins:])
        spec = torch.complex(magnitude * torch.cos(phase), magnitude * torch.sin(phase))
        wav = torch.istft(spec, self.n_fft, self.hop_len, self.n_fft, window=window)
        return wav.clamp(-self.audio_limit, self.audio_limit), s


def build_hift(cfg: HiFTConfig) -> HiFTVocoder:
    """Build the vocoder from its config (weights left at their default init).

    Args:
        cfg: Sizes from ``config.yaml``.

    Returns:
        The module, in eval mode.
    """
    vocoder = HiFTVocoder(
        in_channels=cfg.in_channels,
        base_channels=cfg.base_channels,
        upsample_rates=cfg.upsample_rates,
        upsample_kernel_sizes=cfg.upsample_kernel_sizes,
        resblock_kernel_sizes=cfg.resblock_kernel_sizes,
        resblock_dilation_sizes=cfg.resblock_dilation_sizes,
        source_resblock_kernel_sizes=cfg.source_resblock_kernel_sizes,
        source_resblock_dilation_sizes=cfg.source_resblock_dilation_sizes,
        n_fft=cfg.n_fft,
        hop_len=cfg.hop_len,
        lrelu_slope=cfg.lrelu_slope,
        audio_limit=cfg.audio_limit,
        m_source=HarmonicSource(
            sampling_rate=cfg.sampling_rate,
            nb_harmonics=cfg.nb_harmonics,
            sine_amp=cfg.nsf_alpha,
            noise_std=cfg.nsf_sigma,
            voiced_threshold=cfg.nsf_voiced_threshold,
        ),
        f0_predictor=ConvF0Predictor(
            in_channels=cfg.in_channels, cond_channels=cfg.f0_cond_channels
        ),
    )
    return vocoder.eval()
