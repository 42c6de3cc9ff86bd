"""MCTPStack: construction, label alignment, packing, output vocabulary, gradients."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mctp import MCTPStack, mctp_loss, shift_targets
from mctp.checkpoint import CheckpointError


def _perturbed_stack(lm, num_heads: int = 3, **kw) -> MCTPStack:
    """A stack whose heads differ from each other (so index mix-ups show)."""
    stack = MCTPStack.from_backbone(lm.parts(), num_heads, **kw)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in stack.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return stack.eval()


def test_from_backbone_copies_last_block_and_grow_copies_last_head(tiny_lm):
    stack = MCTPStack.from_backbone(tiny_lm.parts(), 2)
    last = tiny_lm.layers[-1].state_dict()
    for head in stack.heads:
        for k, v in head.block.state_dict().items():
            assert torch.equal(v, last[k])
        assert torch.equal(head.embed_norm.weight, torch.ones(32))
        assert head.proj.weight.shape == (32, 64)
    # copies, not shared parameters
    assert (
        stack.heads[0].block.self_attn.q_proj.weight
        is not tiny_lm.layers[-1].self_attn.q_proj.weight
    )
    assert 0.01 < stack.heads[0].proj.weight.std().item() < 0.03
    with torch.no_grad():
        stack.heads[1].proj.weight.fill_(0.5)
    stack.grow(2)
    assert stack.num_heads == 4
    assert torch.equal(stack.heads[3].proj.weight, stack.heads[1].proj.weight)
    assert stack.heads[3].proj.weight is not stack.heads[1].proj.weight


def test_shared_parts_are_not_owned(tiny_lm):
    stack = MCTPStack.from_backbone(tiny_lm.parts(), 2)
    keys = list(stack.state_dict())
    assert all(k.startswith("heads.") for k in keys)
    assert {k.split(".", 2)[2].split(".")[0] for k in keys} == {
        "embed_norm",
        "hidden_norm",
        "proj",
        "block",
    }
    owned = {id(p) for p in stack.parameters()}
    assert id(tiny_lm.lm_head.weight) not in owned and id(tiny_lm.embed.weight) not in owned


def test_forward_shapes(tiny_lm):
    stack = _perturbed_stack(tiny_lm, 3)
    ids = torch.randint(0, 97, (2, 9))
    h = tiny_lm(ids)
    out = stack(h, ids, labels=ids)
    assert len(out.hidden) == 3 and len(out.logits) == 3
    assert out.hidden[0].shape == (2, 9, 32) and out.logits[2].shape == (2, 9, 97)
    assert out.targets.shape == (3, 2, 9)
    assert out.loss_sums.shape == (3,) and out.num_targets.tolist() == [2 * 7, 2 * 6, 2 * 5]
    assert stack(h, ids, num_heads=1).logits.__len__() == 1


def test_label_alignment_by_hand():
    # one sample of 5 tokens, then a packed sample of 3 tokens
    ids = torch.tensor([[10, 11, 12, 13, 14, 20, 21, 22]])
    pos = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2]])
    labels = ids.clone()
    labels[0, 6] = -100
    t = shift_targets(labels, pos)
    assert t.tolist() == [[11, 12, 13, 14, -100, -100, 22, -100]]


def test_targets_per_head_by_hand(tiny_lm):
    stack = _perturbed_stack(tiny_lm, 3)
    ids = torch.tensor([[10, 11, 12, 13, 14, 20, 21, 22]])
    pos = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2]])
    out = stack(tiny_lm(ids, pos), ids, position_ids=pos, labels=ids, return_logits=False)
    # head k at position t (position id > k) predicts x_{t+1} of the same sample
    assert out.targets[0].tolist() == [[-100, 12, 13, 14, -100, -100, 22, -100]]
    assert out.targets[1].tolist() == [[-100, -100, 13, 14, -100, -100, -100, -100]]
    assert out.targets[2].tolist() == [[-100, -100, -100, 14, -100, -100, -100, -100]]
    assert out.num_targets.tolist() == [4, 2, 1]


def test_loss_matches_explicit_cross_entropy(tiny_lm):
    stack = _perturbed_stack(tiny_lm, 2)
    ids = torch.randint(0, 97, (2, 7))
    labels = ids.clone()
    labels[0, 3] = -100
    h = tiny_lm(ids)
    out = stack(h, ids, labels=labels)
    res = mctp_loss(stack, h, ids, labels, weight=0.3, chunk_size=3)
    per_head = []
    for k in range(2):
        tgt = out.targets[k]
        keep = tgt != -100
        per_head.append(torch.nn.functional.cross_entropy(out.logits[k][keep], tgt[keep]))
    expected = torch.stack(per_head)
    torch.testing.assert_close(res.per_head, expected, atol=1e-5, rtol=1e-5)
    from mctp.losses import count_items

    sums = torch.stack([per_head[k] * (out.targets[k] != -100).sum() for k in range(2)])
    torch.testing.assert_close(
        res.loss, 0.3 * (sums / count_items(labels)).mean(), atol=1e-5, rtol=1e-5
    )


def test_packed_batch_equals_one_by_one(tiny_lm):
    stack = _perturbed_stack(tiny_lm, 3)
    a = torch.randint(0, 97, (1, 6))
    b = torch.randint(0, 97, (1, 5))
    packed = torch.cat([a, b], dim=1)
    pos = torch.cat([torch.arange(6), torch.arange(5)])[None]
    out_p = stack(tiny_lm(packed, pos), packed, position_ids=pos, labels=packed)
    out_a = stack(tiny_lm(a), a, labels=a)
    out_b = stack(tiny_lm(b), b, labels=b)
    for k in range(3):
        va = out_a.targets[k][0] != -100
        vb = out_b.targets[k][0] != -100
        torch.testing.assert_close(
            out_p.logits[k][0, :6][va], out_a.logits[k][0][va], atol=1e-5, rtol=1e-5
        )
        torch.testing.assert_close(
            out_p.logits[k][0, 6:][vb], out_b.logits[k][0][vb], atol=1e-5, rtol=1e-5
        )
    torch.testing.assert_close(
        out_p.loss_sums, out_a.loss_sums + out_b.loss_sums, atol=1e-4, rtol=1e-5
    )
    assert torch.equal(out_p.num_targets, out_a.num_targets + out_b.num_targets)


def test_right_padded_batch_equals_one_by_one(tiny_lm):
    stack = _perturbed_stack(tiny_lm, 2)
    a = torch.randint(0, 97, (1, 7))
    b = torch.randint(0, 97, (1, 4))
    batch = torch.cat([a, torch.cat([b, torch.zeros(1, 3, dtype=torch.long)], 1)])
    mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3])
    pos = torch.tensor([list(range(7)), [0, 1, 2, 3, 0, 0, 0]])
    h = torch.cat([tiny_lm(a), torch.cat([tiny_lm(b), torch.zeros(1, 3, 32)], 1)])
    out = stack(h, batch, attention_mask=mask, labels=batch)
    out_b = stack(tiny_lm(b), b, labels=b)
    for k in range(2):
        vb = out_b.targets[k][0] != -100
        torch.testing.assert_close(
            out.logits[k][1, :4][vb], out_b.logits[k][0][vb], atol=1e-5, rtol=1e-5
        )
        assert (out.targets[k][1, 3:] == -100).all()
    out2 = stack(h, batch, position_ids=pos, attention_mask=mask, labels=batch)
    torch.testing.assert_close(out2.loss_sums, out.loss_sums)


def test_output_vocab_logits_are_restricted_full_logits(tiny_lm):
    ids = torch.randint(0, 97, (2, 6))
    h = tiny_lm(ids)
    full = _perturbed_stack(tiny_lm, 2)
    for vocab in (slice(40, 60), [5, 90, 41, 7]):
        sub = MCTPStack(
            heads=list(full.heads),
            embed=tiny_lm.embed,
            norm=tiny_lm.norm,
            lm_head=tiny_lm.lm_head,
            rotary=tiny_lm.rotary,
            output_vocab=vocab,
        )
        index = torch.arange(40, 60) if isinstance(vocab, slice) else torch.tensor(vocab)
        out_f, out_s = full(h, ids), sub(h, ids)
        for k in range(2):
            torch.testing.assert_close(out_s.logits[k], out_f.logits[k][..., index])
        local = torch.tensor([0, 3, 1])
        assert sub.to_global_ids(local).tolist() == index[local].tolist()


def test_output_vocab_targets_outside_raise_or_are_ignored(tiny_lm):
    stack = _perturbed_stack(tiny_lm, 1, output_vocab=slice(50, 97))
    ids = torch.tensor([[51, 60, 3, 70, 80]])
    h = tiny_lm(ids)
    with pytest.raises(ValueError, match=r"outside the heads' output vocabulary"):
        stack(h, ids, labels=ids)
    out = stack(h, ids, labels=ids, outside_vocab="ignore")
    # head 0 targets at t=1..3 are x2=3 (outside, dropped), x3=70, x4=80
    assert out.num_targets.tolist() == [2]


def test_gradient_reaches_only_heads_when_detached(tiny_lm):
    stack = _perturbed_stack(tiny_lm, 2).train()
    tiny_lm.train()
    ids = torch.randint(0, 97, (2, 8))
    h = tiny_lm(ids)
    res = mctp_loss(stack, h, ids, ids, detach_backbone=True)
    res.loss.backward()
    for name, p in tiny_lm.named_parameters():
        if name.startswith(("lm_head", "norm")):
            continue  # shared modules lie on the heads' own path
        assert p.grad is None, name
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in stack.parameters())
    # without detaching, the backbone receives gradient
    tiny_lm.zero_grad()
    h = tiny_lm(ids)
    mctp_loss(stack, h, ids, ids).loss.backward()
    assert tiny_lm.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0


def test_bad_inputs_raise(tiny_lm):
    stack = _perturbed_stack(tiny_lm, 2)
    ids = torch.randint(0, 97, (2, 5))
    h = tiny_lm(ids)
    with pytest.raises(ValueError, match=r"hidden must be \[B, T, H\]"):
        stack(h[:, :4], ids)
    with pytest.raises(ValueError, match="position_ids must be"):
        stack(h, ids, position_ids=torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"num_heads must be in \[1, 2\]"):
        stack(h, ids, num_heads=3)
    with pytest.raises(ValueError, match="outside_vocab"):
        stack(h, ids, outside_vocab="drop")
    with pytest.raises(ValueError, match="num_heads must be >= 1"):
        MCTPStack.from_backbone(tiny_lm.parts(), 0)
    with pytest.raises(ValueError, match="output_vocab ids must lie"):
        MCTPStack.from_backbone(tiny_lm.parts(), 1, output_vocab=[3, 200])
    with pytest.raises(ValueError, match="duplicate"):
        MCTPStack.from_backbone(tiny_lm.parts(), 1, output_vocab=[3, 3])


def test_load_strict_names_missing_and_unexpected(tiny_lm):
    from mctp.checkpoint import load_strict

    stack = MCTPStack.from_backbone(tiny_lm.parts(), 1)
    sd = stack.state_dict()
    sd.pop("heads.0.proj.weight")
    sd["heads.0.extra"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match=r"missing keys \(1\): heads.0.proj.weight") as e:
        load_strict(stack, sd)
    assert e.value.unexpected == ["heads.0.extra"]


@settings(
    max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(lengths=st.lists(st.integers(1, 7), min_size=1, max_size=4), seed=st.integers(0, 2**16))
def test_packing_property_per_head_losses_add_up(tiny_lm, lengths, seed):
    """Any packing of samples gives the per-head loss sums and counts of running them alone."""
    stack = _perturbed_stack(tiny_lm, 3)
    g = torch.Generator().manual_seed(seed)
    samples = [torch.randint(0, 97, (1, n), generator=g) for n in lengths]
    packed = torch.cat(samples, dim=1)
    pos = torch.cat([torch.arange(n) for n in lengths])[None]
    with torch.no_grad():
        out = stack(
            tiny_lm(packed, pos), packed, position_ids=pos, labels=packed, return_logits=False
        )
        sums = torch.zeros(3)
        counts = torch.zeros(3, dtype=torch.long)
        for x in samples:
            one = stack(tiny_lm(x), x, labels=x, return_logits=False)
            sums += one.loss_sums
            counts += one.num_targets
    assert torch.equal(out.num_targets, counts)
    assert counts.tolist() == [sum(max(n - 2 - k, 0) for n in lengths) for k in range(3)]
    torch.testing.assert_close(out.loss_sums, sums, atol=1e-3, rtol=1e-4)
