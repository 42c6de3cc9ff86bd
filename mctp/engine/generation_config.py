"""The two settings objects of the engine, each frozen and validated.

* :class:`EngineConfig`: what is fixed when an engine (a :class:`~mctp.Generator`, a
  :class:`~mctp.speech.SpeechPipeline`, a server) is built: device, cache dtype, batch
  capacity, cache length, the compiled fast path and its options, audio-only heads (they change
  compiled shapes), the compile-cache folder. Changing one means building another engine.
* :class:`GenerationConfig`: what one request may choose: mode, budget, sampling, stop ids,
  verified decoding.

Every other entry point (``generate``, ``generate_stream``, ``Generator``, ``SpeechPipeline``,
``mctp speak``/``serve``) takes these objects or keyword options whose names are their fields
(:func:`split_options`), so each option is declared once, here.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any

from mctp.interleave import InterleaveSchedule, Mode

from .sampling import SamplingConfig

__all__ = ["EngineConfig", "GenerationConfig", "split_options"]


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


@dataclass(frozen=True)
class GenerationConfig:
    """What one request chooses: schedule, length, token choice, stop ids, verification.

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

    Raises:
        ValueError: On an unknown mode, a non-positive ``max_new_tokens``, a negative stop
            id, ``draft_len`` with a non-Vanilla verified schedule, sampling with ``verify``.
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

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "mode", _resolve_mode(self.mode))
        _check_int(self, "max_new_tokens", 1)
        if not _is_int(self.pad_id):
            raise TypeError(f"pad_id must be an int, got {self.pad_id!r}")
        if not isinstance(self.verify, bool):
            raise TypeError(f"verify must be a bool, got {self.verify!r}")
        for name in ("text_sampling", "audio_sampling"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, SamplingConfig):
                raise TypeError(f"{name} must be a SamplingConfig, got {type(value).__name__}")
        set_(self, "eos_token_id", _stop_ids(self.eos_token_id))
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
