"""OpenAI-style HTTP server for a :class:`~mctp.speech.SpeechPipeline` (FastAPI + uvicorn).

Routes:
    * ``GET /health``: liveness and queue state.
    * ``GET /v1/models``: the one model served (with its sample rate and modes).
    * ``POST /v1/audio/speech``: text to speech (``response_format`` ``wav`` or ``pcm``;
      ``stream_format: "sse"`` streams ``speech.audio.delta`` events).
    * ``POST /v1/chat/completions``: text and/or ``input_audio`` in, text and audio out
      (``modalities: ["text", "audio"]``); ``stream: true`` sends server-sent events with text
      deltas and base64 16-bit PCM audio chunks.
    * ``GET /``: the web page (record or upload a question, pick the mode, hear the answer).

Extensions to the OpenAI request bodies: ``mode`` (``vanilla|balance|boost|turbo``). Every
answer carries an ``mctp`` object with ``first_chunk_ms`` (from the request's arrival),
``started_ms`` (the waiting part of it: in the queue or for a row of a running batch),
``tokens_per_s``, ``mode`` and ``stray_tokens`` (ids the model put in the wrong kind of
segment, skipped). A field the server
does not honour (see :data:`SPEECH_FIELDS`, :data:`CHAT_FIELDS`), an engine setting, a value
out of range or of the wrong type is a 400 naming it; user text is tokenised as plain text;
the whole prompt is bounded (``max_prompt_tokens``, the engine's ``max_len``) before any work
starts. A stream ends with ``[DONE]`` (chat) / ``speech.audio.done`` or with an error event.
All generation goes through one :class:`~mctp.serve.worker.GenerationWorker`, or through
the speech engine given to :func:`create_app` (``mctp serve --engine vllm``:
:class:`mctp.vllm.speech.VLLMSpeechEngine`, generation in vLLM, answers spoken as here).
"""

# No ``from __future__ import annotations``: FastAPI reads the handlers' annotations
# (``Request``) when they are defined, inside create_app where FastAPI is imported lazily.

import asyncio
import base64
import json
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from .protocol import Api, RequestError, ServerConfig, pcm16, wav_bytes
from .worker import Job

__all__ = ["ServerConfig", "create_app", "serve"]

WEB_DIR = Path(__file__).resolve().parent.parent / "web"


def _stats(result: Any) -> dict[str, Any]:
    return {
        "first_chunk_ms": None
        if result.first_chunk_s is None
        else round(1000 * result.first_chunk_s, 2),
        "first_text_ms": None
        if result.first_text_s is None
        else round(1000 * result.first_text_s, 2),
        "started_ms": None if result.started_s is None else round(1000 * result.started_s, 2),
        "total_ms": round(1000 * result.total_s, 2),
        "tokens_per_s": round(result.tokens_per_s, 2),
        "num_tokens": result.num_tokens,
        "num_audio_tokens": result.num_audio_tokens,
        "mode": result.mode,
        "sample_rate": result.sample_rate,
        "stray_tokens": result.stray_tokens,
    }


SPEECH_FIELDS = frozenset(
    {"model", "input", "voice", "response_format", "stream_format", "speed", "mode"}
    | {"max_tokens", "max_completion_tokens"}
)
"""Fields ``/v1/audio/speech`` honours (anything else is a 400 naming it)."""
CHAT_FIELDS = frozenset(
    {"model", "messages", "modalities", "audio", "stream", "stream_options", "mode", "n"}
    | {"max_tokens", "max_completion_tokens", "temperature", "top_p"}
)
"""Fields ``/v1/chat/completions`` honours (anything else is a 400 naming it)."""


def _error_body(exc: BaseException) -> dict[str, Any]:
    """An OpenAI-style error object for an exception met while streaming."""
    if isinstance(exc, RequestError):
        return exc.body()
    return {"error": {"message": str(exc) or type(exc).__name__, "type": "server_error"}}


def _sse(obj: Any) -> bytes:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj)}\n\n".encode()


