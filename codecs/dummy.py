"""A tiny deterministic codec for testing the parts around a codec (no weights, no files).

``DummyCodec`` implements both :class:`~mctp.codecs.base.AudioTokenizer` and
:class:`~mctp.codecs.base.AudioDecoder`: each id stands for one frame of a sine tone
whose pitch is a function of the id; encoding recovers the id from a frame's dominant
frequency, so ``encode(decode(ids)) == ids``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

from .audio import prepare_waveform, warn_missing_rate

__all__ = ["DummyCodec", "DummyStream"]


class DummyCodec:
    """Sine-tone codec: id ``k`` <-> one frame of a tone on FFT bin ``k + 1``.

    Args:
        sample_rate: Waveform sample rate (Hz).
        frame_rate: Ids per second.
        codebook_size: Number of ids; must fit below the frame's Nyquist bin.

    Raises:
        ValueError: If ``sample_rate`` is not a multiple of ``frame_rate`` or the codebook
            does not fit in a frame's spectrum.
    """

    def __init__(
        self, sample_rate: int = 16000, frame_rate: float = 12.5, codebook_size: int = 64
    ) -> None:
        hop = sample_rate / frame_rate
        if hop != int(hop):
            raise ValueError(
                f"sample_rate ({sample_rate}) must be a multiple of frame_rate ({frame_rate})"
            )
        self.hop = int(hop)
        if codebook_size < 1 or codebook_size + 1 >= self.hop // 2:
            raise ValueError(
                f"codebook_size ({codebook_size}) must be in [1, {self.hop // 2 - 2}] for a frame of {self.hop} samples"
            )
        self.sample_rate = sample_rate
        self.frame_rate = frame_rate
        self.codebook_size = codebook_size

    @classmethod
    def from_pretrained(
        cls, path: str | os.PathLike[str] | None = None, **kwargs: int | float
    ) -> DummyCodec:
        """Build the codec; ``path`` is ignored (the codec has no files)."""
        return cls(**kwargs)  # type: ignore[arg-type]

    def encode(
        self, audio: Sequence[torch.Tensor], *, sample_rate: int | None = None
    ) -> list[torch.Tensor]:
        """Ids of the dominant tone of each frame (ceil(T / hop) ids per waveform).

        Args:
            audio: A list of waveforms ``[T_i]``.
            sample_rate: Their rate (resampled when it differs); None: :attr:`sample_rate`, with
                a :class:`~mctp.codecs.audio.MissingSampleRateWarning`.

        Returns:
            ``[ceil(T_i / hop)]`` long tensors (``T_i`` at :attr:`sample_rate`).

        Raises:
            TypeError: If ``audio`` is a tensor rather than a list of tensors.
            AudioError: On an invalid waveform or ``sample_rate``.
        """
        if isinstance(audio, torch.Tensor):
            raise TypeError("encode takes a list of 1-D waveforms; wrap a single one as [wav]")
        warn_missing_rate(sample_rate, self.sample_rate, "DummyCodec.encode")
        out = []
        for i, wav in enumerate(audio):
            wav = prepare_waveform(wav, sample_rate, self.sample_rate, what=f"audio[{i}]")
            n = -(-wav.numel() // self.hop)
            frames = torch.nn.functional.pad(wav, (0, n * self.hop - wav.numel())).view(n, self.hop)
            spec = torch.fft.rfft(frames, dim=-1).abs()[:, 1 : self.codebook_size + 1]
            out.append(spec.argmax(dim=-1).long())
        return out

    def decode(self, ids: torch.Tensor) -> torch.Tensor:
        """``[N]`` ids -> ``[N * hop]`` float32 waveform (amplitude 0.5 tones).

        Raises:
            ValueError: If ids are not 1-D or lie outside ``[0, codebook_size)``.
        """
        ids = torch.as_tensor(ids)
        if ids.ndim != 1:
            raise ValueError(f"expected ids of shape [N], got {tuple(ids.shape)}")
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.codebook_size):
            raise ValueError(
                f"ids must lie in [0, {self.codebook_size}), got range [{int(ids.min())}, {int(ids.max())}]"
            )
        t = torch.arange(self.hop, dtype=torch.float64) / self.hop
        tones = 0.5 * torch.sin(2 * torch.pi * (ids.double()[:, None] + 1) * t[None, :])
        return tones.reshape(-1).float()

    def stream(self) -> DummyStream:
        """A streaming session; every pushed chunk is decoded at once."""
        return DummyStream(self)


class DummyStream:
    """Streaming session of :class:`DummyCodec` (no look-ahead: audio comes out immediately)."""

    def __init__(self, codec: DummyCodec) -> None:
        self.codec = codec

    def push(self, ids: torch.Tensor, *, final: bool = False) -> torch.Tensor:
        """Decode the new ids; ``final`` changes nothing for this codec."""
        return self.codec.decode(ids)

    def reset(self) -> None:
        """Nothing to forget."""
