"""mctp: Multiple Cross-modal Token Prediction (VITA-Audio) for any speech LLM.

``import mctp`` needs only ``torch`` and ``einops`` and loads them on first use of a
torch-based name (PEP 562 lazy attributes), so ``import mctp.interleave`` stays free of
any heavy dependency. The sub-packages ``mctp.interleave`` (pure Python), ``mctp.codecs``
and ``mctp.backbones`` live in top-level folders of the repository and are mapped into
this namespace by ``pyproject.toml``; see README's "Layout" section.
"""

from __future__ import annotations

import importlib
from pathlib import Path as _Path
from typing import Any

# Running from a source checkout without an editable install (``python -c`` or
# ``python -m pytest`` from the repository root puts the root's ``mctp/`` first on
# sys.path): the sibling folders ``codecs/``, ``backbones/`` and ``interleave/`` are
# then not inside this package. Extending ``__path__`` with the repository root makes
# ``mctp.codecs`` resolve to ``<root>/codecs`` exactly as the installed mapping does.
_here = _Path(__file__).resolve().parent
if not (_here / "interleave").is_dir():
    _root = _here.parent
    if (_root / "pyproject.toml").is_file() and (_root / "interleave" / "__init__.py").is_file():
        __path__.append(str(_root))  # type: ignore[name-defined]
del _Path, _here

__version__ = "0.1.0"

_EXPORTS: dict[str, str] = {
    "Backbone": "backbone",
    "BackboneParts": "backbone",
    "ChainOutput": "engine.decoding",
    "CheckpointError": "checkpoint",
    "DecodeState": "engine.state",
    "DecoderBlock": "layers",
    "EngineConfig": "engine.generation_config",
    "GenerationConfig": "engine.generation_config",
    "GenerationResult": "engine.result",
    "Generator": "engine.generator",
    "KVCache": "engine.cache",
    "MCTPDecoder": "engine.decoding",
    "MCTPHead": "stack",
    "MCTPLoss": "losses",
    "MCTPOutput": "stack",
    "MCTPStack": "stack",
    "OutputVocab": "vocab",
    "RMSNorm": "layers",
    "RotaryEmbedding": "layers",
    "SamplingConfig": "engine.sampling",
    "SpeechVocab": "speech_vocab",
    "StreamEvent": "engine.segmenter",
    "StreamSegmenter": "engine.segmenter",
    "TokenBuffer": "engine.buffer",
    "TokenPicker": "engine.sampling",
    "chunked_cross_entropy": "losses",
    "count_items": "losses",
    "generate": "engine.generation",
    "generate_stream": "engine.streaming",
    "greedy": "engine.sampling",
    "load_compile_cache": "engine.fast_path",
    "load_strict": "checkpoint",
    "mctp_loss": "losses",
    "sample_logits": "engine.sampling",
    "save_compile_cache": "engine.fast_path",
    "shift_targets": "stack",
    "total_loss": "losses",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'mctp' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
