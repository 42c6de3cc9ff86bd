"""Tiny assets for tests and the ``tiny`` recipe: a word tokenizer, a synthetic speech dataset
and a random tiny Qwen2 folder (nothing is downloaded)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mctp.speech_vocab import AUDIO_PLACEHOLDER

from .data import ASR_PROMPT, TTS_PROMPT

__all__ = ["make_tiny_assets", "make_word_tokenizer", "synthesize_dataset"]


def make_word_tokenizer(words: Sequence[str]) -> Any:
    """A word-level transformers tokenizer (space-separated words, ``"\\n"`` a token) with ChatML.

    Holds ``<unk>``, ``"\\n"``, ``words`` and the specials ``<|endoftext|>`` (pad),
    ``<|im_start|>``, ``<|im_end|>`` (eos); add the speech tokens with ``extend_vocab``.
    """
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    table = {w: i for i, w in enumerate(dict.fromkeys(["<unk>", "\n", *words]))}
    core = Tokenizer(models.WordLevel(table, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r"\n"), "isolated"), pre_tokenizers.Split(" ", "removed")]
    )
    tok = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>")
    tok.add_special_tokens(
        {
            "pad_token": "<|endoftext|>",
            "eos_token": "<|im_end|>",
            "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
        }
    )
    return tok


def synthesize_dataset(
    folder: str | Path, codec: Any, *, records: int = 8, seed: int = 0, num_words: int = 48
) -> tuple[dict[str, Any], list[str]]:
    """Write tiny ASR, TTS, speech-QA and text-only JSONL files with WAVs made by ``codec``.

    Audio is ``codec.decode`` of random codes (4..24 frames), written as float WAV, so a
    tokenizer like :class:`~mctp.codecs.DummyCodec` recovers the codes exactly.

    Args:
        folder: Output folder (``<task>.jsonl`` and ``wav/``).
        codec: Has ``decode(ids) -> wav``, ``sample_rate`` and ``codebook_size``.
        records: Records per task.
        seed: Seed of the text and codes.
        num_words: Size of the random word list (``w0``, ``w1``, ...).

    Returns:
        ``(mixture mapping in the official layout, every word used)``.
    """
    import soundfile as sf

    rng = np.random.default_rng(seed)
    root = Path(folder)
    (root / "wav").mkdir(parents=True, exist_ok=True)
    vocab = [f"w{i}" for i in range(num_words)]
    count = iter(range(10**9))

    def text(lo: int, hi: int) -> str:
        return " ".join(rng.choice(vocab, size=int(rng.integers(lo, hi + 1))).tolist())

    def wav() -> str:
        ids = torch.from_numpy(rng.integers(0, codec.codebook_size, int(rng.integers(4, 25))))
        path = root / "wav" / f"{next(count):05d}.wav"
        sf.write(path, codec.decode(ids).numpy(), int(codec.sample_rate), subtype="FLOAT")
        return str(path.resolve())

    def chat(user: str, assistant: str, audios: list[str]) -> dict[str, Any]:
        turns = [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
        return {"messages": turns, "audios": audios}

    makers = {
        "asr": lambda: chat(f"{ASR_PROMPT}\n{AUDIO_PLACEHOLDER}", text(3, 8), [wav()]),
        "tts": lambda: chat(f"{TTS_PROMPT}\n{text(3, 8)}", AUDIO_PLACEHOLDER, [wav()]),
        "sqa": lambda: chat(
            AUDIO_PLACEHOLDER, f"{text(3, 8)}\n{AUDIO_PLACEHOLDER}", [wav(), wav()]
        ),
        "text": lambda: chat(text(3, 8), text(3, 8), []),
    }
    table = {}
    for task, make in makers.items():
        path = root / f"{task}.jsonl"
        path.write_text("".join(json.dumps(make()) + "\n" for _ in range(records)))
        table[task] = {"ratio": 1.0, "data_paths": [str(path.resolve())]}
    words = [*vocab, *ASR_PROMPT.split(), *TTS_PROMPT.split(), "user", "assistant", "system"]
    return {"dataset": table}, words


def make_tiny_assets(
    folder: str | Path, *, seed: int = 0, records: int = 8, **qwen2: Any
) -> dict[str, Any]:
    """A random tiny Qwen2 folder (word tokenizer) and a synthetic ASR/TTS/SQA/text dataset.

    Args:
        folder: Where to write ``model/`` and ``data/``.
        seed: Seed of the weights and of the data.
        records: Records per task.
        **qwen2: ``Qwen2Config`` fields (hidden_size, num_hidden_layers, ...).

    Returns:
        ``{"model": model folder, "mixture": mixture mapping}``.
    """
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from mctp.codecs import DummyCodec

    root = Path(folder)
    mixture, words = synthesize_dataset(root / "data", DummyCodec(), records=records, seed=seed)
    tok = make_word_tokenizer(words)
    torch.manual_seed(seed)
    fields = {"tie_word_embeddings": False, **qwen2, "vocab_size": len(tok)}
    model = Qwen2ForCausalLM(Qwen2Config(**fields))
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    return {"model": str(root / "model"), "mixture": mixture}
