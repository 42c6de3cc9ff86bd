"""SenseVoice front end: Kaldi log-mel fbank -> low frame rate (LFR) stacking -> CMVN.

The arithmetic follows FunASR's ``WavFrontend`` as used by SenseVoiceSmall:

* fbank: the float waveform in ``[-1, 1]`` is scaled by 32768 (int16 range), then Kaldi
  fbank with a hamming window, 25 ms / 10 ms, ``snip_edges``, pre-emphasis 0.97, DC removal,
  power spectrum, ``energy_floor`` 0, log floor ``FLT_EPSILON``. A waveform shorter than one
  window gets a single frame spanning the whole waveform (FunASR shortens the window).
* LFR: the first frame is repeated ``(m - 1) // 2`` times in front; output frame ``i`` is the
  time-major concatenation of padded frames ``n*i ... n*i + m - 1``; frames past the end
  repeat the last frame. ``T`` fbank frames give ``ceil(T / n)`` LFR frames of ``m * bins``.
* CMVN: ``(x + shift) * scale`` with the ``<AddShift>`` / ``<Rescale>`` vectors of ``am.mvn``
  (Kaldi nnet text format).

The default backend is ``kaldi-native-fbank``; ``torchaudio.compliance.kaldi.fbank`` is an
optional alternative (``backend="torchaudio"``) when torchaudio is installed.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from ..audio import AudioError, check_waveform

__all__ = [
    "SenseVoiceFrontend",
    "apply_cmvn",
    "apply_lfr",
    "kaldi_fbank",
    "load_cmvn",
    "num_fbank_frames",
    "write_cmvn",
]

FbankBackend = Literal["kaldi-native-fbank", "torchaudio"]

_INT16_SCALE = 32768.0


def _window_ms(num_samples: int, sample_rate: int, frame_length_ms: float) -> float:
    """Window length FunASR uses: the configured one, or the whole waveform if shorter."""
    return min(float(frame_length_ms), num_samples / sample_rate * 1000.0)


def num_fbank_frames(
    num_samples: int,
    *,
    sample_rate: int = 16000,
    frame_length_ms: float = 25.0,
    frame_shift_ms: float = 10.0,
) -> int:
    """Number of fbank frames :func:`kaldi_fbank` returns for a waveform (``snip_edges``).

    Args:
        num_samples: Waveform length in samples.
        sample_rate: Its sample rate (Hz).
        frame_length_ms: Window length (ms).
        frame_shift_ms: Hop (ms).

    Returns:
        ``1 + (num_samples - window) // shift``, or 1 for a waveform shorter than a window.

    Raises:
        ValueError: If ``num_samples`` is not positive.
    """
    if num_samples <= 0:
        raise ValueError(f"num_samples must be positive, got {num_samples}")
    window = int(sample_rate * 0.001 * frame_length_ms)
    shift = int(sample_rate * 0.001 * frame_shift_ms)
    if num_samples < window:
        return 1
    return 1 + (num_samples - window) // shift


def kaldi_fbank(
    wav: torch.Tensor,
    *,
    sample_rate: int = 16000,
    num_mel_bins: int = 80,
    frame_length_ms: float = 25.0,
    frame_shift_ms: float = 10.0,
    window: str = "hamming",
    dither: float = 0.0,
    snip_edges: bool = True,
    backend: FbankBackend = "kaldi-native-fbank",
) -> torch.Tensor:
    """Kaldi log-mel filterbank of a float waveform, as FunASR's ``WavFrontend`` computes it.

    Args:
        wav: ``[T]`` float waveform in ``[-1, 1]`` (scaled by 32768 here).
        sample_rate: Sample rate of ``wav`` (Hz).
        num_mel_bins: Mel bins.
        frame_length_ms: Window length (ms); shortened to the waveform when it is shorter.
        frame_shift_ms: Hop (ms).
        window: Kaldi window type (``"hamming"``, ``"povey"``, ``"hanning"``...).
        dither: Dither amplitude; 0.0 gives deterministic features (FunASR's own default
            is 1.0 when a config omits it).
        snip_edges: Kaldi ``snip_edges``.
        backend: ``"kaldi-native-fbank"`` or ``"torchaudio"`` (optional dependency).

    Returns:
        ``[T_fbank, num_mel_bins]`` float32 (CPU).

    Raises:
        AudioError: If ``wav`` is not a finite 1-D float waveform or is too short for the
            requested number of mel bins.
        ValueError: If ``backend`` is unknown.
        ImportError: If ``backend="torchaudio"`` and torchaudio is not installed.
    """
    wav = check_waveform(wav, range_warning=False).detach().cpu()  # callers warn
    n = wav.numel()
    length_ms = _window_ms(n, sample_rate, frame_length_ms)
    scaled = wav * _INT16_SCALE
    compute = _FBANK_BACKENDS.get(backend)
    if compute is None:
        raise ValueError(f"backend must be 'kaldi-native-fbank' or 'torchaudio', got {backend!r}")
    feats = compute(
        scaled, sample_rate, num_mel_bins, length_ms, frame_shift_ms, window, dither, snip_edges
    )
    if feats.shape[0] == 0:
        raise AudioError(f"waveform of {n} samples gives no fbank frame")
    return feats


def _fbank_knf(
    scaled: torch.Tensor,
    sample_rate: int,
    num_mel_bins: int,
    frame_length_ms: float,
    frame_shift_ms: float,
    window: str,
    dither: float,
    snip_edges: bool,
) -> torch.Tensor:
    import kaldi_native_fbank as knf

    opts = knf.FbankOptions()
    opts.frame_opts.samp_freq = float(sample_rate)
    opts.frame_opts.frame_length_ms = float(frame_length_ms)
    opts.frame_opts.frame_shift_ms = float(frame_shift_ms)
    opts.frame_opts.dither = float(dither)
    opts.frame_opts.window_type = window
    opts.frame_opts.snip_edges = bool(snip_edges)
    opts.mel_opts.num_bins = int(num_mel_bins)
    opts.energy_floor = 0.0
    try:
        fbank = knf.OnlineFbank(opts)
    except (RuntimeError, ValueError) as e:
        raise AudioError(
            f"cannot compute {num_mel_bins}-bin fbank with a {frame_length_ms:.3f} ms window "
            f"({scaled.numel()} samples at {sample_rate} Hz; too short?): {e}"
        ) from e
    fbank.accept_waveform(float(sample_rate), scaled.numpy().astype(np.float32).tolist())
    fbank.input_finished()
    frames = fbank.num_frames_ready
    if frames == 0:
        return torch.zeros(0, num_mel_bins)
    out = np.stack([fbank.get_frame(i) for i in range(frames)]).astype(np.float32)
    return torch.from_numpy(out)


def _fbank_torchaudio(
    scaled: torch.Tensor,
    sample_rate: int,
    num_mel_bins: int,
    frame_length_ms: float,
    frame_shift_ms: float,
    window: str,
    dither: float,
    snip_edges: bool,
) -> torch.Tensor:
    try:
        from torchaudio.compliance import kaldi
    except ImportError as e:
        raise ImportError(
            "backend='torchaudio' needs torchaudio: pip install 'mctp[audio]' "
            "(or use the default backend 'kaldi-native-fbank')"
        ) from e
    out = kaldi.fbank(
        scaled[None, :],
        num_mel_bins=num_mel_bins,
        frame_length=frame_length_ms,
        frame_shift=frame_shift_ms,
        dither=dither,
        energy_floor=0.0,
        window_type=window,
        sample_frequency=sample_rate,
        snip_edges=snip_edges,
    )
    return out.to(torch.float32)


_FBANK_BACKENDS: dict[str, Callable[..., torch.Tensor]] = {
    "kaldi-native-fbank": _fbank_knf,
    "torchaudio": _fbank_torchaudio,
}
"""Fbank implementations by :data:`FbankBackend` name (same positional arguments)."""


def apply_lfr(fbank: torch.Tensor, lfr_m: int = 7, lfr_n: int = 6) -> torch.Tensor:
    """Stack ``lfr_m`` consecutive frames every ``lfr_n`` frames (low frame rate).

    Args:
        fbank: ``[T, C]`` frames, ``T >= 1``.
        lfr_m: Frames per stacked output frame.
        lfr_n: Hop between output frames.

    Returns:
        ``[ceil(T / lfr_n), lfr_m * C]``; row ``i`` holds input frames
        ``clamp(lfr_n*i - (lfr_m-1)//2 + j, 0, T-1)`` for ``j = 0..lfr_m-1``, time-major.

    Raises:
        ValueError: If ``fbank`` is not a non-empty 2-D tensor or ``lfr_m``/``lfr_n`` < 1.
    """
    if fbank.ndim != 2 or fbank.shape[0] == 0:
        raise ValueError(f"expected fbank of shape [T>=1, C], got {tuple(fbank.shape)}")
    if lfr_m < 1 or lfr_n < 1:
        raise ValueError(f"lfr_m and lfr_n must be >= 1, got m={lfr_m}, n={lfr_n}")
    t, c = fbank.shape
    t_out = math.ceil(t / lfr_n)
    starts = torch.arange(t_out, device=fbank.device) * lfr_n - (lfr_m - 1) // 2  # [T_out]
    idx = (starts[:, None] + torch.arange(lfr_m, device=fbank.device)[None, :]).clamp_(0, t - 1)
    return fbank[idx].reshape(t_out, lfr_m * c)  # [T_out, m*C]


def apply_cmvn(feats: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``(feats + shift) * scale`` in float32.

    Args:
        feats: ``[T, D]`` features.
        shift: ``[D]`` additive shift (``<AddShift>``, minus the mean).
        scale: ``[D]`` multiplicative scale (``<Rescale>``, inverse std).

    Returns:
        ``[T, D]`` float32.

    Raises:
        ValueError: If the widths differ.
    """
    if feats.shape[-1] != shift.shape[-1] or feats.shape[-1] != scale.shape[-1]:
        raise ValueError(
            f"CMVN width mismatch: features have {feats.shape[-1]} dims, shift "
            f"{shift.shape[-1]}, scale {scale.shape[-1]}"
        )
    return (feats.float() + shift.float()) * scale.float()


def _read_vector(tokens: list[str], pos: int, tag: str, path: Path) -> tuple[np.ndarray, int, int]:
    """Parse ``<Tag> out in <LearnRateCoef> c [ v ... ]`` starting at ``tokens[pos] == tag``."""
    try:
        out_dim, in_dim = int(tokens[pos + 1]), int(tokens[pos + 2])
        open_at = tokens.index("[", pos)
        close_at = tokens.index("]", open_at)
    except (IndexError, ValueError) as e:
        raise ValueError(f"malformed {tag} entry in CMVN file {path}: {e}") from e
    try:
        values = np.array([float(v) for v in tokens[open_at + 1 : close_at]], dtype=np.float32)
    except ValueError as e:
        raise ValueError(f"non-numeric value in the {tag} vector of CMVN file {path}: {e}") from e
    if values.size != out_dim or out_dim != in_dim:
        raise ValueError(
            f"{tag} in CMVN file {path} declares {out_dim}x{in_dim} but holds {values.size} values"
        )
    return values, close_at, out_dim


def load_cmvn(path: str | os.PathLike[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Read the ``<AddShift>`` and ``<Rescale>`` vectors of a Kaldi nnet text file (``am.mvn``).

    Args:
        path: The file, e.g. ``SenseVoiceSmall/am.mvn``.

    Returns:
        ``(shift, scale)``, each ``[D]`` float32.

    Raises:
        FileNotFoundError: If the file does not exist.
        ValueError: If either vector is missing, malformed, non-finite or the two differ in size.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"CMVN file not found: {p}")
    tokens = p.read_text(encoding="utf-8", errors="replace").split()
    found: dict[str, np.ndarray] = {}
    pos = 0
    while pos < len(tokens):
        tag = tokens[pos]
        if tag in ("<AddShift>", "<Rescale>"):
            if tag in found:
                raise ValueError(f"CMVN file {p} holds more than one {tag}")
            found[tag], pos, _ = _read_vector(tokens, pos, tag, p)
        pos += 1
    for tag in ("<AddShift>", "<Rescale>"):
        if tag not in found:
            raise ValueError(f"CMVN file {p} has no {tag} vector (not a Kaldi nnet am.mvn?)")
    shift, scale = found["<AddShift>"], found["<Rescale>"]
    if shift.size != scale.size:
        raise ValueError(
            f"CMVN file {p}: <AddShift> has {shift.size} values, <Rescale> {scale.size}"
        )
    if not (np.isfinite(shift).all() and np.isfinite(scale).all()):
        raise ValueError(f"CMVN file {p} holds non-finite values")
    return torch.from_numpy(shift), torch.from_numpy(scale)


def write_cmvn(path: str | os.PathLike[str], shift: torch.Tensor, scale: torch.Tensor) -> None:
    """Write ``shift`` / ``scale`` as a Kaldi nnet text file that :func:`load_cmvn` reads back.

    Args:
        path: Output file (``am.mvn``).
        shift: ``[D]`` additive shift.
        scale: ``[D]`` multiplicative scale.

    Raises:
        ValueError: If the vectors are not 1-D of equal size.
    """
    if shift.ndim != 1 or shift.shape != scale.shape:
        raise ValueError(
            f"shift and scale must be 1-D of equal size, got {tuple(shift.shape)} and "
            f"{tuple(scale.shape)}"
        )
    d = shift.numel()

    def _vec(v: torch.Tensor) -> str:
        return " ".join(f"{x:.6f}" for x in v.detach().float().cpu().tolist())

    text = (
        f"<Nnet>\n<Splice> {d} {d}\n[ 0 ]\n"
        f"<AddShift> {d} {d}\n<LearnRateCoef> 0 [ {_vec(shift)} ]\n"
        f"<Rescale> {d} {d}\n<LearnRateCoef> 0 [ {_vec(scale)} ]\n</Nnet>\n"
    )
    Path(path).write_text(text, encoding="utf-8")


class SenseVoiceFrontend:
    """Waveform -> ``[ceil(T_fbank / lfr_n), n_mels * lfr_m]`` encoder input features.

    Args:
        shift: ``[n_mels * lfr_m]`` CMVN shift.
        scale: ``[n_mels * lfr_m]`` CMVN scale.
        sample_rate: Expected waveform rate (Hz).
        n_mels: Mel bins.
        frame_length_ms: Window (ms).
        frame_shift_ms: Hop (ms).
        window: Kaldi window type.
        lfr_m: Frames stacked per LFR frame.
        lfr_n: LFR hop in fbank frames.
        dither: Dither amplitude (0.0: deterministic).
        backend: Fbank implementation (see :func:`kaldi_fbank`).

    Raises:
        ValueError: If the CMVN vectors do not have ``n_mels * lfr_m`` values or a size is
            not positive.
    """

    def __init__(
        self,
        *,
        shift: torch.Tensor,
        scale: torch.Tensor,
        sample_rate: int = 16000,
        n_mels: int = 80,
        frame_length_ms: float = 25.0,
        frame_shift_ms: float = 10.0,
        window: str = "hamming",
        lfr_m: int = 7,
        lfr_n: int = 6,
        dither: float = 0.0,
        backend: FbankBackend = "kaldi-native-fbank",
    ) -> None:
        if min(sample_rate, n_mels, lfr_m, lfr_n) < 1 or frame_shift_ms <= 0:
            raise ValueError(
                f"front-end sizes must be positive, got sample_rate={sample_rate}, "
                f"n_mels={n_mels}, lfr_m={lfr_m}, lfr_n={lfr_n}, frame_shift_ms={frame_shift_ms}"
            )
        dim = n_mels * lfr_m
        if shift.shape != (dim,) or scale.shape != (dim,):
            raise ValueError(
                f"CMVN vectors must have n_mels * lfr_m = {n_mels} * {lfr_m} = {dim} values, got "
                f"shift {tuple(shift.shape)} and scale {tuple(scale.shape)}"
            )
        self.shift = shift.float()
        self.scale = scale.float()
        self.sample_rate = sample_rate
        self.n_mels = n_mels
        self.frame_length_ms = frame_length_ms
        self.frame_shift_ms = frame_shift_ms
        self.window = window
        self.lfr_m = lfr_m
        self.lfr_n = lfr_n
        self.dither = dither
        self.backend: FbankBackend = backend
        self._min_samples: int | None = None

    @property
    def output_dim(self) -> int:
        """Feature width ``n_mels * lfr_m``."""
        return self.n_mels * self.lfr_m

    @property
    def frame_rate(self) -> float:
        """Output frames per second: ``1000 / (frame_shift_ms * lfr_n)``."""
        return 1000.0 / (self.frame_shift_ms * self.lfr_n)

    @property
    def min_samples(self) -> int:
        """Shortest waveform (samples at :attr:`sample_rate`) the front end accepts.

        Shorter waveforms get a window shorter than ``frame_length_ms`` whose FFT cannot hold
        ``n_mels`` mel bins, and raise :class:`AudioError`. Found once by trying lengths
        downwards from a full window (every length of a full window or more works).
        """
        if self._min_samples is None:
            window = max(int(self.sample_rate * 0.001 * self.frame_length_ms), 1)
            n = window
            while n > 1 and self._accepts(n - 1):
                n -= 1
            self._min_samples = n
        return self._min_samples

    def _accepts(self, num_samples: int) -> bool:
        try:
            self.fbank(torch.full((num_samples,), 1e-3))
        except AudioError:
            return False
        return True

    def num_frames(self, num_samples: int) -> int:
        """Number of feature frames for a waveform of ``num_samples`` samples.

        Raises:
            ValueError: If ``num_samples`` is not positive.
            AudioError: If ``num_samples`` is below :attr:`min_samples` (the front end,
                hence ``encode``, refuses such a waveform).
        """
        if num_samples > 0 and num_samples < self.min_samples:
            raise AudioError(
                f"a waveform of {num_samples} samples is too short: the front end needs at "
                f"least {self.min_samples} samples ({self.min_samples / self.sample_rate * 1000:.1f} "
                f"ms at {self.sample_rate} Hz) for {self.n_mels} mel bins"
            )
        t = num_fbank_frames(
            num_samples,
            sample_rate=self.sample_rate,
            frame_length_ms=self.frame_length_ms,
            frame_shift_ms=self.frame_shift_ms,
        )
        return math.ceil(t / self.lfr_n)

    def fbank(self, wav: torch.Tensor) -> torch.Tensor:
        """``[T]`` waveform -> ``[T_fbank, n_mels]`` log-mel fbank (before LFR and CMVN).

        Raises:
            AudioError: On a bad or too short waveform.
        """
        return kaldi_fbank(
            wav,
            sample_rate=self.sample_rate,
            num_mel_bins=self.n_mels,
            frame_length_ms=self.frame_length_ms,
            frame_shift_ms=self.frame_shift_ms,
            window=self.window,
            dither=self.dither,
            backend=self.backend,
        )

    def features_from_fbank(self, fbank: torch.Tensor) -> torch.Tensor:
        """``[T_fbank, n_mels]`` -> ``[ceil(T_fbank / lfr_n), n_mels * lfr_m]`` (LFR + CMVN).

        Raises:
            ValueError: If ``fbank`` is not ``[T>=1, n_mels]``.
        """
        if fbank.ndim != 2 or fbank.shape[1] != self.n_mels:
            raise ValueError(
                f"expected fbank of shape [T, {self.n_mels}], got {tuple(fbank.shape)}"
            )
        return apply_cmvn(apply_lfr(fbank, self.lfr_m, self.lfr_n), self.shift, self.scale)

    def __call__(self, wav: torch.Tensor) -> torch.Tensor:
        """``[T]`` waveform -> ``[ceil(T_fbank / lfr_n), n_mels * lfr_m]`` float32 features.

        Raises:
            AudioError: On a bad waveform or one shorter than :attr:`min_samples`.
        """
        try:
            fbank = self.fbank(wav)
        except AudioError as e:
            if isinstance(wav, torch.Tensor) and wav.ndim == 1 and 0 < wav.numel():
                n = wav.numel()
                if n < self.min_samples:
                    raise AudioError(
                        f"a waveform of {n} samples is too short: the front end needs at "
                        f"least {self.min_samples} samples at {self.sample_rate} Hz"
                    ) from e
            raise
        return self.features_from_fbank(fbank)
