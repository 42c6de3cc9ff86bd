"""VITA-Audio training data: JSONL records -> ChatML ids/labels -> packed ``[1, L]`` batches.

Follows the official ``Qwen2Dataset`` (``vita_audio/data/dataset_qwen2.py``): ChatML without a
default system prompt; every ``<|audio|>`` (any role, in order) becomes ``BOA <|audio_k|>... EOA``;
a TTS prompt's text is prepended to the assistant turn; the assistant's text and audio are
interleaved by an :class:`~mctp.interleave.InterleaveSchedule`; labels are -100 except on the
assistant content and its ``<|im_end|> \\n``. :class:`DataMixture` samples JSONL files with ratios
from a seed; :class:`Packer` packs per file (position ids restart at 0 per sample, padding gets
label -100 and positions continuing the last sample, as officially). Samples longer than
``max_len`` are skipped and counted (``on_too_long="skip"``) or raise; a malformed record raises
:class:`RecordError` with its file and index (``on_error="raise"``) or is skipped and counted.
See TRAINING.md.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from mctp.backbones import AUDIO_PLACEHOLDER, SpeechVocab
from mctp.codecs import AudioTokenizer, load_audio
from mctp.interleave import InterleaveSchedule

__all__ = [
    "ASR_PROMPT",
    "IGNORE_INDEX",
    "TTS_PROMPT",
    "AudioCodes",
    "ChatRenderer",
    "DataMixture",
    "DataSource",
    "DataStats",
    "Pack",
    "Packer",
    "RecordError",
    "Sample",
    "VitaAudioData",
    "make_word_tokenizer",
    "synthesize_dataset",
]

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
TTS_PROMPT = "Convert the text to speech."
ASR_PROMPT = "Convert the speech to text."
_ROLES = dict(user="user", human="user", system="system", assistant="assistant", gpt="assistant")


class RecordError(ValueError):
    """A JSONL record cannot be turned into a training sample (the message says where and why)."""


@dataclass
class Sample:
    """One rendered record: ``input_ids`` and ``labels`` of equal length (-100 = not trained)."""

    input_ids: list[int]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.input_ids)


# --------------------------------------------------------------------------- audio codes
class AudioCodes:
    """Audio file -> codec codes, with a cache keyed by path (so epochs do not re-tokenize).

    Args:
        tokenizer: Any :class:`~mctp.codecs.AudioTokenizer` (DummyCodec, GLM4VoiceTokenizer...).
        root: Folder that relative audio paths are resolved against (default: as given).
        cache: Initial ``path -> codes`` entries (e.g. from :meth:`load`).
    """

    def __init__(
        self,
        tokenizer: AudioTokenizer,
        *,
        root: str | Path | None = None,
        cache: Mapping[str, Sequence[int]] | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.root = None if root is None else Path(root)
        self.cache: dict[str, list[int]] = {k: list(map(int, v)) for k, v in (cache or {}).items()}

    def resolve(self, path: str) -> Path:
        """The file a record's audio path points at."""
        p = Path(path)
        return p if self.root is None or p.is_absolute() else self.root / p

    def __call__(self, path: str) -> list[int]:
        """Codes ``[N]`` of one audio file (cached).

        Raises:
            FileNotFoundError: If the file does not exist.
            AudioError: If it is empty, corrupt or unreadable.
        """
        hit = self.cache.get(path)
        if hit is None:
            self.prefetch([path], progress=False)
            hit = self.cache[path]
        return hit

    def prefetch(self, paths: Iterable[str], *, batch_size: int = 8, progress: bool = True) -> None:
        """Tokenize every not-yet-cached file, ``batch_size`` waveforms per codec call.

        Raises:
            FileNotFoundError, AudioError: As :func:`mctp.codecs.load_audio`.
        """
        todo = list(dict.fromkeys(p for p in paths if p not in self.cache))
        sr = int(self.tokenizer.sample_rate)
        bar = tqdm(total=len(todo), desc="audio -> codes", unit="file", disable=not progress)
        for i in range(0, len(todo), batch_size):
            chunk = todo[i : i + batch_size]
            wavs = [load_audio(self.resolve(p), sample_rate=sr)[0] for p in chunk]
            for p, codes in zip(chunk, self.tokenizer.encode(wavs), strict=True):
                self.cache[p] = [int(c) for c in codes.tolist()]
            bar.update(len(chunk))
        bar.close()

    def save(self, path: str | Path) -> Path:
        """Write the cache as ``.npz`` (``paths``, concatenated ``codes``, ``offsets``)."""
        keys = sorted(self.cache)
        lengths = [len(self.cache[k]) for k in keys]
        offsets = np.concatenate(([0], np.cumsum(lengths, dtype=np.int64)))
        codes = np.fromiter((c for k in keys for c in self.cache[k]), np.int64, int(offsets[-1]))
        out = Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        with out.open("wb") as f:
            np.savez(f, paths=np.array(keys, dtype=str), codes=codes, offsets=offsets)
        return out

    @staticmethod
    def load(path: str | Path) -> dict[str, list[int]]:
        """Read a cache written by :meth:`save` (``{}`` when the file does not exist)."""
        p = Path(path)
        if not p.is_file():
            return {}
        with np.load(p) as z:
            keys, codes, off = z["paths"].tolist(), z["codes"], z["offsets"]
        return {k: codes[off[i] : off[i + 1]].tolist() for i, k in enumerate(keys)}


