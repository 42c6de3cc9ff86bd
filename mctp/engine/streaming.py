"""``generate_stream``: one streamed generation (text tokens and audio segments as they appear).

The events come from :class:`~mctp.engine.segmenter.StreamSegmenter`; hold a
:class:`~mctp.engine.generator.Generator` and call its :meth:`~mctp.engine.generator.Generator.stream` to
reuse the state across calls.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch

from mctp.interleave import InterleaveSchedule, Mode

from ..backbone import Backbone
from ..stack import MCTPStack
from .generation import build_config, one_shot_generator
from .generation_config import GenerationConfig
from .sampling import SamplingConfig, SpeechIds
from .segmenter import StreamEvent, StreamSegmenter

__all__ = ["StreamEvent", "StreamSegmenter", "generate_stream"]


def generate_stream(
    backbone: Backbone,
    stack: MCTPStack | None,
    input_ids: torch.Tensor,
    mode: str | Mode | InterleaveSchedule = "boost",
    max_new_tokens: int = 256,
    *,
    vocab: SpeechIds | None = None,
    audio_chunk: int | None = None,
    attention_mask: torch.Tensor | None = None,
    prompt_embeds: torch.Tensor | None = None,
    heads_read_prompt_embeds: bool = False,
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
    compile: bool | Mapping[str, Any] = False,
    window: int = 16,
    prefill_windows: int = 4,
    streamer: Any = None,
    config: GenerationConfig | None = None,
) -> Iterator[StreamEvent]:
    """Like :func:`mctp.generate`, but yields :class:`StreamEvent` as soon as tokens exist.

    Text tokens come out after every cycle; an audio segment comes out as soon as its EOA is
    produced (in Boost/Turbo: after the first backbone forward plus one MCTP chain), or in
    pieces of ``audio_chunk`` tokens when set. Every row gets exactly one ``"end"``; the last
    event carries the :class:`~mctp.GenerationResult`. The arguments are those of
    :func:`mctp.generate` (``vocab`` is required here) plus:

    Args:
        audio_chunk: Emit partial audio segments of this many tokens.

    Yields:
        :class:`StreamEvent`.

    Raises:
        ValueError: As :func:`mctp.generate`, and when ``vocab`` is missing (audio events
            need it) or ``audio_chunk < 1``.
    """
    if vocab is None:
        raise ValueError("generate_stream needs vocab= (speech ids) to find audio segments")
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
    return gen.stream(
        input_ids,
        attention_mask=attention_mask,
        prompt_embeds=prompt_embeds,
        heads_read_prompt_embeds=heads_read_prompt_embeds,
        generator=generator,
        audio_chunk=audio_chunk,
        streamer=streamer,
    )
