"""Interleave schedules: which model produces each decoded token, and the data layout.

A ratio ``[T1, A1, T2, A2, ..., Tn, An]`` (even length) drives both inference and the
training-data layout of VITA-Audio's Multiple Cross-modal Token Prediction. The pairs are
used once each, in order, and the last pair repeats forever. Each ``A`` counts the
``<|begin_of_audio|>`` (BOA) and ``<|end_of_audio|>`` (EOA) tags, so an audio segment
holds ``A - 2`` audio tokens.

Inference reads the pattern ``"M"*T1 + "m"*A1 + "M"*T2 + "m"*A2 + ...``, indexed by the
number ``i`` of tokens already decoded (``i = 0`` is the first new token, produced by the
prefill forward). ``"M"`` means the backbone produces token ``i``; ``"m"`` means an MCTP
head does, the ``k``-th ``"m"`` of a run (``k = 0, 1, ...``) using head ``k``. Nominal
roles: an ``"M"`` slot is text; in an ``m``-run of length ``A`` position 0 is BOA,
positions ``1 .. A-2`` are audio and position ``A-1`` is EOA (a real model may deviate,
e.g. its ``"M"`` slots emit audio once its text has run out).

Worked example, Boost ``[1, 10, 4, 10]``::

    i        0   1   2 .. 9  10   11..14    15  16 .. 23  24   25..28   ...
    pattern  M   m   m .. m   m   M M M M   m   m  ..  m   m   M M M M  ...
    head     -   0   1 .. 8   9   - - - -   0   1  ..  8   9   - - - -  ...
    role     T   B   A .. A   E   T T T T   B   A  ..  A   E   T T T T  ...

The prefill forward yields token 0 (text), then one chain of ten MCTP heads yields a
complete audio segment (BOA, 8 audio tokens, EOA): ``cost(11) == (1, 10)``. Four backbone
forwards follow, then the next chain: ``cost(25) == (5, 20)``.

Training data with the same ratio (see :mod:`mctp.interleave.layout`): 10 text tokens
``t0..t9`` and 20 audio tokens ``a0..a19`` give text chunks ``1, 4, 4, 1`` and audio
chunks ``8, 8, 4``; three pairs, the last text chunk absorbing the rest::

    t0 BOA a0..a7 EOA t1..t4 BOA a8..a15 EOA t5..t9 BOA a16..a19 EOA

Vanilla decoding uses the backbone for every token (ratio ``(1, 0)``: one text token and
no MCTP tokens, repeating); it has no audio layout of its own.

Untagged schedules (``tagged=False``, with an ``audio_range``) describe models whose audio
runs carry no BOA/EOA tags, such as GLM-4-Voice (13 text tokens, then 26 audio tokens,
alternately): every slot of an ``m``-run is audio, an ``A`` counts audio tokens only, and
the data layout tells the modalities apart by the audio id range::

    InterleaveSchedule([13, 26], tagged=False, audio_range=(151552, 167936))
    text t0..t29, audio a0..a99  ->  t0..t12 a0..a25 t13..t25 a26..a51 t26..t29 a52..a99
"""

from __future__ import annotations

import operator
from collections.abc import Iterator, Sequence
from typing import Any

from .layout import (
    check_audio_range,
    deinterleave_ids,
    deinterleave_untagged,
    interleave_ids,
    interleave_untagged,
)
from .slots import BACKBONE, PRESETS, Mode, Role, Slot, Source, Step

__all__ = ["BACKBONE", "InterleaveSchedule", "Mode", "Role", "Slot", "Source", "Step"]

_VANILLA_RATIO = (1, 0)


