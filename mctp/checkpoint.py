"""Strict state-dict loading shared by the MCTP heads, backbones and codec adapters."""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Mapping

import torch
from torch import nn

__all__ = ["CheckpointError", "load_strict", "strip_prefix"]


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
