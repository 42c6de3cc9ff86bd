"""Load and save checkpoints in the official VITA-Audio layout (``model_type: qwen2_mtp``).

The official ``Qwen2MTPForCausalLM`` keeps the ``N`` MCTP decoder layers inside the
backbone's layer list: ``config.num_hidden_layers`` counts ``L + N`` layers (VITA-Audio-Boost
7B: 38 = 28 + 10), the backbone forward runs layers ``0..L-1`` and MCTP module ``i`` runs
layer ``L + i`` followed by the shared final norm and lm_head. mctp keeps the two apart: a
transformers ``Qwen2ForCausalLM`` with ``L`` layers (:class:`~mctp.backbones.HFBackbone`) and an
:class:`~mctp.MCTPStack` whose head ``i`` owns that layer. Key mapping
(:func:`convert_key` reads it left to right, :func:`to_official_key` right to left):

=====================================  =====================================  ============
official key                           mctp key                               module
=====================================  =====================================  ============
``model.embed_tokens.weight``          ``model.embed_tokens.weight``          backbone
``model.layers.{j}.*`` (``j < L``)     ``model.layers.{j}.*``                 backbone
``model.norm.weight``                  ``model.norm.weight``                  backbone
``lm_head.weight``                     ``lm_head.weight``                     backbone
``model.layers.{L+i}.*``               ``heads.{i}.block.*``                  stack
``mtp_projs.{i}.weight``               ``heads.{i}.proj.weight``              stack
``mtp_embed_norms.{i}.weight``         ``heads.{i}.embed_norm.weight``        stack
``mtp_hidden_norms.{i}.weight``        ``heads.{i}.hidden_norm.weight``       stack
``model.audio_model.*``                unchanged                              ``extra``
``model.audio_projection.*``           unchanged                              ``extra``
=====================================  =====================================  ============

Backbone keys are those of the wrapped ``Qwen2ForCausalLM`` (``backbone.model``); stack keys
are those of ``MCTPStack.state_dict()``. The VITA-Audio-Plus variant
(``model_type: qwen2_mtp_sensevoice``) adds the SenseVoice encoder and its projector; they are
returned untouched in :attr:`VitaAudioCheckpoint.extra` (see ``mctp.codecs.sensevoice`` for
modules that load them). Weights are ``model.safetensors`` or
``model-0000k-of-0000n.safetensors`` with ``model.safetensors.index.json``. Nothing is ever
downloaded.
"""

from __future__ import annotations

import fnmatch
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mctp.backbones import HFBackbone
from mctp.checkpoint import CheckpointError
from mctp.stack import MCTPHead, MCTPStack

__all__ = [
    "EXTRA_PREFIXES",
    "MODEL_TYPES",
    "VitaAudioCheckpoint",
    "convert_key",
    "load_vita_audio",
    "save_vita_audio",
    "to_official_key",
]

MODEL_TYPES: dict[str, tuple[str, str, str]] = {
    "qwen2_mtp": (
        "Qwen2MTPForCausalLM",
        "configuration_qwen2.Qwen2MTPConfig",
        "modeling_qwen2.Qwen2MTPForCausalLM",
    ),
    "qwen2_mtp_sensevoice": (
        "Qwen2MTPSenseVoiceForCausalLM",
        "configuration_qwen2.Qwen2MTPSenseVoiceConfig",
        "modeling_qwen2.Qwen2MTPSenseVoiceForCausalLM",
    ),
}
"""Official model types -> (architecture, AutoConfig class, AutoModelForCausalLM class)."""

EXTRA_PREFIXES: tuple[str, ...] = ("model.audio_model.", "model.audio_projection.")
"""Keys of the VITA-Audio-Plus audio encoder and projector (kept aside, not loaded)."""

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_SHARD = re.compile(r"^model-\d{5}-of-\d{5}\.safetensors$")

