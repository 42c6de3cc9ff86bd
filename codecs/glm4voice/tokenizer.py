"""GLM-4-Voice speech tokenizer: 16 kHz waveform -> 12.5 Hz ids in ``[0, 16384)``.

:class:`GLM4VoiceTokenizer` implements :class:`~mctp.codecs.base.AudioTokenizer` on top of
:class:`~mctp.codecs.glm4voice.whisper_vq.WhisperVQEncoder`. It loads the released
``THUDM/glm-4-voice-tokenizer`` folder (``config.json``, ``preprocessor_config.json``,
``model.safetensors``) and reproduces the original ``extract_speech_token``: audio is cut
into 30 s slices, all slices of one call are batched, right-padded to a multiple of 1280
samples, turned into Whisper log-mels and tokenized; each slice keeps
``ceil(len / 1280)`` ids.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from mctp.checkpoint import CheckpointError, load_strict, read_state_dict

from .._loading import check_finite, release_folder
from ..audio import (
    AudioError,
    check_waveform,
    load_audio,
    prepare_waveform,
    warn_missing_rate,
)
from .whisper_vq import WhisperVQEncoder

__all__ = [
    "CHECKPOINT_PREFIX",
    "IGNORED_KEYS",
    "GLM4VoiceTokenizer",
    "build_feature_extractor",
    "build_whisper_vq_encoder",
    "read_checkpoint",
]

CHECKPOINT_PREFIX = "model.encoder."
"""Prefix of the encoder tensors in released checkpoints (unprefixed keys are accepted too)."""

IGNORED_KEYS: tuple[str, ...] = (
    "layer_norm.*",
    "embed_positions2.weight",
    "ema_count",
    "ema_weight",
    "model.decoder.*",
    "proj_out.*",
)
"""Checkpoint tensors (after prefix removal) that tokenization does not use.

