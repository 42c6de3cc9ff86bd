"""The built-in tiny default: a speech LLM that runs anywhere in seconds, with no download.

It is a random 2-layer Qwen2-shaped LM with 10 MCTP heads and a word-level ChatML tokenizer,
taught for a few seconds (packed, Adam) to answer every prompt, text or speech, with one fixed
interleaved text + audio answer in the Boost layout; the sine-tone :class:`~mctp.codecs.DummyCodec`
stands in for the speech tokenizer and decoder. Its answers are meaningless, but every part of
the speech pipeline (chat template, audio prompt, interleaved generation, streaming decoder,
server, evaluation) runs on it exactly as on a real model.

The taught weights are cached under ``$MCTP_CACHE`` (default ``~/.cache/mctp``) so that later
processes (a CLI call, a server) load them instantly instead of teaching again.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "TINY_ANSWER",
    "TINY_WORDS",
    "cache_dir",
    "make_chat_tokenizer",
    "tiny_speech_lm",
]

TINY_WORDS: tuple[str, ...] = tuple(
    (
        "hello this is the tiny mctp model speaking with text and audio at once "
        "what who where when how why is are do does can you me tell say about weather "
        "today name your please a an of to in on for it speech convert the text speech. "
        "convert the speech to text. one two three four five six seven eight nine ten "
        "yes no good morning thanks question answer world capital city france paris"
    ).split()
)
"""Words the tiny tokenizer knows (others become ``<unk>``)."""

TINY_ANSWER = "hello this is the tiny mctp model speaking with text and audio at once"
"""The one answer the tiny model was taught to give."""

_NUM_AUDIO = 256  # the size of the fixture codecs' codebooks and of the default DummyCodec
_VERSION = 2  # bump when the recipe below changes (invalidates the cache)

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
"""ChatML without a default system prompt, as VITA-Audio uses it."""


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock on ``path`` between processes (POSIX ``flock``; none elsewhere)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def cache_dir() -> Path:
    """Folder for cached tiny weights: ``$MCTP_CACHE`` or ``~/.cache/mctp``."""
    return Path(os.environ.get("MCTP_CACHE") or Path.home() / ".cache" / "mctp")


def make_chat_tokenizer(words: tuple[str, ...] | list[str] = TINY_WORDS) -> Any:
    """A word-level transformers tokenizer with ChatML specials, template and speech tokens.

    Words are split on spaces, ``"\\n"`` is a token of its own; the VITA-Audio special
    tokens and ``<|audio_0|>``.. ``<|audio_255|>`` are added with
    :func:`mctp.backbones.extend_vocab`.

    Args:
        words: The word list.

    Returns:
        A ``PreTrainedTokenizerFast`` (its ``SpeechVocab``: ``SpeechVocab.from_tokenizer``).
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from mctp.backbones import extend_vocab

    table = {w: i for i, w in enumerate(dict.fromkeys(["<unk>", "\n", *words]))}
    core = Tokenizer(models.WordLevel(table, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r"\n"), "isolated"), pre_tokenizers.Split(" ", "removed")]
    )
    core.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    tok = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>")
    tok.add_special_tokens(
        {
            "pad_token": "<|endoftext|>",
            "eos_token": "<|im_end|>",
            "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
        }
    )
    tok.chat_template = CHATML_TEMPLATE
    extend_vocab(tok, num_audio_tokens=_NUM_AUDIO, plus=True)
    return tok


def _training_rows(tok: Any, vocab: Any, seed: int) -> list[list[int]]:
    """Chat prompts (text and speech, several lengths) each followed by the fixed answer."""
    from mctp.interleave import InterleaveSchedule

    g = torch.Generator().manual_seed(seed)
    words = [w for w in TINY_WORDS if "." not in w]
    answer_text = tok(TINY_ANSWER, add_special_tokens=False).input_ids
    audio = torch.randint(0, _NUM_AUDIO, (24,), generator=g)
    answer = InterleaveSchedule.boost().interleave(
        answer_text, vocab.from_codes(audio).tolist(), vocab.boa, vocab.eoa
    )
    end = [tok.convert_tokens_to_ids("<|im_end|>")]
    rows = []
    for n in (1, 4, 10):
        for _ in range(1):
            picks = torch.randint(0, len(words), (n,), generator=g).tolist()
            user = " ".join(words[i] for i in picks)
            text = tok.apply_chat_template(
                [{"role": "user", "content": user}], add_generation_prompt=True, tokenize=False
            )
            rows.append(tok(text, add_special_tokens=False).input_ids)
        codes = torch.randint(0, _NUM_AUDIO, (4 * n,), generator=g)
        speech = [vocab.boa, *vocab.from_codes(codes).tolist(), vocab.eoa]
        head = tok.apply_chat_template(
            [{"role": "user", "content": "<|audio|>"}], add_generation_prompt=True, tokenize=False
        )
        ids = tok(head, add_special_tokens=False).input_ids
        at = ids.index(vocab.audio_placeholder)
        rows.append([*ids[:at], *speech, *ids[at + 1 :]])
    return [[*r, -1, *answer, *end] for r in rows]  # -1 marks where the answer starts


