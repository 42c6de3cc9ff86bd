"""``GenerationConfig``: every option of a generation in one frozen, validated object."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any

from mctp.interleave import InterleaveSchedule, Mode

from .sampling import SamplingConfig

__all__ = ["GenerationConfig"]


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


@dataclass(frozen=True)
class GenerationConfig:
    """How to generate: schedule, length, token choice, stop ids, verification, fast path.

    Validated at construction: a wrong type, a NaN or an out-of-range value raises here, not
    in the middle of a generation. Change a field with :meth:`replace`.

    Attributes:
        mode: ``"vanilla"``, ``"balance"``, ``"boost"``, ``"turbo"``, a :class:`Mode` or an
            :class:`~mctp.interleave.InterleaveSchedule` (stored resolved, as a schedule).
        max_new_tokens: Tokens to generate per row (fewer when every row stops), ``>= 1``.
        text_sampling: How text tokens (and every backbone token) are chosen.
        audio_sampling: How audio tokens are chosen; None = like ``text_sampling``.
        eos_token_id: Stop id(s); a row stops after producing one. Stored as a tuple.
        pad_id: Fills ``sequences`` after a row stopped.
        verify: Verified (lossless) decoding: the heads draft, one backbone forward checks the
            drafts and keeps the prefix it agrees with (greedy only). With Vanilla the heads
            draft ``draft_len`` tokens after every backbone forward; with another schedule
            they draft that schedule's MCTP runs.
        draft_len: Verified Vanilla: drafted tokens per cycle (default: all heads).
        audio_heads: Score MCTP heads over BOA, EOA and the audio tokens only (exact when the
            heads only emit those, as in Boost/Balance/Turbo; needs speech ids).
        stop_check_every: Look at the stop flags every this many backbone forwards.
        compile: The fast path: the backbone's decode step and every MCTP chain run on fixed
            shapes, compiled with ``torch.compile`` (CUDA graphs on CUDA).
        compile_options: Extra ``torch.compile`` keyword arguments (e.g.
            ``{"backend": "aot_eager"}``); read-only mapping.
        window: Fast path: slots per fixed-shape head run and backbone re-read, ``>= 1``.
        prefill_windows: Fast path: prompts of ``window .. prefill_windows * window`` slots are
            prefilled as that many window decodes, and head backlogs up to that many windows
            catch up in compiled windows (0: always the eager multi-token path).

    Raises:
        ValueError: On an unknown mode, a non-positive ``max_new_tokens``, ``window`` or
            ``stop_check_every``, a negative ``prefill_windows`` or stop id, ``draft_len``
            with a non-Vanilla verified schedule, sampling with ``verify``.
        TypeError: On a value of the wrong type (e.g. a float where an int is needed).
    """

    mode: str | Mode | InterleaveSchedule = "boost"
    max_new_tokens: int = 256
    text_sampling: SamplingConfig = field(default_factory=SamplingConfig)
    audio_sampling: SamplingConfig | None = None
    eos_token_id: int | Sequence[int] | None = None
    pad_id: int = 0
    verify: bool = False
    draft_len: int | None = None
    audio_heads: bool = False
    stop_check_every: int = 8
    compile: bool = False
    compile_options: Mapping[str, Any] = field(default_factory=dict, hash=False)
    window: int = 16
    prefill_windows: int = 4

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "mode", _resolve_mode(self.mode))
        for name in ("max_new_tokens", "stop_check_every", "window"):
            value = getattr(self, name)
            if not _is_int(value):
                raise TypeError(f"{name} must be an int, got {value!r}")
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if not _is_int(self.prefill_windows):
            raise TypeError(f"prefill_windows must be an int, got {self.prefill_windows!r}")
        if self.prefill_windows < 0:
            raise ValueError(f"prefill_windows must be >= 0, got {self.prefill_windows}")
        if not _is_int(self.pad_id):
            raise TypeError(f"pad_id must be an int, got {self.pad_id!r}")
        for name in ("verify", "audio_heads", "compile"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {getattr(self, name)!r}")
        for name in ("text_sampling", "audio_sampling"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, SamplingConfig):
                raise TypeError(f"{name} must be a SamplingConfig, got {type(value).__name__}")
        set_(self, "eos_token_id", _stop_ids(self.eos_token_id))
        if not isinstance(self.compile_options, Mapping):
            raise TypeError(f"compile_options must be a mapping, got {self.compile_options!r}")
        set_(self, "compile_options", MappingProxyType(dict(self.compile_options)))
        if self.draft_len is not None:
            if not _is_int(self.draft_len):
                raise TypeError(f"draft_len must be an int, got {self.draft_len!r}")
            if self.draft_len < 1:
                raise ValueError(f"draft_len must be >= 1, got {self.draft_len}")
            if not self.verify:
                raise ValueError("draft_len only applies with verify=True")
        if self.verify:
            if self.text_sampling.do_sample or self.audio_sampling_or_text.do_sample:
                raise ValueError(
                    "verified mode is lossless for greedy decoding only: set do_sample=False"
                )
            if self.draft_len is not None and self.schedule.uses_mctp:
                raise ValueError(
                    f"draft_len applies to verified Vanilla; schedule {self.schedule.ratio} "
                    "drafts its own MCTP runs"
                )

    def __reduce__(self) -> tuple[Any, tuple[dict[str, Any]]]:
        """Pickle (and deep-copy) through the constructor: the read-only mapping is rebuilt."""
        kw = {f.name: getattr(self, f.name) for f in fields(self)}
        kw["compile_options"] = dict(self.compile_options)
        return (_from_fields, (kw,))

    # ------------------------------------------------------------------ views
    @property
    def schedule(self) -> InterleaveSchedule:
        """The resolved schedule."""
        assert isinstance(self.mode, InterleaveSchedule)
        return self.mode

    @property
    def audio_sampling_or_text(self) -> SamplingConfig:
        """The audio setting, ``text_sampling`` when none was given."""
        return self.audio_sampling if self.audio_sampling is not None else self.text_sampling

    def replace(self, **changes: Any) -> GenerationConfig:
        """A copy with ``changes`` applied (validated again).

        Raises:
            ValueError, TypeError: As the constructor.
        """
        return replace(self, **changes)

    # ------------------------------------------------------------------ files
    @classmethod
    def from_pretrained(cls, folder: str | Path, **overrides: Any) -> GenerationConfig:
        """Read a model folder's ``generation_config.json`` (transformers' file).

        Understood keys: ``max_new_tokens``, ``do_sample``, ``temperature``, ``top_k``,
        ``top_p``, ``repetition_penalty`` (text sampling; temperature and top-k/p only with
        ``do_sample``, as transformers reads them), ``eos_token_id``, ``pad_token_id``
        and VITA-Audio's ``mtp_inference_mode`` (an interleave ratio). Other keys are ignored.
        ``overrides`` are applied on top (any field of this class).

        Raises:
            FileNotFoundError: If the folder has no ``generation_config.json``.
            ValueError: On invalid JSON or values (as the constructor).
        """
        path = Path(folder) / "generation_config.json"
        if not path.is_file():
            raise FileNotFoundError(f"no generation_config.json in {folder}")
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from e
        if not isinstance(raw, dict):
            raise ValueError(f"{path} must hold a JSON object")
        kw: dict[str, Any] = {}
        # transformers ignores temperature/top_k/top_p without do_sample (files often carry them)
        keys = ("do_sample", "temperature", "top_k", "top_p", "repetition_penalty")
        if not raw.get("do_sample", False):
            keys = ("do_sample", "repetition_penalty")
        sampling = {k: raw[k] for k in keys if raw.get(k) is not None}
        if sampling:
            kw["text_sampling"] = SamplingConfig(**sampling)
        if raw.get("max_new_tokens") is not None:
            kw["max_new_tokens"] = raw["max_new_tokens"]
        if raw.get("eos_token_id") is not None:
            kw["eos_token_id"] = raw["eos_token_id"]
        if raw.get("pad_token_id") is not None:
            kw["pad_id"] = raw["pad_token_id"]
        if raw.get("mtp_inference_mode") is not None:
            kw["mode"] = InterleaveSchedule.from_ratio(raw["mtp_inference_mode"])
        kw.update(overrides)
        return cls(**kw)

    def to_dict(self) -> dict[str, Any]:
        """The fields as plain Python values (schedule as its ratio, sampling as dicts)."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, InterleaveSchedule):
                value = value.name or list(value.ratio)
            elif isinstance(value, SamplingConfig):
                value = {g.name: getattr(value, g.name) for g in fields(value)}
            elif isinstance(value, Mapping):
                value = dict(value)
            elif isinstance(value, tuple):
                value = list(value)
            out[f.name] = value
        return out


def _from_fields(kw: dict[str, Any]) -> GenerationConfig:
    return GenerationConfig(**kw)


def _resolve_mode(mode: object) -> InterleaveSchedule:
    if isinstance(mode, InterleaveSchedule):
        return mode
    if not isinstance(mode, str):
        raise TypeError(
            f"mode must be a mode name, a Mode or an InterleaveSchedule, got {type(mode).__name__}"
        )
    try:
        return InterleaveSchedule.from_mode(mode)
    except ValueError as e:
        raise ValueError(
            f"unknown mode {mode!r}: use one of {[m.value for m in Mode]} or an InterleaveSchedule"
        ) from e


def _stop_ids(ids: object) -> tuple[int, ...]:
    if ids is None:
        return ()
    values = [ids] if not isinstance(ids, (list, tuple)) else list(ids)
    for v in values:
        if not _is_int(v):
            raise TypeError(f"eos_token_id must be int(s), got {ids!r}")
        if v < 0:
            raise ValueError(f"eos_token_id must be >= 0, got {ids!r}")
    return tuple(values)