``layer_norm`` follows the last encoder layer, ``embed_positions2`` is added after
quantisation, ``ema_*`` are training statistics of the codebook, ``model.decoder.*`` and
``proj_out`` belong to the ASR decoder of a full checkpoint. Layers ``layers.N.*`` with
``N >= quantize_position`` are ignored as well.
"""

_LAYER_KEY = re.compile(r"^layers\.(\d+)\.")
_MISSING = object()


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"{path.name} not found in {path.parent}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot parse {path}: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def _field(
    cfg: Mapping[str, Any], name: str, kind: type | tuple[type, ...], default: Any = _MISSING
) -> Any:
    value = cfg.get(name, default)
    if value is _MISSING:
        raise ValueError(f"config field {name!r} is missing")
    if value is None and default is None:
        return None
    if (isinstance(value, bool) and kind is not bool) or not isinstance(value, kind):
        raise ValueError(f"config field {name!r} has an invalid value {value!r}")
    return value


def build_whisper_vq_encoder(config: Mapping[str, Any]) -> WhisperVQEncoder:
    """Build the encoder described by a ``WhisperVQConfig`` (``config.json`` as a dict).

    Only the first ``quantize_position`` layers are built. Defaults of absent fields are
    those of ``WhisperVQConfig``. ``scale_embedding`` is ignored, as in the original (its
    scale is computed but never applied).

    Args:
        config: Parsed ``config.json``.

    Returns:
        A randomly initialised :class:`WhisperVQEncoder` with those sizes.

    Raises:
        ValueError: On missing, mistyped or inconsistent fields.
        NotImplementedError: On settings this implementation does not reproduce
            (non-"avg" pooling, non-causal convolutions, causal attention, an activation
            other than exact "gelu", pooling never reached).
    """
    if "quantize_vocab_size" not in config:
        raise ValueError("not a WhisperVQ config: field 'quantize_vocab_size' is missing")
    num_layers = _field(config, "quantize_position", int, 16)
    encoder_layers = _field(config, "encoder_layers", int, 32)
    if num_layers > encoder_layers:
        raise ValueError(
            f"quantize_position ({num_layers}) exceeds encoder_layers ({encoder_layers})"
        )
    if not _field(config, "encoder_causal_convolution", bool, False):
        raise NotImplementedError(
            "encoder_causal_convolution=false (symmetric convolutions) is not supported; "
            "GLM-4-Voice's tokenizer uses causal convolutions"
        )
    for name in ("encoder_causal_attention", "quantize_causal_encoder"):
        if _field(config, name, bool, False):
            raise NotImplementedError(f"{name}=true (fully causal attention) is not supported")
    activation = _field(config, "activation_function", str, "gelu")
    if activation != "gelu":
        raise NotImplementedError(
            f"activation_function {activation!r} is not supported (only 'gelu')"
        )
    kernel = _field(config, "pooling_kernel_size", int, None)
    pooling_position = _field(config, "pooling_position", int, 0)
    if kernel is None:
        kernel, pooling_position = 1, num_layers
    else:
        pooling_type = _field(config, "pooling_type", str, "max")
        if pooling_type != "avg":
            raise NotImplementedError(
                f"pooling_type {pooling_type!r} is not supported (only 'avg')"
            )
        if not 1 <= pooling_position <= num_layers:
            raise NotImplementedError(
                f"pooling_position ({pooling_position}) must lie in [1, quantize_position="
                f"{num_layers}]; the original never pools (or pools after quantising) otherwise"
            )
    return WhisperVQEncoder(
        num_mel_bins=_field(config, "num_mel_bins", int),
        d_model=_field(config, "d_model", int),
        num_heads=_field(config, "encoder_attention_heads", int),
        ffn_dim=_field(config, "encoder_ffn_dim", int),
        num_layers=num_layers,
        max_source_positions=_field(config, "max_source_positions", int),
        codebook_size=_field(config, "quantize_vocab_size", int),
        pooling_kernel_size=kernel,
        pooling_position=pooling_position,
        causal_block_size=_field(config, "quantize_causal_block_size", int, None),
    )


def build_feature_extractor(preprocessor: Mapping[str, Any]) -> Any:
    """Build transformers' ``WhisperFeatureExtractor`` from ``preprocessor_config.json``.

    Args:
        preprocessor: Parsed ``preprocessor_config.json``.

    Returns:
        A ``transformers.WhisperFeatureExtractor``.

    Raises:
        ValueError: On another extractor type, a bad field, or dithering (random noise
            would make ids non-deterministic).
    """
    from transformers import WhisperFeatureExtractor

    kind = preprocessor.get("feature_extractor_type", "WhisperFeatureExtractor")
    if kind != "WhisperFeatureExtractor":
        raise ValueError(f"feature_extractor_type must be 'WhisperFeatureExtractor', got {kind!r}")
    dither = _field(preprocessor, "dither", (int, float), 0.0)
    if dither != 0.0:
        raise ValueError(f"dither={dither} is not supported: tokenization must be deterministic")
    kwargs = {
        name: _field(preprocessor, name, int, default)
        for name, default in (
            ("feature_size", 80),
            ("sampling_rate", 16000),
            ("hop_length", 160),
            ("chunk_length", 30),
            ("n_fft", 400),
        )
    }
    bad = {k: v for k, v in kwargs.items() if v < 1}
    if bad:
        raise ValueError(f"preprocessor fields must be positive, got {bad}")
    padding_value = float(_field(preprocessor, "padding_value", (int, float), 0.0))
    return WhisperFeatureExtractor(**kwargs, padding_value=padding_value)


def _strip(key: str) -> str:
    return key[len(CHECKPOINT_PREFIX) :] if key.startswith(CHECKPOINT_PREFIX) else key


read_checkpoint = read_state_dict
"""Alias of :func:`mctp.checkpoint.read_state_dict` (the tokenizer's former reader)."""


def _load_encoder_weights(encoder: WhisperVQEncoder, folder: Path, what: str) -> None:
    num_layers = len(encoder.layers)

    def needed(key: str) -> bool:  # unused tensors are never read from safetensors files
        short = _strip(key)
        if any(fnmatch.fnmatchcase(short, p) for p in IGNORED_KEYS):
            return False
        layer = _LAYER_KEY.match(short)
        return layer is None or int(layer.group(1)) < num_layers

    raw = read_state_dict(folder, keep=needed)
    check_finite(raw, what)  # names the stored keys
    state: dict[str, torch.Tensor] = {}
    clashes = []
    for key, value in raw.items():
        short = _strip(key)
        if short in state:
            clashes.append(short)
        state[short] = value
    if clashes:
        raise CheckpointError(
            f"{what} (keys present both with and without the {CHECKPOINT_PREFIX!r} prefix)",
            unexpected=clashes,
        )
    load_strict(encoder, state, what=what)


class GLM4VoiceTokenizer:
    """GLM-4-Voice's 12.5 Hz speech tokenizer (an :class:`~mctp.codecs.base.AudioTokenizer`).

    Use :meth:`from_pretrained` to load a released folder. Results do not depend on how
    inputs are grouped into calls or batches (padding is masked out).

    Args:
        encoder: The quantising encoder (weights loaded, on its target device/dtype).
        feature_extractor: A ``transformers.WhisperFeatureExtractor`` with
            ``feature_size == encoder.num_mel_bins``.
        batch_size: Default number of 30 s slices per forward pass.

    Attributes:
        sample_rate: Required input rate (16000).
        frame_rate: Ids per second (12.5).
        codebook_size: Number of ids (16384 released).
        samples_per_id: Waveform samples per id (1280); slices are padded to multiples of it.
        chunk_samples: Slice length (480000 = 30 s).

    Raises:
        ValueError: If the extractor's mel size differs from the encoder's, a slice would
            exceed the position table, or ``batch_size`` is not positive.
    """

    def __init__(
        self, encoder: WhisperVQEncoder, feature_extractor: Any, *, batch_size: int = 8
    ) -> None:
        if feature_extractor.feature_size != encoder.num_mel_bins:
            raise ValueError(
                f"feature extractor gives {feature_extractor.feature_size} mel bins but the "
                f"encoder expects num_mel_bins={encoder.num_mel_bins}"
            )
        self.encoder = encoder.eval().requires_grad_(False)
        self.feature_extractor = feature_extractor
        self.sample_rate = int(feature_extractor.sampling_rate)
        hop = int(feature_extractor.hop_length)
        self.samples_per_id = hop * encoder.frames_per_id
        self.frame_rate = self.sample_rate / self.samples_per_id
        self.codebook_size = encoder.codebook_size
        self.chunk_samples = int(feature_extractor.n_samples)
        frames = -(-self.chunk_samples // self.samples_per_id) * encoder.frames_per_id
        if frames > encoder.max_frames:
            raise ValueError(
                f"a {self.chunk_samples}-sample slice gives {frames} mel frames but the encoder's "
                f"position table covers {encoder.max_frames} (max_source_positions="
                f"{encoder.max_source_positions})"
            )
        self.batch_size = self._check_batch_size(batch_size)

    @staticmethod
    def _check_batch_size(batch_size: int) -> int:
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        return batch_size

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike[str],
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        batch_size: int = 8,
    ) -> GLM4VoiceTokenizer:
        """Load a ``glm-4-voice-tokenizer`` folder with strict key checking.

        Keys may carry the ``model.encoder.`` prefix or none; the tensors listed in
        :data:`IGNORED_KEYS` and layers beyond ``quantize_position`` are skipped, anything
        else missing or unexpected is an error.

        Args:
            path: Folder with ``config.json``, ``preprocessor_config.json`` and weights
                (``model.safetensors``, a sharded safetensors index or ``pytorch_model.bin``).
            device: Device of the encoder.
            dtype: Encoder dtype (codeword distances are always computed in float32).
            batch_size: Default slices per forward pass.

        Returns:
            The tokenizer, in eval mode.

        Raises:
            FileNotFoundError: If the folder, a config file or the weights are missing.
            ValueError: On invalid config values, configs that disagree with each other,
                or unreadable weight files.
            NotImplementedError: On config settings this implementation does not reproduce.
            CheckpointError: On missing, unexpected or wrongly shaped tensors (e.g. a
                ``quantize_vocab_size`` that differs from the codebook's rows).
        """
        folder = release_folder(path, "GLM-4-Voice tokenizer")
        config = _read_json(folder / "config.json")
        preprocessor = _read_json(folder / "preprocessor_config.json")
        with torch.device("meta"):
            encoder = build_whisper_vq_encoder(config)
        encoder = encoder.to_empty(device="cpu")
        what = (
            f"WhisperVQEncoder from {folder / 'config.json'} (d_model={encoder.d_model}, "
            f"num_mel_bins={encoder.num_mel_bins}, quantize_position={len(encoder.layers)}, "
            f"quantize_vocab_size={encoder.codebook_size}, "
            f"max_source_positions={encoder.max_source_positions}, "
            f"encoder_ffn_dim={encoder.layers[0].fc1.out_features})"
        )
        _load_encoder_weights(encoder, folder, what)
        encoder = encoder.to(device=device, dtype=dtype)
        return cls(encoder, build_feature_extractor(preprocessor), batch_size=batch_size)

    @property
    def device(self) -> torch.device:
        """Device of the encoder."""
        return self.encoder.codebook.weight.device

    @property
    def dtype(self) -> torch.dtype:
        """Dtype of the encoder."""
        return self.encoder.codebook.weight.dtype

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(codebook_size={self.codebook_size}, frame_rate={self.frame_rate}, "
            f"layers={len(self.encoder.layers)}, d_model={self.encoder.d_model}, "
            f"device={self.device}, dtype={self.dtype})"
        )

    def log_mel(self, slices: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Whisper log-mel features of a batch of slices, as the original tokenizer makes them.

        Slices are right-padded with zeros to the longest one, rounded up to a multiple of
        ``samples_per_id``; each spectrogram is floored at its own maximum minus 8.

        Args:
            slices: Waveforms ``[T_i]`` at ``sample_rate``, each at most ``chunk_samples``.

        Returns:
            ``(mel, frame_mask)``: ``[B, M, F]`` float32 and ``[B, F]`` bool on :attr:`device`,
            ``F = padded_samples / hop_length``; frame ``t`` is real iff ``t * hop < T_i``.

        Raises:
            AudioError: On an invalid waveform.
            ValueError: If a slice is longer than ``chunk_samples`` or ``slices`` is empty.
        """
        if not slices:
            raise ValueError("log_mel needs at least one waveform")
        arrays = []
        for i, wav in enumerate(slices):
            wav = self._checked(wav, i, range_warning=False)  # encode() warned already
            if wav.numel() > self.chunk_samples:
                raise ValueError(
                    f"slice {i} has {wav.numel()} samples, more than chunk_samples={self.chunk_samples}"
                )
            arrays.append(wav.detach().cpu().numpy())
        out = self.feature_extractor(
            arrays,
            sampling_rate=self.sample_rate,
            padding="longest",
            pad_to_multiple_of=self.samples_per_id,
            return_attention_mask=True,
            return_tensors="pt",
            device=str(self.device),
        )
        mel = out["input_features"].to(self.device)
        mask = out["attention_mask"].to(self.device).bool()
        return mel, mask

    @staticmethod
    def _checked(wav: torch.Tensor, index: int, *, range_warning: bool = True) -> torch.Tensor:
        try:
            return check_waveform(wav, range_warning=range_warning)
        except AudioError as e:
            raise AudioError(f"audio[{index}]: {e}") from e

    def _run(
        self,
        audio: Sequence[torch.Tensor],
        batch_size: int | None,
        progress: bool | None,
        sample_rate: int | Sequence[int] | None,
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(ids [N_i], features [N_i, D]) per input; ``sample_rate`` may be one per input."""
        if isinstance(audio, torch.Tensor):
            raise TypeError("encode takes a list of 1-D waveforms; wrap a single one as [wav]")
        rates = sample_rate if isinstance(sample_rate, list) else [sample_rate] * len(audio)
        batch_size = self._check_batch_size(self.batch_size if batch_size is None else batch_size)
        slices: list[torch.Tensor] = []
        owner: list[int] = []
        for i, wav in enumerate(audio):
            wav = prepare_waveform(wav, rates[i], self.sample_rate, what=f"audio[{i}]")
            for start in range(0, wav.numel(), self.chunk_samples):
                slices.append(wav[start : start + self.chunk_samples])
                owner.append(i)
        # Longest first, so each batch pads little; results do not depend on the grouping.
        order = sorted(range(len(slices)), key=lambda s: -slices[s].numel())
        batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
        show = len(batches) > 1 if progress is None else progress
        results: list[tuple[torch.Tensor, torch.Tensor]] = [None] * len(slices)  # type: ignore[list-item]
        with torch.inference_mode():
            for batch in tqdm(batches, desc="glm4voice tokenizer", unit="batch", disable=not show):
                mel, frame_mask = self.log_mel([slices[s] for s in batch])
                out = self.encoder(mel, frame_mask)
                for row, s in enumerate(batch):
                    keep = out.mask[row]
                    results[s] = (out.ids[row][keep].cpu(), out.features[row][keep].float().cpu())
        per_input: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[] for _ in range(len(audio))]
        for s, i in enumerate(owner):
            per_input[i].append(results[s])
        return [
            (torch.cat([r[0] for r in parts]), torch.cat([r[1] for r in parts]))
            for parts in per_input
        ]

    def encode(
        self,
        audio: Sequence[torch.Tensor],
        *,
        sample_rate: int | None = None,
        batch_size: int | None = None,
        progress: bool | None = None,
    ) -> list[torch.Tensor]:
        """Tokenize waveforms.

        Each waveform is cut into ``chunk_samples`` slices that are tokenized independently;
        all slices of the call are batched together (``batch_size`` at a time, longest
        first). Waveforms at another rate must say so with ``sample_rate``: they are resampled
        with soxr (an 8 kHz clip read as 16 kHz would give half the ids, silently).

        Args:
            audio: Waveforms ``[T_i]`` float in ``[-1, 1]``.
            sample_rate: Their rate in Hz; None means :attr:`sample_rate` (16 kHz), with a
                :class:`~mctp.codecs.audio.MissingSampleRateWarning`.
            batch_size: Slices per forward pass (default: the constructor's).
            progress: Show a tqdm bar; None shows one when there is more than one batch.

        Returns:
            One long tensor ``[ceil(T'_i / 1280)]`` (``T'_i`` samples at 16 kHz, summed over
            slices) per waveform, on the CPU.

        Raises:
            TypeError: If ``audio`` is a tensor rather than a list of tensors.
            AudioError: On an empty, non-1-D, non-float or non-finite waveform or a bad
                ``sample_rate``.
            ValueError: If ``batch_size`` is not positive.
        """
        warn_missing_rate(sample_rate, self.sample_rate, "GLM4VoiceTokenizer.encode")
        return [ids for ids, _ in self._run(audio, batch_size, progress, sample_rate)]

    def encode_features(
        self,
        audio: Sequence[torch.Tensor],
        *,
        sample_rate: int | None = None,
        batch_size: int | None = None,
        progress: bool | None = None,
    ) -> list[torch.Tensor]:
        """Pooled hidden states right before quantisation (one row per id of :meth:`encode`).

        Args:
            audio: Waveforms ``[T_i]`` float in ``[-1, 1]``.
            sample_rate: Their rate in Hz (resampled when it is not 16 kHz); None: 16 kHz, with a
                :class:`~mctp.codecs.audio.MissingSampleRateWarning`.
            batch_size: Slices per forward pass (default: the constructor's).
            progress: Show a tqdm bar; None shows one when there is more than one batch.

        Returns:
            One float32 ``[N_i, D]`` tensor per waveform, on the CPU.

        Raises:
            TypeError: If ``audio`` is a tensor rather than a list of tensors.
            AudioError: On an invalid waveform.
            ValueError: If ``batch_size`` is not positive.
        """
        warn_missing_rate(sample_rate, self.sample_rate, "GLM4VoiceTokenizer.encode_features")
        return [feats for _, feats in self._run(audio, batch_size, progress, sample_rate)]

    def encode_file(self, path: str | os.PathLike[str]) -> torch.Tensor:
        """Load an audio file (mono mixdown, resampled to 16 kHz) and tokenize it.

        Args:
            path: Any file libsndfile reads.

        Returns:
            ``[N]`` long ids.

        Raises:
            FileNotFoundError: If the file does not exist.
            AudioError: If it is empty, corrupt or unsupported.
        """
        return self.encode_files([path])[0]

    def encode_files(
        self,
        paths: Sequence[str | os.PathLike[str]],
        *,
        batch_size: int | None = None,
        progress: bool | None = None,
    ) -> list[torch.Tensor]:
        """Load several audio files (resampled to 16 kHz) and tokenize them in one call.

        Args:
            paths: Audio files.
            batch_size: Slices per forward pass (default: the constructor's).
            progress: Show tqdm bars; None shows them for many files / batches.

        Returns:
            One ``[N_i]`` long tensor per file.

        Raises:
            FileNotFoundError: If a file does not exist.
            AudioError: If a file is empty, corrupt or unsupported.
        """
        if isinstance(paths, (str, os.PathLike)):
            raise TypeError("encode_files takes a list of paths; use encode_file for one")
        show = len(paths) > self.batch_size if progress is None else progress
        loaded = [
            load_audio(p) for p in tqdm(paths, desc="loading audio", unit="file", disable=not show)
        ]
        # checked at the file's own rate, then resampled (resampling overshoot never warns)
        audio, rates = [w for w, _ in loaded], [sr for _, sr in loaded]
        return [ids for ids, _ in self._run(audio, batch_size, progress, rates)]
