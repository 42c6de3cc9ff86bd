"""Untagged schedules (GLM-4-Voice's 13 text / 26 audio interleave): properties and errors."""

from __future__ import annotations

import pickle

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mctp.interleave import BACKBONE, InterleaveSchedule, Role

SETTINGS = settings(max_examples=200, deadline=None, derandomize=True)
AUDIO = (1000, 1100)  # audio ids of the property tests; text ids are drawn below 1000

ratios = st.lists(st.tuples(st.integers(1, 6), st.integers(1, 12)), min_size=1, max_size=4).map(
    lambda ps: tuple(v for p in ps for v in p)
)
text_ids = st.lists(st.integers(0, 999), max_size=60)
audio_ids = st.lists(st.integers(*AUDIO).filter(lambda i: i < AUDIO[1]), max_size=80)


def naive_pattern(ratio: tuple[int, ...], n: int) -> str:
    texts, audios = list(ratio[0::2]), list(ratio[1::2])
    out = ""
    while len(out) < n:
        t = texts.pop(0) if len(texts) > 1 else texts[0]
        a = audios.pop(0) if len(audios) > 1 else audios[0]
        out += "M" * t + "m" * a
    return out[:n]


def naive_layout(text: list[int], audio: list[int], ratio: tuple[int, ...]) -> list[int]:
    """Chunks of T_i text and A_i audio alternately; when one modality runs out of whole
    chunks, the last chunk of each takes the rest (GLM-4-Voice: audio only after text ends)."""
    if not text or not audio:
        return text + audio
    ts, as_ = list(ratio[0::2]), list(ratio[1::2])
    tchunks, achunks = [], []
    i = j = k = 0
    while i < len(text):
        n = ts[min(k, len(ts) - 1)]
        tchunks.append(text[i : i + n])
        i += n
        k += 1
    k = 0
    while j < len(audio) and len(achunks) < len(tchunks):
        n = as_[min(k, len(as_) - 1)]
        achunks.append(audio[j : j + n])
        j += n
        k += 1
    c = min(len(tchunks), len(achunks))
    tail_t = [x for chunk in tchunks[c - 1 :] for x in chunk]
    tail_a = [x for chunk in achunks[c - 1 :] for x in chunk] + audio[j:]
    tchunks = [*tchunks[: c - 1], tail_t]
    achunks = [*achunks[: c - 1], tail_a]
    return [x for pair in zip(tchunks, achunks, strict=True) for part in pair for x in part]


@SETTINGS
@given(ratios, st.integers(0, 120))
def test_untagged_pattern_heads_and_roles(ratio: tuple[int, ...], n: int) -> None:
    s = InterleaveSchedule(ratio, tagged=False, audio_range=AUDIO)
    tagged = InterleaveSchedule(ratio) if min(ratio[1::2]) >= 1 else None
    assert s.pattern(n) == naive_pattern(ratio, n)
    for i in range(n):
        assert s.head(i) == (tagged.head(i) if tagged else s.head(i))
        role = s.role(i)
        assert role == (Role.TEXT if s.head(i) == BACKBONE else Role.AUDIO)
    assert s.cost(n) == tagged.cost(n)


@SETTINGS
@given(ratios, text_ids, audio_ids)
def test_untagged_layout_round_trips(ratio: tuple[int, ...], text: list[int], audio: list[int]):
    s = InterleaveSchedule(ratio, tagged=False, audio_range=AUDIO)
    ids = s.interleave(text, audio)
    assert ids == naive_layout(text, audio, ratio)
    assert s.deinterleave(ids, strict=True) == (text, audio)


def test_glm4_voice_native_layout() -> None:
    s = InterleaveSchedule([13, 26], tagged=False, audio_range=AUDIO)
    text, audio = list(range(30)), list(range(1000, 1100))
    ids = s.interleave(text, audio)
    assert ids == text[:13] + audio[:26] + text[13:26] + audio[26:52] + text[26:] + audio[52:]
    assert s.pattern(40) == "M" * 13 + "m" * 26 + "M"
    assert s.cost(39) == (13, 26)


def test_equality_hash_pickle_repr() -> None:
    a = InterleaveSchedule([13, 26], tagged=False, audio_range=AUDIO, name="glm")
    b = InterleaveSchedule([13, 26], tagged=False, audio_range=AUDIO)
    assert a == b and hash(a) == hash(b)
    assert a != InterleaveSchedule([13, 26], tagged=False, audio_range=(0, 5))
    assert a != InterleaveSchedule([13, 26])
    assert pickle.loads(pickle.dumps(a)) == a and pickle.loads(pickle.dumps(a)).name == "glm"
    assert "tagged=False" in repr(a) and "tagged" not in repr(InterleaveSchedule([13, 26]))
    assert not a.tagged and a.audio_range == AUDIO and a.mode is None
    assert InterleaveSchedule([1, 10], tagged=False, audio_range=AUDIO).mode is None


def test_bad_untagged_input() -> None:
    with pytest.raises(ValueError, match="needs audio_range"):
        InterleaveSchedule([13, 26], tagged=False)
    with pytest.raises(ValueError, match="only for untagged"):
        InterleaveSchedule([13, 26], audio_range=AUDIO)
    with pytest.raises(ValueError, match="0 <= start < stop"):
        InterleaveSchedule([13, 26], tagged=False, audio_range=(5, 5))
    with pytest.raises(ValueError, match="tagged must be a bool"):
        InterleaveSchedule([13, 26], tagged=0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="more MCTP slots than heads"):
        InterleaveSchedule([13, 26], num_heads=10, tagged=False, audio_range=AUDIO)
    s = InterleaveSchedule([2, 3], tagged=False, audio_range=AUDIO)
    with pytest.raises(ValueError, match="takes no boa_id"):
        s.interleave([1], [1000], 7, 8)
    with pytest.raises(ValueError, match=r"text_ids\[0\] = 1000 lies in the audio range"):
        s.interleave([1000], [1001])
    with pytest.raises(ValueError, match=r"audio_ids\[1\] = 5 is outside the audio range"):
        s.interleave([1], [1000, 5])
    with pytest.raises(ValueError, match="first difference at position 1"):
        s.deinterleave([1, 1000, 2], strict=True)
    with pytest.raises(ValueError, match="needs boa_id and eoa_id"):
        InterleaveSchedule([2, 3]).interleave([1], [2])
