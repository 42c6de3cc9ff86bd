"""``mctp speak --out`` checked before the model loads and answers."""

from __future__ import annotations

import os

import pytest

from mctp.cli import main


def _speak(capsys, out) -> str:
    assert main(["speak", "--text", "hello", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "model ready" not in err  # refused before the model was built
    return err


def test_out_is_a_directory(tmp_path, capsys):
    err = _speak(capsys, tmp_path)
    assert f"--out {tmp_path}: is a directory" in err and "answer.wav" in err


def test_out_in_a_read_only_place(tmp_path, capsys):
    err = _speak(capsys, "/sys/mctp-probe/answer.wav")  # sysfs: read-only even for root
    assert "cannot create the folder /sys/mctp-probe" in err


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_out_in_a_read_only_folder(tmp_path, capsys):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        assert "cannot write into" in _speak(capsys, folder / "answer.wav")
    finally:
        folder.chmod(0o700)


def test_out_with_an_unknown_format(tmp_path, capsys):
    assert "unknown audio format '.mp9'" in _speak(capsys, tmp_path / "answer.mp9")
    assert "(no extension)" in _speak(capsys, tmp_path / "answer")


def test_a_prompt_over_max_len_is_refused_before_the_warm_up(tmp_path, capsys, monkeypatch):
    from mctp.speech import SpeechPipeline

    warmed: list = []
    monkeypatch.setattr(SpeechPipeline, "warmup", lambda self, *a, **k: warmed.append(1))
    args = ["speak", "--text", "hello there", "--max-len", "16", "--out", str(tmp_path / "a.wav")]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "max_len=16" in err and "max_new_tokens" in err
    assert not warmed and "model ready" not in err
    assert not (tmp_path / "a.wav").exists()