class InterleaveSchedule:
    """A validated text/audio interleave ratio with O(1) slot queries.

    The one-off prefix (all pairs but the last) and one period (the last pair) are
    expanded into small tables once; every per-token query indexes them, with a modulo
    for tokens past the prefix.

    Args:
        ratio: ``[T1, A1, ..., Tn, An]``: even length ``>= 2``, every ``T >= 1``, every
            ``A >= 1``: an ``A >= 2`` counts BOA and EOA; ``A = 1`` is a lone MCTP slot with
            no audio segment around it (the official default ``[1, 1]`` of a one-head model,
            inference only: such a ratio has no training-data layout).
        num_heads: Number of MCTP heads the model has. When given, every ``A`` must be
            ``<= num_heads`` (an ``m``-run of length ``A`` uses heads ``0 .. A-1``).
        name: Display label; defaults to the mode's name when the ratio is a preset.
            Not compared by ``==``.
        tagged: True (VITA-Audio): an ``A >= 2`` run is BOA, ``A - 2`` audio tokens, EOA.
            False: the run is ``A`` audio tokens with no tags (GLM-4-Voice); needs
            ``audio_range``.
        audio_range: ``(start, stop)`` audio ids of an untagged schedule (its data layout
            tells text from audio by this range); must be None for a tagged one.

    Raises:
        ValueError: For an empty or odd-length ratio, a non-int entry, a text count
            ``<= 0``, an audio count ``< 1``, a bad ``num_heads``, an audio count larger
            than ``num_heads``, an untagged schedule without a valid ``audio_range`` or a
            tagged one with it.
    """

    __slots__ = (
        "_audio_range",
        "_bb_period",
        "_bb_prefix_cum",
        "_bb_run_cum",
        "_head_period",
        "_head_prefix",
        "_mode",
        "_name",
        "_num_heads",
        "_period",
        "_period_seg",
        "_prefix",
        "_prefix_segments",
        "_ratio",
        "_role_period",
        "_role_prefix",
        "_run_period",
        "_run_prefix",
        "_seg_period",
        "_seg_prefix",
        "_tagged",
        "_vanilla",
    )

    def __init__(
        self,
        ratio: Sequence[int],
        *,
        num_heads: int | None = None,
        name: str | None = None,
        tagged: bool = True,
        audio_range: tuple[int, int] | None = None,
    ) -> None:
        values = _check_ratio(ratio)
        if not isinstance(tagged, bool):
            raise ValueError(f"tagged must be a bool, got {type(tagged).__name__} {tagged!r}")
        if tagged and audio_range is not None:
            raise ValueError(
                "audio_range is only for untagged schedules (tagged=False): a tagged schedule "
                "finds its audio between BOA and EOA"
            )
        if not tagged:
            if audio_range is None:
                raise ValueError(
                    "an untagged schedule (tagged=False) needs audio_range=(start, stop): "
                    "without tags only the id range tells audio from text"
                )
            audio_range = check_audio_range(audio_range)
        heads = _check_num_heads(num_heads)
        if heads is not None:
            audio = values[1::2]
            if max(audio) > heads:
                pos = 1 + 2 * audio.index(max(audio))
                raise ValueError(
                    f"ratio {values} has an audio run of {max(audio)} slots (ratio[{pos}]) but "
                    f"num_heads={heads}: more MCTP slots than heads"
                )
        self._build(values, heads, name, vanilla=False, tagged=tagged, audio_range=audio_range)

    # ------------------------------------------------------------------ constructors

    @classmethod
    def from_ratio(
        cls, ratio: Sequence[int], *, num_heads: int | None = None
    ) -> InterleaveSchedule:
        """Build a schedule from a ratio list, as stored in official generation configs.

        A ratio whose audio counts are all 0 (the official Vanilla ``[8192, 0]``: the
        pattern ``"M" * 8192`` repeated, so the backbone produces every token) gives
        :meth:`vanilla`; any other ratio gets the constructor's checks.

        Args:
            ratio: ``[T1, A1, ..., Tn, An]``.
            num_heads: As for the constructor.

        Raises:
            ValueError: See :class:`InterleaveSchedule` (a 0 audio count next to non-zero
                ones is refused).
        """
        if not isinstance(ratio, str | bytes) and _is_vanilla_ratio(ratio):
            return cls.vanilla(num_heads=num_heads)
        return cls(ratio, num_heads=num_heads)

    @classmethod
    def from_mode(cls, mode: Mode | str, *, num_heads: int | None = None) -> InterleaveSchedule:
        """Build the schedule of a named mode (``"vanilla"``, ``"balance"``, ...).

        Args:
            mode: A :class:`Mode` or its name, case-insensitive.
            num_heads: Number of MCTP heads of the model, checked against the mode.

        Raises:
            ValueError: For an unknown mode (the message lists the valid ones) or a
                ``num_heads`` too small for the mode.
        """
        if isinstance(mode, Mode):
            resolved = mode
        else:
            key = mode.strip().lower() if isinstance(mode, str) else None
            valid = [m.value for m in Mode]
            if key not in valid:
                raise ValueError(f"unknown interleave mode {mode!r}; valid modes: {valid}")
            resolved = Mode(key)
        if resolved is Mode.VANILLA:
            return cls.vanilla(num_heads=num_heads)
        return cls(PRESETS[resolved], num_heads=num_heads)

    @classmethod
    def vanilla(cls, *, num_heads: int | None = None) -> InterleaveSchedule:
        """Backbone for every token, no MCTP (nominal role TEXT everywhere).

        Args:
            num_heads: Recorded for reference only; Vanilla uses no head.

        Raises:
            ValueError: If ``num_heads`` is not an int ``>= 0``.
        """
        obj = cls.__new__(cls)
        obj._build(_VANILLA_RATIO, _check_num_heads(num_heads), None, vanilla=True)
        return obj

    @classmethod
    def balance(cls, *, num_heads: int | None = None) -> InterleaveSchedule:
        """Balance mode ``[1, 4, 3, 8, 4, 10]``.

        Raises:
            ValueError: If ``num_heads`` is given and smaller than 10.
        """
        return cls(PRESETS[Mode.BALANCE], num_heads=num_heads)

    @classmethod
    def boost(cls, *, num_heads: int | None = None) -> InterleaveSchedule:
        """Boost mode ``[1, 10, 4, 10]``.

        Raises:
            ValueError: If ``num_heads`` is given and smaller than 10.
        """
        return cls(PRESETS[Mode.BOOST], num_heads=num_heads)

    @classmethod
    def turbo(cls, *, num_heads: int | None = None) -> InterleaveSchedule:
        """Turbo mode ``[1, 10]``.

        Raises:
            ValueError: If ``num_heads`` is given and smaller than 10.
        """
        return cls(PRESETS[Mode.TURBO], num_heads=num_heads)

    def _build(
        self,
        ratio: tuple[int, ...],
        num_heads: int | None,
        name: str | None,
        *,
        vanilla: bool,
        tagged: bool = True,
        audio_range: tuple[int, int] | None = None,
    ) -> None:
        """Store the fields and expand the prefix and period tables."""
        self._tagged = tagged
        self._audio_range = audio_range
        self._ratio = ratio
        self._num_heads = num_heads
        self._vanilla = vanilla
        if vanilla:
            self._mode: Mode | None = Mode.VANILLA
        else:
            self._mode = (
                next((m for m, r in PRESETS.items() if r == ratio), None) if tagged else None
            )
        if name is not None and not isinstance(name, str):
            raise ValueError(f"name must be a str or None, got {type(name).__name__} {name!r}")
        self._name = name if name is not None else (self._mode.value if self._mode else None)

        pairs = [(ratio[p], ratio[p + 1]) for p in range(0, len(ratio), 2)]
        head_pre, role_pre, seg_pre, run_pre, segments = _expand(pairs[:-1], tagged)
        head_per, role_per, seg_per, run_per, _ = _expand(pairs[-1:], tagged)
        self._head_prefix, self._head_period = head_pre, head_per
        self._role_prefix, self._role_period = role_pre, role_per
        self._seg_prefix, self._seg_period = seg_pre, seg_per
        self._run_prefix, self._run_period = run_pre, run_per
        self._prefix_segments = segments  # [start, stop) of each prefix m-run
        self._prefix = len(head_pre)
        self._period = len(head_per)
        self._period_seg = pairs[-1][0]  # offset of the m-run inside a period
        self._bb_prefix_cum = _backbone_cumsum(head_pre)
        self._bb_run_cum = _backbone_cumsum(head_per)
        self._bb_period = self._bb_run_cum[-1]

    # ------------------------------------------------------------------ fields

    @property
    def ratio(self) -> tuple[int, ...]:
        """The ratio ``(T1, A1, ..., Tn, An)``; ``(1, 0)`` for Vanilla."""
        return self._ratio

    @property
    def num_heads(self) -> int | None:
        """Number of MCTP heads given at construction, or ``None``."""
        return self._num_heads

    @property
    def name(self) -> str | None:
        """Display label: the given name, else the mode's value, else ``None``."""
        return self._name

    @property
    def mode(self) -> Mode | None:
        """The named mode whose ratio this is, or ``None`` for a custom ratio."""
        return self._mode

    @property
    def tagged(self) -> bool:
        """Whether audio runs are wrapped in BOA ... EOA (False: GLM-4-Voice style)."""
        return self._tagged

    @property
    def audio_range(self) -> tuple[int, int] | None:
        """``(start, stop)`` audio ids of an untagged schedule, else None."""
        return self._audio_range

    @property
    def uses_mctp(self) -> bool:
        """Whether any token is produced by an MCTP head (False only for Vanilla)."""
        return not self._vanilla

    @property
    def max_heads(self) -> int:
        """Number of MCTP heads the schedule uses: ``max(A)``, 0 for Vanilla."""
        return 0 if self._vanilla else max(self._ratio[1::2])

    # ------------------------------------------------------------------ per-token queries

    def _locate(self, i: int, what: str = "i") -> tuple[bool, int]:
        """Map token index ``i`` to ``(in_prefix, table_index)``.

        Raises:
            ValueError: If ``i`` is negative or not an int.
        """
        i = _check_index(i, what)
        if i < self._prefix:
            return True, i
        return False, (i - self._prefix) % self._period

    def head(self, i: int) -> int:
        """Head producing token ``i``: :data:`BACKBONE` or MCTP head ``k``.

        Raises:
            ValueError: If ``i`` is negative.
        """
        pre, t = self._locate(i)
        return self._head_prefix[t] if pre else self._head_period[t]

    def role(self, i: int) -> Role:
        """Nominal role of token ``i``.

        Raises:
            ValueError: If ``i`` is negative.
        """
        pre, t = self._locate(i)
        return self._role_prefix[t] if pre else self._role_period[t]

    def slot(self, i: int) -> Slot:
        """Head and role of token ``i`` together.

        Raises:
            ValueError: If ``i`` is negative.
        """
        return Slot(index=i, head=self.head(i), role=self.role(i))

    def run_length(self, i: int) -> int:
        """Number of MCTP slots right after backbone slot ``i`` (0 if the next is ``"M"``).

        This is the length of the MCTP chain to run after the backbone forward that
        produced token ``i``.

        Raises:
            ValueError: If ``i`` is negative or slot ``i`` is an MCTP slot.
        """
        pre, t = self._locate(i)
        run = self._run_prefix[t] if pre else self._run_period[t]
        if run < 0:
            raise ValueError(
                f"run_length({i}): slot {i} is produced by MCTP head {self.head(i)}, "
                "not by the backbone"
            )
        return run

    def segment(self, j: int) -> tuple[int, int]:
        """Decoded-token range ``[start, stop)`` of the ``j``-th audio segment (``m``-run).

        Raises:
            ValueError: If ``j`` is negative or the schedule is Vanilla.
        """
        if self._vanilla:
            raise ValueError("a Vanilla schedule has no audio segments: every token is 'M'")
        j = _check_index(j, "j")
        if j < len(self._prefix_segments):
            return self._prefix_segments[j]
        start = self._prefix + (j - len(self._prefix_segments)) * self._period + self._period_seg
        return start, start + self._ratio[-1]

    def segment_index(self, i: int) -> int | None:
        """Which audio segment token ``i`` belongs to, ``None`` for a backbone slot.

        Raises:
            ValueError: If ``i`` is negative.
        """
        pre, t = self._locate(i)
        if pre:
            seg = self._seg_prefix[t]
            return None if seg < 0 else seg
        if self._seg_period[t] < 0:
            return None
        return len(self._prefix_segments) + (i - self._prefix) // self._period

    def cost(self, n: int) -> tuple[int, int]:
        """Work needed to produce the first ``n`` tokens.

        Args:
            n: Number of tokens, ``>= 0``.

        Returns:
            ``(backbone_forwards, mctp_head_steps)``, summing to ``n``.

        Raises:
            ValueError: If ``n`` is negative.
        """
        n = _check_index(n, "n")
        if n <= self._prefix:
            forwards = self._bb_prefix_cum[n]
        else:
            periods, rest = divmod(n - self._prefix, self._period)
            forwards = self._bb_prefix_cum[-1] + periods * self._bb_period + self._bb_run_cum[rest]
        return forwards, n - forwards

    def steps(self, n: int) -> Iterator[Step]:
        """The decoding plan for ``n`` tokens, in order.

        Yields one backbone :class:`Step` per ``"M"`` slot and one MCTP :class:`Step` per
        ``m``-run; the steps cover ``[0, n)`` exactly, an MCTP step being cut short at ``n``.

        Args:
            n: Number of tokens to plan, ``>= 0``.

        Raises:
            ValueError: If ``n`` is negative (raised by the call, not lazily).
        """
        return self._iter_steps(_check_index(n, "n"))

    def _iter_steps(self, n: int) -> Iterator[Step]:
        """Generator behind :meth:`steps` (``n`` already validated)."""
        i = 0
        while i < n:
            if self.head(i) == BACKBONE:
                yield Step(Source.BACKBONE, i, 1)
                i += 1
            else:
                stop = self.segment(self.segment_index(i))[1]  # type: ignore[arg-type]
                count = min(stop, n) - i
                yield Step(Source.MCTP, i, count)
                i += count

    def pattern(self, n: int) -> str:
        """The first ``n`` slots as a string of ``"M"`` (backbone) and ``"m"`` (MCTP).

        Raises:
            ValueError: If ``n`` is negative.
        """
        n = _check_index(n, "n")
        return "".join("M" if self.head(i) == BACKBONE else "m" for i in range(n))

    # ------------------------------------------------------------------ data layout

    def _require_layout(self, what: str) -> None:
        if self._vanilla:
            raise ValueError(
                f"{what}() is undefined for a Vanilla schedule: it has no audio layout; "
                "use the schedule of the model's training ratio (e.g. "
                "InterleaveSchedule.from_ratio(...) or .boost()) to lay out training data"
            )
        if self._tagged and min(self._ratio[1::2]) < 2:
            raise ValueError(
                f"{what}() is undefined for ratio {self._ratio}: an audio count of 1 is a lone "
                "MCTP slot (inference only) with no BOA/EOA segment to lay out"
            )

    def interleave(
        self,
        text_ids: Sequence[int],
        audio_ids: Sequence[int],
        boa_id: int | None = None,
        eoa_id: int | None = None,
    ) -> list[int]:
        """Lay out text and audio tokens as training data (VITA-Audio ``text_audio_interval``).

        Text is cut into chunks of ``T1, T2, ..., Tn, Tn, ...`` tokens and audio into
        chunks of ``A1-2, ..., An-2, An-2, ...`` tokens; with ``c`` the smaller chunk count,
        the first ``c-1`` chunks are kept and the ``c``-th of each modality absorbs the
        rest. Empty text gives ``[BOA] + audio + [EOA]``, empty audio gives the text
        unchanged, both empty give ``[]``.

        An untagged schedule cuts audio into chunks of ``A1, ..., An, An, ...`` tokens and
        writes no tags (:func:`~mctp.interleave.layout.interleave_untagged`).

        Args:
            text_ids: Text token ids ``[Nt]``, none equal to a tag id (untagged: none in the
                audio range).
            audio_ids: Audio token ids ``[Na]``, none equal to a tag id (untagged: all in the
                audio range).
            boa_id: The ``<|begin_of_audio|>`` id (tagged schedules only).
            eoa_id: The ``<|end_of_audio|>`` id (tagged schedules only).

        Returns:
            ``text_1 + [BOA] + audio_1 + [EOA] + text_2 + ...`` as a new list
            (untagged: ``text_1 + audio_1 + text_2 + ...``).

        Raises:
            ValueError: For a Vanilla schedule or one with an audio count of 1, ``boa_id == eoa_id``, non-int ids, or a text
                or audio id equal to ``boa_id``/``eoa_id``; tags missing for a tagged schedule
                or given to an untagged one; ids on the wrong side of the audio range.
        """
        self._require_layout("interleave")
        if not self._tagged:
            self._no_tags(boa_id, eoa_id, "interleave")
            return interleave_untagged(
                text_ids,
                audio_ids,
                self._ratio[0::2],
                self._ratio[1::2],
                self._audio_range,  # type: ignore[arg-type]
            )
        boa_id, eoa_id = self._tags(boa_id, eoa_id, "interleave")
        return interleave_ids(
            text_ids,
            audio_ids,
            self._ratio[0::2],
            [a - 2 for a in self._ratio[1::2]],
            boa_id,
            eoa_id,
        )

    def _tags(self, boa_id: int | None, eoa_id: int | None, what: str) -> tuple[int, int]:
        """The tag ids of a tagged schedule's layout call.

        Raises:
            ValueError: If either is missing.
        """
        if boa_id is None or eoa_id is None:
            raise ValueError(f"{what}() of a tagged schedule needs boa_id and eoa_id")
        return boa_id, eoa_id

    def _no_tags(self, boa_id: int | None, eoa_id: int | None, what: str) -> None:
        """Refuse tag ids in an untagged schedule's layout call.

        Raises:
            ValueError: If a tag id is given.
        """
        if boa_id is not None or eoa_id is not None:
            raise ValueError(
                f"{what}() of an untagged schedule takes no boa_id/eoa_id: its audio runs "
                f"have no tags (audio ids {self._audio_range})"
            )

    def deinterleave(
        self,
        ids: Sequence[int],
        boa_id: int | None = None,
        eoa_id: int | None = None,
        *,
        strict: bool = False,
    ) -> tuple[list[int], list[int]]:
        """Invert :meth:`interleave`: split ids into text and audio, dropping the tags.

        Args:
            ids: Interleaved token ids ``[N]``.
            boa_id: The ``<|begin_of_audio|>`` id.
            eoa_id: The ``<|end_of_audio|>`` id.
            strict: Also check that ``ids`` is exactly the layout :meth:`interleave` makes
                for the recovered text and audio (chunk sizes included).

        Returns:
            ``(text_ids, audio_ids)``.

        Raises:
            ValueError: For a Vanilla schedule or one with an audio count of 1, ``boa_id == eoa_id``, unbalanced or nested
                tags, or (with ``strict``) chunk sizes that do not follow the ratio. Untagged
                schedules split by the audio range and take no tag ids.
        """
        self._require_layout("deinterleave")
        if self._tagged:
            boa_id, eoa_id = self._tags(boa_id, eoa_id, "deinterleave")
            text, audio = deinterleave_ids(ids, boa_id, eoa_id)
        else:
            self._no_tags(boa_id, eoa_id, "deinterleave")
            text, audio = deinterleave_untagged(ids, self._audio_range)  # type: ignore[arg-type]
        if strict:
            expected = self.interleave(text, audio, boa_id, eoa_id)
            got = list(ids)
            if expected != got:
                pos = next(
                    (p for p, (a, b) in enumerate(zip(expected, got)) if a != b),
                    min(len(expected), len(got)),
                )
                raise ValueError(
                    f"ids do not follow the layout of ratio {self._ratio}: first difference "
                    f"at position {pos} (expected length {len(expected)}, got {len(got)})"
                )
        return text, audio

    # ------------------------------------------------------------------ dunder

    def __repr__(self) -> str:
        extra = "" if self._tagged else f", tagged=False, audio_range={self._audio_range!r}"
        return (
            f"{type(self).__name__}(ratio={self._ratio!r}, num_heads={self._num_heads!r}, "
            f"name={self._name!r}{extra})"
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, InterleaveSchedule):
            return NotImplemented
        return (
            self._ratio,
            self._num_heads,
            self._vanilla,
            self._tagged,
            self._audio_range,
        ) == (other._ratio, other._num_heads, other._vanilla, other._tagged, other._audio_range)

    def __hash__(self) -> int:
        if self._tagged:  # the hash of tagged schedules is unchanged
            return hash((type(self).__name__, self._ratio, self._num_heads, self._vanilla))
        return hash((type(self).__name__, self._ratio, self._num_heads, self._audio_range))

    def __reduce__(self) -> tuple[Any, ...]:
        return (
            _restore,
            (
                self._ratio,
                self._num_heads,
                self._name,
                self._vanilla,
                self._tagged,
                self._audio_range,
            ),
        )


