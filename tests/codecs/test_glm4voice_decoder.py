"""GLM-4-Voice decoder adapter against the golden outputs of the original implementation.

Golden folder: tests/fixtures/glm4voice-decoder (see its README.md for seeds, streaming
arithmetic and tolerances). Unit tests of the config reader, key loading and a tiny random
instance live in test_glm4voice_decoder_units.py.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest
import torch

from mctp.codecs import AudioDecoder, DecoderStream, load_codec
from mctp.codecs.glm4voice.decoder import (
    GLM4VoiceDecoder,
    GLM4VoiceDecoderStream,
    iter_web_demo_chunks,
)

NAMES = ["tok30", "tok75"]
MEL_ATOL = 1e-3  # README: 1 vs 2 threads differ by <= 1e-5 on mels
WAV_ATOL = 1e-3  # README: <= 1e-4 on waveforms


@lru_cache(maxsize=4)
def _decoder(folder: str, noise: bool) -> GLM4VoiceDecoder:
    return GLM4VoiceDecoder.from_pretrained(folder, noise=noise)


@pytest.fixture
def golden(fixtures_dir: Path) -> Path:
    return fixtures_dir / "glm4voice-decoder"


def _ids(golden: Path, name: str) -> torch.Tensor:
    return torch.tensor(json.loads((golden / "inputs" / "tokens.json").read_text())[name])


def _expected(golden: Path, file: str) -> np.ndarray:
    return np.load(golden / "expected" / file)


def _close(got: torch.Tensor, want: np.ndarray, atol: float) -> None:
    got_np = got.detach().cpu().numpy()
    assert got_np.shape == want.shape, (got_np.shape, want.shape)
    np.testing.assert_allclose(got_np, want, rtol=0, atol=atol)


def test_load_codec_builds_the_adapter(golden: Path) -> None:
    dec = load_codec(golden)
    assert isinstance(dec, GLM4VoiceDecoder)
    assert isinstance(dec, AudioDecoder)
    assert isinstance(dec.stream(), DecoderStream)
    assert (dec.sample_rate, dec.frame_rate, dec.codebook_size, dec.hop_length) == (
        22050,
        12.5,
        256,
        256,
    )
    assert not dec.flow.training and not dec.hift.training
    assert dec.num_frames(30) == 206 and dec.num_frames(75) == 516  # README shapes


@pytest.mark.parametrize("name", NAMES)
def test_flow_and_f0_intermediates(golden: Path, name: str) -> None:
    dec = _decoder(str(golden), False)
    dbg = np.load(golden / "expected" / f"{name}.debug.npz")
    ids = _ids(golden, name)
    with torch.inference_mode():
        mu = dec.flow.encode(ids[None])
        spks = dec.flow.project_speaker(torch.zeros(1, dec.flow.spk_embed_dim))
        z = torch.randn(tuple(mu.shape), generator=dec.new_generator())
        t_span = dec.flow.decoder.time_grid(10)
        f0, _ = dec.hift.source(torch.from_numpy(_expected(golden, f"{name}.mel.npy")), noise=False)
    _close(mu, dbg["mu"], 1e-4)
    _close(spks, dbg["spks"], 1e-5)
    _close(z, dbg["z"], 0.0)  # same generator, seed and shape -> identical draws
    _close(t_span, dbg["t_span"], 1e-7)
    np.testing.assert_allclose(f0.numpy(), dbg["f0"], rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize(("steps", "suffix"), [(10, "mel"), (1, "mel_1step")])
def test_mel_matches_golden(golden: Path, name: str, steps: int, suffix: str) -> None:
    dec = _decoder(str(golden), False)
    mel = dec.decode_mel(_ids(golden, name), n_timesteps=steps)
    _close(mel[None], _expected(golden, f"{name}.{suffix}.npy"), MEL_ATOL)


def test_n_timesteps_from_pretrained(golden: Path) -> None:
    dec = GLM4VoiceDecoder.from_pretrained(golden, n_timesteps=1)
    _close(
        dec.decode_mel(_ids(golden, "tok30"))[None],
        _expected(golden, "tok30.mel_1step.npy"),
        MEL_ATOL,
    )


@pytest.mark.parametrize("name", NAMES)
def test_hift_matches_golden_nonoise_and_seeded(golden: Path, name: str) -> None:
    dec = _decoder(str(golden), True)
    mel = torch.from_numpy(_expected(golden, f"{name}.mel.npy"))[0]
    wav, src = dec.vocode(mel, noise=False)
    _close(wav[None], _expected(golden, f"{name}.wav_nonoise.npy"), WAV_ATOL)
    assert src.shape == wav.shape
    seeded = _expected(golden, f"{name}.wav.npy")
    wav_gen, _ = dec.vocode(mel, generator=torch.Generator().manual_seed(0))
    _close(wav_gen[None], seeded, WAV_ATOL)
    torch.manual_seed(0)  # the README's way: global seed right before the HiFT call
    wav_global, _ = dec.vocode(mel)
    _close(wav_global[None], seeded, WAV_ATOL)
    # The draws matter: the noisy and the noiseless waveforms differ.
    assert np.abs(seeded - _expected(golden, f"{name}.wav_nonoise.npy")).max() > 10 * WAV_ATOL


@pytest.mark.parametrize("name", NAMES)
def test_decode_offline_nonoise(golden: Path, name: str) -> None:
    dec = _decoder(str(golden), False)
    ids = _ids(golden, name)
    wav = dec.decode(ids)
    assert wav.dtype == torch.float32 and wav.numel() == dec.num_samples(ids.numel())
    _close(wav[None], _expected(golden, f"{name}.wav_nonoise.npy"), WAV_ATOL)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("noise", [False, True])
def test_stream_matches_golden(golden: Path, name: str, noise: bool) -> None:
    dec = _decoder(str(golden), noise)
    ids = _ids(golden, name)
    stream = dec.stream()
    chunks = list(iter_web_demo_chunks(ids))
    wav = torch.cat([stream.push(c, final=f) for c, f in chunks])
    suffix = "stream.wav.npy" if noise else "stream_nonoise.wav.npy"
    _close(wav[None], _expected(golden, f"{name}.{suffix}"), WAV_ATOL)
    _close(
        torch.cat(stream.mels, dim=1)[None], _expected(golden, f"{name}.stream.mel.npy"), MEL_ATOL
    )
    assert len(stream.chunk_times) == len(chunks) and all(t > 0 for t in stream.chunk_times)
    assert stream.finished
    # Each chunk's flow noise: generator reseeded with 42, shape (1, 80, frames of all ids so far).
    dbg = np.load(golden / "expected" / f"{name}.stream.debug.npz")
    seen = 0
    for k, (chunk, _) in enumerate(chunks):
        seen += chunk.numel()
        z = torch.randn((1, 80, dec.num_frames(seen)), generator=dec.new_generator())
        _close(z, dbg[f"z_chunk{k}"], 0.0)


def _chain_stream_by_hand(
    dec: GLM4VoiceDecoder,
    stream: GLM4VoiceDecoderStream,
    chunks: list[tuple[torch.Tensor, bool]],
    outputs: list[torch.Tensor],
) -> None:
    """Re-derive every chunk of a finished stream from offline calls (decode_mel + vocode)."""
    ov, hop = stream.overlap_frames, dec.hop_length
    window = torch.from_numpy(np.hamming(2 * ov))
    prev_ids = torch.zeros(0, dtype=torch.long)
    held: torch.Tensor | None = None  # frames held back by the previous chunk
    src_tail: torch.Tensor | None = None
    for k, (chunk, final) in enumerate(chunks):
        prompt_mel = torch.cat(stream.mels[:k], dim=1) if k else None
        ref = dec.decode_mel(chunk, prompt_ids=prev_ids, prompt_mel=prompt_mel)  # offline flow call
        got = stream.mels[k]
        if k:
            # Equal outside the crossfade; inside it, the Hamming mix with the held-back tail.
            mixed = (ref[:, :ov].double() * window[:ov] + held.double() * window[ov:]).float()
            ref = torch.cat([mixed, ref[:, ov:]], dim=1)
            torch.testing.assert_close(got[:, :1], stream.mels[k - 1][:, -1:], rtol=0, atol=0)
            got = got[:, 1:]  # the re-synthesised cache frame
        expect = ref if final else ref[:, :-ov]
        torch.testing.assert_close(got, expect, rtol=0, atol=1e-5)
        held = ref[:, -ov:]
        # HiFT: the chunk's samples are vocode(returned mel) with the previous source tail.
        wav, src = dec.vocode(stream.mels[k], cache_source=src_tail, noise=False)
        src_tail = src[-hop:]
        torch.testing.assert_close(outputs[k], wav if final else wav[:-hop], rtol=0, atol=1e-5)
        prev_ids = torch.cat([prev_ids, chunk])


def test_stream_equals_chunkwise_offline_calls(golden: Path) -> None:
    """Streaming vs offline, noise disabled.

    The streamed audio is NOT the offline audio: each chunk's flow call draws ``z`` for the
    frames of all ids so far (a different shape than the offline call, hence different
    values) and its U-Net sees other context; HiFT restarts the sine phases each chunk. On
    the golden model the original's own stream and offline mels differ by up to ~8 (mean
    ~1.4) in chunk 0. What must hold exactly is that the stream is made of offline calls:
    outside the 34-frame crossfades every returned frame equals ``decode_mel`` on
    (all earlier ids, earlier mels as prompt) and every sample equals ``vocode`` on the
    returned mel with the previous 256-sample source tail; tolerance 1e-5 because both sides
    run the same float32 operations in the same order.
    """
    dec = _decoder(str(golden), False)
    ids = _ids(golden, "tok75")
    chunks = list(iter_web_demo_chunks(ids, block_sizes=(25, 20, 15)))  # 25, 20, 15, 15
    stream = dec.stream()
    outputs = [stream.push(c, final=f) for c, f in chunks]
    assert len(chunks) == 4
    _chain_stream_by_hand(dec, stream, chunks, outputs)
    # The original's prompt (all returned mels) repeats each chunk's re-synthesised cache
    # frame, so every chunk after the second starts one frame late: n_chunks - 2 frames short.
    lost = len(chunks) - 2
    assert sum(w.numel() for w in outputs) == dec.num_samples(ids.numel()) - lost * dec.hop_length
    frames = sum(m.shape[1] for m in stream.mels) - (len(chunks) - 1)  # minus cache frames
    assert frames == dec.num_frames(ids.numel()) - lost


@pytest.mark.parametrize("noise", [False, True])
def test_single_final_push_equals_decode(golden: Path, noise: bool) -> None:
    dec = _decoder(str(golden), noise)
    ids = _ids(golden, "tok30")
    torch.testing.assert_close(
        dec.stream().push(ids, final=True), dec.decode(ids), rtol=0, atol=1e-6
    )


def test_stream_errors_empty_and_short_chunks(golden: Path) -> None:
    dec = _decoder(str(golden), False)
    ids = _ids(golden, "tok30")
    stream = dec.stream()
    with pytest.raises(ValueError, match="shape"):
        stream.push(ids[None])
    with pytest.raises(ValueError, match=r"\[0, 256\)"):
        stream.push(torch.tensor([3, 256]))
    with pytest.raises(ValueError, match="integer"):
        stream.push(torch.tensor([1.0, 2.0]))
    assert stream.push(ids[:0]).numel() == 0 and not stream.chunk_times  # empty: no-op
    # A first chunk too short to emit a frame beyond the overlap is buffered.
    assert stream.push(ids[:3]).numel() == 0 and stream.pending == 3
    first = stream.push(ids[3:25])
    torch.testing.assert_close(first, dec.stream().push(ids[:25]), rtol=0, atol=0)
    # Empty final push flushes the held-back overlap (+ the cached frame).
    tail = stream.push([], final=True)
    assert tail.numel() == (stream.overlap_frames + 1) * dec.hop_length
    assert first.numel() + tail.numel() == dec.num_samples(25)
    assert stream.finished
    with pytest.raises(RuntimeError, match="reset"):
        stream.push(ids[25:])
    stream.reset()
    assert not stream.finished and not stream.mels and not stream.chunk_times
    torch.testing.assert_close(stream.push(ids, final=True), dec.decode(ids), rtol=0, atol=1e-6)
    # An empty final push on a fresh stream yields nothing and finishes it.
    fresh = dec.stream()
    assert fresh.push([], final=True).numel() == 0 and fresh.finished


@pytest.mark.parametrize(
    ("n", "sizes"),
    [
        (0, []),
        (25, [25]),
        (26, [25, 1]),
        (30, [25, 5]),
        (75, [25, 50]),
        (1000, [25, 50, 100, 150, 200, 200, 200, 75]),
    ],
)
def test_iter_web_demo_chunks(n: int, sizes: list[int]) -> None:
    ids = torch.arange(n)
    chunks = list(iter_web_demo_chunks(ids))
    assert [c.numel() for c, _ in chunks] == sizes
    assert [f for _, f in chunks] == [i == len(sizes) - 1 for i in range(len(sizes))]
    if n:
        assert torch.equal(torch.cat([c for c, _ in chunks]), ids)
    with pytest.raises(ValueError):
        list(iter_web_demo_chunks(ids, block_sizes=()))
