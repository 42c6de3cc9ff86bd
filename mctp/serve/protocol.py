"""Request handling of the server: limits, OpenAI-style errors, parsing, the worker bridge.

Kept apart from the routes (:mod:`mctp.serve.app`) and free of FastAPI imports: requests are
read through the few ASGI ``Request`` methods they need.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .worker import GenerationWorker, Job, Preparation, QueueFull

__all__ = [
    "Api",
    "RequestError",
    "ServerConfig",
    "decode_audio",
    "pcm16",
    "preparation_threads",
    "wav_bytes",
]


@dataclass(frozen=True)
class ServerConfig:
    """Limits of the server.

    Attributes:
        max_queue: Requests that may wait for the generation worker; more get 503.
        max_body_bytes: Largest request body (413 above).
        max_audio_s: Longest input audio in seconds (400 above).
        max_text_chars: Longest input text (400 above).
        max_new_tokens: Upper bound for ``max_tokens`` / the default budget.
        max_prompt_tokens: Longest prompt in tokens after the chat template, speech included
            (estimated from the input codec's frame rate before any work starts; 400 above).
            The engine's ``max_len`` bounds prompt + budget as well.
        warmup: Run one short generation per mode at start-up (the compiled path compiles
            there) before ``/health`` reports ready.
        lanes: Generators of ``max_batch`` rows each: a request that arrives while every
            lane runs a batch waits for the first to end.
        joins: Let a waiting request join a running batch at its next join point (a row
            freed by an answer that ended) instead of waiting for a lane.
        prepare_threads: Threads that prepare requests (encode the question's audio, render
            and tokenize the prompt) instead of the generation thread, so that a long
            question's encoding never stalls the answers being generated (two or more: nor
            holds a short request behind it). None: on the CPU, 2 with a speech-input codec
            other than the dummy codec (a neural tokenizer or encoder), 0 with the dummy codec
            or none (there a second thread's share of Python's interpreter lock costs the
            generation more than the preparation it takes over); 0 on CUDA, where the
            encoding is short and the compiled path records CUDA graphs on the generation
            thread, which another thread's kernels could disturb (not tried on a GPU).
    """

    max_queue: int = 8
    max_body_bytes: int = 16 * 1024 * 1024
    max_audio_s: float = 60.0
    max_text_chars: int = 4000
    max_new_tokens: int = 1024
    max_prompt_tokens: int = 2048
    warmup: bool = True
    lanes: int = 2
    joins: bool = True
    prepare_threads: int | None = None

    def __post_init__(self) -> None:
        for name in (
            "max_queue",
            "max_body_bytes",
            "max_text_chars",
            "max_new_tokens",
            "max_prompt_tokens",
            "lanes",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_audio_s <= 0:
            raise ValueError(f"max_audio_s must be > 0, got {self.max_audio_s}")
        n = self.prepare_threads
        if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n < 0):
            raise ValueError(f"prepare_threads must be an int >= 0 or None (auto), got {n!r}")


def preparation_threads(pipeline: Any, cfg: ServerConfig) -> int:
    """The threads that prepare the server's requests (:attr:`ServerConfig.prepare_threads`,
    resolved for ``pipeline``)."""
    if cfg.prepare_threads is not None:
        return cfg.prepare_threads
    from mctp.codecs import DummyCodec

    if str(pipeline.engine.device).startswith("cuda"):
        return 0  # CUDA graphs are recorded on the generation thread (see prepare_threads)
    codec = pipeline.input_codec
    return 2 if codec is not None and not isinstance(codec, DummyCodec) else 0


class RequestError(Exception):
    """A request the server refuses, with its HTTP status and an OpenAI-style error body."""

    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param = status, message, param

    def body(self) -> dict[str, Any]:
        """The OpenAI-style error object."""
        kind = {
            400: "invalid_request_error",
            404: "not_found_error",
            413: "request_too_large",
            503: "server_busy",
        }.get(self.status, "server_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param}}


def pcm16(wav: torch.Tensor) -> bytes:
    """``[S]`` float -> little-endian 16-bit PCM bytes."""
    x = np.clip(wav.detach().cpu().numpy().astype(np.float32), -1.0, 1.0)
    return (x * 32767.0).round().astype("<i2").tobytes()


def wav_bytes(wav: torch.Tensor, sample_rate: int) -> bytes:
    import soundfile as sf

    buf = io.BytesIO()
    sf.write(
        buf, wav.detach().cpu().numpy().astype(np.float32), sample_rate, "PCM_16", format="WAV"
    )
    return buf.getvalue()


def decode_audio(data: Any, fmt: Any, cfg: ServerConfig, param: str) -> tuple[torch.Tensor, int]:
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


class Api:
    """Request parsing and the bridge from the generation worker's thread to asyncio.

    Args:
        pipeline: The :class:`~mctp.speech.SpeechPipeline` served.
        cfg: The server's limits.
        worker: What runs the jobs (:meth:`start`): None for our own
            :class:`~mctp.serve.worker.GenerationWorker` batching over the pipeline's
            Generators; a speech engine with the same ``submit``/``close`` and counters
            otherwise (``mctp serve --engine vllm``: :class:`mctp.vllm.speech.VLLMSpeechEngine`).
    """

    def __init__(self, pipeline: Any, cfg: ServerConfig, worker: Any | None = None) -> None:
        from mctp.speech import SpeechBatcher

        self.pipe, self.cfg = pipeline, cfg
        self.worker = worker or GenerationWorker(
            cfg.max_queue,
            batcher=SpeechBatcher(pipeline, lanes=cfg.lanes, joins=cfg.joins),
            turn=pipeline._threads,
            first=lambda chunk: getattr(chunk, "kind", None) != "text",  # audio or the end
            prepare=preparation_threads(pipeline, cfg),
        )
        self._checked: dict[int, float] = {}  # job id -> when its connection was last looked at

    # ------------------------------------------------------------------ parsing helpers
    async def body(self, request: Any) -> dict[str, Any]:
        """The request's JSON object.

        Raises:
            RequestError: 413 over ``max_body_bytes``, 400 for anything but a JSON object,
                404 for a ``model`` other than the one served.
        """
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
        except RecursionError:
            raise RequestError(400, "the body's JSON is nested too deeply") from None
        if not isinstance(body, dict):
            raise RequestError(400, "the body must be a JSON object")
        model = body.get("model")
        if model is not None and model != self.pipe.name:
            raise RequestError(
                404, f"model {model!r} not found; this server has {self.pipe.name!r}", "model"
            )
        return body

    def mode(self, body: dict[str, Any]) -> Any:
        """The request's schedule (None: the pipeline's default).

        Raises:
            RequestError: 400 for an unknown mode or one the model's heads cannot run.
        """
        mode = body.get("mode")
        if mode is None:
            return None
        served = getattr(self.worker, "modes", None)  # another engine's subset (vLLM: vanilla)
        if served is not None and mode not in served:
            raise RequestError(
                400,
                f"mode {mode!r} is not served here: this server generates with "
                f"{self.worker.name}, which runs {list(served)} only",
                "mode",
            )
        try:
            return self.pipe.schedule(mode)
        except (ValueError, TypeError) as e:
            raise RequestError(400, str(e), "mode") from None

    def fields(self, body: dict[str, Any], allowed: frozenset[str], where: str = "") -> None:
        """Refuse the fields of ``body`` that this server does not honour.

        Raises:
            RequestError: 400 naming an engine setting (fixed when the server starts) or an
                unknown field (as OpenAI answers unknown parameters).
        """
        from dataclasses import fields as dc_fields

        from mctp.speech import EngineConfig

        engine = {f.name for f in dc_fields(EngineConfig)} | {"lanes", "num_threads"}
        for name in body:
            if name in allowed:
                continue
            if not where and name in engine:
                flags = ("device", "dtype", "compile", "audio_heads", "compile_cache")
                flag = name.replace("_", "-") if name in (*flags, "max_batch", "max_len") else ""
                how = f" (mctp serve --{flag})" if flag else ""
                raise RequestError(
                    400,
                    f"{name} is an engine setting, fixed when the server starts{how}; "
                    "a request cannot change it",
                    name,
                )
            known = ", ".join(sorted(allowed))
            raise RequestError(
                400, f"unrecognized request argument {where}{name}: use {known}", where + name
            )

    @staticmethod
    def flag(body: dict[str, Any], name: str, default: bool = False) -> bool:
        """A boolean field (JSON ``true``/``false`` only).

        Raises:
            RequestError: 400 for anything but a boolean.
        """
        value = body.get(name, default)
        if not isinstance(value, bool):
            raise RequestError(400, f"{name} must be a boolean, got {value!r}", name)
        return value

    @staticmethod
    def number(body: dict[str, Any], name: str, lo: float, hi: float) -> float | None:
        """An optional number field in ``[lo, hi]``.

        Raises:
            RequestError: 400 for a non-number or one out of range.
        """
        value = body.get(name)
        if value is None:
            return None
        if (
            not isinstance(value, (int, float))
            or isinstance(value, bool)
            or not lo <= value <= hi
            or value != value
        ):
            raise RequestError(
                400, f"{name} must be a number in [{lo:g}, {hi:g}], got {value!r}", name
            )
        return float(value)

    def sampling(self, body: dict[str, Any]) -> Any:
        """The text sampling a chat request asks for (``temperature``, ``top_p``), or None
        for the pipeline's.

        ``temperature: 0`` is greedy decoding; above 0 samples with that temperature.

        Raises:
            RequestError: 400 for values out of range, or sampling asked of a server that
                verifies (lossless verified decoding is greedy only).
        """
        from mctp.speech import SamplingConfig

        t = self.number(body, "temperature", 0.0, 2.0)
        top_p = self.number(body, "top_p", 0.0, 1.0)
        if top_p is not None and top_p <= 0:
            raise RequestError(400, f"top_p must be in (0, 1], got {top_p:g}", "top_p")
        if t is None and top_p is None:
            return None
        base = self.pipe.generation.text_sampling
        if t == 0:
            if top_p is not None and top_p != 1:
                raise RequestError(400, "top_p needs temperature > 0 (0 is greedy)", "top_p")
            return SamplingConfig(repetition_penalty=base.repetition_penalty)
        if self.pipe.generation.verify:
            raise RequestError(
                400,
                "this server runs verified (lossless) decoding, which is greedy only: "
                "use temperature 0 or leave it out",
                "temperature",
            )
        return SamplingConfig(
            do_sample=True,
            temperature=base.temperature if t is None else t,
            top_k=base.top_k,
            top_p=base.top_p if top_p is None else top_p,
            repetition_penalty=base.repetition_penalty,
        )

    def prompt_tokens(
        self,
        messages: list[dict[str, str]],
        seconds: list[float],
        budget: int,
        param: str,
    ) -> int:
        """Bound the whole prompt before any work starts.

        The chat template is rendered and tokenised (user text as plain text); each audio
        counts as its codec's tokens (``seconds * frame_rate`` + its two tags).

        Returns:
            The prompt's length in tokens (speech estimated).

        Raises:
            RequestError: 400 naming ``max_prompt_tokens`` when the prompt is longer, or the
                engine's ``max_len`` when prompt + ``max_tokens`` do not fit; 400 for text
                the tokenizer can only read as a control token.
        """
        try:
            ids = self.pipe.token_ids(messages)
        except ValueError as e:
            raise RequestError(400, str(e), param) from None
        codec = self.pipe.input_codec
        rate = float(getattr(codec, "frame_rate", 0.0) or 0.0)
        n = len(ids) + sum(int(s * rate) + 1 for s in seconds)  # + BOA/EOA - placeholder
        if n > self.cfg.max_prompt_tokens:
            raise RequestError(
                400,
                f"the prompt is {n} tokens after the chat template (speech included); "
                f"the limit is max_prompt_tokens={self.cfg.max_prompt_tokens}",
                param,
            )
        max_len = self.pipe.engine.max_len
        if n + budget > max_len:
            raise RequestError(
                400,
                f"the prompt ({n} tokens) + max_tokens ({budget}) is over the engine's "
                f"max_len={max_len}: shorten the prompt or lower max_tokens",
                param,
            )
        return n

    def budget(self, body: dict[str, Any]) -> int:
        """``max_completion_tokens`` / ``max_tokens``, or the default, within the limit.

        Raises:
            RequestError: 400 for a value that is not an integer in ``[1, max_new_tokens]``.
        """
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
        """A text field.

        Raises:
            RequestError: 400 for a non-string or one over ``max_text_chars``.
        """
        if not isinstance(value, str):
            raise RequestError(400, f"{param} must be a string", param)
        if len(value) > self.cfg.max_text_chars:
            raise RequestError(400, f"{param} is over {self.cfg.max_text_chars} characters", param)
        return value

    def messages(
        self, body: dict[str, Any]
    ) -> tuple[list[dict[str, str]], list[tuple[torch.Tensor, int]]]:
        """Chat messages with ``<|audio|>`` where audio parts were, and the decoded audios.

        Returns:
            ``([{"role", "content"}], [(wav [T], sample rate)])``.

        Raises:
            RequestError: 400 for malformed messages or parts, unreadable or too long audio,
                audio sent to a model without speech input, or no user content.
        """
        from mctp.speech import AUDIO_PLACEHOLDER

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
            self.fields(m, frozenset({"role", "content"}), where + ".")
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
                    self.fields(part, frozenset({"type", "text"}), p + ".")
                    texts.append(self.text(part.get("text"), p + ".text"))
                elif kind == "input_audio":
                    self.fields(part, frozenset({"type", "input_audio"}), p + ".")
                    spec = part.get("input_audio")
                    if not isinstance(spec, dict):
                        raise RequestError(400, f"{p}.input_audio must be an object", p)
                    self.fields(spec, frozenset({"data", "format"}), p + ".input_audio.")
                    if self.pipe.input_sample_rate is None:
                        raise RequestError(400, "this model takes no audio input", p)
                    audios.append(
                        decode_audio(
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
        """Queue ``run`` on the worker; its items arrive on the returned asyncio queue.

        Raises:
            RequestError: 503 when the worker's queue is full.
        """
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

    async def final_result(self, out: asyncio.Queue[Any], job: Job, request: Any) -> Any:
        """Read a job to its end (as :meth:`next_item`) and return the result of its ``end``
        chunk."""
        result = None
        while (item := await self.next_item(out, job, request)) is not Job.DONE:
            if item.kind == "end":
                result = item.result
        assert result is not None
        return result

    def stream_run(self, sampling: Any = None, **kwargs: Any) -> Preparation:
        """A job function: ``pipeline.open(**kwargs)`` (the prepared request, which the
        worker batches with others), called on one of the worker's preparation threads (its
        generation thread when it has none); the request's timings count from now (queueing
        included). ``sampling`` (a
        :class:`mctp.SamplingConfig`) replaces the request's text sampling."""
        pipe = self.pipe
        arrived = time.perf_counter()

        def run() -> Any:
            req = pipe.open(**kwargs, arrived=arrived)
            if sampling is not None:
                req.config = req.config.replace(text_sampling=sampling)
            return req

        return Preparation(run)
