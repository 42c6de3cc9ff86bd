"""Generator and GenerationConfig: validation, reuse, threads, verified schedules, streamers."""

from __future__ import annotations

import json
import math
import threading

import pytest
import torch

from mctp import EngineConfig, GenerationConfig, Generator, MCTPStack, SamplingConfig, generate
from mctp.backbones import HFBackbone
from mctp.engine.generation_config import split_options
from mctp.interleave import InterleaveSchedule


@pytest.fixture(scope="module")
def model(tiny_hf):
    bb = HFBackbone(tiny_hf("qwen2"))
    stack = MCTPStack.from_backbone(bb.parts(), 10)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for p in stack.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return bb, stack.eval()


# --------------------------------------------------------------------------- config
@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"mode": "fast"}, ValueError, "unknown mode 'fast'"),
        ({"mode": 3}, TypeError, "mode must be"),
        ({"max_new_tokens": 0}, ValueError, "max_new_tokens must be >= 1"),
        ({"max_new_tokens": 2.5}, TypeError, "max_new_tokens must be an int"),
        ({"max_new_tokens": True}, TypeError, "max_new_tokens must be an int"),
        ({"eos_token_id": -2}, ValueError, "eos_token_id must be >= 0"),
        ({"eos_token_id": 2.0}, TypeError, "eos_token_id must be int"),
        ({"verify": 1}, TypeError, "verify must be a bool"),
        ({"draft_len": 3}, ValueError, "only applies with verify=True"),
        ({"verify": True, "draft_len": 0}, ValueError, "draft_len must be >= 1"),
        ({"verify": True, "draft_len": 3, "mode": "boost"}, ValueError, "drafts its own"),
        (
            {"verify": True, "text_sampling": SamplingConfig(do_sample=True)},
            ValueError,
            "greedy decoding only",
        ),
        ({"text_sampling": {"do_sample": True}}, TypeError, "must be a SamplingConfig"),
    ],
)
def test_generation_config_rejects_bad_values(kwargs, error, match):
    with pytest.raises(error, match=match):
        GenerationConfig(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"window": 0}, ValueError, "window must be >= 1"),
        ({"stop_check_every": 0}, ValueError, "stop_check_every must be >= 1"),
        ({"prefill_windows": -1}, ValueError, "prefill_windows must be >= 0"),
        ({"compile_options": 3}, TypeError, "compile_options must be a mapping"),
        ({"max_batch": 0}, ValueError, "max_batch must be >= 1"),
        ({"max_len": 1}, ValueError, "max_len must be >= 2"),
        ({"dtype": "int8"}, ValueError, "dtype must be one of"),
        ({"device": "tpu9"}, ValueError, "is not a torch device"),
        ({"compile": "yes"}, TypeError, "compile must be a bool"),
        ({"audio_heads": 1}, TypeError, "audio_heads must be a bool"),
    ],
)
def test_engine_config_rejects_bad_values(kwargs, error, match):
    with pytest.raises(error, match=match):
        EngineConfig(**kwargs)


def test_options_split_by_name_between_engine_and_request():
    eng, cfg = split_options({"mode": "turbo", "compile": {"backend": "eager"}, "window": 11})
    assert (eng.compile, dict(eng.compile_options), eng.window) == (True, {"backend": "eager"}, 11)
    assert cfg.schedule == InterleaveSchedule.turbo()
    with pytest.raises(TypeError, match=r"unknown generation option\(s\) \['windw'\]"):
        split_options({"windw": 3})
    assert EngineConfig(dtype="bf16").dtype == "bfloat16"
    assert EngineConfig(dtype=torch.bfloat16).torch_dtype is torch.bfloat16
    with pytest.raises(TypeError, match="unknown engine setting"):
        Generator(None, None, GenerationConfig(mode="vanilla"), mode="turbo")  # type: ignore[arg-type]


