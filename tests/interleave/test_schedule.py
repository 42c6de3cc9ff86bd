"""Hand-computed expectations for ``mctp.interleave`` (schedules, costs, data layout)."""

from __future__ import annotations

import copy
import pickle
import subprocess
import sys
from pathlib import Path

import pytest

from mctp.interleave import BACKBONE, InterleaveSchedule, Mode, Role, Slot, Source, Step

REPO_ROOT = Path(__file__).resolve().parents[2]
B, E = -1, -2  # BOA / EOA ids used in the layout examples

# First 30 slots, written out by hand from the ratio definitions.
PATTERNS = {
    "boost": "M" + "m" * 10 + "MMMM" + "m" * 10 + "MMMM" + "m",
    "balance": "M" + "mmmm" + "MMM" + "mmmmmmmm" + "MMMM" + "mmmmmmmmmm",
    "turbo": "M" + "m" * 10 + "M" + "m" * 10 + "M" + "m" * 7,
}
# Head per slot, "-" for the backbone, digit k for MCTP head k.
HEADS = {
    "boost": "-0123456789----0123456789----0",
    "balance": "-0123---01234567----0123456789",
    "turbo": "-0123456789-0123456789-0123456",
}


def _heads(code: str) -> list[int]:
    return [BACKBONE if c == "-" else int(c) for c in code]


# ---------------------------------------------------------------- inference pattern


@pytest.mark.parametrize("mode", ["boost", "balance", "turbo"])
def test_first_30_slots(mode: str) -> None:
    sched = InterleaveSchedule.from_mode(mode)
    assert len(PATTERNS[mode]) == len(HEADS[mode]) == 30
    assert sched.pattern(30) == PATTERNS[mode]
    heads = _heads(HEADS[mode])
    assert [sched.head(i) for i in range(30)] == heads
    assert [sched.slot(i).head for i in range(30)] == heads
    assert all((c == "M") == (h == "-") for c, h in zip(PATTERNS[mode], HEADS[mode]))


def test_boost_roles_and_slots() -> None:
    sched = InterleaveSchedule.boost()
    txt, boa, aud, eoa = Role.TEXT, Role.BOA, Role.AUDIO, Role.EOA
    segment = [boa, aud, aud, aud, aud, aud, aud, aud, aud, eoa]
    expected = [txt, *segment, txt, txt, txt, txt, *segment, txt]
    assert [sched.role(i) for i in range(26)] == expected
    assert sched.slot(0) == Slot(index=0, head=BACKBONE, role=Role.TEXT)
    assert sched.slot(10) == Slot(index=10, head=9, role=Role.EOA)
    assert sched.slot(0).source is Source.BACKBONE and sched.slot(1).source is Source.MCTP


def test_balance_roles_far_out() -> None:
    sched = InterleaveSchedule.balance()
    # Prefix is 16 slots (1+4+3+8), then periods of 14 (4 M + 10 m).
    assert sched.role(1) is Role.BOA and sched.role(4) is Role.EOA
    assert sched.role(8) is Role.BOA and sched.role(15) is Role.EOA
    i = 16 + 14 * 1000
    assert [sched.role(i + k) for k in (0, 3, 4, 5, 12, 13)] == [
        Role.TEXT,
        Role.TEXT,
        Role.BOA,
        Role.AUDIO,
        Role.AUDIO,
        Role.EOA,
    ]
    assert sched.head(i + 13) == 9
    assert sched.head(10**15 * 14 + 16) == BACKBONE


def test_vanilla_is_all_backbone() -> None:
    sched = InterleaveSchedule.vanilla()
    assert sched.mode is Mode.VANILLA and not sched.uses_mctp and sched.max_heads == 0
    assert sched.pattern(50) == "M" * 50
    assert all(sched.head(i) == BACKBONE and sched.role(i) is Role.TEXT for i in range(50))
    assert sched.head(10**12) == BACKBONE
    assert sched.segment_index(7) is None and sched.run_length(7) == 0
    assert sched.cost(37) == (37, 0)
    assert list(sched.steps(3)) == [Step(Source.BACKBONE, i, 1) for i in range(3)]
    assert InterleaveSchedule.from_mode("vanilla") == sched


