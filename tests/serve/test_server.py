"""The OpenAI-style server over real HTTP on 127.0.0.1 (``mctp serve`` in a subprocess)."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
import soundfile as sf
import torch
from mctp_serve_helpers import post_json, request, sse_events, wav_b64

from mctp.codecs import DummyCodec
from mctp.speech.tiny import TINY_ANSWER

CODEC = DummyCodec(codebook_size=256)


def _pcm(b64: str) -> np.ndarray:
    return np.frombuffer(base64.b64decode(b64), dtype="<i2")


def test_health_and_models(server):
    status, _, data = request(server, "/health")
    assert status == 200
    health = json.loads(data)
    assert health["status"] == "ready" and health["model"] == "mctp-tiny"
    assert health["warmup_s"] > 0  # the warm-up ran (every mode) before /health said ready
    assert health["engine"]["max_batch"] == 8 and health["engine"]["audio_heads"] is False
    assert health["prepare_threads"] == 0  # the dummy codec: the generation thread prepares
    status, _, data = request(server, "/v1/models")
    models = json.loads(data)
    assert status == 200 and models["object"] == "list"
    (model,) = models["data"]
    assert model["id"] == "mctp-tiny"
    assert model["mctp"]["sample_rate"] == 16000
    assert model["mctp"]["default_mode"] == [1, 10, 4, 10]


def test_speech_wav_and_pcm(server):
    status, headers, data = request(
        server, "/v1/audio/speech", {"model": "mctp-tiny", "input": "hello world", "voice": "x"}
    )
    assert status == 200 and headers["content-type"] == "audio/wav"
    wav, sr = sf.read(io.BytesIO(data), dtype="float32")
    assert sr == 16000 and wav.shape == (24 * 1280,)
    assert float(headers["x-mctp-first-chunk-ms"]) > 0
    # the dummy codec's tones come back as the generated codes (16-bit rounding is harmless)
    assert CODEC.encode([torch.from_numpy(wav)])[0].numel() == 24
    status, _, pcm = request(
        server, "/v1/audio/speech", {"input": "hello world", "response_format": "pcm"}
    )
    assert status == 200 and len(pcm) == 2 * wav.size
    pcm_wav = np.frombuffer(pcm, "<i2").astype(np.float32) / 32767
    assert np.abs(pcm_wav - wav).max() < 2e-4  # the same answer, two 16-bit roundings
    assert torch.equal(
        CODEC.encode([torch.from_numpy(pcm_wav)])[0], CODEC.encode([torch.from_numpy(wav)])[0]
    )


def test_speech_sse(server):
    status, headers, data = request(
        server, "/v1/audio/speech", {"input": "hello", "stream_format": "sse", "mode": "turbo"}
    )
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    events = sse_events(data)
    deltas = [e for e in events if e["type"] == "speech.audio.delta"]
    assert len(deltas) == 3 and events[-1]["type"] == "speech.audio.done"
    assert events[-1]["mctp"]["mode"] == [1, 10]
    assert sum(_pcm(d["audio"]).size for d in deltas) == 24 * 1280


def test_chat_text_and_audio(server):
    body = {
        "model": "mctp-tiny",
        "messages": [{"role": "user", "content": "what is the capital of france"}],
        "modalities": ["text", "audio"],
        "audio": {"voice": "alloy", "format": "wav"},
    }
    status, out = post_json(server, "/v1/chat/completions", body)
    assert status == 200, out
    msg = out["choices"][0]["message"]
    assert msg["content"] == TINY_ANSWER and msg["audio"]["transcript"] == TINY_ANSWER
    assert out["choices"][0]["finish_reason"] == "stop"
    wav, sr = sf.read(io.BytesIO(base64.b64decode(msg["audio"]["data"])))
    assert sr == 16000 and wav.shape == (24 * 1280,)
    assert out["mctp"]["first_chunk_ms"] > 0 and out["mctp"]["tokens_per_s"] > 0
    assert 0 <= out["mctp"]["started_ms"] < out["mctp"]["first_chunk_ms"]  # its waiting part
    # text only: no audio in the answer
    status, out = post_json(server, "/v1/chat/completions", {**body, "modalities": ["text"]})
    assert status == 200 and "audio" not in out["choices"][0]["message"]


def test_chat_stream_with_spoken_question(server):
    question = CODEC.decode(torch.arange(20))
    body = {
        "messages": [
            {
                "role": "user",
                "content": [
                    {
                        "type": "input_audio",
                        "input_audio": {"data": wav_b64(question, 16000), "format": "wav"},
                    }
                ],
            }
        ],
        "modalities": ["text", "audio"],
        "audio": {"format": "pcm16"},
        "stream": True,
    }
    status, headers, data = request(server, "/v1/chat/completions", body)
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    events = sse_events(data)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    deltas = [c["choices"][0]["delta"] for c in chunks]
    transcript = "".join(d.get("audio", {}).get("transcript", "") for d in deltas)
    audio = [d["audio"]["data"] for d in deltas if "data" in d.get("audio", {})]
    assert audio and all(
        d["audio"]["sample_rate"] == 16000 for d in deltas if "data" in d.get("audio", {})
    )
    final = chunks[-1]
    assert final["choices"][0]["finish_reason"] in ("stop", "length")
    assert final["mctp"]["num_audio_tokens"] * 1280 == sum(_pcm(a).size for a in audio)
    # the same question without streaming gives the same text and the same samples
    status, out = post_json(server, "/v1/chat/completions", {**body, "stream": False})
    assert out["choices"][0]["message"]["content"] == transcript
    whole = _pcm(out["choices"][0]["message"]["audio"]["data"])
    np.testing.assert_array_equal(whole, np.concatenate([_pcm(a) for a in audio]))


@pytest.mark.parametrize(
    ("body", "status", "needle"),
    [
        ({"messages": [{"role": "user", "content": "hi"}], "mode": "fast"}, 400, "unknown mode"),
        ({"messages": []}, 400, "non-empty list"),
        ({"messages": [{"role": "robot", "content": "hi"}]}, 400, "role"),
        ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, 400, "max_tokens"),
        (
            {"messages": [{"role": "user", "content": "hi"}], "modalities": ["audio"]},
            400,
            "modalities",
        ),
        ({"messages": [{"role": "user", "content": "hi"}], "model": "gpt-4o"}, 404, "not found"),
        (
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {
                                "type": "input_audio",
                                "input_audio": {"data": "aGVsbG8=", "format": "wav"},
                            }
                        ],
                    }
                ]
            },
            400,
            "cannot read the audio",
        ),
        (
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "input_audio", "input_audio": {"data": "***", "format": "wav"}}
                        ],
                    }
                ]
            },
            400,
            "base64",
        ),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
            400,
            "'text' or 'input_audio'",
        ),
    ],
)
def test_chat_bad_requests(server, body, status, needle):
    got, out = post_json(server, "/v1/chat/completions", body)
    assert got == status
    assert needle in out["error"]["message"]


def test_limits_and_bad_speech_params(server):
    long = CODEC.decode(torch.zeros(50, dtype=torch.long))  # 4 s > the server's 3 s limit
    part = {"type": "input_audio", "input_audio": {"data": wav_b64(long, 16000), "format": "wav"}}
    status, out = post_json(
        server, "/v1/chat/completions", {"messages": [{"role": "user", "content": [part]}]}
    )
    assert status == 400 and "limit is 3 s" in out["error"]["message"]
    status, _, data = request(server, "/v1/chat/completions", b"x" * (1024 * 1024 + 1))
    assert status == 413
    status, _, data = request(server, "/v1/chat/completions", b"{not json")
    assert status == 400 and b"not valid JSON" in data
    status, out = post_json(server, "/v1/audio/speech", {"input": "hi", "response_format": "mp3"})
    assert status == 400 and "wav or pcm" in out["error"]["message"]
    status, out = post_json(server, "/v1/audio/speech", {"input": ""})
    assert status == 400
    status, out = post_json(server, "/v1/audio/speech", {"input": 3})
    assert status == 400 and "must be a string" in out["error"]["message"]
    # after all that the server still answers
    status, _, _ = request(server, "/v1/audio/speech", {"input": "hello"})
    assert status == 200


def test_web_page_is_served(server):
    status, headers, page = request(server, "/")
    assert status == 200 and headers["content-type"].startswith("text/html")
    assert b'id="latency"' in page and b'<script src="app.js">' in page
    status, headers, script = request(server, "/app.js")
    assert status == 200 and b"/v1/chat/completions" in script
