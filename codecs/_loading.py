"""Helpers shared by the codec adapters' ``from_pretrained`` methods.

Reading checkpoint files is :func:`mctp.checkpoint.read_state_dict`'s job; this module only
checks the released folders.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

__all__ = ["release_folder"]


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
