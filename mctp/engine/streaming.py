"""``generate_stream``: one streamed generation (text tokens and audio segments as they appear).

The events come from :class:`~mctp.engine.segmenter.StreamSegmenter`; hold a
:class:`~mctp.engine.generator.Generator` and call its :meth:`~mctp.engine.generator.Generator.stream` to
reuse the state across calls.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from mctp.interleave import InterleaveSchedule, Mode

from ..backbone import Backbone
from ..stack import MCTPStack
from .generation import _with_positional, one_shot_generator
from .generation_config import EngineConfig, GenerationConfig
from .sampling import SpeechIds
from .segmenter import StreamEvent, StreamSegmenter

__all__ = ["StreamEvent", "StreamSegmenter", "generate_stream"]


def generate_stream(
    backbone: Backbone,
    stack: MCTPStack | None,
    input_ids: torch.Tensor,
    mode: str | Mode | InterleaveSchedule | None = None,
    max_new_tokens: int | None = None,
    *,
    vocab: SpeechIds | None = None,
    audio_chunk: int | None = None,
    attention_mask: torch.Tensor | None = None,
    prompt_embeds: torch.Tensor | None = None,
    heads_read_prompt_embeds: bool = False,
    generator: torch.Generator | None = None,
    streamer: Any = None,
    engine: EngineConfig | None = None,
    config: GenerationConfig | None = None,
    **options: Any,
) -> Iterator[StreamEvent]:
    """Like :func:`mctp.generate`, but yields :class:`StreamEvent` as soon as tokens exist.

    Text tokens come out after every cycle; an audio segment comes out as soon as its EOA is
    produced (in Boost/Turbo: after the first backbone forward plus one MCTP chain), or in
    pieces of ``audio_chunk`` tokens when set. Every row gets exactly one ``"end"``; the last
    event carries the :class:`~mctp.GenerationResult`. The arguments are those of
    :func:`mctp.generate` (``vocab`` is required here; settings by name as there) plus:

    Args:
        audio_chunk: Emit partial audio segments of this many tokens.

    Yields:
        :class:`StreamEvent`.

    Raises:
        ValueError: As :func:`mctp.generate`, and when ``vocab`` is missing (audio events
            need it) or ``audio_chunk < 1``.
        TypeError: As :func:`mctp.generate`.
    """
    if vocab is None:
        raise ValueError("generate_stream needs vocab= (speech ids) to find audio segments")
    options = _with_positional(options, mode, max_new_tokens)
    gen = one_shot_generator(backbone, stack, input_ids, options, vocab, engine, config)
    return gen.stream(
        input_ids,
        attention_mask=attention_mask,
        prompt_embeds=prompt_embeds,
        heads_read_prompt_embeds=heads_read_prompt_embeds,
        generator=generator,
        audio_chunk=audio_chunk,
        streamer=streamer,
    )
