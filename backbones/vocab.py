"""Adding VITA-Audio's speech tokens to a transformers tokenizer and model (``extend_vocab``).

The vocabulary itself (the special token names, ``<|audio_k|>``, :class:`SpeechVocab`) lives in
the core, :mod:`mctp.speech_vocab`; this adapter only changes a tokenizer and resizes a model's
embeddings through transformers' API.
"""

from __future__ import annotations

from typing import Any

from mctp.speech_vocab import SPECIAL_TOKENS, SPECIAL_TOKENS_PLUS, SpeechVocab, audio_token

__all__ = ["extend_vocab"]


def extend_vocab(
    tokenizer: Any,
    model: Any | None = None,
    *,
    num_audio_tokens: int = 16384,
    plus: bool = False,
    pad_to_multiple_of: int = 8,
) -> SpeechVocab:
    """Add the speech tokens to a tokenizer (and resize a model's embeddings) in the official order.

    Tokens that already exist are kept with their ids, so calling it twice is harmless.
    New embedding rows (input and, when untied, output) are drawn around the mean of the old
    ones (transformers' ``mean_resizing``), which leaves the model's text predictions unchanged
    in expectation.

    Args:
        tokenizer: A transformers tokenizer (modified in place).
        model: A transformers model whose embeddings are resized, or None.
        num_audio_tokens: Codebook size of the audio tokenizer (16384 for GLM-4-Voice).
        plus: Use the VITA-Audio-Plus layout with ``<|context_of_audio|>``.
        pad_to_multiple_of: Round the embedding rows up to this multiple.

    Returns:
        The :class:`SpeechVocab`.

    Raises:
        ValueError: On a non-positive ``num_audio_tokens`` or ids that come out non-contiguous.
    """
    if num_audio_tokens < 1:
        raise ValueError(f"num_audio_tokens must be >= 1, got {num_audio_tokens}")
    tokenizer.add_tokens(list(SPECIAL_TOKENS_PLUS if plus else SPECIAL_TOKENS), special_tokens=True)
    tokenizer.add_tokens([audio_token(k) for k in range(num_audio_tokens)], special_tokens=False)
    rows = len(tokenizer)
    if model is not None:
        current = model.get_input_embeddings().weight.shape[0]
        target = max(rows, current)
        target = -(-target // pad_to_multiple_of) * pad_to_multiple_of
        if target != current:
            model.resize_token_embeddings(target, mean_resizing=True)
        rows = target
    else:
        rows = -(-rows // pad_to_multiple_of) * pad_to_multiple_of
    vocab = SpeechVocab.from_tokenizer(tokenizer, vocab_size=rows)
    if vocab.num_audio < num_audio_tokens:
        raise ValueError(
            f"only {vocab.num_audio} audio tokens are contiguous, expected {num_audio_tokens}"
        )
    return vocab
