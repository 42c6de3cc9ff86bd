"""Hypothesis properties of ``mctp.interleave`` against naive reference expansions."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from mctp.interleave import BACKBONE, InterleaveSchedule, Role, Source

B, E = -1, -2  # tag ids; content ids are drawn >= 0
SETTINGS = settings(max_examples=250, deadline=None, derandomize=True)

pairs = st.lists(st.tuples(st.integers(1, 6), st.integers(2, 12)), min_size=1, max_size=4).map(
    lambda ps: tuple(v for p in ps for v in p)
)
ids = st.lists(st.integers(0, 10**6), max_size=60)


def naive_pattern(ratio: tuple[int, ...], n: int) -> str:
    """The official expansion: pop one pair at a time, the last pair repeating."""
    texts, audios = list(ratio[0::2]), list(ratio[1::2])
    out = ""
    while len(out) < n:
        text = texts.pop(0) if len(texts) > 1 else texts[0]
        audio = audios.pop(0) if len(audios) > 1 else audios[0]
        out += "M" * text + "m" * audio
    return out[:n]


def naive_slots(pattern: str) -> list[tuple[int, Role, int | None, int | None]]:
    """Per slot (head, role, segment index, run length after a backbone slot) by scanning."""
    out: list[tuple[int, Role, int | None, int | None]] = []
    seg, i = -1, 0
    while i < len(pattern):
        if pattern[i] == "M":
            j = i + 1
            while j < len(pattern) and pattern[j] == "m":
                j += 1
            out.append((BACKBONE, Role.TEXT, None, j - i - 1))
            i += 1
            continue
        seg += 1
        j = i
        while j < len(pattern) and pattern[j] == "m":
            j += 1
        for k in range(j - i):
            role = Role.BOA if k == 0 else Role.EOA if k == j - i - 1 else Role.AUDIO
            out.append((k, role, seg, None))
        i = j
    return out


def naive_interleave(text: list[int], audio: list[int], ratio: tuple[int, ...]) -> list[int]:
    """The official ``text_audio_interval`` chunking (text and audio both non-empty)."""
    text_nums, audio_nums = list(ratio[0::2]), [a - 2 for a in ratio[1::2]]

    def chunks(tokens: list[int], nums: list[int]) -> list[list[int]]:
        out = []
        while tokens:
            num = nums.pop(0) if len(nums) > 1 else nums[0]
            out.append(tokens[:num])
            tokens = tokens[num:]
        return out

    tc, ac = chunks(text, text_nums), chunks(audio, audio_nums)
    c = min(len(tc), len(ac))
    tc = [*tc[: c - 1], [x for chunk in tc[c - 1 :] for x in chunk]]
    ac = [*ac[: c - 1], [x for chunk in ac[c - 1 :] for x in chunk]]
    result: list[int] = []
    for t, a in zip(tc, ac):
        result += [*t, B, *a, E]
    return result


def split_pairs(ids_out: list[int]) -> list[tuple[list[int], list[int]]]:
    """Cut ``text BOA audio EOA`` pairs out of an interleaved sequence."""
    out: list[tuple[list[int], list[int]]] = []
    text: list[int] = []
    audio: list[int] | None = None
    for x in ids_out:
        if x == B:
            audio = []
        elif x == E:
            assert audio is not None
            out.append((text, audio))
            text, audio = [], None
        elif audio is not None:
            audio.append(x)
        else:
            text.append(x)
    assert audio is None and not text
    return out


@SETTINGS
@given(pairs, ids, ids)
def test_roundtrip(ratio: tuple[int, ...], text: list[int], audio: list[int]) -> None:
    sched = InterleaveSchedule(ratio)
    out = sched.interleave(text, audio, B, E)
    assert len(out) == len(text) + len(audio) + 2 * out.count(B)
    assert sched.deinterleave(out, B, E) == (text, audio)
    assert sched.deinterleave(out, B, E, strict=True) == (text, audio)


@SETTINGS
@given(pairs, st.integers(0, 60), st.integers(0, 60))
def test_tags_alternate_and_bracket_audio(
    ratio: tuple[int, ...], n_text: int, n_audio: int
) -> None:
    text = list(range(n_text))
    audio = list(range(1000, 1000 + n_audio))  # disjoint from the text ids
    out = InterleaveSchedule(ratio).interleave(text, audio, B, E)
    tags = [x for x in out if x in (B, E)]
    assert tags == [B, E] * (len(tags) // 2)
    assert (len(tags) > 0) == (len(audio) > 0)
    if audio:
        assert out[-1] == E  # the sequence ends on a closed audio segment
    # Audio tokens sit inside exactly one BOA ... EOA bracket, text tokens outside all.
    depth = 0
    for x in out:
        depth += (x == B) - (x == E)
        assert depth in (0, 1)
        if x >= 1000:
            assert depth == 1
        elif x >= 0:
            assert depth == 0


@SETTINGS
@given(pairs, st.integers(1, 60), st.integers(1, 60))
def test_chunks_follow_ratio(ratio: tuple[int, ...], n_text: int, n_audio: int) -> None:
    text = list(range(n_text))
    audio = list(range(1000, 1000 + n_audio))
    out = InterleaveSchedule(ratio).interleave(text, audio, B, E)
    chunks = split_pairs(out)
    texts, audios = ratio[0::2], ratio[1::2]
    for j, (t, a) in enumerate(chunks[:-1]):
        assert len(t) == texts[min(j, len(texts) - 1)]
        assert len(a) == audios[min(j, len(audios) - 1)] - 2
    j = len(chunks) - 1
    last_t, last_a = chunks[-1]
    # The last pair absorbs the rest of one modality; the other fitted in its scheduled chunk.
    assert len(last_t) <= texts[min(j, len(texts) - 1)] or (
        len(last_a) <= audios[min(j, len(audios) - 1)] - 2
    )
    assert len(last_t) >= 1
    if audios[-1] > 2:  # the original loops forever on empty repeating chunks
        assert out == naive_interleave(text, audio, ratio)


@SETTINGS
@given(pairs, st.integers(0, 300))
def test_steps_cover_and_agree(ratio: tuple[int, ...], n: int) -> None:
    sched = InterleaveSchedule(ratio)
    steps = list(sched.steps(n))
    pos = 0
    backbone = mctp = 0
    for step in steps:
        assert step.start == pos
        if step.source is Source.BACKBONE:
            assert step.count == 1 and sched.head(step.start) == BACKBONE
            backbone += 1
        else:
            assert [sched.head(step.start + k) for k in range(step.count)] == list(
                range(step.count)
            )
            start, stop = sched.segment(sched.segment_index(step.start))
            assert start == step.start and step.stop == min(stop, n)
            assert sched.run_length(step.start - 1) == stop - start
            mctp += step.count
        pos = step.stop
    assert pos == n
    assert sched.cost(n) == (backbone, mctp)


@SETTINGS
@given(pairs)
def test_first_chain_gives_a_whole_audio_segment(ratio: tuple[int, ...]) -> None:
    ratio = (1, *ratio[1:])  # T1 = 1, as in Boost and Turbo
    sched = InterleaveSchedule(ratio)
    a1 = ratio[1]
    assert sched.cost(1 + a1) == (1, a1)
    roles = [sched.role(i) for i in range(1, 1 + a1)]
    assert roles == [Role.BOA, *[Role.AUDIO] * (a1 - 2), Role.EOA]
    assert [s.source for s in sched.steps(1 + a1)] == [Source.BACKBONE, Source.MCTP]


@SETTINGS
@given(st.integers(0, 10**15), st.integers(0, 1000))
def test_vanilla_is_backbone_everywhere(i: int, n: int) -> None:
    sched = InterleaveSchedule.vanilla()
    assert sched.slot(i).head == BACKBONE and sched.role(i) is Role.TEXT
    assert sched.segment_index(i) is None and sched.run_length(i) == 0
    assert sched.cost(n) == (n, 0)
    assert all(s.source is Source.BACKBONE for s in sched.steps(min(n, 50)))


@SETTINGS
@given(pairs, st.integers(0, 12), st.lists(st.integers(0, 10**12), min_size=1, max_size=20))
def test_heads_stay_below_num_heads(ratio: tuple[int, ...], extra: int, indices: list[int]) -> None:
    num_heads = max(ratio[1::2]) + extra
    sched = InterleaveSchedule(ratio, num_heads=num_heads)
    assert sched.max_heads == max(ratio[1::2]) <= num_heads
    for i in indices:
        assert BACKBONE <= sched.head(i) <= sched.max_heads - 1 <= num_heads - 1


@SETTINGS
@given(pairs, st.lists(st.integers(0, 400), min_size=1, max_size=30))
def test_queries_match_naive_expansion(ratio: tuple[int, ...], indices: list[int]) -> None:
    sched = InterleaveSchedule(ratio)
    horizon = max(indices) + 1 + sum(ratio)  # so every run is seen to its end
    pattern = naive_pattern(ratio, horizon)
    slots = naive_slots(pattern)
    assert sched.pattern(max(indices) + 1) == pattern[: max(indices) + 1]
    for i in indices:
        head, role, seg, run = slots[i]
        assert sched.head(i) == head and sched.role(i) is role
        assert sched.segment_index(i) == seg
        if run is not None:
            assert sched.run_length(i) == run
        else:
            start, stop = sched.segment(seg)
            assert pattern[start:stop] == "m" * (stop - start)
            assert pattern[start - 1] == "M" and (stop == len(pattern) or pattern[stop] == "M")
            assert start <= i < stop
        assert sched.cost(i) == (pattern[:i].count("M"), pattern[:i].count("m"))


@SETTINGS
@given(pairs, st.integers(0, 10**15))
def test_far_indices_are_periodic(ratio: tuple[int, ...], i: int) -> None:
    sched = InterleaveSchedule(ratio)
    prefix = sum(ratio[:-2])
    period = ratio[-2] + ratio[-1]
    i += prefix
    assert sched.head(i + period) == sched.head(i) and sched.role(i + period) == sched.role(i)
    forwards, mctp = sched.cost(i)
    assert sched.cost(i + period) == (forwards + ratio[-2], mctp + ratio[-1])
    seg = sched.segment_index(i)
    if seg is not None:
        assert sched.segment_index(i + period) == seg + 1
        start, stop = sched.segment(seg)
        assert start <= i < stop and stop - start == ratio[-1]