@pytest.mark.parametrize(
    ("mode", "n", "expected"),
    [
        ("boost", 0, (0, 0)),
        ("boost", 1, (1, 0)),
        ("boost", 11, (1, 10)),
        ("boost", 12, (2, 10)),
        ("boost", 25, (5, 20)),
        ("boost", 29, (9, 20)),
        ("balance", 5, (1, 4)),
        ("balance", 30, (8, 22)),
        ("balance", 40, (12, 28)),
        ("turbo", 22, (2, 20)),
        ("turbo", 100, (10, 90)),
        ("turbo", 11 * 10**9, (10**9, 10 * 10**9)),
    ],
)
def test_cost(mode: str, n: int, expected: tuple[int, int]) -> None:
    assert InterleaveSchedule.from_mode(mode).cost(n) == expected


def test_segments_and_run_lengths() -> None:
    boost = InterleaveSchedule.boost()
    assert [boost.segment(j) for j in range(3)] == [(1, 11), (15, 25), (29, 39)]
    assert [boost.segment_index(i) for i in (0, 1, 10, 11, 14, 15, 29)] == [
        None,
        0,
        0,
        None,
        None,
        1,
        2,
    ]
    assert [boost.run_length(i) for i in (0, 11, 12, 13, 14, 25, 28)] == [10, 0, 0, 0, 10, 0, 10]

    balance = InterleaveSchedule.balance()
    assert [balance.segment(j) for j in range(4)] == [(1, 5), (8, 16), (20, 30), (34, 44)]
    assert [balance.run_length(i) for i in (0, 5, 6, 7, 16, 19, 33)] == [4, 0, 0, 8, 0, 10, 10]
    assert balance.segment_index(43) == 3 and balance.segment_index(44) is None

    turbo = InterleaveSchedule.turbo()
    assert [turbo.segment(j) for j in range(3)] == [(1, 11), (12, 22), (23, 33)]
    assert turbo.segment_index(10**9 * 11 + 5) == 10**9


def test_steps_plan() -> None:
    boost = InterleaveSchedule.boost()
    assert list(boost.steps(13)) == [
        Step(Source.BACKBONE, 0, 1),
        Step(Source.MCTP, 1, 10),
        Step(Source.BACKBONE, 11, 1),
        Step(Source.BACKBONE, 12, 1),
    ]
    assert list(boost.steps(5)) == [Step(Source.BACKBONE, 0, 1), Step(Source.MCTP, 1, 4)]
    assert list(boost.steps(0)) == []
    balance = InterleaveSchedule.balance()
    assert [(s.source, s.start, s.stop) for s in balance.steps(10)] == [
        (Source.BACKBONE, 0, 1),
        (Source.MCTP, 1, 5),
        (Source.BACKBONE, 5, 6),
        (Source.BACKBONE, 6, 7),
        (Source.BACKBONE, 7, 8),
        (Source.MCTP, 8, 10),
    ]


def test_zero_audio_delay_in_boost_and_turbo() -> None:
    for sched in (InterleaveSchedule.boost(), InterleaveSchedule.turbo()):
        assert sched.cost(11) == (1, 10)
        assert [sched.role(i) for i in range(1, 11)] == [Role.BOA] + [Role.AUDIO] * 8 + [Role.EOA]


# ---------------------------------------------------------------- constructors, fields, dunders


