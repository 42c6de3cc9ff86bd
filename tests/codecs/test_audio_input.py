"""Audio input that never lies: sample rates, channel layouts, truncated files, bad folders,
non-finite weights and out-of-range samples are resampled, refused or warned about."""

from __future__ import annotations

import json
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf
import torch
from safetensors.torch import load_file, save_file

from mctp.checkpoint import CheckpointError
from mctp.codecs import AudioError, DummyCodec, load_audio, load_codec, resample, to_mono
from mctp.codecs.audio import MissingSampleRateWarning
from mctp.codecs.glm4voice import GLM4VoiceDecoder, GLM4VoiceTokenizer
from mctp.codecs.projector import MLPProjector
from mctp.codecs.sensevoice import SenseVoiceEncoder

_CACHE: dict[str, object] = {}


def _cached(name: str, make: Callable[[], Any]) -> Any:
    if name not in _CACHE:
        _CACHE[name] = make()
    return _CACHE[name]


@pytest.fixture
def tok(fixtures_dir: Path) -> GLM4VoiceTokenizer:
    return _cached(
        "tok", lambda: GLM4VoiceTokenizer.from_pretrained(fixtures_dir / "glm4voice-tokenizer")
    )


@pytest.fixture
def enc(fixtures_dir: Path) -> SenseVoiceEncoder:
    return _cached("enc", lambda: SenseVoiceEncoder.from_pretrained(fixtures_dir / "sensevoice"))


def _fox(fixtures_dir: Path) -> torch.Tensor:
    wav, sr = load_audio(fixtures_dir / "glm4voice-tokenizer" / "inputs" / "en_fox.wav")
    assert sr == 16000
    return wav


# ----------------------------------------------------------------------------- sample rates


