"""VITA-Audio training data: JSONL records -> ChatML ids/labels -> packed ``[1, L]`` batches.

Follows the official ``Qwen2Dataset`` (``vita_audio/data/dataset_qwen2.py``): ChatML without a
default system prompt; every ``<|audio|>`` (any role, in order) becomes ``BOA <|audio_k|>... EOA``;
a TTS prompt's text is prepended to the assistant turn; the assistant's text and audio are
interleaved by an :class:`~mctp.interleave.InterleaveSchedule`; labels are -100 except on the
assistant content and its ``<|im_end|> \\n``. Records come from a
:class:`~vita_audio.mixture.DataMixture` (JSONL files sampled with ratios from a seed) and are packed
per file by a :class:`~vita_audio.packing.Packer` (position ids restart at 0 per sample, padding
gets label -100 and positions continuing the last sample, as officially). Samples longer than
``max_len`` are skipped and counted (``on_too_long="skip"``) or raise; a malformed record raises
:class:`RecordError` with its file and index (``on_error="raise"``) or is skipped and counted.
See TRAINING.md.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from tqdm.auto import tqdm

from mctp.codecs import AudioTokenizer, load_audio
from mctp.interleave import InterleaveSchedule
from mctp.speech_vocab import AUDIO_PLACEHOLDER, SpeechVocab
from mctp.training import DataError, ErrorLog, PackedDataset, greedy_packs

if TYPE_CHECKING:
    from .mixture import DataMixture

__all__ = [
    "ASR_PROMPT",
    "IGNORE_INDEX",
    "TTS_PROMPT",
    "AudioCodes",
    "AudioFeatures",
    "ChatRenderer",
    "DataStats",
    "RecordError",
    "Sample",
    "VitaAudioData",
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
    audio_features: list[torch.Tensor] = field(default_factory=list)  # Plus: [F, D] per audio

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
            for p, codes in zip(chunk, self.tokenizer.encode(wavs, sample_rate=sr), strict=True):
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


class AudioFeatures:
    """Audio file -> SenseVoice encoder input features (VITA-Audio-Plus), cached by path.

    Args:
        encoder: A :class:`~mctp.codecs.sensevoice.SenseVoiceEncoder` (its front end is used).
        root: Folder that relative audio paths are resolved against.
    """

    def __init__(self, encoder: Any, *, root: str | Path | None = None) -> None:
        self.encoder = encoder
        self.root = None if root is None else Path(root)
        self.cache: dict[str, torch.Tensor] = {}

    def __call__(self, path: str) -> torch.Tensor:
        """``[F, D]`` float32 features of one file (the encoder adds its query frames).

        Raises:
            FileNotFoundError, AudioError: For a missing, corrupt or too short file.
        """
        hit = self.cache.get(path)
        if hit is None:
            p = Path(path)
            p = p if self.root is None or p.is_absolute() else self.root / p
            wav, sr = load_audio(p, sample_rate=int(self.encoder.sample_rate))
            hit = self.cache[path] = self.encoder.features(wav, sample_rate=sr).float()
        return hit

    def num_placeholders(self, features: torch.Tensor) -> int:
        """``<|context_of_audio|>`` slots of an audio: its frames plus the query frames."""
        return int(features.shape[0]) + int(self.encoder.num_query_frames)


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
        features: VITA-Audio-Plus: audio in system/user turns becomes ``BOA
            <|context_of_audio|> x (F + 4) EOA`` and its encoder features travel with the
            sample (assistant audio stays codec tokens). Needs ``vocab.audio_context``.

    Raises:
        ValueError: If a Vanilla schedule is given (it has no data layout), or ``features``
            without a ``<|context_of_audio|>`` token.
    """

    def __init__(
        self,
        tokenizer: Any,
        vocab: SpeechVocab,
        codes: Callable[[str], Sequence[int]],
        schedule: InterleaveSchedule | None = None,
        features: AudioFeatures | None = None,
    ) -> None:
        if schedule is not None and not schedule.uses_mctp:
            raise ValueError("a Vanilla schedule has no audio layout; pass None or a ratio")
        if features is not None and vocab.audio_context is None:
            raise ValueError("Plus features need <|context_of_audio|> (extend_vocab(plus=True))")
        self.tokenizer, self.vocab, self.codes, self.schedule = tokenizer, vocab, codes, schedule
        self.features = features
        unk = getattr(tokenizer, "unk_token_id", None)
        self.control_ids = frozenset(
            i
            for i in (*tokenizer.get_added_vocab().values(), *tokenizer.all_special_ids)
            if i != unk
        )
        self.unk_token = getattr(tokenizer, "unk_token", None)
        self.im_start = self.encode("<|im_start|>")
        self.im_end = self.encode("<|im_end|>")
        self.nl = self.encode("\n")
        self.role_ids = {r: self.encode(r) for r in ("user", "assistant", "system")}

    def encode(self, text: str) -> list[int]:
        """Text -> ids without BOS/EOS."""
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []

    def text_ids(self, text: str, where: str) -> list[int]:
        """Record text -> ids, refusing text that the tokenizer would read as control tokens.

        A record's text is data, never control: a ``<|im_end|>`` in a user turn would close the
        turn, ``<|begin_of_audio|><|audio_5|>`` would inject audio codes. Like tiktoken's
        ``disallowed_special`` default, the record is refused (the tokens are named) rather
        than trained on a rewritten conversation; ``<|audio|>`` placeholders are split out
        before this.

        Raises:
            RecordError: If ``text`` holds any special or added token of the vocabulary.
        """
        ids = self.encode(text)
        found = [i for i in ids if i in self.control_ids]
        if found or (self.unk_token and self.unk_token in text):
            names = list(dict.fromkeys(self.tokenizer.convert_ids_to_tokens(found)))
            if self.unk_token and self.unk_token in text:
                names.append(self.unk_token)
            raise RecordError(
                f"{where} holds control tokens of the vocabulary as text: {names}; record text "
                f"is never read as control tokens (only {AUDIO_PLACEHOLDER} is a placeholder)"
            )
        return ids

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
                a TTS prompt that itself holds ``<|audio|>``, text holding a special or added
                token of the vocabulary such as ``<|im_end|>`` or ``<|audio_5|>``).
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
        feats: list[torch.Tensor] = []
        for n, m in enumerate(messages):
            role = _ROLES[m["role"]]
            pieces = m["content"].split(AUDIO_PLACEHOLDER)
            texts = [self.text_ids(p, f"message {n} ({m['role']})") for p in pieces]
            paths = [next(next_audio) for _ in pieces[1:]]
            if self.features is not None and role != "assistant":
                tracks = []
                for path in paths:
                    f = self.features(path)
                    feats.append(f)
                    tracks.append([self.vocab.audio_context] * self.features.num_placeholders(f))
            else:
                tracks = [self.audio_ids(p) for p in paths]
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
        return Sample(ids, labels, feats)

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


