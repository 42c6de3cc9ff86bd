"""The load test (benchmarks/load.py), small and bounded, against the running server."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def _load_module(name: str = "load"):
    spec = importlib.util.spec_from_file_location(
        f"mctp_benchmark_{name}", BENCHMARKS / f"{name}.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_concurrent_clients_lose_and_mix_nothing(server):
    load = _load_module()
    rep = load.run_load(server, clients=3, seconds=2.0, max_requests=3, questions=3)
    s = rep.summary()
    assert s["sent"] == rep.ok + rep.refused + rep.failed + rep.lost + rep.mixed
    assert rep.ok >= 3 and rep.failed == rep.lost == rep.mixed == rep.refused == 0
    assert s["first_chunk_p50_ms"] > 0 and s["first_chunk_p95_ms"] >= s["first_chunk_p50_ms"]
    assert s["requests_per_s"] > 0 and s["audio_s_per_s"] > 0
    assert "| clients |" in rep.table()
    assert s["distinct_answers"] >= 2  # different questions, different answers: mixing shows
    # three clients at once on two lanes: they shared a batch or joined a running one
    import json

    from mctp_serve_helpers import request

    health = json.loads(request(server, "/health")[2])
    assert health["max_rows_seen"] >= 2 or health["joined"] >= 1, health


def test_only_loopback():
    load = _load_module()
    with pytest.raises(ValueError, match="loopback"):
        load.run_load("http://10.0.0.1:8000", clients=1, seconds=1)
    with pytest.raises(ValueError, match="loopback"):
        load.run_load("http://example.org:80", clients=1, seconds=1)


def test_the_reciting_model_says_its_chain_in_every_mode(tmp_path):
    """benchmarks/recite_model.py (the load test's model at real shapes), at a tiny width."""
    import torch

    from mctp.speech import build_folder_pipeline

    recite = _load_module("recite_model")
    folder = recite.write_recite_model(tmp_path, "tiny", num_audio=24, dtype=torch.float32)
    pipe = build_folder_pipeline(model=folder, num_threads=1)
    chain = recite.recite_chain(pipe.tokenizer, pipe.vocab, 24)
    for mode in ("vanilla", "boost", "balance", "turbo"):
        for question in ("what is the weather", "tell me your name please"):
            r = pipe(question, mode=mode)
            assert r.text == recite.RECITED_TEXT, (mode, r.text)
            assert r.generation.tokens[0].tolist() == chain[1:], mode
            assert r.finish_reason == "stop" and r.num_audio_tokens == 24 and r.audio.numel() > 0
            # the heads drafted (and the drafts were the chain): not a Vanilla answer in disguise
            assert mode == "vanilla" or r.generation.num_mctp_steps > 0
    with pytest.raises(ValueError, match="unknown shape"):
        recite.write_recite_model(tmp_path, "1b")
    with pytest.raises(ValueError, match="num_audio"):
        recite.recite_chain(pipe.tokenizer, pipe.vocab, 0)


def test_a_server_preparing_apart_answers_every_request_exactly(tiny):
    """The load test's checks (every answer equal to its question's lone answer, nothing lost
    or mixed) against a server that prepares requests on threads of their own."""
    import json

    from mctp_serve_helpers import InProcessServer, request

    from mctp.serve import ServerConfig, create_app

    load = _load_module()
    app = create_app(tiny, ServerConfig(prepare_threads=2, warmup=False))
    with InProcessServer(app) as srv:
        assert json.loads(request(srv.url, "/health")[2])["prepare_threads"] == 2
        rep = load.run_load(srv.url, clients=3, seconds=2.0, max_requests=3, questions=3)
    assert rep.ok >= 3 and rep.failed == rep.lost == rep.mixed == rep.refused == 0
    assert rep.distinct_answers >= 2
