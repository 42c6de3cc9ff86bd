"""SpeechBatcher: cohorts of prepared speech requests, as the server's worker drives them."""

from __future__ import annotations

import threading

import torch

from mctp import EngineConfig
from mctp.serve.worker import GenerationWorker, Job
from mctp.speech import SpeechPipeline
from mctp.speech.batching import SpeechBatcher


def _pipe(max_batch: int) -> SpeechPipeline:
    from mctp.speech import build_tiny_pipeline

    return build_tiny_pipeline(engine=EngineConfig(max_batch=max_batch, max_len=512))


def _question(i: int) -> torch.Tensor:
    from mctp.codecs import DummyCodec

    return DummyCodec(codebook_size=256).decode(torch.arange(8 + 4 * i) * (i + 1) % 256)


def test_closing_an_answer_before_its_first_chunk_frees_its_row(mctp_cache):
    # A client that leaves before its answer began: the worker closes the answer's iterator
    # without having read it. Its row must be given back, or the lane stays busy for ever.
    pipe = _pipe(2)
    batcher = SpeechBatcher(pipe, lanes=1)
    reqs = [pipe.open(audio=_question(i), sample_rate=16000) for i in range(2)]
    answers = batcher.start(reqs)
    assert not batcher.can_start()
    next(answers[0])  # one is read, the other never
    for a in answers:
        a.close()
    assert batcher.can_start()


def test_concurrent_requests_with_cancellations_get_their_lone_answers(mctp_cache):
    # Through the server's worker: more requests than rows, some cancelled at once or after
    # a moment, the rest joining running cohorts; every answer equals the one given alone.
    pipe = _pipe(3)
    questions = [_question(i) for i in range(5)]

    def lone(q: torch.Tensor) -> str:
        return "".join(c.text for c in pipe.stream(audio=q, sample_rate=16000))

    want = [lone(q) for q in questions]
    assert len(set(want)) > 1  # answers that can tell requests apart
    worker = GenerationWorker(max_queue=64, batcher=SpeechBatcher(pipe, lanes=1))
    try:
        jobs = []
        for n in range(14):
            i = n % len(questions)
            got: dict = {"text": "", "done": threading.Event(), "error": None}

            def sink(item, got=got):
                if item is Job.DONE:
                    got["done"].set()
                elif isinstance(item, Exception):
                    got["error"] = item
                    got["done"].set()
                elif item.kind == "text":
                    got["text"] += item.text

            job = worker.submit(lambda q=questions[i]: pipe.open(audio=q, sample_rate=16000), sink)
            if n % 4 == 3:
                job.cancel()
            jobs.append((i, job, got))
        for i, job, got in jobs:
            if job.cancelled.is_set():
                continue
            assert got["done"].wait(120), f"job {job.id} never ended"
            assert got["error"] is None
            assert got["text"] == want[i]
        assert worker.joined >= 1 and worker.max_rows_seen >= 2  # they really shared rows
    finally:
        worker.close()
    assert worker.batcher.can_start()  # every lane given back


def test_the_warm_up_runs_every_row_count_the_compiled_path_runs(mctp_cache, monkeypatch):
    """The compiled path compiles once per row count it runs: the warm-up runs each mode at
    each (regions: a lone request's 1 row and all max_batch rows; whole graphs: all rows),
    so that no user request pays for compiling; the eager path warms up on one row."""
    from mctp.speech import build_tiny_pipeline

    for options, want in (
        ({}, {1}),
        ({"compile": True, "compile_options": {"backend": "eager"}}, {1, 3}),
        (
            {"compile": True, "compile_options": {"backend": "eager"}, "compile_regions": False},
            {3},
        ),
    ):
        pipe = build_tiny_pipeline(engine=EngineConfig(max_batch=3, max_len=512, **options))
        rows: list[int] = []
        decode = pipe.backbone.decode

        def counted(x, *args, decode=decode, rows=rows, **kwargs):
            rows.append(x.shape[0])
            return decode(x, *args, **kwargs)

        monkeypatch.setattr(pipe.backbone, "decode", counted)
        pipe.warmup(["vanilla", "turbo"])
        assert set(rows) == want, (options, sorted(set(rows)))