# --------------------------------------------------------------------------- rendering
class ChatRenderer:
    """Render one record as the official Qwen2 dataset does (ChatML, labels, audio, interleave).

    Args:
        tokenizer: A transformers tokenizer holding ``<|im_start|>``, ``<|im_end|>`` and the
            speech tokens (see :func:`mctp.backbones.extend_vocab`).
        vocab: The speech ids of that tokenizer.
        codes: ``audio path -> codes`` (an :class:`AudioCodes`).
        schedule: Interleave ratio for assistant turns (official default Boost
            ``[1, 10, 4, 10]``); None keeps the assistant content in its written order.

    Raises:
        ValueError: If a Vanilla schedule is given (it has no data layout).
    """

    def __init__(
        self,
        tokenizer: Any,
        vocab: SpeechVocab,
        codes: Callable[[str], Sequence[int]],
        schedule: InterleaveSchedule | None = None,
    ) -> None:
        if schedule is not None and not schedule.uses_mctp:
            raise ValueError("a Vanilla schedule has no audio layout; pass None or a ratio")
        self.tokenizer, self.vocab, self.codes, self.schedule = tokenizer, vocab, codes, schedule
        self.im_start = self.encode("<|im_start|>")
        self.im_end = self.encode("<|im_end|>")
        self.nl = self.encode("\n")
        self.role_ids = {r: self.encode(r) for r in ("user", "assistant", "system")}

    def encode(self, text: str) -> list[int]:
        """Text -> ids without BOS/EOS."""
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []

    def audio_ids(self, path: str) -> list[int]:
        """``<|audio_k|>`` ids of one audio file (no tags).

        Raises:
            ValueError: If the codec emits a code outside the vocabulary's audio tokens.
        """
        return self.vocab.from_codes(list(self.codes(path))).tolist()

    def render(self, record: Mapping[str, Any]) -> Sample:
        """Turn one record into ids and labels.

        Raises:
            RecordError: On a malformed record (no messages, unknown role, non-string content,
                placeholder count != number of audios, more than one audio in an assistant turn,
                a TTS prompt that itself holds ``<|audio|>``).
            FileNotFoundError, AudioError: For a missing or corrupt audio file.
        """
        messages = _messages(record)
        audios = record.get("audios") or []
        if not isinstance(audios, list) or not all(isinstance(a, str) for a in audios):
            raise RecordError(f"'audios' must be a list of paths, got {audios!r}")
        placeholders = sum(m["content"].count(AUDIO_PLACEHOLDER) for m in messages)
        if placeholders != len(audios):
            raise RecordError(
                f"{placeholders} {AUDIO_PLACEHOLDER} placeholders but {len(audios)} audios"
            )
        messages = _tts_trick(messages)
        next_audio = iter(audios)
        ids: list[int] = []
        labels: list[int] = []
        for m in messages:
            role = _ROLES[m["role"]]
            pieces = m["content"].split(AUDIO_PLACEHOLDER)
            texts = [self.encode(p) for p in pieces]
            tracks = [self.audio_ids(next(next_audio)) for _ in pieces[1:]]
            head = self.im_start + self.role_ids[role] + self.nl
            tail = self.im_end + self.nl
            if role != "assistant":
                body = _in_order(texts, tracks, self.vocab.boa, self.vocab.eoa)
                ids += head + body + tail
                labels += [IGNORE_INDEX] * (len(head) + len(body) + len(tail))
                continue
            body = self._assistant(texts, tracks)
            ids += head + body + tail
            labels += [IGNORE_INDEX] * len(head) + body + tail
        return Sample(ids, labels)

    def _assistant(self, texts: list[list[int]], tracks: list[list[int]]) -> list[int]:
        boa, eoa = self.vocab.boa, self.vocab.eoa
        if not tracks:
            return texts[0]
        if self.schedule is None:
            return _in_order(texts, tracks, boa, eoa)
        if len(tracks) > 1:
            raise RecordError(
                f"an assistant turn holds {len(tracks)} audios; the interleaved layout (official "
                "text_audio_interval) takes at most one per turn"
            )
        return self.schedule.interleave(texts[0] + texts[1], tracks[0], boa, eoa)


