"""One call of a :class:`~mctp.engine.generator.Generator`: ``_Run``, the schedule loop.

A run checks the call's input, starts the Generator's decode state, and then runs the schedule:
backbone tokens, MCTP chains and (``verify=True``) draft-and-verify cycles, yielding after
every cycle (:meth:`_Run.cycles`); :meth:`_Run.result` reads the result of all rows or of one.
Mid-flight joins come from :class:`~mctp.engine.joins._Joins`.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from mctp.interleave import BACKBONE, Source

from .decoding import MCTPDecoder
from .generation_config import GenerationConfig, slots_needed
from .joins import _Joins
from .masks import warn_unmasked_padding
from .result import GenerationResult
from .sampling import TokenPicker


def _check_input_ids(input_ids: torch.Tensor) -> None:
    if not isinstance(input_ids, torch.Tensor):
        raise TypeError(f"input_ids must be a tensor, got {type(input_ids).__name__}")
    if input_ids.dtype == torch.bool or input_ids.is_floating_point() or input_ids.is_complex():
        raise TypeError(f"input_ids must hold integer token ids, got dtype {input_ids.dtype}")
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids must be [B, P], got shape {tuple(input_ids.shape)}")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _Run(_Joins):
    """One call's progress over the Generator's state (the schedule loop)."""

    def __init__(
        self,
        gen: Any,  # the Generator (generator.py imports this module)
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
        self.gen = gen
        # the eager path runs the call's own rows (a lone request costs one row); compiled
        # shapes run the row counts they were compiled for; caches that cannot be narrowed
        # run all max_batch rows
        run = self.rows_for(b)
        if b < run:  # pad with copies of row 0 (already stopped)
            extra = run - b
            input_ids = torch.cat([input_ids, input_ids[:1].expand(extra, -1)])
            if attention_mask is not None:
                attention_mask = torch.cat([attention_mask, attention_mask[:1].expand(extra, -1)])
            if prompt_embeds is not None:
                prompt_embeds = torch.cat([prompt_embeds, prompt_embeds[:1].expand(extra, -1, -1)])
        self.cfg, self.engine, self.path = cfg, gen.engine, gen.path
        self.schedule = cfg.schedule
        self.max_new, self.prompt_len = cfg.max_new_tokens, p
        self.state = gen.state
        self.buffer, self.cache = gen.buffer, gen.cache
        # columns no row uses (e.g. a cohort's room for joining prompts) are never computed
        lead = self.state.start(
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
        # a padded row has seen its own tokens only (not the padding)
        self.picker.observe(
            input_ids
            if attention_mask is None
            else torch.where(attention_mask.to(device).bool(), input_ids, input_ids[:, -1:])
        )
        self.stop_ids = torch.tensor(cfg.eos_token_id, dtype=torch.long, device=device)
        self.done = torch.arange(cap, device=device) >= b  # padding rows count as stopped
        # per row: first generated slot, first prompt slot, budget; rows free for a join
        self.row_start = [p] * cap
        self.row_prompt = [lead] * cap
        self.row_budget = [cfg.max_new_tokens] * cap
        self.finished_rows: set[int] = set(range(b, cap))
        self.joinable = False
        self.joined = 0
        self.sources: list[int] = []  # per generated slot, shared by all rows
        self.key_start = 0  # the first slot a live row reads (see fit_rows)
        self.forwards = self.mctp_steps = self.drafted = self.accepted = 0
        self.prefill_s = 0.0
        self.fit_rows()  # the prefill skips the columns no row uses (lead) already

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
        """Record new tokens ``[B', T]`` (the active rows) already in the buffer."""
        self.picker.observe(tokens)
        if self.stop_ids.numel():
            self.done[: tokens.shape[0]] |= torch.isin(tokens, self.stop_ids).any(dim=1)
        self.sources.extend(source)

    def rows_for(self, needed: int) -> int:
        """Rows the steps run while the first ``needed`` rows are in use: those on the eager
        path, the nearest compiled row count on the fast path (``path.rows_for``), all
        ``max_batch`` rows for a cache that cannot be narrowed."""
        cap = self.gen.max_batch
        if not self.gen.state.narrowable:
            return cap
        return self.gen.path.rows_for(needed, cap)

    def fit_rows(self) -> None:
        """Stop running rows past the last one still in use (their requests ended and no
        request took them): the eager path then costs what the live rows cost, compiled
        regions drop to 1 row once only the first is live (:meth:`rows_for`). Called by the
        stream between cycles; a join that needs a row past them brings it back. Where the
        path has a key window (the eager path, compiled regions) also moves the attention
        window's start (:attr:`key_start`)."""
        live = [r for r in range(self.state.active_rows) if r not in self.finished_rows]
        if live and self.rows_for(live[-1] + 1) < self.state.active_rows:
            self.state.set_active_rows(self.rows_for(live[-1] + 1))
        if not (self.path.key_window and self.gen.state.narrowable):
            return
        # attention skips the slots before the first one a live row reads (a batch that keeps
        # taking requests keeps its cursor growing; its rows' prompts start near the cursor)
        self.key_start = min((self.row_prompt[r] for r in live), default=0)
        if self.state.heads is not None:
            self.state.heads.key_start = self.key_start

    def _forward(self, start: int, all_logits: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """The backbone over slots ``start ..`` (skipping slots before :attr:`key_start`)."""
        lo = min(self.key_start, start)
        if lo:
            return self.path.forward(
                self.buffer, self.cache, start, all_logits=all_logits, key_start=lo
            )
        return self.path.forward(self.buffer, self.cache, start, all_logits=all_logits)

    def _backbone_token(self) -> None:
        start = self.state.processed
        hidden, logits = self._forward(start)
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
        hidden, logits = self._forward(s0, all_logits=True)
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
        ids_cpu = buf.all_ids.index_select(0, torch.tensor(picked, device=buf.device)).cpu()
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
