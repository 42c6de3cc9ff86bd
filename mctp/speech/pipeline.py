"""``SpeechPipeline``: a question (text or speech) in, a spoken answer out, streamed.

It composes the parts every speech LLM with MCTP has: an audio input codec (an
:class:`~mctp.codecs.AudioTokenizer`, or an :class:`~mctp.codecs.AudioEncoder` plus a projector
for VITA-Audio-Plus-style continuous input), the text tokenizer's chat template, a backbone with
its :class:`~mctp.MCTPStack` generating on a schedule, and an :class:`~mctp.codecs.AudioDecoder`
streaming session that turns every audio segment into waveform as soon as it exists.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from mctp.interleave import InterleaveSchedule, Mode

from .prompts import ASR_PROMPT, TTS_PROMPT, AudioInput, PromptBuilder
from .results import Prompt, SpeechChunk, SpeechResult

__all__ = ["ASR_PROMPT", "TTS_PROMPT", "AudioInput", "SpeechPipeline", "SpeechRequest"]

_log = logging.getLogger(__name__)


@dataclass
class SpeechRequest:
    """A prepared request: its prompt and request settings, ready to join a cohort.

    Attributes:
        prompt: The model input (:class:`Prompt`).
        config: Request settings (:class:`mctp.GenerationConfig`: mode, budget, sampling,
            stop ids, verification).
        t0: ``time.perf_counter()`` when the request arrived (its timings count from here,
            waiting included).
        began: ``time.perf_counter()`` when its generation began: set by the server's
            batcher when a batch starts with it or it joins one (None: when its answer is
            first read).
    """

    prompt: Prompt
    config: Any
    t0: float
    began: float | None = None

    @property
    def row(self) -> Any:
        """This request as a :class:`mctp.engine.batching.RowRequest`."""
        from mctp.engine.batching import RowRequest

        return RowRequest(self.prompt.input_ids, self.config, self.prompt.prompt_embeds)


class SpeechPipeline(PromptBuilder):
    """Speech in, speech out: chat template, audio prompt, MCTP generation, streaming decoder.

    Args:
        backbone: A cached backbone (e.g. :class:`mctp.backbones.HFBackbone`).
        stack: Its MCTP heads, or None (Vanilla only).
        tokenizer: The text tokenizer (transformers; needs a chat template).
        vocab: Speech ids (:class:`mctp.SpeechVocab`).
        decoder: The :class:`~mctp.codecs.AudioDecoder` that speaks the audio tokens.
        audio_tokenizer: Speech input as discrete tokens (``<|audio|>`` becomes
            ``BOA audio... EOA``), or None.
        audio_encoder: Speech input as continuous frames (VITA-Audio-Plus: ``<|audio|>``
            becomes ``BOA`` + one ``<|context_of_audio|>`` per frame + ``EOA``; the projected
            frames replace the placeholders' embeddings), or None.
        projector: ``[F, D] -> [F, H]`` module for ``audio_encoder`` frames.
        mode: Default schedule: ``"vanilla"``, ``"balance"``, ``"boost"``, ``"turbo"`` or an
            :class:`~mctp.interleave.InterleaveSchedule`.
        eos_token_id: Stop id(s) (default: the tokenizer's ``eos_token_id``).
        max_new_tokens: Default generation budget.
        audio_chunk: Hand audio to the decoder in pieces of this many tokens inside long
            segments (None: whole segments).
        text_sampling: :class:`mctp.SamplingConfig` for text (default greedy).
        audio_sampling: :class:`mctp.SamplingConfig` for audio (default: like text).
        verify: Verified (lossless) decoding by default (greedy only).
        engine: Engine settings (:class:`mctp.EngineConfig`: device, dtype, ``max_batch``,
            ``max_len``, compile, audio-only heads, compile cache); the pipeline's
            Generators are built from it once and reused by every request. Its ``dtype``,
            when set, is applied to the backbone and the heads here (the codecs keep theirs).
            Default: ``EngineConfig(max_len=4096)``, eager, the model's dtype.
        system_prompt: A system message put before every conversation, or None.
        name: Model name reported by the server.
        num_threads: Torch CPU threads while this pipeline prepares and generates (set for
            the call, restored after; torch's intra-op pool is process-wide), or None to
            leave torch's setting alone. Tiny models run fastest on 1: their matrices are too
            small to split, and extra threads only contend for the cores.

    Raises:
        ValueError: If ``audio_encoder`` comes without ``projector`` (or the reverse), both
            input codecs are given, the codebooks do not fit the vocabulary, the tokenizer has
            no chat template, or the mode needs more heads than the stack has.
    """

    def __init__(
        self,
        *,
        backbone: Any,
        stack: Any | None,
        tokenizer: Any,
        vocab: Any,
        decoder: Any,
        audio_tokenizer: Any | None = None,
        audio_encoder: Any | None = None,
        projector: torch.nn.Module | None = None,
        mode: str | Mode | InterleaveSchedule = "boost",
        eos_token_id: int | list[int] | None = None,
        max_new_tokens: int = 512,
        audio_chunk: int | None = None,
        text_sampling: Any | None = None,
        audio_sampling: Any | None = None,
        verify: bool = False,
        engine: Any | None = None,
        system_prompt: str | None = None,
        name: str = "mctp",
        num_threads: int | None = None,
    ) -> None:
        if audio_tokenizer is not None and audio_encoder is not None:
            raise ValueError("give audio_tokenizer or audio_encoder, not both")
        if (audio_encoder is None) != (projector is None):
            raise ValueError("audio_encoder and projector go together")
        if audio_encoder is not None and vocab.audio_context is None:
            raise ValueError(
                "an audio_encoder needs <|context_of_audio|> in the vocabulary "
                "(extend_vocab(..., plus=True))"
            )
        if vocab.num_audio > decoder.codebook_size:
            raise ValueError(
                f"the model has {vocab.num_audio} audio codes but the decoder only decodes "
                f"{decoder.codebook_size}"
            )
        if audio_tokenizer is not None and audio_tokenizer.codebook_size > vocab.num_audio:
            raise ValueError(
                f"the audio tokenizer emits {audio_tokenizer.codebook_size} codes but the model "
                f"has {vocab.num_audio} audio tokens"
            )
        if getattr(tokenizer, "chat_template", None) is None:
            raise ValueError("the tokenizer has no chat_template")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if num_threads is not None and num_threads < 1:
            raise ValueError(f"num_threads must be >= 1, got {num_threads}")
        self.num_threads = num_threads
        self.backbone, self.stack, self.tokenizer, self.vocab = backbone, stack, tokenizer, vocab
        self.decoder = decoder
        self.audio_tokenizer, self.audio_encoder, self.projector = (
            audio_tokenizer,
            audio_encoder,
            projector,
        )
        from mctp.engine.generation_config import EngineConfig, GenerationConfig
        from mctp.engine.sampling import SamplingConfig

        eos = tokenizer.eos_token_id if eos_token_id is None else eos_token_id
        if eos is None:
            raise ValueError("no eos_token_id given and the tokenizer has none")
        self.generation = GenerationConfig(
            mode=self.schedule(mode),
            max_new_tokens=max_new_tokens,
            eos_token_id=eos,
            text_sampling=text_sampling or SamplingConfig(),
            audio_sampling=audio_sampling,
            verify=verify,
        )
        """The default request settings (one :class:`mctp.GenerationConfig`)."""
        self.engine = EngineConfig(max_len=4096) if engine is None else engine
        if not isinstance(self.engine, EngineConfig):
            raise TypeError(f"engine must be an EngineConfig, got {type(self.engine).__name__}")
        if self.engine.dtype is not None:  # the engine's dtype is the model's (codecs stay)
            backbone.to(self.engine.torch_dtype)
            if stack is not None:
                stack.to(self.engine.torch_dtype)
        self.audio_chunk = audio_chunk
        self.system_prompt = system_prompt
        self._lanes: list[Any] = []  # Generators built from self.engine, on first use
        self._tokenizing = threading.Lock()  # see token_ids
        self.name = name

    # ------------------------------------------------------------------ properties
    @property
    def mode(self) -> InterleaveSchedule:
        """The default schedule."""
        return self.generation.schedule

    @property
    def max_new_tokens(self) -> int:
        """The default budget."""
        return self.generation.max_new_tokens

    @property
    def eos_token_id(self) -> tuple[int, ...]:
        """The stop ids."""
        return self.generation.eos_token_id

    def generators(self, n: int = 1) -> list[Any]:
        """The pipeline's first ``n`` :class:`mctp.Generator` (built from :attr:`engine` on
        first use, then reused by every request: caches and compiled code made once)."""
        from mctp.engine.generator import Generator

        while len(self._lanes) < n:
            self._lanes.append(
                Generator(
                    self.backbone,
                    self.stack,
                    self.generation,
                    engine=self.engine,
                    vocab=self.vocab,
                )
            )
        return self._lanes[:n]

    def warmup(self, modes: Sequence[str | Mode | InterleaveSchedule] | None = None) -> float:
        """Run one short request per mode on every built Generator (the compiled path compiles
        here, not in a user's first request), on the compiled path once per row count it runs
        (regions: a lone request's 1 row and all ``max_batch`` rows); writes the compile cache
        when the engine names one.

        Returns:
            Seconds spent.
        """
        t = time.perf_counter()
        if modes is None:
            modes = [self.mode]
        from mctp.engine.batching import Cohort

        for lane in self.generators(max(1, len(self._lanes))):
            cap = lane.max_batch
            counts = (
                sorted({lane.path.rows_for(n, cap) for n in range(1, cap + 1)})
                if self.engine.compile
                else [1]
            )
            for mode in modes:
                sched = self.schedule(mode)
                for count in counts:
                    reqs = [self.open("hello", mode=sched, max_new_tokens=40) for _ in range(count)]
                    cohort = Cohort(lane, [req.row for req in reqs])
                    for i, req in enumerate(reqs):
                        for _ in self.answer(req, cohort.events(i)):
                            pass
        if self.engine.compile and self.engine.compile_cache is not None:
            # torch's artifacts are process-wide: one file for every lane; the next start
            # loads it instead of compiling
            self._lanes[0].path.save_compile_cache()
        return time.perf_counter() - t

    @property
    def sample_rate(self) -> int:
        """Sample rate of the answers' audio (the decoder's)."""
        return int(self.decoder.sample_rate)

    @property
    def input_codec(self) -> Any:
        """The speech-input codec: the audio tokenizer or the audio encoder (None without
        speech input)."""
        return self.audio_tokenizer or self.audio_encoder

    @property
    def input_sample_rate(self) -> int | None:
        """Sample rate the input codec needs (None without speech input)."""
        codec = self.input_codec
        return None if codec is None else int(codec.sample_rate)

    @property
    def device(self) -> torch.device:
        """Where the backbone's weights live (the CPU once they were released to the meta
        device: another engine generates and the pipeline only builds prompts)."""
        device = next(self.backbone.parameters()).device
        return torch.device("cpu") if device.type == "meta" else device

    def schedule(self, mode: str | Mode | InterleaveSchedule) -> InterleaveSchedule:
        """Resolve and check a mode against the stack.

        Raises:
            ValueError: On an unknown mode or one needing more MCTP heads than the stack has.
        """
        if isinstance(mode, InterleaveSchedule):
            sched = mode
        else:
            try:
                sched = InterleaveSchedule.from_mode(mode)
            except ValueError as e:
                names = [m.value for m in Mode]
                raise ValueError(f"unknown mode {mode!r}: use one of {names}") from e
        heads = 0 if self.stack is None else self.stack.num_heads
        if sched.uses_mctp and sched.max_heads > heads:
            raise ValueError(
                f"mode {list(sched.ratio)} needs {sched.max_heads} MCTP heads, the model has {heads}"
            )
        return sched

    # ------------------------------------------------------------------ generation
    def open(
        self,
        text: str | None = None,
        audio: AudioInput | None = None,
        sample_rate: int | None = None,
        *,
        task: str = "chat",
        messages: Sequence[dict[str, str]] | None = None,
        audios: Sequence[torch.Tensor] | None = None,
        mode: str | Mode | InterleaveSchedule | None = None,
        max_new_tokens: int | None = None,
        verify: bool | None = None,
        arrived: float | None = None,
    ) -> SpeechRequest:
        """Prepare a request (prompt and request settings) without generating: what
        :meth:`stream` does first, and what a server batches.

        Args: as :meth:`stream`, and ``arrived``: ``time.perf_counter()`` when the request
        arrived (default now): its timings (first chunk, ...) count from there, waiting
        included.

        Returns:
            :class:`SpeechRequest`.

        Raises:
            ValueError: On bad arguments, or a prompt + budget that does not fit the engine's
                ``max_len``.
            mctp.codecs.AudioError, FileNotFoundError: On unreadable audio.
        """
        t0 = time.perf_counter() if arrived is None else arrived
        changes: dict[str, Any] = {}
        if mode is not None:
            changes["mode"] = self.schedule(mode)
        if max_new_tokens is not None:
            budget = int(max_new_tokens)
            if budget < 1:
                raise ValueError(f"max_new_tokens must be >= 1, got {budget}")
            changes["max_new_tokens"] = budget
        if verify is not None:
            changes["verify"] = verify
        config = self.generation.replace(**changes) if changes else self.generation
        with self._threads():
            if messages is None:
                wavs = [] if audio is None else [self.load_audio(audio, sample_rate)]
                messages = self.build_messages(text, bool(wavs), task)
            else:
                wavs = list(audios or [])
            prompt = self.prepare(messages, wavs)
        from mctp.engine.generation_config import slots_needed

        heads = 0 if self.stack is None else self.stack.num_heads
        p = prompt.input_ids.shape[1]
        need = slots_needed(config, p, config.max_new_tokens, heads, self.engine)
        if need > self.engine.max_len:
            raise ValueError(
                f"the prompt ({p} tokens) + max_new_tokens ({config.max_new_tokens}) needs "
                f"{need} cache slots; the engine has max_len={self.engine.max_len}"
            )
        return SpeechRequest(prompt, config, t0)

    def stream(
        self,
        text: str | None = None,
        audio: AudioInput | None = None,
        sample_rate: int | None = None,
        *,
        task: str = "chat",
        messages: Sequence[dict[str, str]] | None = None,
        audios: Sequence[torch.Tensor] | None = None,
        mode: str | Mode | InterleaveSchedule | None = None,
        max_new_tokens: int | None = None,
        verify: bool | None = None,
    ) -> Iterator[SpeechChunk]:
        """Answer, yielding text and waveform chunks as they are produced.

        Args:
            text: Text question (``chat``), text to speak (``tts``), or text before the audio.
            audio: Spoken question: a wav path, or a waveform with ``sample_rate``.
            sample_rate: Sample rate of a waveform ``audio``.
            task: ``"chat"`` (answer), ``"tts"`` (speak ``text``), ``"asr"`` (transcribe).
            messages: A whole conversation instead of ``text``/``audio`` (``<|audio|>``
                placeholders in order of ``audios``).
            audios: Waveforms at :attr:`input_sample_rate` for ``messages``.
            mode: Overrides the default schedule.
            max_new_tokens: Overrides the default budget.
            verify: Overrides the default of verified decoding.

        Yields:
            :class:`SpeechChunk`; the last one is ``"end"`` with the :class:`SpeechResult`.

        Raises:
            ValueError: On bad arguments (see :meth:`build_messages`, :meth:`prepare`).
            mctp.codecs.AudioError, FileNotFoundError: On unreadable audio.
            RuntimeError: If the pipeline's Generator is busy (another thread's request).
        """
        from mctp.engine.batching import Cohort

        req = self.open(
            text, audio, sample_rate, task=task, messages=messages, audios=audios, mode=mode,
            max_new_tokens=max_new_tokens, verify=verify,
        )  # fmt: skip
        events = Cohort(self.generators(1)[0], [req.row], audio_chunk=self.audio_chunk).events(0)
        return self._threaded(self.answer(req, events))

    @contextlib.contextmanager
    def _threads(self) -> Iterator[None]:
        """Torch's thread count set to :attr:`num_threads` inside, restored after."""
        if self.num_threads is None:
            yield
            return
        before = torch.get_num_threads()
        torch.set_num_threads(self.num_threads)
        try:
            yield
        finally:
            torch.set_num_threads(before)

    def _threaded(self, chunks: Iterator[SpeechChunk]) -> Iterator[SpeechChunk]:
        """Run each step of ``chunks`` under :meth:`_threads` (not while the caller holds a chunk)."""
        while True:
            with self._threads():
                chunk = next(chunks, None)
            if chunk is None:
                return
            yield chunk

    def answer(self, request: SpeechRequest, events: Iterator[Any]) -> Iterator[SpeechChunk]:
        """Speak a request's generation: its row's :class:`mctp.StreamEvent` (text ids, audio
        segments, one ``"end"`` carrying the row's result) into :class:`SpeechChunk`.

        A model that misbehaves does not fail the answer: ids that are not audio inside an
        audio segment are skipped (only audio codes reach the decoder, as the original
        VITA-Audio keeps only the audio codes of its output), and audio ids among the text
        are not spoken as text; both are logged with a warning and counted in
        :attr:`SpeechResult.stray_tokens`.

        Yields:
            :class:`SpeechChunk`; the last one is ``"end"`` with the :class:`SpeechResult`.
        """
        t0 = request.t0
        began = time.perf_counter() if request.began is None else request.began
        started = began - t0  # the waiting part of its timings
        session = self.decoder.stream()
        session.reset()
        text_ids: list[int] = []
        said = ""
        wav: list[torch.Tensor] = []
        first_chunk = first_text = None
        n_audio = 0
        stray = 0  # ids the model put in the wrong kind of segment (skipped)
        last_token: int | None = None
        gen = None
        ended = False
        try:
            for ev in events:
                if ev.row_result is not None:
                    gen = ev.row_result
                elif ev.result is not None:
                    gen = ev.result
                if ended or ev.row not in (0, -1):
                    continue  # later "end" events of the same row only carry the result
                now = time.perf_counter() - t0
                if ev.kind == "text":
                    lo, hi = self.vocab.audio_start, self.vocab.audio_stop
                    ids = [i for i in ev.ids if not lo <= i < hi]  # stray audio ids are not text
                    if len(ids) < len(ev.ids):
                        stray += len(ev.ids) - len(ids)
                        _log.warning(
                            "the model put %d audio ids outside an audio segment; skipped",
                            len(ev.ids) - len(ids),
                        )
                    last_token = ev.ids[-1] if ev.ids else last_token
                    text_ids += ids
                    full = self.tokenizer.decode(text_ids, skip_special_tokens=True)
                    delta = full[len(said) :] if full.startswith(said) else full
                    said = full
                    if delta:
                        first_text = now if first_text is None else first_text
                        yield SpeechChunk("text", now, text=delta)
                elif ev.kind == "audio":
                    lo, hi = self.vocab.audio_start, self.vocab.audio_stop
                    codes = [i for i in ev.ids if lo <= i < hi]
                    if len(codes) < len(ev.ids):  # the model misbehaved: skip what is not audio
                        odd = [i for i in ev.ids if not lo <= i < hi]
                        stray += len(odd)
                        _log.warning(
                            "the model put %d non-audio ids inside an audio segment (%s); skipped",
                            len(odd),
                            odd[:5],
                        )
                    n_audio += len(codes)
                    chunk = session.push(self.vocab.to_codes(codes))
                    if chunk.numel():
                        now = time.perf_counter() - t0
                        first_chunk = now if first_chunk is None else first_chunk
                        wav.append(chunk)
                        yield SpeechChunk("audio", now, audio=chunk)
                elif ev.kind == "end":
                    ended = True
                    tail = session.push(torch.zeros(0, dtype=torch.long), final=True)
                    if tail.numel():
                        now = time.perf_counter() - t0
                        first_chunk = now if first_chunk is None else first_chunk
                        wav.append(tail)
                        yield SpeechChunk("audio", now, audio=tail)
        finally:  # a failure here frees the row (and its Generator lane) at once
            close = getattr(events, "close", None)
            if close is not None:
                close()
        yield self._finish(
            request, gen, said, wav, first_chunk, first_text, n_audio, last_token, stray, started
        )

    def _finish(
        self,
        request: SpeechRequest,
        gen: Any,
        text: str,
        wav: list[torch.Tensor],
        first_chunk: float | None,
        first_text: float | None,
        num_audio: int,
        last_token: int | None = None,
        stray: int = 0,
        started: float | None = None,
    ) -> SpeechChunk:
        """The ``"end"`` chunk of an answer: its :class:`SpeechResult` from what was said
        (``wav``: the waveform pieces) and the row's :class:`mctp.GenerationResult` ``gen``."""
        total = time.perf_counter() - request.t0
        stops = set(request.config.eos_token_id)
        tokens = gen.tokens[0] if gen is not None else torch.zeros(0, dtype=torch.long)
        finish = "stop" if tokens.numel() and int(tokens[-1]) in stops else "length"
        if last_token is not None and last_token in stops:
            finish = "stop"
        result = SpeechResult(
            text=text,
            audio=torch.cat(wav) if wav else torch.zeros(0),
            sample_rate=self.sample_rate,
            mode=list(request.config.schedule.ratio),
            first_chunk_s=first_chunk,
            first_text_s=first_text,
            total_s=total,
            num_tokens=int(tokens.numel()),
            num_audio_tokens=num_audio,
            tokens_per_s=gen.tokens_per_s if gen is not None else 0.0,
            finish_reason=finish,
            generation=gen,
            prompt_ids=request.prompt.input_ids[0].cpu(),
            stray_tokens=stray,
            started_s=started,
        )
        return SpeechChunk("end", total, result=result)

    def __call__(
        self,
        text: str | None = None,
        audio: AudioInput | None = None,
        sample_rate: int | None = None,
        **kwargs: Any,
    ) -> SpeechResult:
        """Answer and return the whole result (see :meth:`stream` for the arguments).

        Raises:
            ValueError, mctp.codecs.AudioError, FileNotFoundError: As :meth:`stream`.
        """
        result = None
        for chunk in self.stream(text, audio, sample_rate, **kwargs):
            if chunk.kind == "end":
                result = chunk.result
        assert result is not None
        return result
