"""``generate``: one generation with a throw-away :class:`~mctp.engine.generator.Generator`.

For repeated calls of the same batch size (and on the fast path, where the compiled
callables live in the Generator) build a :class:`~mctp.engine.generator.Generator` once and call
its :meth:`~mctp.engine.generator.Generator.generate`; this function is the one-shot form.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from mctp.interleave import InterleaveSchedule, Mode

from ..backbone import Backbone
from ..stack import MCTPStack
from .generation_config import GenerationConfig
from .generator import GenerationResult, Generator, slots_needed
from .sampling import SamplingConfig, SpeechIds

__all__ = ["GenerationResult", "Generator", "build_config", "generate"]


def build_config(
    mode: str | Mode | InterleaveSchedule,
    max_new_tokens: int,
    *,
    text_sampling: SamplingConfig | None,
    audio_sampling: SamplingConfig | None,
    eos_token_id: int | Sequence[int] | None,
    pad_id: int,
    verify: bool,
    draft_len: int | None,
    audio_heads: bool,
    stop_check_every: int,
    compile: bool | Mapping[str, Any],
    window: int,
    prefill_windows: int,
    config: GenerationConfig | None,
) -> GenerationConfig:
    """The :class:`GenerationConfig` of the keyword form (``config`` wins when given).

    ``compile`` may be a mapping of ``torch.compile`` options (it turns the fast path on).

    Raises:
        ValueError, TypeError: As :class:`GenerationConfig`.
    """
    if config is not None:
        return config
    return GenerationConfig(
        mode=mode,
        max_new_tokens=max_new_tokens,
        text_sampling=text_sampling or SamplingConfig(),
        audio_sampling=audio_sampling,
        eos_token_id=eos_token_id,
        pad_id=pad_id,
        verify=verify,
        draft_len=draft_len,
        audio_heads=audio_heads,
        stop_check_every=stop_check_every,
        compile=bool(compile),
        compile_options=dict(compile) if isinstance(compile, Mapping) else {},
        window=window,
        prefill_windows=prefill_windows,
    )


def one_shot_generator(
    backbone: Backbone,
    stack: MCTPStack | None,
    input_ids: torch.Tensor,
    cfg: GenerationConfig,
    max_len: int | None,
    vocab: SpeechIds | None,
) -> Generator:
    """A Generator sized for this one call (``max_len`` default: exactly what it needs).

    Raises:
        TypeError, ValueError: On bad ``input_ids`` or a ``max_len`` too small for the call.
    """
    if not isinstance(input_ids, torch.Tensor) or input_ids.ndim != 2:
        shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else input_ids
        raise ValueError(f"input_ids must be [B, P], got shape {shape}")
    b, p = input_ids.shape
    need = slots_needed(cfg, p, cfg.max_new_tokens, 0 if stack is None else stack.num_heads)
    if max_len is not None and max_len < need:
        raise ValueError(
            f"prompt ({p}) + max_new_tokens ({cfg.max_new_tokens}) + {need - p - cfg.max_new_tokens} "
            f"needs {need} cache slots, max_len is {max_len}"
        )
    return Generator(
        backbone,
        stack,
        cfg,
        batch_size=b,
        max_len=max_len or need,
        vocab=vocab,
        device=input_ids.device,
    )


def generate(
    backbone: Backbone,
    stack: MCTPStack | None,
    input_ids: torch.Tensor,
    mode: str | Mode | InterleaveSchedule = "boost",
    max_new_tokens: int = 256,
    *,
    attention_mask: torch.Tensor | None = None,
    prompt_embeds: torch.Tensor | None = None,
    heads_read_prompt_embeds: bool = False,
    vocab: SpeechIds | None = None,
    text_sampling: SamplingConfig | None = None,
    audio_sampling: SamplingConfig | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    pad_id: int = 0,
    verify: bool = False,
    draft_len: int | None = None,
    audio_heads: bool = False,
    generator: torch.Generator | None = None,
    max_len: int | None = None,
    stop_check_every: int = 8,
    sync_timings: bool = False,
    compile: bool | Mapping[str, Any] = False,
    window: int = 16,
    prefill_windows: int = 4,
    streamer: Any = None,
    config: GenerationConfig | None = None,
) -> GenerationResult:
    """Generate interleaved text and audio tokens with a backbone and MCTP heads.

    The options are the fields of :class:`~mctp.GenerationConfig` (see there), the per-call
    inputs of :meth:`mctp.Generator.generate` (see there) and these:

    Args:
        backbone: The backbone (:class:`mctp.backbone.Backbone`, e.g. ``HFBackbone``).
        stack: The MCTP heads, or None for Vanilla.
        input_ids: ``[B, P]`` integer prompts, left-padded when their lengths differ.
        mode: ``"vanilla"``, ``"balance"``, ``"boost"``, ``"turbo"`` or an
            :class:`~mctp.interleave.InterleaveSchedule`.
        max_new_tokens: Tokens to generate per row (fewer when every row stops).
        attention_mask: ``[B, P]`` (1 = real token) for left-padded batches.
        prompt_embeds: ``[B, P, H]`` prompt embeddings for the backbone's prefill.
        heads_read_prompt_embeds: The MCTP heads read ``prompt_embeds`` too (opt-in).
        vocab: Speech ids (:class:`mctp.backbones.SpeechVocab`).
        text_sampling: How text tokens (and every backbone token) are chosen.
        audio_sampling: How audio tokens are chosen (default: like text).
        eos_token_id: Stop id(s).
        pad_id: Fills ``sequences`` after a row stopped.
        verify: Verified (lossless) decoding of ``mode``'s drafts.
        draft_len: Verified Vanilla: drafted tokens per cycle.
        audio_heads: MCTP heads score BOA, EOA and audio tokens only.
        generator: Random source for sampling.
        max_len: Cache slots to allocate (default: exactly what is needed).
        stop_check_every: Look at the stop flags every this many backbone forwards.
        sync_timings: Synchronise the device after every cycle (exact timings).
        compile: The fast path (``True`` or a dict of ``torch.compile`` options). It compiles
            on every call of this function: hold a :class:`~mctp.Generator` to keep the
            compiled callables.
        window: Fast-path window.
        prefill_windows: Fast-path window decodes for a prefill / a head catch-up.
        streamer: A transformers streamer for the text tokens (batch size 1).
        config: A whole :class:`~mctp.GenerationConfig`; replaces ``mode``,
            ``max_new_tokens`` and the option keywords.

    Returns:
        :class:`GenerationResult`.

    Raises:
        ValueError: On an unknown mode, a schedule needing more MCTP slots than heads,
            ``max_new_tokens < 1``, a prompt that does not fit ``max_len``, right padding,
            sampling in verified mode, or inconsistent shapes.
        TypeError: On non-integer ``input_ids`` or a value of the wrong type.
    """
    cfg = build_config(
        mode,
        max_new_tokens,
        text_sampling=text_sampling,
        audio_sampling=audio_sampling,
        eos_token_id=eos_token_id,
        pad_id=pad_id,
        verify=verify,
        draft_len=draft_len,
        audio_heads=audio_heads,
        stop_check_every=stop_check_every,
        compile=compile,
        window=window,
        prefill_windows=prefill_windows,
        config=config,
    )
    gen = one_shot_generator(backbone, stack, input_ids, cfg, max_len, vocab)
    return gen.generate(
        input_ids,
        attention_mask=attention_mask,
        prompt_embeds=prompt_embeds,
        heads_read_prompt_embeds=heads_read_prompt_embeds,
        generator=generator,
        streamer=streamer,
        sync_timings=sync_timings,
    )
