"""GLM-4-Voice-9B as an mctp backbone, with optional MCTP heads.

    from glm4_voice.model import GLM4Voice

    llm = GLM4Voice.from_pretrained("glm-4-voice-9b", heads="glm4-voice-heads")
    ids = llm.encode("Tell me a joke")
    res = llm.generate(ids, mode=llm.turbo_schedule(), max_new_tokens=512, verify=True)
    text, audio = llm.split(res.tokens[0])

The backbone is transformers' ``GlmForCausalLM`` loaded from the released ChatGLM folder
(:mod:`glm4_voice.checkpoint`) and wrapped in :class:`~mctp.backbones.HFBackbone`; the heads
are an :class:`~mctp.MCTPStack` saved by ``MCTPStack.save_pretrained`` (trained by
:mod:`glm4_voice.train`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from mctp import GenerationResult, MCTPStack, generate
from mctp.backbones import HFBackbone
from mctp.interleave import InterleaveSchedule

from .checkpoint import ChatGLMShape, load_glm4_voice, read_shape
from .vocab import (
    FIRST_AUDIO_BLOCK,
    GLM4VoiceVocab,
    check_schedule,
    native_schedule,
    turbo_schedule,
)

__all__ = ["GLM4Voice", "first_audio", "load_tokenizer"]


def load_tokenizer(folder: str | os.PathLike[str], *, trust_remote_code: bool = False) -> Any:
    """The folder's tokenizer: ``tokenizer.json`` directly, else the released remote code.

    The released GLM-4-Voice-9B tokenizer is a tiktoken file read by
    ``tokenization_chatglm.py``; loading it needs ``trust_remote_code=True``.

    Raises:
        FileNotFoundError: If the folder has no tokenizer files.
        ValueError: If only the remote-code tokenizer exists and ``trust_remote_code`` is
            False.
    """
    path = Path(folder)
    if (path / "tokenizer.json").is_file():
        from transformers import PreTrainedTokenizerFast

        return PreTrainedTokenizerFast.from_pretrained(str(path))
    if (path / "tokenizer_config.json").is_file():
        if not trust_remote_code:
            raise ValueError(
                f"{folder}: the released GLM-4-Voice tokenizer is remote code "
                "(tokenization_chatglm.py); pass trust_remote_code=True to load it"
            )
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(path), trust_remote_code=True)
    raise FileNotFoundError(f"{folder} has no tokenizer files")


def first_audio(
    result: GenerationResult, vocab: GLM4VoiceVocab, *, row: int = 0, block: int = FIRST_AUDIO_BLOCK
) -> tuple[int | None, int | None, float | None]:
    """When a generation could first speak (the decoder starts on ``block`` audio tokens).

    Args:
        result: A generation result (its ``cycle_times`` time the tokens).
        vocab: The model's vocabulary.
        row: Batch row.
        block: Audio tokens the speech decoder needs (released: 10).

    Returns:
        ``(text tokens before the first audio token, tokens generated until the block is
        complete, seconds until then)``; Nones where the output never reaches the block.
    """
    toks = result.tokens[row]
    audio = vocab.is_audio(toks)
    if not bool(audio.any()):
        return None, None, None
    before = int(audio.int().argmax())
    count = audio.int().cumsum(0)
    if int(count[-1]) < block:
        return before, None, None
    ready = int((count >= block).int().argmax()) + 1
    secs = next((t for produced, t in result.cycle_times if produced >= ready), None)
    return before, ready, secs


class GLM4Voice:
    """GLM-4-Voice's backbone, tokenizer, speech ids and (optional) MCTP heads.

    Args:
        backbone: The wrapped ``GlmForCausalLM``.
        tokenizer: Its tokenizer.
        vocab: Its special and audio ids.
        stack: MCTP heads on ``backbone`` or None.
        shape: The released config's sizes.

    Raises:
        ValueError: If the heads do not share the backbone's embedding.
    """

    def __init__(
        self,
        backbone: HFBackbone,
        tokenizer: Any,
        vocab: GLM4VoiceVocab,
        stack: MCTPStack | None = None,
        shape: ChatGLMShape | None = None,
    ) -> None:
        if stack is not None and stack.embed is not backbone.parts().embed:
            raise ValueError("the MCTP heads do not share this backbone's embedding")
        self.backbone = backbone
        self.tokenizer = tokenizer
        self.vocab = vocab
        self.stack = stack
        self.shape = shape

    @classmethod
    def from_pretrained(
        cls,
        folder: str | os.PathLike[str],
        *,
        heads: str | os.PathLike[str] | None = None,
        dtype: torch.dtype | None = None,
        device: str | torch.device = "cpu",
        expect: dict[str, int] | None = None,
        num_audio: int | None = None,
        trust_remote_code: bool = False,
    ) -> GLM4Voice:
        """Load a released GLM-4-Voice-9B folder (and heads saved by ``MCTPStack``).

        Args:
            folder: The released model folder.
            heads: A folder written by ``MCTPStack.save_pretrained`` (None: no heads).
            dtype: Weight dtype (default: as stored).
            device: Where the model runs.
            expect: Sizes the folder must have (``checkpoint.RELEASED_SHAPE`` for the 9B).
            num_audio: Audio tokens the tokenizer must hold (released: 16384).
            trust_remote_code: Allow the released tokenizer's remote code.

        Raises:
            FileNotFoundError, ValueError, mctp.CheckpointError: See
                :func:`~glm4_voice.checkpoint.load_glm4_voice`,
                :func:`load_tokenizer` and :meth:`GLM4VoiceVocab.from_tokenizer` (a tokenizer
                without the expected audio tokens).
        """
        shape = read_shape(folder)
        tok = load_tokenizer(folder, trust_remote_code=trust_remote_code)
        vocab = GLM4VoiceVocab.from_tokenizer(tok, vocab_size=shape.vocab_size, num_audio=num_audio)
        model = load_glm4_voice(folder, dtype=dtype, device=device, expect=expect)
        backbone = HFBackbone(model)
        stack = None
        if heads is not None:
            stack = MCTPStack.from_pretrained(heads, backbone.parts()).to(
                device=device, dtype=next(model.parameters()).dtype
            )
        return cls(backbone, tok, vocab, stack, shape)

    @property
    def num_heads(self) -> int:
        """Number of MCTP heads (0 without)."""
        return 0 if self.stack is None else self.stack.num_heads

    @property
    def device(self) -> torch.device:
        """Device of the backbone's weights."""
        return next(self.backbone.parameters()).device

    def native_schedule(self) -> InterleaveSchedule:
        """The model's own 13 text / 26 audio interleave (untagged, its audio range)."""
        return native_schedule(self.vocab)

    def turbo_schedule(self, *, text: int = 1) -> InterleaveSchedule:
        """``text`` backbone forwards, then all heads in a chain, repeating.

        Raises:
            ValueError: If the model has no heads.
        """
        if self.stack is None:
            raise ValueError("turbo_schedule needs MCTP heads; load them with heads=...")
        return turbo_schedule(self.vocab, self.num_heads, text=text)

    def encode(self, user: str | Sequence[int], *, system: str | None = None) -> torch.Tensor:
        """Prompt ids ``[1, P]`` of one turn in the released format (text or audio codes).

        Raises:
            ValueError: On audio codes outside the codebook.
        """
        text = self.vocab.prompt(user, system=system)
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return torch.tensor([ids], dtype=torch.long, device=self.device)

    def split(self, tokens: torch.Tensor | Sequence[int]) -> tuple[list[int], list[int]]:
        """Generated ids -> ``(text ids, audio codes)``, stop ids dropped."""
        text: list[int] = []
        codes: list[int] = []
        stops = set(self.vocab.stop_ids)
        for t in torch.as_tensor(tokens).tolist():
            if self.vocab.audio_start <= t < self.vocab.audio_stop:
                codes.append(t - self.vocab.audio_start)
            elif t not in stops:
                text.append(t)
        return text, codes

    def generate(
        self,
        input_ids: torch.Tensor,
        *,
        mode: str | InterleaveSchedule = "vanilla",
        max_new_tokens: int = 256,
        verify: bool = False,
        **kwargs: Any,
    ) -> GenerationResult:
        """``mctp.generate`` with the model's stop ids and speech ids.

        Args:
            input_ids: ``[B, P]`` prompt ids.
            mode: ``"vanilla"`` or an untagged schedule that fits the model
                (:meth:`native_schedule`, :meth:`turbo_schedule`).
            max_new_tokens: Token budget.
            verify: Check every head token with the backbone (output equals Vanilla's).
            **kwargs: Further ``mctp.generate`` keywords (sampling, draft_len, ...).

        Raises:
            ValueError: For a schedule that does not fit (tags, audio range, heads), a named
                mode other than ``"vanilla"``, or as ``mctp.generate``.
        """
        if isinstance(mode, str):
            if mode != "vanilla":
                raise ValueError(
                    f"mode {mode!r} is a VITA-Audio preset with BOA/EOA tags; GLM-4-Voice takes "
                    "'vanilla' or an untagged schedule (native_schedule / turbo_schedule)"
                )
            schedule = InterleaveSchedule.vanilla()
        else:
            schedule = check_schedule(mode, self.vocab, self.num_heads)
        return generate(
            self.backbone,
            self.stack if schedule.uses_mctp else None,
            input_ids,
            mode=schedule,
            max_new_tokens=max_new_tokens,
            verify=verify,
            eos_token_id=self.vocab.stop_ids,
            vocab=self.vocab,
            **kwargs,
        )