def _in_order(texts: list[list[int]], tracks: list[list[int]], boa: int, eoa: int) -> list[int]:
    """``text_0 BOA audio_0 EOA text_1 ...`` as written in the content."""
    out = list(texts[0])
    for audio, text in zip(tracks, texts[1:]):
        out += [boa, *audio, eoa, *text]
    return out


def _messages(record: Mapping[str, Any]) -> list[dict[str, str]]:
    """Validated copies of a record's messages."""
    if not isinstance(record, Mapping):
        raise RecordError(f"a record must be a JSON object, got {type(record).__name__}")
    messages = record.get("conversations") or record.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RecordError("the record has no 'messages' (or 'conversations') list")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or not isinstance(m.get("content"), str):
            raise RecordError(f"message {i} must be {{'role': str, 'content': str}}, got {m!r}")
        if m.get("role") not in _ROLES:
            raise RecordError(
                f"message {i} has unknown role {m.get('role')!r}; known roles: {sorted(_ROLES)}"
            )
        out.append({"role": m["role"], "content": m["content"]})
    return out


def _tts_trick(messages: list[dict[str, str]]) -> list[dict[str, str]]:
    """Prepend a TTS prompt's text to later assistant turns (as the official dataset does)."""
    text = None
    for m in messages:
        if m["role"] == "user" and TTS_PROMPT in m["content"]:
            text = m["content"].replace(TTS_PROMPT + "\n", "").strip()
            if AUDIO_PLACEHOLDER in text:
                raise RecordError(
                    f"the TTS prompt's text holds {AUDIO_PLACEHOLDER}; it would be copied into "
                    "the assistant turn"
                )
        if m["role"] == "assistant" and text is not None:
            m["content"] = text + m["content"]
    return messages


# --------------------------------------------------------------------------- mixture
@dataclass(frozen=True)
class DataSource:
    """One named data source: JSONL files sampled with a ratio.

    Attributes:
        name: Label (e.g. ``"VITA-MLLM/AudioQA-1M"``).
        paths: JSONL files; each is its own packing stream (as the official code).
        ratio: Records drawn per file = ``min(int(n * ratio), num)``; > 1 repeats records.
        num: Cap on the records drawn per file (None = no cap).
    """

    name: str
    paths: tuple[str, ...]
    ratio: float = 1.0
    num: int | None = None

    def __post_init__(self) -> None:
        if self.ratio < 0 or (self.num is not None and self.num < 0):
            raise ValueError(f"source {self.name!r}: ratio and num must be >= 0")


