"""``mctp serve --engine vllm``: our routes and answers over vLLM's async engine.

One vLLM engine (with the MCTP drafter, verified) serves the whole module behind a real
uvicorn server; concurrent requests must each get our eager Vanilla engine's greedy answer
(fp32): the same token ids, text and audio, and vLLM must have run them in one batch. The
server is the session's ``speech_server`` fixture (conftest.py).
"""

from __future__ import annotations

import base64
import json
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed (run .ci/vllm for the vLLM tests)")

from mctp_serve_helpers import post_json, request, sse_events
from vllm_helpers import SPEECH_MAX_LEN as MAX_LEN
from vllm_helpers import SPEECH_MAX_NEW as MAX_NEW
from vllm_helpers import speech_pipeline as _pipeline

CHATS = ["hello what is the weather today", "tell me about paris", "who are you", "good morning"]
SPEAK = ["one two three", "thanks"]


@pytest.fixture(scope="module")
def reference(speech_dirs):
    """Our eager engine's greedy Vanilla answer of every prompt (fp32)."""
    pipe = _pipeline(speech_dirs[0])
    chats = {t: pipe(t) for t in CHATS}
    speaks = {t: pipe(t, task="tts") for t in SPEAK}
    return chats, speaks


def _pcm(wav) -> bytes:
    from mctp.serve.protocol import pcm16

    return pcm16(wav)


def test_concurrent_answers_equal_vanilla_and_batch_in_vllm(speech_server, reference):
    url, engine, seen = speech_server.url, speech_server.engine, speech_server.seen
    chats, speaks = reference
    assert any(r.num_audio_tokens for r in chats.values())  # the answers hold speech

    def chat(text: str, stream: bool):
        body = {
            "messages": [{"role": "user", "content": text}],
            "modalities": ["text", "audio"],
            "audio": {"format": "pcm16"},
            "max_tokens": MAX_NEW,
            "stream": stream,
        }
        if not stream:
            return post_json(url, "/v1/chat/completions", body)
        status, _, data = request(url, "/v1/chat/completions", body)
        return status, sse_events(data)

    def speak(text: str):
        body = {"input": text, "response_format": "pcm", "max_tokens": MAX_NEW}
        status, _, data = request(url, "/v1/audio/speech", body)
        return status, data

    before = engine.completed
    with ThreadPoolExecutor(len(CHATS) + len(SPEAK)) as pool:
        chat_futs = [pool.submit(chat, t, i % 2 == 1) for i, t in enumerate(CHATS)]
        speak_futs = [pool.submit(speak, t) for t in SPEAK]
        chat_out = [f.result() for f in chat_futs]
        speak_out = [f.result() for f in speak_futs]

    for i, (text, (status, out)) in enumerate(zip(CHATS, chat_out)):
        ref = chats[text]
        assert status == 200, out
        if i % 2 == 0:  # a whole answer
            msg = out["choices"][0]["message"]
            assert msg["content"] == ref.text
            assert base64.b64decode(msg["audio"]["data"]) == _pcm(ref.audio)
            assert out["usage"]["completion_tokens"] == ref.num_tokens
            assert out["choices"][0]["finish_reason"] == ref.finish_reason
        else:  # a stream: text and audio deltas, the usage chunk, then [DONE]
            assert out[-1] == "[DONE]"
            deltas = [e["choices"][0]["delta"] for e in out[:-1]]
            transcript = "".join(d.get("audio", {}).get("transcript", "") for d in deltas)
            pieces = [d["audio"]["data"] for d in deltas if "data" in d.get("audio", {})]
            audio = b"".join(base64.b64decode(x) for x in pieces)
            assert transcript == ref.text and audio == _pcm(ref.audio)
            assert out[-2]["usage"]["completion_tokens"] == ref.num_tokens
        prompt = tuple(ref.prompt_ids.tolist())
        assert prompt in seen, (prompt, sorted(seen))
        assert seen[prompt] == ref.generation.tokens[0].tolist()  # token for token
    for text, (status, data) in zip(SPEAK, speak_out):
        ref = speaks[text]
        assert status == 200
        assert data == _pcm(ref.audio)
        prompt = tuple(ref.prompt_ids.tolist())
        assert prompt in seen, (prompt, sorted(seen))
        assert seen[prompt] == ref.generation.tokens[0].tolist()

    assert engine.completed - before == len(CHATS) + len(SPEAK)
    status, _, data = request(url, "/health")
    health = json.loads(data)
    assert status == 200 and health["status"] == "ready"
    assert health["engine"]["name"] == "vllm" and health["engine"]["num_speculative_tokens"] == 3
    assert health["failed"] == 0 and health["running"] == 0
    assert health["max_rows_seen"] > 1 and health["batches"] > 0  # vLLM ran them together
    assert health["joined"] > 0


