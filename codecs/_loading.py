"""Helpers shared by the codec adapters' ``from_pretrained`` methods.

Reading checkpoint files is :func:`mctp.checkpoint.read_state_dict`'s job; this module only
checks the released folders.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from mctp.checkpoint import CheckpointError

__all__ = ["check_finite", "release_folder"]


def release_folder(path: str | os.PathLike[str], what: str, files: Sequence[str] = ()) -> Path:
    """Check that a released model folder exists and holds the files an adapter needs.

    Args:
        path: The folder.
        what: Name of the release for the error message (e.g. ``"SenseVoice"``).
        files: File names that must exist in the folder.

    Returns:
        ``Path(path)``.

    Raises:
        FileNotFoundError: If the folder does not exist (message ``"<what> folder not found:
            <path>"``) or lacks some of ``files`` (all absent names are listed).
    """
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"{what} folder not found: {folder}")
    missing = [name for name in files if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{what} folder {folder} lacks {missing}")
    return folder


def check_finite(state: Mapping[str, torch.Tensor], what: str) -> None:
    """Refuse a checkpoint whose floating-point tensors hold NaN or infinite values.

    Such weights load without complaint and then silently produce garbage (every id 0, NaN
    audio), so they are caught at load time.

    Args:
        state: The state dict read from the checkpoint.
        what: Name of the checkpoint for the message.

    Raises:
        CheckpointError: Naming every tensor (up to 10) with NaN or infinite values.
    """
    bad = [
        f"{key} ({int(torch.isnan(v).sum())} NaN, {int(torch.isinf(v).sum())} inf)"
        for key, v in state.items()
        if isinstance(v, torch.Tensor)
        and v.is_floating_point()
        and not bool(torch.isfinite(v).all())
    ]
    if bad:
        err = CheckpointError(what)
        err.args = (
            f"checkpoint {what} holds NaN or infinite values in {len(bad)} tensors: {bad[:10]}",
        )
        raise err
