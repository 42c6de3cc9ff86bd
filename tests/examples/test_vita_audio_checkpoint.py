"""examples/vita_audio: official VITA-Audio checkpoints in, official checkpoints out.

Every checkpoint here is written in the test: a tiny Qwen2 config with the official
``qwen2_mtp`` fields, random weights under the official key names (``model.layers.{0..L+N-1}``,
``mtp_projs.{i}``, ``mtp_embed_norms.{i}``, ``mtp_hidden_norms.{i}``), as one file or as shards
with an index json.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from vita_audio.checkpoint import (
    INDEX_FILE,
    SINGLE_FILE,
    convert_key,
    load_vita_audio,
    save_vita_audio,
    to_official_key,
)
from vita_audio.model import VitaAudio

from mctp import generate
from mctp.checkpoint import CheckpointError

ROOT = Path(__file__).resolve().parents[2]

L, N, H, V = 2, 10, 32, 96


def _config(num_heads: int = N, **overrides) -> dict:
    """An official-style config.json (7B Boost field set, tiny sizes)."""
    cfg = {
        "num_nextn_predict_layers": num_heads,
        "architectures": ["Qwen2MTPForCausalLM"],
        "auto_map": {
            "AutoConfig": "configuration_qwen2.Qwen2MTPConfig",
            "AutoModelForCausalLM": "modeling_qwen2.Qwen2MTPForCausalLM",
        },
        "attention_dropout": 0.0,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "hidden_act": "silu",
        "hidden_size": H,
        "initializer_range": 0.02,
        "intermediate_size": 64,
        "max_position_embeddings": 256,
        "max_window_layers": 28,
        "model_type": "qwen2_mtp",
        "mtp_loss_weight": 0.25,
        "num_attention_heads": 4,
        "num_hidden_layers": L + num_heads,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0,
        "sliding_window": 131072,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "transformers_version": "4.48.3",
        "use_cache": True,
        "use_sliding_window": False,
        "vocab_size": V,
    }
    cfg.update(overrides)
    return cfg


def _tensors(num_heads: int = N, *, tied: bool = False, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights under the official key names; every tensor distinct."""
    g = torch.Generator().manual_seed(seed)
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (V, H)}
    layer = {
        "self_attn.q_proj.weight": (H, H),
        "self_attn.q_proj.bias": (H,),
        "self_attn.k_proj.weight": (16, H),
        "self_attn.k_proj.bias": (16,),
        "self_attn.v_proj.weight": (16, H),
        "self_attn.v_proj.bias": (16,),
        "self_attn.o_proj.weight": (H, H),
        "mlp.gate_proj.weight": (64, H),
        "mlp.up_proj.weight": (64, H),
        "mlp.down_proj.weight": (H, 64),
        "input_layernorm.weight": (H,),
        "post_attention_layernorm.weight": (H,),
    }
    for j in range(L + num_heads):
        shapes.update({f"model.layers.{j}.{k}": s for k, s in layer.items()})
    shapes["model.norm.weight"] = (H,)
    if not tied:
        shapes["lm_head.weight"] = (V, H)
    for i in range(num_heads):
        shapes[f"mtp_projs.{i}.weight"] = (H, 2 * H)
        shapes[f"mtp_embed_norms.{i}.weight"] = (H,)
        shapes[f"mtp_hidden_norms.{i}.weight"] = (H,)
    out = {}
    for key, shape in shapes.items():
        x = torch.randn(shape, generator=g)
        out[key] = 1.0 + 0.2 * x if len(shape) == 1 and "norm" in key else 0.5 * x
    return out