def test_modes_and_fields() -> None:
    assert InterleaveSchedule.from_mode(Mode.BOOST) == InterleaveSchedule.boost()
    assert InterleaveSchedule.from_mode(" Turbo ").ratio == (1, 10)
    assert InterleaveSchedule.from_mode("balance", num_heads=10).num_heads == 10
    boost = InterleaveSchedule.from_ratio([1, 10, 4, 10])
    assert (
        boost.mode is Mode.BOOST and boost.name == "boost" and boost == InterleaveSchedule.boost()
    )
    custom = InterleaveSchedule((2, 6), num_heads=8, name="mine")
    assert custom.mode is None and custom.name == "mine" and custom.max_heads == 6
    assert custom.uses_mctp and custom.ratio == (2, 6)
    assert InterleaveSchedule((2, 6)).name is None
    assert Mode("boost") is Mode.BOOST and Mode.BOOST == "boost"


@pytest.mark.parametrize("ratio", [[8192, 0], (1, 0), [3, 0, 5, 0]])
def test_from_ratio_all_zero_audio_is_vanilla(ratio: list[int]) -> None:
    """The official generation configs store Vanilla as ``[8192, 0]``."""
    sched = InterleaveSchedule.from_ratio(ratio, num_heads=1)
    assert sched == InterleaveSchedule.vanilla(num_heads=1) and sched.mode is Mode.VANILLA
    assert not sched.uses_mctp and sched.max_heads == 0 and sched.pattern(9) == "M" * 9
    with pytest.raises(ValueError, match=r"use InterleaveSchedule\.vanilla"):
        InterleaveSchedule(ratio)  # the constructor keeps refusing it
    for bad in ([8192, 0, 1], [0, 0], [True, 0], [8192, 0, 4, 10]):
        with pytest.raises(ValueError):
            InterleaveSchedule.from_ratio(bad)


def test_lone_mctp_slot_runs() -> None:
    """``[1, 1]``: the official default ``[1, K]`` of a one-head model alternates M and m."""
    sched = InterleaveSchedule.from_ratio([1, 1], num_heads=1)
    assert sched.pattern(8) == "MmMmMmMm" and sched.max_heads == 1 and sched.uses_mctp
    assert [sched.head(i) for i in range(4)] == [BACKBONE, 0, BACKBONE, 0]
    assert sched.role(1) is Role.AUDIO and sched.run_length(0) == 1
    assert sched.cost(7) == (4, 3) and sched.segment(2) == (5, 6)
    mixed = InterleaveSchedule([2, 1, 1, 4])
    assert mixed.pattern(10) == "MMmMmmmmMm"
    assert [mixed.role(i) for i in range(4, 8)] == [Role.BOA, Role.AUDIO, Role.AUDIO, Role.EOA]
    with pytest.raises(ValueError, match="lone MCTP slot"):
        sched.interleave([5], [7], 1, 2)
    with pytest.raises(ValueError, match="lone MCTP slot"):
        mixed.deinterleave([5], 1, 2)
    with pytest.raises(ValueError, match="num_heads=0"):
        InterleaveSchedule([1, 1], num_heads=0)


def test_repr_eq_hash_pickle() -> None:
    sched = InterleaveSchedule([1, 4, 3, 8, 4, 10], num_heads=10)
    assert (
        repr(sched) == "InterleaveSchedule(ratio=(1, 4, 3, 8, 4, 10), num_heads=10, name='balance')"
    )
    assert sched == InterleaveSchedule.balance(num_heads=10)
    assert sched != InterleaveSchedule.balance()
    assert sched != InterleaveSchedule.boost(num_heads=10)
    assert sched != "balance"
    # The display name is not part of equality.
    assert InterleaveSchedule((2, 6), name="a") == InterleaveSchedule((2, 6), name="b")
    assert len({sched, InterleaveSchedule.balance(num_heads=10), InterleaveSchedule.turbo()}) == 2
    for obj in (sched, InterleaveSchedule.vanilla(), InterleaveSchedule((2, 6), name="x")):
        restored = pickle.loads(pickle.dumps(obj))
        assert restored == obj and repr(restored) == repr(obj)
        assert copy.deepcopy(obj).pattern(40) == obj.pattern(40)
    assert repr(InterleaveSchedule.vanilla()) == (
        "InterleaveSchedule(ratio=(1, 0), num_heads=None, name='vanilla')"
    )


