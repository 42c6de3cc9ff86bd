"""generate / generate_stream: equivalence with transformers, schedules, verified mode, streaming."""

from __future__ import annotations

import pytest
import torch

from mctp import MCTPStack, SamplingConfig, generate, generate_stream
from mctp.backbones import HFBackbone
from mctp.engine.decoding import MCTPDecoder
from mctp.interleave import InterleaveSchedule

MODES = ["vanilla", "balance", "boost", "turbo"]


@pytest.fixture(params=["qwen2", "llama"])
def hf(request, tiny_hf):
    model = tiny_hf(request.param)
    return model, HFBackbone(model)


def _heads(bb, n=10):
    stack = MCTPStack.from_backbone(bb.parts(), n)
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for p in stack.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return stack.eval()


def test_vanilla_greedy_equals_transformers_generate(hf):
    model, bb = hf
    ids = torch.randint(3, 128, (1, 7))
    ref = model.generate(ids, max_new_tokens=24, do_sample=False, pad_token_id=0, eos_token_id=None)
    res = generate(bb, None, ids, "vanilla", 24)
    assert res.tokens[0].tolist() == ref[0, 7:].tolist()
    assert res.num_backbone_forwards == 24 and res.num_mctp_steps == 0
    assert torch.equal(res.sequences, ref)


def test_vanilla_greedy_padded_batch_equals_transformers_generate(hf):
    model, bb = hf
    lens = [7, 4, 5]
    ids = torch.zeros(3, 7, dtype=torch.long)
    mask = torch.zeros(3, 7, dtype=torch.long)
    for r, n in enumerate(lens):
        ids[r, 7 - n :] = torch.randint(3, 128, (n,))
        mask[r, 7 - n :] = 1
    ref = model.generate(
        ids,
        attention_mask=mask,
        max_new_tokens=16,
        do_sample=False,
        pad_token_id=0,
        eos_token_id=None,
    )
    res = generate(bb, None, ids, "vanilla", 16, attention_mask=mask)
    assert res.sequences[:, 7:].tolist() == ref[:, 7:].tolist()


@pytest.mark.parametrize("mode", MODES)
def test_sources_and_costs_follow_the_schedule(hf, mode):
    _, bb = hf
    stack = _heads(bb)
    ids = torch.randint(3, 128, (2, 5))
    n = 37
    res = generate(bb, stack, ids, mode, n)
    sched = InterleaveSchedule.from_mode(mode)
    expect = [sched.head(i) for i in range(n)]
    for row in res.sources:
        assert row.tolist() == expect
    assert (res.num_backbone_forwards, res.num_mctp_steps) == sched.cost(n)
    assert all(t.numel() == n for t in res.tokens)


@pytest.mark.parametrize("mode", ["balance", "boost", "turbo"])
def test_padded_batch_rows_equal_single_runs(hf, mode):
    _, bb = hf
    stack = _heads(bb)
    rows = [torch.randint(3, 128, (n,)) for n in (6, 3)]
    ids = torch.zeros(2, 6, dtype=torch.long)
    mask = torch.zeros(2, 6, dtype=torch.long)
    for r, row in enumerate(rows):
        ids[r, 6 - row.numel() :] = row
        mask[r, 6 - row.numel() :] = 1
    batch = generate(bb, stack, ids, mode, 26, attention_mask=mask)
    for r, row in enumerate(rows):
        single = generate(bb, stack, row[None], mode, 26)
        assert batch.tokens[r].tolist() == single.tokens[0].tolist()


def test_verified_greedy_equals_vanilla_with_random_heads(hf):
    _, bb = hf
    ids = torch.randint(3, 128, (2, 6))
    van = generate(bb, None, ids, "vanilla", 30)
    ver = generate(bb, _heads(bb, 4), ids, "vanilla", 30, verify=True)
    assert [t.tolist() for t in ver.tokens] == [t.tolist() for t in van.tokens]
    assert ver.acceptance_rate is not None and 0.0 <= ver.acceptance_rate <= 1.0


