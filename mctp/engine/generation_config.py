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

__all__ = ["EngineConfig", "GenerationConfig", "slots_needed", "split_options"]


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


_DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
           "float16": "float16", "fp16": "float16"}  # fmt: skip


@dataclass(frozen=True)
class EngineConfig:
    """What is fixed when an engine is built (vLLM's engine arguments; a request never changes
    these). Validated at construction; change a field with :meth:`replace`.

    Attributes:
        device: Where buffers (and, in builders, the model) live; None = the backbone's device.
        dtype: ``"float32"``, ``"bfloat16"`` or ``"float16"`` (or a ``torch.dtype``): the cache
            dtype of a :class:`~mctp.Generator` (its backbone keeps its own weights), the model
            dtype in builders (``mctp speak/serve --dtype``); None = the backbone's.
        max_batch: Rows an engine runs together (its batch capacity). A call with fewer rows
            runs only its own rows on the eager path; the compiled path runs the row counts
            it compiled (regions: 1 row for a lone request, else all ``max_batch``; whole
            graphs: always all), padding with stopped copies.
        max_len: Cache slots per row: prompt + new tokens + the slack of a chain or draft.
        compile: The fast path: the backbone's decode step and every MCTP chain run on fixed
            shapes, compiled with ``torch.compile`` (CUDA graphs on CUDA).
        compile_options: Extra ``torch.compile`` keyword arguments (e.g.
            ``{"backend": "aot_eager"}``); stored read-only.
        compile_cache: A folder for compiled artifacts: loaded when the engine is built, written
            after its warm-up, so a second process skips compiling. None = torch's defaults.
        window: Fast path: slots per fixed-shape head run and backbone re-read, ``>= 1``.
        prefill_windows: Fast path: prompts of ``window .. prefill_windows * window`` slots are
            prefilled as that many window decodes, and head backlogs up to that many windows
            catch up in compiled windows (0: always the eager multi-token path).
        pack_weights: Fast path, Inductor on CPU: matrix products read one packed copy of each
            weight shared by every compiled graph (no frozen copies per graph); None = on for
            bf16 on CPU, False = off, True = required (an error where it cannot apply).
        compile_regions: Fast path: regional compilation, one compiled graph per kind of
            decoder layer and of MCTP head shared by all of them (plus compiled logits), instead
            of whole graphs with every layer and head unrolled: seconds of warm-up instead of
            minutes, the packed weights shared as before; None = on on CPU where the backbone
            supports it, off on CUDA (CUDA graphs want whole steps), True = required.
        audio_heads: MCTP heads score BOA, EOA and the audio tokens only (exact when the heads
            only emit those, as in Boost/Balance/Turbo; needs speech ids). It changes the
            heads' output shape, so it is fixed per engine.
        stop_check_every: Look at the stop flags every this many backbone forwards (one host
            read each time).
        join_heads_alone: How the MCTP heads read the prompt of a request that joins a running
            batch: True = for its row alone, in a pass of their own at the join (the other
            rows' heads go on from where they stood: saves compute, costs one call per head);
            False = every row's heads re-read from the new prompt's first slot in their next
            chain (no extra calls; each row recomputes those slots). None = alone where the
            heads are at least 512 wide (products dominate), else re-read (calls dominate).
        join_room: A batch of concurrent requests (:class:`~mctp.engine.batching.Cohort`, the
            server's batches) starts its prompts at least this many slots into the cache, as
            left padding that is never computed, so that a request whose prompt is up to this
            long can join it at its next join point instead of waiting for the sequence to
            grow (a joining prompt is written just before the cursor). It costs cache slots
            (at most this many, and at most half of what ``max_len`` leaves after an answer's
            budget), no compute: attention skips them (the eager path, and compiled regions
            with a symbolic slot dimension, the CPU default). Whole compiled graphs (CUDA),
            whose attention reads every slot from the first, start without room. 0: no room.

    Raises:
        ValueError: On a non-positive ``max_batch``, ``max_len`` (< 2), ``window`` or
            ``stop_check_every``, a negative ``prefill_windows`` or ``join_room``, or an
            unknown dtype.
        TypeError: On a value of the wrong type.
    """

    device: str | None = None
    dtype: str | None = None
    max_batch: int = 1
    max_len: int = 2048
    compile: bool = False
    compile_options: Mapping[str, Any] = field(default_factory=dict, hash=False)
    compile_cache: str | None = None
    window: int = 16
    prefill_windows: int = 4
    pack_weights: bool | None = None
    compile_regions: bool | None = None
    audio_heads: bool = False
    stop_check_every: int = 8
    join_heads_alone: bool | None = None
    join_room: int = 256

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        for name, low in (("max_batch", 1), ("max_len", 2), ("window", 1)):
            _check_int(self, name, low)
        _check_int(self, "stop_check_every", 1)
        _check_int(self, "prefill_windows", 0)
        _check_int(self, "join_room", 0)
        for name in ("compile", "audio_heads"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {getattr(self, name)!r}")
        for name in ("pack_weights", "compile_regions", "join_heads_alone"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, bool):
                raise TypeError(f"{name} must be a bool or None, got {value!r}")
        if not isinstance(self.compile_options, Mapping):
            raise TypeError(f"compile_options must be a mapping, got {self.compile_options!r}")
        set_(self, "compile_options", MappingProxyType(dict(self.compile_options)))
        if self.dtype is not None:
            name = str(self.dtype).removeprefix("torch.")
            if name not in _DTYPES:
                raise ValueError(
                    f"dtype must be one of {sorted(set(_DTYPES.values()))}, got {self.dtype!r}"
                )
            set_(self, "dtype", _DTYPES[name])
        if self.device is not None:
            import torch

            if isinstance(self.device, torch.device):
                set_(self, "device", str(self.device))
            if not isinstance(self.device, str):
                raise TypeError(f"device must be a string, got {self.device!r}")
            try:
                torch.device(self.device)
            except RuntimeError as e:
                raise ValueError(f"device {self.device!r} is not a torch device: {e}") from e
        if self.compile_cache is not None:
            set_(self, "compile_cache", str(self.compile_cache))

    def __reduce__(self) -> tuple[Any, tuple[dict[str, Any]]]:
        """Pickle (and deep-copy) through the constructor: the read-only mapping is rebuilt."""
        kw = {f.name: getattr(self, f.name) for f in fields(self)}
        kw["compile_options"] = dict(self.compile_options)
        return (_engine_from_fields, (kw,))

    @property
    def torch_dtype(self) -> Any:
        """``dtype`` as a ``torch.dtype`` (None when unset)."""
        import torch

        return None if self.dtype is None else getattr(torch, self.dtype)

    def replace(self, **changes: Any) -> EngineConfig:
        """A copy with ``changes`` applied (validated again).

        Raises:
            ValueError, TypeError: As the constructor.
        """
        return replace(self, **changes)


def _engine_from_fields(kw: dict[str, Any]) -> EngineConfig:
    return EngineConfig(**kw)


def _check_int(obj: object, name: str, low: int) -> None:
    value = getattr(obj, name)
    if not _is_int(value):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")


ENGINE_FIELDS = frozenset(f.name for f in fields(EngineConfig))


def split_options(
    options: Mapping[str, Any],
    *,
    engine: EngineConfig | None = None,
    config: GenerationConfig | None = None,
) -> tuple[EngineConfig, GenerationConfig]:
    """Keyword options to the two settings objects, by field name (the one mapping used by
    ``generate``, ``generate_stream`` and ``Generator``).

    Args:
        options: Field names of :class:`EngineConfig` or :class:`GenerationConfig` and values
            (``compile`` may be a mapping: the fast path with those ``torch.compile`` options).
        engine: Settings the engine options are applied on (default: ``EngineConfig()``).
        config: Settings the request options are applied on (default: ``GenerationConfig()``).

    Returns:
        ``(engine settings, request settings)``.

    Raises:
        TypeError: On a name that is a field of neither (the message names it) or a value of
            the wrong type.
        ValueError: As the two constructors.
    """
    request_fields = {f.name for f in fields(GenerationConfig)}
    unknown = sorted(set(options) - ENGINE_FIELDS - request_fields)
    if unknown:
        raise TypeError(
            f"unknown generation option(s) {unknown}: engine settings are "
            f"{sorted(ENGINE_FIELDS)}, request settings {sorted(request_fields)}"
        )
    eng = {k: v for k, v in options.items() if k in ENGINE_FIELDS}
    if isinstance(eng.get("compile"), Mapping):  # compile={...}: on, with these options
        eng["compile_options"] = {**eng.get("compile_options", {}), **eng["compile"]}
        eng["compile"] = True
    req = {k: v for k, v in options.items() if k in request_fields}
    engine = EngineConfig(**eng) if engine is None else engine.replace(**eng)
    config = GenerationConfig(**req) if config is None else config.replace(**req)
    return engine, config


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


def slots_needed(
    config: GenerationConfig,
    prompt_len: int,
    max_new_tokens: int,
    num_heads: int,
    engine: EngineConfig | None = None,
) -> int:
    """Cache slots a call needs: prompt + new tokens + what a chain or draft may overshoot
    (``num_heads``: the stack's, the default draft of verified Vanilla; fixed chains of the
    compiled path run whole MCTP runs)."""
    over = 0
    if config.verify:
        sched = config.schedule
        over = sched.max_heads if sched.uses_mctp else config.draft_len or num_heads
    if engine is not None and engine.compile:
        over = max(over, config.schedule.max_heads)
    return prompt_len + max_new_tokens + over + 1