class _Jsonl:
    """Byte offsets of the non-empty lines of a JSONL file (records read on demand)."""

    def __init__(self, path: Path) -> None:
        if not path.is_file():
            raise FileNotFoundError(f"data file not found: {path}")
        self.path = path
        offsets, pos = [], 0
        with path.open("rb") as f:
            for line in f:
                if line.strip():
                    offsets.append(pos)
                pos += len(line)
        self.offsets = np.asarray(offsets, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.offsets)

    def read(self, i: int) -> Any:
        with self.path.open("rb") as f:
            f.seek(int(self.offsets[i]))
            line = f.readline()
        try:
            return json.loads(line)
        except json.JSONDecodeError as e:
            raise RecordError(f"{self.path} record {i}: invalid JSON ({e})") from e


class DataMixture:
    """Several sources mixed with ratios, in an order fixed by a seed.

    Each file is shuffled with ``seed``, the first ``min(int(n * ratio), num)`` indices (taken
    cyclically, so ratio 2.0 uses every record twice) are kept, and all files' picks are
    shuffled together with ``seed + epoch``.

    Args:
        sources: The sources (files of ratio 0 are skipped, as officially).
        seed: Shuffling seed.

    Raises:
        ValueError: If there are no sources or every source is empty after sampling.
        FileNotFoundError: If a listed file does not exist.
    """

    def __init__(self, sources: Sequence[DataSource], *, seed: int = 42) -> None:
        if not sources:
            raise ValueError("a DataMixture needs at least one source")
        self.sources, self.seed = list(sources), seed
        self.files: list[tuple[str, _Jsonl]] = []
        self.picks: list[np.ndarray] = []
        todo = [(s, p) for s in self.sources if s.ratio and s.num != 0 for p in s.paths]
        for src, path in tqdm(todo, desc="index jsonl", unit="file", disable=len(todo) < 8):
            data = _Jsonl(Path(path))
            n = len(data)
            used = int(n * src.ratio) if src.num is None else min(int(n * src.ratio), src.num)
            perm = np.random.default_rng(seed).permutation(n) if n else np.zeros(0, np.int64)
            self.picks.append(perm[np.arange(used) % n] if n else perm)
            self.files.append((f"{src.name}:{path}", data))
        if not sum(len(p) for p in self.picks):
            raise ValueError("the mixture is empty: every source has 0 records after sampling")

    @classmethod
    def from_config(
        cls,
        cfg: Mapping[str, Any] | str | Path,
        *,
        seed: int = 42,
        ratios: Mapping[str, float] | None = None,
    ) -> DataMixture:
        """Build from the official mixture layout ``{"dataset": {name: {ratio, num, data_paths}}}``.

        ``cfg`` may be that mapping or a YAML file holding it; relative data paths are taken
        relative to the current directory (as the official scripts do).

        Args:
            cfg: The mixture.
            seed: Shuffling seed.
            ratios: Ratio overrides by source name; ``"*"`` sets every other source (stage 4:
                ``{"VITA-MLLM/AudioQA-1M": 2.0, ..., "*": 0.05}``).

        Raises:
            ValueError: If the layout is not recognised or ``ratios`` names unknown sources.
        """
        if not isinstance(cfg, Mapping):
            import yaml

            cfg = yaml.safe_load(Path(cfg).read_text())
        table = cfg.get("dataset") if isinstance(cfg, Mapping) else None
        if not isinstance(table, Mapping):
            raise ValueError("a mixture config needs a 'dataset' mapping of sources")
        ratios = dict(ratios or {})
        unknown = set(ratios) - set(map(str, table)) - {"*"}
        if unknown:
            raise ValueError(f"ratios name unknown sources {sorted(unknown)}; known: {list(table)}")
        sources = []
        for name, info in table.items():
            if not isinstance(info, Mapping) or not info.get("data_paths"):
                raise ValueError(f"source {name!r} needs 'data_paths'")
            num = info.get("num")
            sources.append(
                DataSource(
                    name=str(name),
                    paths=tuple(str(p) for p in info["data_paths"]),
                    ratio=float(ratios.get(str(name), ratios.get("*", info.get("ratio", 1.0)))),
                    num=None if num is None else int(num),
                )
            )
        return cls(sources, seed=seed)

    def __len__(self) -> int:
        """Records per epoch."""
        return sum(len(p) for p in self.picks)

    def counts(self) -> dict[str, int]:
        """Records per epoch for each file stream."""
        return {key: len(p) for (key, _), p in zip(self.files, self.picks)}

    def audio_paths(self) -> list[str]:
        """Every audio path the mixture's records refer to (reads each picked record once)."""
        paths: dict[str, None] = {}
        for (_, data), picks in zip(self.files, self.picks):
            for i in np.unique(picks).tolist():
                record = data.read(i)
                paths.update(
                    dict.fromkeys((record.get("audios") or []) if isinstance(record, dict) else [])
                )
        return list(paths)

    def plan(self, epoch: int = 0) -> np.ndarray:
        """``[M, 2]`` rows of ``(file index, record index)`` in this epoch's order."""
        files = np.concatenate([np.full(len(p), f, np.int64) for f, p in enumerate(self.picks)])
        rows = np.stack((files, np.concatenate(self.picks).astype(np.int64)), axis=1)
        return rows[np.random.default_rng(self.seed + epoch).permutation(len(rows))]

    def records(self, epoch: int = 0) -> Iterator[tuple[str, str, Any]]:
        """Yield ``(stream key, location "file:index", record)`` in this epoch's order."""
        for f, i in self.plan(epoch).tolist():
            key, data = self.files[f]
            yield key, f"{data.path}:{i}", data.read(i)


