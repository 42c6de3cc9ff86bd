"""Does preparing a spoken question stall the answers being generated? (the server's
preparation thread, ``mctp serve --prepare-thread``)

The tiny default, with its speech-input codec's work made that of the released-size GLM-4-Voice
speech tokenizer (random weights, fp32; the codes still come from the dummy codec, so every
answer stays the tiny default's): ``--clients`` text clients keep the generation worker busy
(each sends its next request when its answer ended) and a spoken question (``--question-s``
seconds of audio) arrives every ``--every`` seconds. For the worker without and with its
preparation thread, one after the other in one process, the script prints the longest and the
99th-percentile time between two consecutive chunks of the text answers (a stall is a gap in
every running stream), the text answers per second, and the spoken questions' first chunk
(median, counted from their arrival). Example::

    python benchmarks/prepare_thread.py --seconds 10
"""

from __future__ import annotations

import argparse
import itertools
import platform
import threading
import time
from typing import Any

import torch

from mctp.serve import Job, Preparation, ServerConfig
from mctp.serve.protocol import Api
from mctp.speech import build_tiny_pipeline


class SlowCodec:
    """The dummy codec's codes, at the cost of a real speech tokenizer's ``encode``.

    Args:
        codes: Gives the codes (the pipeline's dummy codec).
        work: Encodes the same audio first (its codes are dropped).
    """

    def __init__(self, codes: Any, work: Any) -> None:
        self.codes, self.work = codes, work

    def encode(self, wavs: list[torch.Tensor], sample_rate: int | None = None) -> Any:
        self.work.encode(wavs, sample_rate=sample_rate)
        return self.codes.encode(wavs, sample_rate=sample_rate)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["codes"], name)


def _p(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[int(q * (len(xs) - 1))] if xs else float("nan")


def run(pipe: Any, prepare: int, args: argparse.Namespace) -> dict[str, float]:
    """One run of ``args.seconds`` with ``prepare`` preparation threads; returns the figures
    of the table's row."""
    # the server's own worker (batches, joins, lanes) with its default settings
    worker = Api(pipe, ServerConfig(max_queue=64, prepare_threads=prepare)).worker
    gaps: list[float] = []  # between two consecutive chunks of one text answer
    text_firsts: list[float] = []
    spoken_firsts: list[float] = []
    answers = [0]
    lock = threading.Lock()
    end = time.monotonic() + args.seconds
    gen = torch.Generator().manual_seed(0)
    question = 0.1 * torch.randn(int(16000 * args.question_s), generator=gen)

    def ask(prepare_fn: Any, firsts: list[float], count: bool) -> None:
        """Submit one request and wait for its end; records its chunk gaps and first audio."""
        done = threading.Event()
        arrived = time.perf_counter()
        times: list[float] = []
        first_audio: list[float] = []

        def sink(item: Any) -> None:
            if item is Job.DONE or isinstance(item, Exception):
                done.set()
                return
            times.append(time.perf_counter())
            if getattr(item, "kind", None) == "audio" and not first_audio:
                first_audio.append(times[-1] - arrived)

        worker.submit(Preparation(prepare_fn), sink)
        done.wait(120)
        with lock:
            firsts.extend(first_audio)
            if count:
                gaps.extend(b - a for a, b in itertools.pairwise(times))
                answers[0] += 1

    def text_client(c: int) -> None:
        k = 0
        while time.monotonic() < end:
            text = f"client {c} question {k}"
            ask(lambda text=text: pipe.open(text=text), text_firsts, True)
            k += 1

    def spoken() -> None:
        while time.monotonic() < end - args.every:
            time.sleep(args.every)
            ask(lambda: pipe.open(audio=question, sample_rate=16000), spoken_firsts, False)

    threads = [threading.Thread(target=text_client, args=(c,)) for c in range(args.clients)]
    threads.append(threading.Thread(target=spoken))
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    worker.close()
    return {
        "longest_gap_ms": 1000 * max(gaps),
        "p99_gap_ms": 1000 * _p(gaps, 0.99),
        "answers_per_s": answers[0] / wall,
        "text_first_p95_ms": 1000 * _p(text_firsts, 0.95),
        "spoken_first_p50_ms": 1000 * _p(spoken_firsts, 0.5),
        "spoken": len(spoken_firsts),
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=10.0, help="length of each run")
    p.add_argument("--clients", type=int, default=4, help="text clients")
    p.add_argument("--every", type=float, default=2.0, help="seconds between spoken questions")
    p.add_argument("--question-s", type=float, default=2.0, help="spoken question length (s)")
    p.add_argument(
        "--threads", type=int, nargs="+", default=[0, 2], help="preparation threads to compare"
    )
    args = p.parse_args(argv)
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from codec_tokenizer import build_tokenizer

    pipe = build_tiny_pipeline()
    pipe.audio_tokenizer = SlowCodec(pipe.audio_tokenizer, build_tokenizer("cpu", torch.float32))
    pipe.open(audio=torch.zeros(16000), sample_rate=16000)  # first calls out of the timing
    print(f"torch {torch.__version__}, python {platform.python_version()}, {platform.machine()}")
    print(
        "| preparation threads | longest gap in an answer (ms) | p99 gap (ms) | text answers/s"
        " | text first chunk p95 (ms) | spoken first chunk p50 (ms) | spoken questions |"
    )
    print("|---|---|---|---|---|---|---|")
    for prepare in args.threads:
        r = run(pipe, prepare, args)
        print(
            f"| {prepare} | {r['longest_gap_ms']:.0f} | {r['p99_gap_ms']:.0f}"
            f" | {r['answers_per_s']:.1f} | {r['text_first_p95_ms']:.0f}"
            f" | {r['spoken_first_p50_ms']:.0f} | {r['spoken']} |"
        )


if __name__ == "__main__":
    main()
