"""VITA-Audio as a composition: a backbone, its MCTP heads, the speech vocabulary, a mode."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from mctp.backbones import HFBackbone
from mctp.engine.generation import GenerationResult, generate
from mctp.engine.streaming import StreamEvent, generate_stream
from mctp.interleave import InterleaveSchedule, Mode
from mctp.speech_vocab import SpeechVocab
from mctp.stack import MCTPStack

from .checkpoint import load_vita_audio, save_vita_audio

__all__ = ["VitaAudio", "load_tokenizer", "official_ratio"]

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json")


class VitaAudio:
    """The VITA-Audio LLM: backbone + MCTP stack + speech ids, generating in a default mode.

    Args:
        backbone: The LLM.
        stack: Its MCTP heads, or None (Vanilla only).
        vocab: Speech token ids (needed for streaming audio events and ``audio_heads``).
        mode: Default generation mode (``"vanilla"``, ``"balance"``, ``"boost"``, ``"turbo"``)
            or an :class:`~mctp.interleave.InterleaveSchedule`.
        tokenizer: The text tokenizer, kept for convenience.
        eos_token_id: Default stop id(s) for generation.

    Raises:
        ValueError: If the default mode is unknown or needs more MCTP heads than the stack has.
    """

    def __init__(
        self,
        *,
        backbone: HFBackbone,
        stack: MCTPStack | None,
        vocab: SpeechVocab | None = None,
        mode: str | Mode | InterleaveSchedule = "boost",
        tokenizer: Any | None = None,
        eos_token_id: int | list[int] | None = None,
    ) -> None:
        schedule = (
            mode if isinstance(mode, InterleaveSchedule) else InterleaveSchedule.from_mode(mode)
        )
        heads = 0 if stack is None else stack.num_heads
        if schedule.uses_mctp and schedule.max_heads > heads:
            raise ValueError(
                f"mode {mode!r} needs {schedule.max_heads} MCTP heads in a row, the model has {heads}"
            )
        self.backbone, self.stack, self.vocab = backbone, stack, vocab
        self.mode, self.tokenizer, self.eos_token_id = mode, tokenizer, eos_token_id

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        *,
        vocab: SpeechVocab | None = None,
        mode: str | Mode | InterleaveSchedule | None = None,
        device: torch.device | str = "cpu",
        dtype: torch.dtype | None = None,
        attn_implementation: str = "sdpa",
    ) -> VitaAudio:
        """Load an official VITA-Audio folder (weights, config and, if present, tokenizer).

        Args:
            path: Local folder (nothing is downloaded).
            vocab: Speech ids; required when the folder has no tokenizer files, otherwise
                read from the tokenizer.
            mode: Default generation mode; None takes ``mtp_inference_mode`` from the
                folder's generation_config.json when present (the official Vanilla
                ``[8192, 0]`` included), else the official default ``[1, N]`` for ``N``
                MCTP heads (Turbo for 10 heads, ``[1, 1]`` for a one-head stage-2
                checkpoint; Vanilla without heads).
            device: Where the weights go.
            dtype: Cast the weights to this dtype (default: as stored).
            attn_implementation: Backbone attention implementation.

        Raises:
            ValueError: If there is no tokenizer in the folder and no ``vocab`` was given, the
                generation config's ``mtp_inference_mode`` is not a valid ratio, or as
                :func:`~vita_audio.checkpoint.load_vita_audio` and the constructor (e.g. a
                mode that needs more MCTP heads than the checkpoint has).
            FileNotFoundError, CheckpointError: As :func:`~vita_audio.checkpoint.load_vita_audio`.
        """
        folder = Path(path)
        tokenizer = None
        if any((folder / name).is_file() for name in _TOKENIZER_FILES):
            tokenizer = load_tokenizer(folder)
        elif vocab is None:
            raise ValueError(f"{folder} has no tokenizer files {_TOKENIZER_FILES}: pass vocab=")
        ckpt = load_vita_audio(
            folder, device=device, dtype=dtype, attn_implementation=attn_implementation
        )
        if vocab is None:
            vocab = SpeechVocab.from_tokenizer(tokenizer, vocab_size=ckpt.backbone.vocab_size)
        gen_file = folder / "generation_config.json"
        generation = json.loads(gen_file.read_text()) if gen_file.is_file() else {}
        if mode is None:
            ratio = generation.get("mtp_inference_mode")
            if ratio is None:  # the official default: [1, N]
                ratio = [1, ckpt.num_heads] if ckpt.num_heads else [1, 0]
            try:
                mode = InterleaveSchedule.from_ratio(ratio)
            except ValueError as err:
                raise ValueError(f"{gen_file}: mtp_inference_mode {ratio!r}: {err}") from err
        return cls(
            backbone=ckpt.backbone,
            stack=ckpt.stack,
            vocab=vocab,
            mode=mode,
            tokenizer=tokenizer,
            eos_token_id=generation.get("eos_token_id", ckpt.config.get("eos_token_id")),
        )

    def save_pretrained(self, path: str | Path, **kwargs: Any) -> Path:
        """Save in the official format, loadable by :meth:`from_pretrained`.

        The tokenizer and the default mode (as ``mtp_inference_mode``, Vanilla as the official
        ``[8192, 0]``) are written too unless ``kwargs`` say otherwise; ``kwargs`` go to
        :func:`~vita_audio.checkpoint.save_vita_audio`.

        Raises:
            ValueError: As :func:`~vita_audio.checkpoint.save_vita_audio`.
        """
        kwargs.setdefault("tokenizer", self.tokenizer)
        kwargs.setdefault("mtp_inference_mode", official_ratio(self.mode))
        return save_vita_audio(self.backbone, self.stack, path, **kwargs)

    def _kwargs(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        kwargs.setdefault("vocab", self.vocab)
        if self.eos_token_id is not None:
            kwargs.setdefault("eos_token_id", self.eos_token_id)
        return kwargs

    def generate(
        self,
        input_ids: torch.Tensor,
        *,
        mode: str | Mode | InterleaveSchedule | None = None,
        max_new_tokens: int = 256,
        **kwargs: Any,
    ) -> GenerationResult:
        """:func:`mctp.generate` with this model's parts, default mode, vocab and stop ids.

        Args:
            input_ids: ``[B, P]`` prompt ids (left-padded with ``attention_mask=`` if ragged).
            mode: Overrides the default mode.
            max_new_tokens: Tokens to generate per row.
            **kwargs: Further :func:`mctp.generate` options (sampling, ``verify``...).

        Raises:
            ValueError, TypeError: As :func:`mctp.generate`.
        """
        return generate(
            self.backbone,
            self.stack,
            input_ids,
            self.mode if mode is None else mode,
            max_new_tokens,
            **self._kwargs(kwargs),
        )

    def generate_stream(
        self,
        input_ids: torch.Tensor,
        *,
        mode: str | Mode | InterleaveSchedule | None = None,
        max_new_tokens: int = 256,
        **kwargs: Any,
    ) -> Iterator[StreamEvent]:
        """:func:`mctp.generate_stream` with this model's parts, default mode, vocab and stop ids.

        Yields:
            :class:`mctp.StreamEvent` (text ids, audio segments, end).

        Raises:
            ValueError, TypeError: As :func:`mctp.generate_stream`.
        """
        return generate_stream(
            self.backbone,
            self.stack,
            input_ids,
            self.mode if mode is None else mode,
            max_new_tokens,
            **self._kwargs(kwargs),
        )


def official_ratio(mode: str | Mode | InterleaveSchedule) -> list[int]:
    """The ``mtp_inference_mode`` list the official generation config stores for ``mode``.

    Vanilla is written as ``[8192, 0]``, as in the official generation configs.

    Raises:
        ValueError: For an unknown mode name.
    """
    schedule = mode if isinstance(mode, InterleaveSchedule) else InterleaveSchedule.from_mode(mode)
    return [8192, 0] if not schedule.uses_mctp else list(schedule.ratio)


def load_tokenizer(path: str | Path) -> Any:
    """The folder's tokenizer; a ``tokenizer.json`` is used verbatim.

    ``AutoTokenizer`` would pick the class from config.json's ``model_type`` (``qwen2`` ->
    ``Qwen2Tokenizer``, which rebuilds its own pre-tokenizer) and asks about remote code for
    ``qwen2_mtp`` folders; the generic fast class keeps the stored pipeline exactly.
    """
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    if (Path(path) / "tokenizer.json").is_file():
        return PreTrainedTokenizerFast.from_pretrained(path)
    return AutoTokenizer.from_pretrained(path, trust_remote_code=False)
