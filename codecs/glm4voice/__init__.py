"""GLM-4-Voice speech tokenizer (Whisper-VQ) and decoder (flow matching + HiFT)."""

from .config import load_decoder_config
from .decoder import (
    WEB_DEMO_BLOCK_SIZES,
    GLM4VoiceDecoder,
    GLM4VoiceDecoderStream,
    iter_web_demo_chunks,
)
from .tokenizer import GLM4VoiceTokenizer
from .whisper_vq import WhisperVQEncoder

__all__ = [
    "WEB_DEMO_BLOCK_SIZES",
    "GLM4VoiceDecoder",
    "GLM4VoiceDecoderStream",
    "GLM4VoiceTokenizer",
    "WhisperVQEncoder",
    "iter_web_demo_chunks",
    "load_decoder_config",
]
