"""The VITA-Audio preset of :class:`mctp.speech.SpeechPipeline`: model folder + codec folders.

    from vita_audio.pipeline import build_pipeline

    pipe = build_pipeline(
        model="VITA-Audio-Boost",
        tokenizer="glm-4-voice-tokenizer",  # or a SenseVoiceSmall folder for the Plus models
        decoder="glm-4-voice-decoder",
        device="cuda",
        dtype=torch.bfloat16,
    )
    result = pipe(audio="question.wav")

It is also a ``--builder`` for the command line (``examples/`` on ``PYTHONPATH``)::

    mctp speak --builder vita_audio.pipeline:build_pipeline --model VITA-Audio-Boost \\
        --tokenizer glm-4-voice-tokenizer --decoder glm-4-voice-decoder --input question.wav
"""

from __future__ import annotations

import os
from typing import Any

import torch

from mctp.speech import SpeechPipeline
from mctp.speech.tiny import CHATML_TEMPLATE

from .model import VitaAudio

__all__ = ["build_pipeline"]


def build_pipeline(
    *,
    model: str | os.PathLike[str],
    tokenizer: str | os.PathLike[str] | None = None,
    decoder: str | os.PathLike[str] | None = None,
    mode: str | None = None,
    max_new_tokens: int = 1024,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    **kwargs: Any,
) -> SpeechPipeline:
    """A :class:`~mctp.speech.SpeechPipeline` for an official VITA-Audio folder.

    Args:
        model: The VITA-Audio model folder (weights, config, tokenizer).
        tokenizer: Speech-input codec folder: the GLM-4-Voice tokenizer (discrete input) or
            SenseVoiceSmall (Plus models; the projector is read from ``model``'s
            ``model.audio_projection.*`` tensors). None: the dummy codec (tests).
        decoder: The GLM-4-Voice decoder folder. None: the dummy codec (tests).
        mode: Default schedule; None takes the folder's ``mtp_inference_mode``.
        max_new_tokens: Default generation budget.
        device: Where everything runs.
        dtype: Weight dtype of the LLM (default: as stored).
        **kwargs: Further :class:`SpeechPipeline` arguments (sampling, system prompt...).

    Raises:
        ValueError: If the folder has no tokenizer, or as :class:`SpeechPipeline`.
        FileNotFoundError, mctp.CheckpointError: On missing or mismatched files.
    """
    from mctp.codecs import DummyCodec, MLPProjector, load_codec

    llm = VitaAudio.from_pretrained(model, mode=mode, device=device, dtype=dtype)
    if llm.tokenizer is None:
        raise ValueError(f"{model} has no tokenizer files")
    if getattr(llm.tokenizer, "chat_template", None) is None:
        llm.tokenizer.chat_template = CHATML_TEMPLATE  # what the official scripts render
    parts: dict[str, Any]
    if tokenizer is None:
        parts = {"audio_tokenizer": DummyCodec(codebook_size=min(llm.vocab.num_audio, 638))}
    else:
        codec = load_codec(tokenizer, device=device)
        if hasattr(codec, "output_dim"):  # VITA-Audio-Plus: SenseVoice frames + the projector
            projector = MLPProjector.from_pretrained(model, device=device)
            parts = {"audio_encoder": codec, "projector": projector}
        else:
            parts = {"audio_tokenizer": codec}
    if decoder is None:
        dec: Any = DummyCodec(codebook_size=llm.vocab.num_audio)
    else:
        dec = load_codec(decoder, device=device)
    return SpeechPipeline(
        backbone=llm.backbone,
        stack=llm.stack,
        tokenizer=llm.tokenizer,
        vocab=llm.vocab,
        decoder=dec,
        mode=llm.mode,
        eos_token_id=llm.eos_token_id,
        max_new_tokens=max_new_tokens,
        name=os.path.basename(os.path.normpath(model)),
        **parts,
        **kwargs,
    )
