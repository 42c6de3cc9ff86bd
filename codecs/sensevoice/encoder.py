"""SenseVoiceSmall model (query table + SANM encoder), builders and ``AudioEncoder`` adapter.

The SANM modules live in :mod:`mctp.codecs.sensevoice.sanm` (re-exported here). Module
attribute paths equal FunASR's checkpoint keys, so a released ``model.pt`` loads
strictly: ``encoder.encoders0.0.self_attn.linear_q_k_v.weight``,
``encoder.encoders.{i}.self_attn.fsmn_block.weight``, ``encoder.tp_encoders.{i}.feed_forward.w_1.*``,
``encoder.after_norm.*``, ``encoder.tp_norm.*`` and the query table ``embed.weight`` (outside the
encoder). The CTC head ``ctc.ctc_lo.*`` is the only checkpoint entry that is ignored.

Each utterance is encoded as ``[embed(lang), embed(1) (event), embed(2) (emotion),
embed(text_norm), feats...]``: the output has ``F + 4`` frames, the first 4 being these query
frames. VITA-Audio-Plus keeps all ``F + 4`` frames and projects them into the LLM.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mctp.checkpoint import CheckpointError, load_strict, read_state_dict, strip_prefix

from .._loading import check_finite, release_folder
from ..audio import (
    AudioError,
    load_audio,
    prepare_waveform,
    resampled_length,
    warn_missing_rate,
)
from .frontend import FbankBackend, SenseVoiceFrontend, load_cmvn
from .sanm import (
    PositionwiseFeedForward,
    SANMEncoderLayer,
    SANMSelfAttention,
    SenseVoiceEncoderSmall,
    sinusoidal_positions,
)

__all__ = [
    "LANGUAGE_IDS",
    "NUM_QUERY_FRAMES",
    "TEXT_NORM_IDS",
    "PositionwiseFeedForward",
    "SANMEncoderLayer",
    "SANMSelfAttention",
    "SenseVoiceEncoder",
    "SenseVoiceEncoderSmall",
    "SenseVoiceSmallModel",
    "build_sensevoice_model",
    "load_sensevoice_state_dict",
    "query_ids",
    "read_sensevoice_config",
    "sinusoidal_positions",
]

LANGUAGE_IDS: dict[str, int] = {
    "auto": 0,
    "zh": 3,
    "en": 4,
    "yue": 7,
    "ja": 11,
    "ko": 12,
    "nospeech": 13,
}
"""Row of ``embed`` used as the first (language) query, as in FunASR's SenseVoiceSmall."""
TEXT_NORM_IDS: dict[str, int] = {"withitn": 14, "woitn": 15}
"""Row of ``embed`` used as the fourth (inverse text normalisation) query."""
EVENT_QUERY_ID = 1
EMOTION_QUERY_ID = 2
NUM_QUERY_FRAMES = 4
_IGNORED_KEYS = ("ctc.ctc_lo.*",)


def _min_query_rows() -> int:
    """Rows the query table needs to hold every id of the two tables (16)."""
    return max(*LANGUAGE_IDS.values(), *TEXT_NORM_IDS.values()) + 1


def query_ids(language: str = "auto", text_norm: str = "woitn") -> list[int]:
    """Embedding rows of the 4 query frames: ``[language, 1, 2, text_norm]``.

    Raises:
        ValueError: If ``language`` or ``text_norm`` is not in the original id table.
    """
    if language not in LANGUAGE_IDS:
        raise ValueError(f"unknown language {language!r}; choose one of {sorted(LANGUAGE_IDS)}")
    if text_norm not in TEXT_NORM_IDS:
        raise ValueError(f"unknown text_norm {text_norm!r}; choose one of {sorted(TEXT_NORM_IDS)}")
    return [LANGUAGE_IDS[language], EVENT_QUERY_ID, EMOTION_QUERY_ID, TEXT_NORM_IDS[text_norm]]


