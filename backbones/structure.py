"""Where a causal LM's output path runs: the final norm (and any projection) before the lm_head.

MCTP heads end the way the backbone ends: ``h^{k+1} = final_norm(block(z))`` and then the
backbone's lm_head. Which module is that final norm is read from the model itself, not from a
list of attribute names: one short forward with hooks on every module records which tensor
each module produced, and :func:`output_path` walks back from the lm_head's input:

* the module that produced it is the final norm (any normalisation module: ``LayerNorm``,
  ``RMSNorm``, a family's own ``*Norm`` class) wherever it sits (``model.norm``,
  ``transformer.ln_f``, ``model.decoder.final_layer_norm`` one level deeper, or the last
  layer's own norm in a post-norm decoder);
* or it is a linear projection (OPT's ``project_out``) whose input the final norm produced;
  when that projection changes the width, the heads run in the lm_head's width and their
  states pass through the backbone's input projection (OPT's ``project_in``: embedding width
  to decoder width) before the norm and the projection;
* dropout and identity modules on the way are looked through.

Anything else (the lm_head reads a decoder block's output, or a tensor no module returned)
raises one :class:`NotImplementedError` naming the family and what was found.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

__all__ = ["OutputPath", "is_norm", "output_path"]

_PASS_THROUGH = (nn.Dropout, nn.Identity)


@dataclass
class OutputPath:
    """The modules between a model's last decoder state and its lm_head.

    Attributes:
        norm: The final normalisation module.
        projection: A linear map applied after ``norm`` (before the lm_head), or None.
        input_projection: When ``projection`` changes the width: the backbone's map from the
            embedding width into the decoder width (applied first by the heads), else None.
        names: Qualified names of the modules found (for messages).
        width: Width of the lm_head's input, which the heads run in (``H'``).
    """

    norm: nn.Module
    projection: nn.Module | None
    input_projection: nn.Module | None
    width: int
    names: list[str] = field(default_factory=list)

    def module(self) -> nn.Module:
        """The heads' final transform ``[..., H'] -> [..., H']``: the norm, or
        ``input_projection -> norm -> projection`` (shared modules, no copies)."""
        if self.projection is None:
            return self.norm
        parts = [self.norm, self.projection]
        if self.input_projection is not None:
            parts.insert(0, self.input_projection)
        return nn.Sequential(*parts)


def is_norm(module: nn.Module) -> bool:
    """Whether ``module`` is a normalisation layer (torch's or a family's own ``*Norm``)."""
    if isinstance(module, nn.LayerNorm | nn.RMSNorm | nn.GroupNorm):
        return True
    return "norm" in type(module).__name__.lower()


def _first_tensor(value: Any) -> torch.Tensor | None:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, dict):  # transformers' ModelOutput is a dict
        value = list(value.values())
    if isinstance(value, list | tuple):
        for v in value:
            if isinstance(v, torch.Tensor):
                return v
    return None


def _key(t: torch.Tensor) -> tuple[int, tuple[int, ...]]:
    return (t.data_ptr(), tuple(t.shape))


class _Trace:
    """Inputs and outputs of every module call of one forward, in completion order."""

    def __init__(self, model: nn.Module) -> None:
        self.names = {m: n for n, m in model.named_modules()}
        self.inputs: dict[nn.Module, torch.Tensor] = {}
        self.done: list[tuple[nn.Module, tuple[int, tuple[int, ...]]]] = []
        self.alive: list[torch.Tensor] = []  # no storage is freed and reused during the trace
        self.handles = []
        for m in self.names:
            self.handles.append(m.register_forward_pre_hook(self._pre))
            self.handles.append(m.register_forward_hook(self._post))

    def _pre(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        t = _first_tensor(args)
        if t is not None and module not in self.inputs:
            self.inputs[module] = t

    def _post(self, module: nn.Module, args: tuple[Any, ...], out: Any) -> None:
        t = _first_tensor(out)
        if t is not None:
            self.alive.append(t)
            self.done.append((module, _key(t)))

    def producer(self, t: torch.Tensor, exclude: nn.Module | None = None) -> nn.Module | None:
        """The innermost module that returned ``t`` (the first to finish with it)."""
        key = _key(t)
        for module, k in self.done:
            if k == key and module is not exclude:
                return module
        return None

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def output_path(model: nn.Module) -> OutputPath:
    """Find the final norm (and any projection) that feeds ``model``'s lm_head.

    Runs one no-grad forward of two tokens in eval mode (the training flags are restored).

    Args:
        model: A transformers causal LM (``get_output_embeddings()`` is the lm_head).

    Returns:
        :class:`OutputPath`.

    Raises:
        NotImplementedError: Naming the family and the reason, when the lm_head's input does
            not come from a normalisation module (directly or through one linear projection).
    """
    family = type(model).__name__
    lm_head = model.get_output_embeddings()
    embed = model.get_input_embeddings()
    if lm_head is None or embed is None:
        raise NotImplementedError(f"{family}: MCTP heads need input and output embeddings")
    modes = {m: m.training for m in model.modules()}
    trace = _Trace(model)
    try:
        model.eval()
        ids = torch.zeros(1, 2, dtype=torch.long, device=embed.weight.device)
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)
    finally:
        trace.close()
        for m, mode in modes.items():
            m.training = mode
    names = trace.names
    if lm_head not in trace.inputs:
        raise NotImplementedError(f"{family}: its forward never called the lm_head module")

    def walk(t: torch.Tensor, exclude: nn.Module | None) -> nn.Module | None:
        module = trace.producer(t, exclude)
        while isinstance(module, _PASS_THROUGH) and module in trace.inputs:
            module = trace.producer(trace.inputs[module], module)
        return module

    def cannot(reason: str) -> NotImplementedError:
        return NotImplementedError(f"{family} cannot carry MCTP heads: {reason}")

    width = int(lm_head.weight.shape[-1])
    first = walk(trace.inputs[lm_head], lm_head)
    if first is None:
        raise cannot(
            "the lm_head reads a tensor no module returned (an operation after the final "
            "norm outside any module), so the heads cannot end the way the backbone does"
        )
    if is_norm(first):
        return OutputPath(first, None, None, width, [names[first]])
    if not isinstance(first, nn.Linear) or first not in trace.inputs:
        raise cannot(
            f"the lm_head reads the output of {type(first).__name__} ({names[first]!r}), "
            "not of a normalisation module or a projection after one"
        )
    norm = walk(trace.inputs[first], first)
    if norm is None or not is_norm(norm):
        what = "no module" if norm is None else f"{type(norm).__name__} ({names[norm]!r})"
        raise cannot(
            f"the projection {names[first]!r} before the lm_head reads {what}, not a "
            "normalisation module"
        )
    found = [names[norm], names[first]]
    inner = None
    if first.in_features != first.out_features:
        emb_out = next((k for m, k in trace.done if m is embed), None)
        inner = next(
            (
                m
                for m, t in trace.inputs.items()
                if isinstance(m, nn.Linear)
                and emb_out is not None
                and _key(t) == emb_out
                and (m.in_features, m.out_features) == (first.out_features, first.in_features)
            ),
            None,
        )
        if inner is None:
            raise cannot(
                f"the projection {names[first]!r} maps width {first.in_features} to "
                f"{first.out_features} and no input projection maps the embeddings back to "
                f"{first.in_features}, so the heads' states cannot reach the final norm"
            )
        found.insert(0, names[inner])
    return OutputPath(norm, first, inner, width, found)
