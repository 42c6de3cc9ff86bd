"""Shared pytest set-up: fixture paths, deterministic torch, the ``gpu`` marker."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

FIXTURES = Path(__file__).resolve().parent / "fixtures"
# helper modules of several test folders (native_abort); not tests/ itself, whose vllm/
# folder would shadow the real vllm package
sys.path.insert(0, str(Path(__file__).resolve().parent / "support"))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _deterministic_torch() -> None:
    torch.manual_seed(0)
    torch.set_num_threads(1)


@pytest.fixture
def fixtures_dir() -> Path:
    """Folder with the golden codec checkpoints and expected outputs."""
    return FIXTURES


class TinyLM(torch.nn.Module):
    """A small causal LM built from mctp.layers, used as a backbone stand-in in core tests."""

    def __init__(
        self, vocab: int = 97, hidden: int = 32, layers: int = 2, heads: int = 4, kv_heads: int = 2
    ) -> None:
        super().__init__()
        from mctp.layers import DecoderBlock, RMSNorm, RotaryEmbedding

        self.embed = torch.nn.Embedding(vocab, hidden)
        self.layers = torch.nn.ModuleList(
            DecoderBlock(hidden, heads, kv_heads, 2 * hidden, qkv_bias=True) for _ in range(layers)
        )
        self.norm = RMSNorm(hidden)
        self.lm_head = torch.nn.Linear(hidden, vocab, bias=False)
        self.rotary = RotaryEmbedding(hidden // heads)
        self.hidden_size = hidden

    def forward(self, ids: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Final-normed hidden states [B, T, H] (packed samples via position ids)."""
        from mctp.engine.masks import default_position_ids, segment_ids, segment_mask

        if position_ids is None:
            position_ids = default_position_ids(ids)
        x = self.embed(ids)
        rope = self.rotary(x, position_ids)
        mask = segment_mask(segment_ids(position_ids))
        for layer in self.layers:
            x = layer(x, attention_mask=mask, position_embeddings=rope)
        return self.norm(x)

    def parts(self):
        from mctp.stack import BackboneParts

        return BackboneParts(
            embed=self.embed,
            norm=self.norm,
            lm_head=self.lm_head,
            rotary=self.rotary,
            last_block=self.layers[-1],
            hidden_size=self.hidden_size,
        )


@pytest.fixture
def tiny_lm() -> TinyLM:
    """A deterministic tiny backbone (vocab 97, hidden 32, 2 layers, GQA 4/2)."""
    torch.manual_seed(1234)
    return TinyLM().eval()


def _tiny_hf_model(family: str, *, vocab: int = 128, attn: str = "sdpa", seed: int = 0):
    """A tiny random causal LM of the given family ('qwen2', 'llama', 'qwen3', 'mistral')."""
    import transformers as tf

    common = dict(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    cfg_cls, model_cls = {
        "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM),
        "llama": (tf.LlamaConfig, tf.LlamaForCausalLM),
        "qwen3": (tf.Qwen3Config, tf.Qwen3ForCausalLM),
        "mistral": (tf.MistralConfig, tf.MistralForCausalLM),
    }[family]
    extra = {"sliding_window": None} if family == "mistral" else {}
    if family == "qwen3":
        extra["head_dim"] = 8
    cfg = cfg_cls(**common, **extra)
    cfg._attn_implementation = attn
    torch.manual_seed(seed)
    model = model_cls(cfg).eval()
    # sharper random weights so greedy choices are well separated
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.mul_(8.0)
    return model


@pytest.fixture(scope="session")
def tiny_hf():
    """Factory of tiny random transformers causal LMs: ``tiny_hf("qwen2" | "llama" | "qwen3" | "mistral", vocab=..)``."""
    return _tiny_hf_model


# ---- the tiny speech pipeline (tests/speech, tests/serve, tests/eval) ----
@pytest.fixture(scope="session")
def mctp_cache(tmp_path_factory):
    """``MCTP_CACHE`` in the run's temporary folder (the tiny model is taught once per run)."""
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):  # one cache for all workers of the run
        base = base.parent
    path = base / "mctp-cache"
    old = os.environ.get("MCTP_CACHE")
    os.environ["MCTP_CACHE"] = str(path)
    yield path
    if old is None:
        os.environ.pop("MCTP_CACHE", None)
    else:
        os.environ["MCTP_CACHE"] = old


@pytest.fixture
def one_thread():
    """The tiny model's matrices are too small to share between threads."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tiny(mctp_cache):
    """The default tiny pipeline (dummy codecs)."""
    from mctp.speech import build_tiny_pipeline

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return build_tiny_pipeline()
    finally:
        torch.set_num_threads(n)
