"""Launching torchrun in tests: one retry when a rank dies of a native abort.

A rank of a 2-process gloo run has died, rarely (CI once in about twenty runs, locally once in
a fresh clone, in two different tests), of ``terminate called without an active exception``
(SIGABRT) right after loading its data: inside torch's C++ side, no Python error, never
reproduced on demand. Such a run gets one fresh retry with a warning carrying its stderr; a
second abort, a Python error or a wrong result still fails the test.
"""

from __future__ import annotations

import subprocess
import warnings
from collections.abc import Callable, Sequence
from typing import Any


def native_abort(p: subprocess.CompletedProcess) -> bool:
    """Whether a torchrun launch failed because a rank aborted natively."""
    return p.returncode != 0 and "terminate called" in p.stderr and "SIGABRT" in p.stderr


def run_torchrun(
    argv: Sequence[str], *, before_retry: Callable[[], None] | None = None, **kwargs: Any
) -> subprocess.CompletedProcess:
    """``subprocess.run(argv, capture_output=True, text=True, **kwargs)``, once more after a
    native abort (``before_retry`` first: e.g. empty the output folder)."""
    for attempt in (1, 2):
        p = subprocess.run(list(argv), capture_output=True, text=True, **kwargs)
        if not native_abort(p) or attempt == 2:
            return p
        warnings.warn(f"a rank aborted natively, retrying once:\n{p.stderr[-1500:]}", stacklevel=2)
        if before_retry is not None:
            before_retry()
    raise AssertionError("unreachable")