# Fields of the official config that are not transformers Qwen2Config arguments.
_MTP_FIELDS = ("num_nextn_predict_layers", "mtp_loss_weight")
_NOT_FOR_QWEN2 = ("model_type", "architectures", "auto_map", "transformers_version", *_MTP_FIELDS)
# Qwen2Config fields written to config.json as they are.
_COPIED_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_attention_heads",
    "num_key_value_heads",
    "hidden_act",
    "max_position_embeddings",
    "initializer_range",
    "rms_norm_eps",
    "use_cache",
    "tie_word_embeddings",
    "use_sliding_window",
    "sliding_window",
    "max_window_layers",
    "attention_dropout",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
)

_OFFICIAL_TO_HEAD = {
    "mtp_projs": "proj",
    "mtp_embed_norms": "embed_norm",
    "mtp_hidden_norms": "hidden_norm",
}
_HEAD_TO_OFFICIAL = {v: k for k, v in _OFFICIAL_TO_HEAD.items()}
_LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_MTP_KEY = re.compile(r"^(mtp_projs|mtp_embed_norms|mtp_hidden_norms)\.(\d+)\.(.+)$")
_HEAD_KEY = re.compile(r"^heads\.(\d+)\.([a-z_]+)\.(.+)$")


# --------------------------------------------------------------------------- key mapping
def _check_layers(num_backbone_layers: int) -> None:
    if num_backbone_layers < 1:
        raise ValueError(f"num_backbone_layers must be >= 1, got {num_backbone_layers}")


def convert_key(official_key: str, num_backbone_layers: int) -> str:
    """Map an official VITA-Audio key to its mctp key (see the table in the module docstring).

    Args:
        official_key: A key of the official checkpoint (e.g. ``model.layers.30.mlp.up_proj.weight``).
        num_backbone_layers: ``L``, the backbone's own layer count (``num_hidden_layers - N``).

    Returns:
        ``heads.{i}.*`` for MCTP tensors, the key unchanged for everything else.

    Raises:
        ValueError: If ``num_backbone_layers < 1``.
    """
    _check_layers(num_backbone_layers)
    if m := _LAYER_KEY.match(official_key):
        j = int(m.group(1))
        if j >= num_backbone_layers:
            return f"heads.{j - num_backbone_layers}.block.{m.group(2)}"
        return official_key
    if m := _MTP_KEY.match(official_key):
        return f"heads.{m.group(2)}.{_OFFICIAL_TO_HEAD[m.group(1)]}.{m.group(3)}"
    return official_key


def to_official_key(key: str, num_backbone_layers: int) -> str:
    """Inverse of :func:`convert_key`: an mctp key (backbone or stack) -> the official key.

    Args:
        key: A key of ``backbone.model.state_dict()`` or ``MCTPStack.state_dict()``.
        num_backbone_layers: ``L``.

    Returns:
        The official key.

    Raises:
        ValueError: If ``num_backbone_layers < 1``, a head key names an unknown part, or a
            backbone layer index is ``>= L`` (it would collide with the MCTP layers).
    """
    _check_layers(num_backbone_layers)
    if m := _HEAD_KEY.match(key):
        i, part, rest = int(m.group(1)), m.group(2), m.group(3)
        if part == "block":
            return f"model.layers.{num_backbone_layers + i}.{rest}"
        if part in _HEAD_TO_OFFICIAL:
            return f"{_HEAD_TO_OFFICIAL[part]}.{i}.{rest}"
        raise ValueError(
            f"{key!r}: MCTP heads hold block/proj/embed_norm/hidden_norm, not {part!r}"
        )
    if key.startswith("heads."):
        raise ValueError(f"{key!r} is not a key of an MCTP head")
    if (m := _LAYER_KEY.match(key)) and int(m.group(1)) >= num_backbone_layers:
        raise ValueError(
            f"{key!r}: backbone layer {m.group(1)} does not exist with {num_backbone_layers} "
            "backbone layers (those indices belong to the MCTP layers)"
        )
    return key


