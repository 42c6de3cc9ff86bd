"""Audio file I/O and resampling (soundfile + soxr), with clear errors for bad input."""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = [
    "MAX_CHANNELS",
    "AudioError",
    "MissingSampleRateWarning",
    "check_waveform",
    "load_audio",
    "prepare_waveform",
    "resample",
    "resampled_length",
    "to_mono",
    "warn_missing_rate",
]


class AudioError(ValueError):
    """An audio file or waveform cannot be used (empty, corrupt, unsupported, wrong rate)."""


class MissingSampleRateWarning(UserWarning):
    """A waveform reached a codec without its sample rate (read as the codec's own rate)."""


def warn_missing_rate(sample_rate: int | None, target_rate: int, what: str) -> None:
    """Warn when waveforms come without ``sample_rate`` (as transformers' feature extractors do).

    The codec then reads them at its own rate: audio recorded at another rate gives wrong
    codes with no error (8 kHz audio read as 16 kHz gives half the codes). The warning points
    at the caller of ``what``.

    Args:
        sample_rate: The rate the caller passed (None: not given).
        target_rate: The rate the waveforms are assumed to have.
        what: The entry point, e.g. ``"DummyCodec.encode"``.
    """
    if sample_rate is None:
        warnings.warn(
            f"{what} got waveforms without sample_rate: they are read as {target_rate} Hz. Pass "
            f"sample_rate=<their rate in Hz> (audio at another rate gives wrong codes silently)",
            MissingSampleRateWarning,
            stacklevel=3,
        )


MAX_CHANNELS = 16
"""Largest channel count :func:`to_mono` infers on its own (more needs ``channels_first``)."""


def to_mono(wav: np.ndarray | torch.Tensor, *, channels_first: bool | None = None) -> torch.Tensor:
    """Mix a waveform down to one channel by averaging channels.

    Both multi-channel layouts are in use: ``[C, T]`` (torchaudio) and ``[T, C]``
    (soundfile). With ``channels_first=None`` the channel axis is inferred only when it is
    unambiguous: exactly one axis has at most :data:`MAX_CHANNELS` entries (``[2, 48000]``
    is stereo channels-first, ``[48000, 2]`` stereo frames-first); anything else (``[2, 2]``,
    ``[4, 10]``, ``[100, 200]``) is refused rather than guessed.

    Args:
        wav: ``[T]``, ``[C, T]`` or ``[T, C]``.
        channels_first: True for ``[C, T]``, False for ``[T, C]``, None to infer.

    Returns:
        ``[T]`` float32 tensor.

    Raises:
        AudioError: If ``wav`` has more than two dimensions, a zero-sized axis, or a layout
            that cannot be inferred unambiguously.
    """
    t = wav if isinstance(wav, torch.Tensor) else torch.as_tensor(np.asarray(wav))
    if t.ndim == 1:
        return t.to(torch.float32)
    if t.ndim != 2:
        raise AudioError(
            f"expected a waveform of shape [T], [C, T] or [T, C], got {tuple(t.shape)}"
        )
    if 0 in t.shape:
        raise AudioError(f"waveform of shape {tuple(t.shape)} has no samples")
    if channels_first is None:
        small = [n <= MAX_CHANNELS for n in t.shape]
        if small[0] == small[1]:
            raise AudioError(
                f"cannot tell channels from samples in a waveform of shape {tuple(t.shape)}: "
                "pass channels_first=True for [C, T] (torchaudio) or False for [T, C] (soundfile)"
            )
        channels_first = small[0]
    return t.to(torch.float32).mean(dim=0 if channels_first else 1)


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
    wav: torch.Tensor,
    *,
    sample_rate: int | None = None,
    expected_rate: int | None = None,
    range_warning: bool = True,
) -> torch.Tensor:
    """Validate a mono waveform handed to a codec.

    Float audio is expected in ``[-1, 1]``; a peak above 1 usually means int16-scaled samples
    (x32768) stored as floats, which every codec would read as wildly clipped audio: that
    gives a :class:`UserWarning` (the samples are used as they are).

    Args:
        wav: Waveform; must be 1-D, floating point, non-empty and finite.
        sample_rate: Its sample rate when the caller knows it.
        expected_rate: The rate the codec needs; a different ``sample_rate`` is an error.
        range_warning: Warn when the peak exceeds 1.

    Returns:
        ``wav`` as float32.

    Raises:
        AudioError: On a wrong shape, dtype, empty or non-finite waveform, or a wrong rate.
    """
    if not isinstance(wav, torch.Tensor):
        raise AudioError(f"expected a torch.Tensor waveform, got {type(wav).__name__}")
    if wav.ndim != 1:
        raise AudioError(
            f"expected a mono waveform of shape [T], got {tuple(wav.shape)}; mix it down with "
            "mctp.codecs.to_mono(wav, channels_first=...)"
        )
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
    if range_warning:
        peak = float(wav.abs().max())
        if peak > 1.0:
            warnings.warn(
                f"waveform peak is {peak:.4g}, outside [-1, 1]: float audio is expected in "
                "[-1, 1] (int16-scaled samples must be divided by 32768)",
                UserWarning,
                stacklevel=3,
            )
    return wav.to(torch.float32)