def _write(folder: Path, config: dict, tensors: dict[str, torch.Tensor], shards: int = 1) -> Path:
    """Write an official checkpoint folder: one model.safetensors or ``shards`` files + index."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    if shards == 1:
        save_file(tensors, folder / SINGLE_FILE, metadata={"format": "pt"})
        return folder
    keys = list(tensors)
    weight_map = {}
    for s in range(shards):
        name = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: tensors[k] for k in keys[s::shards]}
        save_file(part, folder / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, name))
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (folder / INDEX_FILE).write_text(json.dumps(index))
    return folder


def _word_tokenizer(n: int):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, **{f"w{i}": i + 1 for i in range(n - 1)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")


@pytest.fixture(scope="module")
def official() -> tuple[dict, dict[str, torch.Tensor]]:
    """The raw config and tensors of a tiny L=2, N=10 official checkpoint."""
    return _config(), _tensors()


@pytest.fixture(scope="module")
def loaded(official, tmp_path_factory):
    """That checkpoint written as one file and loaded."""
    folder = _write(tmp_path_factory.mktemp("official"), *official)
    return load_vita_audio(folder)


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


# --------------------------------------------------------------------------- key mapping
def test_convert_key_table():
    assert convert_key("model.embed_tokens.weight", 28) == "model.embed_tokens.weight"
    assert (
        convert_key("model.layers.27.mlp.up_proj.weight", 28)
        == "model.layers.27.mlp.up_proj.weight"
    )
    assert (
        convert_key("model.layers.28.mlp.up_proj.weight", 28) == "heads.0.block.mlp.up_proj.weight"
    )
    assert convert_key("model.layers.37.self_attn.q_proj.bias", 28) == (
        "heads.9.block.self_attn.q_proj.bias"
    )
    assert convert_key("mtp_projs.3.weight", 28) == "heads.3.proj.weight"
    assert convert_key("mtp_embed_norms.9.weight", 28) == "heads.9.embed_norm.weight"
    assert convert_key("mtp_hidden_norms.0.weight", 28) == "heads.0.hidden_norm.weight"
    assert convert_key("model.norm.weight", 28) == "model.norm.weight"
    assert convert_key("lm_head.weight", 28) == "lm_head.weight"
    assert convert_key("model.audio_model.x.weight", 28) == "model.audio_model.x.weight"
    for key in _tensors():
        assert to_official_key(convert_key(key, L), L) == key
    with pytest.raises(ValueError, match=r"heads\.0\.foo\.weight"):
        to_official_key("heads.0.foo.weight", L)
    with pytest.raises(ValueError, match=r"model\.layers\.2\."):
        to_official_key("model.layers.2.mlp.up_proj.weight", L)  # an MCTP layer index
    with pytest.raises(ValueError, match="num_backbone_layers"):
        convert_key("lm_head.weight", 0)


# --------------------------------------------------------------------------- loading
@pytest.mark.parametrize("shards", [1, 3])
def test_every_tensor_lands_where_it_should(official, tmp_path, shards):
    config, tensors = official
    ck = load_vita_audio(_write(tmp_path, config, tensors, shards))
    assert (ck.num_heads, ck.num_backbone_layers, ck.mtp_loss_weight) == (N, L, 0.25)
    assert ck.stack is not None and ck.stack.num_heads == N and ck.extra == {}
    assert ck.config == config
    backbone_sd = ck.backbone.model.state_dict()
    assert len(backbone_sd) + len(ck.stack.state_dict()) == len(tensors)  # nothing left over
    # Looked up by module attribute, independently of convert_key.
    for i, head in enumerate(ck.stack.heads):
        assert torch.equal(head.proj.weight, tensors[f"mtp_projs.{i}.weight"])
        assert torch.equal(head.embed_norm.weight, tensors[f"mtp_embed_norms.{i}.weight"])
        assert torch.equal(head.hidden_norm.weight, tensors[f"mtp_hidden_norms.{i}.weight"])
        block = head.block.state_dict()
        assert len(block) == 12
        for name, value in block.items():
            assert torch.equal(value, tensors[f"model.layers.{L + i}.{name}"]), (i, name)
    assert len(ck.backbone.model.model.layers) == L
    for key, value in backbone_sd.items():
        assert torch.equal(value, tensors[key]), key
    # The heads share the backbone's embedding, final norm and lm_head.
    assert ck.stack.embed is ck.backbone.model.model.embed_tokens
    assert ck.stack.norm is ck.backbone.model.model.norm
    assert ck.stack.lm_head is ck.backbone.model.lm_head
    assert not any(t.is_meta for t in ck.backbone.model.state_dict().values())
    assert ck.backbone.model.model.rotary_emb.inv_freq.dtype == torch.float32


def test_loaded_model_computes_the_official_arithmetic(official, loaded):
    """Backbone = layers 0..L-1 + norm; MCTP module k = norm(layer L+k(proj(cat[en(E x_t),
    hn(h_{t-1})]))) at positions t > k, cascaded; computed here from the raw tensors."""
    import transformers as tf

    config, tensors = official
    q = tf.Qwen2Config(
        **{k: v for k, v in config.items() if k not in ("model_type", "architectures", "auto_map")}
    )
    q._attn_implementation = "sdpa"
    ref = tf.Qwen2ForCausalLM(q).eval()  # all L + N layers, as the official model holds them
    ref.load_state_dict({k: v for k, v in tensors.items() if not k.startswith("mtp_")})
    base, eps = ref.model, config["rms_norm_eps"]
    ids = torch.tensor([[5, 17, 3, 88, 41, 9, 60, 23, 77, 12, 30, 2, 54, 65]])
    t = ids.shape[1]
    pos = torch.arange(t)[None]
    with torch.no_grad():
        x = base.embed_tokens(ids)
        rope = base.rotary_emb(x, pos)
        for layer in base.layers[:L]:
            x = layer(x, position_ids=pos, position_embeddings=rope)
        h = base.norm(x)
        ours = loaded.backbone(ids).hidden
        torch.testing.assert_close(ours, h, atol=1e-5, rtol=1e-5)
        heads = loaded.stack(ours, ids).hidden
        emb = base.embed_tokens(ids)
        for k in range(N):
            e = _rms(emb[:, k + 1 :], tensors[f"mtp_embed_norms.{k}.weight"], eps)
            prev = _rms(h[:, k : t - 1], tensors[f"mtp_hidden_norms.{k}.weight"], eps)
            z = torch.cat((e, prev), dim=-1) @ tensors[f"mtp_projs.{k}.weight"].T
            p = pos[:, k + 1 :]
            y = base.layers[L + k](z, position_ids=p, position_embeddings=base.rotary_emb(z, p))
            new = torch.zeros_like(h)
            new[:, k + 1 :] = base.norm(y)
            h = new
            torch.testing.assert_close(heads[k][:, k + 1 :], h[:, k + 1 :], atol=1e-4, rtol=1e-4)


def test_packed_row_label_shift_at_sample_ends(loaded):
    """Packed row, every label scored: mctp scores head k at t only when t+1 continues t's
    sample; the official trainer (ForCausalLMLoss over the positions with id > k, compacted)
    shifts across sample ends, scoring the last token of a sample on the next sample's token
    at position k+1. Both numbers are computed here from the heads' logits; they differ."""
    from mctp import mctp_loss

    g = torch.Generator().manual_seed(3)
    lens = [14, 17, 15]  # every sample longer than N + 1: each head sees all three
    ids = torch.randint(3, V, (1, sum(lens)), generator=g)
    pos = torch.cat([torch.arange(n) for n in lens])[None]
    labels = ids.clone()  # every label scored (e.g. pre-training-style rows)
    ce = torch.nn.functional.cross_entropy
    with torch.no_grad():
        hidden = loaded.backbone(ids, position_ids=pos).hidden
        out = loaded.stack(hidden, ids, position_ids=pos, labels=labels)
        ours = mctp_loss(loaded.stack, hidden, ids, labels, position_ids=pos).per_head.mean()
        mine, official = [], []
        for k in range(N):
            keep = pos[0] > k
            lg, lb, p = out.logits[k][0][keep], labels[0][keep], pos[0][keep]
            official.append(ce(lg[:-1], lb[1:]))  # the official shift on the compacted row
            cont = p[1:] == p[:-1] + 1  # ours: stop at sample ends
            mine.append(ce(lg[:-1][cont], lb[1:][cont]))
            # one target fewer per inner sample end (2 here)
            assert int(out.num_targets[k]) == int(cont.sum()) == len(lb) - 1 - 2
    torch.testing.assert_close(ours, torch.stack(mine).mean())
    official_loss = torch.stack(official).mean()
    assert abs(float(official_loss) - float(ours)) > 1e-3
    # the numbers docs/mctp.md quotes
    assert abs(float(ours) - 8.4682) < 1e-3 and abs(float(official_loss) - 8.3964) < 1e-3