# --------------------------------------------------------------------------- reading
def _read_tensors(folder: Path, device: torch.device | str) -> dict[str, torch.Tensor]:
    """All tensors of ``model.safetensors`` or of the shards listed in the index json."""
    from safetensors.torch import load_file

    single, index = folder / SINGLE_FILE, folder / INDEX_FILE
    if single.is_file():
        return load_file(single, device=str(device))
    if not index.is_file():
        raise FileNotFoundError(f"{folder} holds neither {SINGLE_FILE} nor {INDEX_FILE}")
    weight_map = json.loads(index.read_text()).get("weight_map")
    if not isinstance(weight_map, dict):
        raise ValueError(f"{index} has no weight_map")
    tensors: dict[str, torch.Tensor] = {}
    misplaced: list[str] = []
    for name in sorted(set(weight_map.values())):
        shard = folder / name
        if not shard.is_file():
            raise FileNotFoundError(f"{INDEX_FILE} names {name}, which is not in {folder}")
        for key, value in load_file(shard, device=str(device)).items():
            if weight_map.get(key) != name:
                misplaced.append(f"{key} (in {name})")
            tensors[key] = value
    absent = set(weight_map) - set(tensors)
    if absent or misplaced:
        raise CheckpointError(f"the shards listed in {index}", absent, misplaced)
    return tensors


def _mtp_sizes(raw: Mapping[str, Any], folder: Path) -> tuple[int, int, float]:
    """``(L, N, mtp_loss_weight)`` from an official config dict."""
    model_type = raw.get("model_type")
    if model_type not in MODEL_TYPES and model_type != "qwen2":
        raise ValueError(
            f"{folder}/config.json has model_type {model_type!r}; expected one of "
            f"{[*MODEL_TYPES, 'qwen2']}"
        )
    # The official config class defaults num_nextn_predict_layers to 1.
    n = int(raw.get("num_nextn_predict_layers", 1 if model_type in MODEL_TYPES else 0))
    if "num_hidden_layers" not in raw:
        raise ValueError(f"{folder}/config.json has no num_hidden_layers")
    total = int(raw["num_hidden_layers"])
    if n < 0 or total - n < 1:
        raise ValueError(
            f"num_nextn_predict_layers ({n}) must lie in [0, num_hidden_layers - 1 = {total - 1}]"
        )
    return total - n, n, float(raw.get("mtp_loss_weight", 1.0))


def _qwen2_config(raw: Mapping[str, Any], num_layers: int, attn_implementation: str) -> Any:
    """A transformers ``Qwen2Config`` with ``num_layers`` layers from the official fields."""
    from transformers import Qwen2Config

    kwargs = {k: v for k, v in raw.items() if k not in _NOT_FOR_QWEN2}
    kwargs.pop("layer_types", None)  # recomputed for num_layers
    scaling = kwargs.pop("rope_scaling", None)  # transformers 4.48 name
    if scaling and "rope_parameters" not in kwargs:
        rope = dict(scaling)
        rope.setdefault("rope_type", rope.pop("type", "default"))
        rope["rope_theta"] = kwargs.pop("rope_theta", 10000.0)
        kwargs["rope_parameters"] = rope
    kwargs["num_hidden_layers"] = num_layers
    config = Qwen2Config(**kwargs)
    config._attn_implementation = attn_implementation
    return config


def _materialize(model: nn.Module, config: Any, device: torch.device) -> None:
    """Rebuild the rotary tables (non-persistent buffers) of a model built on ``meta``."""
    base = model.model
    base.rotary_emb = type(base.rotary_emb)(config=config).to(device)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"tensors left unloaded after loading the checkpoint: {left[:10]}")


@dataclass
class VitaAudioCheckpoint:
    """A loaded VITA-Audio checkpoint.

    Attributes:
        backbone: The LLM (``L`` layers) wrapped for mctp.
        stack: The ``N`` MCTP heads sharing the backbone's embedding, norm and lm_head, or
            None when ``N = 0`` (a Vanilla-only checkpoint).
        config: The raw ``config.json``.
        num_heads: ``N`` (``num_nextn_predict_layers``).
        mtp_loss_weight: The config's ``mtp_loss_weight``.
        extra: VITA-Audio-Plus audio encoder/projector tensors (official key names), empty
            for the GLM-4-Voice variants.
    """

    backbone: HFBackbone
    stack: MCTPStack | None
    config: dict[str, Any]
    num_heads: int
    mtp_loss_weight: float
    extra: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def num_backbone_layers(self) -> int:
        """``L``."""
        return self.backbone.num_layers


