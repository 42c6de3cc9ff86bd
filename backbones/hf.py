"""``HFBackbone``: any transformers decoder-only causal LM as an MCTP backbone.

The wrapper drives the model's own modules (embedding, decoder layers, final norm,
rotary tables, lm_head) in a small loop of its own instead of calling the model's
``forward``: that lets it hand every layer a pre-allocated :class:`~mctp.cache.KVCache`
and a boolean mask built from tensors (no transformers ``Cache`` objects, no growing
tensors), the same loop on CPU and GPU. It supports the architectures laid out like
Llama in transformers 5 (``model.embed_tokens / layers / norm / rotary_emb``: Llama,
Qwen2/2.5/3, Mistral without a sliding window, ...); on construction a short forward is
compared with the model's own ``forward``, so an architecture that needs more than this
loop fails loudly instead of generating nonsense.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from mctp.cache import KVCache
from mctp.compat import call_block
from mctp.decoding import TokenBuffer
from mctp.losses import chunked_cross_entropy
from mctp.masks import (
    check_batch_shapes,
    decode_mask,
    default_position_ids,
    segment_ids,
    segment_mask,
)
from mctp.stack import BackboneParts, shift_targets

__all__ = ["BackboneOutput", "HFBackbone"]

_REQUIRED = ("embed_tokens", "layers", "norm", "rotary_emb")


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


class HFBackbone(nn.Module):
    """Wrap a transformers causal LM (``AutoModelForCausalLM``-style) for MCTP.

    Args:
        model: The causal LM (a ``PreTrainedModel`` with ``get_output_embeddings()`` and a
            Llama-like base model). It stays the owner of its parameters.
        verify: Compare a 5-token forward of the wrapper with ``model(...)`` once and raise
            if they differ (guards against unsupported architectures).

    Raises:
        NotImplementedError: If the model is not laid out like Llama, uses sliding-window
            layers, or its outputs differ from the wrapper's in the verification forward.
    """

    def __init__(self, model: nn.Module, *, verify: bool = True) -> None:
        super().__init__()
        self.model = model
        prefix = getattr(model, "base_model_prefix", "model")
        base = getattr(model, prefix, None)
        missing = [a for a in _REQUIRED if base is None or not hasattr(base, a)]
        if missing:
            raise NotImplementedError(
                f"{type(model).__name__} is not laid out like a Llama-style decoder "
                f"(base model '{prefix}' lacks {missing}); HFBackbone supports Llama, Qwen2, Qwen3, "
                "Mistral and other transformers models with embed_tokens/layers/norm/rotary_emb"
            )
        self.base = base
        self.config = model.config
        layer_types = getattr(self.config, "layer_types", None) or ["full_attention"]
        if any(t != "full_attention" for t in layer_types):
            raise NotImplementedError(
                f"sliding-window layers ({sorted(set(layer_types))}) are not supported by HFBackbone"
            )
        lm_head = model.get_output_embeddings()
        if lm_head is None:
            raise NotImplementedError(f"{type(model).__name__} has no output embeddings (lm_head)")
        self.lm_head = lm_head
        if verify:
            self._verify()

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
        return len(self.base.layers)

    @property
    def attn_implementation(self) -> str:
        """The attention implementation transformers selected (``sdpa``, ``eager``...)."""
        return str(getattr(self.config, "_attn_implementation", None) or "sdpa")

    def parts(self) -> BackboneParts:
        """The modules MCTP heads share with this backbone."""
        norm = self.base.norm
        return BackboneParts(
            embed=self.base.embed_tokens,
            norm=norm,
            lm_head=self.lm_head,
            rotary=self.base.rotary_emb,
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

    # ------------------------------------------------------------------ masks
    def _mask(self, mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Boolean mask in the form this model's attention expects (eager wants additive)."""
        if self.attn_implementation == "eager":
            return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(
                ~mask, torch.finfo(dtype).min
            )
        return mask

    def _layers(
        self, x: torch.Tensor, mask: Any, position_ids: torch.Tensor, cache: KVCache | None
    ) -> torch.Tensor:
        rope = self.base.rotary_emb(x, position_ids)
        for layer in self.base.layers:
            x = call_block(
                layer,
                x,
                attention_mask=mask,
                position_ids=position_ids,
                position_embeddings=rope,
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
            ValueError: On mismatched shapes.
        """
        b, t = input_ids.shape
        check_batch_shapes(
            b, t, position_ids=position_ids, attention_mask=attention_mask, labels=labels
        )
        if position_ids is None:
            position_ids = default_position_ids(input_ids, attention_mask)
        x = self.base.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        if x.shape[:2] != (b, t):
            raise ValueError(
                f"inputs_embeds must be [B, T, H] with B, T = {(b, t)}, got {tuple(x.shape)}"
            )
        if self.attn_implementation.startswith("flash"):
            mask = None  # transformers derives varlen boundaries from position_ids
            if attention_mask is not None and not bool(attention_mask.all()):
                raise ValueError(
                    "with flash attention pass packed sequences (position_ids) instead of padding"
                )
        else:
            mask = self._mask(segment_mask(segment_ids(position_ids, attention_mask)), x.dtype)
        hidden = self._layers(x, mask, position_ids, None)
        logits = self.lm_head(hidden) if return_logits else None
        loss = count = None
        if labels is not None:
            targets = shift_targets(labels, position_ids, attention_mask)
            total, count = chunked_cross_entropy(
                hidden, targets, self.lm_head, chunk_size=loss_chunk_size
            )
            loss = total / count.clamp_min(1)
        return BackboneOutput(hidden=hidden, logits=logits, loss=loss, num_targets=count)

    # ------------------------------------------------------------------ cached decode
    def new_cache(self, batch_size: int, max_len: int) -> KVCache:
        """A static KV cache for all layers (buffers allocated on the first forward)."""
        return KVCache(self.num_layers, batch_size, max_len)

    def setup_caches(
        self,
        batch_size: int,
        max_len: int,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> KVCache:
        """A static KV cache for all layers with every buffer allocated now.

        Args:
            batch_size: ``B``.
            max_len: Largest sequence index + 1 the cache can hold.
            dtype: Buffer dtype (default: the model's).
            device: Buffer device (default: the model's).

        Returns:
            :class:`~mctp.cache.KVCache` with ``[B, kv_heads, max_len, head_dim]`` buffers.
        """
        weight = self.lm_head.weight
        heads, dims = [], []
        for layer in self.base.layers:
            attn = layer.self_attn
            d = int(
                getattr(attn, "head_dim", 0)
                or self.config.hidden_size // self.config.num_attention_heads
            )
            heads.append(attn.k_proj.out_features // d)
            dims.append(d)
        cache = KVCache(self.num_layers, batch_size, max_len)
        return cache.allocate(
            heads, dims, dtype=dtype or weight.dtype, device=device or weight.device
        )

    @torch.inference_mode()
    def forward_cached(
        self, buffer: TokenBuffer, cache: KVCache, start: int, *, all_logits: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Process slots ``start .. buffer.length-1`` of the buffer with the cache.

        Args:
            buffer: The sequence (ids, positions, validity).
            cache: This backbone's cache; slots below ``start`` must already be in it.
            start: First slot to process (0 for the prefill).
            all_logits: Logits for every processed slot (verified decoding) instead of only
                the last one.

        Returns:
            ``(hidden [B, T, H], logits [B, T or 1, V])``.

        Raises:
            ValueError: If there is nothing to process.
        """
        stop = buffer.length
        if not 0 <= start < stop:
            raise ValueError(f"nothing to process: start {start}, sequence length {stop}")
        return self.decode(buffer, cache, buffer.index[start:stop], all_logits=all_logits)

    def decode(
        self, buffer: TokenBuffer, cache: KVCache, idx: torch.Tensor, *, all_logits: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`forward_cached` on the slots ``idx [T]`` (a tensor: static under compile/graphs).

        Returns:
            ``(hidden [B, T, H], logits [B, T or 1, V])``.
        """
        pos = buffer.positions.index_select(1, idx)
        x = buffer.embed(self.base.embed_tokens, idx)
        cache.set_positions(idx)
        impl = self.attn_implementation
        if impl in ("sdpa", "eager"):
            hidden = self._layers(
                x, self._mask(decode_mask(idx, buffer.valid), x.dtype), pos, cache
            )
        else:
            # flash-attention kernels take no dense mask: cached decoding runs SDPA (same math)
            self.config._attn_implementation = "sdpa"
            try:
                hidden = self._layers(x, decode_mask(idx, buffer.valid), pos, cache)
            finally:
                self.config._attn_implementation = impl
        logits = self.lm_head(hidden if all_logits else hidden[:, -1:])
        return hidden, logits

    # ------------------------------------------------------------------ checks
    @torch.no_grad()
    def _verify(self) -> None:
        was_training = self.model.training
        self.model.eval()
        try:
            device = self.lm_head.weight.device
            ids = torch.arange(5, device=device)[None] % max(self.vocab_size, 1)
            ref = self.model(input_ids=ids, use_cache=False).logits.float()
            pos = torch.arange(5, device=device)[None]
            x = self.base.embed_tokens(ids)
            mask = self._mask(segment_mask(segment_ids(pos)), x.dtype)
            ours = self.lm_head(self._layers(x, mask, pos, None)).float()
        finally:
            self.model.train(was_training)
        tol = (
            1e-3
            if ref.dtype == torch.float32 and self.lm_head.weight.dtype == torch.float32
            else 5e-2
        )
        err = (ref - ours).abs().max().item()
        scale = ref.abs().max().item() + 1e-6
        if err > tol * max(1.0, scale):
            raise NotImplementedError(
                f"{type(self.model).__name__}: the generic decoder loop differs from the model's own forward "
                f"(max |diff| {err:.3g}); this architecture needs steps HFBackbone does not perform"
            )