def test_verified_with_trained_heads_is_lossless_and_accepts(toy):
    van = generate(toy.backbone, None, toy.prompt, "vanilla", 40)
    ver = generate(toy.backbone, toy.stack, toy.prompt, "vanilla", 40, verify=True, draft_len=10)
    assert ver.tokens[0].tolist() == van.tokens[0].tolist()
    assert ver.acceptance_rate > 0.5
    assert ver.num_backbone_forwards < 0.5 * van.num_backbone_forwards
    # the sources say which tokens the heads drafted and the backbone kept
    assert (ver.sources[0] >= 0).sum() == ver.num_accepted


@pytest.mark.parametrize("mode", MODES)
def test_trained_toy_recites_its_answer_and_stops(toy, mode):
    res = generate(toy.backbone, toy.stack, toy.prompt, mode, 80, eos_token_id=2)
    assert res.tokens[0].tolist() == toy.answer
    assert res.sequences.shape[1] <= toy.prompt.shape[1] + 80


def test_audio_only_heads_give_the_same_tokens(toy):
    full = generate(toy.backbone, toy.stack, toy.prompt, "boost", 40, vocab=toy.vocab)
    audio = generate(
        toy.backbone, toy.stack, toy.prompt, "boost", 40, vocab=toy.vocab, audio_heads=True
    )
    assert audio.tokens[0].tolist() == full.tokens[0].tolist()


@pytest.mark.parametrize("mode", ["boost", "turbo"])
def test_stream_first_audio_segment_after_one_forward_and_one_chain(toy, mode):
    events = list(
        generate_stream(
            toy.backbone, toy.stack, toy.prompt, mode, 80, vocab=toy.vocab, eos_token_id=2
        )
    )
    result = events[-1].result
    assert result is not None and result.tokens[0].tolist() == toy.answer
    audio = [e for e in events if e.kind == "audio"]
    first = audio[0]
    # the first audio segment is complete: BOA..EOA of the first chain, 8 audio tokens
    assert first.ids == toy.answer[2:10]
    # it was emitted after the prefill forward plus one MCTP chain
    assert first.forwards == 1
    produced_at_emit = next(p for p, t in result.cycle_times if t >= first.time_s)
    assert produced_at_emit == 11 and result.cycle_times[1][0] == 11
    # events rebuild the answer exactly
    text = [i for e in events if e.kind == "text" for i in e.ids]
    aud = [i for e in audio for i in e.ids]
    assert aud == [t for t in toy.answer if 102 <= t < 128]
    assert text == [t for t in toy.answer if t < 99 or t == 2]
    assert events[-1].kind == "end"


def test_stream_on_a_reused_fast_path_generator(toy):
    """Two calls on one fast-path Generator (windowed prefill: 6 slots as windows of 5, and
    catch-up windows for every head backlog): the same stream, starting after one forward."""
    from mctp import EngineConfig, GenerationConfig, Generator

    cfg = GenerationConfig(mode="boost", max_new_tokens=80, eos_token_id=2)
    engine = EngineConfig(max_len=128, compile=True, compile_options={"backend": "eager"}, window=5)
    gen = Generator(toy.backbone, toy.stack, cfg, engine=engine, vocab=toy.vocab)
    for _ in range(2):
        events = list(gen.stream(toy.prompt))
        assert events[-1].result.tokens[0].tolist() == toy.answer
        first = next(e for e in events if e.kind == "audio")
        assert first.ids == toy.answer[2:10] and first.forwards == 1


def test_stream_audio_chunks_split_long_segments(toy):
    events = list(
        generate_stream(
            toy.backbone,
            toy.stack,
            toy.prompt,
            "boost",
            80,
            vocab=toy.vocab,
            audio_chunk=3,
            eos_token_id=2,
        )
    )
    sizes = [len(e.ids) for e in events if e.kind == "audio"]
    assert max(sizes) <= 3 and sum(sizes) == 24


def test_sampling_is_reproducible_with_a_seed(hf):
    _, bb = hf
    stack = _heads(bb)
    ids = torch.randint(3, 128, (2, 5))
    cfg = SamplingConfig(
        do_sample=True, temperature=0.9, top_k=20, top_p=0.9, repetition_penalty=1.2
    )
    runs = [
        generate(
            bb,
            stack,
            ids,
            "boost",
            25,
            text_sampling=cfg,
            generator=torch.Generator().manual_seed(1),
        )
        for _ in range(2)
    ]
    other = generate(
        bb, stack, ids, "boost", 25, text_sampling=cfg, generator=torch.Generator().manual_seed(2)
    )
    assert torch.equal(runs[0].sequences, runs[1].sequences)
    assert not torch.equal(runs[0].sequences, other.sequences)


