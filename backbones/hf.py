"""``HFBackbone``: any transformers decoder-only causal LM as an MCTP backbone.

Two paths, chosen at construction and named by :attr:`HFBackbone.path`:

* ``"fast"`` for models laid out like Llama (``embed_tokens / layers / norm / rotary_emb``:
  Llama, Qwen2/2.5/3, Mistral, Mixtral, Gemma 1-3, Phi3, OLMo2, ...). The wrapper drives the
  model's own modules in a loop of its own, handing every layer a pre-allocated
  :class:`~mctp.engine.cache.KVCache` and masks built from tensors (static shapes, the same loop on
  CPU and GPU, capturable in CUDA graphs). Sliding-window and hybrid local/global layers get
  their window as a mask over cache slots; families with per-layer-type rotary tables (Gemma3)
  get the table of each layer's type.
* ``"generic"`` for every other causal LM (GPT-2, GPT-NeoX, Falcon, Phi, ...) or whenever the
  fast loop does not reproduce the model: the model's own forward with transformers'
  ``DynamicCache`` (cropped for rollback). Exact, slower. MCTP heads on this path are
  Llama-style :class:`~mctp.layers.DecoderBlock` s of the model's width.

A self-check at construction compares both training and cached forwards with the model's own
forward on a left-padded batch longer than every sliding window (windows are narrowed for the
check); a model neither path reproduces raises :class:`NotImplementedError` naming the family.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from mctp.compat import call_block
from mctp.engine.cache import KVCache
from mctp.engine.masks import (
    additive,
    check_batch_shapes,
    decode_mask,
    default_position_ids,
    segment_ids,
    segment_mask,
)
from mctp.layers import DecoderBlock, RotaryEmbedding
from mctp.losses import chunked_cross_entropy
from mctp.stack import BackboneParts, shift_targets

from .attention import (
    SUPPORTED_LAYER_TYPES,
    layer_types,
    layer_windows,
    rotary_takes_layer_type,
    shrunk_windows,
)
from .generic import GenericRunner
from .structure import OutputPath, output_path

if TYPE_CHECKING:
    from mctp.engine.buffer import TokenBuffer

__all__ = ["BackboneOutput", "HFBackbone"]

log = logging.getLogger(__name__)

_REQUIRED = ("embed_tokens", "layers", "norm", "rotary_emb")
_PATHS = ("auto", "fast", "generic")
_PROBE_WINDOW = 3  # sliding windows are narrowed to this many slots during the self-check


class _Mismatch(Exception):
    """The wrapper's output differs from the model's own forward."""


@dataclass
class BackboneOutput:
    """Training forward result.

    Attributes:
        hidden: ``[B, T, H]`` last hidden states after the final norm (MCTP's ``h^0``).
        logits: ``[B, T, V]`` when requested, else None.
        loss: Token-mean next-token cross-entropy when labels were given, else None.
        num_targets: Number of scored tokens (long scalar) when labels were given.
    """

    hidden: torch.Tensor
    logits: torch.Tensor | None
    loss: torch.Tensor | None
    num_targets: torch.Tensor | None


class _TypedRotary(nn.Module):
    """``(x, position_ids) -> (cos, sin)`` of one layer type of a per-type rotary module."""

    def __init__(self, rotary: nn.Module, layer_type: str) -> None:
        super().__init__()
        self.rotary, self.layer_type = rotary, layer_type

    def forward(
        self, x: torch.Tensor, position_ids: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.rotary(x, position_ids, self.layer_type)


class HFBackbone(nn.Module):
    """Wrap a transformers causal LM (``AutoModelForCausalLM``-style) for MCTP.

    Args:
        model: The causal LM (a ``PreTrainedModel`` with ``get_output_embeddings()``). It stays
            the owner of its parameters.
        verify: Compare training and cached forwards with ``model(...)`` once (a left-padded
            batch past every sliding window) and fall back from the fast to the generic path,
            or raise, if they differ.
        path: ``"auto"`` (fast when the model is laid out like Llama and the self-check
            passes, else generic), ``"fast"`` or ``"generic"`` (forced).

    Raises:
        ValueError: On an unknown ``path``.
        NotImplementedError: If the model has no output embeddings, ``path="fast"`` is asked
            of a model the fast loop cannot run, or neither path reproduces the model.
    """

    def __init__(self, model: nn.Module, *, verify: bool = True, path: str = "auto") -> None:
        super().__init__()
        if path not in _PATHS:
            raise ValueError(f"path must be one of {_PATHS}, got {path!r}")
        self.model = model
        self.config = model.config
        self.family = type(model).__name__
        lm_head = model.get_output_embeddings()
        if lm_head is None or getattr(lm_head, "weight", None) is None:
            raise NotImplementedError(f"{self.family} has no output embeddings (lm_head)")
        self.lm_head = lm_head
        prefix = getattr(model, "base_model_prefix", "model")
        self.base = getattr(model, prefix, None) or model.base_model
        self.softcap = getattr(self.config, "final_logit_softcapping", None)
        self._runner = GenericRunner(model)
        self.fast_path_blockers = self._fast_path_blockers()
        if path == "fast" and self.fast_path_blockers:
            raise NotImplementedError(
                f"{self.family} cannot run on the fast path: {'; '.join(self.fast_path_blockers)}"
            )
        self.path = "generic" if path == "generic" or self.fast_path_blockers else "fast"
        self._kv_layout: tuple[list[int], list[int], list[int]] | None = None
        self._head_rotary: RotaryEmbedding | None = None
        if self.path == "fast":
            self._read_attention()
        if verify:
            self._verify_or_fall_back(forced=path != "auto")

    # ------------------------------------------------------------------ set-up
    def _fast_path_blockers(self) -> list[str]:
        """Why the fast loop cannot run this model (empty when it can)."""
        missing = [a for a in _REQUIRED if not hasattr(self.base, a)]
        if missing:
            return [f"not laid out like Llama (base model lacks {missing})"]
        types = layer_types(self.config, len(self.base.layers))
        odd = sorted(set(types) - set(SUPPORTED_LAYER_TYPES))
        if odd:
            return [f"layer types {odd} (the fast loop knows {list(SUPPORTED_LAYER_TYPES)})"]
        if not all(hasattr(layer, "self_attn") for layer in self.base.layers):
            return ["decoder layers without a self_attn module"]
        return []

    def _read_attention(self) -> None:
        self._types = layer_types(self.config, len(self.base.layers))
        self._windows = layer_windows(self.config, self.base.layers)
        self._typed_rotary = rotary_takes_layer_type(self.base.rotary_emb)

    def _verify_or_fall_back(self, *, forced: bool) -> None:
        try:
            self._verify()
            return
        except _Mismatch as err:
            if forced or self.path == "generic":
                raise NotImplementedError(
                    f"{self.family}: the {self.path} path does not reproduce the model's own "
                    f"forward ({err}); HFBackbone cannot run this model"
                ) from None
            log.warning("%s: fast loop differs (%s); using the generic path", self.family, err)
            self.fast_path_blockers = [f"self-check: {err}"]
            self.path = "generic"
        try:
            self._verify()
        except _Mismatch as err:
            raise NotImplementedError(
                f"{self.family}: neither the fast loop ({self.fast_path_blockers[0]}) nor the "
                f"model's own forward through HFBackbone reproduces model(...) ({err})"
            ) from None

    # ------------------------------------------------------------------ parts
    @property
    def hidden_size(self) -> int:
        """Model width ``H``."""
        return int(self.config.hidden_size)

    @property
    def vocab_size(self) -> int:
        """Rows of the lm_head (``V``)."""
        return int(self.lm_head.weight.shape[0])

    @property
    def num_layers(self) -> int:
        """Number of decoder layers."""
        return int(self.config.num_hidden_layers)

    @property
    def attn_implementation(self) -> str:
        """The attention implementation transformers selected (``sdpa``, ``eager``...)."""
        return str(getattr(self.config, "_attn_implementation", None) or "sdpa")

    @property
    def windows(self) -> list[int | None]:
        """Per-layer sliding windows of the fast path (None: full attention)."""
        return list(self._windows) if self.path == "fast" else []

    def _llama_block(self) -> DecoderBlock:
        """A fresh Llama-style block of the model's width (generic-path MCTP heads)."""
        cfg, h = self.config, self._output_path().width
        heads = int(cfg.num_attention_heads)
        kv = int(getattr(cfg, "num_key_value_heads", None) or heads)
        inter = getattr(cfg, "intermediate_size", None) or getattr(cfg, "n_inner", None) or 4 * h
        block = DecoderBlock(h, heads, kv, int(inter), rms_eps=self._rms_eps())
        dtype = self.lm_head.weight.dtype
        with torch.no_grad():
            for name, p in block.named_parameters():
                if p.dim() > 1:
                    p.normal_(0.0, float(getattr(cfg, "initializer_range", 0.02)))
                elif "bias" in name:
                    p.zero_()
        return block.to(device=self.lm_head.weight.device, dtype=dtype)

    def _rms_eps(self) -> float:
        for name in ("rms_norm_eps", "layer_norm_epsilon", "layer_norm_eps", "norm_eps"):
            v = getattr(self.config, name, None)
            if isinstance(v, float):
                return v
        return 1e-6

    def parts(self) -> BackboneParts:
        """The modules MCTP heads share with this backbone.

        Raises:
            NotImplementedError: On the generic path, naming the family and the reason, if no
                final norm feeds the lm_head (see :mod:`mctp.backbones.structure`).
        """
        if self.path == "fast":
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
        out = self._output_path()
        if self._head_rotary is None:
            head_dim = out.width // int(self.config.num_attention_heads)  # as DecoderBlock
            self._head_rotary = RotaryEmbedding(head_dim).to(self.lm_head.weight.device)
        return BackboneParts(
            embed=self.model.get_input_embeddings(),
            norm=out.module(),
            lm_head=self.lm_head,
            rotary=self._head_rotary,
            last_block=self._llama_block(),
            hidden_size=out.width,
            rms_eps=self._rms_eps(),
        )

    def _output_path(self) -> OutputPath:
        """The final norm (and projection) before the lm_head, read from the model once."""
        if getattr(self, "_output", None) is None:
            self._output = output_path(self.model)
        return self._output

    def block_factory(self, *, copy_last: bool = True) -> Callable[[int], nn.Module]:
        """A factory of decoder blocks for :class:`~mctp.stack.MCTPStack`.

        Args:
            copy_last: Deep-copy the last layer (the paper's init); False builds a freshly
                initialised layer of the same class from the config. On the generic path
                both give fresh Llama-style blocks of the model's width.
        """
        if self.path == "generic":
            return lambda _i: self._llama_block()
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

    # ------------------------------------------------------------------ training switches
    def gradient_checkpointing_enable(
        self, gradient_checkpointing_kwargs: dict[str, Any] | None = None
    ) -> None:
        """Recompute each decoder layer in the backward pass (both paths).

        Args:
            gradient_checkpointing_kwargs: Passed to ``torch.utils.checkpoint`` (default
                ``{"use_reentrant": False}``).
        """
        kwargs = gradient_checkpointing_kwargs or {"use_reentrant": False}
        self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)

    def gradient_checkpointing_disable(self) -> None:
        """Undo :meth:`gradient_checkpointing_enable`."""
        self.model.gradient_checkpointing_disable()

    @property
    def is_gradient_checkpointing(self) -> bool:
        """Whether gradient checkpointing is on."""
        return bool(getattr(self.model, "is_gradient_checkpointing", False))

    # ------------------------------------------------------------------ shared pieces
    def _mask(self, mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Boolean mask in the form this model's attention expects (eager wants additive)."""
        if self.attn_implementation == "eager":
            return additive(mask, dtype)
        return mask

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(hidden)
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    def _layers(
        self,
        x: torch.Tensor,
        masks: Callable[[int | None], Any],
        position_ids: torch.Tensor,
        cache: KVCache | None,
    ) -> torch.Tensor:
        """The fast loop: every layer with the mask of its window and the rotary of its type."""
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
            x = call_block(
                layer,
                x,
                attention_mask=built[w],
                position_ids=position_ids,
                position_embeddings=ropes[key],
                cache=cache,
            )
        return self.base.norm(x)

    # ------------------------------------------------------------------ training forward
    def forward(
        self,
        input_ids: torch.Tensor,
        *,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        return_logits: bool = False,
        loss_chunk_size: int = 2048,
    ) -> BackboneOutput:
        """Uncached forward over a (packed) batch.

        Args:
            input_ids: ``[B, T]``.
            position_ids: ``[B, T]``, restarting at 0 per packed sample (attention never
                crosses samples). Default ``0..T-1`` (counted over the mask if given).
            attention_mask: ``[B, T]`` padding mask (1 = real token), optional.
            labels: ``[B, T]`` causal-LM labels aligned with the inputs (-100 ignored).
            inputs_embeds: ``[B, T, H]`` to use instead of embedding ``input_ids`` (e.g. with
                audio-encoder frames scattered in).
            return_logits: Also return full ``[B, T, V]`` logits.
            loss_chunk_size: Rows per cross-entropy block.

        Returns:
            :class:`BackboneOutput`.

        Raises:
            ValueError: On mismatched shapes, or padding under flash attention.
        """
        b, t = input_ids.shape
        check_batch_shapes(
            b, t, position_ids=position_ids, attention_mask=attention_mask, labels=labels
        )
        if position_ids is None:
            position_ids = default_position_ids(input_ids, attention_mask)
        embed = self.model.get_input_embeddings()
        x = embed(input_ids) if inputs_embeds is None else inputs_embeds
        if x.shape[:2] != (b, t):
            raise ValueError(
                f"inputs_embeds must be [B, T, H] with B, T = {(b, t)}, got {tuple(x.shape)}"
            )
        flash = self.attn_implementation.startswith("flash")
        if flash and attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError(
                "with flash attention pass packed sequences (position_ids) instead of padding"
            )
        segments = segment_ids(position_ids, attention_mask)
        if self.path == "fast":
            if flash:
                hidden = self._layers(x, lambda _w: None, position_ids, None)
            else:
                hidden = self._layers(
                    x, lambda w: self._mask(segment_mask(segments, w), x.dtype), position_ids, None
                )
        else:
            if _is_packed(position_ids, attention_mask):
                mask: torch.Tensor = self._mask(segment_mask(segments), x.dtype)
            elif attention_mask is None:
                mask = torch.ones(b, t, dtype=torch.long, device=x.device)
            else:
                mask = attention_mask.long()
            hidden = self._runner.hidden(x, position_ids, mask)
        logits = self._logits(hidden) if return_logits else None
        loss = count = None
        if labels is not None:
            targets = shift_targets(labels, position_ids, attention_mask)
            head = self._logits if self.softcap else self.lm_head
            total, count = chunked_cross_entropy(hidden, targets, head, chunk_size=loss_chunk_size)
            loss = total / count.clamp_min(1)
        return BackboneOutput(hidden=hidden, logits=logits, loss=loss, num_targets=count)

    # ------------------------------------------------------------------ cached decode
    def new_cache(self, batch_size: int, max_len: int) -> Any:
        """An empty cache for :meth:`decode` (fast path: buffers allocated on first use)."""
        if self.path == "generic":
            return self._runner.new_cache()
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
                self._decode_embeds(x, idx[None], idx, valid, probe)
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
    ) -> Any:
        """A cache for :meth:`decode` with every buffer allocated now.

        On the fast path a :class:`~mctp.engine.cache.KVCache` with ``[B, kv_heads, max_len, D]``
        buffers per layer; on the generic path transformers' ``DynamicCache`` (it grows as
        the model writes; nothing can be allocated ahead for arbitrary architectures).

        Args:
            batch_size: ``B``.
            max_len: Largest sequence index + 1 the cache can hold.
            dtype: Buffer dtype (default: the model's).
            device: Buffer device (default: the model's).
        """
        if self.path == "generic":
            return self._runner.new_cache()
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

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Input embeddings ``[B, T, H]`` of ``ids [B, T]``."""
        return self.model.get_input_embeddings()(ids)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Output logits ``[B, T, V]`` of final hidden states ``[B, T, H]`` (soft-capped where
        the family caps them)."""
        return self._logits(hidden)

    @torch.inference_mode()
    def forward_cached(
        self, buffer: TokenBuffer, cache: Any, start: int, *, all_logits: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Process slots ``start .. buffer.length-1`` of a token buffer with the cache (a
        convenience over :meth:`decode` for tests and scripts; the engine calls ``decode``).

        Returns:
            ``(hidden [B, T, H], logits [B, T or 1, V])``.

        Raises:
            ValueError: If there is nothing to process.
        """
        stop = buffer.length
        if not 0 <= start < stop:
            raise ValueError(f"nothing to process: start {start}, sequence length {stop}")
        idx = buffer.index[start:stop]
        x = buffer.embed(self.embed, idx)
        hidden = self.decode(x, buffer.positions.index_select(1, idx), idx, buffer.valid, cache)
        return hidden, self._logits(hidden if all_logits else hidden[:, -1:])

    def decode(
        self,
        embeds: torch.Tensor,
        positions: torch.Tensor,
        slots: torch.Tensor,
        valid: torch.Tensor,
        cache: Any,
    ) -> torch.Tensor:
        """One cached decode step over tensors: embeddings ``[B, T, H]`` at cache slots
        ``slots [T]`` (ascending, contiguous) with position ids ``positions [B, T]``; ``valid
        [B, S']`` marks the real (non-padding) slots among the first ``S'`` cache slots, and
        attention reads only those (``S'`` = the cache's length on fixed shapes, the sequence's
        length on the eager path).

        Returns:
            Final-normed hidden states ``[B, T, H]``.
        """
        return self._decode_embeds(embeds, positions, slots, valid, cache)

    def _decode_embeds(
        self,
        x: torch.Tensor,
        pos: torch.Tensor,
        idx: torch.Tensor,
        valid: torch.Tensor,
        cache: Any,
    ) -> torch.Tensor:
        """Cached forward of embeddings ``x [B, T, H]`` at slots ``idx`` -> ``[B, T, H]``."""
        if self.path == "generic":
            start, stop = int(idx[0]), int(idx[-1]) + 1
            return self._runner.decode(x, pos, valid[:, :stop], cache, start)
        cache.set_positions(idx, visible=valid.shape[1])
        impl = self.attn_implementation
        if impl in ("sdpa", "eager"):
            return self._layers(
                x, lambda w: self._mask(decode_mask(idx, valid, w), x.dtype), pos, cache
            )
        # flash-attention kernels take no dense mask: cached decoding runs SDPA (same math)
        self.config._attn_implementation = "sdpa"
        try:
            return self._layers(x, lambda w: decode_mask(idx, valid, w), pos, cache)
        finally:
            self.config._attn_implementation = impl

    # ------------------------------------------------------------------ checks
    @torch.no_grad()
    def _verify(self) -> None:
        """Compare training and cached forwards with ``model(...)``; raise :class:`_Mismatch`."""
        windows = [w for w in self._windows if w] if self.path == "fast" else []
        shrink = (
            shrunk_windows(self.config, self.base.layers, _PROBE_WINDOW)
            if windows or getattr(self.config, "sliding_window", None)
            else contextlib.nullcontext()
        )
        was_training = self.model.training
        self.model.eval()
        try:
            with shrink:
                if self.path == "fast":
                    self._read_attention()
                self._compare()
        finally:
            self.model.train(was_training)
            if self.path == "fast":
                self._read_attention()

    def _compare(self) -> None:
        device = self.lm_head.weight.device
        n, pad = _PROBE_WINDOW + 7, 2  # longer than the (narrowed) window; row 1 left-padded
        v = max(self.vocab_size, 2)
        ids = (torch.arange(2 * n, device=device).view(2, n) * 7 + 3) % v
        mask = torch.ones(2, n, dtype=torch.long, device=device)
        mask[1, :pad] = 0
        pos = default_position_ids(ids, mask)
        try:
            ref = self.model(
                input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False
            ).logits.float()
        except Exception as err:  # the model's own forward: report, never guess
            raise NotImplementedError(
                f"{self.family}: the model's own forward fails on a left-padded 2 x {n} batch "
                f"({type(err).__name__}: {err}); HFBackbone cannot run this model"
            ) from err
        try:
            self._compare_ours(ids, mask, pos, ref)
        except _Mismatch:
            raise
        except Exception as err:  # our loop could not run this model's layers
            raise _Mismatch(f"{type(err).__name__}: {err}") from err

    def _compare_ours(
        self, ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor, ref: torch.Tensor
    ) -> None:
        n = ids.shape[1]
        ours = self.forward(ids, position_ids=pos, attention_mask=mask, return_logits=True)
        assert ours.logits is not None
        real = mask.bool()
        tol = self._tolerance(ref)
        _close(ref[real], ours.logits.float()[real], "training forward", tol)
        # cached: prefill all but the last 3 slots, then one slot at a time, then roll back
        cache = self.setup_caches(2, n)
        embeds = self.model.get_input_embeddings()(ids)
        index = torch.arange(n, device=ids.device)
        split = n - 3
        got = [self._decode_embeds(embeds[:, :split], pos[:, :split], index[:split], real, cache)]
        for i in range(split, n):
            sl = slice(i, i + 1)
            got.append(self._decode_embeds(embeds[:, sl], pos[:, sl], index[sl], real, cache))
        redo = self._decode_embeds(embeds[:, split:], pos[:, split:], index[split:], real, cache)
        cached = self._logits(torch.cat(got, 1)).float()
        _close(ref[real], cached[real], "cached decode", tol)
        tail = real[:, split:]
        _close(ref[:, split:][tail], self._logits(redo).float()[tail], "cached re-read", tol)

    def _tolerance(self, ref: torch.Tensor) -> float:
        fp32 = ref.dtype == torch.float32 and self.lm_head.weight.dtype == torch.float32
        return (1e-3 if fp32 else 5e-2) * max(1.0, ref.abs().max().item())


def _close(ref: torch.Tensor, ours: torch.Tensor, what: str, tol: float) -> None:
    err = (ref - ours).abs().max().item()
    if not err <= tol:  # also catches NaN
        raise _Mismatch(f"{what}: max |logit diff| {err:.3g} > {tol:.3g}")


def _is_packed(position_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> bool:
    """Whether some row holds more than one sample (a position id restarts among real tokens)."""
    if position_ids.shape[1] < 2:
        return False
    real = torch.ones_like(position_ids, dtype=torch.bool)
    if attention_mask is not None:
        real = attention_mask.bool()
    restart = (position_ids[:, 1:] != position_ids[:, :-1] + 1) & real[:, 1:] & real[:, :-1]
    return bool(restart.any())
