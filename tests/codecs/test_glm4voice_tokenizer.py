"""GLM-4-Voice speech tokenizer: golden ids, strict loading, a tiny model, error paths."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf
import soxr
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from mctp.checkpoint import CheckpointError
from mctp.codecs import AudioError, AudioTokenizer, load_audio, load_codec
from mctp.codecs.glm4voice.tokenizer import (
    GLM4VoiceTokenizer,
    build_feature_extractor,
    build_whisper_vq_encoder,
)
from mctp.codecs.glm4voice.whisper_vq import (
    WhisperVQEncoder,
    block_causal_mask,
    nearest_codeword,
)

# These tests feed the 16 kHz fixtures through the default rate on purpose (golden ids of
# the reference code); the warning for a waveform without its rate is tested in
# test_audio_input.py.
pytestmark = pytest.mark.filterwarnings("ignore::mctp.codecs.audio.MissingSampleRateWarning")

NAMES = ("en_fox", "zh_nihao", "en_long35s")
CONFIG_FILES = ("config.json", "preprocessor_config.json")
_LOADED: dict[tuple[Path, str], GLM4VoiceTokenizer] = {}


# ----------------------------------------------------------------------------- helpers


def golden_dir(fixtures_dir: Path) -> Path:
    return fixtures_dir / "glm4voice-tokenizer"


def golden_tokenizer(fixtures_dir: Path, device: str = "cpu") -> GLM4VoiceTokenizer:
    """The golden tokenizer, loaded once per test session and device."""
    key = (golden_dir(fixtures_dir), device)
    if key not in _LOADED:
        _LOADED[key] = GLM4VoiceTokenizer.from_pretrained(key[0], device=device)
    return _LOADED[key]


def expected_ids(fixtures_dir: Path, name: str) -> list[int]:
    return json.loads((golden_dir(fixtures_dir) / "expected" / f"{name}.json").read_text())


def wav(fixtures_dir: Path, name: str) -> torch.Tensor:
    audio, sr = load_audio(golden_dir(fixtures_dir) / "inputs" / f"{name}.wav")
    assert sr == 16000
    return audio


def copy_folder(src: Path, dst: Path, state: dict[str, torch.Tensor] | None = None) -> Path:
    """Config files of ``src`` plus ``state`` (default: src's weights) saved as safetensors."""
    dst.mkdir(parents=True, exist_ok=True)
    for name in CONFIG_FILES:
        shutil.copy(src / name, dst / name)
    if state is None:
        shutil.copy(src / "model.safetensors", dst / "model.safetensors")
    else:
        save_file({k: v.contiguous() for k, v in state.items()}, str(dst / "model.safetensors"))
    return dst


def golden_state(fixtures_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(golden_dir(fixtures_dir) / "model.safetensors"))


def edit_json(path: Path, **changes: Any) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data, indent=2))


# ----------------------------------------------------------------------------- golden


@pytest.mark.parametrize("name", NAMES)
def test_golden_ids_exact(fixtures_dir: Path, name: str) -> None:
    tok = golden_tokenizer(fixtures_dir)
    audio = wav(fixtures_dir, name)
    ids = tok.encode([audio])[0]
    assert ids.dtype == torch.long
    assert len(ids) == math.ceil(audio.numel() / 1280)
    assert ids.tolist() == expected_ids(fixtures_dir, name)


def test_golden_via_load_codec(fixtures_dir: Path) -> None:
    tok = load_codec(golden_dir(fixtures_dir))
    assert isinstance(tok, GLM4VoiceTokenizer)
    assert isinstance(tok, AudioTokenizer)
    assert (tok.sample_rate, tok.frame_rate, tok.codebook_size) == (16000, 12.5, 256)
    assert len(tok.encoder.layers) == 2  # quantize_position of the config, not encoder_layers
    ids = tok.encode([wav(fixtures_dir, n) for n in NAMES])
    assert [x.tolist() for x in ids] == [expected_ids(fixtures_dir, n) for n in NAMES]