# --------------------------------------------------------------------------- pipeline
@dataclass
class DataStats:
    """Counters of the last pass over the data."""

    records: int = 0
    skipped_too_long: int = 0
    skipped_errors: int = 0
    packs: int = 0
    tokens: int = 0


class VitaAudioData:
    """Mixture -> rendered samples -> per-stream packs, as datasets for transformers' Trainer.

    :meth:`dataset` renders every record once to learn its length (a malformed one is reported
    through the mixture's :class:`~mctp.training.ErrorLog` with its file and line: raised or
    skipped with a warning and counted), packs them per stream as the official packer does
    and returns a map-style :class:`~mctp.training.PackedDataset` whose rows are rendered again
    on access, so DataLoader workers do the work. :meth:`stream` packs on the fly instead (for
    mixtures read with ``streaming=True``).

    Args:
        mixture: The records.
        renderer: Turns a record into a :class:`Sample`.
        max_len: Tokens per pack.
        pad: Pad every pack to ``max_len`` (fixed shapes, the official behaviour).
        pad_id: Id of padded slots.
        on_too_long: ``"skip"`` (counted, one warning) or ``"raise"`` for a sample longer than
            ``max_len``.
        progress: Show a tqdm bar while planning.

    Raises:
        ValueError: For an unknown ``on_too_long`` or ``max_len < 1``.
    """

    def __init__(
        self,
        mixture: DataMixture,
        renderer: ChatRenderer,
        *,
        max_len: int,
        pad: bool = True,
        pad_id: int = 0,
        on_too_long: str = "skip",
        progress: bool = True,
    ) -> None:
        if on_too_long not in ("skip", "raise"):
            raise ValueError(f"on_too_long must be 'skip' or 'raise', got {on_too_long!r}")
        if max_len < 1:
            raise ValueError(f"max_len must be >= 1, got {max_len}")
        self.mixture, self.renderer = mixture, renderer
        self.max_len, self.pad, self.pad_id = max_len, pad, pad_id
        self.on_too_long, self.progress = on_too_long, progress
        self.stats = DataStats()

    @property
    def errors(self) -> ErrorLog:
        """The malformed records met so far."""
        return self.mixture.errors

    def _render(self, where: str, record: Any) -> Sample | None:
        try:
            return self.renderer.render(record)
        except (ValueError, FileNotFoundError) as e:  # RecordError, AudioError, bad codes
            self.errors.report(where, e)
            self.stats.skipped_errors += 1
            return None

    def _too_long(self, where: str, n: int) -> None:
        if self.on_too_long == "raise":
            raise DataError(f"{where}: a sample of {n} tokens exceeds max_len {self.max_len}")
        self.stats.skipped_too_long += 1

    def _finish(self) -> None:
        if self.stats.skipped_too_long:
            logger.warning(
                "skipped %d samples longer than max_len %d",
                self.stats.skipped_too_long,
                self.max_len,
            )
        if self.errors.skipped:
            logger.warning(self.errors.summary())

    def render_ref(self, ref: tuple[int, int]) -> dict[str, Any]:
        """``{"input_ids", "labels"}`` of record ``ref = (file index, record index)``."""
        sample = self.renderer.render(self.mixture.read(*ref))
        row: dict[str, Any] = {"input_ids": sample.input_ids, "labels": sample.labels}
        if self.renderer.features is not None:
            row["audio_features"] = sample.audio_features
        return row

    def dataset(self, epoch: int = 0) -> PackedDataset:
        """The packs of one pass over the mixture as a map-style dataset.

        Raises:
            DataError: For a malformed record (``file:line``) when ``on_error="raise"``, or a
                too long sample when ``on_too_long="raise"``.
            ValueError: If no pack is left (every sample skipped).
        """
        self.stats = DataStats()
        refs, lengths, keys = [], [], []
        bar = tqdm(
            self.mixture.records(epoch),
            total=len(self.mixture),
            desc="render + pack",
            unit="rec",
            disable=not self.progress,
            leave=False,
        )
        for key, where, record, ref in bar:
            self.stats.records += 1
            sample = self._render(where, record)
            if sample is None:
                continue
            if len(sample) > self.max_len:
                self._too_long(where, len(sample))
                continue
            refs.append(ref)
            lengths.append(len(sample))
            keys.append(key)
        packs, _ = greedy_packs(lengths, keys, self.max_len)
        if not packs:
            raise ValueError(f"no pack left after skipping; {self.stats}; {self.errors.summary()}")
        self.stats.packs = len(packs)
        self.stats.tokens = sum(lengths)
        self._finish()
        return PackedDataset(
            [[refs[i] for i in p] for p in packs],
            self.render_ref,
            max_len=self.max_len if self.pad else None,
            pad_id=self.pad_id,
        )

    def stream(self) -> torch.utils.data.IterableDataset:
        """Packs built on the fly, epoch after epoch (``streaming=True`` mixtures).

        With DataLoader workers, worker ``w`` of ``W`` packs the records ``w, w + W, ...``.
        """
        return _StreamingPacks(self)


