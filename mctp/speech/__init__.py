"""Speech in, speech out (``mctp.speech``): :class:`SpeechPipeline` and its builders.

``from mctp.speech import build_tiny_pipeline`` gives a pipeline that runs anywhere (a tiny
taught speech LM and a dummy codec, no download); real models get theirs from their own
builders (VITA-Audio: ``examples/vita_audio/pipeline.py``).

The types the pipeline's API takes are re-exported here (the engine and request settings
``EngineConfig``/``GenerationConfig``/``SamplingConfig``, the modes ``Mode``/
``InterleaveSchedule``, ``SpeechVocab`` and the ``AUDIO_PLACEHOLDER`` a prompt marks audio
with), so that the apps built on it (``mctp.serve``, ``mctp.eval``) import nothing but this
package's public names: they never reach into the engine (docs/architecture.md).
"""

from mctp.engine.generation_config import EngineConfig, GenerationConfig
from mctp.engine.sampling import SamplingConfig
from mctp.interleave import InterleaveSchedule, Mode
from mctp.speech_vocab import AUDIO_PLACEHOLDER, SpeechVocab

from .batching import SpeechBatcher
from .builders import build_folder_pipeline, build_tiny_pipeline, load_input_codec
from .pipeline import ASR_PROMPT, TTS_PROMPT, AudioInput, SpeechPipeline, SpeechRequest
from .results import Prompt, SpeechChunk, SpeechResult

__all__ = [
    "ASR_PROMPT",
    "AUDIO_PLACEHOLDER",
    "TTS_PROMPT",
    "AudioInput",
    "EngineConfig",
    "GenerationConfig",
    "InterleaveSchedule",
    "Mode",
    "Prompt",
    "SamplingConfig",
    "SpeechBatcher",
    "SpeechChunk",
    "SpeechPipeline",
    "SpeechRequest",
    "SpeechResult",
    "SpeechVocab",
    "build_folder_pipeline",
    "build_tiny_pipeline",
    "load_input_codec",
]
