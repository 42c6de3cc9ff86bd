"""SenseVoiceSmall encoder (front end, SANM encoder, adapter) for VITA-Audio-Plus."""

from .encoder import (
    LANGUAGE_IDS,
    TEXT_NORM_IDS,
    SenseVoiceEncoder,
    SenseVoiceEncoderSmall,
    SenseVoiceSmallModel,
    query_ids,
)
from .frontend import SenseVoiceFrontend, load_cmvn, write_cmvn

__all__ = [
    "LANGUAGE_IDS",
    "TEXT_NORM_IDS",
    "SenseVoiceEncoder",
    "SenseVoiceEncoderSmall",
    "SenseVoiceFrontend",
    "SenseVoiceSmallModel",
    "load_cmvn",
    "query_ids",
    "write_cmvn",
]
