"""Audio file I/O and resampling (soundfile + soxr), with clear errors for bad input."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

__all__ = ["AudioError", "check_waveform", "load_audio", "resample", "to_mono"]


class AudioError(ValueError):
    """An audio file or waveform cannot be used (empty, corrupt, unsupported, wrong rate)."""


def to_mono(wav: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Mix a waveform down to one channel by averaging channels.

    Args:
        wav: ``[T]`` or ``[T, C]`` (soundfile's frames-first layout).

    Returns:
        ``[T]`` float32 tensor.

    Raises:
        AudioError: If ``wav`` has more than two dimensions.
    """
    t = torch.as_tensor(np.asarray(wav) if not isinstance(wav, torch.Tensor) else wav)
    if t.ndim == 1:
        return t.to(torch.float32)
    if t.ndim == 2:
        return t.to(torch.float32).mean(dim=1)
    raise AudioError(f"expected a waveform of shape [T] or [T, C], got {tuple(t.shape)}")


def resample(wav: torch.Tensor, orig_sr: int, target_sr: int) -> torch.Tensor:
    """Resample a mono waveform with soxr (high quality, the default of ``soxr.resample``).

    Args:
        wav: ``[T]`` float waveform.
        orig_sr: Its sample rate (Hz).
        target_sr: Wanted sample rate (Hz).

    Returns:
        ``[T']`` float32 tensor with ``T' ~= T * target_sr / orig_sr``.

    Raises:
        AudioError: On a non-positive rate or a waveform that is not 1-D.
    """
    if orig_sr <= 0 or target_sr <= 0:
        raise AudioError(f"sample rates must be positive, got {orig_sr} -> {target_sr}")
    if wav.ndim != 1:
        raise AudioError(f"resample expects a mono waveform [T], got shape {tuple(wav.shape)}")
    if orig_sr == target_sr:
        return wav.to(torch.float32)
    import soxr

    out = soxr.resample(wav.detach().cpu().numpy().astype(np.float32), orig_sr, target_sr)
    return torch.from_numpy(np.ascontiguousarray(out, dtype=np.float32))


def check_waveform(
    wav: torch.Tensor, *, sample_rate: int | None = None, expected_rate: int | None = None
) -> torch.Tensor:
    """Validate a mono waveform handed to a codec.

    Args:
        wav: Waveform; must be 1-D, floating point, non-empty and finite.
        sample_rate: Its sample rate when the caller knows it.
        expected_rate: The rate the codec needs; a different ``sample_rate`` is an error.

    Returns:
        ``wav`` as float32.

    Raises:
        AudioError: On a wrong shape, dtype, empty or non-finite waveform, or a wrong rate.
    """
    if not isinstance(wav, torch.Tensor):
        raise AudioError(f"expected a torch.Tensor waveform, got {type(wav).__name__}")
    if wav.ndim != 1:
        raise AudioError(f"expected a mono waveform of shape [T], got {tuple(wav.shape)}")
    if not wav.is_floating_point():
        raise AudioError(f"expected a floating-point waveform, got {wav.dtype}")
    if wav.numel() == 0:
        raise AudioError("waveform is empty")
    if not torch.isfinite(wav).all():
        raise AudioError("waveform contains NaN or infinite samples")
    if sample_rate is not None and expected_rate is not None and sample_rate != expected_rate:
        raise AudioError(
            f"waveform has sample rate {sample_rate} Hz but {expected_rate} Hz is required; "
            "resample it first (mctp.codecs.audio.resample)"
        )
    return wav.to(torch.float32)


def load_audio(
    path: str | os.PathLike[str], sample_rate: int | None = None
) -> tuple[torch.Tensor, int]:
    """Read an audio file as a mono float32 waveform, optionally resampled.

    Integer PCM is scaled to ``[-1, 1)`` (int16 / 32768), as soundfile and torchaudio do.

    Args:
        path: Any format libsndfile reads (WAV, FLAC, OGG, MP3 with libsndfile >= 1.1).
        sample_rate: Resample to this rate when given.

    Returns:
        ``(wav, sr)``: ``[T]`` float32 tensor and its sample rate (``sample_rate`` when given).

    Raises:
        FileNotFoundError: If ``path`` does not exist.
        AudioError: If the file is empty, corrupt, in an unsupported format or has no samples.
    """
    import soundfile as sf

    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"audio file not found: {p}")
    if p.is_dir():
        raise AudioError(f"expected an audio file, got a directory: {p}")
    if p.stat().st_size == 0:
        raise AudioError(f"audio file is empty (0 bytes): {p}")
    try:
        data, sr = sf.read(str(p), dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, TypeError) as e:
        raise AudioError(
            f"cannot decode audio file {p} (corrupt or unsupported format): {e}"
        ) from e
    if data.shape[0] == 0:
        raise AudioError(f"audio file has no samples: {p}")
    wav = to_mono(data)
    if sample_rate is not None and sample_rate != sr:
        wav = resample(wav, int(sr), int(sample_rate))
        sr = sample_rate
    return wav, int(sr)
