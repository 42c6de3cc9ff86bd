"""The generic path: any transformers causal LM through its own forward and its own cache.

For families not laid out like Llama (GPT-2, GPT-NeoX, Falcon, Phi, ...) or whose layers
need more than the fast loop does, :class:`GenericHFBackbone` runs the model's base forward
with a transformers ``DynamicCache``. Exact (it is the model's own code) but slower: one host
sync per call to find the slot range, and rollback crops the cache.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from mctp.compat import cache_argument
from mctp.engine.masks import segment_ids, segment_mask
from mctp.layers import DecoderBlock, RotaryEmbedding
from mctp.stack import BackboneParts

from .base import DEFAULT_PREFILL_CHUNK, HFBackbone, structural_blockers
from .structure import OutputPath, output_path

__all__ = ["GenericHFBackbone", "GenericRunner"]


class GenericRunner:
    """Hidden states of a transformers base model, uncached or with a cropped ``DynamicCache``.

    Args:
        model: The causal LM (its ``base_model`` is run).
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.base = model.base_model
        self.cache_name = cache_argument(self.base) or "past_key_values"

    def hidden(
        self,
        embeds: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        cache: Any = None,
    ) -> torch.Tensor:
        """Final-normed hidden states ``[B, T, H]``.

        Args:
            embeds: ``[B, T, H]`` input embeddings.
            position_ids: ``[B, T]``.
            attention_mask: ``[B, S]`` 2-D padding mask over cache + new tokens, or a prepared
                4-D mask ``[B, 1, T, S]`` (packed training).
            cache: A transformers ``Cache`` or None.
        """
        kwargs: dict[str, Any] = {self.cache_name: cache, "use_cache": cache is not None}
        out = self.base(
            inputs_embeds=embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            **kwargs,
        )
        return out.last_hidden_state

    def new_cache(self) -> Any:
        """An empty transformers ``DynamicCache`` that keeps every slot of every layer.

        Built without the model's config on purpose: sliding-window layers would then keep
        only their window and could not be cropped back (rollback); a full cache with the
        model's own window mask gives the same attention.
        """
        from transformers import DynamicCache

        return DynamicCache()

    def decode(
        self,
        embeds: torch.Tensor,
        position_ids: torch.Tensor,
        key_valid: torch.Tensor,
        cache: Any,
        start: int,
    ) -> torch.Tensor:
        """Process slots ``start .. start + T - 1`` with the cache, cropping it first.

        Args:
            embeds: ``[B, T, H]`` embeddings of the slots.
            position_ids: ``[B, T]``.
            key_valid: ``[B, start + T]`` bool, real (non-padding) slots.
            cache: The cache holding at least slots ``0 .. start - 1``.
            start: First slot to process.

        Returns:
            ``[B, T, H]``.

        Raises:
            RuntimeError: If the cache holds fewer than ``start`` slots (a gap).
        """
        seen = int(cache.get_seq_length())
        if seen > start:
            # a negative argument removes that many tokens in every release (5.24 refuses a
            # positive target length, which older releases took)
            cache.crop(start - seen)
        elif seen < start:
            raise RuntimeError(f"cache holds {seen} slots but the forward starts at slot {start}")
        return self.hidden(embeds, position_ids, key_valid.long(), cache)


