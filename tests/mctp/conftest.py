"""A tiny speech LM trained to recite one interleaved (Boost-layout) answer, for generation tests."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from mctp.interleave import InterleaveSchedule

BOA, EOA, PLACEHOLDER, EOS = 100, 101, 99, 2
AUDIO_START, NUM_AUDIO = 102, 26


@dataclass
class Toy:
    backbone: object
    stack: object
    vocab: object
    prompt: torch.Tensor  # [1, P]
    answer: list[int]  # the memorised continuation, ending with EOS


@pytest.fixture(scope="session")
def toy(request) -> Toy:
    """Backbone + 10 MCTP heads that reproduce one Boost-layout answer (greedy)."""
    from mctp import MCTPStack
    from mctp.backbones import HFBackbone
    from mctp.demo import teach_answer
    from mctp.speech_vocab import AUDIO_PLACEHOLDER, SpeechVocab
    from mctp.speech_vocab import BOA as BOA_S
    from mctp.speech_vocab import EOA as EOA_S

    make = request.getfixturevalue("tiny_hf")
    g = torch.Generator().manual_seed(5)
    model = make("qwen2", seed=3)
    with torch.no_grad():  # back to a trainable scale
        for p in model.parameters():
            if p.ndim == 2:
                p.div_(8.0)
    bb = HFBackbone(model)
    stack = MCTPStack.from_backbone(bb.parts(), 10)
    prompt = torch.randint(3, 60, (1, 6), generator=g)
    text = torch.randint(3, 60, (9,), generator=g).tolist()
    audio = torch.randint(AUDIO_START, AUDIO_START + NUM_AUDIO, (24,), generator=g).tolist()
    answer = [*InterleaveSchedule.boost().interleave(text, audio, BOA, EOA), EOS]
    torch.manual_seed(0)
    teach_answer(bb, stack, prompt, answer, steps=120, lr=2e-2)
    vocab = SpeechVocab(
        special={BOA_S: BOA, EOA_S: EOA, AUDIO_PLACEHOLDER: PLACEHOLDER},
        audio_start=AUDIO_START,
        num_audio=NUM_AUDIO,
        vocab_size=128,
    )
    return Toy(bb, stack, vocab, prompt, answer)
