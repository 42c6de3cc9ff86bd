"""The MCTP training loss: memory-bounded cross-entropy and the one stage loss.

Every cross-entropy is a sum divided by ``num_items_in_batch`` (the official VITA-Audio
normalisation); :func:`mctp_loss` gives the heads' term and :func:`total_loss` the stage total.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

__all__ = ["MCTPLoss", "chunked_cross_entropy", "count_items", "mctp_loss", "total_loss"]


def chunked_cross_entropy(
    hidden: torch.Tensor,
    targets: torch.Tensor,
    logits_fn: Callable[[torch.Tensor], torch.Tensor],
    *,
    chunk_size: int = 2048,
    ignore_index: int = -100,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed cross-entropy without materialising all logits at once.

    Only rows with a target are scored, ``chunk_size`` rows at a time; under autograd each
    chunk is checkpointed, so at most one ``[chunk_size, V]`` block of logits is alive.

    Args:
        hidden: ``[..., H]`` hidden states.
        targets: ``[...]`` long ids into the logits' last dimension, ``ignore_index`` to skip.
        logits_fn: ``[M, H] -> [M, V]``.
        chunk_size: Rows per block.
        ignore_index: Target value that is skipped.

    Returns:
        ``(loss_sum, count)``: float32 scalar sum of per-token losses and the number of scored
        tokens (long scalar).

    Raises:
        ValueError: If shapes disagree or ``chunk_size < 1``.
    """
    if hidden.shape[:-1] != targets.shape:
        raise ValueError(
            f"hidden {tuple(hidden.shape)} and targets {tuple(targets.shape)} disagree"
        )
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    flat_h = hidden.reshape(-1, hidden.shape[-1])
    flat_t = targets.reshape(-1)
    keep = (flat_t != ignore_index).nonzero().squeeze(-1)
    count = torch.tensor(keep.numel(), device=hidden.device)
    total = (
        hidden.new_zeros((), dtype=torch.float32) + 0.0 * flat_h.sum()
    )  # keeps the graph when empty
    if keep.numel() == 0:
        return total, count
    h, t = flat_h.index_select(0, keep), flat_t.index_select(0, keep)

    def block(hb: torch.Tensor, tb: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits_fn(hb).float(), tb, reduction="sum")

    for s in range(0, h.shape[0], chunk_size):
        hb, tb = h[s : s + chunk_size], t[s : s + chunk_size]
        if torch.is_grad_enabled() and hb.requires_grad:
            total = total + checkpoint(block, hb, tb, use_reentrant=False)
        else:
            total = total + block(hb, tb)
    return total, count


@dataclass
class MCTPLoss:
    """Result of :func:`mctp_loss` (or :meth:`from_sums` over accumulated sums).

    Attributes:
        loss: The MCTP term ``weight * mean_k(S_k / num_items)`` (scalar, differentiable when
            the sums are), with ``S_k`` head ``k``'s summed cross-entropy.
        per_head: ``[N]`` detached per-head token means ``S_k / n_k`` (for logs; not the loss).
        num_targets: ``[N]`` number of scored tokens ``n_k`` per head.
        loss_sums: ``[N]`` detached summed cross-entropies ``S_k``.
        num_items: The divisor ``num_items_in_batch`` the loss used (scalar tensor).
        output: The stack's :class:`~mctp.MCTPOutput` (logits and targets when
            :func:`mctp_loss` was asked for ``return_logits``), None from :meth:`from_sums`.
    """

    loss: torch.Tensor
    per_head: torch.Tensor
    num_targets: torch.Tensor
    loss_sums: torch.Tensor | None = None
    num_items: torch.Tensor | None = None
    output: Any = None

    @classmethod
    def from_sums(
        cls,
        loss_sums: torch.Tensor,
        num_targets: torch.Tensor,
        num_items: torch.Tensor | int | float,
        *,
        weight: float = 1.0,
    ) -> MCTPLoss:
        """The MCTP term from summed cross-entropies: ``weight * mean_k(S_k / num_items)``.

        The one place the normalisation is written: :func:`mctp_loss`, the trainer's forward
        and its evaluation all come through here.

        Args:
            loss_sums: ``[N]`` summed cross-entropies per head (``N >= 1``).
            num_targets: ``[N]`` scored tokens per head.
            num_items: The divisor (clamped to at least 1).
            weight: ``mtp_loss_weight``.

        Returns:
            :class:`MCTPLoss` (``output`` None).

        Raises:
            ValueError: If the sums are not ``[N]`` with ``N >= 1`` or the counts disagree.
        """
        if loss_sums.ndim != 1 or loss_sums.numel() == 0:
            raise ValueError(f"loss_sums must be [N] with N >= 1, got {tuple(loss_sums.shape)}")
        if num_targets.shape != loss_sums.shape:
            raise ValueError(
                f"num_targets {tuple(num_targets.shape)} and loss_sums "
                f"{tuple(loss_sums.shape)} disagree"
            )
        divisor = _divisor(num_items, loss_sums)
        per_head = loss_sums.detach() / num_targets.clamp_min(1).to(loss_sums.dtype)
        return cls(
            loss=weight * (loss_sums / divisor).mean(),
            per_head=per_head,
            num_targets=num_targets,
            loss_sums=loss_sums.detach(),
            num_items=divisor.detach(),
        )


