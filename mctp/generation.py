"""The generation engine behind ``generate`` and ``generate_stream`` (``mctp.streaming``).

Backbone + MCTP heads on a schedule.

A schedule (:class:`mctp.interleave.InterleaveSchedule`) says which decoded token comes
from a backbone forward and which from MCTP head ``k``. After an MCTP chain the next
backbone forward re-reads every token the heads produced in one multi-token forward (as
VITA-Audio does); its cache and the heads' caches are static buffers indexed by slot.

Verified mode (``verify=True``, new here): the backbone's logits at the re-read positions
are compared with the drafted tokens; the longest prefix that matches the backbone's own
greedy choice is kept, the first mismatch is replaced by the backbone's token and all caches
are rolled back, so greedy output is token-identical to Vanilla while most tokens still come
from the cheap heads.

Host synchronisation: token choice, stop detection and bookkeeping stay on the device;
``generate`` looks at the stop flags once every ``stop_check_every`` backbone forwards, and
verified mode reads one accepted length per backbone forward. ``generate_stream`` reads the
new tokens once per cycle (it has to, to hand them out).
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from mctp.interleave import BACKBONE, InterleaveSchedule, Mode, Source

from .cache import KVCache
from .decoding import MCTPDecoder, TokenBuffer
from .sampling import SamplingConfig, SpeechIds, TokenPicker
from .stack import MCTPStack

__all__ = ["CachedBackbone", "GenerationResult", "GenerationState", "generate"]


class CachedBackbone(Protocol):
    """What the engine needs from a backbone (e.g. :class:`mctp.backbones.HFBackbone`)."""

    vocab_size: int

    def new_cache(self, batch_size: int, max_len: int) -> KVCache: ...

    def forward_cached(
        self, buffer: TokenBuffer, cache: KVCache, start: int, *, all_logits: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]: ...

    def decode(
        self, buffer: TokenBuffer, cache: KVCache, idx: torch.Tensor, *, all_logits: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]: ...


@dataclass
class GenerationResult:
    """What :func:`generate` returns.

    Attributes:
        sequences: ``[B, P + G]`` prompt and generated ids (``pad_id`` after a row stopped).
            All tensors of the result are on the CPU and are ordinary (not inference) tensors.
        tokens: Per row, the generated ids up to and including the first stop id.
        sources: Per row, who produced each of ``tokens``: -1 the backbone, ``k`` MCTP head k.
        num_backbone_forwards: Backbone forwards including the prefill.
        num_mctp_steps: MCTP head runs (each run of one head produces one token).
        num_drafted: Verified mode: drafted tokens the backbone checked.
        num_accepted: Verified mode: drafted tokens that were kept.
        prefill_s: Seconds spent in the prefill.
        total_s: Seconds for the whole call.
        first_audio_s: Seconds from the start until the first complete audio segment
            (its EOA) of any row, or None.
        cycle_times: ``(tokens generated so far, seconds)`` after every cycle.
    """

    sequences: torch.Tensor
    tokens: list[torch.Tensor]
    sources: list[torch.Tensor]
    num_backbone_forwards: int
    num_mctp_steps: int
    num_drafted: int = 0
    num_accepted: int = 0
    prefill_s: float = 0.0
    total_s: float = 0.0
    first_audio_s: float | None = None
    cycle_times: list[tuple[int, float]] = field(default_factory=list)

    @property
    def acceptance_rate(self) -> float | None:
        """Accepted / drafted tokens in verified mode (None otherwise)."""
        return self.num_accepted / self.num_drafted if self.num_drafted else None

    @property
    def tokens_per_s(self) -> float:
        """Generated tokens (all rows) per second of the whole call."""
        return sum(t.numel() for t in self.tokens) / self.total_s if self.total_s > 0 else 0.0


# --------------------------------------------------------------------------- the engine
def _resolve_schedule(
    mode: str | Mode | InterleaveSchedule, stack: MCTPStack | None
) -> InterleaveSchedule:
    if isinstance(mode, InterleaveSchedule):
        schedule = mode
    else:
        try:
            schedule = InterleaveSchedule.from_mode(mode)
        except ValueError as e:
            raise ValueError(
                f"unknown mode {mode!r}: use one of {[m.value for m in Mode]} or an InterleaveSchedule"
            ) from e
    if schedule.uses_mctp:
        if stack is None:
            raise ValueError(f"schedule {schedule.ratio} uses MCTP heads but no stack was given")
        if schedule.max_heads > stack.num_heads:
            raise ValueError(
                f"schedule {schedule.ratio} needs {schedule.max_heads} MCTP slots in a row but the stack has "
                f"{stack.num_heads} heads"
            )
    return schedule


class GenerationState:
    """Pre-allocated buffers (token buffer, backbone cache, head caches) and compiled functions,
    reusable across :func:`generate` calls.

    ``generate`` builds a throw-away state sized for each call; hold one yourself to keep the
    allocations, and on the fast path (``compile=True``) the compiled graphs, between calls
    (CUDA graphs are tied to buffer addresses, so a new state means a new capture). The first
    call on a state allocates the caches with an eager prefill and first chain; from the second
    on, short prompts are prefilled and caught up in compiled windows (``prefill_windows``)::

        state = GenerationState(backbone, batch_size=1, max_len=4096, device="cuda")
        for prompt in prompts:
            res = generate(backbone, stack, prompt, "turbo", 1024, state=state, compile=True)

    Args:
        backbone: The backbone the state serves.
        batch_size: ``B`` of every call.
        max_len: Slots: prompt + new tokens + slack (``max_heads + 1``) must fit.
        device: Where the buffers live.
    """

    def __init__(
        self,
        backbone: CachedBackbone,
        batch_size: int,
        max_len: int,
        device: torch.device | str | None = None,
    ) -> None:
        self.backbone = backbone
        self.buffer = TokenBuffer(batch_size, max_len, device)
        self.cache = backbone.new_cache(batch_size, max_len)
        self._decoders: dict[tuple[int, tuple[int, ...] | None], MCTPDecoder] = {}
        self._views: dict[tuple[int, int, int, int, int], MCTPStack] = {}
        self._decode_fns: dict[str, Any] = {}

    def audio_view(self, stack: MCTPStack, speech: SpeechIds) -> MCTPStack:
        """``stack`` scoring BOA, EOA and the audio tokens only (built once per stack)."""
        key = (id(stack.heads), speech.boa, speech.eoa, speech.audio_start, speech.audio_stop)
        if key not in self._views:
            ids = [speech.boa, speech.eoa, *range(speech.audio_start, speech.audio_stop)]
            self._views[key] = stack.with_output_vocab(ids)
        return self._views[key]

    def decoder(self, stack: MCTPStack) -> MCTPDecoder:
        """The (reset) head state for ``stack`` over this state's buffer."""
        vocab = (
            None
            if stack.output_vocab is None
            else tuple(stack.output_vocab.index[[0, -1]].tolist())
        )
        key = (id(stack.heads), vocab)
        dec = self._decoders.get(key)
        if dec is None or dec.stack.num_heads != stack.num_heads:
            dec = self._decoders[key] = MCTPDecoder(stack, self.buffer)
        dec.reset()
        return dec

    def decode_fn(self, compile_kwargs: dict[str, Any] | None) -> Any:
        """The backbone's fixed-shape decode, compiled once per set of compile options."""
        if compile_kwargs is None:
            return self.backbone.decode
        key = repr(sorted(compile_kwargs.items()))
        if key not in self._decode_fns:
            self._decode_fns[key] = torch.compile(self.backbone.decode, **compile_kwargs)
        return self._decode_fns[key]


