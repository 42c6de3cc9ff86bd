"""GLM-4-Voice as a SpeechPipeline and an ``mctp speak``/``mctp serve`` builder (tiny fake)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from glm4_voice.model import GLM4Voice
from glm4_voice.pipeline import build_pipeline
from glm4_voice.tiny import make_tiny_glm4_voice

from mctp import MCTPStack
from mctp.codecs import DummyCodec
from mctp.interleave import InterleaveSchedule


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    f = make_tiny_glm4_voice(tmp_path_factory.mktemp("glm4v_pipe") / "model", seed=2)
    llm = GLM4Voice.from_pretrained(f)
    torch.manual_seed(0)
    MCTPStack.from_backbone(llm.backbone.parts(), 3).save_pretrained(f / "mctp_heads")
    return f


def test_spoken_answer_holds_every_generated_audio_token(folder: Path) -> None:
    pipe = build_pipeline(model=folder, max_new_tokens=40)
    assert pipe.stack is not None and pipe.mode.ratio == (1, 3) and not pipe.mode.tagged
    res = pipe("w1 w2")
    toks = res.generation.tokens[0]
    lo, hi = pipe.vocab.audio_range
    audio = toks[(toks >= lo) & (toks < hi)] - lo
    assert res.num_audio_tokens == audio.numel() > 0
    heard = DummyCodec(codebook_size=pipe.vocab.num_audio).encode([res.audio])[0]
    assert heard.tolist() == audio.tolist()  # the decoder got exactly the model's audio
    assert res.text and "<|" not in res.text


def test_speech_input_is_wrapped_in_audio_tags(folder: Path) -> None:
    pipe = build_pipeline(model=folder, mode="vanilla", max_new_tokens=4)
    codec = pipe.audio_tokenizer
    wav = codec.decode(torch.tensor([3, 1, 4]))
    res = pipe(audio=wav, sample_rate=codec.sample_rate)
    ids = res.prompt_ids.tolist()
    v = pipe.vocab
    i = ids.index(v.boa)
    assert ids[i : i + 5] == [v.boa, v.audio_start + 3, v.audio_start + 1, v.audio_start + 4, v.eoa]
    assert ids[i + 5] == v.special["<|assistant|>"]


def test_modes_that_do_not_fit_are_refused(folder: Path) -> None:
    pipe = build_pipeline(model=folder, max_new_tokens=4)
    with pytest.raises(ValueError, match="does not fit GLM-4-Voice"):
        pipe("w1", mode="boost")
    with pytest.raises(ValueError, match="26 MCTP heads in a row, the model has 3"):
        pipe("w1", mode="native")
    with pytest.raises(ValueError, match="BOA/EOA tags"):
        pipe("w1", mode=InterleaveSchedule([1, 2]))


def test_cli_builder(folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from mctp.cli import main

    out = tmp_path / "a.wav"
    argv = ["speak", "--builder", "glm4_voice.pipeline:build_pipeline", "--model", str(folder)]
    argv += ["--text", "w3 w4", "--mode", "turbo", "--max-new-tokens", "30"]
    argv += ["--out", str(out), "--no-warmup", "--threads", "1"]
    threads = torch.get_num_threads()
    try:
        assert main(argv) == 0
    finally:
        torch.set_num_threads(threads)
    assert "mode [1, 3]" in capsys.readouterr().out and out.is_file()
