"""HFBackbone: equivalence with the transformers model, packing, cached decode."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from mctp import MCTPStack, TokenBuffer
from mctp.backbones import HFBackbone


@pytest.mark.parametrize("fam", ["qwen2", "llama", "qwen3", "mistral"])
def test_forward_equals_transformers(fam, tiny_hf):
    model = tiny_hf(fam)
    bb = HFBackbone(model)
    ids = torch.randint(0, 128, (2, 9))
    out = bb(ids, labels=ids, return_logits=True)
    ref = model(input_ids=ids, labels=ids)
    torch.testing.assert_close(out.logits, ref.logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out.loss, ref.loss, atol=1e-4, rtol=1e-4)
    assert out.hidden.shape == (2, 9, 32)


def test_eager_attention_also_works(tiny_hf):
    model = tiny_hf("qwen2", attn="eager")
    bb = HFBackbone(model)
    ids = torch.randint(0, 128, (1, 7))
    torch.testing.assert_close(
        bb(ids, return_logits=True).logits, model(input_ids=ids).logits, atol=1e-4, rtol=1e-4
    )


def test_packed_equals_separate(family, tiny_hf):
    bb = HFBackbone(tiny_hf(family))
    a, b = torch.randint(0, 128, (1, 5)), torch.randint(0, 128, (1, 4))
    pos = torch.cat([torch.arange(5), torch.arange(4)])[None]
    packed = bb(torch.cat([a, b], 1), position_ids=pos, return_logits=True).logits
    torch.testing.assert_close(
        packed[:, :5], bb(a, return_logits=True).logits, atol=1e-4, rtol=1e-4
    )
    torch.testing.assert_close(
        packed[:, 5:], bb(b, return_logits=True).logits, atol=1e-4, rtol=1e-4
    )


def test_left_padding_matches_unpadded(family, tiny_hf):
    model = tiny_hf(family)
    bb = HFBackbone(model)
    ids = torch.randint(3, 128, (1, 6))
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), ids], 1)
    mask = torch.tensor([[0, 0, 0] + [1] * 6])
    out = bb(padded, attention_mask=mask, return_logits=True).logits[:, 3:]
    torch.testing.assert_close(out, bb(ids, return_logits=True).logits, atol=1e-4, rtol=1e-4)


def test_cached_forward_equals_uncached(family, tiny_hf):
    bb = HFBackbone(tiny_hf(family))
    ids = torch.randint(0, 128, (2, 12))
    ref = bb(ids, return_logits=True)
    buf = TokenBuffer(2, 16)
    buf.start(ids[:, :5])
    cache = bb.new_cache(2, 16)
    assert not cache.allocated  # buffers are made by the first forward, at the layers' shapes
    h, logits = bb.forward_cached(buf, cache, 0)
    assert cache.allocated
    torch.testing.assert_close(h, ref.hidden[:, :5], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits[:, -1], ref.logits[:, 4], atol=1e-4, rtol=1e-4)
    # one token, then a multi-token re-read, then a rollback and a re-read
    buf.append(ids[:, 5:6])
    h, logits = bb.forward_cached(buf, cache, 5)
    torch.testing.assert_close(logits[:, -1], ref.logits[:, 5], atol=1e-4, rtol=1e-4)
    buf.append(torch.randint(0, 128, (2, 4)))  # wrong tokens
    bb.forward_cached(buf, cache, 6)
    buf.truncate(6)
    buf.append(ids[:, 6:12])
    h, logits = bb.forward_cached(buf, cache, 6, all_logits=True)
    torch.testing.assert_close(logits, ref.logits[:, 6:12], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(h, ref.hidden[:, 6:12], atol=1e-5, rtol=1e-5)


def test_parts_and_stack_from_hf_layers(family, tiny_hf):
    model = tiny_hf(family)
    bb = HFBackbone(model)
    parts = bb.parts()
    assert parts.hidden_size == 32 and parts.lm_head is model.lm_head
    stack = MCTPStack.from_backbone(parts, 2)
    last = model.model.layers[-1].state_dict()
    for k, v in stack.heads[0].block.state_dict().items():
        assert torch.equal(v, last[k])
    ids = torch.randint(0, 128, (2, 8))
    out = stack(bb(ids).hidden, ids, labels=ids)
    assert out.logits[1].shape == (2, 8, 128) and torch.isfinite(out.loss_sums).all()
    fresh = bb.block_factory(copy_last=False)(0)
    assert type(fresh) is type(model.model.layers[-1])
    assert not torch.equal(
        fresh.self_attn.q_proj.weight, model.model.layers[-1].self_attn.q_proj.weight
    )


def test_models_the_fast_loop_cannot_run_take_the_generic_path(tiny_hf):
    import transformers as tf

    cfg = tf.GPT2Config(
        vocab_size=64, n_embd=32, n_layer=1, n_head=2, bos_token_id=1, eos_token_id=2
    )
    bb = HFBackbone(tf.GPT2LMHeadModel(cfg).eval())
    assert bb.path == "generic" and "not laid out like Llama" in bb.fast_path_blockers[0]
    model = tiny_hf("qwen2")
    model.config.layer_types = ["chunked_attention"] * 2  # breaks the model's own forward too
    with pytest.raises(
        NotImplementedError, match="Qwen2ForCausalLM: the model's own forward fails"
    ):
        HFBackbone(model)


def test_verification_catches_a_model_the_loop_cannot_run(tiny_hf):
    model = tiny_hf("llama")
    # an architecture that scales embeddings inside its forward (as Gemma does)
    orig = model.model.forward

    def scaled_forward(*args, inputs_embeds=None, input_ids=None, **kw):
        inputs_embeds = model.model.embed_tokens(input_ids) * 3.0
        return orig(*args, inputs_embeds=inputs_embeds, **kw)

    model.model.forward = scaled_forward
    with pytest.raises(NotImplementedError, match="neither the fast loop"):
        HFBackbone(model)


@pytest.mark.skipif(
    importlib.util.find_spec("flash_attn") is None, reason="flash-attn not installed"
)
@pytest.mark.gpu
def test_flash_attention_packed_equals_sdpa(tiny_hf):
    model = tiny_hf("qwen2").cuda().to(torch.bfloat16)
    ids = torch.randint(0, 128, (1, 9), device="cuda")
    pos = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3]], device="cuda")
    sdpa = HFBackbone(model)(ids, position_ids=pos, return_logits=True).logits
    model.config._attn_implementation = "flash_attention_2"
    flash = HFBackbone(model)(ids, position_ids=pos, return_logits=True).logits
    torch.testing.assert_close(flash, sdpa, atol=5e-2, rtol=5e-2)


def test_heads_on_eager_and_sdpa_backbones_agree(tiny_hf):
    from mctp import MCTPDecoder, TokenBuffer

    outs = []
    ids = torch.randint(0, 128, (1, 10))
    for attn in ("sdpa", "eager"):
        bb = HFBackbone(tiny_hf("qwen2", attn=attn))
        stack = MCTPStack.from_backbone(bb.parts(), 2)
        torch.manual_seed(0)
        with torch.no_grad():
            for p in stack.parameters():
                p.add_(0.1 * torch.randn_like(p))
        h = bb(ids).hidden
        train = stack(h, ids).logits
        buf = TokenBuffer(1, 16)
        buf.start(ids[:, :7])
        dec = MCTPDecoder(stack, buf)
        dec.write_backbone(0, h[:, :6])
        step = dec.step(2, forced=ids[:, 7:9], return_logits=True).logits
        outs.append((train, step))
    for a, b in zip(outs[0][0], outs[1][0]):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(outs[0][1], outs[1][1], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(outs[0][1][:, 0], outs[0][0][0][:, 6], atol=1e-4, rtol=1e-4)


def test_generate_name_is_the_function_after_importing_the_module():
    import importlib

    importlib.import_module("mctp.engine.generation")
    from mctp import generate

    assert callable(generate) and generate.__module__ == "mctp.engine.generation"


def test_cached_decode_runs_sdpa_for_a_flash_configured_model(tiny_hf):
    """Flash kernels take no dense mask: decoding flips to SDPA for the call and back."""
    model = tiny_hf("llama")
    bb = HFBackbone(model)
    ids = torch.randint(0, 128, (1, 8))
    ref = bb(ids, return_logits=True).logits
    model.config._attn_implementation = "flash_attention_2"  # pretend; the kernel is never reached
    buf = TokenBuffer(1, 12)
    buf.start(ids)
    _, logits = bb.forward_cached(buf, bb.new_cache(1, 12), 0, all_logits=True)
    torch.testing.assert_close(logits, ref, atol=1e-4, rtol=1e-4)
    assert model.config._attn_implementation == "flash_attention_2"


def test_the_path_is_a_class_chosen_at_construction(tiny_hf):
    import transformers as tf

    from mctp.backbones import FastHFBackbone, GenericHFBackbone

    llama = tiny_hf("llama")
    bb = HFBackbone(llama)
    assert type(bb) is FastHFBackbone and isinstance(bb, HFBackbone)
    assert bb.path == "fast" and bb.fast_path_blockers == []
    gpt2 = tf.GPT2LMHeadModel(
        tf.GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=2, bos_token_id=1, eos_token_id=2)
    ).eval()
    bb = HFBackbone(gpt2)
    assert type(bb) is GenericHFBackbone and isinstance(bb, HFBackbone)
    assert bb.path == "generic" and bb.windows == []
    # forced: a Llama-layout model on the generic path, and the fast path by its own class
    forced = HFBackbone(llama, path="generic")
    assert type(forced) is GenericHFBackbone
    assert forced.fast_path_blockers == ["the generic path was asked for"]
    assert type(HFBackbone(llama, path="fast", verify=False)) is FastHFBackbone
    assert type(FastHFBackbone(llama)) is FastHFBackbone
    with pytest.raises(NotImplementedError, match="GPT2LMHeadModel cannot run on the fast path"):
        FastHFBackbone(gpt2)
    with pytest.raises(AttributeError):
        bb.path = "fast"  # read-only: the class is the path
    ids = torch.randint(0, 64, (1, 5))
    torch.testing.assert_close(
        forced(ids, return_logits=True).logits, llama(input_ids=ids).logits, atol=1e-4, rtol=1e-4
    )


def test_a_fast_loop_that_fails_the_self_check_falls_back_with_a_warning(
    tiny_hf, caplog, monkeypatch
):
    from mctp.backbones import FastHFBackbone, GenericHFBackbone

    model = tiny_hf("llama")
    orig = FastHFBackbone._decode
    monkeypatch.setattr(FastHFBackbone, "_decode", lambda self, x, *a: orig(self, x, *a) + 1.0)
    with caplog.at_level("WARNING", logger="mctp.backbones.hf"):
        bb = HFBackbone(model)
    assert type(bb) is GenericHFBackbone
    assert bb.fast_path_blockers[0].startswith("self-check: cached decode")
    assert "fast loop differs" in caplog.text and "using the generic path" in caplog.text
    with pytest.raises(NotImplementedError, match="the fast path does not reproduce"):
        HFBackbone(model, path="fast")
