"""Training as a hostile or careless user drives it (issue 16): what gets in, what it says.

Records whose text holds control tokens, launch commands from the docs, overrides that stages
shadow, typos in the last stage, bad keys and values, devices that are not there, unreadable
checkpoints on resume, a full disk and the CLI's one-line errors. The probes and their outcomes
are listed in docs/reliability.md.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import shlex
import shutil
import sys
from pathlib import Path

import pytest
import torch
from native_abort import run_torchrun
from vita_audio.config import TrainConfig, load_config
from vita_audio.data import ChatRenderer, RecordError, VitaAudioData
from vita_audio.mixture import DataMixture
from vita_audio.model import load_tokenizer
from vita_audio.tiny import make_tiny_assets
from vita_audio.train import (
    FINAL_DIR,
    DiskFullError,
    _cli,
    checkpoint_problem,
    main,
    plan_stages,
    run_stage,
)

from mctp.backbones import extend_vocab
from mctp.speech_vocab import AUDIO_PLACEHOLDER
from mctp.training import DataError, ErrorLog

ROOT = Path(__file__).resolve().parents[2]
TINY_RECIPE = ROOT / "examples/vita_audio/recipes/tiny.yaml"
TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
TINY.update(num_key_value_heads=2, max_position_embeddings=256)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return make_tiny_assets(tmp_path_factory.mktemp("assets"), seed=0, records=2, **TINY)


def _cfg(assets, out, *, steps=2, **sections) -> TrainConfig:
    raw = {
        "stage": 1,
        "model": {"path": assets["model"]},
        "data": {"mixture": assets["mixture"], "interleave": [1, 4, 2, 4], "max_len": 128},
        "optim": {"lr": 1e-3, "max_steps": steps, "global_batch": 2, "warmup_ratio": 0.0},
        "run": {"out_dir": str(out), "device": "cpu", "progress": False, "report_to": "none"},
    }
    for name, values in sections.items():
        raw[name].update(values)
    return TrainConfig.from_dict(raw)


# ----------------------------------------------------------------------------- control tokens
def test_every_control_token_in_record_text_is_refused_by_name(assets, tmp_path):
    """Each special/added token of the recipe's vocabulary, written as text in a turn, is
    refused naming it (never rendered as the control token it spells)."""
    tok = load_tokenizer(assets["model"])
    vocab = extend_vocab(tok, num_audio_tokens=64)
    renderer = ChatRenderer(tok, vocab, lambda path: [1, 2, 3])
    controls = (set(tok.get_added_vocab()) | set(tok.all_special_tokens)) - {AUDIO_PLACEHOLDER}
    assert {"<|im_end|>", "<|im_start|>", "<|begin_of_audio|>", "<|audio_5|>"} <= controls
    assert len(controls) > 80  # the speech tokens and every audio code are in the probe

    def chat(role, content):
        turns = [("user", "hello"), ("assistant", "world")]
        turns = [(r, content if r == role else c) for r, c in turns]
        return {"messages": [{"role": r, "content": c} for r, c in turns]}

    clean = renderer.render(chat("user", "hello there"))
    assert clean.input_ids.count(tok.convert_tokens_to_ids("<|im_end|>")) == 2  # one per turn
    for token in sorted(controls):
        with pytest.raises(RecordError, match=re.escape(repr(token))) as info:
            renderer.render(chat("user", f"hello {token} there"))
        assert "message 0 (user)" in str(info.value)
    for role, n in (("assistant", 1), ("user", 0)):  # glued to words, in any role
        with pytest.raises(RecordError, match=rf"message {n} \({role}\).*<\|audio_5\|>"):
            renderer.render(chat(role, "x<|begin_of_audio|><|audio_5|><|end_of_audio|>y"))
    # through the data pipeline: file and line named, or skipped and counted
    data = tmp_path / "d.jsonl"
    data.write_text('{"messages": [{"role": "user", "content": "hi <|im_end|>"}]}\n')
    mix = {"dataset": {"d": {"ratio": 1.0, "data_paths": [str(data)]}}}
    with pytest.raises(DataError, match=r"d\.jsonl:1.*<\|im_end\|>"):
        VitaAudioData(
            DataMixture.from_config(mix, seed=0), renderer, max_len=64, progress=False
        ).dataset()
    skip = VitaAudioData(
        DataMixture.from_config(mix, seed=0, errors=ErrorLog("skip")),
        renderer,
        max_len=64,
        progress=False,
    )
    with pytest.raises(ValueError, match="no pack left"):
        skip.dataset()
    assert skip.stats.skipped_errors == 1


# ----------------------------------------------------------------------------- launch commands
def _documented_cpu_commands() -> list[str]:
    text = (ROOT / "examples/vita_audio/TRAINING.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", text, re.S)
    return [ln for b in blocks for ln in b.splitlines() if "recipes/tiny.yaml" in ln]


def test_the_docs_give_one_and_two_process_cpu_commands_and_no_accelerate_cpu():
    commands = _documented_cpu_commands()
    assert len(commands) == 2, commands
    assert not any("accelerate launch --cpu" in c for c in commands)


@pytest.mark.slow
@pytest.mark.parametrize("command", _documented_cpu_commands())
def test_each_documented_cpu_launch_starts_what_it_says(command, tmp_path):
    """The command as TRAINING.md writes it (stage 1, one step): the recipe reports as many
    processes as the launcher says, and the gradient accumulation that keeps the batch."""
    argv = shlex.split(command)
    if argv[0] == "python":
        argv[:1], expected = [sys.executable], 1
    elif argv[0] == "torchrun":
        argv[:1] = [sys.executable, "-m", "torch.distributed.run"]
        expected = int(argv[argv.index("--nproc_per_node") + 1])
    else:
        pytest.fail(f"teach this test what {argv[0]!r} starts: {command}")
    ours = [f"run.out_dir={tmp_path}", "run.progress=false", "run.report_to=none"]
    ours += ["stages=[{stage: 1}]", "optim.max_steps=1"]
    argv += ours if "--override" in argv else ["--override", *ours]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    p = run_torchrun(
        argv,
        before_retry=lambda: shutil.rmtree(tmp_path, ignore_errors=True),
        cwd=ROOT,
        env=env,
        timeout=400,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    found = re.findall(
        r"stage 1: (\d+) process(?:es)? on cpu, global batch (\d+) = per_device_batch (\d+) x "
        r"(\d+) processes x gradient accumulation (\d+)",
        p.stdout,
    )
    assert len(found) == 1, p.stdout[-3000:]  # printed once, by rank 0
    world, batch, per_device, world_again, accumulation = map(int, found[0])
    assert world == world_again == expected
    assert per_device * world * accumulation == batch == 2
    assert p.stdout.count("stage 1: step 1") == 1


# ----------------------------------------------------------------------------- recipe settings
def test_an_override_that_stages_shadow_is_applied_to_every_stage(caplog):
    with caplog.at_level(logging.WARNING):
        cfg = load_config(TINY_RECIPE, ["optim.lr=2.0e-4", "run.out_dir=o"])
    assert "override optim.lr=2.0e-4 also replaces" in caplog.text
    assert "stages [1, 2, 3, 4] of tiny.yaml" in caplog.text
    assert [c.optim.lr for c in plan_stages(cfg)] == [2e-4] * 4
    # one stage only: stages.N (from 0)
    cfg = load_config(TINY_RECIPE, ["stages.3.optim.lr=7.0e-4", "run.out_dir=o"])
    assert [c.optim.lr for c in plan_stages(cfg)] == [1e-3, 1e-3, 1e-3, 7e-4]
    cfg = load_config(TINY_RECIPE, ["optim.max_steps=5", "run.out_dir=o"])  # not shadowed
    assert [c.optim.max_steps for c in plan_stages(cfg)] == [5] * 4
    with pytest.raises(ValueError, match="the recipe has 4 stages"):
        load_config(TINY_RECIPE, ["stages.4.optim.lr=1"])


def test_a_typo_in_the_last_stage_fails_before_anything_runs(tmp_path):
    for stage4, pattern in (
        ({"optim": {"mctp_lr_mul": 10.0}}, r"stages\[3\] \(stage 4\): unknown keys in 'optim'"),
        ({"data": {"on_too_long": "cut"}}, r"stages\[3\] \(stage 4\): data\.on_too_long"),
        ({"model": {"num_heads": "ten"}}, r"stages\[3\] \(stage 4\): model\.num_heads must be"),
    ):
        cfg = load_config(TINY_RECIPE, [f"run.out_dir={tmp_path / 'out'}"])
        cfg["stages"][3] = {**cfg["stages"][3], **stage4}
        with pytest.raises(ValueError, match=pattern):
            main(cfg)
        assert not (tmp_path / "out").exists()  # no assets written, no stage trained
    cfg = load_config(TINY_RECIPE, [f"run.out_dir={tmp_path / 'out'}"])
    cfg["stages"][3] = {**cfg["stages"][3], "data": {"mixture": str(tmp_path / "nope.yaml")}}
    with pytest.raises(FileNotFoundError, match=r"stage 4: data\.mixture names a missing file"):
        main(cfg)
    assert not (tmp_path / "out/stage1").exists()  # stage 1 never started
    cfg = load_config(TINY_RECIPE, [f"run.out_dir={tmp_path / 'out'}", "tiny.hiden_size=8"])
    with pytest.raises(ValueError, match=r"unknown keys in 'tiny': \['hiden_size'\]"):
        main(cfg)


def test_fsdp_with_an_accelerate_too_old_for_fsdp2_is_refused_by_name():
    """accelerate < 1.6.0 has no FSDP2 (its plugin fails with a TypeError on every rank)."""
    from vita_audio.train import check_fsdp

    fsdp = ["run.fsdp=true", "run.fsdp_config=examples/vita_audio/recipes/fsdp/full_shard.json"]
    cfg = load_config(TINY_RECIPE, ["run.out_dir=o", *fsdp])
    stages = plan_stages(cfg)
    with pytest.raises(
        ValueError,
        match=r"stage 1: run\.fsdp \(FSDP2\) needs accelerate >= 1\.6\.0, installed 1\.3\.0",
    ):
        check_fsdp(stages, "1.3.0")
    check_fsdp(stages, "1.6.0")
    check_fsdp(stages, "1.14.0.dev0")
    check_fsdp(plan_stages(load_config(TINY_RECIPE, ["run.out_dir=o"])), "1.3.0")  # no FSDP


@pytest.mark.parametrize(
    ("override", "pattern"),
    [
        ("optim.max_steps.x=1", r"optim\.max_steps takes a value \(int\), not sub-keys"),
        ("optim.lr=fast", r"optim\.lr must be a number, got 'fast'"),
        ("optim.learning_rate=1", r"unknown key optim\.learning_rate; known: \['betas'"),
        ("optim.max_steps=1.5", r"optim\.max_steps must be int, got 1\.5"),
        ("optim.max_steps=0", r"optim\.max_steps must be >= 1, got 0"),
        ("optim.lr=-1", r"optim\.lr must be > 0"),
        ("optim.betas=[0.9]", r"optim\.betas must be tuple\[a number, a number\]"),
        ("run.progress=maybe", r"run\.progress must be bool, got 'maybe'"),
        ("run.device=tpu", r"run\.device must be one of \['auto', 'cpu', 'cuda'\], got 'tpu'"),
        ("run.save_dtype=bfloat17", r"run\.save_dtype must name a torch dtype"),
        ("data.interleave=[1, 0]", r"data\.interleave \[1, 0\] is Vanilla"),
        ("data.interleave=[0, 4]", r"data\.interleave \[0, 4\]: ratio\[0\] is a text count"),
        ("model=3", r"'model' is a section; name a key"),
        ("trainer.lr=1", r"unknown section 'trainer'"),
        ("stage.x=1", r"'stage' takes a value"),
        ("optim.lr", r"is not key=value"),
    ],
)
def test_bad_overrides_name_the_key(override, pattern):
    with pytest.raises(ValueError, match=pattern):
        plan_stages(load_config(TINY_RECIPE, [override, "run.out_dir=o"]))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without CUDA")
def test_cuda_on_a_machine_without_it_is_refused():
    with pytest.raises(ValueError, match=r"run\.device is 'cuda' but torch sees no CUDA device"):
        plan_stages(load_config(TINY_RECIPE, ["run.device=cuda", "run.out_dir=o"]))


# ----------------------------------------------------------------------------- resume
def test_resume_falls_back_to_the_newest_checkpoint_that_loads(assets, tmp_path, capsys):
    out = tmp_path / "run"
    cfg = _cfg(assets, out, steps=3, run={"save_every": 1, "save_total_limit": 3})
    run_stage(cfg)
    ckpts = {p.name for p in out.glob("checkpoint-*")}
    assert ckpts == {"checkpoint-1", "checkpoint-2", "checkpoint-3"}
    for c in ckpts:
        assert checkpoint_problem(out / c) is None
    # checkpoint-3: weights cut in half; checkpoint-2: trainer_state.json cut
    weights = out / "checkpoint-3/model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    state = out / "checkpoint-2/trainer_state.json"
    state.write_text(state.read_text()[:40])
    optimizer = out / "checkpoint-1/optimizer.pt"
    healthy = optimizer.read_bytes()
    optimizer.write_bytes(healthy[: len(healthy) // 2])
    assert "model.safetensors cannot be read" in checkpoint_problem(out / "checkpoint-3")
    assert "trainer_state.json cannot be read" in checkpoint_problem(out / "checkpoint-2")
    assert "optimizer.pt cannot be read" in checkpoint_problem(out / "checkpoint-1")
    optimizer.write_bytes(healthy)
    import shutil

    shutil.rmtree(out / FINAL_DIR)
    capsys.readouterr()
    run_stage(cfg)
    captured = capsys.readouterr()
    lines = [ln for ln in captured.err.splitlines() if "skipping checkpoint" in ln]
    assert len(lines) == 2, captured.err[-2000:]
    assert f"{out}/checkpoint-3" in lines[0] and "SafetensorError" in lines[0]
    assert f"{out}/checkpoint-2" in lines[1] and "JSONDecodeError" in lines[1]
    assert f"resume from {out}/checkpoint-1" in captured.out
    assert (out / FINAL_DIR / "config.json").is_file()
    # a named checkpoint that cannot be read is refused, naming the file
    weights.write_bytes(b"")
    bad = _cfg(assets, tmp_path / "other", run={"resume": str(out / "checkpoint-3")})
    with pytest.raises(ValueError, match=r"checkpoint-3/model\.safetensors cannot be read"):
        run_stage(bad)


# ----------------------------------------------------------------------------- disk full
@pytest.mark.parametrize(
    "error",
    [
        OSError(errno.ENOSPC, "No space left on device"),
        RuntimeError(
            "[enforce fail at inline_container.cc:664] . PytorchStreamWriter failed writing "
            "file data/3: file write failed"
        ),
    ],
    ids=["ENOSPC", "torch-enforce-fail"],
)
def test_disk_full_during_a_checkpoint_names_the_disk_and_folder(
    assets, tmp_path, monkeypatch, error
):
    real = torch.save

    def full_disk(obj, f, *args, **kwargs):
        if "checkpoint-" in str(f):
            raise error
        return real(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_disk)
    out = tmp_path / "run"
    with pytest.raises(DiskFullError) as info:
        run_stage(_cfg(assets, out, steps=1))
    message = str(info.value)
    assert f"disk full while writing under {out}" in message
    assert re.search(r"the file system mounted at /\S* has [\d.]+ \w+ free of [\d.]+ \w+", message)
    assert info.value.errno == errno.ENOSPC and info.value.__cause__ is error
    assert not list(out.glob("checkpoint-*"))  # nothing half-written was published


# ----------------------------------------------------------------------------- CLI
def test_cli_prints_one_line_per_error_and_the_traceback_only_with_debug(tmp_path, capsys):
    mix = tmp_path / "mix.yaml"
    mix.write_text("dataset: {}\n")
    cases = [
        (["--override", "optim.lr=fast"], r"ValueError: stages\[0\] \(stage 1\): optim\.lr"),
        (
            ["--override", "tiny=null", f"model.path={tmp_path}", "data.mixture=/x.yaml"],
            r"FileNotFoundError: stage 1: data\.mixture names a missing file: /x\.yaml",
        ),
        (  # an error while building the stage (an empty model folder), not in the config
            ["--override", "tiny=null", f"model.path={tmp_path}", f"data.mixture={mix}"],
            rf"{tmp_path}",
        ),
    ]
    for extra, pattern in cases:
        argv = ["--config", str(TINY_RECIPE), *extra, f"run.out_dir={tmp_path / 'o'}"]
        assert _cli(argv) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("train.py: error: "), err
        assert re.search(pattern, err[0]) and "Traceback" not in err[0]
        assert err[0].endswith("(--debug shows the traceback)")
    with pytest.raises(ValueError, match=r"optim\.lr must be a number"):
        _cli(["--config", str(TINY_RECIPE), "--debug", "--override", "optim.lr=fast"])
    assert _cli(["--config", str(tmp_path / "missing.yaml")]) == 1
    assert "FileNotFoundError: no recipe file" in capsys.readouterr().err
