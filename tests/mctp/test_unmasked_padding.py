"""A padded batch without an attention mask: the engine warns instead of answering silently."""

from __future__ import annotations

import warnings
from types import SimpleNamespace

import pytest
import torch

from mctp import generate, generate_stream
from mctp.backbones import HFBackbone


def test_padded_batch_without_a_mask_warns_and_the_mask_fixes_the_row(tiny_hf):
    torch.manual_seed(0)
    bb = HFBackbone(tiny_hf("qwen2"))
    prompt = torch.randint(3, 128, (1, 6))
    alone = generate(bb, None, prompt, "vanilla", 8)
    ids = torch.cat([torch.randint(3, 128, (1, 9)), torch.cat([torch.zeros(1, 3), prompt], 1)])
    ids = ids.long()
    with pytest.warns(UserWarning, match=r"generate \(GenerationConfig.pad_id\): rows \[1\]"):
        generate(bb, None, ids, "vanilla", 8)
    mask = (torch.arange(9) >= torch.tensor([[0], [3]])).long()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        masked = generate(bb, None, ids, "vanilla", 8, attention_mask=mask)
        generate(bb, None, ids, "vanilla", 8, pad_id=127)  # another padding id: not padding
    assert masked.tokens[1].tolist() == alone.tokens[0].tolist()


def test_right_padding_without_a_mask_warns_in_streams_too(tiny_hf):
    bb = HFBackbone(tiny_hf("qwen2"))
    vocab = SimpleNamespace(boa=120, eoa=121, audio_start=122, audio_stop=128)
    ids = torch.randint(3, 100, (2, 7))
    ids[0, -2:] = 0
    with pytest.warns(UserWarning, match=r"rows \[0\] of a 2-row batch"):
        for _ in generate_stream(bb, None, ids, "vanilla", 3, vocab=vocab):
            pass
