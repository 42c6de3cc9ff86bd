"""GLM-4-Voice-9B's released ChatGLM folder loads exactly onto HFBackbone (tiny fake folder)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from glm4_voice.checkpoint import RELEASED_SHAPE, load_glm4_voice, read_shape
from glm4_voice.model import GLM4Voice, load_tokenizer
from glm4_voice.tiny import make_glm4_voice_tokenizer, make_tiny_glm4_voice
from glm4_voice.vocab import GLM4VoiceVocab
from safetensors.torch import load_file, save_file

from mctp import CheckpointError

from .glm4_voice_reference import ReleasedChatGLM


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_glm4_voice(tmp_path_factory.mktemp("glm4v") / "model", seed=0)


@pytest.fixture(scope="module")
def llm(folder: Path) -> GLM4Voice:
    return GLM4Voice.from_pretrained(folder)


def _copy(folder: Path, dst: Path) -> Path:
    shutil.copytree(folder, dst)
    return dst


def test_released_layout_runs_on_the_fast_path(llm: GLM4Voice) -> None:
    assert llm.backbone.path == "fast"
    assert type(llm.backbone.model).__name__ == "GlmForCausalLM"


def test_logits_equal_the_released_forward(folder: Path, llm: GLM4Voice) -> None:
    ref = ReleasedChatGLM(folder)
    ids = llm.encode("w1 w2 w3 w7 w9")[0].tolist() + [llm.vocab.audio_start + k for k in (3, 9, 1)]
    want = ref.logits(ids)
    got = llm.backbone(torch.tensor([ids]), return_logits=True).logits[0].double()
    assert want.std() > 1.0  # not a vacuous comparison
    torch.testing.assert_close(got, want, atol=2e-4, rtol=1e-4)


def test_vanilla_generate_reproduces_released_greedy(folder: Path, llm: GLM4Voice) -> None:
    ref = ReleasedChatGLM(folder)
    ids = llm.encode("w4 w5 w6")
    want = ref.greedy(ids[0].tolist(), 24, llm.vocab.stop_ids)
    res = llm.generate(ids, mode="vanilla", max_new_tokens=24)
    got = res.tokens[0].tolist()
    assert got == want
    assert len(set(got)) >= 4  # several distinct tokens: the check can fail


def test_stored_rotary_buffer_is_checked(folder: Path, tmp_path: Path) -> None:
    f = _copy(folder, tmp_path / "m")
    sd = load_file(str(f / "model.safetensors"))
    d = json.loads((f / "config.json").read_text())["kv_channels"] // 2
    sd["transformer.rotary_pos_emb.inv_freq"] = 1.0 / 10000 ** (torch.arange(0, d, 2).float() / d)
    save_file(sd, str(f / "model.safetensors"))
    load_glm4_voice(f)  # consistent buffer: accepted
    sd["transformer.rotary_pos_emb.inv_freq"] = sd["transformer.rotary_pos_emb.inv_freq"] * 2
    save_file(sd, str(f / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"rotary_pos_emb\.inv_freq"):
        load_glm4_voice(f)


def test_missing_and_unexpected_keys(folder: Path, tmp_path: Path) -> None:
    f = _copy(folder, tmp_path / "m")
    sd = load_file(str(f / "model.safetensors"))
    del sd["transformer.encoder.layers.1.self_attention.query_key_value.bias"]
    save_file(sd, str(f / "model.safetensors"))
    with pytest.raises(
        CheckpointError, match=r"missing.*layers\.1\.self_attention\.query_key_value\.bias"
    ):
        load_glm4_voice(f)
    sd = load_file(str(folder / "model.safetensors"))
    sd["transformer.encoder.layers.0.mlp.extra.weight"] = torch.zeros(2)
    save_file(sd, str(f / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"unexpected.*mlp\.extra\.weight"):
        load_glm4_voice(f)


def test_another_architecture_or_size_is_refused(folder: Path, tmp_path: Path) -> None:
    f = _copy(folder, tmp_path / "m")
    cfg = json.loads((f / "config.json").read_text())
    (f / "config.json").write_text(json.dumps({**cfg, "model_type": "qwen2"}))
    with pytest.raises(ValueError, match=r"model_type is 'qwen2'.*chatglm"):
        GLM4Voice.from_pretrained(f)
    (f / "config.json").write_text(json.dumps({**cfg, "add_bias_linear": True}))
    with pytest.raises(ValueError, match="add_bias_linear"):
        load_glm4_voice(f)
    (f / "config.json").write_text(json.dumps({**cfg, "ffn_hidden_size": 128}))
    with pytest.raises(CheckpointError, match=r"dense_h_to_4h|gate_up_proj"):
        load_glm4_voice(f)
    (f / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"hidden_size=64 \(expected 4096\).*num_layers=2"):
        load_glm4_voice(f, expect=RELEASED_SHAPE)
    assert read_shape(folder).vocab_size == cfg["padded_vocab_size"]


def test_tokenizer_without_audio_tokens_is_refused(folder: Path, tmp_path: Path) -> None:
    f = _copy(folder, tmp_path / "m")
    make_glm4_voice_tokenizer(["w1"], num_audio=0).save_pretrained(f)
    with pytest.raises(ValueError, match="no <\\|audio_0\\|>"):
        GLM4Voice.from_pretrained(f)
    tok = load_tokenizer(folder)
    with pytest.raises(ValueError, match=r"64 audio tokens.*expects 16384"):
        GLM4VoiceVocab.from_tokenizer(tok, vocab_size=10**6, num_audio=16384)
    with pytest.raises(ValueError, match="do not fit the model's 50 embedding rows"):
        GLM4VoiceVocab.from_tokenizer(tok, vocab_size=50)


def test_sharded_folder_as_released(folder: Path, llm: GLM4Voice, tmp_path: Path) -> None:
    """The 9B ships model-0000k-of-0000n.safetensors shards with an index."""
    f = _copy(folder, tmp_path / "m")
    sd = load_file(str(f / "model.safetensors"))
    (f / "model.safetensors").unlink()
    keys = sorted(sd)
    shards = {
        "model-00001-of-00002.safetensors": keys[::2],
        "model-00002-of-00002.safetensors": keys[1::2],
    }
    weight_map = {}
    for name, part in shards.items():
        save_file({k: sd[k] for k in part}, str(f / name))
        weight_map.update(dict.fromkeys(part, name))
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (f / "model.safetensors.index.json").write_text(json.dumps(index))
    model = load_glm4_voice(f)
    ids = torch.tensor([[1, 2, 3, llm.vocab.audio_start]])
    want = llm.backbone.model(ids).logits
    torch.testing.assert_close(model(ids).logits, want, atol=0, rtol=0)