# --------------------------------------------------------------------------- packing
@dataclass
class Pack:
    """Samples of one stream concatenated (and padded) to at most ``max_len`` tokens.

    Attributes:
        input_ids, labels, position_ids: ``[L]`` lists; position ids restart at 0 per sample.
        lengths: Length of each sample, in order.
        source: The stream (JSONL file) the samples came from.
        num_pad: Padding tokens at the end (label -100).
    """

    input_ids: list[int]
    labels: list[int]
    position_ids: list[int]
    lengths: list[int]
    source: str
    num_pad: int = 0

    def batch(self) -> dict[str, torch.Tensor]:
        """``{"input_ids", "labels", "position_ids"}``, each a ``[1, L]`` long tensor."""
        return {
            k: torch.tensor([getattr(self, k)], dtype=torch.long)
            for k in ("input_ids", "labels", "position_ids")
        }


class Packer:
    """Per-stream packing: append until the next sample would overflow, then emit.

    Args:
        max_len: Tokens per pack (official 8192; 2048 in stage 4 per DESIGN).
        pad_id: Id used for padding.
        pad: Pad every pack to ``max_len`` (fixed shapes, the official behaviour).
        on_too_long: ``"skip"`` (count in :attr:`skipped`) or ``"raise"`` for a sample longer
            than ``max_len``.

    Raises:
        ValueError: On ``max_len < 1`` or an unknown ``on_too_long``.
    """

    def __init__(
        self, max_len: int = 8192, *, pad_id: int = 0, pad: bool = True, on_too_long: str = "skip"
    ) -> None:
        if max_len < 1:
            raise ValueError(f"max_len must be >= 1, got {max_len}")
        if on_too_long not in ("skip", "raise"):
            raise ValueError(f"on_too_long must be 'skip' or 'raise', got {on_too_long!r}")
        self.max_len, self.pad_id, self.pad, self.on_too_long = max_len, pad_id, pad, on_too_long
        self.skipped = 0
        self._open: dict[str, list[Sample]] = {}

    def add(self, sample: Sample, source: str = "") -> Pack | None:
        """Add a sample to its stream; returns the stream's previous pack if it had to close.

        Raises:
            ValueError: If the sample is longer than ``max_len`` and ``on_too_long="raise"``,
                or its ids and labels differ in length.
        """
        if len(sample.input_ids) != len(sample.labels):
            raise ValueError(f"ids ({len(sample.input_ids)}) and labels ({len(sample.labels)})")
        if len(sample) > self.max_len or len(sample) == 0:
            if self.on_too_long == "raise" and len(sample):
                raise ValueError(f"a sample of {len(sample)} tokens exceeds max_len {self.max_len}")
            self.skipped += 1
            return None
        buf = self._open.setdefault(source, [])
        out = None
        if sum(map(len, buf)) + len(sample) > self.max_len:
            out = self._close(source)
            buf = self._open.setdefault(source, [])
        buf.append(sample)
        return out

    def flush(self) -> list[Pack]:
        """Close every open stream (end of the data)."""
        return [self._close(s) for s in list(self._open) if self._open[s]]

    def _close(self, source: str) -> Pack:
        samples = self._open.pop(source)
        ids = [t for s in samples for t in s.input_ids]
        labels = [t for s in samples for t in s.labels]
        pos = [p for s in samples for p in range(len(s))]
        pad = self.max_len - len(ids) if self.pad else 0
        ids += [self.pad_id] * pad
        labels += [IGNORE_INDEX] * pad
        pos += list(range(pos[-1] + 1, pos[-1] + 1 + pad))
        return Pack(ids, labels, pos, [len(s) for s in samples], source, pad)