def test_generation_config_is_frozen_and_replace_validates():
    cfg = GenerationConfig(mode="turbo", eos_token_id=[2, 3])
    assert cfg.schedule == InterleaveSchedule.turbo() and cfg.eos_token_id == (2, 3)
    with pytest.raises(AttributeError):
        cfg.max_new_tokens = 5  # type: ignore[misc]
    eng = EngineConfig(compile=True, compile_options={"backend": "eager"})
    with pytest.raises(TypeError):
        eng.compile_options["backend"] = "inductor"  # type: ignore[index]
    assert cfg.replace(max_new_tokens=5).max_new_tokens == 5
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1"):
        cfg.replace(max_new_tokens=-1)
    assert cfg.to_dict()["mode"] == "turbo" and cfg.to_dict()["eos_token_id"] == [2, 3]
    import copy
    import pickle

    again = pickle.loads(pickle.dumps(cfg))
    assert again == cfg and copy.deepcopy(cfg) == cfg
    eng_again = pickle.loads(pickle.dumps(eng))
    assert eng_again == eng and copy.deepcopy(eng) == eng
    assert eng_again.compile_options["backend"] == "eager"


def test_generation_config_from_pretrained(tmp_path):
    (tmp_path / "generation_config.json").write_text(
        json.dumps(
            {
                "do_sample": True,
                "temperature": 0.7,
                "top_p": 0.9,
                "repetition_penalty": 1.05,
                "max_new_tokens": 512,
                "eos_token_id": [151645, 151643],
                "pad_token_id": 151643,
                "mtp_inference_mode": [1, 10, 4, 10],
                "transformers_version": "4.45.0",
            }
        )
    )
    cfg = GenerationConfig.from_pretrained(tmp_path, verify=False)
    assert cfg.schedule == InterleaveSchedule.boost()
    assert cfg.text_sampling == SamplingConfig(
        do_sample=True, temperature=0.7, top_p=0.9, repetition_penalty=1.05
    )
    assert (cfg.max_new_tokens, cfg.eos_token_id, cfg.pad_id) == (512, (151645, 151643), 151643)
    # greedy files often carry a temperature transformers ignores: so do we
    (tmp_path / "generation_config.json").write_text('{"do_sample": false, "temperature": 0.0}')
    assert GenerationConfig.from_pretrained(tmp_path).text_sampling == SamplingConfig()
    (tmp_path / "generation_config.json").write_text('{"max_new_tokens": 0}')
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1"):
        GenerationConfig.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="no generation_config"):
        GenerationConfig.from_pretrained(tmp_path / "missing")


@pytest.mark.parametrize("field", ["temperature", "top_p", "repetition_penalty"])
@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_sampling_config_rejects_nan_and_inf(field, value):
    with pytest.raises(ValueError, match=f"{field} must be a finite number"):
        SamplingConfig(do_sample=True, **{field: value})


# --------------------------------------------------------------------------- inputs
@pytest.mark.parametrize("dtype", [torch.bool, torch.float32, torch.float16])
def test_non_integer_input_ids_are_rejected(model, dtype):
    bb, _ = model
    ids = torch.ones(1, 5, dtype=dtype)
    with pytest.raises(TypeError, match="input_ids must hold integer token ids"):
        generate(bb, None, ids, "vanilla", 3)


def test_int32_input_ids_work(model):
    bb, _ = model
    ids = torch.randint(3, 128, (1, 5))
    ref = generate(bb, None, ids, "vanilla", 6)
    assert torch.equal(generate(bb, None, ids.int(), "vanilla", 6).sequences, ref.sequences)


