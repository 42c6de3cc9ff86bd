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
answer carries an ``mctp`` object with ``first_chunk_ms``, ``tokens_per_s`` and ``mode``.
All generation goes through one :class:`~mctp.serve.worker.GenerationWorker`.
"""

# No ``from __future__ import annotations``: FastAPI reads the handlers' annotations
# (``Request``) when they are defined, inside create_app where FastAPI is imported lazily.

import asyncio
import base64
import io
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .worker import GenerationWorker, Job, QueueFull

__all__ = ["ServerConfig", "create_app", "serve"]

WEB_DIR = Path(__file__).resolve().parent.parent / "web"


@dataclass(frozen=True)
class ServerConfig:
    """Limits of the server.

    Attributes:
        max_queue: Requests that may wait for the generation worker; more get 503.
        max_body_bytes: Largest request body (413 above).
        max_audio_s: Longest input audio in seconds (400 above).
        max_text_chars: Longest input text (400 above).
        max_new_tokens: Upper bound for ``max_tokens`` / the default budget.
        warmup: Run one short generation at start-up so the first request is not slower.
    """

    max_queue: int = 8
    max_body_bytes: int = 16 * 1024 * 1024
    max_audio_s: float = 60.0
    max_text_chars: int = 4000
    max_new_tokens: int = 1024
    warmup: bool = True

    def __post_init__(self) -> None:
        for name in ("max_queue", "max_body_bytes", "max_text_chars", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_audio_s <= 0:
            raise ValueError(f"max_audio_s must be > 0, got {self.max_audio_s}")


class RequestError(Exception):
    """A request the server refuses, with its HTTP status and an OpenAI-style error body."""

    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param = status, message, param

    def body(self) -> dict[str, Any]:
        kind = {
            400: "invalid_request_error",
            404: "not_found_error",
            413: "request_too_large",
            503: "server_busy",
        }.get(self.status, "server_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param}}


def _pcm16(wav: torch.Tensor) -> bytes:
    """``[S]`` float -> little-endian 16-bit PCM bytes."""
    x = np.clip(wav.detach().cpu().numpy().astype(np.float32), -1.0, 1.0)
    return (x * 32767.0).round().astype("<i2").tobytes()


def _wav_bytes(wav: torch.Tensor, sample_rate: int) -> bytes:
    import soundfile as sf

    buf = io.BytesIO()
    sf.write(
        buf, wav.detach().cpu().numpy().astype(np.float32), sample_rate, "PCM_16", format="WAV"
    )
    return buf.getvalue()


def _decode_audio(data: Any, fmt: Any, cfg: ServerConfig, param: str) -> tuple[torch.Tensor, int]:
    """Base64 audio file bytes -> (``[T]`` mono float32, sample rate); 400 on anything bad."""
    import soundfile as sf

    from mctp.codecs import to_mono

    if not isinstance(data, str) or not data:
        raise RequestError(400, f"{param}.data must be a non-empty base64 string", param)
    if fmt is not None and fmt not in ("wav", "flac", "ogg", "mp3"):
        raise RequestError(
            400, f"unsupported audio format {fmt!r}: use wav, flac, ogg or mp3", param
        )
    try:
        raw = base64.b64decode(data, validate=True)
    except ValueError as e:
        raise RequestError(400, f"{param}.data is not valid base64: {e}", param) from None
    try:
        wav, sr = sf.read(io.BytesIO(raw), dtype="float32", always_2d=True)
    except Exception as e:  # soundfile raises LibsndfileError / RuntimeError / TypeError
        reason = str(e).rsplit(">: ", 1)[-1]  # drop "Error opening <_io.BytesIO ...>: "
        raise RequestError(400, f"cannot read the audio in {param}: {reason}", param) from None
    if wav.shape[0] == 0:
        raise RequestError(400, f"the audio in {param} is empty", param)
    if wav.shape[0] / sr > cfg.max_audio_s:
        raise RequestError(
            400,
            f"the audio in {param} lasts {wav.shape[0] / sr:.1f} s; the limit is {cfg.max_audio_s:g} s",
            param,
        )
    if not np.isfinite(wav).all():
        raise RequestError(400, f"the audio in {param} holds NaN or infinite samples", param)
    return to_mono(torch.from_numpy(wav), channels_first=False), int(sr)


class _Api:
    """Request parsing and the bridge from the worker thread to asyncio."""

    def __init__(self, pipeline: Any, cfg: ServerConfig) -> None:
        self.pipe, self.cfg = pipeline, cfg
        self.worker = GenerationWorker(cfg.max_queue)
        self._checked: dict[int, float] = {}  # job id -> when its connection was last looked at

    # ------------------------------------------------------------------ parsing helpers
    async def body(self, request: Any) -> dict[str, Any]:
        size = request.headers.get("content-length")
        if size is not None and size.isdigit() and int(size) > self.cfg.max_body_bytes:
            raise RequestError(413, f"request body over {self.cfg.max_body_bytes} bytes")
        raw = await request.body()
        if len(raw) > self.cfg.max_body_bytes:
            raise RequestError(413, f"request body over {self.cfg.max_body_bytes} bytes")
        try:
            body = json.loads(raw)
        except ValueError as e:
            raise RequestError(400, f"the body is not valid JSON: {e}") from None
        if not isinstance(body, dict):
            raise RequestError(400, "the body must be a JSON object")
        model = body.get("model")
        if model is not None and model != self.pipe.name:
            raise RequestError(
                404, f"model {model!r} not found; this server has {self.pipe.name!r}", "model"
            )
        return body

    def mode(self, body: dict[str, Any]) -> Any:
        mode = body.get("mode")
        if mode is None:
            return None
        try:
            return self.pipe.schedule(mode)
        except (ValueError, TypeError) as e:
            raise RequestError(400, str(e), "mode") from None

    def budget(self, body: dict[str, Any]) -> int:
        n = body.get("max_completion_tokens", body.get("max_tokens"))
        if n is None:
            return min(self.pipe.max_new_tokens, self.cfg.max_new_tokens)
        if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= self.cfg.max_new_tokens:
            raise RequestError(
                400,
                f"max_tokens must be an integer in [1, {self.cfg.max_new_tokens}], got {n!r}",
                "max_tokens",
            )
        return n

    def text(self, value: Any, param: str) -> str:
        if not isinstance(value, str):
            raise RequestError(400, f"{param} must be a string", param)
        if len(value) > self.cfg.max_text_chars:
            raise RequestError(400, f"{param} is over {self.cfg.max_text_chars} characters", param)
        return value

    def messages(
        self, body: dict[str, Any]
    ) -> tuple[list[dict[str, str]], list[tuple[torch.Tensor, int]]]:
        from mctp.backbones import AUDIO_PLACEHOLDER

        msgs = body.get("messages")
        if not isinstance(msgs, list) or not msgs:
            raise RequestError(400, "messages must be a non-empty list", "messages")
        out: list[dict[str, str]] = []
        audios: list[tuple[torch.Tensor, int]] = []
        total = 0
        for i, m in enumerate(msgs):
            where = f"messages[{i}]"
            if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
                raise RequestError(400, f"{where} needs a role of system, user or assistant", where)
            content = m.get("content")
            if isinstance(content, str):
                parts = [{"type": "text", "text": content}]
            elif isinstance(content, list):
                parts = content
            else:
                raise RequestError(
                    400, f"{where}.content must be a string or a list of parts", where
                )
            texts: list[str] = []
            for j, part in enumerate(parts):
                p = f"{where}.content[{j}]"
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "text":
                    texts.append(self.text(part.get("text"), p + ".text"))
                elif kind == "input_audio":
                    spec = part.get("input_audio")
                    if not isinstance(spec, dict):
                        raise RequestError(400, f"{p}.input_audio must be an object", p)
                    if self.pipe.input_sample_rate is None:
                        raise RequestError(400, "this model takes no audio input", p)
                    audios.append(
                        _decode_audio(
                            spec.get("data"), spec.get("format"), self.cfg, p + ".input_audio"
                        )
                    )
                    total += audios[-1][0].numel() / audios[-1][1]
                    texts.append(AUDIO_PLACEHOLDER)
                else:
                    raise RequestError(
                        400, f"{p}.type must be 'text' or 'input_audio', got {kind!r}", p
                    )
            content_text = "\n".join(t for t in texts if t)
            if AUDIO_PLACEHOLDER in "".join(t for t in texts if t != AUDIO_PLACEHOLDER):
                raise RequestError(
                    400, f"{where} contains the reserved text {AUDIO_PLACEHOLDER}", where
                )
            out.append({"role": m["role"], "content": content_text})
        if total > self.cfg.max_audio_s:
            raise RequestError(
                400,
                f"the request holds {total:.1f} s of audio; the limit is {self.cfg.max_audio_s:g} s",
                "messages",
            )
        if not any(m["role"] == "user" and m["content"] for m in out):
            raise RequestError(400, "no user message with content", "messages")
        return out, audios

    # ------------------------------------------------------------------ running jobs
    def start(self, run: Callable[[], Iterator[Any]]) -> tuple[Job, asyncio.Queue[Any]]:
        loop = asyncio.get_running_loop()
        out: asyncio.Queue[Any] = asyncio.Queue()

        def sink(item: Any) -> None:
            try:
                loop.call_soon_threadsafe(out.put_nowait, item)
            except RuntimeError:  # the event loop is gone (server shutting down)
                pass

        try:
            job = self.worker.submit(run, sink)
        except QueueFull as e:
            raise RequestError(503, str(e)) from None
        return job, out

    async def next_item(self, out: asyncio.Queue[Any], job: Job, request: Any) -> Any:
        """The next item of a job; cancels it when the client has disconnected.

        The connection is looked at whenever 0.2 s have passed since the last look, whether
        or not items keep coming.
        """
        while True:
            last = self._checked.setdefault(job.id, time.monotonic())
            if time.monotonic() - last >= 0.2:
                self._checked[job.id] = time.monotonic()
                if await request.is_disconnected():
                    job.cancel()
                    self._checked.pop(job.id, None)
                    raise asyncio.CancelledError
            try:
                item = await asyncio.wait_for(out.get(), timeout=0.2)
            except TimeoutError:
                continue
            if item is Job.DONE or isinstance(item, Exception):
                self._checked.pop(job.id, None)
            if isinstance(item, Exception):
                if isinstance(item, (ValueError, FileNotFoundError)):
                    raise RequestError(400, str(item)) from item
                raise item
            return item

    def stream_run(self, **kwargs: Any) -> Callable[[], Iterator[Any]]:
        pipe = self.pipe

        def run() -> Iterator[Any]:
            return pipe.stream(**kwargs)

        return run


def _stats(result: Any) -> dict[str, Any]:
    return {
        "first_chunk_ms": None
        if result.first_chunk_s is None
        else round(1000 * result.first_chunk_s, 2),
        "first_text_ms": None
        if result.first_text_s is None
        else round(1000 * result.first_text_s, 2),
        "total_ms": round(1000 * result.total_s, 2),
        "tokens_per_s": round(result.tokens_per_s, 2),
        "num_tokens": result.num_tokens,
        "num_audio_tokens": result.num_audio_tokens,
        "mode": result.mode,
        "sample_rate": result.sample_rate,
    }


def _sse(obj: Any) -> bytes:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj)}\n\n".encode()


def create_app(pipeline: Any, config: ServerConfig | None = None) -> Any:
    """The FastAPI application serving ``pipeline``.

    Args:
        pipeline: A :class:`~mctp.speech.SpeechPipeline`.
        config: Limits (default :class:`ServerConfig`).

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
    api = _Api(pipeline, cfg)

    @asynccontextmanager
    async def lifespan(_app: Any) -> AsyncIterator[None]:
        if cfg.warmup:
            await asyncio.to_thread(pipeline, "hello", max_new_tokens=16)
        yield
        api.worker.close()

    app = FastAPI(title="mctp speech server", lifespan=lifespan)
    app.state.api = api

    @app.exception_handler(RequestError)
    async def _request_error(_request: Request, exc: RequestError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        w = api.worker
        return {
            "status": "ok",
            "model": pipeline.name,
            "busy": w.busy,
            "waiting": w.waiting,
            "max_queue": w.max_queue,
            "completed": w.completed,
            "cancelled": w.cancelled,
            "failed": w.failed,
        }

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
                        "modes": ["vanilla", "balance", "boost", "turbo"],
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
        text = api.text(body.get("input"), "input")
        if not text.strip():
            raise RequestError(400, "input must not be empty", "input")
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
        run = api.stream_run(
            text=text, task="tts", mode=api.mode(body), max_new_tokens=api.budget(body)
        )
        job, out = api.start(run)
        if stream_format == "sse":
            first = await api.next_item(out, job, request)
            return StreamingResponse(
                _speech_events(first, out, job, request), media_type="text/event-stream"
            )
        result = None
        while True:
            item = await api.next_item(out, job, request)
            if item is Job.DONE:
                break
            if item.kind == "end":
                result = item.result
        assert result is not None
        data = (
            _wav_bytes(result.audio, result.sample_rate) if fmt == "wav" else _pcm16(result.audio)
        )
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
                            "audio": base64.b64encode(_pcm16(item.audio)).decode(),
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
        finally:
            job.cancel()  # no-op when finished; frees the worker when the client left
            api._checked.pop(job.id, None)

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        body = await api.body(request)
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
        fmt = audio_opts.get("format", "wav")
        if fmt not in ("wav", "pcm16"):
            raise RequestError(
                400, f"audio.format {fmt!r} is not supported: use wav or pcm16", "audio.format"
            )
        stream = bool(body.get("stream", False))
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
            messages=messages, audios=wavs, mode=api.mode(body), max_new_tokens=api.budget(body)
        )
        job, out = api.start(run)
        cid = "chatcmpl-" + uuid.uuid4().hex[:24]
        created = int(time.time())
        if stream:
            first = await api.next_item(out, job, request)
            gen = _chat_events(first, out, job, request, cid, created, want_audio)
            return StreamingResponse(gen, media_type="text/event-stream")
        result = None
        while True:
            item = await api.next_item(out, job, request)
            if item is Job.DONE:
                break
            if item.kind == "end":
                result = item.result
        assert result is not None
        message: dict[str, Any] = {"role": "assistant", "content": result.text}
        if want_audio:
            data = (
                _wav_bytes(result.audio, result.sample_rate)
                if fmt == "wav"
                else _pcm16(result.audio)
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
                    data = base64.b64encode(_pcm16(item.audio)).decode()
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
        finally:
            job.cancel()  # no-op when finished; frees the worker when the client left
            api._checked.pop(job.id, None)

    return app


def serve(
    pipeline: Any,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    config: ServerConfig | None = None,
    log_level: str = "info",
) -> None:
    """Run the server with uvicorn until interrupted.

    Raises:
        ImportError: If uvicorn or FastAPI is missing (``pip install 'mctp[serve]'``).
    """
    try:
        import uvicorn
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("the server needs FastAPI and uvicorn: pip install 'mctp[serve]'") from e
    uvicorn.run(create_app(pipeline, config), host=host, port=port, log_level=log_level)
