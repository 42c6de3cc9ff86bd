"""Prompt building for :class:`~mctp.speech.SpeechPipeline`: input audio, the chat messages, the
token ids (user text never becomes control tokens) and the prompt's embeddings.

A mixin of the pipeline (it reads the pipeline's tokenizer, vocabulary, input codec and
backbone); kept apart from generation and answering, which live in ``pipeline.py``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from .results import Prompt

__all__ = ["ASR_PROMPT", "TASKS", "TTS_PROMPT", "AudioInput", "PromptBuilder"]

ASR_PROMPT = "Convert the speech to text."
"""VITA-Audio's ASR instruction (followed by a newline and the audio)."""
TTS_PROMPT = "Convert the text to speech."
"""VITA-Audio's TTS instruction (followed by a newline and the text)."""
TASKS = ("chat", "tts", "asr")

AudioInput = str | os.PathLike | torch.Tensor | np.ndarray
"""A wav path, or a waveform (``[T]`` or ``[T, C]``/``[C, T]``) given with its sample rate."""


class PromptBuilder:
    """The prompt half of :class:`~mctp.speech.SpeechPipeline` (see its docstring for the
    attributes it reads)."""

    # ------------------------------------------------------------------ input
    def load_audio(self, audio: AudioInput, sample_rate: int | None = None) -> torch.Tensor:
        """A wav path or waveform -> ``[T]`` float32 mono at :attr:`input_sample_rate`.

        Raises:
            ValueError: If the pipeline has no speech input, or a waveform comes without its
                sample rate.
            mctp.codecs.AudioError: On an unreadable file or a bad waveform.
            FileNotFoundError: If the path does not exist.
        """
        from mctp.codecs import load_audio, resample, to_mono
        from mctp.codecs.audio import check_waveform

        rate = self.input_sample_rate
        if rate is None:
            raise ValueError(
                "this pipeline has no audio_tokenizer or audio_encoder: no speech input"
            )
        if isinstance(audio, (str, os.PathLike)):
            wav, _ = load_audio(Path(audio), sample_rate=rate)
            return wav
        if sample_rate is None:
            raise ValueError("a waveform needs its sample_rate")
        wav = torch.as_tensor(audio)
        if wav.ndim == 2:
            wav = to_mono(wav, channels_first=wav.shape[0] < wav.shape[1])
        wav = check_waveform(wav.float() if wav.is_floating_point() else wav)
        return resample(wav, int(sample_rate), rate) if int(sample_rate) != rate else wav

    def build_messages(
        self, text: str | None, has_audio: bool, task: str = "chat"
    ) -> list[dict[str, str]]:
        """Chat messages for one question (VITA-Audio's prompts).

        ``chat``: the text, or ``<|audio|>`` (text before it when both are given); ``tts``:
        ``"Convert the text to speech.\\n" + text``; ``asr``: ``"Convert the speech to text.\\n<|audio|>"``.
        The text is the user's: :meth:`prepare` reads it as plain text (special tokens in it
        such as ``<|im_end|>`` stay text).

        Raises:
            ValueError: On an unknown task, a task without its input, or text holding the
                reserved ``<|audio|>`` (the pipeline's own audio placeholder).
        """
        from mctp.speech_vocab import AUDIO_PLACEHOLDER

        if task not in TASKS:
            raise ValueError(f"unknown task {task!r}: use one of {TASKS}")
        if text and AUDIO_PLACEHOLDER in text:
            raise ValueError(
                f"text contains the reserved {AUDIO_PLACEHOLDER}: give speech as audio instead"
            )
        if task == "tts":
            if not text:
                raise ValueError("task 'tts' needs text")
            content = f"{TTS_PROMPT}\n{text}"
        elif task == "asr":
            if not has_audio:
                raise ValueError("task 'asr' needs audio")
            content = f"{ASR_PROMPT}\n{AUDIO_PLACEHOLDER}"
        elif has_audio:
            content = f"{text}\n{AUDIO_PLACEHOLDER}" if text else AUDIO_PLACEHOLDER
        elif text:
            content = text
        else:
            raise ValueError("give text or audio")
        messages = [{"role": "user", "content": content}]
        if self.system_prompt:
            messages.insert(0, {"role": "system", "content": self.system_prompt})
        return messages

    def control_ids(self) -> frozenset[int]:
        """Ids that user text must never produce: every added or special token of the
        tokenizer (chat markers, audio codes and tags, ...) except the unknown token."""
        cached = self.__dict__.get("_control")
        if cached is not None and cached[0] is self.tokenizer:
            return cached[1]
        ids = {int(i) for i in getattr(self.tokenizer, "added_tokens_decoder", {})}
        ids |= {int(i) for i in self.tokenizer.all_special_ids}
        unk = self.tokenizer.unk_token_id
        out = frozenset(ids - {unk})
        self.__dict__["_control"] = (self.tokenizer, out)
        return out

    def _text_ids(self, text: str, control: frozenset[int]) -> list[int]:
        """``text`` as plain text ids: special tokens are split (``split_special_tokens``) and
        added tokens that the tokenizer still matches (e.g. ``<|audio_5|>``, not marked
        special) are broken before their last character.

        Raises:
            ValueError: If the tokenizer still turns part of the text into a control token.
        """
        import re

        tok = self.tokenizer

        def plain(piece: str) -> list[int]:
            if not piece:
                return []
            return list(tok(piece, add_special_tokens=False, split_special_tokens=True).input_ids)

        ids = plain(text)
        if not control.intersection(ids):
            return ids
        cached = self.__dict__.get("_added_pattern")
        if cached is None or cached[0] is not tok:
            names = sorted((str(t) for t in tok.get_added_vocab() if str(t)), key=len)
            cached = (tok, re.compile("|".join(re.escape(n) for n in reversed(names))))
            self.__dict__["_added_pattern"] = cached
        pattern = cached[1]
        ids, last = [], 0
        for m in pattern.finditer(text):
            ids += plain(text[last : m.start()]) + plain(m.group()[:-1]) + plain(m.group()[-1:])
            last = m.end()
        ids += plain(text[last:])
        bad = sorted(control.intersection(ids))
        if bad:
            raise ValueError(
                f"the text holds {tok.convert_ids_to_tokens(bad[:5])}, which this tokenizer "
                "cannot read as plain text"
            )
        return ids

    def token_ids(self, messages: Sequence[dict[str, str]]) -> list[int]:
        """:meth:`_token_ids`, one call at a time: transformers switches
        ``split_special_tokens`` on the shared tokenizer for the length of a call, so a call
        from another thread (the server bounds a prompt on its event loop while its worker
        builds another) would tokenize with the other call's setting."""
        with self._tokenizing:
            return self._token_ids(messages)

    def _token_ids(self, messages: Sequence[dict[str, str]]) -> list[int]:
        """The chat template's token ids for ``messages``, before speech is put in.

        Only the template's own markers and the ``<|audio|>`` placeholders in the contents
        become control tokens; everything in the contents is tokenised as plain text
        (``<|im_end|>``, ``<|begin_of_audio|>``, ``<|audio_5|>``, ... typed by a user stay
        text). Each content is tokenised on its own (as the tokenizer does between special
        tokens anyway).

        Raises:
            ValueError: If a content is not a string, or holds text the tokenizer can only
                read as a control token.
        """
        import re
        import uuid

        from mctp.speech_vocab import AUDIO_PLACEHOLDER

        nonce = uuid.uuid4().hex
        marked = []
        for i, m in enumerate(messages):
            if not isinstance(m.get("content"), str):
                raise ValueError(f"messages[{i}].content must be a string")
            marked.append({**m, "content": f"\ue000{nonce}:{i}\ue001"})
        text = self.tokenizer.apply_chat_template(
            marked, add_generation_prompt=True, tokenize=False
        )
        control = self.control_ids()
        ph = self.vocab.audio_placeholder
        ids: list[int] = []
        last = 0
        for mark in re.finditer(f"\ue000{nonce}:(\\d+)\ue001", text):
            ids += self.tokenizer(text[last : mark.start()], add_special_tokens=False).input_ids
            for j, piece in enumerate(
                messages[int(mark.group(1))]["content"].split(AUDIO_PLACEHOLDER)
            ):
                if j:
                    ids.append(ph)
                ids += self._text_ids(piece, control)
            last = mark.end()
        ids += self.tokenizer(text[last:], add_special_tokens=False).input_ids
        return ids

    @torch.inference_mode()
    def prepare(self, messages: Sequence[dict[str, str]], audios: Sequence[torch.Tensor]) -> Prompt:
        """Render the chat template and put the speech in place of the ``<|audio|>`` placeholders.

        The contents are tokenised as plain text (see :meth:`token_ids`): a user cannot close
        the turn or inject audio codes by typing control tokens.

        Args:
            messages: ``[{"role", "content"}]`` with one ``<|audio|>`` per audio, in order.
            audios: ``[T_i]`` waveforms at :attr:`input_sample_rate`.

        Returns:
            The :class:`Prompt` on the backbone's device.

        Raises:
            ValueError: If placeholders and audios differ in number, or a content holds text
                the tokenizer can only read as a control token.
        """
        ids = self.token_ids(messages)
        ph = self.vocab.audio_placeholder
        slots = [i for i, t in enumerate(ids) if t == ph]
        if len(slots) != len(audios):
            raise ValueError(
                f"the messages hold {len(slots)} <|audio|> placeholders but {len(audios)} audios were given"
            )
        frames: list[torch.Tensor] = []
        pieces: list[list[int]] = []
        if self.audio_tokenizer is not None and audios:
            for codes in self.audio_tokenizer.encode(
                list(audios), sample_rate=self.input_sample_rate
            ):
                pieces.append(self.vocab.from_codes(codes.cpu()).tolist())
        elif self.audio_encoder is not None and audios:
            for f in self.audio_encoder.encode(list(audios), sample_rate=self.input_sample_rate):
                frames.append(f)
                pieces.append([self.vocab.audio_context] * f.shape[0])
        out: list[int] = []
        last = 0
        for slot, piece in zip(slots, pieces):
            out += [*ids[last:slot], self.vocab.boa, *piece, self.vocab.eoa]
            last = slot + 1
        out += ids[last:]
        input_ids = torch.tensor([out], device=self.device)
        if not frames:
            return Prompt(input_ids)
        from mctp.codecs import scatter_audio_embeddings

        embed = self.backbone.parts().embed
        embeds = embed(input_ids)
        assert self.projector is not None
        p = next(self.projector.parameters())
        audio = [self.projector(f.to(p.device, p.dtype)).to(embeds.dtype) for f in frames]
        return Prompt(
            input_ids,
            scatter_audio_embeddings(embeds, input_ids, audio, int(self.vocab.audio_context)),
        )