def _restore(
    ratio: tuple[int, ...],
    num_heads: int | None,
    name: str | None,
    vanilla: bool,
    tagged: bool = True,
    audio_range: tuple[int, int] | None = None,
) -> InterleaveSchedule:
    """Unpickle an :class:`InterleaveSchedule`."""
    if vanilla:
        return InterleaveSchedule.vanilla(num_heads=num_heads)
    return InterleaveSchedule(
        ratio, num_heads=num_heads, name=name, tagged=tagged, audio_range=audio_range
    )


def _check_index(i: int, what: str) -> int:
    """Return ``i`` as an int ``>= 0``.

    Raises:
        ValueError: If ``i`` is negative or not an int.
    """
    if isinstance(i, bool):
        raise ValueError(f"{what} must be an int >= 0, got bool {i!r}")
    try:
        i = operator.index(i)
    except TypeError as err:
        raise ValueError(f"{what} must be an int >= 0, got {type(i).__name__} {i!r}") from err
    if i < 0:
        raise ValueError(f"{what} must be >= 0, got {i}")
    return i


def _check_ratio(ratio: Sequence[int]) -> tuple[int, ...]:
    """Validate a ratio list and return it as a tuple of ints.

    Raises:
        ValueError: See :class:`InterleaveSchedule`.
    """
    if isinstance(ratio, str | bytes):
        raise ValueError(
            f"ratio must be a sequence of ints, got the string {ratio!r}; "
            "use InterleaveSchedule.from_mode() for a named mode"
        )
    try:
        items = list(ratio)
    except TypeError as err:
        raise ValueError(
            f"ratio must be a sequence of ints, got {type(ratio).__name__} {ratio!r}"
        ) from err
    if not items:
        raise ValueError("ratio must not be empty: give [T1, A1, ..., Tn, An]")
    if len(items) % 2:
        raise ValueError(
            f"ratio must have an even length (text, audio pairs), got {len(items)} values: "
            f"{tuple(items)}"
        )
    values: list[int] = []
    for pos, value in enumerate(items):
        if isinstance(value, bool) or not hasattr(type(value), "__index__"):
            raise ValueError(
                f"ratio[{pos}] must be an int, got {type(value).__name__} {value!r} in "
                f"{tuple(items)}"
            )
        values.append(operator.index(value))
    for pos, value in enumerate(values):
        if pos % 2 == 0 and value <= 0:
            raise ValueError(
                f"ratio[{pos}] is a text count and must be >= 1, got {value} in {tuple(values)}"
            )
        if pos % 2 == 1 and value < 1:
            hint = (
                "; use InterleaveSchedule.vanilla() (or from_ratio with every audio count 0) "
                "for backbone-only decoding"
                if value == 0
                else ""
            )
            raise ValueError(
                f"ratio[{pos}] is an audio count (BOA and EOA included, 1 = a lone MCTP slot) "
                f"and must be >= 1, got {value} in {tuple(values)}{hint}"
            )
    return tuple(values)


