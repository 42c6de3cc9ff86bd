"""Fixtures for the evaluation tests: the tiny default, taught once per test run."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every test here runs the tiny model on one torch thread (see tests/conftest.py)."""
    yield


@pytest.fixture(scope="session")
def silent_whisper(tmp_path_factory):
    """A tiny Whisper folder (``WhisperForConditionalGeneration`` + an offline BPE tokenizer)
    whose decoder always says end-of-text first, so it transcribes anything as ``""``.

    Random weights everywhere except the decoder's final norm (a constant output) and the
    untied output projection (that constant scores ``<|endoftext|>`` highest).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import (
        WhisperConfig,
        WhisperFeatureExtractor,
        WhisperForConditionalGeneration,
        WhisperTokenizerFast,
    )

    folder = tmp_path_factory.mktemp("silent-whisper")
    specials = [
        "<|endoftext|>",
        "<|startoftranscript|>",
        "<|en|>",
        "<|transcribe|>",
        "<|notimestamps|>",
    ]
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    core.train_from_iterator(["hello world this is a tiny whisper"], trainer)
    core.save(str(folder / "tokenizer.json"))
    eot = "<|endoftext|>"
    tok = WhisperTokenizerFast(
        tokenizer_file=str(folder / "tokenizer.json"),
        unk_token=eot,
        bos_token=eot,
        eos_token=eot,
        pad_token=eot,
    )
    tok.save_pretrained(folder)
    WhisperFeatureExtractor(feature_size=80).save_pretrained(folder)
    ids = {t: tok.convert_tokens_to_ids(t) for t in specials}
    torch.manual_seed(0)
    cfg = WhisperConfig(
        vocab_size=len(tok),
        num_mel_bins=80,
        d_model=32,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        max_target_positions=64,
        decoder_start_token_id=ids["<|startoftranscript|>"],
        eos_token_id=ids[eot],
        pad_token_id=ids[eot],
        bos_token_id=ids[eot],
        begin_suppress_tokens=None,
        suppress_tokens=None,
        tie_word_embeddings=False,
    )
    model = WhisperForConditionalGeneration(cfg)
    with torch.no_grad():
        norm = model.model.decoder.layer_norm
        norm.weight.zero_()
        norm.bias.zero_()
        norm.bias[0] = 1.0
        model.proj_out.weight.zero_()
        model.proj_out.weight[ids[eot], 0] = 10.0
    model.generation_config.max_length = 16
    model.generation_config.no_timestamps_token_id = ids["<|notimestamps|>"]
    model.save_pretrained(folder)
    return folder
