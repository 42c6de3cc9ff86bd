"""The construction-time self-check of ``HFBackbone``: the wrapper against ``model(...)``.

A left-padded two-row batch longer than every (narrowed) sliding window runs three ways through
a backbone (training forward, cached prefill + single slots, a rolled-back re-read) and is
compared with the model's own forward; :class:`Mismatch` says what differs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from mctp.engine.masks import default_position_ids

if TYPE_CHECKING:
    from .base import HFBackbone

__all__ = ["PROBE_WINDOW", "Mismatch", "compare_with_model"]

#: Sliding windows are narrowed to this many slots during the self-check.
PROBE_WINDOW = 3


class Mismatch(Exception):
    """The wrapper's output differs from the model's own forward."""


def compare_with_model(bb: HFBackbone) -> None:
    """Run the check's batch through ``bb`` and through ``bb.model`` (windows as they are now:
    the caller narrows them).

    Raises:
        Mismatch: Naming the forward that differs and by how much, or the error ``bb``'s own
            path raised.
        NotImplementedError: If the model's own forward fails on the batch.
    """
    device = bb.lm_head.weight.device
    n, pad = PROBE_WINDOW + 7, 2  # longer than the (narrowed) window; row 1 left-padded
    v = max(bb.vocab_size, 2)
    ids = (torch.arange(2 * n, device=device).view(2, n) * 7 + 3) % v
    mask = torch.ones(2, n, dtype=torch.long, device=device)
    mask[1, :pad] = 0
    pos = default_position_ids(ids, mask)
    try:
        ref = bb.model(
            input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False
        ).logits.float()
    except Exception as err:  # the model's own forward: report, never guess
        raise NotImplementedError(
            f"{bb.family}: the model's own forward fails on a left-padded 2 x {n} batch "
            f"({type(err).__name__}: {err}); HFBackbone cannot run this model"
        ) from err
    try:
        _compare_ours(bb, ids, mask, pos, ref)
    except Mismatch:
        raise
    except Exception as err:  # our loop could not run this model's layers
        raise Mismatch(f"{type(err).__name__}: {err}") from err


def _compare_ours(
    bb: HFBackbone, ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor, ref: torch.Tensor
) -> None:
    n = ids.shape[1]
    ours = bb.forward(ids, position_ids=pos, attention_mask=mask, return_logits=True)
    assert ours.logits is not None
    real = mask.bool()
    tol = _tolerance(bb, ref)
    _close(ref[real], ours.logits.float()[real], "training forward", tol)
    # cached: prefill all but the last 3 slots, then one slot at a time, then roll back
    cache = bb.setup_caches(2, n)
    embeds = bb.model.get_input_embeddings()(ids)
    index = torch.arange(n, device=ids.device)
    split = n - 3
    got = [bb._decode(embeds[:, :split], pos[:, :split], index[:split], real, cache)]
    for i in range(split, n):
        sl = slice(i, i + 1)
        got.append(bb._decode(embeds[:, sl], pos[:, sl], index[sl], real, cache))
    redo = bb._decode(embeds[:, split:], pos[:, split:], index[split:], real, cache)
    cached = bb._logits(torch.cat(got, 1)).float()
    _close(ref[real], cached[real], "cached decode", tol)
    tail = real[:, split:]
    _close(ref[:, split:][tail], bb._logits(redo).float()[tail], "cached re-read", tol)


def _tolerance(bb: HFBackbone, ref: torch.Tensor) -> float:
    fp32 = ref.dtype == torch.float32 and bb.lm_head.weight.dtype == torch.float32
    return (1e-3 if fp32 else 5e-2) * max(1.0, ref.abs().max().item())


def _close(ref: torch.Tensor, ours: torch.Tensor, what: str, tol: float) -> None:
    err = (ref - ours).abs().max().item()
    if not err <= tol:  # also catches NaN
        raise Mismatch(f"{what}: max |logit diff| {err:.3g} > {tol:.3g}")