# --------------------------------------------------------------------------- pipeline
@dataclass
class DataStats:
    """Counters of one pass over the data."""

    records: int = 0
    skipped_too_long: int = 0
    skipped_errors: int = 0
    packs: int = 0
    tokens: int = 0
    errors: list[str] = field(default_factory=list)


class VitaAudioData:
    """Mixture -> rendered samples -> per-stream packs -> ``[1, L]`` batches.

    Args:
        mixture: The records.
        renderer: Turns a record into a :class:`Sample`.
        packer: Packs samples (its ``max_len``/``pad`` decide the batch length).
        on_error: ``"raise"`` a :class:`RecordError` naming the record, or ``"skip"`` it.
        progress: Show a tqdm bar per epoch.

    Raises:
        ValueError: For an unknown ``on_error``.
    """

    def __init__(
        self,
        mixture: DataMixture,
        renderer: ChatRenderer,
        packer: Packer,
        *,
        on_error: str = "raise",
        progress: bool = True,
    ) -> None:
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        self.mixture, self.renderer, self.packer = mixture, renderer, packer
        self.on_error, self.progress = on_error, progress
        self.stats = DataStats()

    def samples(self, epoch: int = 0) -> Iterator[tuple[str, Sample]]:
        """Rendered ``(stream, sample)`` of one epoch.

        Raises:
            RecordError: For a bad record (with its file and index) when ``on_error="raise"``.
        """
        bar = tqdm(
            self.mixture.records(epoch),
            total=len(self.mixture),
            desc=f"data epoch {epoch}",
            unit="rec",
            disable=not self.progress,
            leave=False,
        )
        for key, where, record in bar:
            self.stats.records += 1
            try:
                sample = self.renderer.render(record)
            except (ValueError, FileNotFoundError) as e:  # RecordError, AudioError, bad codes
                if self.on_error == "raise":
                    raise RecordError(f"{where}: {e}") from e
                self.stats.skipped_errors += 1
                self.stats.errors.append(f"{where}: {e}")
                continue
            yield key, sample

    def packs(self, epoch: int = 0) -> Iterator[Pack]:
        """Packs of one epoch (open streams are flushed at its end)."""
        before = self.packer.skipped
        for key, sample in self.samples(epoch):
            done = self.packer.add(sample, key)
            if done is not None:
                yield self._count(done)
        for done in self.packer.flush():
            yield self._count(done)
        self.stats.skipped_too_long += self.packer.skipped - before
        if self.packer.skipped > before:
            logger.warning(
                "epoch %d: skipped %d samples longer than max_len %d",
                epoch,
                self.packer.skipped - before,
                self.packer.max_len,
            )

    def _count(self, pack: Pack) -> Pack:
        self.stats.packs += 1
        self.stats.tokens += len(pack.input_ids) - pack.num_pad
        return pack

    def batches(self, *, start_epoch: int = 0) -> Iterator[dict[str, torch.Tensor]]:
        """Endless ``[1, L]`` batches, epoch after epoch (each epoch reshuffled).

        Raises:
            ValueError: If an epoch yields no pack at all (every sample skipped).
        """
        epoch = start_epoch
        while True:
            n = 0
            for pack in self.packs(epoch):
                n += 1
                yield pack.batch()
            if n == 0:
                raise ValueError(f"epoch {epoch} produced no pack; stats: {self.stats}")
            epoch += 1


