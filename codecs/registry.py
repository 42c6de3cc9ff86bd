"""Find the right adapter for a checkpoint folder: ``load_codec(path_or_name)``."""

from __future__ import annotations

import importlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["CodecSpec", "available_codecs", "detect_codec", "load_codec", "register_codec"]


@dataclass(frozen=True)
class CodecSpec:
    """One registered codec.

    Attributes:
        name: Registry name (``"glm4voice-tokenizer"``...).
        kind: ``"tokenizer"``, ``"encoder"`` or ``"decoder"`` (which protocol it implements).
        target: ``"module:Class"``; the class has ``from_pretrained(path, **kwargs)``. Imported
            only when the codec is loaded, so heavy dependencies stay lazy.
        detect: Returns True when a folder holds this codec's files; None for codecs that are
            built without files (the dummy codec).
    """

    name: str
    kind: str
    target: str
    detect: Callable[[Path], bool] | None = None


_REGISTRY: dict[str, CodecSpec] = {}


def register_codec(
    name: str, *, kind: str, target: str, detect: Callable[[Path], bool] | None = None
) -> None:
    """Register a codec adapter (third-party codecs can add themselves here).

    Raises:
        ValueError: If ``name`` is taken or ``kind`` is unknown.
    """
    if kind not in ("tokenizer", "encoder", "decoder"):
        raise ValueError(f"kind must be 'tokenizer', 'encoder' or 'decoder', got {kind!r}")
    if name in _REGISTRY:
        raise ValueError(f"codec {name!r} is already registered")
    _REGISTRY[name] = CodecSpec(name, kind, target, detect)


def available_codecs() -> list[str]:
    """Names of all registered codecs."""
    return sorted(_REGISTRY)


def _read_json(path: Path) -> dict[str, Any]:
    """A JSON object file; ``{}`` when absent.

    Raises:
        ValueError: If the file exists but cannot be read or parsed, or holds no object.
    """
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot parse {path}: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def _is_glm4voice_tokenizer(folder: Path) -> bool:
    """GLM-4-Voice tokenizer folder: a WhisperVQ ``config.json`` and weights.

    Raises:
        ValueError: If ``config.json`` exists but cannot be parsed.
        FileNotFoundError: If a folder that looks like one (weights and a
            ``preprocessor_config.json``) has no ``config.json``.
    """
    weights = any(folder.glob("*.safetensors")) or any(folder.glob("*.bin"))
    config = folder / "config.json"
    looks_like = weights and (folder / "preprocessor_config.json").is_file()
    if looks_like and not config.is_file():
        raise FileNotFoundError(
            f"{folder} holds weights and preprocessor_config.json but no config.json"
        )
    cfg = _read_json(config)
    return "quantize_vocab_size" in cfg and weights


def _is_glm4voice_decoder(folder: Path) -> bool:
    return all((folder / f).is_file() for f in ("config.yaml", "flow.pt", "hift.pt"))


def _is_sensevoice(folder: Path) -> bool:
    cfg = folder / "config.yaml"
    if not (cfg.is_file() and (folder / "model.pt").is_file()):
        return False
    try:
        return "SenseVoiceEncoderSmall" in cfg.read_text(errors="replace")
    except OSError:
        return False


def detect_codec(path: str | os.PathLike[str]) -> str:
    """Name of the codec whose files ``path`` holds.

    A detector that raises (e.g. on an unparsable ``config.json`` of a folder that looks
    like its codec) gives its reason: when no codec matches, that reason is the error.

    Raises:
        FileNotFoundError: If ``path`` is not a folder, or a codec's folder lacks a file it
            needs (e.g. ``config.json``).
        ValueError: If no registered codec recognises the folder (with the reasons detectors
            gave, such as a ``config.json`` parse error), or several do.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"codec checkpoint folder not found: {folder}")
    hits: list[str] = []
    errors: list[tuple[str, Exception]] = []
    for spec in _REGISTRY.values():
        if spec.detect is None:
            continue
        try:
            if spec.detect(folder):
                hits.append(spec.name)
        except (OSError, ValueError) as e:
            errors.append((spec.name, e))
    if not hits and errors:
        first = errors[0][1]
        reasons = "; ".join(f"{n}: {e}" for n, e in errors)
        kind = FileNotFoundError if isinstance(first, FileNotFoundError) else ValueError
        raise kind(f"cannot load the codec folder {folder}: {reasons}") from first
    if not hits:
        files = sorted(p.name for p in folder.iterdir())[:20]
        raise ValueError(
            f"no registered codec recognises {folder} (files: {files}); known codecs: "
            f"{available_codecs()}. Pass name= to choose one."
        )
    if len(hits) > 1:
        raise ValueError(f"{folder} matches several codecs {hits}; pass name= to choose one")
    return hits[0]


def load_codec(
    path_or_name: str | os.PathLike[str], *, name: str | None = None, **kwargs: Any
) -> Any:
    """Load a codec adapter from a checkpoint folder, or build a file-less one by name.

    Args:
        path_or_name: A checkpoint folder (the released layout) or the name of a codec that
            needs no files (``"dummy"``).
        name: Force this registered codec instead of detecting it from the folder.
        **kwargs: Passed to the adapter's ``from_pretrained`` (e.g. ``device``, ``dtype``).

    Returns:
        The adapter (an ``AudioTokenizer``, ``AudioEncoder`` or ``AudioDecoder``).

    Raises:
        FileNotFoundError: If the folder does not exist or lacks a file its codec needs.
        ValueError: If the codec cannot be determined (a config file that cannot be parsed
            is named with its parse error) or ``name`` is unknown.
    """
    path: Path | None
    if name is None and str(path_or_name) in _REGISTRY and not Path(path_or_name).exists():
        name, path = str(path_or_name), None
    else:
        path = Path(path_or_name)
        if name is None:
            name = detect_codec(path)
        elif not path.is_dir():
            raise FileNotFoundError(f"codec checkpoint folder not found: {path}")
    if name not in _REGISTRY:
        raise ValueError(f"unknown codec {name!r}; known codecs: {available_codecs()}")
    spec = _REGISTRY[name]
    module_name, _, attr = spec.target.partition(":")
    cls = getattr(importlib.import_module(module_name), attr)
    return cls.from_pretrained(path, **kwargs)


register_codec(
    "glm4voice-tokenizer",
    kind="tokenizer",
    target="mctp.codecs.glm4voice.tokenizer:GLM4VoiceTokenizer",
    detect=_is_glm4voice_tokenizer,
)
register_codec(
    "glm4voice-decoder",
    kind="decoder",
    target="mctp.codecs.glm4voice.decoder:GLM4VoiceDecoder",
    detect=_is_glm4voice_decoder,
)
register_codec(
    "sensevoice",
    kind="encoder",
    target="mctp.codecs.sensevoice.encoder:SenseVoiceEncoder",
    detect=_is_sensevoice,
)
register_codec("dummy", kind="tokenizer", target="mctp.codecs.dummy:DummyCodec")
