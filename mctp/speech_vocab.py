"""Speech vocabulary: VITA-Audio's special tokens and ``<|audio_k|>`` ids in one place.

The official layout on top of a Qwen2.5 tokenizer (151,665 tokens) adds, in this order,
20 special tokens (``<|begin_of_audio|>`` = 151674, ``<|end_of_audio|>`` = 151675,
``<|audio|>`` = 151684) and then ``<|audio_0|>`` .. ``<|audio_16383|>`` from 151685, with
the embedding matrix padded to a multiple of 8 (168,072). The VITA-Audio-Plus variant
inserts ``<|context_of_audio|>`` right after ``<|end_of_audio|>`` (21 special tokens).
Everything else in mctp asks a :class:`SpeechVocab` for these ids instead of hard-coding them.

This module is part of the core (``torch`` only): the engine, the speech pipeline, the server
and the examples import the names from here. Adding the tokens to a transformers tokenizer and
resizing a model's embeddings is the adapter's work (:func:`mctp.backbones.extend_vocab`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = [
    "AUDIO_CONTEXT",
    "AUDIO_PLACEHOLDER",
    "BOA",
    "EOA",
    "SPECIAL_TOKENS",
    "SPECIAL_TOKENS_PLUS",
    "SpeechVocab",
    "audio_token",
]

BOA = "<|begin_of_audio|>"
EOA = "<|end_of_audio|>"
AUDIO_PLACEHOLDER = "<|audio|>"
AUDIO_CONTEXT = "<|context_of_audio|>"

SPECIAL_TOKENS: tuple[str, ...] = (
    "<|begin_of_image|>",
    "<|end_of_image|>",
    "<|context_of_image|>",
    "<|begin_of_video|>",
    "<|end_of_video|>",
    "<|context_of_video|>",
    "<|begin_of_patch|>",
    "<|end_of_patch|>",
    "<|context_of_patch|>",
    BOA,
    EOA,
    "<|begin_of_quad|>",
    "<|end_of_quad|>",
    "<|begin_of_ref|>",
    "<|end_of_ref|>",
    "<|begin_of_box|>",
    "<|end_of_box|>",
    "<|image|>",
    "<|video|>",
    AUDIO_PLACEHOLDER,
)
"""The 20 special tokens VITA-Audio adds for GLM-4-Voice, in the official order."""

SPECIAL_TOKENS_PLUS: tuple[str, ...] = (*SPECIAL_TOKENS[:11], AUDIO_CONTEXT, *SPECIAL_TOKENS[11:])
"""VITA-Audio-Plus (SenseVoice input): ``<|context_of_audio|>`` after ``<|end_of_audio|>``."""


def audio_token(k: int) -> str:
    """The token string of audio code ``k`` (``<|audio_k|>``)."""
    return f"<|audio_{k}|>"


@dataclass(frozen=True)
class SpeechVocab:
    """Ids of the speech tokens of one tokenizer/model pair.

    Attributes:
        special: Special token string -> id.
        audio_start: Id of ``<|audio_0|>``; code ``k`` is ``audio_start + k``.
        num_audio: Number of audio codes.
        vocab_size: Rows of the (padded) embedding matrix.
    """

    special: dict[str, int] = field(repr=False)
    audio_start: int
    num_audio: int
    vocab_size: int

    def __post_init__(self) -> None:
        for name in (BOA, EOA, AUDIO_PLACEHOLDER):
            if name not in self.special:
                raise ValueError(f"SpeechVocab needs the special token {name}")
        if self.num_audio < 1:
            raise ValueError(f"num_audio must be >= 1, got {self.num_audio}")
        if self.audio_start + self.num_audio > self.vocab_size:
            raise ValueError(
                f"audio ids [{self.audio_start}, {self.audio_start + self.num_audio}) exceed vocab_size {self.vocab_size}"
            )

    @property
    def boa(self) -> int:
        """Id of ``<|begin_of_audio|>``."""
        return self.special[BOA]

    @property
    def eoa(self) -> int:
        """Id of ``<|end_of_audio|>``."""
        return self.special[EOA]

    @property
    def audio_placeholder(self) -> int:
        """Id of ``<|audio|>`` (one per audio in prompts, replaced by tokens or frames)."""
        return self.special[AUDIO_PLACEHOLDER]

    @property
    def audio_context(self) -> int | None:
        """Id of ``<|context_of_audio|>`` (VITA-Audio-Plus encoder frames), if present."""
        return self.special.get(AUDIO_CONTEXT)

    @property
    def audio_stop(self) -> int:
        """One past the last audio id."""
        return self.audio_start + self.num_audio

    def is_audio(self, ids: torch.Tensor) -> torch.Tensor:
        """Bool tensor: which ids are audio codes."""
        return (ids >= self.audio_start) & (ids < self.audio_stop)

    def to_codes(self, ids: torch.Tensor | Sequence[int]) -> torch.Tensor:
        """Audio token ids -> codec codes ``[0, num_audio)``.

        Raises:
            ValueError: If an id is not an audio token.
        """
        t = torch.as_tensor(ids, dtype=torch.long)
        if t.numel() and not bool(self.is_audio(t).all()):
            bad = t[~self.is_audio(t)][:5].tolist()
            raise ValueError(
                f"ids {bad} are not audio tokens [{self.audio_start}, {self.audio_stop})"
            )
        return t - self.audio_start

    def from_codes(self, codes: torch.Tensor | Sequence[int]) -> torch.Tensor:
        """Codec codes -> audio token ids.

        Raises:
            ValueError: If a code is outside ``[0, num_audio)``.
        """
        t = torch.as_tensor(codes, dtype=torch.long)
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= self.num_audio):
            raise ValueError(
                f"codes must lie in [0, {self.num_audio}), got [{int(t.min())}, {int(t.max())}]"
            )
        return t + self.audio_start

    def mctp_output_vocab(self) -> list[int]:
        """Ids MCTP heads emit in Boost/Balance/Turbo: BOA, EOA and every audio code."""
        return [self.boa, self.eoa, *range(self.audio_start, self.audio_stop)]

    @classmethod
    def from_tokenizer(cls, tokenizer: Any, *, vocab_size: int | None = None) -> SpeechVocab:
        """Read the ids from a tokenizer that already holds the speech tokens.

        Args:
            tokenizer: A transformers tokenizer with ``<|audio_0|>``... and the tags.
            vocab_size: Embedding rows (default ``len(tokenizer)``).

        Raises:
            ValueError: If tags or audio tokens are missing or the audio ids are not contiguous.
        """
        unk = getattr(tokenizer, "unk_token_id", None)
        vocab = tokenizer.get_vocab()

        def tid(tok: str) -> int | None:
            i = vocab.get(tok)
            return None if i is None or i == unk else int(i)

        special = {t: i for t in SPECIAL_TOKENS_PLUS if (i := tid(t)) is not None}
        start = tid(audio_token(0))
        if start is None:
            raise ValueError(
                "the tokenizer has no <|audio_0|> token; call mctp.backbones.extend_vocab first"
            )
        n = 0
        while (i := tid(audio_token(n))) is not None:
            if i != start + n:
                raise ValueError(
                    f"{audio_token(n)} has id {i}, expected {start + n}: audio ids are not contiguous"
                )
            n += 1
        return cls(
            special=special, audio_start=start, num_audio=n, vocab_size=vocab_size or len(tokenizer)
        )
