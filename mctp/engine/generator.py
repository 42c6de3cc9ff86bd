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
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from mctp.interleave import BACKBONE, Source

from ..backbone import Backbone
from ..stack import MCTPStack
from .buffer import TokenBuffer
from .decoding import MCTPDecoder
from .fast_path import ExactPath, FastPath
from .generation_config import EngineConfig, GenerationConfig, split_options
from .masks import warn_unmasked_padding
from .result import GenerationResult
from .sampling import SpeechIds, TokenPicker
from .segmenter import StreamEvent, StreamSegmenter
from .state import DecodeState

__all__ = ["GenerationResult", "Generator"]


def slots_needed(
    config: GenerationConfig,
    prompt_len: int,
    max_new_tokens: int,
    num_heads: int,
    engine: EngineConfig | None = None,
) -> int:
    """Cache slots a call needs: prompt + new tokens + what a chain or draft may overshoot
    (``num_heads``: the stack's, the default draft of verified Vanilla; fixed chains of the
    compiled path run whole MCTP runs)."""
    over = 0
    if config.verify:
        sched = config.schedule
        over = sched.max_heads if sched.uses_mctp else config.draft_len or num_heads
    if engine is not None and engine.compile:
        over = max(over, config.schedule.max_heads)
    return prompt_len + max_new_tokens + over + 1


def _check_input_ids(input_ids: torch.Tensor) -> None:
    if not isinstance(input_ids, torch.Tensor):
        raise TypeError(f"input_ids must be a tensor, got {type(input_ids).__name__}")
    if input_ids.dtype == torch.bool or input_ids.is_floating_point() or input_ids.is_complex():
        raise TypeError(f"input_ids must hold integer token ids, got dtype {input_ids.dtype}")
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids must be [B, P], got shape {tuple(input_ids.shape)}")


class Generator:
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
        vocab: Speech ids (:class:`mctp.backbones.SpeechVocab`): enables separate audio
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
        """Rows the engine runs together (calls with fewer rows are padded to it)."""
        return self.buffer.batch_size

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

    @torch.inference_mode()  # applied around each step of the iterator, not between them
    def _events(
        self,
        input_ids: torch.Tensor,
        cfg: GenerationConfig,
        attention_mask: torch.Tensor | None,
        prompt_embeds: torch.Tensor | None,
        heads_read: bool,
        generator: torch.Generator | None,
        audio_chunk: int | None,
        streamer: Any,
    ) -> Iterator[StreamEvent]:
        with self._acquire():
            t0 = time.perf_counter()
            run = _Run(self, cfg, input_ids, attention_mask, prompt_embeds, heads_read, generator)
            speech = self.vocab
            seg = StreamSegmenter(
                speech if speech is not None else _NoAudio(),
                self.max_batch,
                cfg.eos_token_id,
                audio_chunk=audio_chunk,
            )
            for r in run.finished_rows:  # padding rows: nothing to say until a request joins
                seg.retire(r)
            if streamer is not None:
                streamer.put(input_ids.detach().cpu())
            buf, p = self.buffer, run.prompt_len
            read = 0
            cycle_times: list[tuple[int, float]] = []

            def row_events(r: int, evs: list[StreamEvent]) -> Iterator[StreamEvent]:
                for ev in evs:
                    if streamer is not None and ev.kind == "text":
                        streamer.put(torch.tensor(ev.ids))
                    if ev.kind == "end":
                        ev.row_result = run.result(t0, cycle_times, rows=[r])
                        run.finished_rows.add(r)
                    yield ev

            self._join_open = True
            try:
                for produced in run.cycles():
                    now = time.perf_counter() - t0
                    cycle_times.append((produced, now))
                    lo, hi = p + read, run.end
                    new = buf.ids[:, lo:hi].tolist()  # one read per cycle
                    read = hi - p
                    for r in range(self.max_batch):
                        if seg.ended(r):
                            continue
                        first, stop = run.row_start[r], run.row_start[r] + run.row_budget[r]
                        ids = new[r][max(first, lo) - lo : max(min(stop, hi) - lo, 0)]
                        evs = seg.feed(r, ids, now, run.forwards)
                        if hi >= stop and not seg.ended(r):  # the row's own budget is spent
                            evs += seg.end(r, now, run.forwards)
                        yield from row_events(r, evs)
                    if run.joinable:
                        for ticket in list(self._joins):
                            r = run.try_join(ticket.request)
                            if r is None:
                                continue
                            self._joins.remove(ticket)
                            ticket.row = r
                            held = seg.take_held()  # not the last row to end after all
                            if held is not None:
                                yield from row_events(held.row, [held])
                            seg.reopen(r)
                            tok0 = [int(buf.ids[r, run.row_start[r]])]
                            yield from row_events(r, seg.feed(r, tok0, now, run.forwards))
            finally:
                self._join_open = False
                for ticket in self._joins:  # the run ended before they could join
                    ticket.row = -1
                self._joins.clear()
            _sync(self.device)
            result = run.result(t0, cycle_times)
            if streamer is not None:
                streamer.end()
            for ev in seg.finish(time.perf_counter() - t0, run.forwards, result):
                if ev.kind == "end" and ev.row_result is None:
                    ev.row_result = run.result(t0, cycle_times, rows=[ev.row])
                yield ev

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