def test_tokenizer_resamples_what_it_is_told(tok, fixtures_dir: Path) -> None:
    """An 8 kHz clip with ``sample_rate=8000`` gives the ids of its 16 kHz version."""
    wav = _fox(fixtures_dir)
    full = tok.encode([wav], sample_rate=16000)[0]
    wav8 = resample(wav, 16000, 8000)
    back = resample(wav8, 8000, 16000)
    ids = tok.encode([wav8], sample_rate=8000)[0]
    assert torch.equal(ids, tok.encode([back], sample_rate=16000)[0])
    assert abs(ids.numel() - full.numel()) <= 1 and ids.numel() == -(-back.numel() // 1280)
    # read as 16 kHz, the same samples would give about half the ids: never without a warning
    with pytest.warns(MissingSampleRateWarning, match=r"GLM4VoiceTokenizer\.encode.*16000 Hz"):
        assert tok.encode([wav8])[0].numel() < 0.6 * full.numel()
    feats = tok.encode_features([wav8], sample_rate=8000)[0]
    assert feats.shape[0] == ids.numel()
    assert torch.equal(tok.encode([wav], sample_rate=16000)[0], full)
    for bad in (0, -8000, 8000.5, True):
        with pytest.raises(AudioError, match=r"audio\[0\]"):
            tok.encode([wav8], sample_rate=bad)


def test_encode_file_at_another_rate(tok, fixtures_dir: Path, tmp_path: Path) -> None:
    """A full-scale 44.1 kHz file: same ids as encode(sample_rate=44100), and no range warning
    (the check runs before resampling, whose overshoot may exceed 1)."""
    wav = resample(_fox(fixtures_dir), 16000, 44100)
    wav = wav / wav.abs().max()  # peak exactly 1
    sf.write(tmp_path / "loud.wav", wav.numpy(), 44100, subtype="FLOAT")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ids = tok.encode_file(tmp_path / "loud.wav")
    assert torch.equal(ids, tok.encode([wav], sample_rate=44100)[0])


def test_sensevoice_resamples_and_counts_frames_at_any_rate(enc, fixtures_dir: Path) -> None:
    wav = load_audio(fixtures_dir / "sensevoice" / "inputs" / "en.wav")[0]
    wav44 = resample(wav, 16000, 44100)
    out = enc.encode([wav44], sample_rate=44100)[0]
    torch.testing.assert_close(
        out, enc.encode([resample(wav44, 44100, 16000)], sample_rate=16000)[0]
    )
    assert out.shape[0] == enc.num_frames(wav44.numel(), sample_rate=44100)
    assert abs(out.shape[0] - enc.encode([wav], sample_rate=16000)[0].shape[0]) <= 1


def test_dummy_codec_takes_a_rate() -> None:
    codec = DummyCodec()
    tone = codec.decode(torch.tensor([3, 7, 11]))
    ids = codec.encode([resample(tone, 16000, 32000)], sample_rate=32000)[0]
    assert ids.tolist() == [3, 7, 11]
    with pytest.raises(TypeError, match=r"wrap a single one"):
        codec.encode(tone)


def test_every_codec_entry_warns_for_a_waveform_without_its_rate(tok, enc) -> None:
    """A bare waveform is read at the codec's rate: allowed, but never silently (as
    transformers' feature extractors warn); with ``sample_rate`` nothing is said."""
    wav = 0.1 * torch.randn(3200, generator=torch.Generator().manual_seed(0))
    calls = {
        "DummyCodec.encode": lambda **kw: DummyCodec().encode([wav], **kw),
        "GLM4VoiceTokenizer.encode": lambda **kw: tok.encode([wav], **kw),
        "GLM4VoiceTokenizer.encode_features": lambda **kw: tok.encode_features([wav], **kw),
        "SenseVoiceEncoder.encode": lambda **kw: enc.encode([wav], **kw),
        "SenseVoiceEncoder.features": lambda **kw: enc.features(wav, **kw),
    }
    for name, call in calls.items():
        with pytest.warns(MissingSampleRateWarning, match=rf"{name} got waveforms without") as rec:
            call()
        assert rec[0].filename == __file__, name  # points at the caller
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            call(sample_rate=16000)
    # features() resamples like encode() when told the rate
    wav8 = resample(wav, 16000, 8000)
    torch.testing.assert_close(
        enc.features(wav8, sample_rate=8000),
        enc.features(resample(wav8, 8000, 16000), sample_rate=16000),
    )


# ----------------------------------------------------------------------------- SenseVoice shapes


def test_sensevoice_bare_tensor_is_a_clear_error(enc, fixtures_dir: Path) -> None:
    wav = load_audio(fixtures_dir / "sensevoice" / "inputs" / "en.wav")[0]
    with pytest.raises(TypeError, match=r"list of 1-D waveforms.*wrap a single waveform"):
        enc.encode(wav)
    with pytest.raises(TypeError, match=r"shape \(2, 16000\)"):
        enc.encode(torch.zeros(2, 16000))


def test_sensevoice_num_frames_agrees_with_encode(enc) -> None:
    """num_frames raises exactly for the lengths encode refuses, and counts the rest."""
    g = torch.Generator().manual_seed(0)
    low = enc.frontend.min_samples
    assert 1 < low <= 400  # shorter than one 25 ms window is fine down to this length
    for n in range(1, 460, 3):
        wav = 0.1 * torch.randn(n, generator=g)
        try:
            expected = enc.frontend(wav).shape[0] + enc.num_query_frames
        except AudioError:
            expected = None
        if expected is None:
            with pytest.raises(AudioError, match="too short"):
                enc.num_frames(n)
        else:
            assert enc.num_frames(n) == expected, n
    for n in (low - 1, low):
        wav = 0.1 * torch.randn(n, generator=g)
        if n < low:
            with pytest.raises(AudioError, match=f"at least {low} samples"):
                enc.encode([wav], sample_rate=16000)
            with pytest.raises(AudioError, match="too short"):
                enc.num_frames(n)
        else:
            assert enc.encode([wav], sample_rate=16000)[0].shape[0] == enc.num_frames(n)
    with pytest.raises(ValueError, match="positive"):
        enc.num_frames(0)


# ----------------------------------------------------------------------------- channel layouts


def test_to_mono_reads_both_layouts_and_refuses_to_guess() -> None:
    g = torch.Generator().manual_seed(1)
    left, right = torch.randn(16000, generator=g), torch.randn(16000, generator=g)
    mono = (left + right) / 2
    first = torch.stack([left, right])  # [C, T], torchaudio
    last = first.T.contiguous()  # [T, C], soundfile
    for x in (first, last, first.numpy(), last.numpy()):
        out = to_mono(x)
        assert out.shape == (16000,)
        torch.testing.assert_close(out, mono)
    torch.testing.assert_close(to_mono(first, channels_first=True), mono)
    torch.testing.assert_close(to_mono(last, channels_first=False), mono)
    assert to_mono(first[:1]).shape == (16000,)  # [1, T]
    assert torch.equal(to_mono(left), left)
    for shape in ((2, 2), (4, 10), (100, 200)):
        with pytest.raises(AudioError, match="channels_first"):
            to_mono(torch.zeros(shape))
    assert to_mono(torch.ones(4, 10), channels_first=True).shape == (10,)
    with pytest.raises(AudioError, match=r"\[T\], \[C, T\] or \[T, C\]"):
        to_mono(torch.zeros(2, 2, 10))
    with pytest.raises(AudioError, match="no samples"):
        to_mono(torch.zeros(2, 0))


def test_load_audio_stereo_file(tmp_path: Path) -> None:
    data = np.stack([np.full(800, 0.5), np.full(800, -0.25)], axis=1).astype(np.float32)
    sf.write(tmp_path / "stereo.wav", data, 16000, subtype="FLOAT")
    wav, sr = load_audio(tmp_path / "stereo.wav")
    assert sr == 16000 and wav.shape == (800,)
    torch.testing.assert_close(wav, torch.full((800,), 0.125))


# ----------------------------------------------------------------------------- truncated files


def test_truncated_wav_is_refused(fixtures_dir: Path, tmp_path: Path) -> None:
    src = fixtures_dir / "glm4voice-tokenizer" / "inputs" / "en_fox.wav"
    full, _ = load_audio(src)
    cut = tmp_path / "cut.wav"
    cut.write_bytes(src.read_bytes()[:1000])
    with pytest.raises(AudioError, match=r"truncated: .*cut\.wav declares a \d+-byte data chunk"):
        load_audio(cut)
    # a file cut at a frame boundary near its end is still refused; the whole file is fine
    cut.write_bytes(src.read_bytes()[:-2])
    with pytest.raises(AudioError, match="truncated"):
        load_audio(cut)
    assert load_audio(src)[0].numel() == full.numel()


@pytest.mark.parametrize("fmt", ["flac", "mp3"])
def test_truncated_compressed_files_are_refused(tmp_path: Path, fmt: str) -> None:
    if fmt.upper() not in sf.available_formats():
        pytest.skip(f"this libsndfile cannot write {fmt}")
    x = (0.1 * np.random.default_rng(0).standard_normal(32000)).astype(np.float32)
    sf.write(tmp_path / f"a.{fmt}", x, 16000, format=fmt.upper())
    assert load_audio(tmp_path / f"a.{fmt}")[0].numel() == 32000
    data = (tmp_path / f"a.{fmt}").read_bytes()
    (tmp_path / f"cut.{fmt}").write_bytes(data[: len(data) // 2])
    with pytest.raises(AudioError):
        load_audio(tmp_path / f"cut.{fmt}")


# ----------------------------------------------------------------------------- folders, weights


def _tokenizer_copy(fixtures_dir: Path, dst: Path) -> Path:
    dst.mkdir()
    src = fixtures_dir / "glm4voice-tokenizer"
    for name in ("config.json", "preprocessor_config.json", "model.safetensors"):
        shutil.copy(src / name, dst / name)
    return dst


def test_load_codec_names_the_real_cause(fixtures_dir: Path, tmp_path: Path) -> None:
    folder = _tokenizer_copy(fixtures_dir, tmp_path / "tok")
    assert isinstance(load_codec(folder), GLM4VoiceTokenizer)
    (folder / "config.json").write_text('{"quantize_vocab_size": 64,')
    with pytest.raises(ValueError, match=r"cannot parse .*config\.json") as info:
        load_codec(folder)
    assert "no registered codec" not in str(info.value)
    assert isinstance(info.value.__cause__, ValueError)
    (folder / "config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="must hold a JSON object"):
        load_codec(folder)
    (folder / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"no config\.json"):
        load_codec(folder)
    # a folder that is no codec at all still says so
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no registered codec recognises"):
        load_codec(tmp_path / "empty")


def test_non_finite_weights_are_refused(fixtures_dir: Path, tmp_path: Path) -> None:
    # GLM-4-Voice tokenizer (safetensors)
    folder = _tokenizer_copy(fixtures_dir, tmp_path / "tok")
    state = load_file(folder / "model.safetensors")
    key = next(k for k in sorted(state) if k.endswith("fc1.weight"))
    state[key] = state[key].clone()
    state[key][0, 0] = float("nan")
    save_file(state, str(folder / "model.safetensors"))
    with pytest.raises(CheckpointError, match=rf"NaN or infinite.*{key}"):
        GLM4VoiceTokenizer.from_pretrained(folder)
    # SenseVoice (model.pt)
    sv = tmp_path / "sv"
    shutil.copytree(fixtures_dir / "sensevoice", sv)
    sd = torch.load(sv / "model.pt", map_location="cpu", weights_only=True)
    sd = sd.get("state_dict", sd) if isinstance(sd, dict) else sd
    key = next(k for k in sorted(sd) if sd[k].is_floating_point() and sd[k].ndim == 2)
    sd[key] = sd[key].clone()
    sd[key][0, 0] = float("inf")
    torch.save(sd, sv / "model.pt")
    with pytest.raises(CheckpointError, match=rf"{key} \(0 NaN, 1 inf\)"):
        SenseVoiceEncoder.from_pretrained(sv)
    # GLM-4-Voice decoder (flow.pt)
    dec = tmp_path / "dec"
    shutil.copytree(fixtures_dir / "glm4voice-decoder", dec)
    flow = torch.load(dec / "flow.pt", map_location="cpu", weights_only=True)
    key = next(k for k in sorted(flow) if flow[k].is_floating_point())
    flow[key] = torch.full_like(flow[key], float("nan"))
    torch.save(flow, dec / "flow.pt")
    with pytest.raises(CheckpointError, match=rf"flow\.pt.*{key}"):
        GLM4VoiceDecoder.from_pretrained(dec)
    # projector
    proj = MLPProjector(8, 16)
    bad = {k: v.clone() for k, v in proj.state_dict().items()}
    bad["mlp.0.weight"][1, 1] = float("nan")
    save_file(bad, str(tmp_path / "proj.safetensors"))
    with pytest.raises(CheckpointError, match=r"mlp\.0\.weight"):
        MLPProjector.from_pretrained(tmp_path / "proj.safetensors")
    with pytest.raises(CheckpointError, match=r"mlp\.0\.weight"):
        proj.load(tmp_path / "proj.safetensors")


def test_vocode_refuses_a_nan_mel(fixtures_dir: Path) -> None:
    dec = GLM4VoiceDecoder.from_pretrained(fixtures_dir / "glm4voice-decoder")
    mel = torch.zeros(dec.flow.output_size, 4)
    assert torch.isfinite(dec.vocode(mel)[0]).all()
    mel[3, 2] = float("nan")
    with pytest.raises(ValueError, match="1 NaN"):
        dec.vocode(mel)


# ----------------------------------------------------------------------------- sample range


def test_int16_range_floats_warn(tok, enc, fixtures_dir: Path) -> None:
    wav = _fox(fixtures_dir)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # in-range audio: no warning
        tok.encode([wav], sample_rate=16000)
        enc.encode([wav], sample_rate=16000)
        tok.encode([wav], sample_rate=8000)  # resampling overshoot does not warn either
    loud = wav * 32768
    with pytest.warns(UserWarning, match=r"outside \[-1, 1\].*32768"):
        tok.encode([loud], sample_rate=16000)
    with pytest.warns(UserWarning, match=r"outside \[-1, 1\]"):
        enc.encode([loud], sample_rate=16000)
    with pytest.warns(UserWarning, match=r"outside \[-1, 1\]"):
        DummyCodec().encode([loud], sample_rate=16000)


def test_folder_json_helpers_do_not_swallow(tmp_path: Path) -> None:
    """The registry's JSON reader reports, it does not return an empty config."""
    from mctp.codecs.registry import _read_json

    assert _read_json(tmp_path / "absent.json") == {}
    (tmp_path / "ok.json").write_text(json.dumps({"a": 1}))
    assert _read_json(tmp_path / "ok.json") == {"a": 1}
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ValueError, match="cannot parse"):
        _read_json(tmp_path / "bad.json")
