"""Training-data layout: cut text and audio into chunks and alternate them.

This is the data side of an interleave ratio ``[T1, A1, T2, A2, ..., Tn, An]``
(VITA-Audio's ``text_audio_interval``). Text is cut into chunks of ``T1, T2, ..., Tn,
Tn, ...`` tokens and audio into chunks of ``A1-2, A2-2, ..., An-2, An-2, ...`` tokens
(each ``A`` counts the begin/end-of-audio tags). With ``c`` the smaller of the two chunk
counts, the first ``c-1`` chunks of each modality are kept and everything from chunk
``c-1`` on is merged into one last chunk ("the last chunk absorbs the rest"). The result
is ``text_1 + [BOA] + audio_1 + [EOA] + text_2 + [BOA] + audio_2 + [EOA] + ...``.

Edge cases are defined cleanly (the original code drops or misplaces tokens there):
empty text with audio gives ``[BOA] + audio + [EOA]``; empty audio gives the text
unchanged, without tags; both empty give ``[]``. When the repeating audio count is 2
(zero audio tokens per segment) audio never runs out of chunks, so ``c`` is the number
of text chunks.

The functions here take the per-chunk counts directly; :class:`InterleaveSchedule`
derives them from its ratio. Everything is pure Python.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable, Sequence

__all__ = [
    "as_id_list",
    "chunk_bounds",
    "deinterleave_ids",
    "deinterleave_untagged",
    "interleave_ids",
    "interleave_untagged",
]


def as_id_list(values: Iterable[int], what: str) -> list[int]:
    """Copy token ids into a list of Python ints.

    Args:
        values: Any iterable of integer-like values (ints, or objects with ``__index__``).
        what: Name used in error messages, e.g. ``"text_ids"``.

    Returns:
        The ids as a new ``list[int]``.

    Raises:
        ValueError: If ``values`` is a string or not iterable, or an element is not an
            integer (bools and floats are refused).
    """
    if isinstance(values, str | bytes):
        raise ValueError(f"{what} must be a sequence of int token ids, got {type(values).__name__}")
    try:
        items = list(values)
    except TypeError as err:
        raise ValueError(
            f"{what} must be a sequence of int token ids, got {type(values).__name__}"
        ) from err
    out: list[int] = []
    for pos, value in enumerate(items):
        if isinstance(value, bool):
            raise ValueError(f"{what}[{pos}] must be an int token id, got bool {value!r}")
        try:
            out.append(operator.index(value))
        except TypeError as err:
            raise ValueError(
                f"{what}[{pos}] must be an int token id, got {type(value).__name__} {value!r}"
            ) from err
    return out


def chunk_bounds(total: int, sizes: Sequence[int], max_chunks: int) -> list[int]:
    """Split ``total`` tokens into chunks of scheduled sizes, the last size repeating.

    Chunk ``j`` has ``sizes[j]`` tokens (``sizes[-1]`` for ``j >= len(sizes)``), the last
    one possibly fewer. Chunking stops when the tokens run out or after ``max_chunks``
    chunks, whichever comes first; the tokens left over then are NOT in any chunk (the
    caller merges them into its last chunk). Zero sizes give empty chunks.

    Args:
        total: Number of tokens to split, ``>= 0``.
        sizes: Scheduled chunk sizes, each ``>= 0``, at least one.
        max_chunks: Cap on the number of chunks, ``>= 1``.

    Returns:
        Chunk boundaries ``[0, b1, b2, ..., bk]`` (``k`` chunks, ``k = 0`` when
        ``total == 0``); chunk ``j`` covers ``[b_j, b_{j+1})``.

    Raises:
        ValueError: If ``total < 0``, ``max_chunks < 1`` or ``sizes`` is empty or negative.
    """
    if total < 0 or max_chunks < 1 or not sizes or min(sizes) < 0:
        raise ValueError(
            f"chunk_bounds needs total >= 0, max_chunks >= 1 and sizes >= 0, got "
            f"total={total}, max_chunks={max_chunks}, sizes={tuple(sizes)}"
        )
    bounds = [0]
    j = 0
    while bounds[-1] < total and j < max_chunks:
        size = sizes[j] if j < len(sizes) else sizes[-1]
        bounds.append(min(total, bounds[-1] + size))
        j += 1
    return bounds


def interleave_ids(
    text_ids: Sequence[int],
    audio_ids: Sequence[int],
    text_counts: Sequence[int],
    audio_counts: Sequence[int],
    boa_id: int,
    eoa_id: int,
) -> list[int]:
    """Alternate text and audio chunks, each audio chunk wrapped in BOA ... EOA.

    Args:
        text_ids: Text token ids ``[Nt]``; none may equal ``boa_id`` or ``eoa_id``.
        audio_ids: Audio token ids ``[Na]``; none may equal ``boa_id`` or ``eoa_id``.
        text_counts: Text tokens per chunk ``(T1, ..., Tn)``, each ``>= 1``; the last repeats.
        audio_counts: Audio tokens per chunk ``(A1-2, ..., An-2)``, each ``>= 0``; the last
            repeats. Same length as ``text_counts``.
        boa_id: The ``<|begin_of_audio|>`` id.
        eoa_id: The ``<|end_of_audio|>`` id, different from ``boa_id``.

    Returns:
        The interleaved ids ``[Nt + Na + 2 * segments]``.

    Raises:
        ValueError: If the ids are not ints, ``boa_id == eoa_id``, a text or audio id equals
            a tag id, or the counts are malformed.
    """
    boa, eoa = _check_tags(boa_id, eoa_id)
    text = as_id_list(text_ids, "text_ids")
    audio = as_id_list(audio_ids, "audio_ids")
    if len(text_counts) != len(audio_counts) or not text_counts:
        raise ValueError(
            f"text_counts and audio_counts must be non-empty and of equal length, got "
            f"{tuple(text_counts)} and {tuple(audio_counts)}"
        )
    if min(text_counts) < 1:
        raise ValueError(f"text chunk counts must be >= 1, got {tuple(text_counts)}")
    for what, ids in (("text_ids", text), ("audio_ids", audio)):
        for pos, value in enumerate(ids):
            if value in (boa, eoa):
                tag = "boa_id" if value == boa else "eoa_id"
                raise ValueError(
                    f"{what}[{pos}] == {tag} ({value}); tag ids cannot appear inside "
                    f"{what[:-4]} tokens"
                )
    if not audio:
        return text
    if not text:
        return [boa, *audio, eoa]
    text_bounds = chunk_bounds(len(text), text_counts, max_chunks=len(text))
    num_text_chunks = len(text_bounds) - 1
    audio_bounds = chunk_bounds(len(audio), audio_counts, max_chunks=num_text_chunks)
    chunks = min(num_text_chunks, len(audio_bounds) - 1)
    # Keep the first ``chunks - 1`` chunks of each; the last one absorbs the rest.
    text_cuts = [*text_bounds[:chunks], len(text)]
    audio_cuts = [*audio_bounds[:chunks], len(audio)]
    out: list[int] = []
    for j in range(chunks):
        out.extend(text[text_cuts[j] : text_cuts[j + 1]])
        out.append(boa)
        out.extend(audio[audio_cuts[j] : audio_cuts[j + 1]])
        out.append(eoa)
    return out


def interleave_untagged(
    text_ids: Sequence[int],
    audio_ids: Sequence[int],
    text_counts: Sequence[int],
    audio_counts: Sequence[int],
    audio_range: tuple[int, int],
) -> list[int]:
    """Alternate text and audio chunks with no tags between them (GLM-4-Voice's layout).

    The chunking is the one of :func:`interleave_ids` (the first ``c - 1`` chunks of each
    modality are kept, the ``c``-th absorbs the rest), but audio chunks are not wrapped in
    BOA ... EOA: the two modalities are told apart by the audio id range alone.

    Args:
        text_ids: Text token ids ``[Nt]``, none inside ``audio_range``.
        audio_ids: Audio token ids ``[Na]``, all inside ``audio_range``.
        text_counts: Text tokens per chunk ``(T1, ..., Tn)``, each ``>= 1``; the last repeats.
        audio_counts: Audio tokens per chunk ``(A1, ..., An)``, each ``>= 1``; the last repeats.
        audio_range: ``(start, stop)``: the audio ids are ``start <= id < stop``.

    Returns:
        ``text_1 + audio_1 + text_2 + audio_2 + ...`` ``[Nt + Na]`` as a new list.

    Raises:
        ValueError: If the ids are not ints, a text id lies in the audio range or an audio id
            outside it, or the counts are malformed.
    """
    start, stop = check_audio_range(audio_range)
    text = as_id_list(text_ids, "text_ids")
    audio = as_id_list(audio_ids, "audio_ids")
    if len(text_counts) != len(audio_counts) or not text_counts:
        raise ValueError(
            f"text_counts and audio_counts must be non-empty and of equal length, got "
            f"{tuple(text_counts)} and {tuple(audio_counts)}"
        )
    if min(text_counts) < 1 or min(audio_counts) < 1:
        raise ValueError(
            f"untagged chunk counts must be >= 1, got {tuple(text_counts)} and "
            f"{tuple(audio_counts)}"
        )
    for pos, value in enumerate(text):
        if start <= value < stop:
            raise ValueError(
                f"text_ids[{pos}] = {value} lies in the audio range [{start}, {stop}): "
                "without tags it would read back as audio"
            )
    for pos, value in enumerate(audio):
        if not start <= value < stop:
            raise ValueError(
                f"audio_ids[{pos}] = {value} is outside the audio range [{start}, {stop})"
            )
    if not audio or not text:
        return text + audio
    text_bounds = chunk_bounds(len(text), text_counts, max_chunks=len(text))
    num_text_chunks = len(text_bounds) - 1
    audio_bounds = chunk_bounds(len(audio), audio_counts, max_chunks=num_text_chunks)
    chunks = min(num_text_chunks, len(audio_bounds) - 1)
    text_cuts = [*text_bounds[:chunks], len(text)]
    audio_cuts = [*audio_bounds[:chunks], len(audio)]
    out: list[int] = []
    for j in range(chunks):
        out.extend(text[text_cuts[j] : text_cuts[j + 1]])
        out.extend(audio[audio_cuts[j] : audio_cuts[j + 1]])
    return out


def deinterleave_untagged(
    ids: Sequence[int], audio_range: tuple[int, int]
) -> tuple[list[int], list[int]]:
    """Split an untagged sequence into text and audio by the audio id range.

    Args:
        ids: Interleaved token ids ``[N]``.
        audio_range: ``(start, stop)``: the audio ids are ``start <= id < stop``.

    Returns:
        ``(text_ids, audio_ids)`` as new lists, in their original order.

    Raises:
        ValueError: If the ids are not ints or the range is malformed.
    """
    start, stop = check_audio_range(audio_range)
    text: list[int] = []
    audio: list[int] = []
    for value in as_id_list(ids, "ids"):
        (audio if start <= value < stop else text).append(value)
    return text, audio


def check_audio_range(audio_range: tuple[int, int]) -> tuple[int, int]:
    """Validate an audio id range ``(start, stop)`` and return it as two ints.

    Raises:
        ValueError: If it is not two ints with ``0 <= start < stop``.
    """
    if isinstance(audio_range, str | bytes):
        raise ValueError(f"audio_range must be (start, stop), got {audio_range!r}")
    try:
        pair = as_id_list(audio_range, "audio_range")
    except ValueError as err:
        raise ValueError(
            f"audio_range must be two ints (start, stop), got {audio_range!r}"
        ) from err
    if len(pair) != 2 or not 0 <= pair[0] < pair[1]:
        raise ValueError(
            f"audio_range must be (start, stop) with 0 <= start < stop, got {tuple(pair)}"
        )
    return pair[0], pair[1]


def deinterleave_ids(ids: Sequence[int], boa_id: int, eoa_id: int) -> tuple[list[int], list[int]]:
    """Split an interleaved sequence back into its text and audio tokens.

    Tokens outside ``BOA ... EOA`` brackets are text, tokens inside are audio; the tags
    are dropped. This inverts :func:`interleave_ids` for every input.

    Args:
        ids: Interleaved token ids ``[N]``.
        boa_id: The ``<|begin_of_audio|>`` id.
        eoa_id: The ``<|end_of_audio|>`` id, different from ``boa_id``.

    Returns:
        ``(text_ids, audio_ids)`` as new lists, in their original order.

    Raises:
        ValueError: If the ids are not ints, ``boa_id == eoa_id``, or the tags are malformed:
            an EOA without an open BOA, a BOA inside an open segment (nesting), or a BOA
            that is never closed.
    """
    boa, eoa = _check_tags(boa_id, eoa_id)
    seq = as_id_list(ids, "ids")
    text: list[int] = []
    audio: list[int] = []
    opened = -1  # position of the BOA of the open segment, -1 when outside
    for pos, value in enumerate(seq):
        if value == boa:
            if opened >= 0:
                raise ValueError(
                    f"nested audio tags: BOA ({boa}) at position {pos} inside the segment "
                    f"opened at position {opened}"
                )
            opened = pos
        elif value == eoa:
            if opened < 0:
                raise ValueError(
                    f"unbalanced audio tags: EOA ({eoa}) at position {pos} without an open BOA"
                )
            opened = -1
        elif opened >= 0:
            audio.append(value)
        else:
            text.append(value)
    if opened >= 0:
        raise ValueError(
            f"unbalanced audio tags: BOA ({boa}) at position {opened} is never closed by "
            f"EOA ({eoa}); sequence length {len(seq)}"
        )
    return text, audio


def _check_tags(boa_id: int, eoa_id: int) -> tuple[int, int]:
    """Validate the two tag ids and return them as Python ints.

    Raises:
        ValueError: If either is not an int or both are equal.
    """
    boa, eoa = as_id_list((boa_id, eoa_id), "(boa_id, eoa_id)")
    if boa == eoa:
        raise ValueError(f"boa_id and eoa_id must differ, both are {boa}")
    return boa, eoa
