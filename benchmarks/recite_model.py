"""A model folder of a real model's shape that recites one spoken answer, for load tests.

The load test (``benchmarks/load.py``) times the first *audio* chunk, so its model must answer
with speech; random weights of the 0.5B shape never open an audio segment, and teaching a 0.5B
model is out of reach of a 2-core CPU. This script builds one by construction instead, with
every matrix of the shape present and multiplied (the work per token is the real model's):

- every decoder block (the backbone's and each MCTP head's) keeps random attention and MLP
  weights but has its output projections (``o_proj``, ``down_proj``) set to zero, so the
  residual stream passes through unchanged: the final hidden state at a position is the
  (normed) embedding of the token there;
- each head's fusion projection passes the token embedding (``[I, 0]``);
- the output rows of the answer's tokens are set so that the token after ``x`` scores
  ``16`` on ``x``'s normed embedding (every other row is random, scoring about 0 to 3).

The model is then a bigram chain: after the chat template's last token it says
``hello this is the tiny mctp model speaking``, opens an audio segment of ``--audio`` distinct
audio tokens, closes it and stops, whatever the question. Backbone and heads agree token by
token, so every mode gives the same answer (the MCTP heads' drafts are the chain too). All
questions share one answer, so a load test on this model can not see two answers mixed up
(the tiny default's test does).

    python benchmarks/recite_model.py --shape 0.5b --out /tmp/recite-0.5b
    python benchmarks/load.py --clients 1,4,8 --seconds 30 \\
        --server-args "--model /tmp/recite-0.5b --dtype bfloat16 --threads 2"

The shapes are those of ``benchmarks/modes.py`` (its ``tiny``, ``0.5b`` and ``7b``, with untied
output rows). The folder holds the tiny default's word-level tokenizer (with its 256 audio
tokens) and the vocabulary of the shape (168,072 rows for 0.5b and 7b, as VITA-Audio's); the
dummy codec speaks the audio.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from modes import CONFIGS, qwen2_config  # the shapes of the modes table

__all__ = ["RECITED_TEXT", "recite_chain", "write_recite_model"]

RECITED_TEXT = "hello this is the tiny mctp model speaking"
"""The text part of the recited answer (before its one audio segment)."""

_SCORE = 16.0  # the successor's logit on its predecessor's normed embedding


def recite_chain(tok, vocab, num_audio: int) -> list[int]:
    """The token chain: the template's last token, then the whole answer and the stop token.

    Args:
        tok: The tiny default's tokenizer (:func:`mctp.speech.tiny.make_chat_tokenizer`).
        vocab: Its ``SpeechVocab``.
        num_audio: Audio tokens in the answer (distinct; at most ``vocab.num_audio``).

    Returns:
        ``[t_0, ..., t_n]``: ``t_0`` ends every chat prompt, ``t_{i+1}`` follows ``t_i``.

    Raises:
        ValueError: If ``num_audio`` is out of range.
    """
    if not 1 <= num_audio <= vocab.num_audio:
        raise ValueError(f"num_audio must be in [1, {vocab.num_audio}], got {num_audio}")
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "hello"}], add_generation_prompt=True, tokenize=False
    )
    start = tok(prompt, add_special_tokens=False).input_ids[-1]
    text = tok(RECITED_TEXT, add_special_tokens=False).input_ids
    # a fixed shuffle of the codes, so that neighbouring audio tokens are not neighbouring ids
    codes = torch.randperm(vocab.num_audio, generator=torch.Generator().manual_seed(0))
    audio = vocab.from_codes(codes[:num_audio]).tolist()
    chain = [start, *text, vocab.boa, *audio, vocab.eoa, tok.eos_token_id]
    if len(set(chain)) != len(chain):
        raise ValueError("a bigram chain needs distinct tokens")  # the recipe's own invariant
    return chain


def write_recite_model(
    out: str | Path,
    shape: str = "0.5b",
    *,
    num_audio: int = 96,
    num_heads: int = 10,
    dtype: torch.dtype = torch.bfloat16,
    seed: int = 0,
) -> Path:
    """Write the reciting model folder (transformers files, tokenizer, ``mctp_heads/``).

    Args:
        out: The folder (created; files in it are overwritten).
        shape: A key of ``benchmarks/modes.py``'s ``CONFIGS`` (``tiny``, ``0.5b``, ``7b``).
        num_audio: Audio tokens in the answer.
        num_heads: MCTP heads.
        dtype: Dtype of the written weights.
        seed: Seed of the random weights.

    Returns:
        ``out`` as a path; load it with ``mctp.speech.build_folder_pipeline(model=out)`` or
        ``mctp serve --model out``.

    Raises:
        ValueError: If the shape is unknown or ``num_audio`` out of range.
    """
    from transformers import Qwen2ForCausalLM

    from mctp import MCTPStack
    from mctp.backbones import HFBackbone
    from mctp.speech.tiny import make_chat_tokenizer
    from mctp.speech_vocab import SpeechVocab

    if shape not in CONFIGS:
        raise ValueError(f"unknown shape {shape!r}; one of {sorted(CONFIGS)}")
    tok = make_chat_tokenizer()
    cfg = qwen2_config(
        shape,
        tie_word_embeddings=False,  # the output rows are set apart from the embeddings
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    hidden = cfg.hidden_size
    vocab = SpeechVocab.from_tokenizer(tok, vocab_size=cfg.vocab_size)
    chain = recite_chain(tok, vocab, num_audio)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(cfg).eval()
    backbone = HFBackbone(model)
    stack = MCTPStack.from_backbone(backbone.parts(), num_heads).eval()
    with torch.no_grad():
        blocks = [*model.model.layers, *(h.block for h in stack.heads)]
        for block in blocks:
            block.self_attn.o_proj.weight.zero_()
            block.mlp.down_proj.weight.zero_()
        for head in stack.heads:
            head.proj.weight.zero_()
            head.proj.weight[:, :hidden].copy_(torch.eye(hidden))
        emb = model.model.embed_tokens.weight
        normed = emb / emb.pow(2).mean(-1, keepdim=True).sqrt()
        out_rows = model.lm_head.weight
        for prev, nxt in itertools.pairwise(chain):
            out_rows[nxt] = normed[prev] * (_SCORE / hidden)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.to(dtype).save_pretrained(out)
    tok.save_pretrained(out)
    stack.to(dtype).save_pretrained(out / "mctp_heads")
    return out


def main(argv: list[str] | None = None) -> None:
    """Command line (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", choices=sorted(CONFIGS), default="0.5b")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--audio", type=int, default=96, help="audio tokens in the answer")
    p.add_argument("--heads", type=int, default=10)
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    a = p.parse_args(argv)
    folder = write_recite_model(
        a.out, a.shape, num_audio=a.audio, num_heads=a.heads, dtype=getattr(torch, a.dtype)
    )
    print(f"wrote {folder}")


if __name__ == "__main__":
    main()