def _teach(backbone: Any, stack: Any, rows: list[list[int]], steps: int, lr: float) -> None:
    """Teach every row's answer (after its -1 marker) in one packed sequence."""
    from mctp import mctp_loss, total_loss

    ids, labels, pos = [], [], []
    for r in rows:
        cut = r.index(-1)
        prompt, answer = r[:cut], r[cut + 1 :]
        ids += prompt + answer
        labels += [-100] * len(prompt) + answer
        pos += list(range(len(prompt) + len(answer)))
    seq = torch.tensor([ids])
    lab = torch.tensor([labels])
    position_ids = torch.tensor([pos])
    opt = torch.optim.Adam([*backbone.parameters(), *stack.parameters()], lr=lr)
    backbone.train()
    stack.train()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: more threads only add contention
    from tqdm import tqdm

    try:
        for _ in tqdm(range(steps), desc="teaching the tiny model (once)", disable=None):
            out = backbone(seq, labels=lab, position_ids=position_ids)
            mtp = mctp_loss(stack, out.hidden, seq, lab, position_ids=position_ids)
            loss = total_loss(out.loss, mtp, backbone_frozen=False)
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    backbone.eval()
    stack.eval()


def tiny_speech_lm(
    *, seed: int = 0, steps: int = 60, use_cache: bool = True
) -> tuple[Any, Any, Any, Any]:
    """The tiny taught speech LM (built once, then loaded from the cache).

    The caller's global random state is left as it was (the seed applies inside only).

    Args:
        seed: Seed of the weights and the taught answer.
        steps: Teaching steps.
        use_cache: Read/write the weights under :func:`cache_dir`.

    Returns:
        ``(backbone, stack, tokenizer, vocab)``: an :class:`~mctp.backbones.HFBackbone`, an
        :class:`~mctp.MCTPStack` with 10 heads, the tokenizer and its ``SpeechVocab``.
    """
    with torch.random.fork_rng():
        return _tiny_speech_lm(seed=seed, steps=steps, use_cache=use_cache)


def _tiny_speech_lm(*, seed: int, steps: int, use_cache: bool) -> tuple[Any, Any, Any, Any]:
    from safetensors.torch import load_file, save_file
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from mctp import MCTPStack
    from mctp.backbones import HFBackbone
    from mctp.speech_vocab import SpeechVocab

    tok = make_chat_tokenizer()
    torch.manual_seed(seed)
    cfg = Qwen2Config(
        vocab_size=-(-len(tok) // 8) * 8,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    cfg._attn_implementation = "sdpa"
    backbone = HFBackbone(Qwen2ForCausalLM(cfg))
    stack = MCTPStack.from_backbone(backbone.parts(), 10)
    vocab = SpeechVocab.from_tokenizer(tok, vocab_size=cfg.vocab_size)
    file = cache_dir() / f"tiny-speech-lm-v{_VERSION}-seed{seed}-steps{steps}.safetensors"
    if not use_cache:
        _teach(backbone, stack, _training_rows(tok, vocab, seed), steps, lr=1e-2)
        return backbone, stack, tok, vocab
    file.parent.mkdir(parents=True, exist_ok=True)
    with _locked(file.with_suffix(".lock")):  # one process teaches, the others wait and load
        if not file.is_file():
            _teach(backbone, stack, _training_rows(tok, vocab, seed), steps, lr=1e-2)
            state = {f"backbone.{k}": v.clone() for k, v in backbone.state_dict().items()}
            state |= {f"stack.{k}": v.clone() for k, v in stack.state_dict().items()}
            tmp = file.with_suffix(f".{os.getpid()}.tmp")
            save_file(state, tmp)
            tmp.replace(file)  # atomic: a reader never sees half a file
            return backbone, stack, tok, vocab
    state = load_file(file)
    backbone.load_state_dict({k[9:]: v for k, v in state.items() if k.startswith("backbone.")})
    stack.load_state_dict({k[6:]: v for k, v in state.items() if k.startswith("stack.")})
    backbone.eval()
    stack.eval()
    return backbone, stack, tok, vocab