def test_golden_mel_and_pooled_features(fixtures_dir: Path) -> None:
    tok = golden_tokenizer(fixtures_dir)
    audio = wav(fixtures_dir, "en_fox")
    mel, frame_mask = tok.log_mel([audio])
    gold_mel = np.load(golden_dir(fixtures_dir) / "expected" / "en_fox.mel.npy")
    assert mel.shape == (1, *gold_mel.shape)
    np.testing.assert_allclose(mel[0].numpy(), gold_mel, rtol=0, atol=1e-4)
    frames = torch.arange(mel.shape[-1])
    assert torch.equal(frame_mask[0], frames * 160 < audio.numel())

    feats = tok.encode_features([audio])[0]
    gold = np.load(golden_dir(fixtures_dir) / "expected" / "en_fox.features.npy")
    assert feats.shape == gold.shape
    np.testing.assert_allclose(feats.numpy(), gold, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("batch_size", [1, 2, 8])
def test_one_call_equals_one_by_one(fixtures_dir: Path, batch_size: int) -> None:
    tok = golden_tokenizer(fixtures_dir)
    audio = [wav(fixtures_dir, n) for n in NAMES]
    together = tok.encode(audio, batch_size=batch_size, progress=False)
    alone = [tok.encode([a])[0] for a in audio]
    for name, a, b in zip(NAMES, together, alone):
        assert a.tolist() == b.tolist() == expected_ids(fixtures_dir, name), name


def test_encode_files(fixtures_dir: Path) -> None:
    tok = golden_tokenizer(fixtures_dir)
    paths = [golden_dir(fixtures_dir) / "inputs" / f"{n}.wav" for n in NAMES]
    ids = tok.encode_files(paths)
    assert [x.tolist() for x in ids] == [expected_ids(fixtures_dir, n) for n in NAMES]
    assert tok.encode_file(paths[0]).tolist() == expected_ids(fixtures_dir, NAMES[0])
    assert tok.encode([]) == []


# ----------------------------------------------------------------------------- key loading


def _fox_ids(folder: Path, fixtures_dir: Path) -> list[int]:
    return (
        GLM4VoiceTokenizer.from_pretrained(folder).encode([wav(fixtures_dir, "en_fox")])[0].tolist()
    )


def test_unprefixed_keys_load(fixtures_dir: Path, tmp_path: Path) -> None:
    state = {k.removeprefix("model.encoder."): v for k, v in golden_state(fixtures_dir).items()}
    assert not any(k.startswith("model.") for k in state)
    folder = copy_folder(golden_dir(fixtures_dir), tmp_path / "plain", state)
    assert _fox_ids(folder, fixtures_dir) == expected_ids(fixtures_dir, "en_fox")


def test_missing_key_raises(fixtures_dir: Path, tmp_path: Path) -> None:
    state = golden_state(fixtures_dir)
    del state["model.encoder.layers.1.fc2.bias"]
    folder = copy_folder(golden_dir(fixtures_dir), tmp_path / "missing", state)
    with pytest.raises(CheckpointError, match=r"layers\.1\.fc2\.bias") as err:
        GLM4VoiceTokenizer.from_pretrained(folder)
    assert err.value.missing == ["layers.1.fc2.bias"]
    assert err.value.unexpected == []


def test_unexpected_key_raises(fixtures_dir: Path, tmp_path: Path) -> None:
    state = golden_state(fixtures_dir)
    state["model.encoder.adapter.weight"] = torch.zeros(3)
    folder = copy_folder(golden_dir(fixtures_dir), tmp_path / "unexpected", state)
    with pytest.raises(CheckpointError, match=r"adapter\.weight") as err:
        GLM4VoiceTokenizer.from_pretrained(folder)
    assert err.value.unexpected == ["adapter.weight"]
    assert err.value.missing == []


def test_same_key_with_and_without_prefix_raises(fixtures_dir: Path, tmp_path: Path) -> None:
    state = golden_state(fixtures_dir)
    state["conv1.bias"] = state["model.encoder.conv1.bias"].clone()
    folder = copy_folder(golden_dir(fixtures_dir), tmp_path / "clash", state)
    with pytest.raises(CheckpointError, match=r"conv1\.bias"):
        GLM4VoiceTokenizer.from_pretrained(folder)


def test_ignorable_keys_are_ignored(fixtures_dir: Path, tmp_path: Path) -> None:
    full = golden_state(fixtures_dir)
    # A released full checkpoint also holds the ASR decoder and its output projection.
    full["model.decoder.layers.0.fc1.weight"] = torch.zeros(4, 4)
    full["model.decoder.embed_tokens.weight"] = torch.zeros(8, 4)
    full["proj_out.weight"] = torch.zeros(8, 4)
    full["model.encoder.layers.11.fc1.weight"] = torch.zeros(4, 4)  # beyond quantize_position
    folder = copy_folder(golden_dir(fixtures_dir), tmp_path / "full", full)
    assert _fox_ids(folder, fixtures_dir) == expected_ids(fixtures_dir, "en_fox")

    # ...and a minimal one without any of the ignorable tensors loads as well.
    ignorable = ("layers.2.", "layers.3.", "layer_norm.", "embed_positions2.", "ema_")
    minimal = {
        k: v
        for k, v in golden_state(fixtures_dir).items()
        if not k.removeprefix("model.encoder.").startswith(ignorable)
    }
    assert len(minimal) < len(full) - 4
    folder = copy_folder(golden_dir(fixtures_dir), tmp_path / "minimal", minimal)
    assert _fox_ids(folder, fixtures_dir) == expected_ids(fixtures_dir, "en_fox")


def test_sharded_safetensors_and_torch_bin(fixtures_dir: Path, tmp_path: Path) -> None:
    state = golden_state(fixtures_dir)
    keys = sorted(state)
    shards = {
        "model-00001-of-00002.safetensors": keys[::2],
        "model-00002-of-00002.safetensors": keys[1::2],
    }
    sharded = tmp_path / "sharded"
    copy_folder(golden_dir(fixtures_dir), sharded)
    (sharded / "model.safetensors").unlink()
    for file, names in shards.items():
        save_file({k: state[k] for k in names}, str(sharded / file))
    index = {"metadata": {}, "weight_map": {k: f for f, names in shards.items() for k in names}}
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    assert _fox_ids(sharded, fixtures_dir) == expected_ids(fixtures_dir, "en_fox")

    binary = tmp_path / "bin"
    copy_folder(golden_dir(fixtures_dir), binary)
    (binary / "model.safetensors").unlink()
    torch.save(state, binary / "pytorch_model.bin")
    assert _fox_ids(binary, fixtures_dir) == expected_ids(fixtures_dir, "en_fox")

    (sharded / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="00002"):
        GLM4VoiceTokenizer.from_pretrained(sharded)


# ----------------------------------------------------------------------------- config checks


@pytest.mark.parametrize(
    ("changes", "error", "pattern"),
    [
        (
            {"quantize_vocab_size": 512},
            CheckpointError,
            r"codebook\.weight.*\(256, 64\).*\(512, 64\)",
        ),
        ({"d_model": 32}, CheckpointError, r"d_model=32"),
        ({"encoder_ffn_dim": 96}, CheckpointError, r"fc1\.weight"),
        ({"max_source_positions": 1000}, CheckpointError, r"embed_positions\.weight"),
        ({"quantize_position": 5}, ValueError, r"quantize_position \(5\) exceeds encoder_layers"),
        ({"encoder_attention_heads": 5}, ValueError, r"num_heads \(5\) must divide d_model"),
        ({"pooling_type": "max"}, NotImplementedError, r"pooling_type 'max'"),
        ({"encoder_causal_convolution": False}, NotImplementedError, r"causal_convolution"),
        ({"quantize_causal_encoder": True}, NotImplementedError, r"quantize_causal_encoder"),
        ({"activation_function": "gelu_new"}, NotImplementedError, r"gelu_new"),
        ({"pooling_position": 0}, NotImplementedError, r"pooling_position \(0\)"),
        ({"d_model": "64"}, ValueError, r"'d_model'"),
    ],
)
def test_config_mismatching_weights_or_unsupported(
    fixtures_dir: Path, tmp_path: Path, changes: dict[str, Any], error: type, pattern: str
) -> None:
    folder = copy_folder(golden_dir(fixtures_dir), tmp_path / "cfg")
    edit_json(folder / "config.json", **changes)
    with pytest.raises(error, match=pattern):
        GLM4VoiceTokenizer.from_pretrained(folder)


def test_preprocessor_config_checks(fixtures_dir: Path, tmp_path: Path) -> None:
    folder = copy_folder(golden_dir(fixtures_dir), tmp_path / "pre")
    edit_json(folder / "preprocessor_config.json", feature_size=80)
    with pytest.raises(ValueError, match=r"80 mel bins.*num_mel_bins=128"):
        GLM4VoiceTokenizer.from_pretrained(folder)
    edit_json(folder / "preprocessor_config.json", feature_size=128, dither=1e-4)
    with pytest.raises(ValueError, match="dither"):
        GLM4VoiceTokenizer.from_pretrained(folder)
    edit_json(folder / "preprocessor_config.json", dither=0.0, chunk_length=40)
    with pytest.raises(ValueError, match="position table covers 3000"):
        GLM4VoiceTokenizer.from_pretrained(folder)
    (folder / "preprocessor_config.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"preprocessor_config\.json"):
        GLM4VoiceTokenizer.from_pretrained(folder)


def test_bad_folders(fixtures_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not found"):
        GLM4VoiceTokenizer.from_pretrained(tmp_path / "does-not-exist")
    with pytest.raises(FileNotFoundError):
        load_codec(tmp_path / "does-not-exist")
    folder = copy_folder(golden_dir(fixtures_dir), tmp_path / "noweights")
    (folder / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no weights"):
        GLM4VoiceTokenizer.from_pretrained(folder)
    (folder / "model.safetensors").write_bytes(b"\x00garbage" * 100)
    with pytest.raises(ValueError, match="cannot read checkpoint"):
        GLM4VoiceTokenizer.from_pretrained(folder)
    (folder / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="cannot parse"):
        GLM4VoiceTokenizer.from_pretrained(folder)


# ----------------------------------------------------------------------------- input errors


def test_waveform_errors(fixtures_dir: Path, tmp_path: Path) -> None:
    tok = golden_tokenizer(fixtures_dir)
    good = wav(fixtures_dir, "en_fox")
    with pytest.raises(AudioError, match=r"audio\[1\].*empty"):
        tok.encode([good, torch.zeros(0)])
    with pytest.raises(AudioError, match=r"shape \[T\]"):
        tok.encode([good.view(1, -1)])
    bad = good.clone()
    bad[100] = float("nan")
    with pytest.raises(AudioError, match="NaN"):
        tok.encode([bad])
    with pytest.raises(AudioError, match="floating-point"):
        tok.encode([(good * 32767).to(torch.int16)])
    with pytest.raises(TypeError, match="list"):
        tok.encode(good)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="batch_size"):
        tok.encode([good], batch_size=0)
    with pytest.raises(FileNotFoundError):
        tok.encode_file(tmp_path / "missing.wav")
    corrupt = tmp_path / "corrupt.wav"
    corrupt.write_bytes(b"RIFF\x00\x01garbage-not-audio" * 20)
    with pytest.raises(AudioError, match="cannot decode"):
        tok.encode_file(corrupt)
    with pytest.raises(ValueError, match="chunk_samples"):
        tok.log_mel([torch.zeros(tok.chunk_samples + 1)])


# ----------------------------------------------------------------------------- module parts


def test_block_causal_mask_small() -> None:
    valid = torch.tensor([[True, True, True, True, True, False]])
    got = block_causal_mask(valid, 2)[0, 0].int()
    want = torch.tensor(
        [
            [1, 1, 0, 0, 0, 0],
            [1, 1, 0, 0, 0, 0],
            [1, 1, 1, 1, 0, 0],
            [1, 1, 1, 1, 0, 0],
            [1, 1, 1, 1, 1, 0],
            [1, 1, 1, 1, 1, 0],
        ]
    )
    assert torch.equal(got, want)
    full = block_causal_mask(valid, None)[0, 0]
    assert torch.equal(full, valid.expand(6, 6))


def test_nearest_codeword_matches_cdist() -> None:
    g = torch.Generator().manual_seed(1)
    h, cb = torch.randn(2, 7, 16, generator=g), torch.randn(50, 16, generator=g)
    want = torch.cdist(h.double(), cb.double()[None]).argmin(-1)
    assert torch.equal(nearest_codeword(h, cb), want)
    with pytest.raises(ValueError, match="does not match"):
        nearest_codeword(h, cb[:, :8])


def test_encoder_input_checks() -> None:
    enc = WhisperVQEncoder(
        num_mel_bins=8, d_model=16, num_heads=2, ffn_dim=32, num_layers=1,
        max_source_positions=10, codebook_size=4,
    )  # fmt: skip
    out = enc(torch.randn(2, 8, 16), torch.ones(2, 16, dtype=torch.bool))
    assert out.ids.shape == out.mask.shape == (2, 2) and out.features.shape == (2, 2, 16)
    with pytest.raises(ValueError, match=r"\[B, 8, F\]"):
        enc(torch.randn(1, 4, 16))
    with pytest.raises(ValueError, match="exceed"):
        enc(torch.randn(1, 8, 24))
    with pytest.raises(ValueError, match="frame_mask"):
        enc(torch.randn(1, 8, 16), torch.ones(1, 8, dtype=torch.bool))
    with pytest.raises(ValueError, match="must divide"):
        WhisperVQEncoder(
            num_mel_bins=8, d_model=16, num_heads=3, ffn_dim=32, num_layers=1,
            max_source_positions=10, codebook_size=4,
        )  # fmt: skip


# ----------------------------------------------------------------------------- tiny model


TINY = {
    "d_model": 32,
    "encoder_attention_heads": 2,
    "decoder_attention_heads": 2,
    "encoder_ffn_dim": 64,
    "decoder_ffn_dim": 64,
    "encoder_layers": 3,
    "decoder_layers": 3,
    "num_hidden_layers": 3,
    "quantize_position": 3,
    "quantize_vocab_size": 64,
    "quantize_causal_block_size": 50,
}


def _reference_forward(
    enc: WhisperVQEncoder, mel: torch.Tensor, frame_mask: torch.Tensor
) -> torch.Tensor:
    """Plain float64 re-derivation of the algorithm (additive float mask, explicit softmax)."""
    p = {k: v.double() for k, v in enc.state_dict().items()}
    x = F.gelu(F.conv1d(F.pad(mel.double(), (2, 0)), p["conv1.weight"], p["conv1.bias"]))
    x = F.gelu(F.conv1d(F.pad(x, (2, 0)), p["conv2.weight"], p["conv2.bias"], stride=2))
    x = x.transpose(1, 2) + p["embed_positions.weight"][: x.shape[-1]]
    valid, block = frame_mask[:, ::2], enc.causal_block_size

    def additive(valid: torch.Tensor, block: int) -> torch.Tensor:
        n = valid.shape[1]
        blocks = [torch.ones(min(block, n - s), min(block, n - s)) for s in range(0, n, block)]
        allowed = (torch.tril(torch.ones(n, n)) + torch.block_diag(*blocks)).clamp(max=1)
        allowed = allowed[None] * valid[:, None, :].double()
        return ((1.0 - allowed) * torch.finfo(torch.float64).min)[:, None]  # [B, 1, T, T]

    bias = additive(valid, block)
    heads = enc.layers[0].self_attn.num_heads
    for i in range(len(enc.layers)):
        w = {
            k.removeprefix(f"layers.{i}."): v for k, v in p.items() if k.startswith(f"layers.{i}.")
        }
        b, t, d = x.shape
        y = F.layer_norm(x, (d,), w["self_attn_layer_norm.weight"], w["self_attn_layer_norm.bias"])
        q = (y @ w["self_attn.q_proj.weight"].T + w["self_attn.q_proj.bias"]) * (d // heads) ** -0.5
        k = y @ w["self_attn.k_proj.weight"].T
        v = y @ w["self_attn.v_proj.weight"].T + w["self_attn.v_proj.bias"]
        q, k, v = (z.view(b, t, heads, d // heads).transpose(1, 2) for z in (q, k, v))
        att = torch.softmax(q @ k.transpose(-1, -2) + bias, dim=-1) @ v
        x = x + att.transpose(1, 2).reshape(b, t, d) @ w["self_attn.out_proj.weight"].T
        x = x + w["self_attn.out_proj.bias"]
        y = F.layer_norm(x, (d,), w["final_layer_norm.weight"], w["final_layer_norm.bias"])
        x = x + F.gelu(y @ w["fc1.weight"].T + w["fc1.bias"]) @ w["fc2.weight"].T + w["fc2.bias"]
        if i + 1 == enc.pooling_position:
            k_pool = enc.pooling_kernel_size
            x = F.avg_pool1d(F.pad(x.transpose(1, 2), (0, -x.shape[1] % k_pool)), k_pool).transpose(
                1, 2
            )
            valid, block = valid[:, ::k_pool], block // k_pool
            bias = additive(valid, block)
    return x


def _make_tiny_folder(
    fixtures_dir: Path, folder: Path, pooling_position: int
) -> GLM4VoiceTokenizer:
    """Random tiny checkpoint in the released layout; the codebook is calibrated on speech."""
    folder.mkdir()
    config = json.loads((golden_dir(fixtures_dir) / "config.json").read_text())
    config.update(TINY, pooling_position=pooling_position)
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    shutil.copy(golden_dir(fixtures_dir) / "preprocessor_config.json", folder)

    enc = build_whisper_vq_encoder(config)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in enc.named_parameters():
            noise = torch.randn(param.shape, generator=g) * 0.2
            param.copy_(noise + 1.0 if "layer_norm.weight" in name else noise)
    preprocessor = json.loads((folder / "preprocessor_config.json").read_text())
    tok = GLM4VoiceTokenizer(enc, build_feature_extractor(preprocessor))
    feats = torch.cat(tok.encode_features([wav(fixtures_dir, "en_fox")]))
    with torch.no_grad():
        enc.codebook.weight.copy_(feats.mean(0) + feats.std(0) * torch.randn(64, 32, generator=g))

    state = {f"model.encoder.{k}": v.clone() for k, v in enc.state_dict().items()}
    state["model.encoder.layer_norm.weight"] = torch.ones(32)
    state["model.encoder.layer_norm.bias"] = torch.zeros(32)
    state["model.encoder.embed_positions2.weight"] = enc.embed_positions.weight[:375].clone()
    state["model.encoder.ema_count"] = torch.ones(64)
    state["model.encoder.ema_weight"] = enc.codebook.weight.clone()
    save_file(state, str(folder / "model.safetensors"))
    return tok


@pytest.mark.parametrize("pooling_position", [3, 2])
def test_tiny_model_round_trip_and_reference(
    fixtures_dir: Path, tmp_path: Path, pooling_position: int
) -> None:
    folder = tmp_path / "tiny"
    built = _make_tiny_folder(fixtures_dir, folder, pooling_position)
    tok = GLM4VoiceTokenizer.from_pretrained(folder)
    assert (tok.sample_rate, tok.frame_rate, tok.codebook_size) == (16000, 12.5, 64)
    assert tok.samples_per_id == 1280
    loaded = tok.encoder.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in built.encoder.state_dict().items())

    audio = [wav(fixtures_dir, n) for n in NAMES]
    ids = tok.encode(audio)
    for a, x in zip(audio, ids):
        assert len(x) == math.ceil(a.numel() / 1280)
        assert 0 <= int(x.min()) and int(x.max()) < 64
    assert len(torch.unique(torch.cat(ids))) > 8

    # Independent float64 re-derivation on two utterances batched together.
    mel, frame_mask = tok.log_mel(audio[:2])
    ref = _reference_forward(tok.encoder, mel, frame_mask)
    out = tok.encoder(mel, frame_mask)
    torch.testing.assert_close(out.features.double(), ref, rtol=1e-4, atol=1e-4)
    dist = torch.cdist(ref, tok.encoder.codebook.weight.double()[None]) ** 2
    best2 = dist.topk(2, dim=-1, largest=False).values
    clear = (best2[..., 1] - best2[..., 0]) > 1e-3
    assert clear.float().mean() > 0.9
    assert torch.equal(out.ids[clear], dist.argmin(-1)[clear])


def test_tiny_model_file_at_another_rate(fixtures_dir: Path, tmp_path: Path) -> None:
    _make_tiny_folder(fixtures_dir, tmp_path / "tiny", 3)
    tok = GLM4VoiceTokenizer.from_pretrained(tmp_path / "tiny")
    audio = wav(fixtures_dir, "zh_nihao")
    path = tmp_path / "zh_22k.wav"
    sf.write(path, soxr.resample(audio.numpy(), 16000, 22050), 22050, subtype="PCM_16")
    back, sr = load_audio(path, sample_rate=16000)
    assert sr == 16000 and abs(back.numel() - audio.numel()) <= 2
    ids = tok.encode_file(path)
    assert len(ids) == math.ceil(back.numel() / 1280)
    assert ids.tolist() == tok.encode([back])[0].tolist()
    assert 0 <= int(ids.min()) and int(ids.max()) < 64


# ----------------------------------------------------------------------------- GPU


@pytest.mark.gpu
def test_golden_ids_on_cuda(fixtures_dir: Path) -> None:
    tok = golden_tokenizer(fixtures_dir, device="cuda")
    ids = tok.encode([wav(fixtures_dir, n) for n in NAMES])
    assert [x.tolist() for x in ids] == [expected_ids(fixtures_dir, n) for n in NAMES]
    half = GLM4VoiceTokenizer.from_pretrained(
        golden_dir(fixtures_dir), device="cuda", dtype=torch.bfloat16
    )
    got = half.encode([wav(fixtures_dir, "en_fox")])[0].tolist()
    want = expected_ids(fixtures_dir, "en_fox")
    assert len(got) == len(want)
    assert sum(a == b for a, b in zip(got, want)) >= 0.8 * len(want)