def create_app(pipeline: Any, config: ServerConfig | None = None, engine: Any = None) -> Any:
    """The FastAPI application serving ``pipeline``.

    Args:
        pipeline: A :class:`~mctp.speech.SpeechPipeline`.
        config: Limits (default :class:`ServerConfig`).
        engine: The speech engine that runs the requests, None for our own worker over the
            pipeline's Generators. Another engine (e.g.
            :class:`mctp.vllm.speech.VLLMSpeechEngine`) has the worker's ``submit``/``close``
            and counters, plus ``warmup()``, ``describe()`` (its settings for ``/health``)
            and ``modes`` (the request modes it serves).

    Returns:
        A ``fastapi.FastAPI`` app (run it with uvicorn, or :func:`serve`).

    Raises:
        ImportError: If FastAPI is not installed (``pip install 'mctp[serve]'``).
    """
    try:
        from contextlib import asynccontextmanager

        from fastapi import FastAPI, Request
        from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("the server needs FastAPI and uvicorn: pip install 'mctp[serve]'") from e

    cfg = config or ServerConfig()
    api = Api(pipeline, cfg, engine)
    if engine is None:
        warmup = lambda: pipeline.warmup(_warm_modes(pipeline))  # noqa: E731
        settings = lambda: {  # noqa: E731
            k: v for k, v in pipeline.engine.__dict__.items() if k != "compile_options"
        }
        modes = ["vanilla", "balance", "boost", "turbo"]
    else:
        warmup, settings, modes = engine.warmup, engine.describe, list(engine.modes)

    state: dict[str, Any] = {"status": "warming" if cfg.warmup else "ready", "warmup_s": 0.0}

    def warm() -> Any:
        """The warm-up, as the worker's first job (no request runs beside it)."""
        try:
            state["warmup_s"] = round(warmup(), 3)
            state["status"] = "ready"
        except Exception as e:
            state["status"] = "failed"
            state["error"] = f"warm-up failed: {e}"
            raise
        return iter(())

    @asynccontextmanager
    async def lifespan(_app: Any) -> AsyncIterator[None]:
        if cfg.warmup:
            api.worker.submit(warm, lambda _item: None)
        yield
        api.worker.close()

    app = FastAPI(title="mctp speech server", lifespan=lifespan)
    app.state.api = api

    @app.exception_handler(RequestError)
    async def _request_error(_request: Request, exc: RequestError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.get("/health")
    async def health() -> JSONResponse:
        w = api.worker
        body = {
            **state,
            "model": pipeline.name,
            "engine": settings(),
            "busy": w.busy,
            "running": w.running,
            "waiting": w.waiting,
            "max_queue": w.max_queue,
            "prepare_threads": getattr(w, "prepares", None),
            "batches": w.batches,
            "max_rows_seen": w.max_rows_seen,
            "joined": w.joined,
            "completed": w.completed,
            "cancelled": w.cancelled,
            "failed": w.failed,
        }
        # 200 once ready: load balancers and clients wait for the warm-up (503 before)
        return JSONResponse(body, status_code=200 if state["status"] == "ready" else 503)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {
            "object": "list",
            "data": [
                {
                    "id": pipeline.name,
                    "object": "model",
                    "created": 0,
                    "owned_by": "mctp",
                    "mctp": {
                        "sample_rate": pipeline.sample_rate,
                        "input_sample_rate": pipeline.input_sample_rate,
                        "default_mode": list(pipeline.mode.ratio),
                        "modes": modes,
                    },
                }
            ],
        }

    @app.get("/")
    async def index() -> FileResponse:
        return FileResponse(WEB_DIR / "index.html", media_type="text/html")

    @app.get("/app.js")
    async def script() -> FileResponse:
        return FileResponse(WEB_DIR / "app.js", media_type="text/javascript")

    @app.post("/v1/audio/speech")
    async def speech(request: Request) -> Response:
        body = await api.body(request)
        api.fields(body, SPEECH_FIELDS)
        text = api.text(body.get("input"), "input")
        if not text.strip():
            raise RequestError(400, "input must not be empty", "input")
        voice = body.get("voice")
        if voice is not None and not isinstance(voice, str):
            raise RequestError(400, "voice must be a string", "voice")
        speed = api.number(body, "speed", 0.25, 4.0)
        if speed is not None and speed != 1.0:
            raise RequestError(
                400, f"speed {speed:g} is not supported: this model speaks at 1.0 only", "speed"
            )
        fmt = body.get("response_format", "wav")
        if fmt not in ("wav", "pcm"):
            raise RequestError(
                400, f"response_format {fmt!r} is not supported: use wav or pcm", "response_format"
            )
        stream_format = body.get("stream_format", "audio")
        if stream_format not in ("audio", "sse"):
            raise RequestError(
                400, f"stream_format must be audio or sse, got {stream_format!r}", "stream_format"
            )
        try:
            messages = pipeline.build_messages(text, False, "tts")
        except ValueError as e:
            raise RequestError(400, str(e), "input") from None
        budget = api.budget(body)
        api.prompt_tokens(messages, [], budget, "input")
        run = api.stream_run(
            messages=messages, audios=[], mode=api.mode(body), max_new_tokens=budget
        )
        job, out = api.start(run)
        if stream_format == "sse":
            first = await api.next_item(out, job, request)
            return StreamingResponse(
                _speech_events(first, out, job, request), media_type="text/event-stream"
            )
        result = await api.final_result(out, job, request)
        data = wav_bytes(result.audio, result.sample_rate) if fmt == "wav" else pcm16(result.audio)
        headers = {
            "x-mctp-first-chunk-ms": str(_stats(result)["first_chunk_ms"]),
            "x-mctp-tokens-per-s": str(_stats(result)["tokens_per_s"]),
            "x-mctp-sample-rate": str(result.sample_rate),
        }
        media = "audio/wav" if fmt == "wav" else "audio/pcm"
        return Response(data, media_type=media, headers=headers)

    async def _speech_events(
        first: Any, out: asyncio.Queue[Any], job: Job, request: Any
    ) -> AsyncIterator[bytes]:
        item = first
        try:
            while item is not Job.DONE:
                if item.kind == "audio":
                    yield _sse(
                        {
                            "type": "speech.audio.delta",
                            "audio": base64.b64encode(pcm16(item.audio)).decode(),
                        }
                    )
                elif item.kind == "end":
                    r = item.result
                    yield _sse(
                        {
                            "type": "speech.audio.done",
                            "usage": {"output_tokens": r.num_tokens},
                            "mctp": _stats(r),
                        }
                    )
                item = await api.next_item(out, job, request)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # the stream ends with an error event, never silently
            yield _sse({"type": "error", **_error_body(e)})
        finally:
            job.cancel()  # no-op when finished; frees the worker when the client left
            api._checked.pop(job.id, None)

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        body = await api.body(request)
        api.fields(body, CHAT_FIELDS)
        stream = api.flag(body, "stream")
        options = body.get("stream_options")
        if options is not None:
            if not stream or not isinstance(options, dict):
                raise RequestError(
                    400, "stream_options must be an object, and only with stream: true",
                    "stream_options",
                )  # fmt: skip
            api.fields(options, frozenset({"include_usage"}), "stream_options.")
            api.flag(options, "include_usage")  # usage always comes in the last chunk
        n = body.get("n", 1)
        if n != 1 or isinstance(n, bool):
            raise RequestError(400, f"n must be 1 (one answer per request), got {n!r}", "n")
        sampling = api.sampling(body)
        messages, audios = api.messages(body)
        modalities = body.get("modalities", ["text"])
        if (
            not isinstance(modalities, list)
            or not set(modalities) <= {"text", "audio"}
            or "text" not in modalities
        ):
            raise RequestError(
                400, "modalities must be ['text'] or ['text', 'audio']", "modalities"
            )
        want_audio = "audio" in modalities
        audio_opts = body.get("audio") or {}
        if not isinstance(audio_opts, dict):
            raise RequestError(400, "audio must be an object", "audio")
        api.fields(audio_opts, frozenset({"format", "voice"}), "audio.")
        if not isinstance(audio_opts.get("voice", ""), str):
            raise RequestError(400, "audio.voice must be a string", "audio.voice")
        fmt = audio_opts.get("format", "wav")
        if fmt not in ("wav", "pcm16"):
            raise RequestError(
                400, f"audio.format {fmt!r} is not supported: use wav or pcm16", "audio.format"
            )
        budget = api.budget(body)
        api.prompt_tokens(messages, [w.numel() / sr for w, sr in audios], budget, "messages")
        rate = pipeline.input_sample_rate
        wavs = []
        from mctp.codecs import AudioError

        for wav, sr in audios:
            try:
                wavs.append(pipeline.load_audio(wav, sr))
            except (AudioError, ValueError) as e:
                raise RequestError(400, f"bad input audio: {e}", "messages") from None
        assert rate is not None or not wavs
        run = api.stream_run(
            sampling,
            messages=messages,
            audios=wavs,
            mode=api.mode(body),
            max_new_tokens=budget,
        )
        job, out = api.start(run)
        cid = "chatcmpl-" + uuid.uuid4().hex[:24]
        created = int(time.time())
        if stream:
            first = await api.next_item(out, job, request)
            gen = _chat_events(first, out, job, request, cid, created, want_audio)
            return StreamingResponse(gen, media_type="text/event-stream")
        result = await api.final_result(out, job, request)
        message: dict[str, Any] = {"role": "assistant", "content": result.text}
        if want_audio:
            data = (
                wav_bytes(result.audio, result.sample_rate) if fmt == "wav" else pcm16(result.audio)
            )
            message["audio"] = {
                "id": "audio-" + cid[9:],
                "data": base64.b64encode(data).decode(),
                "format": fmt,
                "transcript": result.text,
                "expires_at": created + 3600,
            }
        return JSONResponse(
            {
                "id": cid,
                "object": "chat.completion",
                "created": created,
                "model": pipeline.name,
                "choices": [
                    {"index": 0, "message": message, "finish_reason": result.finish_reason}
                ],
                "usage": {"completion_tokens": result.num_tokens},
                "mctp": _stats(result),
            }
        )

    async def _chat_events(
        first: Any,
        out: asyncio.Queue[Any],
        job: Job,
        request: Any,
        cid: str,
        created: int,
        want_audio: bool,
    ) -> AsyncIterator[bytes]:
        def chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> bytes:
            return _sse(
                {
                    "id": cid,
                    "object": "chat.completion.chunk",
                    "created": created,
                    "model": pipeline.name,
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
                    **extra,
                }
            )

        audio_id = "audio-" + cid[9:]
        item = first
        try:
            yield chunk({"role": "assistant", "content": ""})
            while item is not Job.DONE:
                if item.kind == "text":
                    if want_audio:
                        yield chunk({"audio": {"id": audio_id, "transcript": item.text}})
                    else:
                        yield chunk({"content": item.text})
                elif item.kind == "audio" and want_audio:
                    data = base64.b64encode(pcm16(item.audio)).decode()
                    yield chunk(
                        {
                            "audio": {
                                "id": audio_id,
                                "data": data,
                                "sample_rate": pipeline.sample_rate,
                            }
                        }
                    )
                elif item.kind == "end":
                    r = item.result
                    yield chunk(
                        {},
                        r.finish_reason,
                        usage={"completion_tokens": r.num_tokens},
                        mctp=_stats(r),
                    )
                item = await api.next_item(out, job, request)
            yield _sse("[DONE]")
        except asyncio.CancelledError:
            raise
        except Exception as e:  # the stream ends with an error event, never silently
            yield _sse(_error_body(e))
        finally:
            job.cancel()  # no-op when finished; frees the worker when the client left
            api._checked.pop(job.id, None)

    return app


def _warm_modes(pipeline: Any) -> list[Any]:
    """The modes the warm-up runs: every named mode the stack can run (each compiles its own
    shapes on the fast path), the default first."""
    from mctp.speech import InterleaveSchedule, Mode

    heads = 0 if pipeline.stack is None else pipeline.stack.num_heads
    out = [pipeline.mode]
    for m in Mode:
        sched = InterleaveSchedule.from_mode(m.value)
        if sched != pipeline.mode and (not sched.uses_mctp or sched.max_heads <= heads):
            out.append(sched)
    return out


def serve(
    pipeline: Any,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    config: ServerConfig | None = None,
    log_level: str = "info",
    engine: Any = None,
) -> None:
    """Run the server with uvicorn until interrupted (``engine``: as :func:`create_app`).

    Raises:
        ImportError: If uvicorn or FastAPI is missing (``pip install 'mctp[serve]'``).
    """
    try:
        import uvicorn
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("the server needs FastAPI and uvicorn: pip install 'mctp[serve]'") from e
    uvicorn.run(create_app(pipeline, config, engine), host=host, port=port, log_level=log_level)
