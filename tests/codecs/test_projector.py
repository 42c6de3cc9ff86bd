"""VITA-Audio-Plus MLP projector and the placeholder scatter."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from mctp.checkpoint import CheckpointError
from mctp.codecs.projector import (
    VITA_AUDIO_PLUS_PREFIX,
    MLPProjector,
    load_projector_state_dict,
    scatter_audio_embeddings,
)


@pytest.fixture
def golden(fixtures_dir: Path) -> Path:
    return fixtures_dir / "sensevoice"


def _state(d: int, h: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "pre_proj_layernorm.weight": 1 + 0.1 * torch.randn(d, generator=g),
        "pre_proj_layernorm.bias": 0.1 * torch.randn(d, generator=g),
        "mlp.0.weight": torch.randn(h, d, generator=g) / math.sqrt(d),
        "mlp.2.weight": torch.randn(h, h, generator=g) / math.sqrt(h),
    }


@pytest.mark.parametrize(("d", "h"), [(64, 128), (512, 96), (7, 3)])
def test_shapes_and_keys(d: int, h: int) -> None:
    proj = MLPProjector(d, h)
    assert {k: tuple(v.shape) for k, v in proj.state_dict().items()} == {
        "pre_proj_layernorm.weight": (d,),
        "pre_proj_layernorm.bias": (d,),
        "mlp.0.weight": (h, d),
        "mlp.2.weight": (h, h),
    }
    assert proj(torch.randn(2, 5, d)).shape == (2, 5, h)
    assert proj(torch.randn(5, d)).shape == (5, h)
    with pytest.raises(ValueError, match=str(d + 1)):
        proj(torch.randn(5, d + 1))
    with pytest.raises(ValueError, match="positive"):
        MLPProjector(0, h)


def test_forward_is_layernorm_linear_exact_gelu_linear() -> None:
    sd = _state(6, 4)
    proj = MLPProjector(6, 4)
    proj.load_state_dict(sd)
    x = torch.randn(3, 6)
    mu, var = x.mean(-1, keepdim=True), x.var(-1, unbiased=False, keepdim=True)
    gamma, beta = sd["pre_proj_layernorm.weight"], sd["pre_proj_layernorm.bias"]
    y = (x - mu) / torch.sqrt(var + 1e-5) * gamma + beta
    y = y @ sd["mlp.0.weight"].T
    y = 0.5 * y * (1 + torch.erf(y / math.sqrt(2.0)))  # exact (erf) GELU
    y = y @ sd["mlp.2.weight"].T
    torch.testing.assert_close(proj(x), y, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["en", "zh"])
def test_adapter_matches_golden(golden: Path, name: str) -> None:
    proj = MLPProjector.from_pretrained(golden / "adapter.safetensors")
    assert (proj.input_dim, proj.hidden_size) == (64, 128)
    enc_out = torch.from_numpy(np.load(golden / "expected" / f"{name}.encoder_out.npy"))
    expected = np.load(golden / "expected" / f"{name}.adapter_out.npy")
    with torch.no_grad():
        out = proj(enc_out)
    assert out.shape == expected.shape
    np.testing.assert_allclose(out.numpy(), expected, atol=1e-4, rtol=0)


def test_loads_vita_audio_plus_prefix_single_and_sharded(tmp_path: Path) -> None:
    sd = _state(8, 12)
    llm = {"model.embed_tokens.weight": torch.zeros(5, 12), "lm_head.weight": torch.zeros(5, 12)}
    prefixed = {VITA_AUDIO_PLUS_PREFIX + k: v for k, v in sd.items()}
    assert VITA_AUDIO_PLUS_PREFIX == "model.audio_projection."

    save_file({**prefixed, **llm}, str(tmp_path / "full.safetensors"))
    proj = MLPProjector.from_pretrained(tmp_path / "full.safetensors", dtype=torch.float64)
    assert proj.mlp[0].weight.dtype == torch.float64
    for k, v in sd.items():
        torch.testing.assert_close(proj.state_dict()[k], v.double())

    shards = tmp_path / "sharded"
    shards.mkdir()
    save_file(llm, str(shards / "model-00001-of-00002.safetensors"))
    save_file(prefixed, str(shards / "model-00002-of-00002.safetensors"))
    weight_map = {k: "model-00001-of-00002.safetensors" for k in llm}
    weight_map.update({k: "model-00002-of-00002.safetensors" for k in prefixed})
    (shards / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    assert set(load_projector_state_dict(shards)) == set(sd)
    loaded = MLPProjector(8, 12).load(shards)
    torch.testing.assert_close(loaded.mlp[2].weight, sd["mlp.2.weight"])


def test_sharded_llm_without_projector_and_torch_file(tmp_path: Path) -> None:
    llm = tmp_path / "llm"
    llm.mkdir()
    save_file({"model.embed_tokens.weight": torch.zeros(5, 12)}, str(llm / "model-1.safetensors"))
    index = {"weight_map": {"model.embed_tokens.weight": "model-1.safetensors"}}
    (llm / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(
        FileNotFoundError, match=r"lists no tensor under 'model\.audio_projection\.'"
    ):
        MLPProjector.from_pretrained(llm)

    sd = _state(8, 12)
    torch.save({VITA_AUDIO_PLUS_PREFIX + k: v for k, v in sd.items()}, tmp_path / "proj.pt")
    assert set(load_projector_state_dict(tmp_path / "proj.pt")) == set(sd)
    torch.testing.assert_close(
        MLPProjector.from_pretrained(tmp_path / "proj.pt").mlp[0].weight, sd["mlp.0.weight"]
    )


def test_strict_loading_errors(tmp_path: Path) -> None:
    sd = _state(8, 12)
    missing = {k: v for k, v in sd.items() if k != "pre_proj_layernorm.bias"}
    save_file(missing, str(tmp_path / "missing.safetensors"))
    with pytest.raises(CheckpointError, match=r"pre_proj_layernorm\.bias"):
        MLPProjector.from_pretrained(tmp_path / "missing.safetensors")

    save_file({**sd, "mlp.1.weight": torch.zeros(2)}, str(tmp_path / "extra.safetensors"))
    with pytest.raises(CheckpointError, match=r"mlp\.1\.weight"):
        MLPProjector.from_pretrained(tmp_path / "extra.safetensors")

    save_file({**sd, "mlp.2.weight": torch.zeros(12, 13)}, str(tmp_path / "shape.safetensors"))
    with pytest.raises(CheckpointError, match=r"mlp\.2\.weight"):
        MLPProjector.from_pretrained(tmp_path / "shape.safetensors")

    save_file(sd, str(tmp_path / "ok.safetensors"))
    with pytest.raises(CheckpointError, match=r"mlp\.0\.weight"):
        MLPProjector(8, 16).load(tmp_path / "ok.safetensors")

    save_file({"something.weight": torch.zeros(3)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(CheckpointError, match=r"something\.weight"):
        MLPProjector.from_pretrained(tmp_path / "other.safetensors")

    with pytest.raises(FileNotFoundError):
        MLPProjector.from_pretrained(tmp_path / "absent.safetensors")


# ----------------------------------------------------------------------------- scatter

PH = 9  # placeholder id


def test_scatter_hand_made_example() -> None:
    embeds = torch.arange(2 * 5 * 3, dtype=torch.float32).reshape(2, 5, 3)
    ids = torch.tensor([[1, PH, PH, 2, 3], [PH, 4, PH, PH, 5]])
    a = torch.full((2, 3), -1.0)  # first audio: 2 frames
    b = torch.tensor([[-2.0, -2, -2], [-3, -3, -3], [-4, -4, -4]])  # second audio: 3 frames
    out = scatter_audio_embeddings(embeds, ids, [a, b], PH)
    expected = embeds.clone()
    expected[0, 1] = -1
    expected[0, 2] = -1
    expected[1, 0] = -2
    expected[1, 2] = -3
    expected[1, 3] = -4
    torch.testing.assert_close(out, expected, atol=0, rtol=0)
    # the input is left untouched
    torch.testing.assert_close(embeds, torch.arange(30, dtype=torch.float32).reshape(2, 5, 3))


def test_scatter_casts_frames_and_handles_no_audio() -> None:
    embeds = torch.zeros(1, 4, 2, dtype=torch.bfloat16)
    ids = torch.tensor([[0, PH, PH, 0]])
    out = scatter_audio_embeddings(embeds, ids, [torch.tensor([[1.5, 2.5], [3.5, 4.5]])], PH)
    assert out.dtype == torch.bfloat16
    assert out[0, 1:3].float().tolist() == [[1.5, 2.5], [3.5, 4.5]]
    none = scatter_audio_embeddings(embeds, torch.zeros(1, 4, dtype=torch.long), [], PH)
    torch.testing.assert_close(none, embeds)


def test_scatter_errors() -> None:
    embeds = torch.zeros(1, 4, 3)
    ids = torch.tensor([[PH, PH, PH, 0]])
    with pytest.raises(ValueError, match=r"3 placeholders.*2 frames"):
        scatter_audio_embeddings(embeds, ids, [torch.zeros(2, 3)], PH)
    with pytest.raises(ValueError, match=r"3 placeholders.*4 frames"):
        scatter_audio_embeddings(embeds, ids, [torch.zeros(2, 3), torch.zeros(2, 3)], PH)
    with pytest.raises(ValueError, match=r"hidden size"):
        scatter_audio_embeddings(embeds, ids, [torch.zeros(3, 5)], PH)
    with pytest.raises(ValueError, match=r"\[B, L\]"):
        scatter_audio_embeddings(embeds, ids[0], [torch.zeros(3, 3)], PH)
    with pytest.raises(ValueError, match=r"\[B, L, H\]"):
        scatter_audio_embeddings(embeds[0], ids, [torch.zeros(3, 3)], PH)


def test_scatter_gradients_reach_frames_and_embeddings() -> None:
    proj = MLPProjector(6, 3)
    enc_out = torch.randn(5, 6, requires_grad=True)
    embeds = torch.randn(2, 4, 3, requires_grad=True)
    ids = torch.tensor([[PH, PH, 0, 0], [0, PH, PH, PH]])
    frames = proj(enc_out)  # [5, 3]
    frames.retain_grad()
    weights = torch.randn(2, 4, 3)
    (scatter_audio_embeddings(embeds, ids, [frames[:2], frames[2:]], PH) * weights).sum().backward()
    mask = ids == PH
    torch.testing.assert_close(frames.grad, weights[mask])
    torch.testing.assert_close(embeds.grad[~mask], weights[~mask])
    assert (embeds.grad[mask] == 0).all()
    assert enc_out.grad is not None and enc_out.grad.abs().sum() > 0
    assert proj.mlp[0].weight.grad is not None and proj.mlp[0].weight.grad.abs().sum() > 0