def test_separate_audio_sampling_only_changes_audio_tokens(toy):
    hot = SamplingConfig(do_sample=True, temperature=50.0)
    res = generate(
        toy.backbone,
        toy.stack,
        toy.prompt,
        "boost",
        30,
        vocab=toy.vocab,
        audio_sampling=hot,
        generator=torch.Generator().manual_seed(0),
    )
    greedy = toy.answer[:30]
    got = res.tokens[0].tolist()
    # everything agrees up to the first resampled token, which is an audio token in place
    # of an audio token (text and tags are still chosen greedily)
    first = next(i for i, (g, t) in enumerate(zip(greedy, got)) if g != t)
    assert 102 <= greedy[first] < 128 and 102 <= got[first] < 128


def test_bad_arguments_raise(hf):
    _, bb = hf
    stack = _heads(bb, 4)
    ids = torch.randint(3, 128, (1, 5))
    with pytest.raises(ValueError, match="unknown mode 'fast'"):
        generate(bb, stack, ids, "fast", 5)
    with pytest.raises(ValueError, match="needs 10 MCTP slots in a row but the stack has 4 heads"):
        generate(bb, stack, ids, "boost", 5)
    with pytest.raises(ValueError, match="uses MCTP heads but no stack"):
        generate(bb, None, ids, "turbo", 5)
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1"):
        generate(bb, stack, ids, "vanilla", 0)
    with pytest.raises(ValueError, match="needs 16 cache slots, max_len is 10"):
        generate(bb, None, ids, "vanilla", 10, max_len=10)
    with pytest.raises(ValueError, match="greedy decoding only"):
        generate(
            bb, stack, ids, "vanilla", 5, verify=True, text_sampling=SamplingConfig(do_sample=True)
        )
    with pytest.raises(ValueError, match="pad prompts on the left"):
        generate(bb, None, ids, "vanilla", 5, attention_mask=torch.tensor([[1, 1, 1, 1, 0]]))
    with pytest.raises(ValueError, match=r"input_ids must be \[B, P\]"):
        generate(bb, None, ids[0], "vanilla", 5)
    with pytest.raises(ValueError, match=r"draft_len must be in \[1, 4\]"):
        generate(bb, stack, ids, "vanilla", 5, verify=True, draft_len=5)
    with pytest.raises(TypeError, match=r"unknown generation option\(s\) \['temperature'\]"):
        generate(bb, None, ids, "vanilla", 5, temperature=0.5)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        SamplingConfig(temperature=0)
    with pytest.raises(ValueError, match=r"id 128, outside the model's vocabulary \[0, 128\)"):
        generate(bb, None, torch.tensor([[5, 128]]), "vanilla", 5)
    with pytest.raises(ValueError, match="id -1, outside"):
        generate(bb, None, torch.tensor([[5, -1]]), "vanilla", 5)
    with pytest.raises(ValueError, match="needs vocab="):
        next(generate_stream(bb, None, ids, "vanilla", 5))


# --------------------------------------------------------------- VITA-Audio-Plus semantics
# An independent, uncached re-implementation of the official Plus model in plain torch: the
# audio frames replace the placeholder embeddings in the backbone only, MTP module k embeds
# the token ids (placeholders included) and runs on the positions k+1..T-1 of the sequence.


