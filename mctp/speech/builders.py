"""Builders that wire a :class:`~mctp.speech.SpeechPipeline` from parts or folders."""

from __future__ import annotations

import os
from typing import Any

import torch

from .pipeline import SpeechPipeline

__all__ = ["HEADS_FOLDER", "build_folder_pipeline", "build_tiny_pipeline", "load_input_codec"]

HEADS_FOLDER = "mctp_heads"


def load_input_codec(
    path: str | os.PathLike[str] | None, hidden_size: int, *, device: str | torch.device = "cpu"
) -> dict[str, Any]:
    """Speech-input parts for :class:`SpeechPipeline` from a codec folder.

    Args:
        path: A codec folder (GLM-4-Voice tokenizer, SenseVoiceSmall, ...) or None for the
            built-in :class:`~mctp.codecs.DummyCodec` (16 kHz, 12.5 Hz, 256 codes).
        hidden_size: The LLM's hidden size (for a fresh projector behind an encoder).
        device: Where the codec runs.

    Returns:
        ``{"audio_tokenizer": ...}`` or ``{"audio_encoder": ..., "projector": ...}``; an
        encoder gets a seeded random :class:`~mctp.codecs.MLPProjector` (tiny default only).

    Raises:
        FileNotFoundError, ValueError: As :func:`mctp.codecs.load_codec`.
    """
    from mctp.codecs import DummyCodec, MLPProjector, load_codec

    if path is None:
        return {"audio_tokenizer": DummyCodec(codebook_size=256)}
    codec = load_codec(path, device=device)
    if hasattr(codec, "output_dim"):
        g = torch.random.fork_rng()
        with g:
            torch.manual_seed(0)
            projector = MLPProjector(int(codec.output_dim), hidden_size).to(device).eval()
        return {"audio_encoder": codec, "projector": projector}
    return {"audio_tokenizer": codec}


def build_tiny_pipeline(
    *,
    model: str | os.PathLike[str] | None = None,
    tokenizer: str | os.PathLike[str] | None = None,
    decoder: str | os.PathLike[str] | None = None,
    mode: str = "boost",
    max_new_tokens: int = 256,
    device: str | torch.device = "cpu",
    **kwargs: Any,
) -> SpeechPipeline:
    """The built-in tiny default pipeline (see :mod:`mctp.speech.tiny`), on CPU in seconds.

    The speech LM is always the tiny taught one; the codecs can be real folders (e.g. the
    tiny random GLM-4-Voice / SenseVoice checkpoints of the tests), any with at least 256
    codes for the decoder and at most 256 for the tokenizer.

    Args:
        model: None for the tiny model; a folder is handed to :func:`build_folder_pipeline`
            (VITA-Audio's official folders have their own builder,
            ``vita_audio.pipeline:build_pipeline`` in the repository's examples).
        tokenizer: Speech-input codec folder, or None for the dummy codec.
        decoder: Speech-output codec folder, or None for the dummy codec.
        mode: Default schedule.
        max_new_tokens: Default generation budget.
        device: Where everything runs.
        **kwargs: Further :class:`SpeechPipeline` arguments (``num_threads`` defaults to 1
            here: the tiny model's matrices are too small to share between threads).

    Raises:
        ValueError: As :class:`SpeechPipeline`.
        FileNotFoundError: If a codec folder does not exist.
    """
    from mctp.codecs import DummyCodec, load_codec

    from .tiny import tiny_speech_lm

    if model is not None:
        return build_folder_pipeline(
            model=model,
            tokenizer=tokenizer,
            decoder=decoder,
            mode=mode,
            max_new_tokens=max_new_tokens,
            device=device,
            **kwargs,
        )
    backbone, stack, tok, vocab = tiny_speech_lm()
    backbone.to(device)
    stack.to(device)
    parts = load_input_codec(tokenizer, backbone.hidden_size, device=device)
    dec = DummyCodec(codebook_size=256) if decoder is None else load_codec(decoder, device=device)
    return SpeechPipeline(
        backbone=backbone,
        stack=stack,
        tokenizer=tok,
        vocab=vocab,
        decoder=dec,
        mode=mode,
        max_new_tokens=max_new_tokens,
        name="mctp-tiny",
        num_threads=kwargs.pop("num_threads", 1),
        **parts,
        **kwargs,
    )