def test_num_heads_check() -> None:
    assert InterleaveSchedule.boost(num_heads=10).max_heads == 10
    assert InterleaveSchedule.balance(num_heads=16).num_heads == 16
    assert InterleaveSchedule.vanilla(num_heads=0).num_heads == 0
    with pytest.raises(
        ValueError, match=r"\(ratio\[1\]\) but num_heads=4: more MCTP slots than heads"
    ):
        InterleaveSchedule.boost(num_heads=4)
    with pytest.raises(ValueError, match=r"audio run of 10 slots \(ratio\[5\]\).*num_heads=9"):
        InterleaveSchedule.from_mode("balance", num_heads=9)
    with pytest.raises(ValueError, match="num_heads must be >= 0, got -1"):
        InterleaveSchedule.turbo(num_heads=-1)
    with pytest.raises(ValueError, match="num_heads must be an int >= 0 or None, got str"):
        InterleaveSchedule((1, 4), num_heads="4")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="got bool True"):
        InterleaveSchedule((1, 4), num_heads=True)


@pytest.mark.parametrize(
    ("ratio", "match"),
    [
        ([], r"ratio must not be empty"),
        ((), r"ratio must not be empty"),
        ([1, 10, 4], r"even length .* got 3 values: \(1, 10, 4\)"),
        ([1, 10.0], r"ratio\[1\] must be an int, got float 10.0"),
        ([True, 10], r"ratio\[0\] must be an int, got bool True"),
        ([1, "10"], r"ratio\[1\] must be an int, got str '10'"),
        ("boost", r"got the string 'boost'; use InterleaveSchedule.from_mode"),
        (5, r"ratio must be a sequence of ints, got int 5"),
        ([0, 10], r"ratio\[0\] is a text count and must be >= 1, got 0"),
        ([1, 10, -4, 10], r"ratio\[2\] is a text count and must be >= 1, got -4"),
        (
            [1, -1],
            r"ratio\[1\] is an audio count \(BOA and EOA included, .*\) and must be >= 1, got -1",
        ),
        ([1, 10, 4, 0], r"ratio\[3\] .* got 0 .*use InterleaveSchedule.vanilla\(\)"),
    ],
)
def test_bad_ratio(ratio: object, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        InterleaveSchedule(ratio)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=match):
        InterleaveSchedule.from_ratio(ratio)  # type: ignore[arg-type]


def test_bad_mode_and_name() -> None:
    valid = r"\['vanilla', 'balance', 'boost', 'turbo'\]"
    with pytest.raises(ValueError, match=rf"unknown interleave mode 'fast'; valid modes: {valid}"):
        InterleaveSchedule.from_mode("fast")
    with pytest.raises(ValueError, match=rf"unknown interleave mode 3; valid modes: {valid}"):
        InterleaveSchedule.from_mode(3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="name must be a str or None, got int 3"):
        InterleaveSchedule((1, 4), name=3)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "call",
    ["head", "role", "slot", "run_length", "segment_index", "cost", "steps", "pattern", "segment"],
)
def test_negative_index(call: str) -> None:
    sched = InterleaveSchedule.boost()
    with pytest.raises(ValueError, match=r"must be >= 0, got -1"):
        getattr(sched, call)(-1)
    with pytest.raises(ValueError, match=r"must be an int >= 0, got float 1.5"):
        getattr(sched, call)(1.5)


def test_query_errors() -> None:
    with pytest.raises(ValueError, match=r"run_length\(3\): slot 3 is produced by MCTP head 2"):
        InterleaveSchedule.boost().run_length(3)
    vanilla = InterleaveSchedule.vanilla()
    with pytest.raises(ValueError, match="Vanilla schedule has no audio segments"):
        vanilla.segment(0)
    for name in ("interleave", "deinterleave"):
        with pytest.raises(ValueError, match=rf"{name}\(\) is undefined for a Vanilla .*training"):
            if name == "interleave":
                vanilla.interleave([1], [2], B, E)
            else:
                vanilla.deinterleave([1], B, E)