# --------------------------------------------------------------------------- tiny data
def make_word_tokenizer(words: Sequence[str]) -> Any:
    """A word-level transformers tokenizer (space-separated words, ``"\\n"`` a token) with ChatML.

    Holds ``<unk>``, ``"\\n"``, ``words`` and the specials ``<|endoftext|>`` (pad),
    ``<|im_start|>``, ``<|im_end|>`` (eos); add the speech tokens with ``extend_vocab``.
    """
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    table = {w: i for i, w in enumerate(dict.fromkeys(["<unk>", "\n", *words]))}
    core = Tokenizer(models.WordLevel(table, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r"\n"), "isolated"), pre_tokenizers.Split(" ", "removed")]
    )
    tok = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>")
    tok.add_special_tokens(
        {
            "pad_token": "<|endoftext|>",
            "eos_token": "<|im_end|>",
            "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
        }
    )
    return tok


def synthesize_dataset(
    folder: str | Path, codec: Any, *, records: int = 8, seed: int = 0, num_words: int = 48
) -> tuple[dict[str, Any], list[str]]:
    """Write tiny ASR, TTS, speech-QA and text-only JSONL files with WAVs made by ``codec``.

    Audio is ``codec.decode`` of random codes (4..24 frames), written as float WAV, so a
    tokenizer like :class:`~mctp.codecs.DummyCodec` recovers the codes exactly.

    Args:
        folder: Output folder (``<task>.jsonl`` and ``wav/``).
        codec: Has ``decode(ids) -> wav``, ``sample_rate`` and ``codebook_size``.
        records: Records per task.
        seed: Seed of the text and codes.
        num_words: Size of the random word list (``w0``, ``w1``, ...).

    Returns:
        ``(mixture mapping in the official layout, every word used)``.
    """
    import soundfile as sf

    rng = np.random.default_rng(seed)
    root = Path(folder)
    (root / "wav").mkdir(parents=True, exist_ok=True)
    vocab = [f"w{i}" for i in range(num_words)]
    count = iter(range(10**9))

    def text(lo: int, hi: int) -> str:
        return " ".join(rng.choice(vocab, size=int(rng.integers(lo, hi + 1))).tolist())

    def wav() -> str:
        ids = torch.from_numpy(rng.integers(0, codec.codebook_size, int(rng.integers(4, 25))))
        path = root / "wav" / f"{next(count):05d}.wav"
        sf.write(path, codec.decode(ids).numpy(), int(codec.sample_rate), subtype="FLOAT")
        return str(path.resolve())

    def chat(user: str, assistant: str, audios: list[str]) -> dict[str, Any]:
        turns = [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
        return {"messages": turns, "audios": audios}

    makers = {
        "asr": lambda: chat(f"{ASR_PROMPT}\n{AUDIO_PLACEHOLDER}", text(3, 8), [wav()]),
        "tts": lambda: chat(f"{TTS_PROMPT}\n{text(3, 8)}", AUDIO_PLACEHOLDER, [wav()]),
        "sqa": lambda: chat(
            AUDIO_PLACEHOLDER, f"{text(3, 8)}\n{AUDIO_PLACEHOLDER}", [wav(), wav()]
        ),
        "text": lambda: chat(text(3, 8), text(3, 8), []),
    }
    table = {}
    for task, make in makers.items():
        path = root / f"{task}.jsonl"
        path.write_text("".join(json.dumps(make()) + "\n" for _ in range(records)))
        table[task] = {"ratio": 1.0, "data_paths": [str(path.resolve())]}
    words = [*vocab, *ASR_PROMPT.split(), *TTS_PROMPT.split(), "user", "assistant", "system"]
    return {"dataset": table}, words