def test_generator_checks_its_stack_and_vocab(model):
    bb, stack = model
    with pytest.raises(ValueError, match="uses MCTP heads but no stack"):
        Generator(bb, None, GenerationConfig(mode="boost"))
    with pytest.raises(ValueError, match="verify=True uses MCTP heads but no stack"):
        Generator(bb, None, GenerationConfig(mode="vanilla", verify=True))
    with pytest.raises(ValueError, match="audio_heads=True needs speech ids"):
        Generator(bb, stack, GenerationConfig(), audio_heads=True)
    with pytest.raises(ValueError, match=r"draft_len must be in \[1, 10\]"):
        Generator(bb, stack, GenerationConfig(mode="vanilla", verify=True, draft_len=11))
    gen = Generator(bb, None, GenerationConfig(mode="vanilla", max_new_tokens=4), max_len=32)
    with pytest.raises(ValueError, match="streaming needs vocab="):
        gen.stream(torch.randint(3, 128, (1, 5)))


# --------------------------------------------------------------------------- verified
@pytest.mark.parametrize("mode", ["balance", "boost", "turbo"])
def test_verified_schedule_drafts_its_runs_and_equals_vanilla(toy, mode):
    """verify=True with a schedule: the heads draft that schedule's MCTP runs (not Vanilla's
    draft_len), the backbone keeps what it agrees with: Vanilla's tokens exactly."""
    van = generate(toy.backbone, None, toy.prompt, "vanilla", 50)
    ver = generate(toy.backbone, toy.stack, toy.prompt, mode, 50, verify=True)
    assert ver.tokens[0].tolist() == van.tokens[0].tolist()
    assert ver.num_drafted > 0 and ver.num_accepted > 0
    # the first cycle drafts the schedule's first run exactly (the trained heads agree)
    run = InterleaveSchedule.from_mode(mode).run_length(0)
    assert ver.sources[0][1 : 1 + run].tolist() == list(range(run))
    assert ver.num_backbone_forwards < van.num_backbone_forwards


def test_verified_schedule_on_the_fast_path(toy):
    van = generate(toy.backbone, None, toy.prompt, "vanilla", 40)
    fast = generate(
        toy.backbone, toy.stack, toy.prompt, "turbo", 40, verify=True, compile={"backend": "eager"}
    )
    assert fast.tokens[0].tolist() == van.tokens[0].tolist()


# --------------------------------------------------------------------------- threads
def test_a_generator_refuses_a_second_thread(toy):
    """While one thread holds the Generator (an open stream), a call from another thread
    raises at once instead of corrupting the shared state; afterwards it works again."""
    cfg = GenerationConfig(mode="boost", max_new_tokens=40, eos_token_id=2)
    gen = Generator(toy.backbone, toy.stack, cfg, max_len=80, vocab=toy.vocab)
    stream = gen.stream(toy.prompt)
    next(stream)  # the stream now holds the Generator
    errors: list[BaseException] = []

    def other() -> None:
        try:
            gen.generate(toy.prompt)
        except BaseException as e:  # collected for the assertion
            errors.append(e)

    t = threading.Thread(target=other)
    t.start()
    t.join()
    assert len(errors) == 1 and isinstance(errors[0], RuntimeError)
    assert "already running a call" in str(errors[0])
    with pytest.raises(RuntimeError, match="already running a call"):
        gen.reset()
    rest = list(stream)
    assert rest[-1].result.tokens[0].tolist() == toy.answer
    assert gen.generate(toy.prompt).tokens[0].tolist() == toy.answer


def test_racing_threads_get_right_tokens_or_a_clear_error(toy):
    cfg = GenerationConfig(mode="turbo", max_new_tokens=30, eos_token_id=2)
    gen = Generator(toy.backbone, toy.stack, cfg, max_len=80)
    start = threading.Barrier(4)
    outcomes: list[object] = []

    def work() -> None:
        start.wait()
        for _ in range(3):
            try:
                outcomes.append(gen.generate(toy.prompt).tokens[0].tolist())
            except RuntimeError as e:
                outcomes.append(e)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(outcomes) == 12
    for out in outcomes:
        if isinstance(out, RuntimeError):
            assert "already running a call" in str(out)
        else:
            assert out == toy.answer[:30]