def test_step_validation() -> None:
    assert Step(Source.MCTP, 3, 4).stop == 7
    with pytest.raises(ValueError, match="exactly 1 token, got count=2"):
        Step(Source.BACKBONE, 0, 2)
    with pytest.raises(ValueError, match="start >= 0 and count >= 1, got start=0, count=0"):
        Step(Source.MCTP, 0, 0)
    with pytest.raises(ValueError, match="start >= 0 and count >= 1, got start=-2"):
        Step(Source.MCTP, -2, 1)
    with pytest.raises(ValueError, match=r"Step\.source must be a Source"):
        Step("mctp", 0, 1)  # type: ignore[arg-type]


# ---------------------------------------------------------------- training-data layout

T10 = list(range(10))
A20 = list(range(100, 120))


@pytest.mark.parametrize(
    ("mode", "text", "audio", "expected"),
    [
        # Boost, text longer: text chunks 1,4,4,1 vs audio chunks 8,8,4 -> 3 pairs, the last
        # text chunk absorbs t5..t9.
        (
            "boost",
            T10,
            A20,
            [
                *[0, B, *range(100, 108), E],
                *[1, 2, 3, 4, B, *range(108, 116), E],
                *[5, 6, 7, 8, 9, B, 116, 117, 118, 119, E],
            ],
        ),
        # Boost, audio longer: text chunks 1,2 vs audio chunks 8,8,4 -> 2 pairs, the last
        # audio chunk absorbs a8..a19.
        ("boost", [0, 1, 2], A20, [0, B, *range(100, 108), E, 1, 2, B, *range(108, 120), E]),
        # Balance, exact fit: text 1,3,2 and audio 2,6,4.
        (
            "balance",
            list(range(6)),
            list(range(100, 112)),
            [0, B, 100, 101, E, 1, 2, 3, B, *range(102, 108), E, 4, 5, B, *range(108, 112), E],
        ),
        # Balance, audio longer: text 1,1 vs audio 2,6,8,8,6 -> 2 pairs.
        ("balance", [0, 1], list(range(100, 130)), [0, B, 100, 101, E, 1, B, *range(102, 130), E]),
        # Balance, text longer: text 1,3,4,4,4,4 vs audio 2,1 -> 2 pairs.
        (
            "balance",
            list(range(20)),
            [100, 101, 102],
            [0, B, 100, 101, E, *range(1, 20), B, 102, E],
        ),
        # Turbo: text chunks of 1, audio chunks of 8. One text token takes all the audio.
        ("turbo", [7], A20, [7, B, *A20, E]),
        (
            "turbo",
            [7, 8, 9],
            A20,
            [7, B, *range(100, 108), E, 8, B, *range(108, 116), E, 9, B, *range(116, 120), E],
        ),
        ("turbo", [7, 8, 9, 10], A20[:10], [7, B, *range(100, 108), E, 8, 9, 10, B, 108, 109, E]),
        # Edge cases.
        ("boost", [], [100, 101], [B, 100, 101, E]),
        ("boost", [1, 2, 3], [], [1, 2, 3]),
        ("boost", [], [], []),
    ],
)
def test_interleave_by_hand(
    mode: str, text: list[int], audio: list[int], expected: list[int]
) -> None:
    sched = InterleaveSchedule.from_mode(mode)
    assert sched.interleave(text, audio, B, E) == expected
    assert sched.deinterleave(expected, B, E, strict=True) == (text, audio)


def test_interleave_zero_audio_segments() -> None:
    # A = 2: segments hold only the tags; audio never runs out of (empty) chunks, so the
    # number of pairs is the number of text chunks and the last audio chunk takes everything.
    sched = InterleaveSchedule((1, 2))
    ids = sched.interleave([0, 1, 2], [100, 101], B, E)
    assert ids == [0, B, E, 1, B, E, 2, B, 100, 101, E]
    assert sched.deinterleave(ids, B, E, strict=True) == ([0, 1, 2], [100, 101])
    # An empty audio chunk in the one-off prefix: audio 0, 3, 3, ...
    sched = InterleaveSchedule((1, 2, 1, 5))
    assert sched.interleave([0, 1, 2], [100, 101, 102, 103], B, E) == (
        [0, B, E, 1, B, 100, 101, 102, E, 2, B, 103, E]
    )


