"""Reading checkpoints and loading them strictly (MCTP heads, backbones, codec adapters)."""

from __future__ import annotations

import fnmatch
import json
import os
import pickle
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["CheckpointError", "load_strict", "read_state_dict", "strip_prefix"]


class CheckpointError(ValueError):
    """A checkpoint does not fit the module it is loaded into.

    Attributes:
        missing: Keys the module expects that the checkpoint lacks.
        unexpected: Keys the checkpoint holds that the module does not know.
        mismatched: ``(key, checkpoint shape, module shape)`` for keys whose shapes differ.
    """

    def __init__(
        self,
        what: str,
        missing: Iterable[str] = (),
        unexpected: Iterable[str] = (),
        mismatched: Iterable[tuple[str, tuple[int, ...], tuple[int, ...]]] = (),
    ) -> None:
        self.missing = sorted(missing)
        self.unexpected = sorted(unexpected)
        self.mismatched = list(mismatched)
        lines = [f"checkpoint does not fit {what}:"]
        if self.missing:
            lines.append(f"  missing keys ({len(self.missing)}): {_short(self.missing)}")
        if self.unexpected:
            lines.append(f"  unexpected keys ({len(self.unexpected)}): {_short(self.unexpected)}")
        for key, got, want in self.mismatched:
            lines.append(f"  shape of {key}: checkpoint {tuple(got)} vs module {tuple(want)}")
        super().__init__("\n".join(lines))


def _short(keys: list[str], limit: int = 20) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def strip_prefix(
    state_dict: Mapping[str, torch.Tensor], prefixes: Iterable[str]
) -> dict[str, torch.Tensor]:
    """Remove the first matching prefix from every key.

    Args:
        state_dict: Checkpoint tensors.
        prefixes: Prefixes tried in order (e.g. ``("model.encoder.",)``); keys without any of
            them are kept as they are.

    Returns:
        A new dict with the prefixes removed.
    """
    prefixes = tuple(prefixes)
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        for p in prefixes:
            if key.startswith(p):
                key = key[len(p) :]
                break
        out[key] = value
    return out


def load_strict(
    module: nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    *,
    ignore: Iterable[str] = (),
    what: str | None = None,
) -> None:
    """Load ``state_dict`` into ``module``, failing loudly on any difference.

    Unlike ``module.load_state_dict(strict=True)`` the error lists every missing,
    unexpected and shape-mismatched key at once, and documented extra tensors can be
    ignored by glob patterns.

    Args:
        module: Target module; its parameters and persistent buffers must all be present.
        state_dict: Checkpoint tensors (already stripped of prefixes).
        ignore: ``fnmatch`` patterns of checkpoint keys that may be present and are skipped
            (e.g. ``"ema_*"``).
        what: Name of the module for the error message.

    Raises:
        CheckpointError: On a missing, unexpected (not ignored) or shape-mismatched key.
    """
    patterns = tuple(ignore)
    own = module.state_dict()
    kept = {
        k: v for k, v in state_dict.items() if not any(fnmatch.fnmatchcase(k, p) for p in patterns)
    }
    missing = set(own) - set(kept)
    unexpected = set(kept) - set(own)
    mismatched = [
        (k, tuple(kept[k].shape), tuple(own[k].shape))
        for k in sorted(set(own) & set(kept))
        if tuple(kept[k].shape) != tuple(own[k].shape)
    ]
    if missing or unexpected or mismatched:
        raise CheckpointError(what or type(module).__name__, missing, unexpected, mismatched)
    module.load_state_dict(kept, strict=True)


_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
"""Single-file checkpoint names looked for in a folder, each also as ``<name>.index.json``."""

_WRAPPERS = ("state_dict", "model_state_dict", "model")
"""Keys under which training checkpoints nest their state dict (unwrapped in this order)."""