def load_vita_audio(
    path: str | Path,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    attn_implementation: str = "sdpa",
    ignore: Sequence[str] = (),
    verify: bool = True,
) -> VitaAudioCheckpoint:
    """Load an official VITA-Audio checkpoint folder into an HFBackbone and an MCTPStack.

    Modules are built on the ``meta`` device and take the checkpoint's tensors as they are
    (no random init, no second copy in memory). Every tensor must be consumed: a missing,
    unexpected or mis-shaped key raises, naming it by its official key.

    Args:
        path: Folder with ``config.json`` and the safetensors weights.
        device: Where the tensors are loaded.
        dtype: Cast floating tensors to this dtype (default: keep the checkpoint's dtypes).
        attn_implementation: Backbone attention (``"sdpa"``, ``"eager"``,
            ``"flash_attention_2"``). MCTP head blocks always use SDPA: the stack passes them
            explicit boolean masks.
        ignore: ``fnmatch`` patterns of checkpoint keys to skip (e.g. stale buffers).
        verify: Let :class:`~mctp.backbones.HFBackbone` check its forward against the
            transformers model once.

    Returns:
        :class:`VitaAudioCheckpoint`.

    Raises:
        FileNotFoundError: If ``config.json`` or the weights are missing.
        ValueError: On an unknown ``model_type``, impossible layer counts or an index json
            without ``weight_map``.
        CheckpointError: On missing, unexpected or mis-shaped keys (also between the index
            json and its shards), or an ``lm_head.weight`` that differs from the embedding
            although ``tie_word_embeddings`` is true.
        RuntimeError: If a tensor of the built model stayed unloaded (a part of the
            transformers model this loader does not know how to fill).
    """
    from transformers import Qwen2ForCausalLM
    from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer

    folder = Path(path)
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"no config.json in {folder}")
    raw: dict[str, Any] = json.loads(config_file.read_text())
    num_layers, n, loss_weight = _mtp_sizes(raw, folder)
    device = torch.device(device)
    what = f"the VITA-Audio checkpoint in {folder}"

    tensors = _read_tensors(folder, device)
    if dtype is not None:
        tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
    extra = {k: tensors.pop(k) for k in [k for k in tensors if k.startswith(EXTRA_PREFIXES)]}
    for key in [k for k in tensors if any(fnmatch.fnmatchcase(k, p) for p in ignore)]:
        del tensors[key]

    config = _qwen2_config(raw, num_layers, attn_implementation)
    head_config = _qwen2_config(raw, num_layers + n, "sdpa")
    with torch.device("meta"):
        model = Qwen2ForCausalLM(config)
        heads = [
            MCTPHead(
                block=Qwen2DecoderLayer(head_config, num_layers + i),
                hidden_size=config.hidden_size,
                rms_eps=config.rms_norm_eps,
            )
            for i in range(n)
        ]
    stack_shell = nn.ModuleDict({"heads": nn.ModuleList(heads)})  # same keys as MCTPStack

    # Expected official keys -> (target state dict, key there, shape).
    expected: dict[str, tuple[dict[str, torch.Tensor], str, tuple[int, ...]]] = {}
    backbone_sd: dict[str, torch.Tensor] = {}
    stack_sd: dict[str, torch.Tensor] = {}
    for target, module in ((backbone_sd, model), (stack_sd, stack_shell)):
        for key, value in module.state_dict().items():
            expected[to_official_key(key, num_layers)] = (target, key, tuple(value.shape))
    tied = bool(config.tie_word_embeddings)
    tied_head = None
    if tied:
        del expected["lm_head.weight"]
        tied_head = tensors.pop("lm_head.weight", None)
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    mismatched = [
        (k, tuple(tensors[k].shape), expected[k][2])
        for k in sorted(set(tensors) & set(expected))
        if tuple(tensors[k].shape) != expected[k][2]
    ]
    if missing or unexpected or mismatched:
        raise CheckpointError(what, missing, unexpected, mismatched)
    embed = tensors["model.embed_tokens.weight"]
    if tied_head is not None and not torch.equal(tied_head, embed):
        raise CheckpointError(
            f"{what} (tie_word_embeddings is true but lm_head.weight differs from "
            "model.embed_tokens.weight)",
            unexpected=["lm_head.weight"],
        )
    for key, value in tensors.items():
        target, own_key, _ = expected[key]
        target[own_key] = value

    model.load_state_dict(backbone_sd, strict=not tied, assign=True)
    if tied:
        model.tie_weights()
    _materialize(model, config, device)
    model.eval()
    backbone = HFBackbone(model, verify=verify)

    stack = None
    if n:
        stack_shell.load_state_dict(stack_sd, strict=True, assign=True)
        stack = MCTPStack.from_parts(backbone.parts(), list(stack_shell["heads"])).eval()
    return VitaAudioCheckpoint(
        backbone=backbone,
        stack=stack,
        config=raw,
        num_heads=n,
        mtp_loss_weight=loss_weight,
        extra=extra,
    )


