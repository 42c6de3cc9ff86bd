"""Helpers of the vLLM tests: tiny Qwen2/Llama targets with briefly trained MCTP heads, saved as vLLM would load them.

Every model here is written in the test session: a random tiny transformers model (fp32,
attention head size 32: vLLM's CPU attention refuses 16), heads trained for a few steps on
the backbone's own greedy continuations so that draft acceptance lies strictly between 0 and 1,
the heads saved with ``MCTPStack.save_pretrained`` and exported with ``mctp export vllm``.
"""

from __future__ import annotations

import gc
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
if str(EXAMPLES) not in sys.path:
    sys.path.insert(0, str(EXAMPLES))

NUM_HEADS = 3
VOCAB = 128
PROMPTS = [[5, 17, 33, 2, 90], [7, 8], [60, 61, 62, 63, 64, 65, 66, 67, 1], [44]]
SPEECH_MAX_NEW = 64  # answers of the speech folder (its taught answer ends before)
SPEECH_MAX_LEN = 256


@dataclass
class Built:
    """A saved target with its heads."""

    model_dir: Path  # transformers folder (or official VITA-Audio folder)
    heads_dir: Path  # MCTPStack.save_pretrained folder
    draft_dir: Path  # mctp export vllm folder
    backbone: object  # mctp HFBackbone over the same weights
    stack: object  # MCTPStack


def _model(family: str, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    fields = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        eos_token_id=None,
        bos_token_id=None,
    )
    if family == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(rope_theta=10000.0, **fields))
    else:
        model = LlamaForCausalLM(LlamaConfig(**fields))
    with torch.no_grad():  # a sharper random model: several distinct greedy tokens
        for p in model.parameters():
            if p.ndim == 2:
                p.mul_(3.0)
    return model.eval()


