"""MCTP heads and the cascaded stack (training forward).

Head ``k`` (VITA-Audio's MCTP module ``k``) at sequence position ``t``::

    z   = proj_k(cat[embed_norm_k(E(x_t)), hidden_norm_k(h^k_{t-1})])   # Linear(2H -> H)
    h^{k+1}_t = final_norm(block_k(z))                                    # one decoder block
    logits    = lm_head(h^{k+1}_t)                                        # predicts x_{t+1}

with ``h^0`` the backbone's final-normed last hidden state. The token embedding ``E``,
``final_norm``, ``lm_head`` and the rotary tables are the backbone's own modules, shared and
never owned here (they do not appear in this module's ``state_dict``/``parameters``). Head
``k`` exists at positions whose position id is > ``k`` and never looks across a packed
sample boundary. Generation uses :class:`mctp.engine.decoding.MCTPDecoder`, a separate object.
Every stack is assembled by :meth:`MCTPStack.from_parts` (heads + a backbone's shared parts).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .backbone import BackboneParts, RotaryFn
from .compat import call_block
from .engine.masks import (
    additive,
    check_batch_shapes,
    default_position_ids,
    segment_ids,
    segment_mask,
    shift_targets,
    valid_positions,
)
from .layers import RMSNorm
from .losses import chunked_cross_entropy
from .stack_files import StackFiles
from .vocab import OutputVocab

__all__ = ["BackboneParts", "MCTPHead", "MCTPOutput", "MCTPStack", "shift_targets"]


class MCTPHead(nn.Module):
    """One MCTP module: two RMSNorms, the fusion projection and one decoder block.

    Args:
        block: A decoder block called as ``block(x, attention_mask=, position_ids=,
            cache=, position_embeddings=)`` returning ``[B, T, H]`` (a
            transformers decoder layer or :class:`mctp.layers.DecoderBlock`).
        hidden_size: ``H``.
        rms_eps: Epsilon of the two input norms.
        init_std: Std of the normal init of ``proj`` (0.02 as in the paper's code).
    """

    def __init__(
        self, *, block: nn.Module, hidden_size: int, rms_eps: float = 1e-6, init_std: float = 0.02
    ) -> None:
        super().__init__()
        self.embed_norm = RMSNorm(hidden_size, rms_eps)
        self.hidden_norm = RMSNorm(hidden_size, rms_eps)
        self.proj = nn.Linear(2 * hidden_size, hidden_size, bias=False)
        nn.init.normal_(self.proj.weight, std=init_std)
        self.block = block

    def fuse(self, embeds: torch.Tensor, prev_hidden: torch.Tensor) -> torch.Tensor:
        """``embeds, prev_hidden [B, T, H]`` -> block input ``[B, T, H]`` (embedding first)."""
        return self.proj(
            torch.cat((self.embed_norm(embeds), self.hidden_norm(prev_hidden)), dim=-1)
        )


@dataclass
class MCTPOutput:
    """Result of :meth:`MCTPStack.forward`.

    Attributes:
        hidden: Per head, its output hidden states ``[B, T, H]`` (after the final norm).
        logits: Per head ``[B, T, V']`` (``V'`` = output vocabulary size), or None.
        targets: ``[N, B, T]`` what head ``k`` is scored on at each position (vocabulary
            ids, -100 where nothing), i.e. ``labels[t+1]`` where valid.
        loss_sums: ``[N]`` summed cross-entropy per head (when labels were given).
        num_targets: ``[N]`` number of scored tokens per head (when labels were given).
    """

    hidden: list[torch.Tensor]
    logits: list[torch.Tensor] | None
    targets: torch.Tensor | None
    loss_sums: torch.Tensor | None
    num_targets: torch.Tensor | None


class MCTPStack(StackFiles, nn.Module):
    """``N`` cascaded MCTP heads on top of any backbone's hidden states.

    ``save_pretrained``, ``from_pretrained`` and ``push_to_hub`` (folders and the Hugging Face
    Hub) come from :class:`~mctp.stack_files.StackFiles`.

    Args:
        heads: The heads, in cascade order.
        embed: Shared input embedding ``ids -> [B, T, H]``.
        norm: Shared final norm.
        lm_head: Shared output projection (``weight [V, H]``).
        rotary: Shared ``(x, position_ids) -> (cos, sin)``, or None.
        output_vocab: Restrict head logits to these vocabulary ids (a slice or a collection);
            ids returned by decoding are mapped back to the full vocabulary.

    Raises:
        ValueError: If there are no heads or their widths differ from the embedding's.
    """

    def __init__(
        self,
        *,
        heads: Sequence[MCTPHead],
        embed: nn.Module,
        norm: nn.Module,
        lm_head: nn.Module,
        rotary: RotaryFn | None = None,
        output_vocab: slice | Sequence[int] | torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        if len(heads) == 0:
            raise ValueError("MCTPStack needs at least one head")
        self.heads = nn.ModuleList(heads)
        self.hidden_size = heads[0].proj.out_features
        for i, h in enumerate(heads):
            if h.proj.out_features != self.hidden_size:
                raise ValueError(
                    f"head {i} has width {h.proj.out_features}, head 0 has {self.hidden_size}"
                )
        weight = getattr(lm_head, "weight", None)
        if weight is None or weight.ndim != 2 or weight.shape[1] != self.hidden_size:
            raise ValueError(
                f"lm_head must have weight [V, {self.hidden_size}], got "
                f"{None if weight is None else tuple(weight.shape)}"
            )
        # Shared modules are held outside the module tree: they belong to the backbone.
        self._shared: dict[str, Any] = {
            "embed": embed,
            "norm": norm,
            "lm_head": lm_head,
            "rotary": rotary,
        }
        self.vocab_size = weight.shape[0]
        self.output_vocab = (
            None if output_vocab is None else OutputVocab(output_vocab, self.vocab_size)
        )

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_backbone(
        cls,
        parts: BackboneParts,
        num_heads: int,
        *,
        block_factory: Callable[[int], nn.Module] | None = None,
        output_vocab: slice | Sequence[int] | torch.Tensor | None = None,
    ) -> MCTPStack:
        """Initialise as VITA-Audio's stages do.

        Head 0's block is a deep copy of the backbone's last block (or ``block_factory(0)``);
        its projection is ``normal(0, 0.02)`` and its norms ones. Heads ``1..N-1`` are deep
        copies of head 0 (stage 3 grows from a trained head 0 the same way, see :meth:`grow`).

        Args:
            parts: Shared parts of the backbone.
            num_heads: ``N >= 1``.
            block_factory: ``head_index -> block``; default copies ``parts.last_block``.
            output_vocab: See the class docstring.

        Raises:
            ValueError: If ``num_heads < 1`` or there is no block to copy.
        """
        if num_heads < 1:
            raise ValueError(f"num_heads must be >= 1, got {num_heads}")
        if block_factory is None:
            if parts.last_block is None:
                raise ValueError("BackboneParts.last_block is None: pass block_factory")
            last = parts.last_block

            def block_factory(_: int) -> nn.Module:
                block = copy.deepcopy(last)
                # heads get dense (additive) masks: a copied flash-attention layer runs SDPA
                cfg = getattr(getattr(block, "self_attn", None), "config", None)
                if str(getattr(cfg, "_attn_implementation", "")).startswith("flash"):
                    cfg._attn_implementation = "sdpa"
                return block

        first = MCTPHead(
            block=block_factory(0), hidden_size=parts.hidden_size, rms_eps=parts.rms_eps
        )
        heads = [first] + [copy.deepcopy(first) for _ in range(num_heads - 1)]
        return cls.from_parts(parts, heads, output_vocab=output_vocab)

    @classmethod
    def from_parts(
        cls,
        parts: BackboneParts,
        heads: Sequence[MCTPHead],
        *,
        output_vocab: slice | Sequence[int] | torch.Tensor | None = None,
    ) -> MCTPStack:
        """Assemble a stack from trained (or fresh) heads and a backbone's shared parts: the one
        assembly path (:meth:`from_backbone`, :meth:`with_output_vocab`, checkpoint readers).

        Raises:
            ValueError: As the constructor.
        """
        return cls(
            heads=heads,
            embed=parts.embed,
            norm=parts.norm,
            lm_head=parts.lm_head,
            rotary=parts.rotary,
            output_vocab=output_vocab,
        )

    def shared_parts(self) -> BackboneParts:
        """The backbone modules this stack shares (``last_block`` is None: not kept here)."""
        return BackboneParts(
            embed=self.embed,
            norm=self.norm,
            lm_head=self.lm_head,
            rotary=self.rotary,
            last_block=None,
            hidden_size=self.hidden_size,
            rms_eps=float(self.heads[0].embed_norm.eps),
        )

    def grow(self, n: int) -> None:
        """Append ``n`` heads, each a deep copy of the current last head (stage 3).

        Raises:
            ValueError: If ``n < 1``.
        """
        if n < 1:
            raise ValueError(f"grow needs n >= 1, got {n}")
        for _ in range(n):
            self.heads.append(copy.deepcopy(self.heads[-1]))

    def with_output_vocab(
        self, output_vocab: slice | Sequence[int] | torch.Tensor | None
    ) -> MCTPStack:
        """A view of this stack (same heads and shared parts) scoring another output vocabulary.

        Used to restrict heads to the audio tokens at generation time without touching the
        trained stack.
        """
        return type(self).from_parts(
            self.shared_parts(), list(self.heads), output_vocab=output_vocab
        )

    # ------------------------------------------------------------------ shared parts
    @property
    def num_heads(self) -> int:
        """Number of heads ``N``."""
        return len(self.heads)

    @property
    def embed(self) -> nn.Module:
        """The shared input embedding."""
        return self._shared["embed"]

    @property
    def norm(self) -> nn.Module:
        """The shared final norm."""
        return self._shared["norm"]

    @property
    def lm_head(self) -> nn.Module:
        """The shared output projection."""
        return self._shared["lm_head"]

    @property
    def rotary(self) -> RotaryFn | None:
        """The shared rotary-table function (or None)."""
        return self._shared["rotary"]

    def head_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """``hidden [..., H]`` -> logits ``[..., V']`` over the output vocabulary."""
        if self.output_vocab is None:
            return self.lm_head(hidden)
        return self.output_vocab.logits(hidden, self.lm_head)

    def to_global_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """Map output-vocabulary ids (indices into :meth:`head_logits`) to vocabulary ids."""
        return ids if self.output_vocab is None else self.output_vocab.to_global(ids)

    def position_embeddings(
        self, x: torch.Tensor, position_ids: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Rotary tables for ``position_ids [B, T]`` in ``x``'s dtype (None without rotary)."""
        return None if self.rotary is None else self.rotary(x, position_ids)

    # ------------------------------------------------------------------ training forward
    def forward(
        self,
        hidden: torch.Tensor,
        input_ids: torch.Tensor,
        *,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        return_logits: bool = True,
        detach_backbone: bool = False,
        num_heads: int | None = None,
        loss_chunk_size: int = 2048,
        outside_vocab: str = "error",
        inputs_embeds: torch.Tensor | None = None,
    ) -> MCTPOutput:
        """Teacher-forced forward of all heads over a (packed) batch.

        Args:
            hidden: ``[B, T, H]`` backbone last hidden states (after its final norm).
            input_ids: ``[B, T]`` token ids.
            position_ids: ``[B, T]``, restarting at 0 for every packed sample; default
                ``0..T-1`` (or counted over the mask when ``attention_mask`` is given).
            attention_mask: ``[B, T]`` padding mask (1 = real token), optional.
            labels: ``[B, T]`` causal-LM labels aligned with ``input_ids``; enables losses.
            return_logits: Also return ``[B, T, V']`` logits per head (memory heavy).
            detach_backbone: Cut gradients into ``hidden`` and the embeddings.
            num_heads: Run only the first heads (default all).
            loss_chunk_size: Rows per cross-entropy block.
            outside_vocab: With an output vocabulary, what to do with a target outside it:
                ``"error"`` (raise) or ``"ignore"`` (drop that target).
            inputs_embeds: Opt-in, off by default: ``[B, T, H]`` embeddings for the heads to
                pair ``h^k_{t-1}`` with instead of ``E(x_t)`` (e.g. the audio-encoder frames the
                backbone was fed). VITA-Audio-Plus does NOT do this: its MTP modules embed the
                placeholder token ids while the frames replace the placeholders in the backbone
                only, so leave this None to train or score a Plus model.

        Returns:
            :class:`MCTPOutput`.

        Raises:
            ValueError: On inconsistent shapes, an unknown ``outside_vocab``, too many heads,
                or (``outside_vocab="error"``) a target the output vocabulary cannot produce.
        """
        b, t = input_ids.shape
        if hidden.shape != (b, t, self.hidden_size):
            raise ValueError(
                f"hidden must be [B, T, H] = {(b, t, self.hidden_size)}, got {tuple(hidden.shape)}"
            )
        check_batch_shapes(
            b, t, position_ids=position_ids, attention_mask=attention_mask, labels=labels
        )
        if outside_vocab not in ("error", "ignore"):
            raise ValueError(f"outside_vocab must be 'error' or 'ignore', got {outside_vocab!r}")
        n = self.num_heads if num_heads is None else num_heads
        if not 1 <= n <= self.num_heads:
            raise ValueError(f"num_heads must be in [1, {self.num_heads}], got {n}")
        if position_ids is None:
            position_ids = default_position_ids(input_ids, attention_mask)

        if inputs_embeds is not None and inputs_embeds.shape != hidden.shape:
            raise ValueError(
                f"inputs_embeds must be [B, T, H] = {tuple(hidden.shape)}, got {tuple(inputs_embeds.shape)}"
            )
        if detach_backbone:
            hidden = hidden.detach()
            with torch.no_grad():
                embeds = self.embed(input_ids) if inputs_embeds is None else inputs_embeds.detach()
        else:
            embeds = self.embed(input_ids) if inputs_embeds is None else inputs_embeds

        targets = None
        if labels is not None:
            targets = shift_targets(labels, position_ids, attention_mask)
            if self.output_vocab is not None:
                local = self.output_vocab.to_local(targets)
                bad = local == -1
                if bad.any():
                    if outside_vocab == "error":
                        ids = targets[bad].unique()[:10].tolist()
                        raise ValueError(
                            f"targets {ids} lie outside the heads' output vocabulary; pass "
                            "outside_vocab='ignore' to drop them or train with the full vocabulary"
                        )
                    local = torch.where(bad, -100, local)
                score_targets = local
            else:
                score_targets = targets

        rope = self.position_embeddings(embeds, position_ids)
        h = hidden
        outs: list[torch.Tensor] = []
        logits: list[torch.Tensor] = []
        all_targets, sums, counts = [], [], []
        for k in range(n):
            head = self.heads[k]
            prev = torch.cat((h.new_zeros(b, 1, self.hidden_size), h[:, :-1]), dim=1)  # h^k_{t-1}
            z = head.fuse(embeds, prev)
            seg = segment_ids(position_ids, attention_mask, min_position=k + 1)
            y = call_block(
                head.block,
                z,
                attention_mask=additive(segment_mask(seg), z.dtype),
                position_ids=position_ids,
                position_embeddings=rope,
            )
            h = self.norm(y)
            outs.append(h)
            if return_logits:
                logits.append(self.head_logits(h))
            if targets is not None:
                valid = valid_positions(position_ids, attention_mask, min_position=k + 1)
                all_targets.append(torch.where(valid, targets, -100))
                s, c = chunked_cross_entropy(
                    h,
                    torch.where(valid, score_targets, -100),
                    self.head_logits,
                    chunk_size=loss_chunk_size,
                )
                sums.append(s)
                counts.append(c)
        return MCTPOutput(
            hidden=outs,
            logits=logits if return_logits else None,
            targets=torch.stack(all_targets) if all_targets else None,
            loss_sums=torch.stack(sums) if sums else None,
            num_targets=torch.stack(counts) if counts else None,
        )
