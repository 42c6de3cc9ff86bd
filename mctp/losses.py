"""Losses for MCTP training: memory-bounded cross-entropy and the stage-aware total."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

__all__ = ["MCTPLoss", "chunked_cross_entropy", "mctp_loss", "total_loss"]


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
    """Result of :func:`mctp_loss`.

    Attributes:
        loss: ``weight * mean_k(CE_k)`` (scalar, differentiable).
        per_head: ``[N]`` detached per-head mean cross-entropies.
        num_targets: ``[N]`` number of scored tokens per head.
    """

    loss: torch.Tensor
    per_head: torch.Tensor
    num_targets: torch.Tensor


def mctp_loss(
    stack: nn.Module,
    hidden: torch.Tensor,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    *,
    position_ids: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    weight: float = 1.0,
    detach_backbone: bool = False,
    chunk_size: int = 2048,
    inputs_embeds: torch.Tensor | None = None,
) -> MCTPLoss:
    """MCTP training loss: ``weight * mean over heads of each head's token-mean CE``.

    Head ``k`` at position ``t`` sees ``(h^k_{t-1}, E(x_t))`` and is scored on
    ``labels[t+1]`` (``-100`` ignored) when ``t`` and ``t+1`` belong to the same packed
    sample and position ``t`` has position id > ``k``. No ``[N, B, T, V]`` logits are built.

    Args:
        stack: The MCTP heads (an :class:`mctp.MCTPStack`; typed as a module so that this
            module does not import the stack, which imports it).
        hidden: ``[B, T, H]`` backbone last hidden states (after the final norm).
        input_ids: ``[B, T]``.
        labels: ``[B, T]`` aligned with ``input_ids`` (the usual causal-LM labels).
        position_ids: ``[B, T]``; restart at 0 per packed sample. Default ``0..T-1``.
        attention_mask: ``[B, T]`` padding mask (1 = real), optional.
        weight: ``mtp_loss_weight``.
        detach_backbone: Stop gradients into the backbone states and embeddings (frozen LLM).
        chunk_size: Rows per cross-entropy block.
        inputs_embeds: Opt-in ``[B, T, H]`` embeddings for the heads instead of
            ``E(input_ids)``; leave None for VITA-Audio-Plus, whose heads embed the placeholder
            ids while the frames reach the backbone only (see :meth:`MCTPStack.forward`).

    Returns:
        :class:`MCTPLoss`.
    """
    out = stack(
        hidden,
        input_ids,
        position_ids=position_ids,
        attention_mask=attention_mask,
        labels=labels,
        return_logits=False,
        detach_backbone=detach_backbone,
        loss_chunk_size=chunk_size,
        inputs_embeds=inputs_embeds,
    )
    assert out.loss_sums is not None and out.num_targets is not None
    per_head = out.loss_sums / out.num_targets.clamp_min(1).to(out.loss_sums.dtype)
    return MCTPLoss(weight * per_head.mean(), per_head.detach(), out.num_targets)


def total_loss(
    main_loss: torch.Tensor | None, mctp: MCTPLoss | None, *, backbone_frozen: bool
) -> torch.Tensor:
    """Stage-aware total: ``main + mctp`` when the backbone trains, ``mctp`` alone when frozen.

    Raises:
        ValueError: If no loss is available for the requested combination.
    """
    if backbone_frozen:
        if mctp is None:
            raise ValueError("a frozen backbone with no MCTP loss leaves nothing to train")
        return mctp.loss
    if main_loss is None:
        raise ValueError("main_loss is required when the backbone trains")
    return main_loss if mctp is None else main_loss + mctp.loss
