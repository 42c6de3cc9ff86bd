"""Data mixtures: named JSONL sources sampled with ratios, in an order fixed by a seed.

Follows the official mixture yaml (``dataset: {name: {ratio, data_paths, num}}``): each file is
its own packing stream; see :class:`DataMixture` and TRAINING.md. Files are read through
Hugging Face ``datasets`` (:class:`mctp.training.JsonlFile`): every record knows its file and
line, malformed lines raise or are skipped per ``on_error``.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from mctp.training import ErrorLog, JsonlFile

__all__ = ["DataMixture", "DataSource"]


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

    def __init__(
        self,
        sources: Sequence[DataSource],
        *,
        seed: int = 42,
        errors: ErrorLog | None = None,
        streaming: bool = False,
    ) -> None:
        if not sources:
            raise ValueError("a DataMixture needs at least one source")
        self.sources, self.seed, self.streaming = list(sources), seed, streaming
        self.errors = errors or ErrorLog()
        self.files: list[tuple[str, JsonlFile]] = []
        self.picks: list[np.ndarray] = []
        todo = [(s, p) for s in self.sources if s.ratio and s.num != 0 for p in s.paths]
        for src, path in tqdm(todo, desc="index jsonl", unit="file", disable=len(todo) < 8):
            data = JsonlFile(Path(path), errors=self.errors, streaming=streaming)
            n = len(data)
            used = int(n * src.ratio) if src.num is None else min(int(n * src.ratio), src.num)
            if streaming:  # file order, cycled: no random access while streaming
                perm = np.arange(n, dtype=np.int64)
            else:
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
        errors: ErrorLog | None = None,
        streaming: bool = False,
    ) -> DataMixture:
        """Build from the official mixture layout ``{"dataset": {name: {ratio, num, data_paths}}}``.

        ``cfg`` may be that mapping or a YAML file holding it; relative data paths are taken
        relative to the current directory (as the official scripts do).

        Args:
            cfg: The mixture.
            seed: Shuffling seed.
            ratios: Ratio overrides by source name; ``"*"`` sets every other source (stage 4:
                ``{"VITA-MLLM/AudioQA-1M": 2.0, ..., "*": 0.05}``).
            errors: Where malformed lines are reported (default: raise).
            streaming: Read the files with ``datasets``' streaming mode.

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
        return cls(sources, seed=seed, errors=errors, streaming=streaming)

    def __len__(self) -> int:
        """Records per epoch."""
        return sum(len(p) for p in self.picks)

    def counts(self) -> dict[str, int]:
        """Records per epoch for each file stream."""
        return {key: len(p) for (key, _), p in zip(self.files, self.picks)}

    def read(self, f: int, i: int) -> Any:
        """Record ``i`` of file ``f`` (map-style only)."""
        return self.files[f][1][i]

    def where(self, f: int, i: int) -> str:
        """``"file:line"`` of record ``i`` of file ``f``."""
        return self.files[f][1].where(i)

    def audio_paths(self) -> list[str]:
        """Every audio path the mixture's records refer to (reads each picked record once)."""
        paths: dict[str, None] = {}
        for _, _, record, _ in self.records():
            paths.update(dict.fromkeys(record.get("audios") or []))
        return list(paths)

    def plan(self, epoch: int = 0) -> np.ndarray:
        """``[M, 2]`` rows of ``(file index, record index)`` in this epoch's order."""
        files = np.concatenate([np.full(len(p), f, np.int64) for f, p in enumerate(self.picks)])
        rows = np.stack((files, np.concatenate(self.picks).astype(np.int64)), axis=1)
        return rows[np.random.default_rng(self.seed + epoch).permutation(len(rows))]

    def records(self, epoch: int = 0) -> Iterator[tuple[str, str, Any, tuple[int, int]]]:
        """Yield ``(stream key, "file:line", record, (file index, record index))`` in order.

        Map-style: :meth:`plan`'s order. Streaming: each file is read in order (cycled for a
        ratio above 1) and the files are interleaved by a generator seeded with
        ``seed + epoch``, each drawn with probability proportional to its records left.
        """
        if not self.streaming:
            for f, i in self.plan(epoch).tolist():
                key, data = self.files[f]
                yield key, data.where(i), data[i], (f, i)
            return
        left = [len(p) for p in self.picks]
        iters = [self._cycle(f) for f in range(len(self.files))]
        rng = np.random.default_rng(self.seed + epoch)
        while sum(left):
            f = int(rng.choice(len(left), p=np.asarray(left) / sum(left)))
            left[f] -= 1
            i, where, record = next(iters[f])
            yield self.files[f][0], where, record, (f, i)

    def _cycle(self, f: int) -> Iterator[tuple[int, str, Any]]:
        data = self.files[f][1]
        while True:
            yield from ((i, where, rec) for i, (where, rec) in enumerate(data))