class _StreamingPacks(torch.utils.data.IterableDataset):
    def __init__(self, data: VitaAudioData) -> None:
        self.data = data

    def __iter__(self) -> Iterator[dict[str, Any]]:
        d = self.data
        info = torch.utils.data.get_worker_info()
        w, count = (0, 1) if info is None else (info.id, info.num_workers)
        epoch = 0
        while True:
            open_: dict[str, list[dict[str, Any]]] = {}
            used: dict[str, int] = {}
            produced = 0
            for n, (key, where, record, _) in enumerate(d.mixture.records(epoch)):
                if n % count != w:
                    continue
                sample = d._render(where, record)
                if sample is None:
                    continue
                if len(sample) > d.max_len:
                    d._too_long(where, len(sample))
                    continue
                if open_.get(key) and used[key] + len(sample) > d.max_len:
                    produced += 1
                    yield self._row(open_.pop(key))
                item: dict[str, Any] = {"input_ids": sample.input_ids, "labels": sample.labels}
                if d.renderer.features is not None:
                    item["audio_features"] = sample.audio_features
                open_.setdefault(key, []).append(item)
                used[key] = sum(len(x["input_ids"]) for x in open_[key])
            for items in open_.values():
                produced += 1
                yield self._row(items)
            d._finish()
            if not produced:
                raise ValueError(f"epoch {epoch} produced no pack; {d.errors.summary()}")
            epoch += 1

    def _row(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        d = self.data
        return PackedDataset(
            [list(range(len(items)))],
            items.__getitem__,
            max_len=d.max_len if d.pad else None,
            pad_id=d.pad_id,
        )[0]
