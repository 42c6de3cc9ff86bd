"""``mctp export vllm``: write MCTP heads as a vLLM drafter folder (no vLLM needed here).

The folder holds ``config.json`` (``model_type: "mtp"``, ``architectures:
["MCTPDrafterForCausalLM"]``, ``num_nextn_predict_layers`` = number of heads, the backbone's
attention/MLP/RoPE fields and ``mctp_family``) and ``model.safetensors`` with the heads under
:class:`~mctp.MCTPStack` key names (``heads.{i}.proj.weight``, ``heads.{i}.embed_norm.weight``,
``heads.{i}.hidden_norm.weight``, ``heads.{i}.block.<decoder layer keys>``) plus the backbone's
final norm as ``norm.weight`` (the heads share it; vLLM's proposer shares only the embedding
and the lm_head with a drafter).

Heads come from an :meth:`MCTPStack.save_pretrained` folder (``mctp_config.json``) or from an
official VITA-Audio folder (``model_type: qwen2_mtp``: layers ``L..L+N-1`` and ``mtp_*`` keys).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch

__all__ = ["FAMILIES", "DrafterExportError", "export_drafter", "read_folder_tensors"]

FAMILIES: dict[str, str] = {
    "qwen2": "transformers.models.qwen2.modeling_qwen2.Qwen2DecoderLayer",
    "llama": "transformers.models.llama.modeling_llama.LlamaDecoderLayer",
}
"""Backbone families the drafter can map -> the head block class they need."""

_OFFICIAL_TYPES = ("qwen2_mtp", "qwen2_mtp_sensevoice")
_MTP = re.compile(r"^(mtp_projs|mtp_embed_norms|mtp_hidden_norms)\.(\d+)\.weight$")
_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_HEAD_PARTS = {
    "mtp_projs": "proj",
    "mtp_embed_norms": "embed_norm",
    "mtp_hidden_norms": "hidden_norm",
}
# Config fields that describe the checkpoint rather than one decoder layer.
_DROP = (
    "auto_map",
    "architectures",
    "model_type",
    "num_hidden_layers",
    "transformers_version",
    "mtp_loss_weight",
    "num_nextn_predict_layers",
    "layer_types",
    "max_window_layers",
)


class DrafterExportError(ValueError):
    """The heads cannot be served by the vLLM drafter for this backbone (the message says why)."""


def read_folder_tensors(folder: Path, keep: Any = None) -> dict[str, torch.Tensor]:
    """Tensors of every ``*.safetensors`` file in ``folder`` (optionally only keys ``keep(k)``).

    Raises:
        FileNotFoundError: If the folder has no safetensors file.
    """
    from safetensors import safe_open

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in {folder}")
    out: dict[str, torch.Tensor] = {}
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                if keep is None or keep(key):
                    out[key] = f.get_tensor(key)
    return out


def _config(folder: Path) -> dict[str, Any]:
    file = folder / "config.json"
    if not file.is_file():
        raise FileNotFoundError(f"no config.json in {folder}")
    return json.loads(file.read_text())


def _family(model_type: str | None, where: Path) -> str:
    if model_type in _OFFICIAL_TYPES:
        return "qwen2"
    if model_type not in FAMILIES:
        raise DrafterExportError(
            f"the backbone in {where} has model_type {model_type!r}; the vLLM drafter maps "
            f"MCTP heads of {sorted(FAMILIES)} backbones (and official VITA-Audio folders)"
        )
    return str(model_type)


def _heads_from_stack(folder: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    cfg = json.loads((folder / "mctp_config.json").read_text())
    if cfg.get("format") != "mctp-stack":
        raise DrafterExportError(f"{folder / 'mctp_config.json'} is not an MCTP stack config")
    if cfg.get("output_vocab") is not None:
        raise DrafterExportError(
            f"the heads in {folder} score a restricted output vocabulary "
            f"({len(cfg['output_vocab'])} ids); vLLM's proposer samples drafts over the "
            "target's full lm_head: export a stack trained with the full vocabulary"
        )
    tensors = read_folder_tensors(folder)
    return tensors, {
        "num_heads": int(cfg["num_heads"]),
        "hidden_size": int(cfg["hidden_size"]),
        "vocab_size": int(cfg["vocab_size"]),
        "rms_eps": float(cfg["rms_eps"]),
        "block_class": str(cfg.get("block_class", "")),
    }


def _heads_from_official(
    folder: Path, raw: dict[str, Any]
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    n = int(raw.get("num_nextn_predict_layers") or 0)
    if n < 1:
        raise DrafterExportError(f"the VITA-Audio folder {folder} has no MCTP heads")
    num_layers = int(raw["num_hidden_layers"]) - n

    def is_head(key: str) -> bool:
        m = _LAYER.match(key)
        return bool(_MTP.match(key)) or (m is not None and int(m.group(1)) >= num_layers)

    tensors: dict[str, torch.Tensor] = {}
    for key, value in read_folder_tensors(folder, is_head).items():
        if m := _MTP.match(key):
            tensors[f"heads.{m.group(2)}.{_HEAD_PARTS[m.group(1)]}.weight"] = value
        elif m := _LAYER.match(key):
            tensors[f"heads.{int(m.group(1)) - num_layers}.block.{m.group(2)}"] = value
    return tensors, {
        "num_heads": n,
        "hidden_size": int(raw["hidden_size"]),
        "vocab_size": int(raw["vocab_size"]),
        "rms_eps": float(raw.get("rms_norm_eps", 1e-6)),
        "block_class": FAMILIES["qwen2"],
    }


def _check_shapes(tensors: dict[str, torch.Tensor], cfg: dict[str, Any], n: int) -> None:
    """Every head must hold one decoder layer shaped like the backbone's."""
    h = int(cfg["hidden_size"])
    heads = int(cfg["num_attention_heads"])
    kv = int(cfg.get("num_key_value_heads") or heads)
    hd = int(cfg.get("head_dim") or h // heads)
    inter = int(cfg["intermediate_size"])
    want = {
        "proj.weight": (h, 2 * h),
        "embed_norm.weight": (h,),
        "hidden_norm.weight": (h,),
        "block.self_attn.q_proj.weight": (heads * hd, h),
        "block.self_attn.k_proj.weight": (kv * hd, h),
        "block.self_attn.v_proj.weight": (kv * hd, h),
        "block.self_attn.o_proj.weight": (h, heads * hd),
        "block.mlp.gate_proj.weight": (inter, h),
        "block.mlp.up_proj.weight": (inter, h),
        "block.mlp.down_proj.weight": (h, inter),
        "block.input_layernorm.weight": (h,),
        "block.post_attention_layernorm.weight": (h,),
    }
    for i in range(n):
        for part, shape in want.items():
            key = f"heads.{i}.{part}"
            if key not in tensors:
                raise DrafterExportError(f"head {i} lacks {part} (key {key})")
            if tuple(tensors[key].shape) != shape:
                raise DrafterExportError(
                    f"{key} is {tuple(tensors[key].shape)}, the backbone needs {shape}"
                )
    extra = sorted(k for k in tensors if not k.startswith("heads.") or int(k.split(".")[1]) >= n)
    if extra:
        raise DrafterExportError(f"unexpected tensors in the heads: {extra[:5]}")


def export_drafter(
    heads: str | Path,
    out: str | Path,
    *,
    backbone: str | Path | None = None,
    num_heads: int | None = None,
) -> Path:
    """Write MCTP heads as a folder vLLM loads as an ``mtp`` drafter.

    Args:
        heads: An :meth:`mctp.MCTPStack.save_pretrained` folder or an official VITA-Audio folder.
        out: Output folder (created).
        backbone: The target model's folder (a transformers Qwen2 or Llama folder, or the
            VITA-Audio folder). Default: ``heads`` when it is a VITA-Audio folder.
        num_heads: Export only the first heads (default all).

    Returns:
        The output folder.

    Raises:
        FileNotFoundError: If a config or the weights are missing.
        DrafterExportError: If the heads' hidden size, vocabulary, head count or layer shapes do
            not fit the backbone, or the backbone family cannot be mapped.
    """
    from safetensors.torch import save_file

    heads_dir = Path(heads)
    official = not (heads_dir / "mctp_config.json").is_file()
    if official:
        raw = _config(heads_dir)
        if raw.get("model_type") not in _OFFICIAL_TYPES:
            raise DrafterExportError(
                f"{heads_dir} is neither an MCTP stack folder (mctp_config.json) nor an "
                f"official VITA-Audio folder (model_type {raw.get('model_type')!r})"
            )
        tensors, info = _heads_from_official(heads_dir, raw)
    else:
        tensors, info = _heads_from_stack(heads_dir)
    if backbone is None:
        if not official:
            raise DrafterExportError("pass the backbone folder (--backbone) for MCTPStack heads")
        backbone = heads_dir
    bb_dir = Path(backbone)
    bb = _config(bb_dir)
    family = _family(bb.get("model_type"), bb_dir)
    if not official and info["block_class"] != FAMILIES[family]:
        raise DrafterExportError(
            f"the heads' blocks are {info['block_class'] or 'unknown'}; a {family} backbone "
            f"needs {FAMILIES[family]} blocks (heads built by HFBackbone's fast path)"
        )
    bb_layers = int(bb["num_hidden_layers"]) - int(bb.get("num_nextn_predict_layers") or 0)
    for name in ("hidden_size", "vocab_size"):
        if info[name] != int(bb[name]):
            raise DrafterExportError(
                f"the heads have {name} {info[name]}, the backbone in {bb_dir} has {bb[name]}"
            )
    n = info["num_heads"] if num_heads is None else num_heads
    if not 1 <= n <= info["num_heads"]:
        raise DrafterExportError(f"num_heads must be in [1, {info['num_heads']}], got {n}")
    tensors = {k: v for k, v in tensors.items() if int(k.split(".")[1]) < n}
    _check_shapes(tensors, bb, n)
    norm = read_folder_tensors(bb_dir, lambda k: k == "model.norm.weight").get("model.norm.weight")
    if norm is None:
        raise DrafterExportError(f"the backbone in {bb_dir} has no model.norm.weight")
    tensors["norm.weight"] = norm

    config = {k: v for k, v in bb.items() if k not in _DROP}
    config.update(
        model_type="mtp",
        architectures=["MCTPDrafterForCausalLM"],
        num_nextn_predict_layers=n,
        num_hidden_layers=n,
        mctp_family=family,
        mctp_head_rms_eps=info["rms_eps"],
        mctp_backbone_layers=bb_layers,
        tie_word_embeddings=False,
    )
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("*.safetensors"):
        old.unlink()
    tensors = {k: v.contiguous() for k, v in sorted(tensors.items())}
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return folder


def cli_export(args: Any) -> int:
    """``mctp export vllm --heads DIR [--backbone DIR] --out DIR [--num-heads N]``.

    Returns:
        0 after writing the folder (its path is printed).

    Raises:
        DrafterExportError, FileNotFoundError: As :func:`export_drafter`.
    """
    folder = export_drafter(args.heads, args.out, backbone=args.backbone, num_heads=args.num_heads)
    print(f"wrote the vLLM drafter folder {folder}")
    return 0