def test_refuses_what_vllm_does_not_run(speech_server):
    url = speech_server.url
    status, body = post_json(url, "/v1/audio/speech", {"input": "hello", "mode": "turbo"})
    assert status == 400 and body["error"]["param"] == "mode"
    assert "generates with vLLM" in body["error"]["message"]
    _, _, models = request(url, "/v1/models")
    assert json.loads(models)["data"][0]["mctp"]["modes"] == ["vanilla"]


def test_engine_refuses_settings_vllm_does_not_have(speech_dirs):
    from types import SimpleNamespace

    from mctp import SamplingConfig
    from mctp.interleave import InterleaveSchedule
    from mctp.vllm.speech import VLLMSpeechEngine

    model = speech_dirs[0]
    plain = SimpleNamespace(drafter=None, max_model_len=MAX_LEN, max_num_seqs=8)
    drafted = SimpleNamespace(drafter=speech_dirs[1], max_model_len=MAX_LEN, max_num_seqs=8)
    with pytest.raises(ValueError, match="vLLM runs Vanilla only"):
        VLLMSpeechEngine(_pipeline(model, InterleaveSchedule([1, 3])), plain)
    with pytest.raises(ValueError, match="--draft"):
        VLLMSpeechEngine(_pipeline(model, verify=True), plain)
    with pytest.raises(ValueError, match="add --verify"):
        VLLMSpeechEngine(_pipeline(model), drafted)
    with pytest.raises(ValueError, match="repetition_penalty"):
        sampling = SamplingConfig(repetition_penalty=1.2)
        VLLMSpeechEngine(_pipeline(model, text_sampling=sampling), plain)
    with pytest.raises(ValueError, match="audio_sampling"):
        sampling = SamplingConfig(do_sample=True, temperature=0.7)
        VLLMSpeechEngine(_pipeline(model, audio_sampling=sampling), plain)
    short = SimpleNamespace(drafter=None, max_model_len=MAX_LEN // 2, max_num_seqs=8)
    with pytest.raises(ValueError, match="max_model_len 128"):
        VLLMSpeechEngine(_pipeline(model), short)
    with pytest.raises(ValueError, match="max_queue must be >= 1"):
        VLLMSpeechEngine(_pipeline(model), plain, max_queue=0)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--compile", "on"], "--compile is a setting of our engine"),
        (["--compile-cache", "x"], "--compile-cache is a setting of our engine"),
        (["--audio-heads"], "--audio-heads is a setting of our engine"),
        (["--lanes", "3"], "--lanes is a setting of our engine"),
        (["--no-joins"], "--joins/--no-joins is a setting of our engine"),
        (["--prepare-threads", "1"], "--prepare-threads is a setting of our engine"),
        (["--join-room", "0"], "--join-room is a setting of our engine"),
        (["--mode", "turbo"], "vLLM runs vanilla only"),
        (["--verify"], "needs the drafter folder: --draft DIR"),
        (["--draft", "d"], "add --verify"),
        ([], "needs --model FOLDER"),
        (["--model", "m", "--device", "cuda"], "the installed vLLM runs on cpu"),
    ],
)
def test_cli_refuses_flags_that_do_not_fit(flags, message, capsys):
    from mctp.cli import main

    assert main(["serve", "--engine", "vllm", *flags]) == 2
    assert message in capsys.readouterr().err


def test_a_cancelled_job_stops_its_vllm_request(speech_server):
    import time

    engine = speech_server.engine
    pipe = engine.pipeline
    before = engine.cancelled
    items: list = []
    holder: dict = {}

    def sink(item):  # the client leaves at the answer's first chunk
        items.append(item)
        holder["job"].cancel()

    async def submit():
        holder["job"] = engine.submit(lambda: pipe.open("hello", max_new_tokens=MAX_NEW), sink)

    speech_server.run(submit())
    deadline = time.monotonic() + 60
    while (engine.cancelled == before or engine.running) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert engine.cancelled == before + 1 and engine.running == 0
    assert items and all(getattr(i, "kind", None) != "end" for i in items)  # stopped early
    assert speech_server.run(_unfinished(engine)) == 0  # vLLM dropped the request


async def _unfinished(engine) -> int:
    return engine.engine.engine.output_processor.get_num_unfinished_requests()


def test_a_vllm_failure_ends_the_stream_with_an_error_not_an_answer(speech_server, monkeypatch):
    import asyncio

    gen = speech_server.engine.engine
    text = speech_server.engine.pipeline.tokenizer("hello this", add_special_tokens=False)

    async def broken(prompt_ids, **kw):  # two text ids, then the engine fails
        yield list(text.input_ids)
        await asyncio.sleep(0.5)  # the answer speaks the text first
        raise RuntimeError("the engine core died")

    monkeypatch.setattr(gen, "stream", broken)
    body = {"messages": [{"role": "user", "content": "hello"}], "stream": True}
    status, _, data = request(speech_server.url, "/v1/chat/completions", body)
    events = sse_events(data)
    assert status == 200 and "[DONE]" not in events
    assert events[-1]["error"]["message"] == "the engine core died"
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1]) == "hello this"
    assert all(e["choices"][0]["finish_reason"] is None for e in events[:-1])  # no end
