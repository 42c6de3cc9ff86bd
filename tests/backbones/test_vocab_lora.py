"""Vocabulary extension (official id layout) and LoRA on the backbone."""

from __future__ import annotations

import pytest
import torch

from mctp import MCTPStack, mctp_loss
from mctp.backbones import HFBackbone, add_lora, extend_vocab, trainable_parameter_count
from mctp.speech_vocab import AUDIO_CONTEXT, SpeechVocab, audio_token


def _word_tokenizer(n: int):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(n - 1)}
    vocab["<unk>"] = n - 1
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")


def test_official_qwen25_id_layout():
    tok = _word_tokenizer(151665)  # Qwen2.5's tokenizer size
    v = extend_vocab(tok)
    assert (v.boa, v.eoa, v.audio_placeholder) == (151674, 151675, 151684)
    assert v.audio_start == 151685 and v.num_audio == 16384 and v.vocab_size == 168072
    assert v.audio_context is None
    assert tok.convert_tokens_to_ids(audio_token(16383)) == 168068
    again = extend_vocab(tok)  # idempotent
    assert again == v and len(tok) == 168069


def test_plus_layout_inserts_context_token():
    tok = _word_tokenizer(151665)
    v = extend_vocab(tok, plus=True, num_audio_tokens=16)
    assert (v.boa, v.eoa, v.audio_context, v.audio_placeholder) == (151674, 151675, 151676, 151685)
    assert v.audio_start == 151686 and v.special[AUDIO_CONTEXT] == 151676


def test_codes_round_trip_and_errors():
    tok = _word_tokenizer(100)
    v = extend_vocab(tok, num_audio_tokens=32)
    ids = v.from_codes([0, 5, 31])
    assert ids.tolist() == [v.audio_start, v.audio_start + 5, v.audio_start + 31]
    assert v.to_codes(ids).tolist() == [0, 5, 31]
    assert v.is_audio(torch.tensor([v.boa, v.audio_start, v.audio_stop])).tolist() == [
        False,
        True,
        False,
    ]
    assert (
        v.mctp_output_vocab()[:3] == [v.boa, v.eoa, v.audio_start]
        and len(v.mctp_output_vocab()) == 34
    )
    with pytest.raises(ValueError, match="not audio tokens"):
        v.to_codes([v.boa])
    with pytest.raises(ValueError, match=r"codes must lie in \[0, 32\)"):
        v.from_codes([32])
    with pytest.raises(ValueError, match="no <\\|audio_0\\|> token"):
        SpeechVocab.from_tokenizer(_word_tokenizer(10))
    with pytest.raises(ValueError, match="num_audio_tokens must be >= 1"):
        extend_vocab(tok, num_audio_tokens=0)


def test_model_embeddings_resized_and_text_logits_kept(tiny_hf):
    model = tiny_hf("qwen2", vocab=100)
    tok = _word_tokenizer(100)
    ids = torch.randint(0, 100, (1, 6))
    before = model(input_ids=ids).logits
    v = extend_vocab(tok, model, num_audio_tokens=37)
    rows = model.get_input_embeddings().weight.shape[0]
    assert rows == v.vocab_size and rows % 8 == 0 and rows >= 100 + 20 + 37
    assert model.lm_head.weight.shape[0] == rows
    after = model(input_ids=ids).logits
    torch.testing.assert_close(after[..., :100], before, atol=1e-5, rtol=1e-5)
    new = model.get_input_embeddings().weight[100:]
    old = model.get_input_embeddings().weight[:100]
    assert (new.mean(0) - old.mean(0)).abs().max() < 3 * old.std()


def test_lora_on_backbone_heads_train_fully(tiny_hf):
    model = tiny_hf("qwen2")
    bb = HFBackbone(model)
    stack = MCTPStack.from_backbone(bb.parts(), 2)  # build heads before adding adapters
    add_lora(model, r=4, alpha=8)
    assert not any("lora_" in n for n, _ in stack.named_parameters())
    lora = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert lora and all("lora_" in n for n in lora)
    assert trainable_parameter_count(stack) == sum(p.numel() for p in stack.parameters())
    base_w = model.model.layers[0].self_attn.q_proj.base_layer.weight.clone()
    head_w = stack.heads[1].proj.weight.clone()
    lora_b = {n: p.clone() for n, p in lora.items() if "lora_B" in n}
    opt = torch.optim.AdamW([*lora.values(), *stack.parameters()], lr=1e-2)
    ids = torch.randint(0, 128, (2, 10))
    out = bb(ids, labels=ids)
    loss = out.loss + mctp_loss(stack, out.hidden, ids, ids).loss
    loss.backward()
    opt.step()
    assert torch.equal(model.model.layers[0].self_attn.q_proj.base_layer.weight, base_w)
    assert not torch.equal(stack.heads[1].proj.weight, head_w)
    assert any(not torch.equal(lora[n], w) for n, w in lora_b.items())