def test_generate_boost_with_the_loaded_stack(loaded):
    ids = torch.tensor([[5, 17, 3, 88]])
    out = generate(loaded.backbone, loaded.stack, ids, "boost", 30)
    assert out.tokens[0].numel() == 30
    # Boost [1, 10, 4, 10]: 1 backbone token, heads 0..9, 4 backbone tokens, heads 0..9, ...
    expected = [-1, *range(10), -1, -1, -1, -1, *range(10), -1, -1, -1, -1, 0]
    assert out.sources[0].tolist() == expected
    assert int(out.tokens[0].min()) >= 0 and int(out.tokens[0].max()) < V


# --------------------------------------------------------------------------- strictness
@pytest.mark.parametrize(
    "key",
    [
        "mtp_hidden_norms.3.weight",
        "mtp_projs.9.weight",
        "model.layers.11.mlp.up_proj.weight",  # the last MCTP layer
        "model.layers.1.self_attn.k_proj.bias",
        "lm_head.weight",
    ],
)
def test_missing_key_is_named(official, tmp_path, key):
    config, tensors = official
    folder = _write(tmp_path, config, {k: v for k, v in tensors.items() if k != key})
    with pytest.raises(CheckpointError, match="missing keys") as info:
        load_vita_audio(folder)
    assert info.value.missing == [key] and not info.value.unexpected