class GenericHFBackbone(HFBackbone):
    """The generic path: any causal LM through its own forward and a cropped ``DynamicCache``
    (see :class:`GenericRunner`); MCTP heads are Llama-style blocks of the model's width.

    Args:
        model: The causal LM.
        verify: Run the self-check now and raise if the model's own forward, driven through
            this wrapper, does not reproduce ``model(...)``.
        prefill_chunk: Most slots one cached forward processes at once (see
            :meth:`~mctp.backbones.HFBackbone.decode`); None never chunks.

    Raises:
        NotImplementedError: If the model has no output embeddings, its own forward fails on
            a left-padded batch, or (``verify``) this path does not reproduce it.
        ValueError: On a bad ``prefill_chunk``.
    """

    PATH = "generic"

    def __init__(
        self,
        model: nn.Module,
        *,
        verify: bool = True,
        prefill_chunk: int | None = DEFAULT_PREFILL_CHUNK,
    ) -> None:
        super().__init__(model, prefill_chunk=prefill_chunk)
        self.fast_path_blockers = structural_blockers(self.base, self.config) or [
            "the generic path was asked for"
        ]
        self._runner = GenericRunner(model)
        self._head_rotary: RotaryEmbedding | None = None
        self._output: OutputPath | None = None
        if verify:
            self._require_reproduction()

    # ------------------------------------------------------------------ parts
    def _output_path(self) -> OutputPath:
        """The final norm (and projection) before the lm_head, read from the model once."""
        if self._output is None:
            self._output = output_path(self.model)
        return self._output

    def _rms_eps(self) -> float:
        for name in ("rms_norm_eps", "layer_norm_epsilon", "layer_norm_eps", "norm_eps"):
            v = getattr(self.config, name, None)
            if isinstance(v, float):
                return v
        return 1e-6

    def _llama_block(self) -> DecoderBlock:
        """A fresh Llama-style block of the model's width (the MCTP heads of this path)."""
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

    def parts(self) -> BackboneParts:
        """The modules MCTP heads share with this backbone: the input embedding, the final
        norm (and projection) found from the model's structure, the lm_head, a rotary table
        for the heads' own blocks and a fresh Llama-style block.

        Raises:
            NotImplementedError: Naming the family and the reason, if no final norm feeds the
                lm_head (see :mod:`mctp.backbones.structure`).
        """
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

    def block_factory(self, *, copy_last: bool = True) -> Callable[[int], nn.Module]:
        """A factory of fresh Llama-style blocks of the model's width (``copy_last`` has no
        effect here: the model's own layers are not laid out for the heads' loop)."""
        return lambda _i: self._llama_block()

    # ------------------------------------------------------------------ forwards
    def _hidden(
        self,
        x: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        *,
        flash: bool,
    ) -> torch.Tensor:
        b, t = position_ids.shape
        if _is_packed(position_ids, attention_mask):
            segments = segment_ids(position_ids, attention_mask)
            mask: torch.Tensor = self._mask(segment_mask(segments), x.dtype)
        elif attention_mask is None:
            mask = torch.ones(b, t, dtype=torch.long, device=x.device)
        else:
            mask = attention_mask.long()
        return self._runner.hidden(x, position_ids, mask)

    def new_cache(self, batch_size: int, max_len: int) -> Any:
        """An empty transformers ``DynamicCache`` (sizes are not needed: it grows)."""
        return self._runner.new_cache()

    def setup_caches(
        self,
        batch_size: int,
        max_len: int,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> Any:
        """Transformers' ``DynamicCache``: it grows as the model writes (nothing can be
        allocated ahead for arbitrary architectures); the arguments are accepted for the
        backbone protocol."""
        return self._runner.new_cache()

    def _decode(
        self,
        x: torch.Tensor,
        pos: torch.Tensor,
        idx: torch.Tensor,
        valid: torch.Tensor,
        cache: Any,
        regions: Any = None,
        key_start: int = 0,  # always 0 here (supports_key_start is False)
    ) -> torch.Tensor:
        start, stop = int(idx[0]), int(idx[-1]) + 1
        return self._runner.decode(x, pos, valid[:, :stop], cache, start)


def _is_packed(position_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> bool:
    """Whether some row holds more than one sample (a position id restarts among real tokens)."""
    if position_ids.shape[1] < 2:
        return False
    real = torch.ones_like(position_ids, dtype=torch.bool)
    if attention_mask is not None:
        real = attention_mask.bool()
    restart = (position_ids[:, 1:] != position_ids[:, :-1] + 1) & real[:, 1:] & real[:, :-1]
    return bool(restart.any())
