"""What both ``HFBackbone`` paths share: the wrapped model, its output head, the training
forward's bookkeeping, chunked prefill and the construction-time self-check.

``HFBackbone(model, path=...)`` is the class users name; calling it builds the subclass of the
chosen path (:class:`~mctp.backbones.hf.FastHFBackbone` or
:class:`~mctp.backbones.generic.GenericHFBackbone`, see :func:`mctp.backbones.hf.choose_backbone`),
so ``isinstance(backbone, HFBackbone)`` holds for both and no method asks which path it is on.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from mctp.engine.masks import (
    additive,
    check_batch_shapes,
    default_position_ids,
    warn_unmasked_padding,
)
from mctp.losses import chunked_cross_entropy
from mctp.stack import BackboneParts, shift_targets

from .attention import SUPPORTED_LAYER_TYPES, layer_types, shrunk_windows
from .selfcheck import PROBE_WINDOW, Mismatch, compare_with_model

if TYPE_CHECKING:
    from mctp.engine.buffer import TokenBuffer
    from mctp.engine.regions import BlockRegions

__all__ = ["DEFAULT_PREFILL_CHUNK", "BackboneOutput", "HFBackbone", "structural_blockers"]

#: Slots one cached step processes at a time (see :meth:`HFBackbone.decode`).
DEFAULT_PREFILL_CHUNK = 512

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


def structural_blockers(base: nn.Module, config: Any) -> list[str]:
    """Why the fast loop cannot run a base model, read from its modules (empty when it can).

    Args:
        base: The causal LM's base model (``model.model`` for Llama-like families).
        config: The model's config.
    """
    missing = [a for a in _REQUIRED if not hasattr(base, a)]
    if missing:
        return [f"not laid out like Llama (base model lacks {missing})"]
    types = layer_types(config, len(base.layers))
    odd = sorted(set(types) - set(SUPPORTED_LAYER_TYPES))
    if odd:
        return [f"layer types {odd} (the fast loop knows {list(SUPPORTED_LAYER_TYPES)})"]
    if not all(hasattr(layer, "self_attn") for layer in base.layers):
        return ["decoder layers without a self_attn module"]
    return []


def check_prefill_chunk(prefill_chunk: object) -> int | None:
    """``prefill_chunk`` validated: None (never chunk) or an int ``>= 1``.

    Raises:
        ValueError: Naming ``prefill_chunk`` otherwise.
    """
    if prefill_chunk is None:
        return None
    if isinstance(prefill_chunk, int) and not isinstance(prefill_chunk, bool) and prefill_chunk > 0:
        return prefill_chunk
    raise ValueError(f"prefill_chunk must be None or an int >= 1, got {prefill_chunk!r}")


def _subclass_only(obj: object, name: str) -> str:
    return (
        f"{type(obj).__name__}.{name}: implemented by the path classes (FastHFBackbone, "
        "GenericHFBackbone), which HFBackbone(model) returns"
    )


class _ChoosesPath(type):
    """Calling ``HFBackbone(...)`` itself builds the subclass of the chosen path."""

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        if cls is HFBackbone:
            from .hf import choose_backbone  # the subclasses' modules import this one

            return choose_backbone(*args, **kwargs)
        return super().__call__(*args, **kwargs)


class HFBackbone(nn.Module, metaclass=_ChoosesPath):
    """Wrap a transformers causal LM (``AutoModelForCausalLM``-style) for MCTP.

    ``HFBackbone(model, path=..., verify=..., prefill_chunk=...)`` returns a
    :class:`~mctp.backbones.hf.FastHFBackbone` or a
    :class:`~mctp.backbones.generic.GenericHFBackbone` (both instances of this class); see
    :func:`mctp.backbones.hf.choose_backbone` for the arguments and the errors.

    Subclasses take ``(model, *, verify=True, prefill_chunk=DEFAULT_PREFILL_CHUNK)`` and run
    their self-check (:meth:`self_check`) when ``verify``; this base sets up what they share.

    Raises:
        NotImplementedError: If the model has no output embeddings.
        ValueError: On a bad ``prefill_chunk``.
    """

    #: The path a subclass runs (``"fast"`` or ``"generic"``).
    PATH: ClassVar[str]
    #: Whether :meth:`decode` can run the layers as compiled regions (``regions=``).
    supports_regions: ClassVar[bool] = False
    #: Whether :meth:`decode` can skip the cache slots before ``key_start`` (``key_start=``).
    supports_key_start: ClassVar[bool] = False

    def __init__(
        self, model: nn.Module, *, prefill_chunk: int | None = DEFAULT_PREFILL_CHUNK
    ) -> None:
        super().__init__()
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
        self.prefill_chunk = prefill_chunk
        self.fast_path_blockers: list[str] = []
        """Why this backbone is not on the fast path (empty on the fast path)."""

    @property
    def prefill_chunk(self) -> int | None:
        """Most slots one cached forward processes at once (longer steps run in chunks, see
        :meth:`decode`); None: never chunk. Settable; validated."""
        return self._prefill_chunk

    @prefill_chunk.setter
    def prefill_chunk(self, value: int | None) -> None:
        self._prefill_chunk = check_prefill_chunk(value)

    @property
    def path(self) -> str:
        """``"fast"`` or ``"generic"``: the path this backbone's class runs (read-only)."""
        return self.PATH

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
        """Per-layer sliding windows the wrapper's own loop applies (empty: the model's own
        forward applies them)."""
        return []

    def parts(self) -> BackboneParts:
        """The modules MCTP heads share with this backbone."""
        raise NotImplementedError(_subclass_only(self, "parts"))

    def block_factory(self, *, copy_last: bool = True) -> Callable[[int], nn.Module]:
        """A factory of decoder blocks for :class:`~mctp.stack.MCTPStack`."""
        raise NotImplementedError(_subclass_only(self, "block_factory"))

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

        A batch of several rows given neither ``attention_mask`` nor ``position_ids`` in which
        rows begin or end with the model's ``pad_token_id`` warns (``UserWarning``): that
        padding is read as real tokens (transformers warns for the same input).

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
        if attention_mask is None and position_ids is None:
            pad = getattr(self.config, "pad_token_id", None)
            warn_unmasked_padding(input_ids, pad, f"{self.family} (pad_token_id)")
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
        hidden = self._hidden(x, position_ids, attention_mask, flash=flash)
        logits = self._logits(hidden) if return_logits else None
        loss = count = None
        if labels is not None:
            targets = shift_targets(labels, position_ids, attention_mask)
            head = self._logits if self.softcap else self.lm_head
            total, count = chunked_cross_entropy(hidden, targets, head, chunk_size=loss_chunk_size)
            loss = total / count.clamp_min(1)
        return BackboneOutput(hidden=hidden, logits=logits, loss=loss, num_targets=count)

    def _hidden(
        self,
        x: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        *,
        flash: bool,
    ) -> torch.Tensor:
        """Uncached final-normed hidden states ``[B, T, H]`` of embeddings ``x [B, T, H]``."""
        raise NotImplementedError(_subclass_only(self, "_hidden"))

    # ------------------------------------------------------------------ cached decode
    def new_cache(self, batch_size: int, max_len: int) -> Any:
        """An empty cache for :meth:`decode` (buffers may be allocated on first use)."""
        raise NotImplementedError(_subclass_only(self, "new_cache"))

    def setup_caches(
        self,
        batch_size: int,
        max_len: int,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> Any:
        """A cache for :meth:`decode` with every buffer the path can allocate allocated now.

        Args:
            batch_size: ``B``.
            max_len: Largest sequence index + 1 the cache can hold.
            dtype: Buffer dtype (default: the model's).
            device: Buffer device (default: the model's).
        """
        raise NotImplementedError(_subclass_only(self, "setup_caches"))

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
        *,
        regions: BlockRegions | None = None,
        key_start: int = 0,
    ) -> torch.Tensor:
        """One cached decode step over tensors: embeddings ``[B, T, H]`` at cache slots
        ``slots [T]`` (ascending, contiguous) with position ids ``positions [B, T]``; ``valid
        [B, S']`` marks the real (non-padding) slots among the ``S'`` cache slots from
        ``key_start`` on, and attention reads only those (``S'`` = the cache's length on fixed
        shapes, the sequence's length on the eager path; ``key_start`` > 0 only where
        :attr:`supports_key_start`: the eager engine skips slots no row reads any more).

        A step of more than :attr:`prefill_chunk` slots (a long prompt's prefill) runs as
        consecutive chunks of at most that many slots, each reading the cache the previous
        ones wrote: no attention score or mask larger than ``[B, heads, prefill_chunk, S']``
        (and no activation larger than ``prefill_chunk`` rows) exists at once, and the result
        equals the unchunked step.

        ``regions`` (the fast path's regional compilation, :class:`~mctp.engine.regions.
        BlockRegions`; only where :attr:`supports_regions`) runs every layer through the
        compiled graph shared by layers of its kind; same result.

        Returns:
            Final-normed hidden states ``[B, T, H]``.

        Raises:
            ValueError: If ``regions`` is given to a backbone that cannot use them.
        """
        if regions is not None and not self.supports_regions:
            raise ValueError(f"{type(self).__name__} cannot run its layers as compiled regions")
        if key_start and not self.supports_key_start:
            raise ValueError(f"{type(self).__name__} reads its cache from slot 0 (key_start=0)")
        t, chunk = embeds.shape[1], self.prefill_chunk
        if chunk is None or t <= chunk:
            return self._decode(embeds, positions, slots, valid, cache, regions, key_start)
        out: torch.Tensor | None = None
        for i in range(0, t, chunk):
            part = slice(i, i + chunk)
            h = self._decode(
                embeds[:, part], positions[:, part], slots[part], valid, cache, regions, key_start
            )
            if out is None:
                out = h.new_empty(h.shape[0], t, h.shape[2])  # [B, T, H]
            out[:, part] = h
        assert out is not None
        return out

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
        """Cached forward of embeddings ``x [B, T, H]`` at slots ``idx`` -> ``[B, T, H]``
        (``valid`` covers the slots from ``key_start`` on)."""
        raise NotImplementedError(_subclass_only(self, "_decode"))

    # ------------------------------------------------------------------ checks
    def _has_windows(self) -> bool:
        """Whether the self-check must narrow sliding windows."""
        return bool(getattr(self.config, "sliding_window", None))

    def _reread_attention(self) -> None:
        """Re-read what the path caches of the model's attention (after windows changed)."""

    def _require_reproduction(self) -> None:
        """Run :meth:`self_check`; raise if this path does not reproduce the model.

        Raises:
            NotImplementedError: Naming the family, the path and the difference.
        """
        err = self.self_check()
        if err is not None:
            raise NotImplementedError(
                f"{self.family}: the {self.PATH} path does not reproduce the model's own "
                f"forward ({err}); HFBackbone cannot run this model"
            )

    @torch.no_grad()
    def self_check(self) -> str | None:
        """Compare training and cached forwards (prefill, single slots, a rolled-back re-read)
        with ``model(...)`` on a left-padded two-row batch longer than every sliding window
        (windows are narrowed to 3 slots for the check).

        Returns:
            None when this path reproduces the model, else what differs.

        Raises:
            NotImplementedError: If the model's own forward fails on the check's batch.
        """
        shrink: contextlib.AbstractContextManager[None] = (
            shrunk_windows(self.config, self.base.layers, PROBE_WINDOW)
            if self._has_windows()
            else contextlib.nullcontext()
        )
        was_training = self.model.training
        self.model.eval()
        try:
            with shrink:
                self._reread_attention()
                compare_with_model(self)
        except Mismatch as err:
            return str(err)
        finally:
            self.model.train(was_training)
            self._reread_attention()
        return None
