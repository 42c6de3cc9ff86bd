"""Regional compilation (mctp/engine/regions.py): one graph per kind of block, shared by all
layers and heads, with the same tokens as the eager path and as whole graphs."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters
from transformers import Qwen2Config, Qwen2ForCausalLM

from mctp import GenerationConfig, Generator, MCTPStack, generate
from mctp.backbones import HFBackbone
from mctp.engine.regions import BlockRegions, block_key
from mctp.interleave import InterleaveSchedule

EAGER = {"backend": "eager"}  # Dynamo traces and guards as with Inductor, no code generation


def _model(layers: int = 2, seed: int = 0, **cfg) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    shape = dict(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    config = Qwen2Config(num_hidden_layers=layers, **{**shape, **cfg})
    model = Qwen2ForCausalLM(config).eval()
    with torch.no_grad():  # sharper logits: greedy tokens vary (no repeated-token runs)
        model.lm_head.weight.mul_(8.0)
    return model


def test_layers_that_differ_only_in_their_index_share_a_key():
    model = _model(layers=3)
    keys = {block_key(layer) for layer in model.model.layers}
    assert len(keys) == 1
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == [0, 1, 2]


def test_a_setting_or_a_shape_that_differs_gives_another_key():
    model = _model(
        layers=2,
        layer_types=["full_attention", "sliding_attention"],
        use_sliding_window=True,
        sliding_window=8,
    )
    full, sliding = model.model.layers
    assert block_key(full) != block_key(sliding)  # the window is a plain setting
    wider = _model(layers=1, seed=0, intermediate_size=96).model.layers[0]
    assert block_key(wider) != block_key(full)


def test_template_holds_no_weights_and_shares_the_config():
    from mctp.engine.regions import _meta_template

    layer = _model().model.layers[0]
    template = _meta_template(layer)
    assert all(p.is_meta for p in template.parameters())
    assert template.self_attn.config is layer.self_attn.config
    assert all(not p.is_meta for p in layer.parameters())  # the original is untouched


@pytest.mark.parametrize("mode", ["vanilla", "boost", "turbo"])
def test_regions_equal_whole_graphs_and_the_eager_path(mode):
    """Fixed shapes through shared layer and head graphs give the eager path's tokens (and
    those of whole graphs), for a left-padded batch; the heads are shaped so that their
    tokens are not one repeated id."""
    bb = HFBackbone(_model(layers=3))
    stack = MCTPStack.from_backbone(bb.parts(), 10).eval() if mode != "vanilla" else None
    if stack is not None:
        with torch.no_grad():
            for head in stack.heads:
                head.proj.weight.mul_(4.0)
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 128, (2, 14), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    ref = generate(bb, stack, ids, mode, 40, attention_mask=mask)
    assert len(set(ref.tokens[0].tolist())) > 5
    outs = {}
    for regions in (True, False):
        gen = Generator(
            bb,
            stack,
            GenerationConfig(mode=mode, max_new_tokens=40),
            max_batch=2,
            max_len=96,
            compile=True,
            compile_options=EAGER,
            window=11,
            compile_regions=regions,
        )
        assert (gen.path.regions is not None) == regions
        outs[regions] = gen.generate(ids, attention_mask=mask)
    for res in outs.values():
        assert torch.equal(res.sequences, ref.sequences)
    assert outs[True].num_backbone_forwards == ref.num_backbone_forwards


def test_one_graph_per_kind_of_block_whatever_the_depth():
    """Dynamo traces as many frames for a 4-layer backbone with 6 heads as for 2 layers with 2
    heads: the graphs are per kind of block (plus the logits), not per layer, head or chain."""
    frames = []
    for layers, heads in ((2, 3), (4, 6)):
        bb = HFBackbone(_model(layers=layers))
        stack = MCTPStack.from_backbone(bb.parts(), heads).eval()
        gen = Generator(
            bb,
            stack,
            # runs of every length up to the heads: whole graphs would compile each chain
            GenerationConfig(mode=InterleaveSchedule([1, heads, 1, 2, 1, 3]), max_new_tokens=24),
            max_len=64,
            compile=True,
            compile_options=EAGER,
            window=11,
        )
        counters.clear()
        gen.generate(torch.arange(3, 17)[None])
        frames.append(counters["stats"]["unique_graphs"])
        assert gen.path.regions.num_graphs == 2  # one layer kind, one head kind
    assert frames[0] == frames[1] > 0


def test_regions_refuse_freezing():
    with pytest.raises(ValueError, match="freezing"):
        BlockRegions(lambda fn, name: fn, options={"freezing": True})
    bb = HFBackbone(_model())
    gen = Generator(bb, None, GenerationConfig(mode="vanilla", max_new_tokens=4), max_len=32,
                    compile=True, compile_options=EAGER, window=4)  # fmt: skip
    with torch._inductor.config.patch(freezing=True), pytest.raises(RuntimeError, match="freezing"):
        gen.generate(torch.arange(3, 10)[None])


def test_regions_need_a_backbone_that_supports_them():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4)).eval()
    bb = HFBackbone(gpt2)
    assert not bb.supports_regions
    from mctp.engine.fast_path import FastPath

    with pytest.raises(ValueError, match="regions=True"):
        FastPath(bb, device=torch.device("cpu"), regions=True)
    x = torch.zeros(1, 1, bb.hidden_size)
    idx = torch.zeros(1, dtype=torch.long)
    with pytest.raises(ValueError, match="cannot run its layers as compiled regions"):
        bb.decode(
            x,
            idx[None],
            idx,
            torch.ones(1, 1, dtype=torch.bool),
            bb.new_cache(1, 8),
            regions=object(),
        )


def test_defaults_on_for_cpu_off_for_cuda():
    from mctp.engine.fast_path import FastPath

    bb = HFBackbone(_model())
    assert FastPath(bb, device=torch.device("cpu"), compile_options=EAGER).regions is not None
    cuda = FastPath(bb, device=torch.device("cuda"), compile_options=EAGER)
    assert cuda.regions is None and cuda.fixed_chains


def test_regional_graphs_skip_guards_on_globals_only(monkeypatch):
    """Regions compile with Dynamo's guards on globals dropped (a layer call checks its own
    arguments only); the caller's options are neither lost nor changed, and a compile mode
    (torch takes a mode or options) gets no filter."""
    from mctp.engine import fast_path

    seen: list[dict] = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: seen.append(kw) or fn)
    options = {"max_autotune": False}
    fast_path._compile_region({"dynamic": False, "options": options}, lambda x: x, "t")
    fast_path._compile_region({"dynamic": False, "mode": "default"}, lambda x: x, "t")
    assert seen[0]["options"] == {
        "guard_filter_fn": torch.compiler.skip_guard_on_globals_unsafe,
        "max_autotune": False,
    }
    assert options == {"max_autotune": False}
    assert "options" not in seen[1] and seen[1]["mode"] == "default"


def test_block_graphs_also_skip_module_guards_shared_functions_do_not(monkeypatch):
    """A block's graph (one per kind, called with its own meta template only) drops the
    guards on modules too; the shared functions (logits, head token), called with different
    modules, keep them."""
    from mctp.engine import fast_path

    filters: dict[str, object] = {}

    def spy(fn, **kw):
        filters[fn.__name__] = (kw.get("options") or {}).get("guard_filter_fn")
        return fn

    monkeypatch.setattr(torch, "compile", spy)
    bb = HFBackbone(_model())
    stack = MCTPStack.from_backbone(bb.parts(), 10).eval()
    config = GenerationConfig(mode="turbo", max_new_tokens=40)
    gen = Generator(bb, stack, config, max_len=96, compile=True, window=11)
    gen.generate(torch.arange(3, 17)[None])
    blocks = {k: v for k, v in filters.items() if k.startswith("mctp_region")}
    shared = {k: v for k, v in filters.items() if k in ("mctp_backbone_logits", "mctp_head_token")}
    assert len(blocks) == 2 and len(shared) == 2, filters
    assert all(v is fast_path._template_guards for v in blocks.values())
    assert all(v is torch.compiler.skip_guard_on_globals_unsafe for v in shared.values())


def test_full_and_audio_only_heads_on_one_backbone_keep_their_own_graphs():
    """Two Generators on one backbone share its regions (same options); one runs the heads
    over the whole vocabulary, the other over the audio tokens only (a view of the same heads
    whose token step sees another module). Run in turns, each gives its own eager tokens, and
    the two differ (the check could see one reuse the other's graph)."""
    from mctp.speech_vocab import AUDIO_PLACEHOLDER, BOA, EOA, SpeechVocab

    bb = HFBackbone(_model(layers=2))
    stack = MCTPStack.from_backbone(bb.parts(), 10).eval()
    with torch.no_grad():
        for head in stack.heads:
            head.proj.weight.mul_(4.0)
    vocab = SpeechVocab(
        special={BOA: 100, EOA: 101, AUDIO_PLACEHOLDER: 99},
        audio_start=102,
        num_audio=26,
        vocab_size=128,
    )
    ids = torch.randint(3, 99, (1, 14), generator=torch.Generator().manual_seed(5))
    refs, gens = {}, {}
    for audio in (False, True):
        config = GenerationConfig(mode="turbo", max_new_tokens=40)
        refs[audio] = Generator(bb, stack, config, vocab=vocab, audio_heads=audio).generate(ids)
        gens[audio] = Generator(
            bb,
            stack,
            config,
            vocab=vocab,
            audio_heads=audio,
            max_len=96,
            compile=True,
            compile_options=EAGER,
            window=11,
        )
    assert gens[False].path.regions is gens[True].path.regions
    assert not torch.equal(refs[False].sequences, refs[True].sequences)
    for audio in (False, True, False, True):
        assert torch.equal(gens[audio].generate(ids).sequences, refs[audio].sequences), audio