def _divisor(num_items: torch.Tensor | int | float, like: torch.Tensor) -> torch.Tensor:
    """``num_items`` as a float scalar tensor on ``like``'s device, at least 1."""
    return torch.as_tensor(num_items, device=like.device).to(like.dtype).clamp_min(1)


def count_items(
    labels: torch.Tensor,
    position_ids: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """The labelled next-token targets of a batch: its ``num_items_in_batch`` alone.

    The backbone's next-token targets (``labels[t+1]`` where ``t+1`` continues ``t``'s packed
    sample, see :func:`mctp.shift_targets`) that are not ``-100``. transformers' ``Trainer``
    sums exactly this over the micro-batches of an optimizer step (and over all ranks) from
    the collator's ``shift_labels``.

    Args:
        labels: ``[B, T]`` causal-LM labels aligned with the inputs.
        position_ids: ``[B, T]`` restarting at 0 per packed sample; default ``0..T-1``
            (counted over the mask when one is given).
        attention_mask: ``[B, T]`` padding mask or None.

    Returns:
        Long scalar tensor.
    """
    from .engine.masks import default_position_ids, shift_targets

    if position_ids is None:
        position_ids = default_position_ids(labels, attention_mask)
    return (shift_targets(labels, position_ids, attention_mask) != -100).sum()


def mctp_loss(
    stack: nn.Module,
    hidden: torch.Tensor,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    *,
    position_ids: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    weight: float = 1.0,
    num_items_in_batch: torch.Tensor | int | None = None,
    detach_backbone: bool = False,
    chunk_size: int = 2048,
    inputs_embeds: torch.Tensor | None = None,
    return_logits: bool = False,
) -> MCTPLoss:
    """The MCTP term of the training loss, normalised as the official VITA-Audio trainer.

    ``loss = weight * mean_k(S_k / num_items_in_batch)``: ``S_k`` is head ``k``'s summed
    cross-entropy over its scored tokens and ``num_items_in_batch`` the labelled next-token
    targets of the whole accumulated batch (all micro-batches of one optimizer step, all
    data-parallel ranks), the divisor transformers' ``Trainer`` hands to ``compute_loss``. The
    full stage loss is :func:`total_loss` (``main + weight * mean_k``), the main term divided by
    the same count. :class:`mctp.training.MCTPTrainer` computes its loss with these two
    functions, so a loop of one's own that passes the same ``num_items_in_batch`` gets the
    trainer's number.

    Relation to a per-token mean: with ``num_items_in_batch=None`` the divisor is this batch's
    own count (:func:`count_items`), and the term equals ``weight * mean_k`` of each head's
    per-token mean (``per_head``) exactly when every head scores as many tokens as the
    backbone (``n_k = num_items``). Head ``k`` scores no token at position ids ``<= k`` (it has
    no ``h^k`` there), so on real data ``n_k < num_items`` and each head's term is its token
    mean scaled by ``n_k / num_items``: later heads weigh slightly less, as in the official
    trainer. Under gradient accumulation or data parallelism pass the accumulated count: the
    sum of the micro-batch losses is then the loss of the whole batch, whatever the split.

    Head ``k`` at position ``t`` sees ``(h^k_{t-1}, E(x_t))`` and is scored on
    ``labels[t+1]`` (``-100`` ignored) when ``t`` and ``t+1`` belong to the same packed
    sample and position ``t`` has position id > ``k``. No ``[N, B, T, V]`` logits are built
    unless ``return_logits``.

    Args:
        stack: The MCTP heads (an :class:`mctp.MCTPStack`; typed as a module so that this
            module does not import the stack, which imports it).
        hidden: ``[B, T, H]`` backbone last hidden states (after the final norm).
        input_ids: ``[B, T]``.
        labels: ``[B, T]`` aligned with ``input_ids`` (the usual causal-LM labels).
        position_ids: ``[B, T]``; restart at 0 per packed sample. Default ``0..T-1``.
        attention_mask: ``[B, T]`` padding mask (1 = real), optional.
        weight: ``mtp_loss_weight``.
        num_items_in_batch: Labelled tokens of the accumulated batch; None: this batch's own
            count (:func:`count_items`).
        detach_backbone: Stop gradients into the backbone states and embeddings (frozen LLM).
        chunk_size: Rows per cross-entropy block.
        inputs_embeds: Opt-in ``[B, T, H]`` embeddings for the heads instead of
            ``E(input_ids)``; leave None for VITA-Audio-Plus, whose heads embed the placeholder
            ids while the frames reach the backbone only (see :meth:`MCTPStack.forward`).
        return_logits: Also keep every head's ``[B, T, V']`` logits in ``output`` (evaluation;
            memory heavy).

    Returns:
        :class:`MCTPLoss`.

    Raises:
        ValueError: On inconsistent shapes (from the stack).
    """
    out = stack(
        hidden,
        input_ids,
        position_ids=position_ids,
        attention_mask=attention_mask,
        labels=labels,
        return_logits=return_logits,
        detach_backbone=detach_backbone,
        loss_chunk_size=chunk_size,
        inputs_embeds=inputs_embeds,
    )
    assert out.loss_sums is not None and out.num_targets is not None
    if num_items_in_batch is None:
        num_items_in_batch = count_items(labels, position_ids, attention_mask)
    res = MCTPLoss.from_sums(out.loss_sums, out.num_targets, num_items_in_batch, weight=weight)
    res.output = out
    return res


def total_loss(
    main_loss: torch.Tensor | None,
    mctp: MCTPLoss | None,
    *,
    backbone_frozen: bool,
    main_count: torch.Tensor | int | None = None,
    num_items_in_batch: torch.Tensor | int | None = None,
) -> torch.Tensor:
    """The stage loss: ``main + mctp.loss`` when the backbone trains, ``mctp.loss`` when frozen.

    The main term is the backbone's summed cross-entropy over ``num_items_in_batch``, from its
    token mean: ``main_loss * main_count / num_items_in_batch`` (``HFBackbone``'s ``out.loss``
    and ``out.num_targets``). ``num_items_in_batch`` defaults to the count ``mctp`` was
    normalised by; without ``main_count`` the main term is ``main_loss`` itself, which is
    right when the batch is the whole accumulated batch (``out.loss`` is then the summed
    cross-entropy over the same count that :func:`mctp_loss` used by default).

    Args:
        main_loss: The backbone's token-mean next-token cross-entropy, or None.
        mctp: :func:`mctp_loss`'s result, or None (no heads).
        backbone_frozen: Drop the main loss (stages 2 and 3).
        main_count: Tokens ``main_loss`` averages over (needed with ``num_items_in_batch``).
        num_items_in_batch: Labelled tokens of the accumulated batch; None: ``mctp``'s.

    Returns:
        Scalar tensor.

    Raises:
        ValueError: If no loss is available for the requested combination, ``main_count`` is
            missing where needed, or ``mctp`` was normalised by another count.
    """
    explicit = num_items_in_batch is not None
    if mctp is not None and mctp.num_items is not None:
        if explicit and not torch.equal(_divisor(num_items_in_batch, mctp.loss), mctp.num_items):
            raise ValueError(
                f"mctp_loss was normalised by {float(mctp.num_items):g} items, total_loss is "
                f"given num_items_in_batch={float(_divisor(num_items_in_batch, mctp.loss)):g}; "
                "pass the same count to both"
            )
        num_items_in_batch = mctp.num_items
    if backbone_frozen:
        if mctp is None:
            raise ValueError("a frozen backbone with no MCTP loss leaves nothing to train")
        return mctp.loss
    if main_loss is None:
        raise ValueError("main_loss is required when the backbone trains")
    if main_count is not None and num_items_in_batch is not None:
        count = torch.as_tensor(main_count, device=main_loss.device).to(main_loss.dtype)
        main_loss = main_loss * (count / _divisor(num_items_in_batch, main_loss))
    elif explicit:
        raise ValueError("main_count is required with num_items_in_batch")
    return main_loss if mctp is None else main_loss + mctp.loss
