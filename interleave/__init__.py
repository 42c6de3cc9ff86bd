"""Interleave schedules for Multiple Cross-modal Token Prediction (pure Python).

:class:`InterleaveSchedule` turns a VITA-Audio ratio ``[T1, A1, ..., Tn, An]`` into the
per-token plan used at inference (backbone ``"M"`` or MCTP head ``k`` for every decoded
token, with O(1) queries) and into the training-data layout (text chunks alternating
with ``BOA audio EOA`` segments). Named modes: Vanilla, Balance, Boost, Turbo. This
package imports nothing beyond the standard library.
"""

from .schedule import InterleaveSchedule
from .slots import BACKBONE, Mode, Role, Slot, Source, Step

__all__ = ["BACKBONE", "InterleaveSchedule", "Mode", "Role", "Slot", "Source", "Step"]