def test_interleave_accepts_any_int_like_ids() -> None:
    sched = InterleaveSchedule.turbo()
    out = sched.interleave(range(2), (10**12, -5), 151674, 151675)
    assert out == [0, 1, 151674, 10**12, -5, 151675]
    assert all(type(x) is int for x in out)


@pytest.mark.parametrize(
    ("text", "audio", "boa", "eoa", "match"),
    [
        ([1], [2], 7, 7, "boa_id and eoa_id must differ, both are 7"),
        ([1, B], [2], B, E, r"text_ids\[1\] == boa_id \(-1\); tag ids cannot appear inside text"),
        ([1], [2, 3, E], B, E, r"audio_ids\[2\] == eoa_id \(-2\); .* inside audio"),
        ([1, 2.5], [2], B, E, r"text_ids\[1\] must be an int token id, got float 2.5"),
        ([1], [False], B, E, r"audio_ids\[0\] must be an int token id, got bool False"),
        ("abc", [2], B, E, "text_ids must be a sequence of int token ids, got str"),
        ([1], None, B, E, "audio_ids must be a sequence of int token ids, got NoneType"),
        ([1], [2], "a", E, r"\(boa_id, eoa_id\)\[0\] must be an int token id, got str 'a'"),
    ],
)
def test_interleave_errors(
    text: object, audio: object, boa: object, eoa: object, match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        InterleaveSchedule.boost().interleave(text, audio, boa, eoa)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("ids", "match"),
    [
        ([1, E, 2], r"unbalanced audio tags: EOA \(-2\) at position 1 without an open BOA"),
        (
            [1, B, 2, B, 3, E, E],
            r"nested audio tags: BOA \(-1\) at position 3 .* opened at position 1",
        ),
        ([1, B, 2, E, B, 3], r"BOA \(-1\) at position 4 is never closed by EOA \(-2\)"),
        ([1, 1.0], r"ids\[1\] must be an int token id, got float"),
    ],
)
def test_deinterleave_malformed(ids: list[int], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        InterleaveSchedule.boost().deinterleave(ids, B, E)


def test_deinterleave_lenient_and_strict() -> None:
    boost = InterleaveSchedule.boost()
    # Text after the last segment never comes out of interleave() but splits fine...
    ids = [0, B, 100, 101, E, 1, 2]
    assert boost.deinterleave(ids, B, E) == ([0, 1, 2], [100, 101])
    # ...and strict mode reports where the layout departs from the ratio.
    with pytest.raises(ValueError, match=r"layout of ratio \(1, 10, 4, 10\): first difference"):
        boost.deinterleave(ids, B, E, strict=True)
    with pytest.raises(ValueError, match="first difference at position 1"):
        boost.deinterleave([0, B, 100, E, 1, B, 101, E], B, E, strict=True)
    with pytest.raises(ValueError, match="boa_id and eoa_id must differ"):
        boost.deinterleave([0], 3, 3)


# ---------------------------------------------------------------- import weight


@pytest.mark.parametrize("where", ["repo_root", "elsewhere"])
def test_import_is_pure_python(where: str, tmp_path: Path) -> None:
    code = (
        "import sys, mctp.interleave\n"
        "heavy = [m for m in ('torch', 'numpy', 'transformers', 'einops') if m in sys.modules]\n"
        "print(mctp.interleave.__file__)\n"
        "print(heavy)\n"
    )
    cwd = REPO_ROOT if where == "repo_root" else tmp_path
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, check=True
    ).stdout.splitlines()
    assert Path(out[0]).resolve() == REPO_ROOT / "interleave" / "__init__.py"
    assert out[1] == "[]"
