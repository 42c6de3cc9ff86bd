"""``generate``: one generation with a throw-away :class:`~mctp.engine.generator.Generator`.

For repeated calls of the same batch size (and on the fast path, where the compiled
callables live in the Generator) build a :class:`~mctp.engine.generator.Generator` once and call
its :meth:`~mctp.engine.generator.Generator.generate`; this function is the one-shot form.
"""

from __future__ import annotations

from typing import Any

import torch

from mctp.interleave import InterleaveSchedule, Mode

from ..backbone import Backbone
from ..stack import MCTPStack
from .generation_config import EngineConfig, GenerationConfig, slots_needed, split_options
from .generator import GenerationResult, Generator
from .sampling import SpeechIds

__all__ = ["GenerationResult", "Generator", "generate", "one_shot_generator"]


def one_shot_generator(
    backbone: Backbone,
    stack: MCTPStack | None,
    input_ids: torch.Tensor,
    options: dict[str, Any],
    vocab: SpeechIds | None,
    engine: EngineConfig | None,
    config: GenerationConfig | None,
) -> Generator:
    """A Generator sized for this one call: ``max_batch`` = the prompt's rows and, unless
    ``max_len`` is given, exactly the slots the call needs.

    Raises:
        TypeError, ValueError: On bad ``input_ids``, unknown options, or a ``max_len`` too
            small for the call.
    """
    if not isinstance(input_ids, torch.Tensor) or input_ids.ndim != 2:
        shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else input_ids
        raise ValueError(f"input_ids must be [B, P], got shape {shape}")
    b, p = input_ids.shape
    options = dict(options)
    options.setdefault("max_batch", b)
    options.setdefault("device", str(input_ids.device))
    eng, cfg = split_options(options, engine=engine, config=config)
    need = slots_needed(cfg, p, cfg.max_new_tokens, 0 if stack is None else stack.num_heads, eng)
    if "max_len" not in options and (engine is None or engine.max_len < need):
        eng = eng.replace(max_len=max(need, 2))
    # a max_len given too small is refused by the call itself, with the same message
    return Generator(backbone, stack, cfg, engine=eng, vocab=vocab)


def generate(
    backbone: Backbone,
    stack: MCTPStack | None,
    input_ids: torch.Tensor,
    mode: str | Mode | InterleaveSchedule | None = None,
    max_new_tokens: int | None = None,
    *,
    attention_mask: torch.Tensor | None = None,
    prompt_embeds: torch.Tensor | None = None,
    heads_read_prompt_embeds: bool = False,
    vocab: SpeechIds | None = None,
    generator: torch.Generator | None = None,
    sync_timings: bool = False,
    streamer: Any = None,
    engine: EngineConfig | None = None,
    config: GenerationConfig | None = None,
    **options: Any,
) -> GenerationResult:
    """Generate interleaved text and audio tokens with a backbone and MCTP heads (one call,
    a throw-away :class:`~mctp.Generator`; hold a Generator to reuse caches and compiled code).

    The settings are the fields of :class:`~mctp.GenerationConfig` (request: ``mode``,
    ``max_new_tokens``, ``text_sampling``, ``audio_sampling``, ``eos_token_id``, ``pad_id``,
    ``verify``, ``draft_len``) and of :class:`~mctp.EngineConfig` (engine: ``compile``,
    ``window``, ``audio_heads``, ``max_len``, ...), given as objects (``config=``,
    ``engine=``) and/or as keyword options with those names, applied on top.

    Args:
        backbone: The backbone (:class:`mctp.backbone.Backbone`, e.g. ``HFBackbone``).
        stack: The MCTP heads, or None for Vanilla.
        input_ids: ``[B, P]`` integer prompts, left-padded when their lengths differ.
        mode: Request setting ``mode`` (default Boost).
        max_new_tokens: Request setting ``max_new_tokens`` (default 256).
        attention_mask: ``[B, P]`` (1 = real token) for left-padded batches.
        prompt_embeds: ``[B, P, H]`` prompt embeddings for the backbone's prefill.
        heads_read_prompt_embeds: The MCTP heads read ``prompt_embeds`` too (opt-in).
        vocab: Speech ids (:class:`mctp.SpeechVocab`).
        generator: Random source for sampling.
        sync_timings: Synchronise the device after every cycle (exact timings).
        streamer: A transformers streamer for the text tokens (batch size 1).
        engine: Engine settings (``max_batch`` defaults to the prompt's rows and ``max_len``
            to what the call needs).
        config: Request settings.
        **options: Fields of either settings object, by name.

    Returns:
        :class:`GenerationResult`.

    Raises:
        TypeError: On an option that is a field of neither settings object (named in the
            message), non-integer ``input_ids`` or a value of the wrong type.
        ValueError: On an unknown mode, a schedule needing more MCTP slots than heads,
            ``max_new_tokens < 1``, a prompt that does not fit ``max_len``, right padding,
            sampling in verified mode, or inconsistent shapes.
    """
    options = _with_positional(options, mode, max_new_tokens)
    gen = one_shot_generator(backbone, stack, input_ids, options, vocab, engine, config)
    return gen.generate(
        input_ids,
        attention_mask=attention_mask,
        prompt_embeds=prompt_embeds,
        heads_read_prompt_embeds=heads_read_prompt_embeds,
        generator=generator,
        streamer=streamer,
        sync_timings=sync_timings,
    )


def _with_positional(
    options: dict[str, Any], mode: object, max_new_tokens: int | None
) -> dict[str, Any]:
    """``mode``/``max_new_tokens`` (positional in ``generate``) folded into the options."""
    options = dict(options)
    if mode is not None:
        options["mode"] = mode
    if max_new_tokens is not None:
        options["max_new_tokens"] = max_new_tokens
    return options
