"""build_folder_pipeline / `mctp speak --model DIR`: a transformers folder + mctp_heads/ gives
the same answer as the same model built in memory."""

from __future__ import annotations

import pytest


def _save(folder, *, heads: bool = True):
    from mctp.speech.tiny import tiny_speech_lm

    backbone, stack, tok, _ = tiny_speech_lm()
    backbone.model.save_pretrained(folder)
    tok.save_pretrained(folder)
    if heads:
        stack.save_pretrained(folder / "mctp_heads")


@pytest.mark.parametrize("mode", ["boost", "vanilla"])
def test_a_saved_folder_answers_as_the_tiny_default(tmp_path, tiny, mode):
    from mctp.speech import build_folder_pipeline

    _save(tmp_path)
    pipe = build_folder_pipeline(model=tmp_path, num_threads=1)
    question = "what is the weather"
    ours, ref = pipe(question, mode=mode), tiny(question, mode=mode)
    assert ours.text == ref.text and ours.text
    assert ours.generation.tokens[0].tolist() == ref.generation.tokens[0].tolist()
    assert mode == "vanilla" or ours.generation.num_mctp_steps > 0
    assert ours.num_audio_tokens > 0


def test_the_cli_takes_a_model_folder(tmp_path, tiny, capsys):
    from mctp.cli import main

    _save(tmp_path)
    out = tmp_path / "answer.wav"
    main(["speak", "--text", "what is the weather", "--model", str(tmp_path), "--out", str(out)])
    assert out.stat().st_size > 44
    assert tiny("what is the weather").text in capsys.readouterr().out


def test_a_folder_without_heads_runs_vanilla_only(tmp_path, tiny):
    from mctp.speech import build_folder_pipeline

    _save(tmp_path, heads=False)
    pipe = build_folder_pipeline(model=tmp_path, mode="vanilla", num_threads=1)
    assert pipe.stack is None and pipe("what is the weather").text
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_folder_pipeline(model=tmp_path / "missing")


def test_building_the_tiny_model_leaves_the_callers_random_state_alone(tiny):
    import torch

    from mctp.speech.tiny import tiny_speech_lm

    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    tiny_speech_lm()
    assert torch.equal(torch.rand(3), expected)
