"""Data types of interleave schedules: modes, roles, slots and decoding steps.

Pure Python; see :mod:`mctp.interleave.schedule` for the semantics.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

__all__ = ["BACKBONE", "PRESETS", "Mode", "Role", "Slot", "Source", "Step"]

BACKBONE: int = -1
"""The head index of backbone slots (MCTP heads are numbered from 0)."""


class Mode(enum.StrEnum):
    """The named inference modes of VITA-Audio (a ``str`` enum: ``Mode.BOOST == "boost"``)."""

    VANILLA = "vanilla"
    BALANCE = "balance"
    BOOST = "boost"
    TURBO = "turbo"


class Role(enum.Enum):
    """Nominal role of a decoded token."""

    TEXT = "text"
    BOA = "boa"
    AUDIO = "audio"
    EOA = "eoa"


class Source(enum.Enum):
    """Who produces the tokens of a :class:`Step`."""

    BACKBONE = "backbone"
    MCTP = "mctp"


@dataclass(frozen=True)
class Slot:
    """One decoded-token position of a schedule.

    Attributes:
        index: Number of tokens decoded before this one (0 = first new token).
        head: :data:`BACKBONE` (-1) or the MCTP head ``k >= 0`` that produces the token.
        role: Nominal role of the token.
    """

    index: int
    head: int
    role: Role

    @property
    def source(self) -> Source:
        """:attr:`Source.BACKBONE` for backbone slots, else :attr:`Source.MCTP`."""
        return Source.BACKBONE if self.head == BACKBONE else Source.MCTP


@dataclass(frozen=True)
class Step:
    """One unit of work in a decoding plan.

    A backbone step is one forward producing one token (``count == 1``); an MCTP step is a
    chain of ``count`` heads ``0 .. count-1`` producing tokens ``start .. start+count-1``.

    Attributes:
        source: Who produces the tokens.
        start: Index of the first token produced.
        count: Number of tokens produced, ``>= 1`` (exactly 1 for the backbone).

    Raises:
        ValueError: If ``start < 0``, ``count < 1``, or a backbone step has ``count != 1``.
    """

    source: Source
    start: int
    count: int

    def __post_init__(self) -> None:
        if not isinstance(self.source, Source):
            raise ValueError(f"Step.source must be a Source, got {self.source!r}")
        if self.start < 0 or self.count < 1:
            raise ValueError(
                f"Step needs start >= 0 and count >= 1, got start={self.start}, count={self.count}"
            )
        if self.source is Source.BACKBONE and self.count != 1:
            raise ValueError(f"a backbone Step produces exactly 1 token, got count={self.count}")

    @property
    def stop(self) -> int:
        """One past the index of the last token produced."""
        return self.start + self.count


PRESETS: dict[Mode, tuple[int, ...]] = {
    Mode.BALANCE: (1, 4, 3, 8, 4, 10),
    Mode.BOOST: (1, 10, 4, 10),
    Mode.TURBO: (1, 10),
}
"""Ratios of the named modes (Vanilla has none: every token is the backbone's)."""