@pytest.mark.parametrize(
    "key",
    ["mtp_projs.10.weight", "model.layers.12.input_layernorm.weight", "model.vision.weight"],
)
def test_unexpected_key_is_named(official, tmp_path, key):
    config, tensors = official
    folder = _write(tmp_path, config, {**tensors, key: torch.ones(H)})
    with pytest.raises(CheckpointError, match="unexpected keys") as info:
        load_vita_audio(folder)
    assert info.value.unexpected == [key] and not info.value.missing
    # ... unless it is ignored on purpose.
    ck = load_vita_audio(folder, ignore=[key.rsplit(".", 1)[0] + ".*"])
    assert ck.num_heads == N


def test_mismatched_shape_and_broken_folders(official, tmp_path):
    config, tensors = official
    bad = dict(tensors, **{"mtp_projs.2.weight": torch.zeros(H, H)})
    with pytest.raises(CheckpointError, match=r"mtp_projs\.2\.weight") as info:
        load_vita_audio(_write(tmp_path / "shape", config, bad))
    assert info.value.mismatched == [("mtp_projs.2.weight", (H, H), (H, 2 * H))]
    # A config that counts one layer too few (L-1 backbone layers) leaves the last one over.
    with pytest.raises(CheckpointError, match=r"unexpected keys \(12\): model\.layers\.11\."):
        load_vita_audio(_write(tmp_path / "count", _config(num_hidden_layers=L + N - 1), tensors))
    with pytest.raises(ValueError, match="model_type 'llama'"):
        load_vita_audio(_write(tmp_path / "type", _config(model_type="llama"), tensors))
    with pytest.raises(ValueError, match="num_nextn_predict_layers"):
        load_vita_audio(_write(tmp_path / "n", _config(num_nextn_predict_layers=L + N), tensors))
    sharded = _write(tmp_path / "sharded", config, tensors, shards=3)
    (sharded / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model-00002-of-00003"):
        load_vita_audio(sharded)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text(json.dumps(config))
    with pytest.raises(FileNotFoundError, match=INDEX_FILE):
        load_vita_audio(tmp_path / "empty")


def test_zero_heads_gives_no_stack(tmp_path):
    folder = _write(tmp_path / "n0", _config(0), _tensors(0))
    ck = load_vita_audio(folder)
    assert ck.stack is None and ck.num_heads == 0 and ck.num_backbone_layers == L
    ids = torch.tensor([[5, 17, 3]])
    assert generate(ck.backbone, None, ids, "vanilla", 5).tokens[0].numel() == 5
    with pytest.raises(ValueError, match="needs 10 MCTP heads"):
        VitaAudio(backbone=ck.backbone, stack=None, mode="boost")
    save_vita_audio(ck.backbone, None, tmp_path / "out")
    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (saved["num_nextn_predict_layers"], saved["num_hidden_layers"]) == (0, L)
    assert load_vita_audio(tmp_path / "out").stack is None


# --------------------------------------------------------------------------- saving
@pytest.mark.parametrize("shard_size", ["5GB", 20_000])
def test_round_trip_save_load(official, loaded, tmp_path, shard_size):
    config, tensors = official
    out = save_vita_audio(
        loaded.backbone,
        loaded.stack,
        tmp_path / "saved",
        mtp_loss_weight=loaded.mtp_loss_weight,
        shard_size=shard_size,
        base_config=loaded.config,
        mtp_inference_mode=[1, 10, 4, 10],
    )
    from safetensors.torch import load_file

    if shard_size == "5GB":
        assert not (out / INDEX_FILE).exists()
        saved = load_file(out / SINGLE_FILE)
    else:
        assert not (out / SINGLE_FILE).exists()
        index = json.loads((out / INDEX_FILE).read_text())
        files = sorted(set(index["weight_map"].values()))
        assert len(files) > 1 and files[0].endswith(f"-of-{len(files):05d}.safetensors")
        saved = {}
        for name in files:
            part = load_file(out / name)
            assert (
                sum(v.numel() * v.element_size() for v in part.values()) <= 20_000 or len(part) == 1
            )
            saved.update(part)
        assert index["metadata"]["total_size"] == sum(
            v.numel() * v.element_size() for v in saved.values()
        )
    # Official key names and identical tensors: the exact inverse of loading.
    assert set(saved) == set(tensors)
    for key, value in tensors.items():
        assert torch.equal(saved[key], value), key
    written = json.loads((out / "config.json").read_text())
    for field in (
        "model_type",
        "architectures",
        "num_hidden_layers",
        "num_nextn_predict_layers",
        "mtp_loss_weight",
        "hidden_size",
        "rope_theta",
        "rms_norm_eps",
        "sliding_window",
        "torch_dtype",
    ):
        assert written[field] == config[field], field
    # auto_map would name configuration_qwen2.py/modeling_qwen2.py, which are not written
    assert "auto_map" not in written
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["mtp_inference_mode"] == [1, 10, 4, 10]

    again = load_vita_audio(out)
    for key, value in tensors.items():
        mapped = convert_key(key, L)
        sd = (
            again.stack.state_dict()
            if mapped.startswith("heads.")
            else again.backbone.model.state_dict()
        )
        assert torch.equal(sd[mapped], value), key
    ids = torch.tensor([[5, 17, 3, 88], [40, 2, 7, 19]])
    first = generate(loaded.backbone, loaded.stack, ids, "boost", 40)
    second = generate(again.backbone, again.stack, ids, "boost", 40)
    assert torch.equal(first.sequences, second.sequences)


def test_tied_embeddings(tmp_path):
    config = _config(3, tie_word_embeddings=True)
    tensors = _tensors(3, tied=True)
    ck = load_vita_audio(_write(tmp_path / "tied", config, tensors))
    assert ck.backbone.model.lm_head.weight is ck.backbone.model.model.embed_tokens.weight
    assert torch.equal(ck.stack.lm_head.weight, tensors["model.embed_tokens.weight"])
    out = save_vita_audio(ck.backbone, ck.stack, tmp_path / "out")
    from safetensors.torch import load_file

    assert set(load_file(out / SINGLE_FILE)) == set(tensors)  # no lm_head.weight, as HF saves it
    same = dict(tensors, **{"lm_head.weight": tensors["model.embed_tokens.weight"].clone()})
    assert load_vita_audio(_write(tmp_path / "same", config, same)).num_heads == 3
    differs = dict(tensors, **{"lm_head.weight": torch.zeros(V, H)})
    with pytest.raises(CheckpointError, match=r"lm_head\.weight differs"):
        load_vita_audio(_write(tmp_path / "differs", config, differs))


def test_rope_scaling_round_trip(tmp_path):
    scaling = {"type": "linear", "factor": 2.0}
    ck = load_vita_audio(_write(tmp_path / "in", _config(1, rope_scaling=scaling), _tensors(1)))
    assert ck.backbone.config.rope_parameters == {
        "rope_type": "linear",
        "factor": 2.0,
        "rope_theta": 1e6,
    }
    out = save_vita_audio(ck.backbone, ck.stack, tmp_path / "out")
    written = json.loads((out / "config.json").read_text())
    assert written["rope_theta"] == 1e6
    assert written["rope_scaling"] == {"rope_type": "linear", "factor": 2.0}
    assert load_vita_audio(out).backbone.config.rope_parameters["factor"] == 2.0


def test_plus_variant_keeps_audio_tensors(tmp_path):
    extra = {
        "model.audio_model.encoder.layer.weight": torch.randn(8, 4),
        "model.audio_projection.linear_1.weight": torch.randn(H, 8),
    }
    config = _config(2, model_type="qwen2_mtp_sensevoice")
    ck = load_vita_audio(_write(tmp_path / "plus", config, {**_tensors(2), **extra}))
    assert set(ck.extra) == set(extra) and ck.num_heads == 2
    assert all(torch.equal(ck.extra[k], v) for k, v in extra.items())
    out = save_vita_audio(ck.backbone, ck.stack, tmp_path / "out", extra=ck.extra)
    written = json.loads((out / "config.json").read_text())
    assert written["model_type"] == "qwen2_mtp_sensevoice"
    assert written["architectures"] == ["Qwen2MTPSenseVoiceForCausalLM"]
    again = load_vita_audio(out)
    assert all(torch.equal(again.extra[k], v) for k, v in extra.items())
    with pytest.raises(ValueError, match="extra tensors"):
        save_vita_audio(
            ck.backbone, ck.stack, tmp_path / "bad", extra={"vision.weight": torch.ones(1)}
        )


def test_save_refuses_foreign_parts(loaded, tmp_path):
    other = load_vita_audio(_write(tmp_path / "other", _config(2), _tensors(2, seed=1)))
    with pytest.raises(ValueError, match="does not share this backbone"):
        save_vita_audio(loaded.backbone, other.stack, tmp_path / "x")
    with pytest.raises(ValueError, match="shard_size"):
        save_vita_audio(loaded.backbone, loaded.stack, tmp_path / "y", shard_size="lots")


# --------------------------------------------------------------------------- composition
def test_vita_audio_from_pretrained(official, loaded, tmp_path):
    from mctp.backbones import extend_vocab

    tok = _word_tokenizer(40)
    speech = extend_vocab(tok, num_audio_tokens=32)  # 40 words + 20 tags + 32 codes -> 96 rows
    assert speech.vocab_size == V
    folder = save_vita_audio(loaded.backbone, loaded.stack, tmp_path / "with_tok", tokenizer=tok)
    model = VitaAudio.from_pretrained(folder, mode="boost")
    assert model.vocab == speech and model.tokenizer is not None and model.mode == "boost"
    assert model.eos_token_id == 2
    # The official generation_config.json's schedule becomes the default mode.
    gen = json.loads((folder / "generation_config.json").read_text())
    gen.update(mtp_inference_mode=[1, 4, 3, 8, 4, 10], eos_token_id=[2, 1])
    (folder / "generation_config.json").write_text(json.dumps(gen))
    balance = VitaAudio.from_pretrained(folder)
    assert balance.mode.ratio == (1, 4, 3, 8, 4, 10) and balance.eos_token_id == [2, 1]
    ids = torch.tensor([[5, 17, 3, 88]])
    res = model.generate(ids, max_new_tokens=20, eos_token_id=None)
    ref = generate(loaded.backbone, loaded.stack, ids, "boost", 20, vocab=speech)
    assert torch.equal(res.sequences, ref.sequences)
    events = list(model.generate_stream(ids, max_new_tokens=20, eos_token_id=None))
    assert events[-1].kind == "end" and events[-1].result is not None
    streamed = [t for e in events if e.kind == "text" for t in e.ids]
    assert set(streamed) <= set(ref.tokens[0].tolist())

    bare = save_vita_audio(loaded.backbone, loaded.stack, tmp_path / "bare")
    with pytest.raises(ValueError, match="pass vocab="):
        VitaAudio.from_pretrained(bare)
    assert VitaAudio.from_pretrained(bare, vocab=speech, mode="turbo").vocab == speech
    with pytest.raises(ValueError, match="unknown interleave mode"):
        VitaAudio.from_pretrained(bare, vocab=speech, mode="fast")


# ------------------------------------------------------------- modes and loadable folders
@pytest.mark.parametrize(
    ("ratio", "expected"),
    [(None, (1, 10)), ([8192, 0], None), ([1, 4, 3, 8, 4, 10], (1, 4, 3, 8, 4, 10))],
)
def test_from_pretrained_reads_the_official_modes(loaded, tmp_path, ratio, expected):
    """No mtp_inference_mode: the official default [1, N] (Turbo); [8192, 0]: Vanilla."""
    from mctp.backbones import extend_vocab

    speech = extend_vocab(_word_tokenizer(40), num_audio_tokens=32)
    folder = save_vita_audio(
        loaded.backbone, loaded.stack, tmp_path / "m", mtp_inference_mode=ratio
    )
    model = VitaAudio.from_pretrained(folder, vocab=speech)
    if expected is None:
        assert not model.mode.uses_mctp
        assert model.generate(torch.tensor([[5, 17, 3]]), max_new_tokens=6).num_mctp_steps == 0
    else:
        assert model.mode.ratio == expected


def test_one_head_stage2_checkpoint_opens_without_a_mode(tmp_path):
    """The recipe's stage-2 checkpoint (one head, no mode) runs [1, 1]: backbone, head 0, ..."""
    from mctp.backbones import extend_vocab

    speech = extend_vocab(_word_tokenizer(40), num_audio_tokens=32)
    ck = load_vita_audio(_write(tmp_path / "n1", _config(1), _tensors(1)))
    folder = save_vita_audio(ck.backbone, ck.stack, tmp_path / "out")
    assert "mtp_inference_mode" not in json.loads((folder / "generation_config.json").read_text())
    model = VitaAudio.from_pretrained(folder, vocab=speech)
    assert model.mode.ratio == (1, 1)
    res = model.generate(torch.tensor([[5, 17, 3]]), max_new_tokens=6, eos_token_id=None)
    assert res.sources[0].tolist() == [-1, 0, -1, 0, -1, 0]
    gen_file = folder / "generation_config.json"
    for ratio, match in (([1, 10, 4], "mtp_inference_mode"), ([1, 10, 4, 10], "needs 10 MCTP")):
        gen_file.write_text(json.dumps({"mtp_inference_mode": ratio}))
        with pytest.raises(ValueError, match=match):
            VitaAudio.from_pretrained(folder, vocab=speech)


def test_save_refuses_a_mode_the_folder_cannot_run(loaded, tmp_path):
    """A Boost mode for a 4-head stack is refused at save time, before anything is written."""
    four = load_vita_audio(_write(tmp_path / "n4", _config(4), _tensors(4)))
    with pytest.raises(ValueError, match=r"runs 10 MCTP heads in a row but the checkpoint has 4"):
        save_vita_audio(
            four.backbone, four.stack, tmp_path / "x", mtp_inference_mode=[1, 10, 4, 10]
        )
    assert not (tmp_path / "x").exists()
    with pytest.raises(ValueError, match=r"has 0"):
        save_vita_audio(four.backbone, None, tmp_path / "y", mtp_inference_mode=[1, 4])
    with pytest.raises(ValueError, match=r"mtp_inference_mode \[1, 10, 4\]"):
        save_vita_audio(
            loaded.backbone, loaded.stack, tmp_path / "z", mtp_inference_mode=[1, 10, 4]
        )
    model = VitaAudio(backbone=four.backbone, stack=four.stack, mode="vanilla")
    model.mode = "boost"  # a mode the constructor would have refused
    with pytest.raises(ValueError, match="checkpoint has 4"):
        model.save_pretrained(tmp_path / "w")


def test_vita_audio_save_pretrained_round_trip(loaded, tmp_path):
    """What VitaAudio.save_pretrained writes opens with from_pretrained: same mode, tokens."""
    from mctp.backbones import extend_vocab
    from mctp.interleave import InterleaveSchedule

    tok = _word_tokenizer(40)
    speech = extend_vocab(tok, num_audio_tokens=32)
    ids = torch.tensor([[5, 17, 3, 88]])
    for mode in ("balance", "vanilla", InterleaveSchedule([2, 6])):
        model = VitaAudio(
            backbone=loaded.backbone, stack=loaded.stack, vocab=speech, mode=mode, tokenizer=tok
        )
        folder = model.save_pretrained(tmp_path / str(mode))
        config = json.loads((folder / "config.json").read_text())
        assert "auto_map" not in config and config["model_type"] == "qwen2_mtp"
        again = VitaAudio.from_pretrained(folder)
        expected = mode if isinstance(mode, InterleaveSchedule) else None
        expected = expected or InterleaveSchedule.from_mode(mode)
        assert again.mode == expected and again.vocab == speech
        first = model.generate(ids, max_new_tokens=16, eos_token_id=None)
        second = again.generate(ids, max_new_tokens=16, eos_token_id=None)
        assert torch.equal(first.sequences, second.sequences)


def test_auto_map_only_with_the_code_files(loaded, tmp_path):
    folder = tmp_path / "with_code"
    folder.mkdir()
    (folder / "configuration_qwen2.py").write_text("# the official file\n")
    (folder / "modeling_qwen2.py").write_text("# the official file\n")
    save_vita_audio(loaded.backbone, loaded.stack, folder, base_config=loaded.config)
    written = json.loads((folder / "config.json").read_text())
    assert written["auto_map"] == loaded.config["auto_map"]
    (folder / "modeling_qwen2.py").unlink()
    save_vita_audio(loaded.backbone, loaded.stack, folder, base_config=loaded.config)
    assert "auto_map" not in json.loads((folder / "config.json").read_text())


def test_dtype_cast(official, tmp_path):
    config, tensors = official
    ck = load_vita_audio(_write(tmp_path / "in", config, tensors), dtype=torch.bfloat16)
    params = [*ck.backbone.model.parameters(), *ck.stack.parameters()]
    assert {p.dtype for p in params} == {torch.bfloat16}
    assert ck.backbone.model.model.rotary_emb.inv_freq.dtype == torch.float32
    out = generate(ck.backbone, ck.stack, torch.tensor([[5, 17, 3]]), "turbo", 12)
    assert out.sources[0].tolist() == [-1, *range(10), -1]
    folder = save_vita_audio(ck.backbone, ck.stack, tmp_path / "out")
    assert json.loads((folder / "config.json").read_text())["torch_dtype"] == "bfloat16"
    again = load_vita_audio(folder)
    assert again.stack.heads[4].proj.weight.dtype == torch.bfloat16
    assert torch.equal(
        again.stack.heads[4].proj.weight, tensors["mtp_projs.4.weight"].to(torch.bfloat16)
    )


@pytest.mark.gpu
def test_load_onto_cuda_in_bf16(official, tmp_path):
    config, tensors = official
    ck = load_vita_audio(
        _write(tmp_path / "in", config, tensors), device="cuda", dtype=torch.bfloat16
    )
    tensors_on = [*ck.backbone.model.state_dict().values(), *ck.stack.state_dict().values()]
    assert all(t.is_cuda and t.dtype == torch.bfloat16 for t in tensors_on)
    assert ck.backbone.model.model.rotary_emb.inv_freq.is_cuda
    out = generate(ck.backbone, ck.stack, torch.tensor([[5, 17, 3]], device="cuda"), "boost", 16)
    assert out.sources[0].tolist() == [-1, *range(10), -1, -1, -1, -1, 0]