# --------------------------------------------------------------------------- streamers
def _word_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(128)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok)


def test_transformers_text_iterator_streamer_gets_the_text_tokens(toy):
    from transformers import TextIteratorStreamer

    tok = _word_tokenizer()
    streamer = TextIteratorStreamer(tok, skip_prompt=True)
    res = generate(
        toy.backbone,
        toy.stack,
        toy.prompt,
        "boost",
        80,
        vocab=toy.vocab,
        eos_token_id=2,
        streamer=streamer,
    )
    assert res.tokens[0].tolist() == toy.answer
    text_ids = [t for t in toy.answer if t < 99 or t == 2]  # not BOA/EOA/audio
    assert "".join(streamer).split() == tok.decode(text_ids).split()


def test_streamer_needs_batch_size_one(model):
    from transformers import TextStreamer

    bb, _ = model
    with pytest.raises(ValueError, match="streamer= needs batch size 1"):
        generate(bb, None, torch.randint(3, 128, (2, 4)), "vanilla", 3, streamer=TextStreamer(None))


def test_columns_padded_in_every_row_are_skipped_and_change_no_answer(toy, monkeypatch):
    """Leading columns that are padding in every row (a cohort's room) are never computed:
    the prefill starts after them, attention skips them, and the answers are the lone ones."""
    from mctp import generate

    cfg = GenerationConfig(mode="boost", max_new_tokens=30)
    other = toy.prompt[:, 2:]
    lone = [generate(toy.backbone, toy.stack, p, config=cfg, vocab=toy.vocab).tokens[0].tolist()
            for p in (toy.prompt, other)]  # fmt: skip
    lead, p = 5, toy.prompt.shape[1]
    ids = torch.zeros(2, lead + p, dtype=torch.long)
    mask = torch.zeros_like(ids)
    ids[0, lead:], mask[0, lead:] = toy.prompt[0], 1
    ids[1, lead + 2 :], mask[1, lead + 2 :] = other[0], 1
    gen = Generator(toy.backbone, toy.stack, cfg, engine=EngineConfig(max_batch=2, max_len=128),
                    vocab=toy.vocab)  # fmt: skip
    calls = []
    decode = type(toy.backbone).decode

    def spy(self, x, positions, idx, valid, cache, **kw):
        calls.append((int(idx[0]), kw.get("key_start", 0)))
        return decode(self, x, positions, idx, valid, cache, **kw)

    monkeypatch.setattr(type(toy.backbone), "decode", spy)
    out = gen.generate(ids, attention_mask=mask)
    assert [t.tolist() for t in out.tokens] == lone
    assert calls[0] == (lead, lead)  # the prefill: from the first used column, reading from it
    assert all(first >= lead and ks == lead for first, ks in calls)


def test_a_padded_row_sees_its_own_tokens_only_for_the_repetition_penalty(toy):
    """A left-padded row's repetition penalty counts its prompt, not the padding: with the
    pad id set to the first token the row answers alone, a penalised pad would change it."""
    from mctp import SamplingConfig, generate

    cfg = GenerationConfig(
        mode="vanilla", max_new_tokens=12, text_sampling=SamplingConfig(repetition_penalty=50.0)
    )
    short = toy.prompt[:, 3:]
    want = generate(toy.backbone, toy.stack, short, config=cfg, vocab=toy.vocab).tokens[0].tolist()
    pad = want[0]
    assert pad not in short[0].tolist()  # only the padding could make it "seen"
    p = toy.prompt.shape[1]
    ids = torch.stack([toy.prompt[0], torch.cat([torch.full((3,), pad), short[0]])])
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    gen = Generator(toy.backbone, toy.stack, cfg, engine=EngineConfig(max_batch=2, max_len=64),
                    vocab=toy.vocab)  # fmt: skip
    assert ids.shape[1] == p
    assert gen.generate(ids, attention_mask=mask).tokens[1].tolist() == want
