"""What the recipe says when the machine fails it: a full disk, an unreadable checkpoint.

:func:`disk_guard` turns ENOSPC (and torch's ``enforce fail ... PytorchStreamWriter`` write
errors) into a :class:`DiskFullError` naming the folder, the file system and its free space;
:func:`checkpoint_problem` reads every file header of a Trainer checkpoint so that resume can
skip a truncated one with a reason. Used by ``train.py``.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import zipfile
from collections.abc import Iterator
from pathlib import Path

__all__ = ["DiskFullError", "checkpoint_problem", "disk_guard", "one_line"]


def one_line(e: BaseException) -> str:
    """``Type: message`` on one line (whitespace of the message collapsed)."""
    text = " ".join(str(e).split()) or repr(e)
    return f"{type(e).__name__}: {text}"


class DiskFullError(OSError):
    """The disk filled up while the recipe wrote (the message names the folder and free space)."""


_WRITE_FAILURES = ("no space left", "file write failed", "pytorchstreamwriter", "unexpected pos")


def _is_disk_full(e: BaseException | None) -> bool:
    """An ENOSPC/EDQUOT ``OSError``, or torch's ``enforce fail`` write error, in ``e``'s chain."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if isinstance(e, RuntimeError) and any(m in str(e).lower() for m in _WRITE_FAILURES):
            return True
        e = e.__cause__ or e.__context__
    return False


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


@contextlib.contextmanager
def disk_guard(folder: str | Path) -> Iterator[None]:
    """Turn a full disk during the body (checkpoints, exports) into a :class:`DiskFullError`.

    Catches ``OSError`` with ``ENOSPC``/``EDQUOT`` and torch's ``enforce fail ...
    PytorchStreamWriter failed writing`` family anywhere in the exception chain.

    Raises:
        DiskFullError: Naming ``folder``, the file system it lives on and the space left there.
    """
    try:
        yield
    except Exception as e:
        if not _is_disk_full(e):
            raise
        where = Path(folder).resolve()
        mount = where
        while not mount.exists():
            mount = mount.parent
        while not os.path.ismount(mount) and mount != mount.parent:
            mount = mount.parent
        usage = shutil.disk_usage(mount)
        raise DiskFullError(
            errno.ENOSPC,
            f"disk full while writing under {where}: the file system mounted at {mount} has "
            f"{_size(usage.free)} free of {_size(usage.total)} ({one_line(e)}); free space "
            "there, lower run.save_total_limit or point run.out_dir at a larger disk",
        ) from e


def checkpoint_problem(folder: str | Path) -> str | None:
    """Why a Trainer checkpoint folder cannot be resumed from, or None when it looks whole.

    Reads every file's header without loading tensors: JSON files parse, safetensors headers
    cover their files, ``torch.save`` archives have their central directory (a truncated copy
    loses it), and ``trainer_state.json`` is present.
    """
    from safetensors import safe_open

    folder = Path(folder)
    if not (folder / "trainer_state.json").is_file():
        return f"no trainer_state.json in {folder}"
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        try:
            if file.suffix == ".json":
                if not isinstance(json.loads(file.read_text()), dict):
                    return f"{file} does not hold a JSON object"
            elif file.suffix == ".safetensors":
                with safe_open(str(file), framework="pt", device="cpu") as f:
                    f.keys()
            elif file.suffix in (".pt", ".pth", ".bin"):
                with zipfile.ZipFile(file) as z:
                    z.infolist()
        except Exception as e:  # any reader error means: not resumable
            return f"{file} cannot be read ({one_line(e)})"
    return None