# --------------------------------------------------------------------------- saving
_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def _parse_size(size: int | str) -> int:
    """``5_000_000_000``, ``"5GB"`` or ``"500MiB"`` -> bytes."""
    if isinstance(size, int):
        value = size
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", size)
        unit = m.group(2).upper() if m else ""
        if m is None or (unit and unit not in _UNITS):
            raise ValueError(f"shard_size {size!r} is not a size like 5GB, 500MB or 2GiB")
        value = int(float(m.group(1)) * _UNITS[unit or "B"])
    if value < 1:
        raise ValueError(f"shard_size must be positive, got {size!r}")
    return value


def _official_config(
    backbone_config: Any,
    *,
    num_layers: int,
    num_heads: int,
    mtp_loss_weight: float,
    model_type: str,
    dtype: torch.dtype,
    base: Mapping[str, Any] | None,
    folder: Path,
) -> dict[str, Any]:
    """config.json in the official layout (transformers 4.48 field names).

    ``auto_map`` is written only when the code files it names are in ``folder``: without them
    ``trust_remote_code`` loading fails, while the official package registers the model type.
    """
    import transformers

    arch, auto_config, auto_model = MODEL_TYPES[model_type]
    out: dict[str, Any] = {
        k: v
        for k, v in (base or {}).items()
        if k not in ("layer_types", "rope_parameters", "auto_map")
    }
    for name in _COPIED_FIELDS:
        out[name] = getattr(backbone_config, name, None)
    if not out["use_sliding_window"] and base and "sliding_window" in base:
        out["sliding_window"] = base["sliding_window"]  # unused; keep the stored value
    head_dim = getattr(backbone_config, "head_dim", None)
    if head_dim is not None:
        out["head_dim"] = head_dim
    rope = dict(getattr(backbone_config, "rope_parameters", None) or {})
    out["rope_theta"] = float(rope.pop("rope_theta", getattr(backbone_config, "rope_theta", 1e4)))
    out.pop("rope_scaling", None)
    if rope.get("rope_type", "default") != "default":
        out["rope_scaling"] = rope
    auto_map = {"AutoConfig": auto_config, "AutoModelForCausalLM": auto_model}
    if all((folder / f"{ref.split('.')[0]}.py").is_file() for ref in auto_map.values()):
        out["auto_map"] = auto_map
    out.update(
        model_type=model_type,
        architectures=[arch],
        num_hidden_layers=num_layers + num_heads,
        num_nextn_predict_layers=num_heads,
        mtp_loss_weight=float(mtp_loss_weight),
        torch_dtype=str(dtype).removeprefix("torch."),
        transformers_version=transformers.__version__,
    )
    return out


