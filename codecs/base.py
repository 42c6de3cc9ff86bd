"""Narrow interfaces every speech LLM can plug a codec into.

The three protocols are structural (``typing.Protocol``): any object with these
attributes and methods is accepted; nothing has to inherit from them.

Conventions shared by all codecs:
    * Waveforms are float32 tensors in ``[-1, 1]``, shape ``[T]`` (mono); batched inputs are
      lists of such tensors (lengths may differ). ``encode(audio, sample_rate=sr)`` takes
      their rate and resamples to the codec's ``sample_rate`` (None: already at it).
    * Token ids are ``torch.long`` tensors of shape ``[N]``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import torch

__all__ = ["AudioDecoder", "AudioEncoder", "AudioTokenizer", "DecoderStream"]


@runtime_checkable
class AudioTokenizer(Protocol):
    """Waveform -> discrete ids (e.g. GLM-4-Voice's 12.5 Hz Whisper-VQ tokenizer).

    Attributes:
        sample_rate: Sample rate (Hz) the waveform must have.
        frame_rate: Tokens per second of audio.
        codebook_size: Number of distinct ids (ids lie in ``[0, codebook_size)``).
    """

    sample_rate: int
    frame_rate: float
    codebook_size: int

    def encode(
        self, audio: Sequence[torch.Tensor], *, sample_rate: int | None = None
    ) -> list[torch.Tensor]:
        """Tokenize a batch of waveforms.

        Args:
            audio: A list of waveforms, each ``[T_i]`` float32 in ``[-1, 1]``.
            sample_rate: Their rate in Hz; None means the codec's ``sample_rate``. Another
                rate is resampled (or refused with ``AudioError``), never misread.

        Returns:
            One ``[N_i]`` long tensor per waveform.
        """
        ...


@runtime_checkable
class AudioEncoder(Protocol):
    """Waveform -> continuous frames for an adapter (e.g. SenseVoiceSmall, 512-d).

    Attributes:
        sample_rate: Sample rate (Hz) the waveform must have.
        frame_rate: Output frames per second (before any prepended query frames).
        output_dim: Size ``D`` of each output frame.
    """

    sample_rate: int
    frame_rate: float
    output_dim: int

    def encode(
        self, audio: Sequence[torch.Tensor], *, sample_rate: int | None = None
    ) -> list[torch.Tensor]:
        """Encode a batch of waveforms.

        Args:
            audio: A list of waveforms, each ``[T_i]`` float32 in ``[-1, 1]``.
            sample_rate: Their rate in Hz; None means the codec's ``sample_rate``. Another
                rate is resampled (or refused with ``AudioError``), never misread.

        Returns:
            One ``[F_i, D]`` float tensor per waveform.
        """
        ...


@runtime_checkable
class DecoderStream(Protocol):
    """Incremental decoding session returned by :meth:`AudioDecoder.stream`."""

    def push(self, ids: torch.Tensor, *, final: bool = False) -> torch.Tensor:
        """Feed the next chunk of ids and get the audio that is ready.

        Args:
            ids: ``[N]`` long, the new ids (not the ones pushed before).
            final: True for the last chunk: everything held back is flushed.

        Returns:
            ``[S]`` float32 samples at the decoder's ``sample_rate`` (may be empty).
        """
        ...

    def reset(self) -> None:
        """Forget all state so that the session can decode a new utterance."""
        ...


@runtime_checkable
class AudioDecoder(Protocol):
    """Discrete ids -> waveform, offline and streaming.

    Attributes:
        sample_rate: Output sample rate (Hz).
        frame_rate: Input ids per second of audio.
        codebook_size: Number of distinct ids accepted.
    """

    sample_rate: int
    frame_rate: float
    codebook_size: int

    def decode(self, ids: torch.Tensor) -> torch.Tensor:
        """Decode one utterance offline.

        Args:
            ids: ``[N]`` long.

        Returns:
            ``[S]`` float32 waveform.
        """
        ...

    def stream(self) -> DecoderStream:
        """Open a streaming session (see :class:`DecoderStream`)."""
        ...