def _is_vanilla_ratio(ratio: Sequence[int]) -> bool:
    """Whether ``ratio`` is a well-formed list whose audio counts are all 0 (e.g. ``[8192, 0]``)."""
    try:
        items = list(ratio)
    except TypeError:
        return False
    if not items or len(items) % 2:
        return False
    if any(isinstance(v, bool) or not hasattr(type(v), "__index__") for v in items):
        return False
    values = [operator.index(v) for v in items]
    return all(t >= 1 for t in values[::2]) and all(a == 0 for a in values[1::2])


def _check_num_heads(num_heads: int | None) -> int | None:
    """Validate ``num_heads`` (None or an int ``>= 0``).

    Raises:
        ValueError: If it is not an int or is negative.
    """
    if num_heads is None:
        return None
    if isinstance(num_heads, bool) or not hasattr(type(num_heads), "__index__"):
        raise ValueError(
            f"num_heads must be an int >= 0 or None, got {type(num_heads).__name__} {num_heads!r}"
        )
    heads = operator.index(num_heads)
    if heads < 0:
        raise ValueError(f"num_heads must be >= 0, got {heads}")
    return heads


def _expand(
    pairs: Sequence[tuple[int, int]],
    tagged: bool = True,
) -> tuple[
    tuple[int, ...],
    tuple[Role, ...],
    tuple[int, ...],
    tuple[int, ...],
    tuple[tuple[int, int], ...],
]:
    """Expand ``(T, A)`` pairs into per-slot tables.

    Returns:
        ``(heads, roles, segments, runs, spans)``: per slot the head (-1 = backbone), the
        nominal role, the local segment number (-1 for backbone slots), the length of the
        ``m``-run that follows a backbone slot (-1 for MCTP slots), and per pair the
        ``[start, stop)`` span of its ``m``-run.
    """
    heads: list[int] = []
    roles: list[Role] = []
    segs: list[int] = []
    runs: list[int] = []
    spans: list[tuple[int, int]] = []
    for seg, (text, audio) in enumerate(pairs):
        heads += [BACKBONE] * text
        roles += [Role.TEXT] * text
        segs += [-1] * text
        runs += [0] * (text - 1) + [audio]
        spans.append((len(heads), len(heads) + audio))
        heads += range(audio)
        if audio == 1 or not tagged:  # a lone MCTP slot or an untagged run: no tags
            roles += [Role.AUDIO] * audio
        elif audio:
            roles += [Role.BOA, *[Role.AUDIO] * (audio - 2), Role.EOA]
        segs += [seg] * audio
        runs += [-1] * audio
    return tuple(heads), tuple(roles), tuple(segs), tuple(runs), tuple(spans)


def _backbone_cumsum(heads: Sequence[int]) -> tuple[int, ...]:
    """Prefix sums of backbone slots: entry ``k`` counts backbone slots among ``heads[:k]``."""
    out = [0]
    for h in heads:
        out.append(out[-1] + (h == BACKBONE))
    return tuple(out)