class SenseVoiceSmallModel(nn.Module):
    """The part of FunASR's ``SenseVoiceSmall`` an LLM needs: the query table and the encoder.

    State-dict keys: ``embed.weight`` and ``encoder.*`` (the CTC head is left out).

    Args:
        encoder: The SANM encoder.
        num_queries: Rows of the query table (16 released: 7 + 7 languages + 2 text norms).

    Raises:
        ValueError: If ``num_queries`` cannot hold the ids of :data:`LANGUAGE_IDS` and
            :data:`TEXT_NORM_IDS`.
    """

    def __init__(self, *, encoder: SenseVoiceEncoderSmall, num_queries: int = 16) -> None:
        super().__init__()
        need = _min_query_rows()
        if num_queries < need:
            raise ValueError(
                f"num_queries ({num_queries}) must be >= {need} to hold every query id"
            )
        self.encoder = encoder
        self.embed = nn.Embedding(num_queries, encoder.input_size)

    def forward(
        self, feats: torch.Tensor, lengths: torch.Tensor, queries: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Prepend the query frames and encode.

        Args:
            feats: ``[B, T, input_size]`` right-padded features.
            lengths: ``[B]`` valid feature lengths.
            queries: ``[4]`` long embedding rows (see :func:`query_ids`).

        Returns:
            ``(out [B, T + 4, D], lengths + 4)``.
        """
        q = self.embed(queries.to(self.embed.weight.device)).to(feats.dtype)  # [4, input_size]
        xs = torch.cat([q.expand(feats.shape[0], -1, -1), feats], dim=1)
        new_lengths = lengths + q.shape[0]
        return self.encoder(xs, new_lengths), new_lengths


# ----------------------------------------------------------------------------- builders


def read_sensevoice_config(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a released ``config.yaml`` (plain YAML; interpolations such as ``${...}`` stay strings).

    Raises:
        FileNotFoundError: If the file does not exist.
        ValueError: If it is not a YAML mapping or does not describe a SenseVoiceEncoderSmall.
    """
    import yaml

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"SenseVoice config not found: {p}")
    try:
        cfg = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ValueError(f"cannot parse {p} as YAML: {e}") from e
    if not isinstance(cfg, dict):
        raise ValueError(f"{p} must hold a YAML mapping, got {type(cfg).__name__}")
    if cfg.get("encoder") != "SenseVoiceEncoderSmall":
        raise ValueError(
            f"{p}: encoder is {cfg.get('encoder')!r}, expected 'SenseVoiceEncoderSmall'"
        )
    if not isinstance(cfg.get("encoder_conf"), dict):
        raise ValueError(f"{p} has no encoder_conf mapping")
    return cfg


def _frontend_kwargs(cfg: Mapping[str, Any]) -> dict[str, Any]:
    fc = cfg.get("frontend_conf") or {}
    if cfg.get("frontend", "WavFrontend") not in ("WavFrontend", "wav_frontend"):
        raise ValueError(f"unsupported frontend {cfg.get('frontend')!r} (expected WavFrontend)")
    if not fc.get("snip_edges", True) or not fc.get("upsacle_samples", True):
        raise ValueError("only snip_edges=True and upsacle_samples=True front ends are supported")
    return {
        "sample_rate": int(fc.get("fs", 16000)),
        "n_mels": int(fc.get("n_mels", 80)),
        "frame_length_ms": float(fc.get("frame_length", 25)),
        "frame_shift_ms": float(fc.get("frame_shift", 10)),
        "window": str(fc.get("window", "hamming")),
        "lfr_m": int(fc.get("lfr_m", 1)),
        "lfr_n": int(fc.get("lfr_n", 1)),
    }


def build_sensevoice_model(
    cfg: Mapping[str, Any], *, num_queries: int = 16
) -> SenseVoiceSmallModel:
    """Build an uninitialised :class:`SenseVoiceSmallModel` from a parsed ``config.yaml``.

    ``input_size`` is ``frontend_conf.n_mels * frontend_conf.lfr_m`` (as FunASR derives it).

    Raises:
        ValueError: On a missing size, an unsupported option (``concat_after``, a
            non-``sanm`` attention type) or invalid sizes.
    """
    ec = cfg["encoder_conf"]
    missing = [
        k for k in ("output_size", "attention_heads", "linear_units", "num_blocks") if k not in ec
    ]
    if missing:
        raise ValueError(f"encoder_conf lacks {missing}")
    if ec.get("concat_after", False):
        raise ValueError("encoder_conf.concat_after=true is not supported")
    if ec.get("selfattention_layer_type", "sanm") != "sanm":
        raise ValueError(
            f"selfattention_layer_type {ec['selfattention_layer_type']!r} is not supported"
        )
    fe = _frontend_kwargs(cfg)
    encoder = SenseVoiceEncoderSmall(
        input_size=fe["n_mels"] * fe["lfr_m"],
        output_size=int(ec["output_size"]),
        attention_heads=int(ec["attention_heads"]),
        linear_units=int(ec["linear_units"]),
        num_blocks=int(ec["num_blocks"]),
        tp_blocks=int(ec.get("tp_blocks", 0)),
        kernel_size=int(ec.get("kernel_size", 11)),
        sanm_shift=int(ec.get("sanm_shfit", ec.get("sanm_shift", 0))),
        normalize_before=bool(ec.get("normalize_before", True)),
        dropout_rate=float(ec.get("dropout_rate", 0.0)),
        attention_dropout_rate=float(ec.get("attention_dropout_rate", 0.0)),
    )
    return SenseVoiceSmallModel(encoder=encoder, num_queries=num_queries)


