"""GLM-4-Voice's speech vocabulary, prompt format and interleave schedules.

Facts of the released model (public GLM-4-Voice inference code and tokenizer):

* audio tokens ``<|audio_0|>`` .. ``<|audio_16383|>`` are contiguous ids (from 151552 in the
  released tokenizer); ``<|begin_of_audio|>`` / ``<|end_of_audio|>`` wrap audio the user
  sends, never the audio the model speaks;
* a turn is ``<|system|>\\n{system}<|user|>\\n{input}<|assistant|>streaming_transcription\\n``;
  the model answers with 13 text tokens, then 26 audio tokens, alternately, with no tags
  between them, and audio only once its text has ended; it stops with ``<|user|>`` (the
  config's ``eos_token_id`` also lists ``<|endoftext|>`` and ``<|observation|>``);
* the speech decoder starts on the first 10 audio tokens (then blocks of 20, 40, ...).

:func:`native_schedule` is that interleave as an untagged
:class:`~mctp.interleave.InterleaveSchedule`; :func:`turbo_schedule` lets MCTP heads emit the
tokens after every backbone forward; :func:`check_schedule` refuses a schedule that does not
fit a model's audio range or heads.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from mctp.interleave import InterleaveSchedule

__all__ = [
    "AUDIO_PROMPT",
    "FIRST_AUDIO_BLOCK",
    "NATIVE_RATIO",
    "NUM_AUDIO",
    "SPECIAL_TOKENS",
    "TEXT_PROMPT",
    "GLM4VoiceVocab",
    "check_schedule",
    "native_schedule",
    "turbo_schedule",
]

NUM_AUDIO = 16384
"""Audio tokens of the released tokenizer (the codec's codebook size)."""

NATIVE_RATIO = (13, 26)
"""13 text tokens, then 26 audio tokens, alternately (the released system prompt says so)."""

FIRST_AUDIO_BLOCK = 10
"""Audio tokens the released speech decoder needs before it speaks."""

SPECIAL_TOKENS: tuple[str, ...] = (
    "<|endoftext|>",
    "[MASK]",
    "[gMASK]",
    "[sMASK]",
    "<sop>",
    "<eop>",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|observation|>",
    "<|begin_of_image|>",
    "<|end_of_image|>",
    "<|begin_of_video|>",
    "<|end_of_video|>",
    "<|begin_of_audio|>",
    "<|end_of_audio|>",
)
"""GLM-4 special tokens the composition reads (ids come from the tokenizer)."""

_REQUIRED = ("<|system|>", "<|user|>", "<|assistant|>", "<|begin_of_audio|>", "<|end_of_audio|>")

TEXT_PROMPT = (
    "User will provide you with a text instruction. Do it step by step. First, think about the "
    "instruction and respond in a interleaved manner, with 13 text token followed by 26 audio "
    "tokens."
)
"""The released demo's system prompt for text input."""

AUDIO_PROMPT = (
    "User will provide you with a speech instruction. Do it step by step. First, think about "
    "the instruction and respond in a interleaved manner, with 13 text token followed by 26 "
    "audio tokens. "
)
"""The released demo's system prompt for speech input."""


@dataclass(frozen=True)
class GLM4VoiceVocab:
    """Ids of GLM-4-Voice's special and audio tokens (a :class:`mctp.sampling.SpeechIds`).

    Attributes:
        special: Special token -> id (at least ``<|system|>``, ``<|user|>``, ``<|assistant|>``,
            ``<|begin_of_audio|>``, ``<|end_of_audio|>``).
        audio_start: Id of ``<|audio_0|>``.
        num_audio: Number of contiguous audio tokens.
        vocab_size: Rows of the model's embedding / output layer.

    Raises:
        ValueError: If a required token is missing or the audio ids do not fit ``vocab_size``.
    """

    special: Mapping[str, int] = field(repr=False)
    audio_start: int
    num_audio: int
    vocab_size: int

    def __post_init__(self) -> None:
        missing = [t for t in _REQUIRED if t not in self.special]
        if missing:
            raise ValueError(f"GLM-4-Voice vocabulary lacks the special token(s) {missing}")
        if self.num_audio < 1:
            raise ValueError(f"num_audio must be >= 1, got {self.num_audio}")
        if self.audio_stop > self.vocab_size:
            raise ValueError(
                f"audio ids [{self.audio_start}, {self.audio_stop}) do not fit the model's "
                f"{self.vocab_size} embedding rows"
            )
        inside = [t for t, i in self.special.items() if self.audio_start <= i < self.audio_stop]
        if inside:
            raise ValueError(f"special token(s) {inside} lie inside the audio id range")

    @property
    def boa(self) -> int:
        """Id of ``<|begin_of_audio|>`` (wraps user audio in prompts)."""
        return self.special["<|begin_of_audio|>"]

    @property
    def eoa(self) -> int:
        """Id of ``<|end_of_audio|>``."""
        return self.special["<|end_of_audio|>"]

    @property
    def user(self) -> int:
        """Id of ``<|user|>``: the model's end of turn."""
        return self.special["<|user|>"]

    @property
    def audio_stop(self) -> int:
        """One past the last audio id."""
        return self.audio_start + self.num_audio

    @property
    def audio_range(self) -> tuple[int, int]:
        """``(audio_start, audio_stop)``."""
        return self.audio_start, self.audio_stop

    @property
    def stop_ids(self) -> list[int]:
        """End-of-turn ids: ``<|user|>``, and ``<|endoftext|>``/``<|observation|>`` if known."""
        names = ("<|user|>", "<|endoftext|>", "<|observation|>")
        return [self.special[n] for n in names if n in self.special]

    def is_audio(self, ids: torch.Tensor) -> torch.Tensor:
        """Bool tensor: which ids are audio tokens."""
        return (ids >= self.audio_start) & (ids < self.audio_stop)

    @classmethod
    def from_tokenizer(
        cls, tokenizer: Any, *, vocab_size: int, num_audio: int | None = None
    ) -> GLM4VoiceVocab:
        """Read the ids from a GLM-4-Voice tokenizer.

        Args:
            tokenizer: Any tokenizer with ``convert_tokens_to_ids``/``get_vocab``.
            vocab_size: The model's embedding rows.
            num_audio: Audio tokens expected (default: as many contiguous ones as exist;
                the released tokenizer has :data:`NUM_AUDIO`).

        Raises:
            ValueError: Naming missing special tokens, a missing ``<|audio_0|>``, audio ids
                that are not contiguous, fewer audio tokens than ``num_audio``, or ids that
                do not fit ``vocab_size``.
        """
        vocab = tokenizer.get_vocab()
        special = {t: int(vocab[t]) for t in SPECIAL_TOKENS if t in vocab}
        missing = [t for t in _REQUIRED if t not in special]
        if missing:
            raise ValueError(f"the tokenizer is not GLM-4-Voice's: it lacks {missing}")
        if "<|audio_0|>" not in vocab:
            raise ValueError("the tokenizer has no <|audio_0|>: it is not GLM-4-Voice's")
        start = int(vocab["<|audio_0|>"])
        n = 0
        while (i := vocab.get(f"<|audio_{n}|>")) is not None:
            if int(i) != start + n:
                raise ValueError(
                    f"<|audio_{n}|> has id {i}, expected {start + n}: audio ids are not contiguous"
                )
            n += 1
        if num_audio is not None and n != num_audio:
            raise ValueError(
                f"the tokenizer has {n} audio tokens <|audio_0|>..<|audio_{n - 1}|>, the model "
                f"expects {num_audio}"
            )
        return cls(special=special, audio_start=start, num_audio=n, vocab_size=vocab_size)

    def prompt(self, user: str | Sequence[int], *, system: str | None = None) -> str:
        """The released turn format as text.

        Args:
            user: The instruction text, or audio codes ``[N]`` (sent as
                ``<|begin_of_audio|><|audio_k|>...<|end_of_audio|>``).
            system: System prompt (default: the released demo's for the input kind).

        Returns:
            ``<|system|>\\n{system}<|user|>\\n{input}<|assistant|>streaming_transcription\\n``.

        Raises:
            ValueError: If an audio code is outside ``[0, num_audio)``.
        """
        if isinstance(user, str):
            body, default = user, TEXT_PROMPT
        else:
            codes = [int(c) for c in user]
            bad = [c for c in codes if not 0 <= c < self.num_audio]
            if bad:
                raise ValueError(f"audio codes {bad[:5]} are outside [0, {self.num_audio})")
            body = (
                "<|begin_of_audio|>" + "".join(f"<|audio_{c}|>" for c in codes) + "<|end_of_audio|>"
            )
            default = AUDIO_PROMPT
        sys_text = default if system is None else system
        return f"<|system|>\n{sys_text}<|user|>\n{body}<|assistant|>streaming_transcription\n"


def native_schedule(vocab: GLM4VoiceVocab, *, num_heads: int | None = None) -> InterleaveSchedule:
    """GLM-4-Voice's own interleave: 13 text tokens, then 26 audio tokens, no tags.

    As a data layout it splits and rebuilds the model's answers
    (``interleave(text, audio)``, ``deinterleave(ids)``); as an inference plan the backbone
    writes the 13 text tokens and a chain of 26 MCTP heads every audio run.

    Raises:
        ValueError: If ``num_heads`` is given and below 26.
    """
    return InterleaveSchedule(
        NATIVE_RATIO,
        num_heads=num_heads,
        name="glm4-voice",
        tagged=False,
        audio_range=vocab.audio_range,
    )


def turbo_schedule(vocab: GLM4VoiceVocab, num_heads: int, *, text: int = 1) -> InterleaveSchedule:
    """``text`` backbone forwards, then a chain of ``num_heads`` heads, repeating.

    With heads distilled from the model, the chain continues whatever the model would say
    (its audio runs included); ``verify=True`` makes the output exactly the model's.

    Raises:
        ValueError: If ``num_heads < 1`` or ``text < 1``.
    """
    return InterleaveSchedule(
        (text, num_heads),
        num_heads=num_heads,
        name=f"glm4-voice-turbo{num_heads}",
        tagged=False,
        audio_range=vocab.audio_range,
    )


def check_schedule(
    schedule: InterleaveSchedule, vocab: GLM4VoiceVocab, num_heads: int
) -> InterleaveSchedule:
    """Refuse a schedule that does not fit a GLM-4-Voice model; returns it unchanged.

    Raises:
        ValueError: Naming what does not fit: BOA/EOA tags (GLM-4-Voice speaks without
            them), an audio range other than the model's, or more MCTP slots than heads.
    """
    if not schedule.uses_mctp:
        return schedule
    if schedule.tagged:
        raise ValueError(
            f"schedule {schedule.ratio} wraps audio in BOA/EOA tags, GLM-4-Voice speaks without "
            "them: build it with tagged=False (native_schedule / turbo_schedule)"
        )
    if schedule.audio_range != vocab.audio_range:
        raise ValueError(
            f"schedule audio range {schedule.audio_range} does not fit the model's audio ids "
            f"{vocab.audio_range}"
        )
    if schedule.max_heads > num_heads:
        raise ValueError(
            f"schedule {schedule.ratio} runs {schedule.max_heads} MCTP heads in a row, the model "
            f"has {num_heads}"
        )
    return schedule