class _Engine:
    def __init__(
        self,
        backbone: CachedBackbone,
        stack: MCTPStack | None,
        input_ids: torch.Tensor,
        schedule: InterleaveSchedule,
        max_new_tokens: int,
        *,
        attention_mask: torch.Tensor | None,
        prompt_embeds: torch.Tensor | None,
        heads_read_prompt_embeds: bool,
        speech: SpeechIds | None,
        text_sampling: SamplingConfig,
        audio_sampling: SamplingConfig,
        eos_token_id: int | Sequence[int] | None,
        pad_id: int,
        verify: bool,
        draft_len: int | None,
        audio_heads: bool,
        generator: torch.Generator | None,
        max_len: int | None,
        stop_check_every: int,
        compile: bool | dict[str, Any],
        window: int,
        prefill_windows: int,
        state: GenerationState | None,
    ) -> None:
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be [B, P], got shape {tuple(input_ids.shape)}")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if stop_check_every < 1:
            raise ValueError(f"stop_check_every must be >= 1, got {stop_check_every}")
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        if prefill_windows < 0:
            raise ValueError(f"prefill_windows must be >= 0, got {prefill_windows}")
        b, p = input_ids.shape
        if attention_mask is not None:
            if attention_mask.shape != input_ids.shape:
                raise ValueError(
                    f"attention_mask {tuple(attention_mask.shape)} must match input_ids {tuple(input_ids.shape)}"
                )
            if not bool(attention_mask[:, -1].all()):
                raise ValueError(
                    "pad prompts on the left: attention_mask[:, -1] must be 1 for every row"
                )
        if verify:
            if stack is None:
                raise ValueError("verify=True needs an MCTP stack to draft with")
            if text_sampling.do_sample or audio_sampling.do_sample:
                raise ValueError(
                    "verified mode is lossless for greedy decoding only: set do_sample=False"
                )
            draft_len = stack.num_heads if draft_len is None else draft_len
            if not 1 <= draft_len <= stack.num_heads:
                raise ValueError(f"draft_len must be in [1, {stack.num_heads}], got {draft_len}")
        self.draft_len = draft_len or 0
        slack = max(self.draft_len if verify else 0, schedule.max_heads if compile else 0) + 1
        need = p + max_new_tokens + slack
        if max_len is not None and max_len < need:
            raise ValueError(
                f"prompt ({p}) + max_new_tokens ({max_new_tokens}) + {slack} needs {need} cache slots, max_len is {max_len}"
            )
        self.backbone, self.schedule, self.verify = backbone, schedule, verify
        self.max_new, self.pad_id, self.prompt_len = max_new_tokens, pad_id, p
        self.stop_check_every = stop_check_every
        device = input_ids.device
        if state is None:
            state = GenerationState(backbone, b, max_len or need, device)
        elif (
            state.backbone is not backbone
            or state.buffer.batch_size != b
            or state.buffer.max_len < need
        ):
            raise ValueError(
                f"state serves another backbone or size (batch {state.buffer.batch_size}, "
                f"{state.buffer.max_len} slots); this call needs batch {b} and {need} slots"
            )
        self.buffer = state.buffer
        self.buffer.start(
            input_ids,
            attention_mask,
            prompt_embeds,
            heads_read_prompt_embeds=heads_read_prompt_embeds,
        )
        self.cache = state.cache
        if stack is not None and audio_heads:
            if speech is None:
                raise ValueError("audio_heads=True needs speech ids (pass vocab=SpeechVocab)")
            stack = state.audio_view(stack, speech)
        self.decoder = state.decoder(stack) if stack is not None else None
        self.head_index = None
        if stack is not None and stack.output_vocab is not None:
            self.head_index = stack.output_vocab.index.to(device)
        self.picker = TokenPicker(
            backbone.vocab_size, speech, text_sampling, audio_sampling, generator, device, b
        )
        self.picker.observe(input_ids)
        stops = (
            []
            if eos_token_id is None
            else [eos_token_id]
            if isinstance(eos_token_id, int)
            else list(eos_token_id)
        )
        self.stop_ids = torch.tensor(stops, dtype=torch.long, device=device)
        self.done = torch.zeros(b, dtype=torch.bool, device=device)
        self.sources: list[int] = []  # per generated slot, shared by all rows
        self.forwards = self.mctp_steps = self.drafted = self.accepted = 0
        self.processed = 0  # slots whose backbone states are in the cache
        self.head_sampler = lambda logits: self.picker(logits, self.head_index)
        self.window = window if compile else None
        self.prefill_windows = prefill_windows
        self.compile_kwargs: dict[str, Any] = {}
        if compile:
            self.compile_kwargs = {"dynamic": False}
            if device.type == "cuda":
                self.compile_kwargs["mode"] = "reduce-overhead"
            if isinstance(compile, dict):
                self.compile_kwargs.update(compile)
            # one compiled entry per (shape, chain length, mode): allow more than the default 8
            limit = getattr(torch._dynamo.config, "recompile_limit", 8)
            torch._dynamo.config.recompile_limit = max(limit, 64)
        self.decode = state.decode_fn(self.compile_kwargs if compile else None)

    # -- helpers
    @property
    def produced(self) -> int:
        """Generated tokens so far (capped at ``max_new_tokens``; the fast path may overshoot)."""
        return min(self.buffer.length - self.prompt_len, self.max_new)

    @property
    def end(self) -> int:
        """One past the last slot that belongs to the result."""
        return self.prompt_len + self.produced

    def _append(self, tokens: torch.Tensor, source: Sequence[int]) -> None:
        """Record new tokens ``[B, T]`` already written to the buffer."""
        self.picker.observe(tokens)
        if self.stop_ids.numel():
            self.done |= torch.isin(tokens, self.stop_ids).any(dim=1)
        self.sources.extend(source)

    def _backbone(self, all_logits: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        start = self.processed
        hidden, logits = self._forward(start, all_logits)
        self.forwards += 1
        if self.decoder is not None:
            self.decoder.write_backbone(start, hidden)
        self.processed = self.buffer.length
        return hidden, logits

    def _forward(self, start: int, all_logits: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Backbone over slots ``start..length-1``.

        On the fast path a multi-token re-read is widened to the last ``window`` slots (slots
        already in the cache are written again with the same values), so the compiled decode
        sees only two shapes: 1 and ``window`` tokens. The prefill runs eagerly, or through
        the compiled window (see :meth:`_prefill_in_windows`).
        """
        n = self.buffer.length
        if start == 0:
            if not all_logits and self._prefill_in_windows(n):
                return self._windowed_prefill(n)
            return self.backbone.forward_cached(self.buffer, self.cache, 0, all_logits=all_logits)
        t = n - start
        if self.window is not None and 1 < t <= self.window <= n:
            idx = self.buffer.index[n - self.window : n]
            hidden, logits = self.decode(self.buffer, self.cache, idx, all_logits=all_logits)
            return hidden[:, -t:], logits[:, -t:] if all_logits else logits
        return self.decode(
            self.buffer, self.cache, self.buffer.index[start:n], all_logits=all_logits
        )

    def _prefill_in_windows(self, n: int) -> bool:
        """Whether the prompt (``n`` slots) is prefilled as ``window``-slot decodes: on the fast
        path, with an allocated cache (a reused state), and at most ``prefill_windows`` of them
        (a few graph replays beat one eager forward on short prompts, not on long ones)."""
        w = self.window
        return w is not None and self.cache.allocated and w <= n <= self.prefill_windows * w

    def _windowed_prefill(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Prefill in windows ``[0, w), [w, 2w), ...``, the last moved back to end at ``n``."""
        w = self.window
        assert w is not None
        parts, done = [], 0
        while done < n:
            end = min(done + w, n)
            hidden, logits = self.decode(self.buffer, self.cache, self.buffer.index[end - w : end])
            parts.append(hidden[:, w - (end - done) :].clone())  # graph outputs get reused
            done = end
        return torch.cat(parts, dim=1), logits

    def _step_heads(self, count: int) -> torch.Tensor:
        """Run heads ``0..count-1`` (a fixed-window compiled chain when compiling)."""
        assert self.decoder is not None
        if self.window is not None and (count, self.window) not in self.decoder._compiled:
            self.decoder.compile_chain(count, self.window, **self.compile_kwargs)
        out = self.decoder.step(
            count, sampler=self.head_sampler, window=self.window, catch_up=self.prefill_windows
        )
        self.mctp_steps += count
        return out.tokens

    def _backbone_token(self) -> None:
        _, logits = self._backbone()
        tok = self.picker(logits[:, -1])
        self.buffer.append(tok[:, None])
        self._append(tok[:, None], [BACKBONE])

    def _chain(self, start: int, count: int) -> None:
        if self.window is not None:
            # fast path: always the full run (static shapes); tokens past max_new are cut later
            count = self.schedule.run_length(start - 1)
        self._append(self._step_heads(count), list(range(count)))

    def _verified_cycle(self) -> None:
        """Draft with the heads, verify with one backbone forward, keep the agreeing prefix."""
        assert self.decoder is not None
        buf = self.buffer
        s0 = self.processed  # slot of the token the last backbone forward produced
        k = (
            self.draft_len
            if self.window is not None
            else min(self.draft_len, self.max_new - self.produced - 1)
        )
        if k > 0:
            self._step_heads(k)
        hidden, logits = self._forward(s0, True)
        self.forwards += 1
        choice = logits.argmax(dim=-1)  # [B, k+1]: backbone's token for slots s0+1 .. s0+k+1
        drafts = buf.ids[:, s0 + 1 : s0 + 1 + k]
        agree = (drafts == choice[:, :k]).long().cumprod(dim=1).sum(dim=1)
        a = int(agree.min()) if k > 0 else 0  # the one host read per cycle
        self.drafted += k * buf.batch_size
        self.accepted += a * buf.batch_size
        keep = s0 + 1 + a
        buf.truncate(keep)
        self.decoder.truncate(keep)
        self.decoder.write_backbone(s0, hidden[:, : a + 1])
        self.processed = keep
        bonus = choice[:, a : a + 1]
        buf.append(bonus)
        self._append(buf.ids[:, s0 + 1 : keep + 1], [*range(a), BACKBONE])

    # -- the loop
    def cycles(self) -> Iterator[int]:
        """Run the generation; yields the number of generated tokens after every cycle."""
        self._backbone_token()  # the prefill produces the first token
        yield self.produced
        if self.verify:
            while self.produced < self.max_new:
                self._verified_cycle()
                yield self.produced
                if self.forwards % self.stop_check_every == 0 and self._all_done():
                    return
            return
        for step in self.schedule.steps(self.max_new):
            if step.start == 0:
                continue  # the prefill already produced token 0
            if step.source is Source.BACKBONE:
                self._backbone_token()
                if self.forwards % self.stop_check_every == 0 and self._all_done():
                    yield self.produced
                    return
            else:
                self._chain(step.start, step.count)
            yield self.produced

    def _all_done(self) -> bool:
        return bool(self.stop_ids.numel()) and bool(self.done.all())

    @torch.inference_mode(False)  # ordinary tensors: callers may train on the ids
    def result(
        self,
        t0: float,
        prefill_s: float,
        cycle_times: list[tuple[int, float]],
        speech: SpeechIds | None,
    ) -> GenerationResult:
        buf = self.buffer
        n = self.end
        rows, srcs = [], []
        src = torch.tensor(self.sources[: n - self.prompt_len], dtype=torch.long)
        first_audio_len = None
        gen_cpu = buf.ids[:, self.prompt_len : n].cpu().clone()
        for r in range(buf.batch_size):
            ids = gen_cpu[r]
            if self.stop_ids.numel():
                hit = torch.isin(ids, self.stop_ids.cpu()).nonzero()
                if hit.numel():
                    ids = ids[: int(hit[0]) + 1]
            rows.append(ids)
            srcs.append(src[: ids.numel()])
            if speech is not None:
                eoa = (ids == speech.eoa).nonzero()
                if eoa.numel():
                    length = int(eoa[0]) + 1
                    first_audio_len = (
                        length if first_audio_len is None else min(first_audio_len, length)
                    )
        seq = torch.full((buf.batch_size, n), self.pad_id, dtype=torch.long)
        seq[:, : self.prompt_len] = buf.ids[:, : self.prompt_len].cpu()
        for r, ids in enumerate(rows):
            seq[r, self.prompt_len : self.prompt_len + ids.numel()] = ids
        first_audio_s = None
        if first_audio_len is not None:
            first_audio_s = next(
                (t for produced, t in cycle_times if produced >= first_audio_len), None
            )
        return GenerationResult(
            sequences=seq,
            tokens=rows,
            sources=srcs,
            num_backbone_forwards=self.forwards,
            num_mctp_steps=self.mctp_steps,
            num_drafted=self.drafted,
            num_accepted=self.accepted,
            prefill_s=prefill_s,
            total_s=time.perf_counter() - t0,
            first_audio_s=first_audio_s,
            cycle_times=cycle_times,
        )


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


_DOC_ARGS = """
    Args:
        backbone: A cached backbone (e.g. :class:`mctp.backbones.HFBackbone`).
        stack: The MCTP heads, or None for Vanilla.
        input_ids: ``[B, P]`` prompts, left-padded when their lengths differ.
        mode: ``"vanilla"``, ``"balance"``, ``"boost"``, ``"turbo"`` or an
            :class:`~mctp.interleave.InterleaveSchedule`.
        max_new_tokens: Tokens to generate per row (fewer when every row stops).
        attention_mask: ``[B, P]`` (1 = real token) for left-padded batches.
        prompt_embeds: ``[B, P, H]`` prompt embeddings to use instead of the token embeddings
            (VITA-Audio-Plus: audio-encoder frames written over ``<|context_of_audio|>``
            placeholders with :func:`mctp.codecs.scatter_audio_embeddings`), read by the
            backbone's prefill only: the MCTP heads embed the prompt's token ids, placeholders
            included, as the official VITA-Audio-Plus does.
        heads_read_prompt_embeds: Opt-in (off by default): the MCTP heads read
            ``prompt_embeds`` too, for heads trained with ``inputs_embeds`` (not Plus).
        vocab: Speech ids (:class:`mctp.backbones.SpeechVocab`): enables separate audio
            sampling, audio-only heads and audio events.
        text_sampling: How text tokens (and every backbone token) are chosen.
        audio_sampling: How audio tokens are chosen (default: like text).
        eos_token_id: Stop id(s); a row stops after producing one.
        pad_id: Fills ``sequences`` after a row stopped.
        verify: Verified (lossless) mode: heads draft ``draft_len`` tokens after every
            backbone forward and the backbone keeps the prefix it agrees with.
        draft_len: Drafted tokens per cycle in verified mode (default: all heads).
        audio_heads: Score MCTP heads over BOA, EOA and the audio tokens only (exact when
            heads only emit those, as in Boost/Balance/Turbo; needs ``vocab``).
        generator: Random source for sampling.
        max_len: Cache slots to allocate (default: exactly what is needed).
        stop_check_every: Look at the stop flags every this many backbone forwards.
        sync_timings: Synchronise the device after every cycle so that the timings are exact
            (costs a little speed on CUDA; no effect on CPU).
        compile: The fast path: ``torch.compile`` the backbone's decode step and every MCTP
            chain with static shapes (``mode="reduce-overhead"`` on CUDA, which captures each
            as a CUDA graph); heads then run on fixed windows of ``window`` slots. The first
            call compiles (slow); the caller decides whether that pays off. A dict is passed
            to ``torch.compile`` (e.g. ``{"backend": "aot_eager"}``).
        window: Slots per head run on the fast path; 16 covers every backlog of Vanilla,
            Balance, Boost and Turbo, and longer backlogs catch up in extra windows (see
            ``prefill_windows``; on a fresh state they run eagerly).
        prefill_windows: On the fast path with a reused ``state`` (allocated caches), a prompt of
            ``window`` to ``prefill_windows * window`` slots is prefilled as that many compiled
            ``window``-slot decodes, and the first chain's heads process the prompt backlog in
            as many compiled windows, instead of eager multi-token forwards (0: always eager).
        state: A :class:`GenerationState` to reuse (allocations and compiled graphs);
            default: a fresh one sized for this call.
"""


def _setup(
    backbone: CachedBackbone,
    stack: MCTPStack | None,
    input_ids: torch.Tensor,
    mode: str | Mode | InterleaveSchedule,
    max_new_tokens: int,
    kw: dict[str, Any],
) -> _Engine:
    schedule = _resolve_schedule(
        mode if not kw.get("verify") else Mode.VANILLA, stack if not kw.get("verify") else None
    )
    text = kw.pop("text_sampling", None) or SamplingConfig()
    audio = kw.pop("audio_sampling", None) or text
    return _Engine(
        backbone,
        stack,
        input_ids,
        schedule,
        max_new_tokens,
        attention_mask=kw.pop("attention_mask", None),
        prompt_embeds=kw.pop("prompt_embeds", None),
        heads_read_prompt_embeds=kw.pop("heads_read_prompt_embeds", False),
        speech=kw.pop("vocab", None),
        text_sampling=text,
        audio_sampling=audio,
        eos_token_id=kw.pop("eos_token_id", None),
        pad_id=kw.pop("pad_id", 0),
        verify=kw.pop("verify", False),
        draft_len=kw.pop("draft_len", None),
        audio_heads=kw.pop("audio_heads", False),
        generator=kw.pop("generator", None),
        max_len=kw.pop("max_len", None),
        stop_check_every=kw.pop("stop_check_every", 8),
        compile=kw.pop("compile", False),
        window=kw.pop("window", 16),
        prefill_windows=kw.pop("prefill_windows", 4),
        state=kw.pop("state", None),
    )


_KNOWN = {
    "attention_mask",
    "prompt_embeds",
    "heads_read_prompt_embeds",
    "vocab",
    "text_sampling",
    "audio_sampling",
    "eos_token_id",
    "pad_id",
    "verify",
    "draft_len",
    "audio_heads",
    "generator",
    "max_len",
    "stop_check_every",
    "sync_timings",
    "compile",
    "window",
    "prefill_windows",
    "state",
}


def _check_kwargs(kw: dict[str, Any]) -> None:
    unknown = sorted(set(kw) - _KNOWN)
    if unknown:
        raise TypeError(f"unexpected keyword arguments {unknown}; known: {sorted(_KNOWN)}")


@torch.inference_mode()
def generate(
    backbone: CachedBackbone,
    stack: MCTPStack | None,
    input_ids: torch.Tensor,
    mode: str | Mode | InterleaveSchedule = "boost",
    max_new_tokens: int = 256,
    **kwargs: Any,
) -> GenerationResult:
    """Generate interleaved text and audio tokens with a backbone and MCTP heads.
    {args}
    Returns:
        :class:`GenerationResult`.

    Raises:
        ValueError: On an unknown mode, a schedule needing more MCTP slots than heads,
            ``max_new_tokens < 1``, a prompt that does not fit ``max_len``, right padding,
            sampling in verified mode, or inconsistent shapes.
        TypeError: On an unknown keyword argument.
    """
    _check_kwargs(kwargs)
    sync_timings = kwargs.pop("sync_timings", False)
    speech = kwargs.get("vocab")
    t0 = time.perf_counter()
    engine = _setup(backbone, stack, input_ids, mode, max_new_tokens, kwargs)
    device = input_ids.device
    cycle_times: list[tuple[int, float]] = []
    prefill_s = 0.0
    for produced in engine.cycles():
        if sync_timings:
            _sync(device)
        now = time.perf_counter() - t0
        if not cycle_times:
            prefill_s = now
        cycle_times.append((produced, now))
    _sync(device)
    return engine.result(t0, prefill_s, cycle_times, speech)


generate.__doc__ = (generate.__doc__ or "").replace("{args}", _DOC_ARGS)