def train_heads(backbone, stack, *, steps: int, seed: int = 0) -> None:
    """A few Adam steps of the MCTP loss on the frozen backbone's own greedy continuations."""
    from mctp import generate, mctp_loss

    g = torch.Generator().manual_seed(seed)
    seqs = []
    for _ in range(8):
        prompt = torch.randint(0, VOCAB, (1, 4), generator=g)
        res = generate(backbone, None, prompt, mode="vanilla", max_new_tokens=28)
        seqs.append(res.sequences[0])
    batch = torch.stack(seqs)
    labels = batch.clone()
    with torch.no_grad():
        hidden = backbone(batch).hidden
    opt = torch.optim.Adam(stack.parameters(), lr=3e-3)
    stack.train()
    for _ in range(steps):
        loss = mctp_loss(stack, hidden, batch, labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    stack.eval()


def build(root: Path, family: str, *, seed: int = 0, steps: int = 40) -> Built:
    """Save a tiny ``family`` model, train and save its heads, export the vLLM drafter."""
    from mctp import MCTPStack
    from mctp.backbones import HFBackbone
    from mctp.vllm.export import export_drafter

    model = _model(family, seed)
    backbone = HFBackbone(model)
    torch.manual_seed(seed + 1)
    stack = MCTPStack.from_backbone(backbone.parts(), NUM_HEADS)
    train_heads(backbone, stack, steps=steps, seed=seed)
    model_dir, heads_dir, draft_dir = root / "model", root / "heads", root / "draft"
    model.save_pretrained(model_dir)
    stack.save_pretrained(heads_dir)
    export_drafter(heads_dir, draft_dir, backbone=model_dir)
    return Built(model_dir, heads_dir, draft_dir, backbone, stack)


def build_vita(root: Path, *, seed: int = 2, steps: int = 40) -> Built:
    """An official VITA-Audio folder (``qwen2_mtp``) written by the examples' saver, exported."""
    from vita_audio.checkpoint import save_vita_audio

    from mctp import MCTPStack
    from mctp.backbones import HFBackbone
    from mctp.vllm.export import export_drafter

    model = _model("qwen2", seed)
    backbone = HFBackbone(model)
    torch.manual_seed(seed + 1)
    stack = MCTPStack.from_backbone(backbone.parts(), NUM_HEADS)
    train_heads(backbone, stack, steps=steps, seed=seed)
    model_dir, draft_dir = root / "vita", root / "draft"
    save_vita_audio(backbone, stack, model_dir)
    export_drafter(model_dir, draft_dir)
    return Built(model_dir, model_dir, draft_dir, backbone, stack)


def our_steps(built: Built, prompt: list[int], k: int, max_new: int) -> tuple[list[int], list[int]]:
    """Our verified greedy decoding of one prompt: (tokens, new tokens per backbone forward)."""
    from mctp import generate

    res = generate(
        built.backbone,
        built.stack,
        torch.tensor([prompt]),
        mode="vanilla",
        verify=True,
        draft_len=k,
        max_new_tokens=max_new,
    )
    steps, n = [], 0
    for source in res.sources[0].tolist():
        n += 1
        if source < 0:  # the backbone's token closes a cycle
            steps.append(n)
            n = 0
    if n:
        steps.append(n)
    return res.tokens[0].tolist(), steps


def make_llm(model_dir: Path, draft_dir: Path | None = None, k: int = NUM_HEADS, **kw):
    """A small fp32 ``vllm.LLM`` (ids in, ids out), with the MCTP drafter when given."""
    from vllm import LLM

    spec = None
    if draft_dir is not None:
        spec = {"method": "mtp", "model": str(draft_dir), "num_speculative_tokens": k}
    return LLM(
        model=str(model_dir),
        dtype="float32",
        enforce_eager=True,
        skip_tokenizer_init=True,
        max_model_len=128,
        max_num_seqs=8,
        seed=0,
        speculative_config=spec,
        **kw,
    )


def close_llm(llm) -> None:
    """Shut an engine down so the next one can start in this process."""
    from vllm.distributed import cleanup_dist_env_and_memory

    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()
    cleanup_dist_env_and_memory()


def vllm_steps(llm, prompts: list[list[int]], max_new: int) -> list[tuple[list[int], list[int]]]:
    """Greedy through vLLM, all prompts batched: per prompt (tokens, new tokens per step)."""
    from vllm import SamplingParams

    engine = llm.llm_engine
    params = SamplingParams(temperature=0.0, max_tokens=max_new, ignore_eos=True, detokenize=False)
    for i, prompt in enumerate(prompts):
        engine.add_request(str(i), {"prompt_token_ids": prompt}, params)
    tokens: dict[str, list[int]] = {str(i): [] for i in range(len(prompts))}
    steps: dict[str, list[int]] = {str(i): [] for i in range(len(prompts))}
    while engine.has_unfinished_requests():
        for out in engine.step():
            ids = list(out.outputs[0].token_ids)
            new = len(ids) - len(tokens[out.request_id])
            if new:
                steps[out.request_id].append(new)
            tokens[out.request_id] = ids
    return [(tokens[str(i)], steps[str(i)]) for i in range(len(prompts))]


def build_speech(root: Path, *, steps: int = 60) -> tuple[Path, Path]:
    """A tiny speech model folder vLLM can serve, and its exported drafter.

    The built-in tiny default cannot run on vLLM (its attention heads are 16 wide; vLLM needs
    32 or more), so this is the same recipe with 2 heads of 32: the tiny default's tokenizer
    (ChatML, the speech tokens), a 2-layer Qwen2 and 3 MCTP heads taught the tiny default's
    interleaved text + audio answer, saved as a folder pipeline (``mctp_heads/`` beside the
    weights, which ``build_folder_pipeline`` loads) and exported with ``mctp export vllm``.

    Returns:
        ``(model_dir, draft_dir)``.
    """
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from mctp import MCTPStack
    from mctp.backbones import HFBackbone, SpeechVocab
    from mctp.speech.tiny import _teach, _training_rows, make_chat_tokenizer
    from mctp.vllm.export import export_drafter

    tok = make_chat_tokenizer()
    torch.manual_seed(0)
    cfg = Qwen2Config(
        vocab_size=-(-len(tok) // 8) * 8,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        rope_theta=10000.0,
    )
    model = Qwen2ForCausalLM(cfg)
    backbone = HFBackbone(model)
    stack = MCTPStack.from_backbone(backbone.parts(), NUM_HEADS)
    vocab = SpeechVocab.from_tokenizer(tok, vocab_size=cfg.vocab_size)
    _teach(backbone, stack, _training_rows(tok, vocab, 0), steps, lr=1e-2)
    model_dir, draft_dir = root / "speech", root / "speech-draft"
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    stack.save_pretrained(model_dir / "mctp_heads")
    export_drafter(model_dir / "mctp_heads", draft_dir, backbone=model_dir)
    return model_dir, draft_dir


def speech_pipeline(model_dir: Path, mode: object = "vanilla", **kw):
    """The folder pipeline of :func:`build_speech`'s folder (our engine, eager, fp32)."""
    from mctp import EngineConfig
    from mctp.speech.builders import build_folder_pipeline

    return build_folder_pipeline(
        model=model_dir,
        mode=mode,
        max_new_tokens=SPEECH_MAX_NEW,
        engine=EngineConfig(max_len=SPEECH_MAX_LEN),
        **kw,
    )
