"""What both HFBackbone paths share: chunked prefill, the unmasked-padding warning."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import pytest
import torch

from mctp import generate
from mctp.backbones import HFBackbone

sys.path.insert(0, str(Path(__file__).parent))
from families import VOCAB, WINDOW, build, left_padded, lively


def _padded_rows(t: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two rows of ``t`` slots, row 1 left-padded by 5: ids, positions, validity."""
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(3, VOCAB, (2, t), generator=g)
    valid = torch.ones(2, t, dtype=torch.bool)
    valid[1, :5] = False
    ids[1, :5] = 0
    pos = ((valid.long().cumsum(-1) - 1) * valid).clamp_min(0)
    return ids, pos, valid


def _record_steps(bb: HFBackbone) -> list[int]:
    """Slots of every unchunked cached forward ``bb`` runs from now on (appended)."""
    steps: list[int] = []
    inner = bb._decode

    def recording(x: torch.Tensor, *rest: object) -> torch.Tensor:
        steps.append(x.shape[1])
        return inner(x, *rest)

    bb._decode = recording
    return steps


@pytest.mark.parametrize("family", ["qwen2", "qwen2-sliding", "mistral", "gpt2"])
def test_chunked_prefill_equals_one_step(family):
    """Prefill of 3 windows' length in chunks of 1, 3, 7, 8 and 20 slots equals the unchunked
    step (fp32, a sliding window of 8, a left-padded row), then decoding goes on equally."""
    torch.manual_seed(0)
    model = build(family)
    t = 3 * WINDOW + 2
    ids, pos, valid = _padded_rows(t + 1)
    slots = torch.arange(t + 1)
    results = {}
    for chunk in (None, 1, 3, 7, WINDOW, 20):
        bb = HFBackbone(model, prefill_chunk=chunk, verify=False)
        cache = bb.setup_caches(2, t + 1)
        steps = _record_steps(bb)
        with torch.no_grad():
            x = bb.embed(ids)
            h = bb.decode(x[:, :t], pos[:, :t], slots[:t], valid[:, :t], cache)
            nxt = bb.decode(x[:, t:], pos[:, t:], slots[t:], valid, cache)
        results[chunk] = torch.cat([h, nxt], 1)
        # no step (its masks and attention scores) spans more than the chunk's slots
        assert steps == (
            [t] if chunk is None else [min(chunk, t - i) for i in range(0, t, chunk)]
        ) + [1]
    ref = results.pop(None)
    assert ref.shape == (2, t + 1, 32)
    for chunk, got in results.items():
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5, msg=f"chunk {chunk}")


@pytest.mark.parametrize("family", ["qwen2-sliding", "gpt2"])
def test_chunked_prefill_gives_the_same_greedy_tokens(family):
    g = torch.Generator().manual_seed(5)
    ids, mask = left_padded(21, 6, g)
    model = lively(family, prompt=ids[:1])
    whole = generate(
        HFBackbone(model, prefill_chunk=None), None, ids, "vanilla", 12, attention_mask=mask
    )
    for chunk in (2, 5):
        bb = HFBackbone(model, prefill_chunk=chunk)
        res = generate(bb, None, ids, "vanilla", 12, attention_mask=mask)
        assert [t.tolist() for t in res.tokens] == [t.tolist() for t in whole.tokens], chunk


@pytest.mark.parametrize("bad", [0, -3, 2.5, True, "512"])
def test_a_bad_prefill_chunk_is_refused_by_name(bad):
    with pytest.raises(ValueError, match="prefill_chunk must be None or an int >= 1"):
        HFBackbone(build("llama"), prefill_chunk=bad)


def test_padding_without_a_mask_warns_in_the_training_forward():
    bb = HFBackbone(build("qwen2"))  # pad_token_id 0
    ids = torch.randint(3, VOCAB, (2, 6))
    ids[1, :2] = 0
    with pytest.warns(UserWarning, match=r"rows \[1\] of a 2-row batch begin or end with padding"):
        bb(ids)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bb(ids, attention_mask=(ids != 0).long())  # a mask: nothing to say
        bb(ids[:, 2:])  # no padding


def test_prefill_chunk_is_validated_when_set():
    bb = HFBackbone(build("llama"), verify=False)
    bb.prefill_chunk = None
    assert bb.prefill_chunk is None
    with pytest.raises(ValueError, match="prefill_chunk must be None or an int >= 1, got 0"):
        bb.prefill_chunk = 0
