"""Attention masks for packed training and cached decoding (boolean, True = may attend).

Packed batches follow the usual convention: position ids restart at 0 for every sample,
so a sample boundary is wherever a position id is not its predecessor's plus one.
"""

from __future__ import annotations

import warnings

import torch

__all__ = [
    "additive",
    "decode_mask",
    "default_position_ids",
    "segment_ids",
    "segment_mask",
    "shift_targets",
    "valid_positions",
    "warn_unmasked_padding",
]


def default_position_ids(
    input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Position ids ``[B, T]``: ``0..T-1``, or counted over unpadded tokens when a mask is given.

    Args:
        input_ids: ``[B, T]``.
        attention_mask: ``[B, T]`` with 1 for real tokens (left or right padding), or None.

    Returns:
        ``[B, T]`` long; padded slots get position 0.
    """
    b, t = input_ids.shape
    if attention_mask is None:
        return torch.arange(t, device=input_ids.device).expand(b, t)
    m = attention_mask.long()
    return ((m.cumsum(-1) - 1) * m).clamp_min(0)


def valid_positions(
    position_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, min_position: int = 0
) -> torch.Tensor:
    """``[B, T]`` bool: real tokens whose position id is at least ``min_position``."""
    valid = position_ids >= min_position
    if attention_mask is not None:
        valid = valid & attention_mask.bool()
    return valid


def segment_ids(
    position_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, min_position: int = 0
) -> torch.Tensor:
    """Number the attention segments of a (packed) batch.

    A new segment starts at every sample boundary; tokens that are padding or whose
    position id is below ``min_position`` each form a segment of their own (they attend
    only to themselves, so nothing else sees them and they never produce NaNs).

    Args:
        position_ids: ``[B, T]`` long.
        attention_mask: ``[B, T]`` (1 = real token) or None.
        min_position: Tokens with smaller position ids are isolated (MCTP head ``k`` uses
            ``k + 1``).

    Returns:
        ``[B, T]`` long, non-decreasing along ``T`` in each row.
    """
    valid = valid_positions(position_ids, attention_mask, min_position)
    start = torch.ones_like(valid)
    if position_ids.shape[1] > 1:
        cont = position_ids[:, 1:] == position_ids[:, :-1] + 1
        start[:, 1:] = ~(cont & valid[:, 1:] & valid[:, :-1])
    return start.long().cumsum(-1)


def segment_mask(segments: torch.Tensor, window: int | None = None) -> torch.Tensor:
    """Block-diagonal causal mask ``[B, 1, T, T]`` from segment ids ``[B, T]``.

    Args:
        segments: ``[B, T]`` segment ids.
        window: Sliding window: a query at index ``i`` sees keys ``j`` with
            ``i - window < j <= i`` (transformers' convention), or None for full attention.
    """
    t = segments.shape[1]
    causal = torch.ones(t, t, dtype=torch.bool, device=segments.device).tril()
    if window is not None:
        causal = causal & ~torch.ones_like(causal).tril(-window)
    return (segments[:, :, None] == segments[:, None, :]).unsqueeze(1) & causal


def decode_mask(
    query_index: torch.Tensor,
    key_valid: torch.Tensor,
    window: int | None = None,
    key_start: int = 0,
) -> torch.Tensor:
    """Mask for queries at cache indices ``query_index [T]`` over a static cache.

    Args:
        query_index: ``[T]`` long, the cache slots the new tokens are written to.
        key_valid: ``[B, S]`` bool, slots ``key_start .. key_start + S - 1`` that may be
            attended to at all (written, not padding, and, for MCTP head ``k``, position id
            > ``k``).
        window: Sliding window over cache slots (``query_index[q] - window < s``), as
            transformers counts it (left padding included), or None.
        key_start: The cache slot of ``key_valid``'s first column (the eager path skips
            slots no row reads any more).

    Returns:
        ``[B, 1, T, S]`` bool: slot ``s`` is visible to query ``q`` iff
        ``s <= query_index[q]`` (and inside the window) and ``key_valid[s]``, and always
        ``s == query_index[q]``.
    """
    s = torch.arange(key_start, key_start + key_valid.shape[1], device=key_valid.device)
    causal = s[None, :] <= query_index[:, None]  # [T, S]
    if window is not None:
        causal = causal & (s[None, :] > query_index[:, None] - window)
    own = s[None, :] == query_index[:, None]
    return ((causal[None] & key_valid[:, None, :]) | own[None]).unsqueeze(1)


def additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Boolean mask (True = attend) -> additive float mask (0 / dtype's minimum).

    Additive masks mean the same to every attention implementation (transformers' eager
    attention adds the mask to the scores; SDPA and :class:`mctp.layers.DecoderBlock` accept
    both forms), so MCTP heads always receive this form.
    """
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(
        ~mask, torch.finfo(dtype).min
    )


def check_batch_shapes(b: int, t: int, **tensors: torch.Tensor | None) -> None:
    """Raise ``ValueError`` naming the first given tensor whose shape is not ``[b, t]``."""
    for name, x in tensors.items():
        if x is not None and x.shape != (b, t):
            raise ValueError(f"{name} must be [B, T] = {(b, t)}, got {tuple(x.shape)}")


def shift_targets(
    labels: torch.Tensor, position_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Next-token targets ``[B, T]``: ``labels[t+1]`` when ``t+1`` continues ``t``'s sample.

    Args:
        labels: ``[B, T]`` causal-LM labels aligned with the inputs (-100 = ignore).
        position_ids: ``[B, T]``, restarting at 0 per packed sample.
        attention_mask: ``[B, T]`` padding mask or None.

    Returns:
        ``[B, T]`` long; -100 at the last position, at sample ends and before padding.
    """
    out = torch.full_like(labels, -100)
    if labels.shape[1] < 2:
        return out
    same = position_ids[:, 1:] == position_ids[:, :-1] + 1
    if attention_mask is not None:
        m = attention_mask.bool()
        same = same & m[:, 1:] & m[:, :-1]
    out[:, :-1] = torch.where(same, labels[:, 1:], -100)
    return out


def warn_unmasked_padding(input_ids: torch.Tensor, pad_id: int | None, what: str) -> None:
    """Warn (``UserWarning``) when rows of a batch given without an attention mask begin or
    end with ``pad_id``: that padding is read as real tokens, so those rows get a different
    answer than the same prompts alone (transformers warns for the same input). Call it only
    when no mask was given; it reads one small tensor from the device.

    Args:
        input_ids: ``[B, T]``.
        pad_id: The padding id, or None (nothing to check).
        what: Who reads the batch and names its padding id (e.g. ``"generate (pad_id)"``).
    """
    if not isinstance(pad_id, int) or input_ids.shape[0] < 2 or input_ids.shape[1] == 0:
        return
    edges = input_ids[:, [0, -1]] == pad_id  # [B, 2]: first and last token
    rows = edges.any(dim=1).nonzero().flatten().tolist()
    if rows:
        warnings.warn(
            f"{what}: rows {rows} of a {input_ids.shape[0]}-row batch begin or end with padding "
            f"id {pad_id} and no attention_mask was given, so the padding is read as real "
            "tokens and those rows get a different answer than alone; pass attention_mask "
            "(1 = real token, padding on the left)",
            UserWarning,
            stacklevel=3,
        )
