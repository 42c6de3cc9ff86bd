"""MCTP heads on a frozen GLM-4-Voice (tiny fake): self-distillation, stages 2 then 3, and
generation with untagged Turbo-like schedules, plain and verified."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from glm4_voice.model import GLM4Voice, first_audio
from glm4_voice.tiny import make_tiny_glm4_voice
from glm4_voice.train import DistillConfig, distill, train_heads
from glm4_voice.vocab import check_schedule, native_schedule, turbo_schedule

from mctp.interleave import InterleaveSchedule


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[GLM4Voice, Path]:
    root = tmp_path_factory.mktemp("glm4v_train")
    folder = make_tiny_glm4_voice(root / "model", seed=1)
    llm = GLM4Voice.from_pretrained(folder)
    frozen = {k: v.clone() for k, v in llm.backbone.state_dict().items()}
    rows = distill(llm, ["w1 w2", "w5", "w7 w8 w9"], max_new_tokens=40)
    cfg = DistillConfig(
        num_heads=3, stage2_steps=3, stage3_steps=3, lr=2e-3, batch_size=3, logging_steps=100
    )
    train_heads(llm, rows, cfg)
    after = llm.backbone.state_dict()
    assert all(torch.equal(frozen[k], after[k]) for k in frozen)  # the backbone stayed frozen
    llm.stack.save_pretrained(root / "heads")
    return llm, folder


def test_heads_grow_from_one_to_n(trained: tuple[GLM4Voice, Path]) -> None:
    llm, _ = trained
    assert llm.num_heads == 3
    assert type(llm.stack.heads[0].block).__name__ == "GlmDecoderLayer"


def test_verified_equals_vanilla_with_partial_acceptance(trained: tuple[GLM4Voice, Path]) -> None:
    llm, _ = trained
    ids = llm.encode("w3 w4")
    van = llm.generate(ids, max_new_tokens=40)
    ver = llm.generate(ids, mode=llm.turbo_schedule(), max_new_tokens=40, verify=True)
    assert ver.tokens[0].tolist() == van.tokens[0].tolist()
    assert 0 < ver.num_accepted < ver.num_drafted
    assert ver.num_backbone_forwards < van.num_backbone_forwards


def test_heads_emit_the_audio_runs(trained: tuple[GLM4Voice, Path]) -> None:
    llm, _ = trained
    ids = llm.encode("w3 w4")
    van = llm.generate(ids, max_new_tokens=40)
    raw = llm.generate(ids, mode=llm.turbo_schedule(), max_new_tokens=40)
    heads = raw.sources[0] >= 0
    audio = llm.vocab.is_audio(raw.tokens[0])
    assert bool((heads & audio).any())  # MCTP heads speak
    before_v, ready_v, _ = first_audio(van, llm.vocab, block=4)
    _, ready_r, _ = first_audio(raw, llm.vocab, block=4)
    assert before_v is not None and ready_v is not None and ready_r is not None
    cost = llm.turbo_schedule().cost(ready_r)[0]
    assert cost < ready_v  # fewer backbone forwards until the first audio block


def test_saved_heads_reload(trained: tuple[GLM4Voice, Path]) -> None:
    llm, folder = trained
    again = GLM4Voice.from_pretrained(folder, heads=folder.parent / "heads")
    ids = llm.encode("w6")
    s = again.turbo_schedule()
    a = llm.generate(ids, mode=s, max_new_tokens=20).tokens[0]
    b = again.generate(ids, mode=s, max_new_tokens=20).tokens[0]
    assert a.tolist() == b.tolist()


def test_schedules_that_do_not_fit_are_refused(trained: tuple[GLM4Voice, Path]) -> None:
    llm, _ = trained
    ids = llm.encode("w6")
    with pytest.raises(ValueError, match="BOA/EOA tags"):
        llm.generate(ids, mode=InterleaveSchedule([1, 3]))
    with pytest.raises(ValueError, match="VITA-Audio preset"):
        llm.generate(ids, mode="boost")
    with pytest.raises(ValueError, match=r"audio range \(0, 64\) does not fit"):
        llm.generate(ids, mode=InterleaveSchedule([1, 3], tagged=False, audio_range=(0, 64)))
    with pytest.raises(ValueError, match="runs 26 MCTP heads in a row, the model has 3"):
        check_schedule(native_schedule(llm.vocab), llm.vocab, llm.num_heads)
    assert check_schedule(turbo_schedule(llm.vocab, 3), llm.vocab, 3).ratio == (1, 3)
