"""Speech in, speech out (``mctp.speech``): :class:`SpeechPipeline` and its builders.

``from mctp.speech import build_tiny_pipeline`` gives a pipeline that runs anywhere (a tiny
taught speech LM and a dummy codec, no download); real models get theirs from their own
builders (VITA-Audio: ``examples/vita_audio/pipeline.py``).
"""

from .batching import SpeechBatcher
from .builders import build_folder_pipeline, build_tiny_pipeline, load_input_codec
from .pipeline import ASR_PROMPT, TTS_PROMPT, AudioInput, SpeechPipeline, SpeechRequest
from .results import Prompt, SpeechChunk, SpeechResult

__all__ = [
    "ASR_PROMPT",
    "TTS_PROMPT",
    "AudioInput",
    "Prompt",
    "SpeechBatcher",
    "SpeechChunk",
    "SpeechPipeline",
    "SpeechRequest",
    "SpeechResult",
    "build_folder_pipeline",
    "build_tiny_pipeline",
    "load_input_codec",
]