def _check_stack(backbone: HFBackbone, stack: MCTPStack, eps: float) -> None:
    """The heads must be Qwen2 layers sharing this backbone's parts, as the official model."""
    parts = backbone.parts()
    if stack.embed is not parts.embed or stack.lm_head is not parts.lm_head:
        raise ValueError("the stack does not share this backbone's embedding and lm_head")
    if stack.norm is not parts.norm:
        raise ValueError("the stack does not share this backbone's final norm")
    layer = {k: tuple(v.shape) for k, v in backbone.base.layers[0].state_dict().items()}
    for i, head in enumerate(stack.heads):
        block = {k: tuple(v.shape) for k, v in head.block.state_dict().items()}
        if block != layer:
            diff = sorted(set(block) ^ set(layer)) or [k for k in block if block[k] != layer[k]]
            raise ValueError(
                f"head {i}'s block is not laid out like the backbone's decoder layers "
                f"(differs in {diff[:5]}); the official format needs Qwen2 decoder layers"
            )
        for name in ("embed_norm", "hidden_norm"):
            got = getattr(head, name).eps
            if abs(got - eps) > 1e-12:
                raise ValueError(f"head {i}'s {name} has eps {got}, the config says {eps}")


def _check_mode(ratio: Sequence[int], stack: MCTPStack | None) -> list[int]:
    """``ratio`` as a list, after checking that :func:`load_vita_audio`'s users can run it."""
    from mctp.interleave import InterleaveSchedule

    try:
        schedule = InterleaveSchedule.from_ratio(ratio)
    except ValueError as err:
        raise ValueError(f"mtp_inference_mode {ratio!r}: {err}") from err
    heads = 0 if stack is None else stack.num_heads
    if schedule.max_heads > heads:
        raise ValueError(
            f"mtp_inference_mode {list(schedule.ratio)} runs {schedule.max_heads} MCTP heads in "
            f"a row but the checkpoint has {heads}; the folder would not load with that mode"
        )
    return [int(x) for x in ratio]


