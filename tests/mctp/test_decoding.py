"""MCTPDecoder: cached incremental decoding equals the teacher-forced training forward."""

from __future__ import annotations

import pytest
import torch

from mctp import MCTPDecoder, MCTPStack, TokenBuffer


def _stack(lm, n: int) -> MCTPStack:
    stack = MCTPStack.from_backbone(lm.parts(), n)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in stack.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return stack.eval()


def _replay(lm, stack, seq, prompt_len, chains, attention_mask=None, prefill_chunk=None):
    """Feed ``seq`` through the decoder following ``chains`` (MCTP run lengths after each
    backbone token; 0 = a plain backbone step). Returns {(head, position): logits}."""
    b, total = seq.shape
    with torch.no_grad():
        if attention_mask is None:
            hidden = lm(seq)
        else:
            hidden = torch.stack([_row_hidden(lm, seq[i], attention_mask[i]) for i in range(b)])
    buf = TokenBuffer(b, total + 4)
    buf.start(
        seq[:, :prompt_len], None if attention_mask is None else attention_mask[:, :prompt_len]
    )
    dec = MCTPDecoder(stack, buf, prefill_chunk=prefill_chunk)
    if prefill_chunk is not None:  # every head run reads at most prefill_chunk slots
        run_states = dec._head_states
        pieces = []

        def spy(k, idx, visible=None, regions=None, **kw):
            pieces.append(idx.shape[0])
            return run_states(k, idx, visible, regions, **kw)

        dec._head_states = spy
    got = {}
    seen = 0  # slots whose backbone state is recorded
    for run in chains:
        n = buf.length
        # backbone forward over the unseen slots produces the token at slot n
        dec.write_backbone(seen, hidden[:, seen:n])
        seen = n
        buf.append(seq[:, n : n + 1])
        if run:
            out = dec.step(run, forced=seq[:, n + 1 : n + 1 + run], return_logits=True)
            for k in range(run):
                got[(k, n + k)] = out.logits[:, k]
    if prefill_chunk is not None:
        assert max(pieces) <= prefill_chunk < prompt_len  # the prompt's backlog was cut
    return got


def _row_hidden(lm, ids, mask):
    """Backbone states of a left-padded row: run on the real tokens, zeros on padding."""
    real = ids[mask.bool()][None]
    h = torch.zeros(ids.shape[0], lm.hidden_size)
    h[mask.bool()] = lm(real)[0]
    return h


@pytest.mark.parametrize("prefill_chunk", [None, 1, 3])
@pytest.mark.parametrize("chains", [[3, 3, 0, 3, 0, 0, 3], [1, 2, 0, 3, 0, 0, 3, 1]])
def test_cached_decode_equals_training_forward(tiny_lm, chains, prefill_chunk):
    stack = _stack(tiny_lm, 3)
    prompt_len = 5
    total = prompt_len + sum(1 + r for r in chains)
    seq = torch.randint(0, 97, (2, total))
    got = _replay(tiny_lm, stack, seq, prompt_len, chains, prefill_chunk=prefill_chunk)
    ref = stack(tiny_lm(seq), seq)
    assert got
    for (k, t), logits in got.items():
        torch.testing.assert_close(logits, ref.logits[k][:, t], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("prefill_chunk", [None, 2])
def test_cached_decode_with_left_padding_equals_unpadded_rows(tiny_lm, prefill_chunk):
    stack = _stack(tiny_lm, 2)
    chains = [2, 0, 2, 2]
    lens = [6, 3]
    p = max(lens)
    gen = sum(1 + r for r in chains)
    rows = [torch.randint(0, 97, (n + gen,)) for n in lens]
    seq = torch.stack(
        [
            torch.cat([torch.zeros(p - len(r) + gen, dtype=torch.long), r])[-(p + gen) :]
            for r in rows
        ]
    )
    mask = torch.stack([torch.cat([torch.zeros(p - n), torch.ones(n + gen)]) for n in lens]).long()
    got = _replay(tiny_lm, stack, seq, p, chains, attention_mask=mask, prefill_chunk=prefill_chunk)
    for i, row in enumerate(rows):
        ref = stack(tiny_lm(row[None]), row[None])
        shift = p - lens[i]
        for (k, t), logits in got.items():
            torch.testing.assert_close(logits[i], ref.logits[k][0, t - shift], atol=1e-5, rtol=1e-5)


def test_truncate_rolls_back(tiny_lm):
    stack = _stack(tiny_lm, 3)
    seq = torch.randint(0, 97, (1, 16))
    hidden = tiny_lm(seq).detach()
    buf = TokenBuffer(1, 20)
    buf.start(seq[:, :5])
    dec = MCTPDecoder(stack, buf)
    dec.write_backbone(0, hidden[:, :5])
    buf.append(seq[:, 5:6])
    wrong = torch.randint(0, 97, (1, 3))
    dec.step(3, forced=wrong)
    # roll back the three wrong tokens, continue with the true sequence
    buf.truncate(6)
    dec.truncate(6)
    out = dec.step(3, forced=seq[:, 6:9], return_logits=True)
    ref = stack(hidden, seq)
    for k in range(3):
        torch.testing.assert_close(out.logits[:, k], ref.logits[k][:, 5 + k], atol=1e-5, rtol=1e-5)


def test_greedy_step_returns_argmax_and_output_vocab_ids(tiny_lm):
    vocab = [5, 17, 60, 61, 90]
    stack = _stack(tiny_lm, 2)
    sub = MCTPStack(
        heads=list(stack.heads),
        embed=tiny_lm.embed,
        norm=tiny_lm.norm,
        lm_head=tiny_lm.lm_head,
        rotary=tiny_lm.rotary,
        output_vocab=vocab,
    )
    seq = torch.randint(0, 97, (1, 6))
    buf = TokenBuffer(1, 12)
    buf.start(seq)
    dec = MCTPDecoder(sub, buf)
    dec.write_backbone(0, tiny_lm(seq[:, :5]).detach())
    out = dec.step(return_logits=True)
    assert out.tokens.shape == (1, 2)
    assert out.tokens[0, 0].item() == vocab[out.logits[0, 0].argmax().item()]
    assert set(out.tokens.flatten().tolist()) <= set(vocab)
    assert buf.ids[0, 6:8].tolist() == out.tokens[0].tolist()


def test_decoder_errors(tiny_lm):
    stack = _stack(tiny_lm, 2)
    buf = TokenBuffer(1, 8)
    with pytest.raises(ValueError, match="at least one token"):
        buf.start(torch.zeros(1, 0, dtype=torch.long))
    with pytest.raises(ValueError, match="leaves no room"):
        buf.start(torch.zeros(1, 8, dtype=torch.long))
    buf.start(torch.zeros(1, 5, dtype=torch.long))
    dec = MCTPDecoder(stack, buf)
    with pytest.raises(ValueError, match="backbone states cover 0 slots"):
        dec.step()
    dec.write_backbone(0, torch.zeros(1, 4, 32))
    with pytest.raises(ValueError, match=r"num_heads must be in \[1, 2\]"):
        dec.step(3)
    with pytest.raises(ValueError, match="forced must be"):
        dec.step(2, forced=torch.zeros(1, 3, dtype=torch.long))
    dec.step(2)
    with pytest.raises(ValueError, match="do not fit"):
        dec.step(2)
    with pytest.raises(ValueError, match="only 4 slots are filled"):
        dec.write_backbone(6, torch.zeros(1, 1, 32))
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="prefill_chunk must be None or an int"):
            MCTPDecoder(stack, buf, prefill_chunk=bad)
