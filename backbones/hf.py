"""``HFBackbone``: any transformers decoder-only causal LM as an MCTP backbone.

Two paths, each a class, chosen at construction (:func:`choose_backbone`, which is what
``HFBackbone(model, path=...)`` calls) and named by the read-only ``backbone.path``:

* :class:`FastHFBackbone` (``"fast"``) for models laid out like Llama (``embed_tokens / layers /
  norm / rotary_emb``: Llama, Qwen2/2.5/3, Mistral, Mixtral, Gemma 1-3, Phi3, OLMo2, ...). The
  wrapper drives the model's own modules in a loop of its own, handing every layer a
  pre-allocated :class:`~mctp.engine.cache.KVCache` and masks built from tensors (static
  shapes, the same loop on CPU and GPU, capturable in CUDA graphs). Sliding-window and hybrid
  local/global layers get their window as a mask over cache slots; families with
  per-layer-type rotary tables (Gemma3) get the table of each layer's type.
* :class:`~mctp.backbones.generic.GenericHFBackbone` (``"generic"``) for every other causal LM
  (GPT-2, GPT-NeoX, Falcon, Phi, ...) or whenever the fast loop does not reproduce the model:
  the model's own forward with transformers' ``DynamicCache`` (cropped for rollback). Exact,
  slower. MCTP heads on this path are Llama-style :class:`~mctp.layers.DecoderBlock` s of the
  model's width.

A self-check at construction compares both training and cached forwards with the model's own
forward on a left-padded batch longer than every sliding window (windows are narrowed for the
check); a model neither path reproduces raises :class:`NotImplementedError` naming the family.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from mctp.compat import call_block
from mctp.engine.cache import KVCache
from mctp.engine.masks import decode_mask, segment_ids, segment_mask
from mctp.stack import BackboneParts

from .attention import layer_types, layer_windows, rotary_takes_layer_type
from .base import (
    DEFAULT_PREFILL_CHUNK,
    BackboneOutput,
    HFBackbone,
    structural_blockers,
)
from .generic import GenericHFBackbone

if TYPE_CHECKING:
    from mctp.engine.regions import BlockRegions

__all__ = [
    "DEFAULT_PREFILL_CHUNK",
    "BackboneOutput",
    "FastHFBackbone",
    "GenericHFBackbone",
    "HFBackbone",
    "choose_backbone",
]

log = logging.getLogger(__name__)

_PATHS = ("auto", "fast", "generic")


def choose_backbone(
    model: nn.Module,
    *,
    verify: bool = True,
    path: str = "auto",
    prefill_chunk: int | None = DEFAULT_PREFILL_CHUNK,
) -> HFBackbone:
    """The backbone of the path that runs ``model`` (what ``HFBackbone(...)`` returns).

    Args:
        model: The causal LM (a ``PreTrainedModel`` with ``get_output_embeddings()``). It stays
            the owner of its parameters.
        verify: Compare training and cached forwards with ``model(...)`` once (a left-padded
            batch past every sliding window) and fall back from the fast to the generic path,
            or raise, if they differ.
        path: ``"auto"`` (fast when the model is laid out like Llama and the self-check
            passes, else generic with a logged warning), ``"fast"`` or ``"generic"``
            (forced: raise instead of falling back).
        prefill_chunk: Most slots one cached forward processes at once (longer prefills run
            in chunks, bounding attention memory to ``prefill_chunk x`` the sequence); None
            never chunks.

    Returns:
        A :class:`FastHFBackbone` or a :class:`~mctp.backbones.generic.GenericHFBackbone`.

    Raises:
        ValueError: On an unknown ``path`` or a bad ``prefill_chunk``.
        NotImplementedError: If the model has no output embeddings, ``path="fast"`` is asked
            of a model the fast loop cannot run, or neither path reproduces the model.
    """
    if path not in _PATHS:
        raise ValueError(f"path must be one of {_PATHS}, got {path!r}")
    prefix = getattr(model, "base_model_prefix", "model")
    base = getattr(model, prefix, None) or model.base_model
    blockers = structural_blockers(base, model.config)
    family = type(model).__name__
    if path == "fast" and blockers:
        raise NotImplementedError(f"{family} cannot run on the fast path: {'; '.join(blockers)}")
    if path == "generic" or blockers:
        return GenericHFBackbone(model, verify=verify, prefill_chunk=prefill_chunk)
    fast = FastHFBackbone(model, verify=False, prefill_chunk=prefill_chunk)
    if not verify:
        return fast
    if path == "fast":
        fast._require_reproduction()
        return fast
    err = fast.self_check()
    if err is None:
        return fast
    log.warning("%s: fast loop differs (%s); using the generic path", family, err)
    generic = GenericHFBackbone(model, verify=False, prefill_chunk=prefill_chunk)
    generic.fast_path_blockers = [f"self-check: {err}"]
    again = generic.self_check()
    if again is not None:
        raise NotImplementedError(
            f"{family}: neither the fast loop (self-check: {err}) nor the model's own forward "
            f"through HFBackbone reproduces model(...) ({again})"
        )
    return generic


class _TypedRotary(nn.Module):
    """``(x, position_ids) -> (cos, sin)`` of one layer type of a per-type rotary module."""

    def __init__(self, rotary: nn.Module, layer_type: str) -> None:
        super().__init__()
        self.rotary, self.layer_type = rotary, layer_type

    def forward(
        self, x: torch.Tensor, position_ids: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.rotary(x, position_ids, self.layer_type)


class FastHFBackbone(HFBackbone):
    """The fast path: a Llama-layout model's own layers in the wrapper's loop over a static
    :class:`~mctp.engine.cache.KVCache` (see the module docstring).

    Args:
        model: A causal LM laid out like Llama.
        verify: Run the self-check now and raise if the loop does not reproduce the model.
        prefill_chunk: As :func:`choose_backbone`.

    Raises:
        NotImplementedError: If the model is not laid out for the loop, has no output
            embeddings, or (``verify``) the loop does not reproduce it.
        ValueError: On a bad ``prefill_chunk``.
    """

    PATH = "fast"
    supports_regions = True
    supports_key_start = True

    def __init__(
        self,
        model: nn.Module,
        *,
        verify: bool = True,
        prefill_chunk: int | None = DEFAULT_PREFILL_CHUNK,
    ) -> None:
        super().__init__(model, prefill_chunk=prefill_chunk)
        blockers = structural_blockers(self.base, self.config)
        if blockers:
            raise NotImplementedError(
                f"{self.family} cannot run on the fast path: {'; '.join(blockers)}"
            )
        self._kv_layout: tuple[list[int], list[int], list[int]] | None = None
        self._reread_attention()
        if verify:
            self._require_reproduction()

    def _reread_attention(self) -> None:
        self._types = layer_types(self.config, len(self.base.layers))
        self._windows = layer_windows(self.config, self.base.layers)
        self._typed_rotary = rotary_takes_layer_type(self.base.rotary_emb)

    def _has_windows(self) -> bool:
        return any(self._windows) or super()._has_windows()

    @property
    def windows(self) -> list[int | None]:
        """Per-layer sliding windows of the fast loop (None: full attention)."""
        return list(self._windows)

    # ------------------------------------------------------------------ parts
    def parts(self) -> BackboneParts:
        """The modules MCTP heads share with this backbone: its embedding, final norm,
        lm_head, rotary table (of the last layer's type) and last layer."""
        norm = self.base.norm
        rotary: Any = self.base.rotary_emb
        if self._typed_rotary:
            rotary = _TypedRotary(rotary, self._types[-1])
        return BackboneParts(
            embed=self.base.embed_tokens,
            norm=norm,
            lm_head=self.lm_head,
            rotary=rotary,
            last_block=self.base.layers[-1],
            hidden_size=self.hidden_size,
            rms_eps=float(getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6))),
        )

    def block_factory(self, *, copy_last: bool = True) -> Callable[[int], nn.Module]:
        """A factory of decoder blocks for :class:`~mctp.stack.MCTPStack`.

        Args:
            copy_last: Deep-copy the last layer (the paper's init); False builds a freshly
                initialised layer of the same class from the config.
        """
        last = self.base.layers[-1]
        if copy_last:
            return lambda _i: copy.deepcopy(last)
        cls = type(last)
        n = self.num_layers
        dtype = next(last.parameters()).dtype

        def fresh(_i: int) -> nn.Module:
            layer = cls(self.config, n - 1)
            if hasattr(self.model, "_init_weights"):
                layer.apply(self.model._init_weights)
            return layer.to(dtype=dtype)

        return fresh

    # ------------------------------------------------------------------ the loop
    def _layers(
        self,
        x: torch.Tensor,
        masks: Callable[[int | None], Any],
        position_ids: torch.Tensor,
        cache: KVCache | None,
        regions: BlockRegions | None = None,
    ) -> torch.Tensor:
        """Every layer with the mask of its window and the rotary of its type, then the norm;
        through ``regions`` (compiled graphs shared by equal layers) where the cache allows."""
        built: dict[int | None, Any] = {}
        ropes: dict[str | None, tuple[torch.Tensor, torch.Tensor]] = {}
        for i, layer in enumerate(self.base.layers):
            w = self._windows[i]
            if w not in built:
                built[w] = masks(w)
            key = self._types[i] if self._typed_rotary else None
            if key not in ropes:
                args = (key,) if self._typed_rotary else ()
                ropes[key] = self.base.rotary_emb(x, position_ids, *args)
            buffers = None if regions is None or cache is None else cache.layer(i)
            if buffers is not None:
                assert regions is not None
                keys, values, slots = buffers
                x = regions.block(
                    layer,
                    x,
                    attention_mask=built[w],
                    position_ids=position_ids,
                    position_embeddings=ropes[key],
                    keys=keys,
                    values=values,
                    slots=slots,
                )
                continue
            x = call_block(
                layer,
                x,
                attention_mask=built[w],
                position_ids=position_ids,
                position_embeddings=ropes[key],
                cache=cache,
            )
        return self.base.norm(x)

    def _hidden(
        self,
        x: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        *,
        flash: bool,
    ) -> torch.Tensor:
        if flash:  # packed samples are told apart by the position ids
            return self._layers(x, lambda _w: None, position_ids, None)
        segments = segment_ids(position_ids, attention_mask)
        return self._layers(
            x, lambda w: self._mask(segment_mask(segments, w), x.dtype), position_ids, None
        )

    # ------------------------------------------------------------------ cached decode
    def new_cache(self, batch_size: int, max_len: int) -> KVCache:
        """An empty :class:`~mctp.engine.cache.KVCache` (buffers allocated on first use)."""
        return KVCache(self.num_layers, batch_size, max_len)

    def _probe_kv_layout(self) -> tuple[list[int], list[int], list[int]]:
        """Per-layer (kv heads, key head dim, value head dim), from one 1-token forward."""
        if self._kv_layout is None:
            probe = KVCache(self.num_layers, 1, 1)  # allocates itself on the first write
            device = self.lm_head.weight.device
            with torch.no_grad():
                x = self.base.embed_tokens(torch.zeros(1, 1, dtype=torch.long, device=device))
                idx = torch.zeros(1, dtype=torch.long, device=device)
                valid = torch.ones(1, 1, dtype=torch.bool, device=device)
                self._decode(x, idx[None], idx, valid, probe)
            keys = [k for k in probe.keys if k is not None]
            values = [v for v in probe.values if v is not None]
            if len(keys) != self.num_layers:
                raise NotImplementedError(f"{self.family}: not every layer wrote to the KV cache")
            self._kv_layout = (
                [k.shape[1] for k in keys],
                [k.shape[-1] for k in keys],
                [v.shape[-1] for v in values],
            )
        return self._kv_layout

    def setup_caches(
        self,
        batch_size: int,
        max_len: int,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> KVCache:
        """A :class:`~mctp.engine.cache.KVCache` with ``[B, kv_heads, max_len, D]`` buffers per
        layer, allocated now (the layout read from one probe forward).

        Args:
            batch_size: ``B``.
            max_len: Largest sequence index + 1 the cache can hold.
            dtype: Buffer dtype (default: the model's).
            device: Buffer device (default: the model's).
        """
        heads, kdims, vdims = self._probe_kv_layout()
        weight = self.lm_head.weight
        cache = KVCache(self.num_layers, batch_size, max_len)
        return cache.allocate(
            heads,
            kdims,
            value_head_dim=vdims,
            dtype=dtype or weight.dtype,
            device=device or weight.device,
        )

    def _decode(
        self,
        x: torch.Tensor,
        pos: torch.Tensor,
        idx: torch.Tensor,
        valid: torch.Tensor,
        cache: Any,
        regions: BlockRegions | None = None,
        key_start: int = 0,
    ) -> torch.Tensor:
        cache.set_positions(idx, visible=key_start + valid.shape[1], start=key_start)
        impl = self.attn_implementation
        if impl in ("sdpa", "eager"):
            return self._layers(
                x,
                lambda w: self._mask(decode_mask(idx, valid, w, key_start), x.dtype),
                pos,
                cache,
                regions,
            )
        # flash-attention kernels take no dense mask: cached decoding runs SDPA (same math)
        self.config._attn_implementation = "sdpa"
        try:
            return self._layers(
                x, lambda w: decode_mask(idx, valid, w, key_start), pos, cache, regions
            )
        finally:
            self.config._attn_implementation = impl
