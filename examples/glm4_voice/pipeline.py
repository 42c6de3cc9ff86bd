"""GLM-4-Voice as a :class:`mctp.speech.SpeechPipeline` (``mctp speak``/``mctp serve``).

    from glm4_voice.pipeline import build_pipeline

    pipe = build_pipeline(model="glm-4-voice-9b", heads="glm4-voice-heads",
                          tokenizer="glm-4-voice-tokenizer", decoder="glm-4-voice-decoder",
                          device="cuda", dtype=torch.bfloat16)
    result = pipe("Tell me a joke")

From the command line (the repository's ``examples/`` on ``PYTHONPATH``)::

    PYTHONPATH=examples mctp serve --builder glm4_voice.pipeline:build_pipeline \\
        --model glm-4-voice-9b --tokenizer glm-4-voice-tokenizer --decoder glm-4-voice-decoder

GLM-4-Voice differs from VITA-Audio in two ways the pipeline handles here: its turn format
(``<|system|>``/``<|user|>``/``<|assistant|>streaming_transcription``, the released system
prompts) and its answers, whose audio tokens come with no BOA/EOA tags between text runs
(every audio id the model emits goes to the speech decoder as it appears). Modes:
``"vanilla"``, ``"native"`` (13 text / 26 audio, heads for the audio runs: needs 26 heads) and
``"turbo"`` (one backbone forward, then every head); a VITA-Audio preset is refused.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from mctp.interleave import InterleaveSchedule, Mode
from mctp.speech import Prompt, SpeechChunk, SpeechPipeline, SpeechRequest

from .model import GLM4Voice
from .vocab import AUDIO_PROMPT, TEXT_PROMPT, check_schedule, native_schedule, turbo_schedule

__all__ = ["CHAT_TEMPLATE", "GLM4VoicePipeline", "build_pipeline"]

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>streaming_transcription\n{% endif %}"
)
"""The released turn format as a chat template."""

_AUDIO = "<|audio|>"  # where the user's speech goes in a message (not a GLM-4-Voice token)


class GLM4VoicePipeline(SpeechPipeline):
    """:class:`~mctp.speech.SpeechPipeline` with GLM-4-Voice's turn format and untagged audio.

    Args:
        **kwargs: As :class:`~mctp.speech.SpeechPipeline`; ``vocab`` is a
            :class:`~glm4_voice.vocab.GLM4VoiceVocab`.

    Raises:
        ValueError: As :class:`~mctp.speech.SpeechPipeline`, or for a mode that does not fit.
    """

    def schedule(self, mode: str | Mode | InterleaveSchedule) -> InterleaveSchedule:
        """``"vanilla"``, ``"native"``, ``"turbo"`` or a fitting untagged schedule.

        Raises:
            ValueError: For another name or a schedule that does not fit the model.
        """
        heads = 0 if self.stack is None else self.stack.num_heads
        if isinstance(mode, InterleaveSchedule):
            return check_schedule(mode, self.vocab, heads)
        name = str(mode.value if isinstance(mode, Mode) else mode).lower()
        if name == "vanilla":
            return InterleaveSchedule.vanilla()
        if name == "native":
            return check_schedule(native_schedule(self.vocab), self.vocab, heads)
        if name == "turbo":
            if heads == 0:
                raise ValueError("mode 'turbo' needs MCTP heads; build the pipeline with heads=")
            return turbo_schedule(self.vocab, heads)
        raise ValueError(
            f"mode {mode!r} does not fit GLM-4-Voice: use 'vanilla', 'native' or 'turbo' "
            "(VITA-Audio's presets put BOA/EOA tags around audio; GLM-4-Voice speaks without)"
        )

    def build_messages(
        self, text: str | None, has_audio: bool, task: str = "chat"
    ) -> list[dict[str, str]]:
        """One turn with the released system prompt for the input kind.

        Raises:
            ValueError: For a task other than ``"chat"`` or no input.
        """
        if task != "chat":
            raise ValueError(f"GLM-4-Voice has no {task!r} prompt; use task='chat'")
        if not text and not has_audio:
            raise ValueError("give text or audio")
        content = (f"{text}\n{_AUDIO}" if text else _AUDIO) if has_audio else str(text)
        system = self.system_prompt or (AUDIO_PROMPT if has_audio else TEXT_PROMPT)
        return [{"role": "system", "content": system}, {"role": "user", "content": content}]

    @torch.inference_mode()
    def prepare(self, messages: Sequence[dict[str, str]], audios: Sequence[torch.Tensor]) -> Prompt:
        """Render the turn; each ``<|audio|>`` becomes ``<|begin_of_audio|>`` codes ``<|end_of_audio|>``.

        Raises:
            ValueError: If placeholders and audios differ in number, or speech comes without
                an input codec.
        """
        with self._tokenizing:  # the pipeline's tokenizer lock (one tokenizer call at a time)
            text = self.tokenizer.apply_chat_template(
                list(messages), add_generation_prompt=True, tokenize=False
            )
        parts = text.split(_AUDIO)
        if len(parts) - 1 != len(audios):
            raise ValueError(
                f"the messages hold {len(parts) - 1} {_AUDIO} placeholders but {len(audios)} "
                "audios were given"
            )
        if audios and self.audio_tokenizer is None:
            raise ValueError("speech input needs an audio tokenizer (tokenizer=...)")
        codes = (
            self.audio_tokenizer.encode(list(audios), sample_rate=self.input_sample_rate)
            if audios
            else []
        )
        ids: list[int] = []
        for j, part in enumerate(parts):
            with self._tokenizing:
                ids += self.tokenizer(part, add_special_tokens=False)["input_ids"]
            if j < len(codes):
                audio = (codes[j].cpu() + self.vocab.audio_start).tolist()
                ids += [self.vocab.boa, *audio, self.vocab.eoa]
        return Prompt(torch.tensor([ids], device=self.device))

    def answer(self, request: SpeechRequest, events: Iterator[Any]) -> Iterator[SpeechChunk]:
        """Speak a request's row of events: text ids become text, every audio id goes to the
        decoder as it appears (GLM-4-Voice puts no tags around its audio)."""
        t0 = request.t0
        session = self.decoder.stream()
        session.reset()
        lo, hi = self.vocab.audio_range
        stops = set(request.config.eos_token_id)
        text_ids: list[int] = []
        said = ""
        wav: list[torch.Tensor] = []
        first_chunk = first_text = None
        n_audio = 0
        gen = None
        for ev in events:
            if ev.row_result is not None:
                gen = ev.row_result
            elif ev.result is not None:
                gen = ev.result
            if ev.kind == "end":
                continue
            audio = [i for i in ev.ids if lo <= i < hi]
            words = [i for i in ev.ids if not lo <= i < hi and i not in stops]
            if words:
                text_ids += words
                full = self.tokenizer.decode(text_ids, skip_special_tokens=True)
                delta = full[len(said) :] if full.startswith(said) else full
                said = full
                if delta:
                    now = time.perf_counter() - t0
                    first_text = now if first_text is None else first_text
                    yield SpeechChunk("text", now, text=delta)
            if audio:
                n_audio += len(audio)
                chunk = session.push(torch.tensor(audio, dtype=torch.long) - lo)
                if chunk.numel():
                    now = time.perf_counter() - t0
                    first_chunk = now if first_chunk is None else first_chunk
                    wav.append(chunk)
                    yield SpeechChunk("audio", now, audio=chunk)
        tail = session.push(torch.zeros(0, dtype=torch.long), final=True)
        if tail.numel():
            now = time.perf_counter() - t0
            first_chunk = now if first_chunk is None else first_chunk
            wav.append(tail)
            yield SpeechChunk("audio", now, audio=tail)
        yield self._finish(request, gen, said, wav, first_chunk, first_text, n_audio)


def build_pipeline(
    *,
    model: str | os.PathLike[str],
    heads: str | os.PathLike[str] | None = None,
    tokenizer: str | os.PathLike[str] | None = None,
    decoder: str | os.PathLike[str] | None = None,
    mode: str | None = None,
    max_new_tokens: int = 1024,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    trust_remote_code: bool = False,
    **kwargs: Any,
) -> GLM4VoicePipeline:
    """A pipeline for a released GLM-4-Voice-9B folder (plus MCTP heads, codec folders).

    Args:
        model: The released model folder.
        heads: MCTP heads saved by ``MCTPStack.save_pretrained`` (None: ``model/mctp_heads``
            when that folder exists, else no heads; the ``--builder`` command line passes
            none, so keep the heads there to serve them).
        tokenizer: The GLM-4-Voice speech tokenizer folder (None: the dummy codec, tests).
        decoder: The GLM-4-Voice decoder folder (None: the dummy codec, tests).
        mode: Default mode (None: ``"turbo"`` with heads, else ``"vanilla"``).
        max_new_tokens: Default generation budget.
        device: Where everything runs.
        dtype: Weight dtype of the LLM (default: as stored).
        trust_remote_code: Allow the released tiktoken tokenizer's remote code.
        **kwargs: Further :class:`~mctp.speech.SpeechPipeline` arguments.

    Raises:
        FileNotFoundError, ValueError, mctp.CheckpointError: As
            :meth:`GLM4Voice.from_pretrained` and the pipeline.
    """
    from mctp.codecs import DummyCodec, load_codec

    if heads is None and os.path.isfile(os.path.join(model, "mctp_heads", "mctp_config.json")):
        heads = os.path.join(model, "mctp_heads")
    llm = GLM4Voice.from_pretrained(
        model, heads=heads, device=device, dtype=dtype, trust_remote_code=trust_remote_code
    )
    tok = llm.tokenizer
    if getattr(tok, "chat_template", None) is None:
        tok.chat_template = CHAT_TEMPLATE
    n = llm.vocab.num_audio
    codec_in = DummyCodec(codebook_size=min(n, 638)) if tokenizer is None else load_codec(tokenizer)
    codec_out = (
        DummyCodec(codebook_size=n) if decoder is None else load_codec(decoder, device=device)
    )
    return GLM4VoicePipeline(
        backbone=llm.backbone,
        stack=llm.stack,
        tokenizer=tok,
        vocab=llm.vocab,
        decoder=codec_out,
        audio_tokenizer=codec_in,
        mode=mode or ("turbo" if llm.stack is not None else "vanilla"),
        eos_token_id=llm.vocab.stop_ids,
        max_new_tokens=max_new_tokens,
        name=os.path.basename(os.path.normpath(model)),
        **kwargs,
    )