def prepare_waveform(
    wav: torch.Tensor, sample_rate: int | None, target_rate: int, *, what: str = "waveform"
) -> torch.Tensor:
    """Check a codec input and bring it to the codec's rate.

    Args:
        wav: ``[T]`` float waveform.
        sample_rate: Its rate in Hz; None means it is already at ``target_rate``.
        target_rate: The codec's rate.
        what: Name used in error messages (e.g. ``"audio[2]"``).

    Returns:
        ``[T']`` float32 at ``target_rate`` (resampled with soxr when the rates differ).

    Raises:
        AudioError: On an invalid waveform or a non-positive ``sample_rate``.
    """
    try:
        wav = check_waveform(wav)
        if sample_rate is None or sample_rate == target_rate:
            return wav
        if isinstance(sample_rate, bool) or not isinstance(sample_rate, int | np.integer):
            raise AudioError(f"sample_rate must be an int (Hz), got {sample_rate!r}")
        out = resample(wav, int(sample_rate), target_rate)
    except AudioError as e:
        raise AudioError(f"{what}: {e}") from e
    if out.numel() == 0:
        raise AudioError(
            f"{what}: {wav.numel()} samples at {sample_rate} Hz give no sample at {target_rate} Hz"
        )
    return out


def resampled_length(num_samples: int, orig_sr: int, target_sr: int) -> int:
    """Exactly how many samples :func:`resample` returns for ``num_samples`` samples.

    Raises:
        AudioError: On a non-positive rate.
    """
    if orig_sr == target_sr:
        return num_samples
    return int(resample(torch.zeros(num_samples), orig_sr, target_sr).numel())


_DATA_CHUNK = re.compile(r"^data\s*:\s*(\d+)\s*\(should be (\d+)\)", re.MULTILINE)
_BLOCK_ALIGN = re.compile(r"Block Align\s*:\s*(\d+)")


def _check_complete(sf: Any, path: Path, frames_read: int) -> None:
    """Raise :class:`AudioError` when the file holds less audio than its header declares.

    libsndfile trims a short data chunk to what the file holds and says so only in its log
    (``data : 123126 (should be 956)``); other formats (FLAC, MP3 with a Xing header, ...)
    declare a frame count that a truncated file cannot deliver.
    """
    info = sf.info(str(path))
    log = info.extra_info or ""
    m = _DATA_CHUNK.search(log)
    if m is not None:
        declared, present = int(m.group(1)), int(m.group(2))
        align = _BLOCK_ALIGN.search(log)
        block = int(align.group(1)) if align else 1
        # 0xFFFFFFFF / 0x7FFFFFFF: "size unknown" written by streaming encoders
        if declared - present >= max(block, 1) and declared < 0x7FFFFFFF:
            raise AudioError(
                f"audio file is truncated: {path} declares a {declared}-byte data chunk but "
                f"holds {present} bytes ({present // max(block, 1)} of "
                f"{declared // max(block, 1)} frames)"
            )
    # an MP3 without a Xing/LAME header only has an estimated length: allow 2% there
    slack = int(0.02 * info.frames) if str(info.format).upper() in ("MP3", "MPEG") else 0
    if 0 < frames_read < info.frames - slack:
        raise AudioError(
            f"audio file is truncated: {path} declares {info.frames} frames, "
            f"only {frames_read} could be read"
        )


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
        AudioError: If the file is empty, corrupt, truncated (less audio than its header
            declares), in an unsupported format or has no samples.
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
    _check_complete(sf, p, data.shape[0])
    wav = to_mono(data, channels_first=False)
    if sample_rate is not None and sample_rate != sr:
        wav = resample(wav, int(sr), int(sample_rate))
        sr = sample_rate
    return wav, int(sr)
