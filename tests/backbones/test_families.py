"""The family table: every claimed causal-LM family, exactly, past any sliding window.

For each family (tiny random models, see families.py): the path HFBackbone picks; Vanilla
greedy equals ``model.generate(do_sample=False)`` for 44 new tokens (past the window of 8),
for batch 1 and a left-padded batch, with tied and untied embeddings; verified decoding equals
Vanilla with heads that are right only part of the time (acceptance strictly between 0 and 1);
Boost follows its schedule's forward counts.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from mctp import MCTPStack, generate, mctp_loss
from mctp.backbones import HFBackbone
from mctp.interleave import InterleaveSchedule

sys.path.insert(0, str(Path(__file__).parent))
from families import FAMILIES, VOCAB, build, expected_path, left_padded, lively

NEW = 44


@pytest.fixture(autouse=True)
def _quiet_transformers():
    import transformers

    level = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    yield
    transformers.logging.set_verbosity(level)


def _reference(model, ids, mask=None):
    return model.generate(
        ids,
        attention_mask=mask,
        max_new_tokens=NEW,
        do_sample=False,
        pad_token_id=0,
        eos_token_id=None,
    )


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_vanilla_greedy_equals_transformers_past_the_window(family, tied):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, VOCAB, (1, 6), generator=g)
    model = lively(family, tied=tied, prompt=ids)
    bb = HFBackbone(model)
    assert bb.path == expected_path(family), bb.fast_path_blockers
    ref = _reference(model, ids)
    res = generate(bb, None, ids, "vanilla", NEW)
    assert res.tokens[0].tolist() == ref[0, 6:].tolist()
    # a left-padded batch
    ids, mask = left_padded(6, 3, g)
    ref = _reference(model, ids, mask)
    res = generate(bb, None, ids, "vanilla", NEW, attention_mask=mask)
    assert res.sequences[:, 6:].tolist() == ref[:, 6:].tolist()


def _partly_right_heads(bb, ids: torch.Tensor, n: int) -> MCTPStack:
    """4 heads taught the backbone's own continuation with every 3rd token changed: their
    drafts are accepted where they are right and rejected at the changed tokens."""
    van = generate(bb, None, ids, "vanilla", n)
    seq = torch.cat([ids, van.tokens[0][None]], 1)
    labels = seq.clone()
    labels[:, : ids.shape[1]] = -100
    labels[0, ids.shape[1] + 2 :: 3] = (labels[0, ids.shape[1] + 2 :: 3] + 1) % VOCAB
    torch.manual_seed(0)
    stack = MCTPStack.from_backbone(bb.parts(), 4)
    with torch.no_grad():
        hidden = bb(seq).hidden
    opt = torch.optim.Adam(stack.parameters(), lr=1e-2)
    stack.train()
    for _ in range(80):
        loss = mctp_loss(stack, hidden, seq, labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return stack.eval()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_verified_equals_vanilla_and_mctp_modes_follow_their_schedules(family):
    ids = torch.randint(3, VOCAB, (1, 6), generator=torch.Generator().manual_seed(2))
    bb = HFBackbone(lively(family, prompt=ids))
    stack = _partly_right_heads(bb, ids, 30)
    van = generate(bb, None, ids, "vanilla", 30)
    ver = generate(bb, stack, ids, "vanilla", 30, verify=True, draft_len=4)
    assert ver.tokens[0].tolist() == van.tokens[0].tolist()
    assert 0.0 < ver.acceptance_rate < 1.0, ver.acceptance_rate
    ten = MCTPStack.from_backbone(bb.parts(), 10).eval()
    for mode in ("boost", "turbo", "balance"):
        res = generate(bb, ten, ids, mode, 37)
        sched = InterleaveSchedule.from_mode(mode)
        assert (res.num_backbone_forwards, res.num_mctp_steps) == sched.cost(37)
        assert res.sources[0].tolist() == [sched.head(i) for i in range(37)]


def test_a_model_neither_path_runs_raises_one_clear_error():
    model = build("deepseek-v3")
    model.config.num_key_value_heads = 2  # multi-head latent attention with grouped kv heads
    for layer in model.model.layers:
        layer.self_attn.num_key_value_groups = 2
    with pytest.raises(NotImplementedError, match="DeepseekV3ForCausalLM: the model's own forward"):
        HFBackbone(model)


def test_forcing_the_fast_path_on_a_gpt2_names_what_is_missing():
    with pytest.raises(NotImplementedError, match=r"GPT2LMHeadModel cannot run on the fast path"):
        HFBackbone(build("gpt2"), path="fast")
    with pytest.raises(ValueError, match="path must be one of"):
        HFBackbone(build("llama"), path="quick")


def test_windows_are_read_from_the_modules():
    assert HFBackbone(build("mistral")).windows == [8, 8]
    assert HFBackbone(build("qwen2-sliding")).windows == [None, 8]
    assert HFBackbone(build("gemma3")).windows == [8, None]
    assert HFBackbone(build("llama")).windows == [None, None]


def test_the_self_check_looks_past_a_large_window(monkeypatch):
    """A window far longer than the check's sequence is narrowed for the check, so a loop
    blind to windows is caught (the auto path falls back to the exact generic path)."""
    import mctp.backbones.hf as hf

    model = build("mistral")
    model.config.sliding_window = 4096
    assert HFBackbone(model).windows == [4096, 4096]
    assert model.config.sliding_window == 4096  # restored after the check
    monkeypatch.setattr(hf, "layer_windows", lambda config, layers: [None] * len(layers))
    bb = HFBackbone(model)
    assert bb.path == "generic" and "self-check" in bb.fast_path_blockers[0]
    with pytest.raises(NotImplementedError, match="fast path does not reproduce"):
        HFBackbone(model, path="fast")


def test_gradient_checkpointing_gives_the_same_gradients():
    for family in ("qwen2", "gpt2"):
        grads = []
        for ckpt in (False, True):
            model = build(family)
            bb = HFBackbone(model)
            if ckpt:
                bb.gradient_checkpointing_enable()
                assert bb.is_gradient_checkpointing
            model.train()
            ids = torch.randint(3, VOCAB, (2, 12), generator=torch.Generator().manual_seed(3))
            bb(ids, labels=ids).loss.backward()
            grads.append(
                {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
            )
        assert grads[0].keys() == grads[1].keys() and grads[0]
        for name in grads[0]:
            torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-5, rtol=1e-4)


def test_the_generic_path_refuses_compile_by_name():
    bb = HFBackbone(build("gpt2"))
    ids = torch.randint(3, VOCAB, (1, 6))
    with pytest.raises(ValueError, match="GPT2LMHeadModel runs on the backbone's generic path"):
        generate(bb, None, ids, "vanilla", 4, compile=True)


@pytest.mark.parametrize("family", [f for f in FAMILIES if expected_path(f) == "fast"])
def test_regional_fast_path_equals_transformers_past_the_window(family):
    """The fast path with regions (one graph per kind of layer and head, shared by all of them;
    Dynamo traces and guards with the eager backend) gives transformers' greedy tokens past the
    window for a left-padded batch, and Boost's tokens equal the eager path's: the per-layer
    graphs read each layer's own weights, windows and cache."""
    g = torch.Generator().manual_seed(1)
    ids, mask = left_padded(6, 2, g)
    model = lively(family, prompt=ids[:1])
    bb = HFBackbone(model)
    fast = dict(compile=True, compile_options={"backend": "eager"}, window=4, compile_regions=True)
    ref = _reference(model, ids, mask)
    res = generate(bb, None, ids, "vanilla", NEW, attention_mask=mask, **fast)
    assert res.sequences[:, 6:].tolist() == ref[:, 6:].tolist()
    torch.manual_seed(0)
    ten = MCTPStack.from_backbone(bb.parts(), 10).eval()
    eager = generate(bb, ten, ids, "boost", 30, attention_mask=mask)
    # a window that holds a chain of 10 heads: the heads run through their shared graph too
    regional = generate(bb, ten, ids, "boost", 30, attention_mask=mask, **{**fast, "window": 9})
    assert torch.equal(regional.sequences, eager.sequences)
