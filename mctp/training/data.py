"""Training data through Hugging Face ``datasets``: JSONL records with file/line errors, packing.

* :class:`JsonlFile` reads one JSONL file with ``datasets.load_dataset("json")`` (map-style,
  or ``streaming=True`` for files too large to index) after one pass that checks every line:
  invalid UTF-8 always raises :class:`DataError` naming the file and line; a line that is not
  a JSON object raises it too (``on_error="raise"``) or is skipped with a warning naming file
  and line (``on_error="skip"``), counted in an :class:`ErrorLog`.
* :class:`PackedDataset` is a map-style ``torch`` dataset of packed rows (several samples per
  row, position ids restarting at 0 per sample) built from a plan of record references, so
  DataLoader workers render the records in parallel (``dataloader_num_workers``).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

__all__ = ["DataError", "ErrorLog", "JsonlFile", "PackedDataset", "greedy_packs", "scan_jsonl"]

logger = logging.getLogger("mctp.training")

ON_ERROR = ("raise", "skip")


class DataError(ValueError):
    """A data file or record is unusable; the message starts with ``file:line``."""


@dataclass
class ErrorLog:
    """Malformed records met so far (``file:line: reason``), reported with a warning each.

    Attributes:
        on_error: ``"raise"`` or ``"skip"``.
        skipped: The ``file:line: reason`` of every skipped record.
    """

    on_error: str = "raise"
    skipped: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.on_error not in ON_ERROR:
            raise ValueError(f"on_error must be one of {ON_ERROR}, got {self.on_error!r}")

    def report(self, where: str, reason: str | BaseException) -> None:
        """Raise :class:`DataError` (``on_error="raise"``) or warn and count the record.

        Raises:
            DataError: ``"{where}: {reason}"`` when ``on_error="raise"``.
        """
        message = f"{where}: {reason}"
        if self.on_error == "raise":
            if isinstance(reason, BaseException):
                raise DataError(message) from reason
            raise DataError(message)
        self.skipped.append(message)
        logger.warning("skipping malformed record %s", message)

    def summary(self) -> str:
        """One line: how many records were skipped (and the first few locations)."""
        if not self.skipped:
            return "no malformed records"
        first = "; ".join(self.skipped[:3])
        return f"skipped {len(self.skipped)} malformed records (first: {first})"


def scan_jsonl(path: str | Path) -> tuple[list[int], list[tuple[int, str]]]:
    """Check every line of a JSONL file.

    Returns:
        ``(lines, bad)``: 1-based numbers of the non-empty lines holding a JSON object, and
        ``(line, reason)`` of the other non-empty lines.

    Raises:
        FileNotFoundError: If the file does not exist.
        DataError: On invalid UTF-8 (naming the file, line and byte column).
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"no JSONL file at {p}")
    good: list[int] = []
    bad: list[tuple[int, str]] = []
    with p.open("rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(
                    f"{p}:{number}: invalid UTF-8 (byte {e.start + 1} of the line: "
                    f"{raw[e.start : e.start + 4]!r}); re-encode the file as UTF-8"
                ) from e
            if not text.strip():
                continue
            try:
                value = json.loads(text)
            except json.JSONDecodeError as e:
                bad.append((number, f"invalid JSON ({e.msg} at column {e.colno})"))
                continue
            if isinstance(value, dict):
                good.append(number)
            else:
                bad.append((number, f"a record must be a JSON object, got {type(value).__name__}"))
    return good, bad


class JsonlFile:
    """One JSONL file read through ``datasets``, each record knowing its line number.

    Args:
        path: The file.
        errors: Where malformed lines are reported (and whether they raise).
        streaming: Read with ``load_dataset(..., streaming=True)`` (an ``IterableDataset``;
            only :meth:`__iter__` is available, no random access).
        cache_dir: ``datasets`` cache folder (default: the library's).

    Raises:
        FileNotFoundError, DataError: As :func:`scan_jsonl` (and :class:`ErrorLog`).
    """

    def __init__(
        self,
        path: str | Path,
        *,
        errors: ErrorLog | None = None,
        streaming: bool = False,
        cache_dir: str | None = None,
    ) -> None:
        try:
            import datasets
        except ImportError as e:
            raise ImportError("mctp.training data needs datasets: pip install 'mctp[train]'") from e
        self.path = Path(path)
        self.errors = errors or ErrorLog()
        self.streaming = streaming
        self.lines, bad = scan_jsonl(self.path)
        for number, reason in bad:
            self.errors.report(f"{self.path}:{number}", reason)
        self._raw = False
        if not self.lines:
            self.data: Any = []
            return
        try:
            if bad:  # the json builder cannot skip lines: hand it only the good ones
                raise ValueError("malformed lines")
            self.data = datasets.load_dataset(
                "json",
                data_files=str(self.path),
                split="train",
                streaming=streaming,
                cache_dir=cache_dir,
            )
            if not streaming and len(self.data) != len(self.lines):
                raise ValueError("record count differs from the line count")
        except (ValueError, datasets.exceptions.DatasetGenerationError, TypeError):
            # Malformed lines or records whose fields change type from line to line (Arrow
            # needs one schema): keep each record as its JSON text and parse it on access.
            wanted = set(self.lines)
            with self.path.open("rb") as f:
                texts = [r.decode("utf-8") for n, r in enumerate(f, start=1) if n in wanted]
            table = datasets.Dataset.from_dict({"json": texts})
            self.data = table.to_iterable_dataset() if streaming else table
            self._raw = True

    def __len__(self) -> int:
        """Number of usable records."""
        return len(self.lines)

    def where(self, i: int) -> str:
        """``"file:line"`` of record ``i``."""
        return f"{self.path}:{self.lines[i]}"

    def _decode(self, row: dict[str, Any]) -> dict[str, Any]:
        return json.loads(row["json"]) if self._raw else _strip_nones(row)

    def __getitem__(self, i: int) -> dict[str, Any]:
        """Record ``i`` (a dict as written in the file, absent keys dropped).

        Raises:
            TypeError: On a streaming file.
        """
        if self.streaming:
            raise TypeError(f"{self.path} is streamed: iterate over it instead")
        return self._decode(self.data[int(i)])

    def __iter__(self) -> Iterator[tuple[str, dict[str, Any]]]:
        """``(file:line, record)`` in file order."""
        for i, row in enumerate(self.data):
            yield self.where(i), self._decode(row)


