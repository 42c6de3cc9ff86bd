"""examples/vita_audio/pipeline.py: the VITA-Audio preset of SpeechPipeline from an official folder."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM
from vita_audio.checkpoint import save_vita_audio
from vita_audio.model import VitaAudio
from vita_audio.pipeline import build_pipeline
from vita_audio.tiny import make_word_tokenizer

from mctp import MCTPStack
from mctp.backbones import HFBackbone, extend_vocab

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A random tiny official VITA-Audio folder (Qwen2 + 10 MCTP layers, 256 audio codes)."""
    tok = make_word_tokenizer(["hello", "world", "what", "is", "it", "user", "assistant"])
    torch.manual_seed(0)
    vocab_rows = -(-(len(tok) + 20 + 256) // 8) * 8
    cfg = Qwen2Config(
        vocab_size=vocab_rows,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
    )
    backbone = HFBackbone(Qwen2ForCausalLM(cfg))
    extend_vocab(tok, num_audio_tokens=256)
    stack = MCTPStack.from_backbone(backbone.parts(), 10)
    path = tmp_path_factory.mktemp("vita") / "VITA-Audio-Tiny"
    save_vita_audio(backbone, stack, path, tokenizer=tok, mtp_inference_mode=[1, 10, 4, 10])
    return path


def test_preset_generates_what_vita_audio_generates(folder):
    pipe = build_pipeline(model=folder, mode="vanilla", max_new_tokens=12)
    assert pipe.name == "VITA-Audio-Tiny" and pipe.stack.num_heads == 10
    res = pipe("hello world")
    llm = VitaAudio.from_pretrained(folder, mode="vanilla")
    ids = res.prompt_ids[None]
    chatml = "<|im_start|>user\nhello world<|im_end|>\n<|im_start|>assistant\n"
    assert ids[0].tolist() == llm.tokenizer(chatml, add_special_tokens=False).input_ids
    ref = llm.generate(ids, max_new_tokens=12, eos_token_id=pipe.eos_token_id)
    assert torch.equal(res.generation.tokens[0], ref.tokens[0])


def test_preset_default_mode_and_codec_folders(folder):
    pipe = build_pipeline(
        model=folder,
        tokenizer=FIXTURES / "glm4voice-tokenizer",
        decoder=FIXTURES / "glm4voice-decoder",
        max_new_tokens=8,
    )
    assert list(pipe.mode.ratio) == [1, 10, 4, 10]  # from the folder's generation config
    res = pipe(audio=FIXTURES / "sensevoice" / "inputs" / "en.wav")
    assert res.sample_rate == 22050 and res.num_tokens == 8


def test_preset_as_cli_builder(folder, tmp_path, capsys):
    from mctp.cli import main

    out = tmp_path / "a.wav"
    argv = ["speak", "--builder", "vita_audio.pipeline:build_pipeline", "--model", str(folder)]
    argv += ["--text", "hello world", "--mode", "vanilla", "--max-new-tokens", "6"]
    argv += ["--out", str(out), "--no-warmup", "--threads", "1"]
    threads = torch.get_num_threads()
    try:
        assert main(argv) == 0
    finally:
        torch.set_num_threads(threads)
    assert "mode [1, 0]" in capsys.readouterr().out and out.is_file()