def read_state_dict(
    path: str | os.PathLike[str], keep: Callable[[str], bool] | None = None
) -> dict[str, torch.Tensor]:
    """Read the tensors of a checkpoint file or folder onto the CPU.

    ``path`` may be

    * a ``.safetensors`` file;
    * any other file, read with ``torch.load(weights_only=True)`` (``.bin``, ``.pt``...;
      memory-mapped when saved in the zip format); a state dict nested under
      ``state_dict``, ``model_state_dict`` or ``model`` is unwrapped;
    * a folder holding, in this order of preference, ``model.safetensors``, a sharded
      ``model.safetensors.index.json``, ``pytorch_model.bin``, a sharded
      ``pytorch_model.bin.index.json``, or a single ``*.safetensors`` file.

    Args:
        path: The file or folder.
        keep: Called with each key as stored; tensors for which it returns False are not
            returned, not read from safetensors files, and shards whose index entries hold
            no kept key are not opened. None keeps everything.

    Returns:
        Key (as stored) -> tensor.

    Raises:
        FileNotFoundError: If ``path`` does not exist, a folder holds no weights, or a shard
            that holds a kept key is missing.
        ValueError: If a weight file or index cannot be read, or a key is stored in two
            shards.
        CheckpointError: If a ``torch.load`` file does not hold a mapping of tensors.
    """
    out: dict[str, torch.Tensor] = {}
    for file in _weight_files(Path(path), keep):
        part = _read_weight_file(file, keep)
        twice = sorted(set(part) & set(out))
        if twice:
            raise ValueError(f"keys stored in more than one shard: {twice[:10]}")
        out.update(part)
    return out


def _weight_files(path: Path, keep: Callable[[str], bool] | None) -> list[Path]:
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    for name in _WEIGHT_FILES:
        if (path / name).is_file():
            return [path / name]
        index = path / f"{name}.index.json"
        if index.is_file():
            return _shard_files(index, keep)
    found = sorted(path.glob("*.safetensors"))
    if len(found) == 1:
        return found
    present = sorted(p.name for p in path.iterdir())[:20]
    raise FileNotFoundError(
        f"no weights in {path}: expected {' or '.join(_WEIGHT_FILES)} (or a sharded "
        f"*.index.json), or a single *.safetensors file (files: {present})"
    )


def _shard_files(index: Path, keep: Callable[[str], bool] | None) -> list[Path]:
    try:
        data = json.loads(index.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot parse {index}: {e}") from e
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if (
        not isinstance(weight_map, dict)
        or not weight_map
        or not all(isinstance(f, str) for f in weight_map.values())
    ):
        raise ValueError(f"{index} has no 'weight_map' of key -> shard file name")
    names = sorted({f for k, f in weight_map.items() if keep is None or keep(k)})
    files = [index.parent / name for name in names]
    absent = [f.name for f in files if not f.is_file()]
    if absent:
        raise FileNotFoundError(f"shards listed in {index} are missing: {absent}")
    return files


def _read_weight_file(file: Path, keep: Callable[[str], bool] | None) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError, safe_open

    errors = (OSError, RuntimeError, ValueError, EOFError, pickle.UnpicklingError, SafetensorError)
    try:
        if file.suffix == ".safetensors":
            with safe_open(str(file), framework="pt", device="cpu") as f:
                return {k: f.get_tensor(k) for k in f.keys() if keep is None or keep(k)}
        try:
            obj: Any = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            obj = torch.load(file, map_location="cpu", weights_only=True)  # legacy (non-zip)
    except errors as e:
        raise ValueError(f"cannot read checkpoint file {file}: {e}") from e
    for wrapper in _WRAPPERS:
        if isinstance(obj, Mapping) and isinstance(obj.get(wrapper), Mapping):
            obj = obj[wrapper]
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{file} (expected a state dict, got {type(obj).__name__})")
    bad = [str(k) for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{file} (entries that are not tensors)", unexpected=bad)
    return {k: v for k, v in obj.items() if keep is None or keep(k)}
