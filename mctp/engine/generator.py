"""``Generator``: the one object that owns a generation's state and runs the schedule.

Backbone + MCTP heads on a schedule. A schedule (:class:`mctp.interleave.InterleaveSchedule`)
says which decoded token comes from a backbone forward and which from MCTP head ``k``. After
an MCTP chain the next backbone forward re-reads every token the heads produced in one
multi-token forward (as VITA-Audio does); its cache and the heads' caches are static buffers
indexed by slot, all allocated when the Generator is built.

Verified mode (``verify=True``): the heads draft (the schedule's MCTP runs, or ``draft_len``
tokens after every backbone forward with Vanilla), one backbone forward checks the drafts; the
longest prefix that matches the backbone's own greedy choice is kept, the first mismatch is
replaced by the backbone's token and all caches are rolled back, so greedy output is
token-identical to Vanilla while most tokens still come from the cheap heads.

Host synchronisation: token choice, stop detection and bookkeeping stay on the device; the
stop flags are read once every ``stop_check_every`` backbone forwards, verified mode reads one
accepted length per backbone forward, and streaming reads the new tokens once per cycle.

This module holds the :class:`Generator` itself (set-up, ``generate``, ``stream``,
``offer_join``); one call's schedule loop is :mod:`mctp.engine.run`, a streamed call's events
:mod:`mctp.engine.stream_loop`, and requests joining a running stream :mod:`mctp.engine.joins`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import torch

from ..backbone import Backbone
from ..stack import MCTPStack
from .buffer import TokenBuffer
from .decoding import MCTPDecoder
from .fast_path import ExactPath, FastPath
from .generation_config import EngineConfig, GenerationConfig, split_options
from .joins import JoinTicket
from .result import GenerationResult
from .run import _Run, _sync
from .sampling import SpeechIds
from .segmenter import StreamEvent
from .state import DecodeState
from .stream_loop import _StreamLoop

__all__ = ["GenerationResult", "Generator"]


class Generator(_StreamLoop):
    """Generation state and loop: caches, buffers and (on the fast path) compiled callables,
    built once and reused by every call of the same batch size.

    Every cache is allocated here (the backbone's :meth:`~mctp.backbone.Backbone.setup_caches`
    and the heads' caches), and the computation path is chosen here from ``engine.compile``:
    :class:`~mctp.engine.fast_path.FastPath` (fixed shapes, compiled) or
    :class:`~mctp.engine.fast_path.ExactPath`. The first call therefore already runs the compiled
    path (it compiles first). A Generator serves one call at a time: a second call from
    another thread while one runs (or while a stream is open) raises ``RuntimeError``.

    Example::

        gen = Generator(backbone, stack, GenerationConfig(mode="turbo", max_new_tokens=64),
                        max_len=256)
        for prompt in prompts:
            res = gen.generate(prompt)

    Args:
        backbone: The backbone (:class:`mctp.backbone.Backbone`, e.g. ``HFBackbone``).
        stack: The MCTP heads, or None (Vanilla only).
        config: Default request settings of every call (default: ``GenerationConfig()`` =
            Boost, which needs a stack; pass ``GenerationConfig(mode="vanilla")`` without one).
        engine: Engine settings (:class:`~mctp.EngineConfig`: device, cache dtype,
            ``max_batch``, ``max_len``, compile, window, audio-only heads, ...).
        vocab: Speech ids (:class:`mctp.SpeechVocab`): enables separate audio
            sampling, audio-only heads and audio events.
        **engine_options: Fields of :class:`~mctp.EngineConfig` applied on ``engine`` (e.g.
            ``max_len=256, compile=True``).

    Raises:
        TypeError: On an option that is not an engine setting (a request setting passed
            here names itself in the message).
        ValueError: If the config's schedule needs a stack (or more heads than it has),
            ``verify`` or ``audio_heads`` lack what they need, or sizes are not positive.
    """

    def __init__(
        self,
        backbone: Backbone,
        stack: MCTPStack | None = None,
        config: GenerationConfig | None = None,
        *,
        engine: EngineConfig | None = None,
        vocab: SpeechIds | None = None,
        **engine_options: Any,
    ) -> None:
        config = GenerationConfig() if config is None else config
        if not isinstance(config, GenerationConfig):
            raise TypeError(f"config must be a GenerationConfig, got {type(config).__name__}")
        if engine is not None and not isinstance(engine, EngineConfig):
            raise TypeError(f"engine must be an EngineConfig, got {type(engine).__name__}")
        bad = sorted(set(engine_options) - {f for f in EngineConfig.__dataclass_fields__})
        if bad:
            raise TypeError(
                f"unknown engine setting(s) {bad}; request settings go in config= "
                "(a GenerationConfig) or in the call"
            )
        engine, _ = split_options(engine_options, engine=engine, config=config)
        device = engine.device
        if device is None:
            weight = getattr(getattr(backbone, "lm_head", None), "weight", None)
            device = weight.device if isinstance(weight, torch.Tensor) else torch.device("cpu")
        self.device = torch.device(device)
        self.engine = engine
        self.backbone, self.stack, self.vocab = backbone, stack, vocab
        if engine.compile and getattr(backbone, "path", "fast") == "generic":
            raise ValueError(
                f"{getattr(backbone, 'family', type(backbone).__name__)} runs on the backbone's "
                "generic path (the model's own forward, one host sync per call): it has no "
                "fixed-shape decode to compile; use compile=False"
            )
        self._check(config)
        self.config = config
        b, s = engine.max_batch, engine.max_len
        if stack is not None and engine.audio_heads:
            v = vocab
            assert v is not None
            stack = stack.with_output_vocab([v.boa, v.eoa, *range(v.audio_start, v.audio_stop)])
        self.state = DecodeState(
            backbone, stack, max_batch=b, max_len=s, device=self.device, dtype=engine.torch_dtype
        )
        self.path: FastPath | ExactPath = (
            FastPath(
                backbone,
                device=self.device,
                window=engine.window,
                prefill_windows=engine.prefill_windows,
                compile_options=engine.compile_options,
                pack_weights=engine.pack_weights,
                compile_cache_dir=engine.compile_cache,
                regions=engine.compile_regions,
            )
            if engine.compile
            else ExactPath(backbone)
        )
        self._lock = threading.Lock()
        self._joins: list[JoinTicket] = []
        self._join_open = False
        self.rows = b  # rows of the running (or last) call: <= max_batch

    # ------------------------------------------------------------------ set-up
    @property
    def buffer(self) -> TokenBuffer:
        """The decode state's token buffer."""
        return self.state.buffer

    @property
    def cache(self) -> Any:
        """The decode state's backbone cache."""
        return self.state.cache

    @property
    def decoder(self) -> MCTPDecoder | None:
        """The decode state's MCTP heads (caches and progress), or None."""
        return self.state.heads

    @property
    def max_batch(self) -> int:
        """Rows the engine runs together at most (on the compiled path calls with fewer rows
        are padded to it; the eager path runs the rows a call has)."""
        return self.buffer.capacity

    @property
    def max_len(self) -> int:
        """Slots of every buffer."""
        return self.buffer.max_len

    @property
    def streaming(self) -> bool:
        """Whether a call is running (a stream started and not ended)."""
        return self._lock.locked()

    @property
    def accepts_joins(self) -> bool:
        """Whether a running stream still takes requests (:meth:`offer_join`): from its
        first event until its last generation step."""
        return self._join_open

    def _check(self, config: GenerationConfig) -> None:
        schedule, stack = config.schedule, self.stack
        if schedule.uses_mctp or config.verify:
            if stack is None:
                what = "verify=True" if config.verify else f"schedule {schedule.ratio}"
                raise ValueError(f"{what} uses MCTP heads but no stack was given")
            if schedule.max_heads > stack.num_heads:
                raise ValueError(
                    f"schedule {schedule.ratio} needs {schedule.max_heads} MCTP slots in a row "
                    f"but the stack has {stack.num_heads} heads"
                )
            if config.draft_len is not None and config.draft_len > stack.num_heads:
                raise ValueError(
                    f"draft_len must be in [1, {stack.num_heads}], got {config.draft_len}"
                )
        if self.engine.audio_heads and self.vocab is None:
            raise ValueError("audio_heads=True needs speech ids (pass vocab=SpeechVocab)")

    def _call_config(self, config: GenerationConfig | None, **changes: Any) -> GenerationConfig:
        cfg = self.config if config is None else config
        if not isinstance(cfg, GenerationConfig):
            raise TypeError(f"config must be a GenerationConfig, got {type(cfg).__name__}")
        changes = {k: v for k, v in changes.items() if v is not None}
        if changes:
            cfg = cfg.replace(**changes)
        self._check(cfg)
        return cfg

    def reset(self) -> None:
        """Forget the last sequence (buffers, caches and compiled callables stay).

        Raises:
            RuntimeError: If a call is running.
        """
        with self._acquire():
            self.state.reset()

    # ------------------------------------------------------------------ calls
    def _acquire(self) -> _Held:
        return _Held(self._lock)

    @torch.inference_mode()
    def generate(
        self,
        input_ids: torch.Tensor,
        *,
        attention_mask: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        heads_read_prompt_embeds: bool = False,
        max_new_tokens: int | None = None,
        config: GenerationConfig | None = None,
        generator: torch.Generator | None = None,
        streamer: Any = None,
        sync_timings: bool = False,
    ) -> GenerationResult:
        """Generate for ``input_ids [B, P]``.

        Args:
            input_ids: ``[B, P]`` integer prompts, left-padded when their lengths differ.
            attention_mask: ``[B, P]`` (1 = real token) for left-padded batches.
            prompt_embeds: ``[B, P, H]`` prompt embeddings for the backbone's prefill instead of
                the token embeddings (VITA-Audio-Plus: audio-encoder frames written over
                ``<|context_of_audio|>`` placeholders with
                :func:`mctp.codecs.scatter_audio_embeddings`). The MCTP heads embed the
                prompt's token ids, placeholders included, as the official Plus does.
            heads_read_prompt_embeds: Opt-in: the MCTP heads read ``prompt_embeds`` too (for
                heads trained with ``inputs_embeds``, not Plus).
            max_new_tokens: Overrides the config's.
            config: Options of this call (default: the Generator's); its fast-path fields
                must equal the Generator's.
            generator: Random source for sampling.
            streamer: A transformers streamer (``TextStreamer``, ``TextIteratorStreamer``, any
                object with ``put(ids)`` / ``end()``): receives the prompt, then the text
                tokens as they appear (audio tokens and BOA/EOA are left out when the
                Generator has ``vocab``); batch size 1 only.
            sync_timings: Synchronise the device after every cycle so that the timings are
                exact (costs a little speed on CUDA; no effect on CPU).

        Returns:
            :class:`GenerationResult`.

        Raises:
            TypeError: On non-integer ``input_ids`` or a wrong config type.
            ValueError: On a wrong batch size, a prompt that does not fit ``max_len``, right
                padding, inconsistent shapes, or a config this Generator cannot serve.
            RuntimeError: If the Generator is already running a call.
        """
        cfg = self._call_config(config, max_new_tokens=max_new_tokens)
        if streamer is not None:
            if input_ids.ndim == 2 and input_ids.shape[0] != 1:
                raise ValueError("streamer= needs batch size 1 (as transformers' streamers)")
            events = self._events(
                input_ids, cfg, attention_mask, prompt_embeds, heads_read_prompt_embeds,
                generator, None, streamer,
            )  # fmt: skip
            result = None
            for ev in events:
                result = ev.result or result
            assert result is not None
            return result
        with self._acquire():
            t0 = time.perf_counter()
            run = _Run(self, cfg, input_ids, attention_mask, prompt_embeds,
                       heads_read_prompt_embeds, generator)  # fmt: skip
            cycle_times: list[tuple[int, float]] = []
            for produced in run.cycles():
                if sync_timings:
                    _sync(self.device)
                cycle_times.append((produced, time.perf_counter() - t0))
            _sync(self.device)
            return run.result(t0, cycle_times)

    def stream(
        self,
        input_ids: torch.Tensor,
        *,
        attention_mask: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        heads_read_prompt_embeds: bool = False,
        max_new_tokens: int | None = None,
        config: GenerationConfig | None = None,
        generator: torch.Generator | None = None,
        audio_chunk: int | None = None,
        streamer: Any = None,
    ) -> Iterator[StreamEvent]:
        """Like :meth:`generate`, but yields :class:`~mctp.engine.segmenter.StreamEvent` as soon as
        tokens exist: text tokens after every cycle, an audio segment as soon as its EOA is
        produced (in Boost/Turbo: after the first backbone forward plus one MCTP chain), or
        pieces of ``audio_chunk`` tokens; exactly one ``"end"`` per row, the last carrying
        the :class:`GenerationResult`. The Generator stays busy until the iterator is
        exhausted or closed.

        Raises:
            ValueError: As :meth:`generate`, and without speech ids (``vocab``) or with
                ``audio_chunk < 1``.
            RuntimeError: If the Generator is already running a call.
        """
        if self.vocab is None:
            raise ValueError("streaming needs vocab= (speech ids) to find audio segments")
        if audio_chunk is not None and audio_chunk < 1:
            raise ValueError(f"audio_chunk must be >= 1, got {audio_chunk}")
        cfg = self._call_config(config, max_new_tokens=max_new_tokens)
        return self._events(
            input_ids, cfg, attention_mask, prompt_embeds, heads_read_prompt_embeds,
            generator, audio_chunk, streamer,
        )  # fmt: skip

    def offer_join(self, ticket: JoinTicket) -> None:
        """Ask the running stream to take ``ticket.request`` into a free row at its next join
        point (see :meth:`_Run.try_join`); ``ticket.row`` is set to the row once it joined,
        or to -1 when the stream ended first. Its events then come from the same stream.

        Raises:
            RuntimeError: If no stream is running.
        """
        if not self._join_open:
            raise RuntimeError(
                "no stream takes requests on this Generator now (none runs, or it is past its "
                "last generation step)"
            )
        self._joins.append(ticket)


class _Held:
    """Holds the Generator's lock for one call; a second holder raises at once."""

    def __init__(self, lock: threading.Lock) -> None:
        self.lock = lock

    def __enter__(self) -> None:
        if not self.lock.acquire(blocking=False):
            raise RuntimeError(
                "this Generator is already running a call (from another thread, or a stream "
                "that was not exhausted or closed); use one Generator per thread"
            )

    def __exit__(self, *exc: object) -> None:
        self.lock.release()