def _strip_nones(value: Any) -> Any:
    """Drop the ``None`` fields Arrow adds for keys a record did not have."""
    if isinstance(value, dict):
        return {k: _strip_nones(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_strip_nones(v) for v in value]
    return value


def greedy_packs(
    lengths: Sequence[int], keys: Sequence[Any], max_len: int
) -> tuple[list[list[int]], list[int]]:
    """Pack sample indices per key (stream) in order: append until the next would overflow.

    Args:
        lengths: Length of each sample.
        keys: The stream of each sample (samples are only packed with their own stream).
        max_len: Tokens per pack.

    Returns:
        ``(packs, too_long)``: lists of sample indices (in the order packs close, open ones at
        the end) and the indices longer than ``max_len`` (left out).

    Raises:
        ValueError: On ``max_len < 1`` or sequences of different lengths.
    """
    if max_len < 1:
        raise ValueError(f"max_len must be >= 1, got {max_len}")
    if len(lengths) != len(keys):
        raise ValueError(f"{len(lengths)} lengths but {len(keys)} keys")
    open_: dict[Any, tuple[list[int], int]] = {}
    packs: list[list[int]] = []
    too_long: list[int] = []
    for i, (n, key) in enumerate(zip(lengths, keys)):
        if n > max_len or n == 0:
            too_long.append(i)
            continue
        items, used = open_.get(key, ([], 0))
        if items and used + n > max_len:
            packs.append(items)
            del open_[key]  # a re-opened stream goes last, as an online packer closes it
            items, used = [], 0
        open_[key] = ([*items, i], used + n)
    packs.extend(items for items, _ in open_.values() if items)
    return packs, too_long


class PackedDataset(torch.utils.data.Dataset):
    """Map-style dataset of packed rows, rendered on access (DataLoader workers render).

    Args:
        packs: Per row, the references of its samples (anything ``render`` takes).
        render: ``reference -> {"input_ids": [...], "labels": [...]}`` (plus optional
            ``audio_features``: a list of ``[F, D]`` arrays, one per audio of the sample).
        max_len: Pad every row to this length (labels -100, positions continuing the last
            sample, as the official packer); None: no padding.
        pad_id: Id of padded slots.

    Raises:
        ValueError: (on access) If a rendered sample's ids and labels differ in length.
    """

    def __init__(
        self,
        packs: Sequence[Sequence[Any]],
        render: Callable[[Any], dict[str, Any]],
        *,
        max_len: int | None = None,
        pad_id: int = 0,
    ) -> None:
        self.packs = [list(p) for p in packs]
        self.render = render
        self.max_len = max_len
        self.pad_id = pad_id

    def __len__(self) -> int:
        return len(self.packs)

    def __getitem__(self, i: int) -> dict[str, Any]:
        """Row ``i``: ``input_ids``, ``labels``, ``position_ids`` lists (and ``audio_features``)."""
        ids: list[int] = []
        labels: list[int] = []
        pos: list[int] = []
        audio: list[Any] | None = None
        for ref in self.packs[i]:
            s = self.render(ref)
            if len(s["input_ids"]) != len(s["labels"]):
                raise ValueError(f"sample {ref}: ids and labels differ in length")
            ids += s["input_ids"]
            labels += s["labels"]
            pos += range(len(s["input_ids"]))
            if s.get("audio_features") is not None:
                audio = (audio or []) + list(s["audio_features"])
        if self.max_len is not None and len(ids) < self.max_len:
            pad = self.max_len - len(ids)
            ids += [self.pad_id] * pad
            labels += [-100] * pad
            pos += range(pos[-1] + 1, pos[-1] + 1 + pad)
        row: dict[str, Any] = {"input_ids": ids, "labels": labels, "position_ids": pos}
        if audio is not None:
            row["audio_features"] = audio
        return row