def build_folder_pipeline(
    *,
    model: str | os.PathLike[str],
    tokenizer: str | os.PathLike[str] | None = None,
    decoder: str | os.PathLike[str] | None = None,
    mode: str = "boost",
    max_new_tokens: int = 256,
    device: str | torch.device = "cpu",
    **kwargs: Any,
) -> SpeechPipeline:
    """A pipeline from a transformers model folder with MCTP heads beside it.

    The folder holds a causal LM and its text tokenizer as ``save_pretrained`` writes them
    (the tokenizer with the speech tokens, see :func:`mctp.backbones.extend_vocab`, and a chat
    template) and, in ``mctp_heads/``, the heads written by
    :meth:`mctp.MCTPStack.save_pretrained` (without them only Vanilla runs).

    Args:
        model: The model folder.
        tokenizer: Speech-input codec folder, or None for the dummy codec.
        decoder: Speech-output codec folder, or None for a dummy codec with one code per
            audio token.
        mode: Default schedule.
        max_new_tokens: Default generation budget.
        device: Where everything runs.
        **kwargs: Further :class:`SpeechPipeline` arguments.

    Raises:
        FileNotFoundError: If ``model`` is not a folder or has no ``config.json``.
        ValueError: If the tokenizer lacks the speech tokens, or as :class:`SpeechPipeline`.
    """
    from pathlib import Path

    from transformers import AutoModelForCausalLM

    from mctp.backbones import HFBackbone
    from mctp.codecs import DummyCodec, load_codec
    from mctp.speech_vocab import SpeechVocab
    from mctp.stack import MCTPStack

    folder = Path(model)
    if not folder.is_dir():
        raise FileNotFoundError(f"model folder {folder} does not exist")
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"{folder} is not a transformers model folder (no config.json); for other formats "
            "pass their builder (VITA-Audio: --builder vita_audio.pipeline:build_pipeline)"
        )
    lm = AutoModelForCausalLM.from_pretrained(folder).to(device).eval()
    text_tok = _load_text_tokenizer(folder)
    backbone = HFBackbone(lm)
    vocab = SpeechVocab.from_tokenizer(text_tok, vocab_size=backbone.vocab_size)
    heads = folder / HEADS_FOLDER
    stack = MCTPStack.from_pretrained(heads, backbone.parts()) if heads.is_dir() else None
    parts = load_input_codec(tokenizer, backbone.hidden_size, device=device)
    dec = (
        DummyCodec(codebook_size=vocab.num_audio)
        if decoder is None
        else load_codec(decoder, device=device)
    )
    return SpeechPipeline(
        backbone=backbone,
        stack=stack,
        tokenizer=text_tok,
        vocab=vocab,
        decoder=dec,
        mode=mode,
        max_new_tokens=max_new_tokens,
        name=folder.name,
        **parts,
        **kwargs,
    )


def _load_text_tokenizer(folder: Any) -> Any:
    """The tokenizer class the folder's ``tokenizer_config.json`` names.

    A generic ``tokenizers`` backend (``TokenizersBackend`` / ``PreTrainedTokenizerFast``) is
    loaded as such: ``AutoTokenizer`` would pick the model type's own class (e.g. Qwen2's BPE)
    for it and tokenize differently.
    """
    import json

    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    cfg_file = folder / "tokenizer_config.json"
    named = json.loads(cfg_file.read_text()).get("tokenizer_class") if cfg_file.is_file() else None
    if named in ("TokenizersBackend", "PreTrainedTokenizerFast"):
        return PreTrainedTokenizerFast.from_pretrained(folder)
    return AutoTokenizer.from_pretrained(folder)