def _ref_rms(x, w, eps):
    x32 = x.float()
    return w * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def _ref_qwen2_layer(layer, x, pos, cfg):
    """One Qwen2 decoder layer on ``x [1, T, H]`` at positions ``pos [T]`` (causal)."""
    nh, nkv = cfg.num_attention_heads, cfg.num_key_value_heads
    d = cfg.hidden_size // nh
    a = layer.self_attn
    hn = _ref_rms(x, layer.input_layernorm.weight, cfg.rms_norm_eps)
    t = x.shape[1]
    q = a.q_proj(hn).view(1, t, nh, d).transpose(1, 2)
    k = a.k_proj(hn).view(1, t, nkv, d).transpose(1, 2)
    v = a.v_proj(hn).view(1, t, nkv, d).transpose(1, 2)
    theta = cfg.rope_parameters["rope_theta"]
    inv = 1.0 / theta ** (torch.arange(0, d, 2).float() / d)
    ang = pos.float()[:, None] * inv[None]
    cos, sin = torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin()

    def rot(u):
        u1, u2 = u[..., : d // 2], u[..., d // 2 :]
        return u * cos + torch.cat([-u2, u1], -1) * sin

    q, k = rot(q), rot(k)
    k = k.repeat_interleave(nh // nkv, dim=1)
    v = v.repeat_interleave(nh // nkv, dim=1)
    att = (q @ k.transpose(-1, -2)) / d**0.5
    att = att.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
    o = (att.softmax(-1) @ v).transpose(1, 2).reshape(1, t, nh * d)
    x = x + a.o_proj(o)
    m = layer.mlp
    hn = _ref_rms(x, layer.post_attention_layernorm.weight, cfg.rms_norm_eps)
    return x + m.down_proj(torch.nn.functional.silu(m.gate_proj(hn)) * m.up_proj(hn))


def _ref_plus_logits(model, stack, ids, prompt_embeds, head_prompt_embeds=None):
    """Official Plus forward on ``ids [1, T]``: backbone logits ``[1, T, V]`` and, per MTP
    module ``k``, its logits at positions ``k+1..T-1`` (``[1, T-k-1, V]``)."""
    cfg = model.config
    emb = model.model.embed_tokens
    p = prompt_embeds.shape[1]

    def embeds(over):
        x = emb(ids)
        return x if over is None else torch.cat([over, x[:, p:]], dim=1)

    hid = model.model(inputs_embeds=embeds(prompt_embeds)).last_hidden_state  # h^0, [1, T, H]
    heads_in = embeds(head_prompt_embeds)  # the official model: token ids (None)
    t = ids.shape[1]
    h, logits = hid, []
    for k, head in enumerate(stack.heads):
        if k + 1 >= t:
            break
        z = head.proj(
            torch.cat(
                [
                    _ref_rms(heads_in[:, k + 1 :], head.embed_norm.weight, cfg.rms_norm_eps),
                    _ref_rms(h[:, :-1], head.hidden_norm.weight, cfg.rms_norm_eps),
                ],
                dim=-1,
            )
        )
        y = _ref_qwen2_layer(head.block, z, torch.arange(k + 1, t), cfg)
        h = _ref_rms(y, model.model.norm.weight, cfg.rms_norm_eps)  # h^{k+1}, positions k+1..
        logits.append(model.lm_head(h))
    return model.lm_head(hid), logits


def _ref_boost_slot(i, ratio=(1, 10, 4, 10)):
    """-1 when decoded token ``i`` comes from the backbone, else the MTP module index."""
    start, j = 0, 0
    while True:
        t, a = ratio[j], ratio[j + 1]
        if i < start + t:
            return -1
        if i < start + t + a:
            return i - start - t
        start, j = start + t + a, min(j + 2, len(ratio) - 2)


def _ref_plus_generate(model, stack, ids, prompt_embeds, n, head_prompt_embeds=None):
    """Greedy official Boost generation, recomputing everything for every token."""
    seq = ids
    for i in range(n):
        main, heads = _ref_plus_logits(model, stack, seq, prompt_embeds, head_prompt_embeds)
        k = _ref_boost_slot(i)
        tok = (main if k < 0 else heads[k])[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, tok], dim=1)
    return seq


def _plus_setup(tiny_hf):
    model = tiny_hf("qwen2", seed=4)
    bb = HFBackbone(model)
    stack = _heads(bb, 10)
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(3, 99, (1, 12), generator=g)
    ids[:, 3:8] = 99  # <|context_of_audio|> placeholders
    with torch.no_grad():
        frames = bb.base.embed_tokens(ids).clone()
        frames[:, 3:8] = 3.0 * torch.randn(1, 5, frames.shape[-1], generator=g)
    return model, bb, stack, ids, frames


@torch.no_grad()
def test_plus_heads_embed_placeholder_ids_teacher_forced(tiny_hf):
    """Teacher-forced head logits (training forward and cached decoder) equal the official Plus
    model's: frames in the backbone, placeholder ids in the heads."""
    from mctp import TokenBuffer

    model, bb, stack, ids, frames = _plus_setup(tiny_hf)
    g = torch.Generator().manual_seed(8)
    seq = torch.cat([ids, torch.randint(3, 128, (1, 11), generator=g)], dim=1)  # [1, 23]
    ref_main, ref_heads = _ref_plus_logits(model, stack, seq, frames)
    full = torch.cat([frames, bb.base.embed_tokens(seq[:, 12:])], dim=1)
    hidden = bb(seq, inputs_embeds=full).hidden
    out = stack(hidden, seq)
    for k in range(10):
        torch.testing.assert_close(out.logits[k][:, k + 1 :], ref_heads[k], atol=1e-4, rtol=1e-4)
    # the opt-in (heads read the frames) is a different model
    other = stack(hidden, seq, inputs_embeds=full)
    assert not torch.allclose(other.logits[0][:, 4:8], ref_heads[0][:, 3:7], atol=1e-2)

    # cached decoder: prefill the prompt with frames, then force the 10 tokens through the heads
    buf, cache = TokenBuffer(1, 32), bb.new_cache(1, 32)
    buf.start(ids, prompt_embeds=frames)
    dec = MCTPDecoder(stack, buf)
    h0, logits0 = bb.forward_cached(buf, cache, 0)
    dec.write_backbone(0, h0)
    torch.testing.assert_close(logits0[:, -1], ref_main[:, 11], atol=1e-4, rtol=1e-4)
    buf.append(seq[:, 12:13])  # the backbone's token
    chain = dec.step(10, forced=seq[:, 13:23], return_logits=True)
    for k in range(10):  # head k, at position 12 + k, predicts token 13 + k
        torch.testing.assert_close(chain.logits[:, k], ref_heads[k][:, 11], atol=1e-4, rtol=1e-4)


@torch.no_grad()
def test_plus_boost_output_equals_official_semantics(tiny_hf):
    """Boost with audio frames in the prompt gives the official Plus tokens; the opt-in
    ``heads_read_prompt_embeds`` gives those of heads that read the frames, and they differ."""
    model, bb, stack, ids, frames = _plus_setup(tiny_hf)
    n = 30
    ref = _ref_plus_generate(model, stack, ids, frames, n)
    res = generate(bb, stack, ids, "boost", n, prompt_embeds=frames)
    assert res.sequences.tolist() == ref.tolist()
    ref_opt = _ref_plus_generate(model, stack, ids, frames, n, head_prompt_embeds=frames)
    opt = generate(bb, stack, ids, "boost", n, prompt_embeds=frames, heads_read_prompt_embeds=True)
    assert opt.sequences.tolist() == ref_opt.tolist()
    assert ref_opt.tolist() != ref.tolist()
    # prompt embeddings equal to the token embeddings change nothing
    same = generate(bb, stack, ids, "boost", n, prompt_embeds=bb.base.embed_tokens(ids))
    assert torch.equal(same.sequences, generate(bb, stack, ids, "boost", n).sequences)
    with pytest.raises(ValueError, match="heads_read_prompt_embeds=True needs prompt_embeds"):
        generate(bb, stack, ids, "boost", 5, heads_read_prompt_embeds=True)


def test_rows_stop_independently(toy):
    other = torch.randint(3, 60, (1, toy.prompt.shape[1]))
    ids = torch.cat([toy.prompt, other])
    res = generate(toy.backbone, toy.stack, ids, "boost", 60, eos_token_id=2, pad_id=0)
    assert res.tokens[0].tolist() == toy.answer
    assert res.sources[0].numel() == len(toy.answer)
    p = toy.prompt.shape[1]
    # after its stop id the row is padded in `sequences`
    assert (res.sequences[0, p + len(toy.answer) :] == 0).all()
    alone = generate(toy.backbone, toy.stack, other, "boost", 60, eos_token_id=2)
    assert res.tokens[1].tolist() == alone.tokens[0].tolist()
