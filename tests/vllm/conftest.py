"""Fixtures of the vLLM tests; the builders live in vllm_helpers.py. Importable without vLLM:
each test module skips itself (pytest.importorskip) when vLLM is not installed."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
for _path in (str(HERE), str(HERE.parent / "serve")):  # this folder's and the server's helpers
    if _path not in sys.path:
        sys.path.insert(0, _path)

from vllm_helpers import (  # noqa: E402
    NUM_HEADS,
    SPEECH_MAX_LEN,
    SPEECH_MAX_NEW,
    Built,
    build,
    build_speech,
    build_vita,
    speech_pipeline,
)


@pytest.fixture(scope="session")
def qwen2_built(vita_built, tmp_path_factory) -> Built:
    """The VITA-Audio fixture's backbone and heads as a transformers Qwen2 folder + heads."""
    from mctp.vllm.export import export_drafter

    root = tmp_path_factory.mktemp("qwen2")
    vita_built.backbone.model.save_pretrained(root / "model")
    vita_built.stack.save_pretrained(root / "heads")
    export_drafter(root / "heads", root / "draft", backbone=root / "model")
    return Built(
        root / "model", root / "heads", root / "draft", vita_built.backbone, vita_built.stack
    )


@pytest.fixture(scope="session")
def llama_built(tmp_path_factory) -> Built:
    return build(tmp_path_factory.mktemp("llama"), "llama", seed=1)


@pytest.fixture(scope="session")
def vita_built(tmp_path_factory) -> Built:
    return build_vita(tmp_path_factory.mktemp("vita"))


@dataclass
class SpeechServer:
    """One vLLM engine (speech folder + drafter) behind a real ``mctp`` server."""

    url: str
    model_dir: Path
    draft_dir: Path
    engine: object  # VLLMSpeechEngine
    seen: dict  # prompt ids -> generated ids of every answer the server spoke

    def run(self, coro):
        """Run ``coro`` on the server's event loop (where vLLM's async engine lives)."""
        import asyncio

        return asyncio.run_coroutine_threadsafe(coro, self.engine._loop).result()


@pytest.fixture(scope="session")
def speech_dirs(tmp_path_factory) -> tuple[Path, Path]:
    return build_speech(tmp_path_factory.mktemp("speech"))


@pytest.fixture(scope="session")
def speech_server(speech_dirs):
    """The session's only async vLLM engine (on CPU vLLM starts its engine core in a spawned
    process: one start for every test that needs one), with the MCTP drafter (verified),
    served by ``create_app(..., engine=VLLMSpeechEngine)`` on uvicorn in a thread."""
    import gc

    from mctp_serve_helpers import InProcessServer

    from mctp.serve import ServerConfig, create_app
    from mctp.vllm.engine import VLLMEngine
    from mctp.vllm.speech import VLLMSpeechEngine, release_weights

    model_dir, draft_dir = speech_dirs
    pipe = speech_pipeline(model_dir, verify=True)
    release_weights(pipe)
    seen: dict = {}
    finish = pipe._finish

    def spy(request, gen, *args, **kw):  # every answer's generated ids, by prompt
        seen[tuple(request.prompt.input_ids[0].tolist())] = gen.tokens[0].tolist()
        return finish(request, gen, *args, **kw)

    pipe._finish = spy
    gen = VLLMEngine(
        model_dir,
        drafter=draft_dir,
        num_speculative_tokens=NUM_HEADS,
        dtype="float32",
        max_num_seqs=8,
        max_model_len=SPEECH_MAX_LEN,
        engine_kwargs={"seed": 0},
    )
    engine = VLLMSpeechEngine(pipe, gen, max_queue=4)
    app = create_app(pipe, ServerConfig(max_new_tokens=SPEECH_MAX_NEW, max_queue=4), engine=engine)
    try:
        with InProcessServer(app) as server:
            yield SpeechServer(server.url, model_dir, draft_dir, engine, seen)
    finally:
        gen.shutdown()
        gen.engine = None  # the AsyncLLM goes now, not at interpreter exit
        gc.collect()
