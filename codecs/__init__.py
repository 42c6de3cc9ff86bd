"""Codec adapters (imported as ``mctp.codecs``; the folder is ``codecs/``, see README).

Heavy modules are imported lazily: ``import mctp.codecs`` loads only the protocols, the
audio helpers and the registry.
"""

from .audio import AudioError, load_audio, resample, to_mono
from .base import AudioDecoder, AudioEncoder, AudioTokenizer, DecoderStream
from .dummy import DummyCodec
from .projector import MLPProjector, scatter_audio_embeddings
from .registry import available_codecs, detect_codec, load_codec, register_codec

__all__ = [
    "AudioDecoder",
    "AudioEncoder",
    "AudioError",
    "AudioTokenizer",
    "DecoderStream",
    "DummyCodec",
    "MLPProjector",
    "available_codecs",
    "detect_codec",
    "load_audio",
    "load_codec",
    "register_codec",
    "resample",
    "scatter_audio_embeddings",
    "to_mono",
]