@dataclass(eq=False)  # compared by identity: two tickets may carry equal requests
class JoinTicket:
    """A request waiting to join a running stream (:meth:`Generator.offer_join`).

    Attributes:
        request: A :class:`~mctp.engine.batching.RowRequest`.
        row: None while waiting, the row once joined, -1 when the stream ended first.
    """

    request: Any
    row: int | None = None


class _NoAudio:
    """Speech ids that never occur (segmenting text-only streams for a streamer)."""

    boa = eoa = audio_start = audio_stop = -1


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


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _Run:
    """One call's progress over the Generator's state (the schedule loop)."""

    def __init__(
        self,
        gen: Generator,
        cfg: GenerationConfig,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        prompt_embeds: torch.Tensor | None,
        heads_read_prompt_embeds: bool,
        generator: torch.Generator | None,
    ) -> None:
        _check_input_ids(input_ids)
        b, p = input_ids.shape
        cap = gen.max_batch
        if not 1 <= b <= cap:
            raise ValueError(
                f"the prompt has {b} rows; this engine runs at most max_batch={cap} rows "
                "(EngineConfig.max_batch)"
            )
        if attention_mask is not None:
            if attention_mask.shape != input_ids.shape:
                raise ValueError(
                    f"attention_mask {tuple(attention_mask.shape)} must match input_ids {tuple(input_ids.shape)}"
                )
            if not bool(attention_mask[:, -1].all()):
                raise ValueError(
                    "pad prompts on the left: attention_mask[:, -1] must be 1 for every row"
                )
        else:  # padding without a mask is read as real tokens: say so, as transformers does
            warn_unmasked_padding(input_ids, cfg.pad_id, "generate (GenerationConfig.pad_id)")
        vocab_size = gen.backbone.vocab_size
        lo, hi = int(input_ids.min()), int(input_ids.max())  # one read per call, not per token
        if lo < 0 or hi >= vocab_size:
            bad = lo if lo < 0 else hi
            raise ValueError(
                f"input_ids hold id {bad}, outside the model's vocabulary [0, {vocab_size})"
            )
        heads = 0 if gen.stack is None else gen.stack.num_heads
        need = slots_needed(cfg, p, cfg.max_new_tokens, heads, gen.engine)
        if need > gen.max_len:
            over = need - p - cfg.max_new_tokens
            raise ValueError(
                f"prompt ({p}) + max_new_tokens ({cfg.max_new_tokens}) + {over} needs {need} "
                f"cache slots, max_len is {gen.max_len}"
            )
        device = gen.device
        input_ids = input_ids.to(device)
        self.rows = gen.rows = b
        if b < cap:  # pad with copies of row 0 (already stopped): compiled shapes never change
            extra = cap - b
            input_ids = torch.cat([input_ids, input_ids[:1].expand(extra, -1)])
            if attention_mask is not None:
                attention_mask = torch.cat([attention_mask, attention_mask[:1].expand(extra, -1)])
            if prompt_embeds is not None:
                prompt_embeds = torch.cat([prompt_embeds, prompt_embeds[:1].expand(extra, -1, -1)])
        self.gen, self.cfg, self.engine, self.path = gen, cfg, gen.engine, gen.path
        self.schedule = cfg.schedule
        self.max_new, self.prompt_len = cfg.max_new_tokens, p
        self.state = gen.state
        self.buffer, self.cache = gen.buffer, gen.cache
        self.state.start(
            input_ids,
            attention_mask,
            prompt_embeds,
            heads_read_prompt_embeds=heads_read_prompt_embeds,
        )
        self.decoder: MCTPDecoder | None = None
        self.head_index = None
        if gen.stack is not None and (self.schedule.uses_mctp or cfg.verify):
            assert gen.decoder is not None
            self.decoder = gen.decoder
            vocab = self.decoder.stack.output_vocab
            self.head_index = None if vocab is None else vocab.index.to(device)
        self.picker = TokenPicker(
            gen.backbone.vocab_size,
            gen.vocab,
            cfg.text_sampling,
            cfg.audio_sampling_or_text,
            generator,
            device,
            cap,
        )
        self.picker.observe(input_ids)
        self.stop_ids = torch.tensor(cfg.eos_token_id, dtype=torch.long, device=device)
        self.done = torch.arange(cap, device=device) >= b  # padding rows count as stopped
        # per row: first generated slot, first prompt slot, budget; rows free for a join
        self.row_start = [p] * cap
        self.row_prompt = [0] * cap
        self.row_budget = [cfg.max_new_tokens] * cap
        self.finished_rows: set[int] = set(range(b, cap))
        self.joinable = False
        self.joined = 0
        self.sources: list[int] = []  # per generated slot, shared by all rows
        self.forwards = self.mctp_steps = self.drafted = self.accepted = 0
        self.prefill_s = 0.0

    def head_sampler(self, logits: torch.Tensor) -> torch.Tensor:
        return self.picker(logits, self.head_index)

    # -- helpers
    @property
    def produced(self) -> int:
        """Generated tokens so far (capped at ``max_new_tokens``; fixed chains may overshoot)."""
        return min(self.buffer.length - self.prompt_len, self.max_new)

    @property
    def end(self) -> int:
        """One past the last slot that belongs to the result."""
        return self.prompt_len + self.produced

    def _record(self, tokens: torch.Tensor, source: Sequence[int]) -> None:
        """Record new tokens ``[B, T]`` already in the buffer."""
        self.picker.observe(tokens)
        if self.stop_ids.numel():
            self.done |= torch.isin(tokens, self.stop_ids).any(dim=1)
        self.sources.extend(source)

    def _backbone_token(self) -> None:
        start = self.state.processed
        hidden, logits = self.path.forward(self.buffer, self.cache, start)
        self.forwards += 1
        self.state.backbone_done(start, hidden)
        tok = self.picker(logits[:, -1])
        self.buffer.append(tok[:, None])
        self._record(tok[:, None], [BACKBONE])

    def _chain(self, count: int) -> torch.Tensor:
        assert self.decoder is not None
        tokens = self.path.chain(self.decoder, count, self.head_sampler)
        self.mctp_steps += count
        return tokens

    def _draft_len(self) -> int:
        """Tokens to draft after the backbone token at slot ``state.processed``."""
        assert self.decoder is not None
        if self.schedule.uses_mctp:
            i = self.state.processed - self.prompt_len  # decoded index of the last backbone token
            k = 0
            while k < self.decoder.stack.num_heads and self.schedule.head(i + 1 + k) >= 0:
                k += 1
        else:
            k = self.cfg.draft_len or self.decoder.stack.num_heads
        if self.path.fixed_chains and not self.schedule.uses_mctp:
            return k  # static shapes: always the full draft
        return min(k, self.max_new - self.produced - 1)

    def _verified_cycle(self) -> None:
        """Draft with the heads, verify with one backbone forward, keep the agreeing prefix."""
        assert self.decoder is not None
        buf = self.buffer
        s0 = self.state.processed  # slot of the token the last backbone forward produced
        k = self._draft_len()
        if k > 0:
            self._chain(k)
        hidden, logits = self.path.forward(buf, self.cache, s0, all_logits=True)
        self.forwards += 1
        choice = logits.argmax(dim=-1)  # [B, k+1]: backbone's token for slots s0+1 .. s0+k+1
        drafts = buf.ids[:, s0 + 1 : s0 + 1 + k]
        agree = (drafts == choice[:, :k]).long().cumprod(dim=1).sum(dim=1)
        a = int(agree.min()) if k > 0 else 0  # the one host read per cycle
        self.drafted += k * self.rows
        self.accepted += a * self.rows
        keep = s0 + 1 + a
        self.state.rollback(keep)  # the rejected drafts' slots, in every cache at once
        self.state.backbone_done(s0, hidden[:, : a + 1])
        buf.append(choice[:, a : a + 1])
        self._record(buf.ids[:, s0 + 1 : keep + 1], [*range(a), BACKBONE])

    # -- the loop
    def cycles(self) -> Iterator[int]:
        """Run the generation; yields the number of generated tokens after every cycle.

        ``max_new`` may grow while it runs (a row joined, see :meth:`try_join`); a row may join
        at a yield where :attr:`joinable` is True.
        """
        self._backbone_token()  # the prefill produces the first token
        self.joinable = self._aligned(0)
        yield self.produced
        self.joinable = False
        every = self.engine.stop_check_every
        if self.cfg.verify:
            while self.produced < self.max_new:
                self._verified_cycle()
                self.joinable = self._aligned(self.state.processed - self.prompt_len)
                yield self.produced
                self.joinable = False
                if self.forwards % every == 0 and self._all_done():
                    return
            return
        for step in self.schedule.steps(self.buffer.max_len):
            if step.start == 0:
                continue  # the prefill already produced token 0
            if step.start >= self.max_new:
                return
            if step.source is Source.BACKBONE:
                self._backbone_token()
                if self.forwards % every == 0 and self._all_done():
                    yield self.produced
                    return
                # a row can join right after a backbone token only (the token at its slot)
                self.joinable = self._aligned(step.start)
            else:
                # fixed chains always run the full MCTP run; tokens past max_new are cut later
                count = (
                    self.schedule.run_length(step.start - 1)
                    if self.path.fixed_chains
                    else min(step.count, self.max_new - step.start)
                )
                self._record(self._chain(count), list(range(count)))
            yield self.produced
            self.joinable = False

    def _aligned(self, i: int) -> bool:
        """Whether a row whose first token (from its own prefill) sits where token ``i`` of
        this run sits would follow its own schedule from there: the sources of tokens
        ``i + 1, i + 2, ...`` equal those of ``1, 2, ...`` (always for Vanilla; after every
        backbone run for Boost and Turbo; Balance only at the start)."""
        sched = self.schedule
        if self.cfg.verify and not sched.uses_mctp:
            return True
        horizon = 2 * sum(sched.ratio) + 2
        return all(sched.head(i + 1 + j) == sched.head(1 + j) for j in range(horizon))

    def try_join(self, request: Any) -> int | None:
        """Put ``request`` (a :class:`~mctp.engine.batching.RowRequest` with this run's
        settings) into a free row now, at a join point: its prompt is written to the row's
        slots just before the cursor, prefilled into that row of the backbone's cache (a
        1-row view), its first token chosen and placed where this run's last backbone token
        sits, and the heads re-read the row's slots at their next chain. From then on the row
        follows its own schedule in step with the others.

        Returns:
            The row, or None when it cannot join now (not a join point, other settings,
            prompt embeddings, no free row, a prompt longer than the cursor, no room, or a
            cache without row views).
        """
        ids = request.input_ids
        if (
            not self.joinable
            or request.config != self.cfg
            or request.prompt_embeds is not None
            or not hasattr(self.cache, "rows")
        ):
            return None
        free = [r for r in range(self.gen.max_batch) if r in self.finished_rows]
        buf = self.buffer
        n, pj = buf.length, ids.shape[1]
        start = n - 1 - pj
        heads = 0 if self.gen.stack is None else self.gen.stack.num_heads
        need = slots_needed(self.cfg, 0, self.cfg.max_new_tokens, heads, self.engine)
        if not free or start < 0 or n - 1 + need > buf.max_len:
            return None
        r = free[0]
        dev = buf.device
        ids = ids.to(dev)
        with torch.inference_mode():
            buf.ids[r, start : n - 1] = ids[0]
            buf.positions[r, start : n - 1] = torch.arange(pj, device=dev)
            buf.valid[r, :start] = False
            buf.valid[r, start : n - 1] = True
            idx = buf.index[start : n - 1]
            backbone = self.gen.backbone
            hidden = backbone.decode(
                backbone.embed(ids),
                buf.positions[r : r + 1, start : n - 1],
                idx,
                buf.valid[r : r + 1],
                self.cache.rows(r, r + 1),
            )
            picker = TokenPicker(
                backbone.vocab_size,
                self.gen.vocab,
                self.cfg.text_sampling,
                self.cfg.audio_sampling_or_text,
                self.picker.generator,
                dev,
                1,
            )
            picker.observe(ids)
            tok = picker(backbone.logits(hidden[:, -1:])[:, -1])
            buf.ids[r, n - 1] = tok[0]
            buf.positions[r, n - 1] = pj
            buf.valid[r, n - 1] = True
            if self.picker.seen is not None:
                self.picker.seen[r] = False
                self.picker.observe_row(r, buf.ids[r : r + 1, start:n])
            if self.state.heads is not None:
                self.state.heads.replace_row(r, start, hidden[0])
            self.done[r] = bool(self.stop_ids.numel()) and bool(torch.isin(tok, self.stop_ids))
        self.finished_rows.discard(r)
        self.row_start[r] = n - 1
        self.row_prompt[r] = start
        self.row_budget[r] = self.cfg.max_new_tokens
        self.max_new = max(self.max_new, n - 1 - self.prompt_len + self.cfg.max_new_tokens)
        self.joined += 1
        return r

    def _all_done(self) -> bool:
        return bool(self.stop_ids.numel()) and bool(self.done.all())

    @torch.inference_mode(False)  # ordinary tensors: callers may train on the ids
    def result(
        self,
        t0: float,
        cycle_times: list[tuple[int, float]],
        rows: Sequence[int] | None = None,
    ) -> GenerationResult:
        """The result of the call so far, for all rows or for ``rows`` only (a row that
        stopped early gets its own result while the others go on)."""
        buf, speech = self.buffer, self.gen.vocab
        picked = list(range(self.rows)) if rows is None else list(rows)
        n, p = self.end, self.prompt_len
        out_rows, srcs, prompts = [], [], []
        src = torch.tensor(self.sources[: n - p], dtype=torch.long)
        first_audio_len = None
        ids_cpu = buf.ids.index_select(0, torch.tensor(picked, device=buf.device)).cpu()
        stops = self.stop_ids.cpu()
        for i, r in enumerate(picked):
            first = self.row_start[r]
            stop = min(n, first + self.row_budget[r])
            ids = ids_cpu[i, first:stop].clone()
            if stops.numel():
                hit = torch.isin(ids, stops).nonzero()
                if hit.numel():
                    ids = ids[: int(hit[0]) + 1]
            out_rows.append(ids)
            srcs.append(src[first - p : first - p + ids.numel()])
            prompts.append(ids_cpu[i, self.row_prompt[r] : first])
            if speech is not None:
                eoa = (ids == speech.eoa).nonzero()
                if eoa.numel():
                    length = int(eoa[0]) + 1 + (first - p)
                    first_audio_len = (
                        length if first_audio_len is None else min(first_audio_len, length)
                    )
        width = max(pr.numel() + (min(n, self.row_start[r] + self.row_budget[r]) - self.row_start[r])
                    for pr, r in zip(prompts, picked))  # fmt: skip
        seq = torch.full((len(picked), width), self.cfg.pad_id, dtype=torch.long)
        for i, (pr, ids) in enumerate(zip(prompts, out_rows)):
            seq[i, : pr.numel()] = pr
            seq[i, pr.numel() : pr.numel() + ids.numel()] = ids
        first_audio_s = None
        if first_audio_len is not None:
            first_audio_s = next(
                (t for produced, t in cycle_times if produced >= first_audio_len), None
            )
        return GenerationResult(
            sequences=seq,
            tokens=out_rows,
            sources=srcs,
            num_backbone_forwards=self.forwards,
            num_mctp_steps=self.mctp_steps,
            num_drafted=self.drafted,
            num_accepted=self.accepted,
            prefill_s=cycle_times[0][1] if cycle_times else 0.0,
            total_s=time.perf_counter() - t0,
            first_audio_s=first_audio_s,
            cycle_times=cycle_times,
        )