def load_sensevoice_state_dict(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Load FunASR's ``model.pt`` (``weights_only``) and unwrap it to a flat state dict.

    Accepts a raw state dict and the wrappers FunASR's loader accepts (``state_dict``,
    ``model_state_dict``, ``model``; see :func:`mctp.checkpoint.read_state_dict`); a DDP
    ``module.`` prefix is removed.

    Raises:
        FileNotFoundError: If the file does not exist.
        ValueError: If the file cannot be read.
        CheckpointError: If the file does not hold a mapping of tensors.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"SenseVoice checkpoint not found: {p}")
    return strip_prefix(read_state_dict(p), ("module.",))


class SenseVoiceEncoder:
    """SenseVoiceSmall as an :class:`~mctp.codecs.base.AudioEncoder` (waveform -> frames).

    ``encode`` returns ``F + 4`` frames per waveform: the 4 query frames (language, event,
    emotion, text norm) followed by ``F = ceil(T_fbank / 6)`` speech frames at
    ``frame_rate`` = 100/6 Hz (``frame_rate`` counts the speech frames only). This is what
    VITA-Audio-Plus feeds its MLP projector: one ``<|context_of_audio|>`` placeholder per
    output frame (see :meth:`num_frames`).

    Args:
        model: Query table + encoder (weights loaded).
        frontend: Feature extractor with the model's CMVN.
        language: Default language query (``auto``, ``zh``, ``en``, ``yue``, ``ja``, ``ko``,
            ``nospeech``).
        text_norm: Default text-norm query (``withitn`` / ``woitn``).
        batch_size: Waveforms encoded per forward in :meth:`encode`.

    Raises:
        ValueError: On an unknown language/text norm, a non-positive batch size, or a front
            end whose width differs from the encoder's input.
    """

    num_query_frames: int = NUM_QUERY_FRAMES

    def __init__(
        self,
        *,
        model: SenseVoiceSmallModel,
        frontend: SenseVoiceFrontend,
        language: str = "auto",
        text_norm: str = "woitn",
        batch_size: int = 16,
    ) -> None:
        query_ids(language, text_norm)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if frontend.output_dim != model.encoder.input_size:
            raise ValueError(
                f"front end gives {frontend.output_dim}-dim features but the encoder takes "
                f"{model.encoder.input_size}"
            )
        self.model = model.eval()
        self.frontend = frontend
        self.language = language
        self.text_norm = text_norm
        self.batch_size = batch_size
        self.sample_rate: int = frontend.sample_rate
        self.frame_rate: float = frontend.frame_rate
        self.output_dim: int = model.encoder.output_size

    @property
    def device(self) -> torch.device:
        """Device of the encoder weights (outputs are returned there)."""
        return self.model.embed.weight.device

    @property
    def dtype(self) -> torch.dtype:
        """Dtype of the encoder weights (outputs have it)."""
        return self.model.embed.weight.dtype

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike[str],
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        language: str = "auto",
        text_norm: str = "woitn",
        dither: float = 0.0,
        backend: FbankBackend = "kaldi-native-fbank",
        batch_size: int = 16,
    ) -> SenseVoiceEncoder:
        """Load a released SenseVoiceSmall folder (``config.yaml``, ``am.mvn``, ``model.pt``).

        Args:
            path: The folder (e.g. a download of ``FunAudioLLM/SenseVoiceSmall``).
            device: Where the encoder runs.
            dtype: Encoder weight dtype (features are computed in float32, then cast).
            language: Default language query.
            text_norm: Default text-norm query (VITA-Audio-Plus uses ``woitn``).
            dither: Fbank dither (0.0: deterministic; the config's value is not used).
            backend: Fbank backend (see :func:`~.frontend.kaldi_fbank`).
            batch_size: Waveforms per forward.

        Raises:
            FileNotFoundError: If the folder or one of its files is missing.
            ValueError: On a config that is not a SenseVoiceEncoderSmall, a malformed
                ``am.mvn``, an unreadable ``model.pt`` or an unknown language/text norm.
            CheckpointError: If ``model.pt`` has missing, unexpected or mis-shaped tensors
                (only ``ctc.ctc_lo.*`` is ignored).
        """
        folder = release_folder(path, "SenseVoice")
        query_ids(language, text_norm)
        cfg = read_sensevoice_config(folder / "config.yaml")
        shift, scale = load_cmvn(folder / "am.mvn")
        frontend = SenseVoiceFrontend(
            shift=shift, scale=scale, dither=dither, backend=backend, **_frontend_kwargs(cfg)
        )
        state = load_sensevoice_state_dict(folder / "model.pt")
        embed = state.get("embed.weight")
        need = _min_query_rows()
        num_queries = need
        if embed is not None and embed.ndim == 2:
            num_queries = int(embed.shape[0])
            if num_queries < need:
                raise CheckpointError(
                    f"SenseVoiceSmall ({folder / 'model.pt'}; the query ids need {need} rows)",
                    mismatched=[("embed.weight", tuple(embed.shape), (need, int(embed.shape[1])))],
                )
        model = build_sensevoice_model(cfg, num_queries=num_queries)
        what = f"SenseVoiceSmall ({folder / 'model.pt'})"
        check_finite(state, what)
        load_strict(model, state, ignore=_IGNORED_KEYS, what=what)
        model = model.to(device=device, dtype=dtype)
        return cls(
            model=model,
            frontend=frontend,
            language=language,
            text_norm=text_norm,
            batch_size=batch_size,
        )

    def num_frames(self, num_samples: int, *, sample_rate: int | None = None) -> int:
        """Frames :meth:`encode` returns for ``num_samples`` samples: ``ceil(T_fbank / 6) + 4``.

        This is the number of ``<|context_of_audio|>`` placeholders VITA-Audio-Plus puts
        between ``<|begin_of_audio|>`` and ``<|end_of_audio|>``. It raises exactly where
        :meth:`encode` refuses a waveform of that length.

        Args:
            num_samples: Waveform length.
            sample_rate: Its rate, as given to :meth:`encode` (None: :attr:`sample_rate`).

        Raises:
            ValueError: If ``num_samples`` is not positive.
            AudioError: If such a waveform is too short for the front end (see
                :attr:`SenseVoiceFrontend.min_samples`).
        """
        if num_samples > 0 and sample_rate is not None and sample_rate != self.sample_rate:
            num_samples = resampled_length(num_samples, sample_rate, self.sample_rate)
            if num_samples == 0:
                raise AudioError(f"no sample is left after resampling to {self.sample_rate} Hz")
        return self.frontend.num_frames(num_samples) + self.num_query_frames

    def features(self, wav: torch.Tensor, *, sample_rate: int | None = None) -> torch.Tensor:
        """``[T]`` waveform -> ``[F, n_mels * lfr_m]`` float32 features (CPU).

        Args:
            wav: ``[T]`` float waveform.
            sample_rate: Its rate in Hz (resampled when it differs from :attr:`sample_rate`);
                None: :attr:`sample_rate`, with a
                :class:`~mctp.codecs.audio.MissingSampleRateWarning`.

        Raises:
            AudioError: On a bad or too short waveform or a bad ``sample_rate``.
        """
        warn_missing_rate(sample_rate, self.sample_rate, "SenseVoiceEncoder.features")
        return self.frontend(prepare_waveform(wav, sample_rate, self.sample_rate))

    @torch.no_grad()
    def encode_features(
        self,
        feats: Sequence[torch.Tensor],
        *,
        language: str | None = None,
        text_norm: str | None = None,
    ) -> list[torch.Tensor]:
        """Encode precomputed features as one right-padded batch.

        Args:
            feats: ``[F_i, input_size]`` feature matrices (from :meth:`features`).
            language: Language query (default: the adapter's).
            text_norm: Text-norm query (default: the adapter's).

        Returns:
            ``[F_i + 4, D]`` per input, on :attr:`device` in :attr:`dtype`.

        Raises:
            ValueError: On an empty list, a feature matrix of the wrong shape, or an unknown
                language/text norm.
        """
        ids = query_ids(language or self.language, text_norm or self.text_norm)
        if len(feats) == 0:
            raise ValueError("feats is empty")
        width = self.model.encoder.input_size
        for i, f in enumerate(feats):
            if f.ndim != 2 or f.shape[1] != width or f.shape[0] == 0:
                raise ValueError(
                    f"feats[{i}] must have shape [F>=1, {width}], got {tuple(f.shape)}"
                )
        lengths = torch.tensor([f.shape[0] for f in feats], device=self.device)
        padded = nn.utils.rnn.pad_sequence(
            [f.to(device=self.device, dtype=self.dtype) for f in feats], batch_first=True
        )  # [B, T, input_size]
        queries = torch.tensor(ids, device=self.device)
        out, out_lengths = self.model(padded, lengths, queries)  # [B, T + 4, D]
        if len(feats) == 1:
            return [out[0]]
        # clones, so that one result does not keep the whole padded batch alive
        return [o[:n].clone() for o, n in zip(out, out_lengths.tolist(), strict=True)]

    def encode(
        self,
        audio: Sequence[torch.Tensor],
        *,
        sample_rate: int | None = None,
        language: str | None = None,
        text_norm: str | None = None,
        progress: bool = False,
    ) -> list[torch.Tensor]:
        """Encode waveforms (batched by length, ``batch_size`` at a time).

        Padding never changes a result: batched outputs equal one-by-one outputs. Waveforms
        at another rate must say so with ``sample_rate``: they are resampled with soxr.

        Args:
            audio: A list of waveforms ``[T_i]`` float32 in ``[-1, 1]``.
            sample_rate: Their rate in Hz; None means :attr:`sample_rate` (16 kHz), with a
                :class:`~mctp.codecs.audio.MissingSampleRateWarning`.
            language: Language query (default: the adapter's).
            text_norm: Text-norm query (default: the adapter's).
            progress: Show a tqdm bar over batches.

        Returns:
            ``[F_i + 4, D]`` per waveform (4 query frames first), on :attr:`device`.

        Raises:
            TypeError: If ``audio`` is a tensor rather than a list of tensors.
            AudioError: On a bad or too short waveform (see :meth:`num_frames`) or a bad
                ``sample_rate``.
            ValueError: On an empty list or an unknown language/text norm.
        """
        if isinstance(audio, torch.Tensor):
            raise TypeError(
                f"encode takes a list of 1-D waveforms, got a tensor of shape "
                f"{tuple(audio.shape)}; wrap a single waveform as [wav]"
            )
        if len(audio) == 0:
            raise ValueError("audio is empty")
        query_ids(language or self.language, text_norm or self.text_norm)
        warn_missing_rate(sample_rate, self.sample_rate, "SenseVoiceEncoder.encode")
        wavs = [
            prepare_waveform(w, sample_rate, self.sample_rate, what=f"audio[{i}]")
            for i, w in enumerate(audio)
        ]
        order = sorted(range(len(wavs)), key=lambda i: -wavs[i].numel())
        starts = range(0, len(order), self.batch_size)
        if progress:
            from tqdm.auto import tqdm

            starts = tqdm(starts, desc="SenseVoice", unit="batch")
        out: list[torch.Tensor | None] = [None] * len(wavs)
        for s in starts:
            idx = order[s : s + self.batch_size]
            feats = [self.frontend(wavs[i]) for i in idx]
            for i, o in zip(
                idx,
                self.encode_features(feats, language=language, text_norm=text_norm),
                strict=True,
            ):
                out[i] = o
        return [o for o in out if o is not None]

    def encode_file(
        self,
        path: str | os.PathLike[str],
        *,
        language: str | None = None,
        text_norm: str | None = None,
    ) -> torch.Tensor:
        """Read an audio file (any rate, mixed to mono, resampled) and encode it.

        Returns:
            ``[F + 4, D]``.

        Raises:
            FileNotFoundError: If the file does not exist.
            AudioError: If it cannot be decoded or is too short.
        """
        wav, sr = load_audio(path)  # checked at its own rate, resampled by encode
        return self.encode([wav], sample_rate=sr, language=language, text_norm=text_norm)[0]