def save_vita_audio(
    backbone: HFBackbone,
    stack: MCTPStack | None,
    path: str | Path,
    *,
    mtp_loss_weight: float = 1.0,
    shard_size: int | str = "5GB",
    dtype: torch.dtype | None = None,
    extra: Mapping[str, torch.Tensor] | None = None,
    base_config: Mapping[str, Any] | None = None,
    mtp_inference_mode: Sequence[int] | None = None,
    tokenizer: Any | None = None,
) -> Path:
    """Write a backbone and its MCTP heads as an official VITA-Audio checkpoint folder.

    The inverse of :func:`load_vita_audio`: ``config.json`` (``model_type`` ``qwen2_mtp``, or
    ``qwen2_mtp_sensevoice`` when ``extra`` holds the Plus audio tensors;
    ``num_hidden_layers = L + N``, ``num_nextn_predict_layers``, ``mtp_loss_weight``,
    ``rope_theta``), ``generation_config.json`` (which the official scripts read) and the
    weights under the official key names, in one ``model.safetensors`` or in
    ``model-0000k-of-0000n.safetensors`` shards with ``model.safetensors.index.json``.
    Weight files of an earlier save in the same folder are removed first. The official code
    loads the folder with ``AutoModelForCausalLM`` after ``import
    vita_audio.models.qwen2_mtp_v4_48_3``, which registers the model type. ``auto_map``
    (for ``trust_remote_code=True``) is written only when the official
    ``configuration_qwen2.py`` and ``modeling_qwen2.py`` are already in ``path``: mctp does
    not ship them, and an ``auto_map`` naming absent files makes the folder unloadable.

    Args:
        backbone: A :class:`~mctp.backbones.HFBackbone` around a transformers Qwen2 model.
        stack: Its MCTP heads (Qwen2 decoder-layer blocks), or None for ``N = 0``.
        path: Output folder (created).
        mtp_loss_weight: Stored in the config (the official training loss weight).
        shard_size: Largest shard in bytes (``int``) or as ``"5GB"``/``"500MB"``/``"2GiB"``.
        dtype: Cast floating tensors to this dtype (default: as they are).
        extra: VITA-Audio-Plus audio encoder/projector tensors, official key names.
        base_config: Config fields to keep (e.g. ``VitaAudioCheckpoint.config``); fields
            derived from the modules override them.
        mtp_inference_mode: Official generation schedule written to generation_config.json
            (e.g. ``[1, 10, 4, 10]`` for Boost, ``[8192, 0]`` for Vanilla; the official
            default, when absent, is ``[1, N]``). Checked against the number of heads.
        tokenizer: Saved into the folder with ``save_pretrained`` when given.

    Returns:
        The folder.

    Raises:
        ValueError: If the backbone is not a Qwen2 model, the stack does not belong to it or
            its heads are not Qwen2 decoder layers, ``extra`` has foreign keys,
            ``shard_size`` cannot be read, or ``mtp_inference_mode`` is not a valid ratio or
            needs more MCTP heads than ``stack`` has (checked before anything is written).
    """
    from safetensors.torch import save_file

    config = backbone.config
    if getattr(config, "model_type", None) != "qwen2":
        raise ValueError(
            f"the official format holds Qwen2 backbones, got model_type "
            f"{getattr(config, 'model_type', None)!r}"
        )
    limit = _parse_size(shard_size)
    extra = dict(extra or {})
    foreign = sorted(k for k in extra if not k.startswith(EXTRA_PREFIXES))
    if foreign:
        raise ValueError(f"extra tensors must start with {EXTRA_PREFIXES}, got {foreign[:5]}")
    num_layers = backbone.num_layers
    if stack is not None:
        _check_stack(backbone, stack, float(config.rms_norm_eps))
    mode = None if mtp_inference_mode is None else _check_mode(mtp_inference_mode, stack)

    tensors: dict[str, torch.Tensor] = {}
    sources: list[Mapping[str, torch.Tensor]] = [backbone.model.state_dict()]
    if stack is not None:
        sources.append(stack.state_dict())
    for state in sources:
        for key, value in state.items():
            tensors[to_official_key(key, num_layers)] = value
    if config.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)  # tied: the official model re-ties it on load
    tensors.update(extra)
    tensors = {
        k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).detach().contiguous()
        for k, v in tensors.items()
    }

    shards: list[dict[str, torch.Tensor]] = [{}]
    used = 0
    for key, value in tensors.items():
        size = value.numel() * value.element_size()
        if shards[-1] and used + size > limit:
            shards.append({})
            used = 0
        shards[-1][key] = value
        used += size

    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.iterdir():
        if old.name in (SINGLE_FILE, INDEX_FILE) or _SHARD.match(old.name):
            old.unlink()
    metadata = {"format": "pt"}  # transformers refuses safetensors files without it
    if len(shards) == 1:
        save_file(shards[0], folder / SINGLE_FILE, metadata=metadata)
    else:
        weight_map: dict[str, str] = {}
        for i, shard in enumerate(shards, start=1):
            name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, folder / name, metadata=metadata)
            weight_map.update(dict.fromkeys(shard, name))
        total = sum(v.numel() * v.element_size() for v in tensors.values())
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (folder / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")

    num_heads = 0 if stack is None else stack.num_heads
    model_type = "qwen2_mtp_sensevoice" if extra else "qwen2_mtp"
    official = _official_config(
        config,
        num_layers=num_layers,
        num_heads=num_heads,
        mtp_loss_weight=mtp_loss_weight,
        model_type=model_type,
        dtype=tensors["model.embed_tokens.weight"].dtype,
        base=base_config,
        folder=folder,
    )
    (folder / "config.json").write_text(json.dumps(official, indent=2) + "\n")
    generation = {k: getattr(config, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    generation = {k: v for k, v in generation.items() if v is not None}
    if mode is not None:
        generation["mtp_inference_mode"] = mode
    (folder / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return folder
