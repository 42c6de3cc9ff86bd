"""The subset of hyperpyyaml that GLM-4-Voice's decoder ``config.yaml`` uses, read as plain data.

``!new:`` / ``!name:`` / ``!apply:`` tags become :class:`TaggedNode` values (nothing they name
is imported or called) and ``!ref <key[sub]...>`` references are resolved; any other tag,
reference arithmetic or a dangling reference raises ``ValueError``. Turning the data into
sizes is :mod:`mctp.codecs.glm4voice.config`'s job.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["TaggedNode", "read_hyperpyyaml"]


@dataclass(frozen=True)
class TaggedNode:
    """One hyperpyyaml tagged value (``!new:``, ``!name:``, ``!apply:``).

    Attributes:
        kind: ``"new"``, ``"name"`` or ``"apply"``.
        target: Dotted import path after the colon (never imported here).
        value: The tagged mapping, sequence or scalar (``None`` for an empty node).
    """

    kind: str
    target: str
    value: Any

    @property
    def class_name(self) -> str:
        """Last component of :attr:`target` (``"HiFTGenerator"``)."""
        return self.target.rsplit(".", 1)[-1]


@dataclass(frozen=True)
class _Ref:
    expr: str


_REF_RE = re.compile(r"^<([A-Za-z_][\w]*)((?:\[[^\]]+\])*)>$")


def _yaml_module() -> Any:
    try:
        import yaml
    except ImportError as exc:  # pragma: no cover - PyYAML comes with transformers
        raise ImportError("reading config.yaml needs PyYAML: pip install pyyaml") from exc
    return yaml


def read_hyperpyyaml(text: str) -> dict[str, Any]:
    """Parse hyperpyyaml text into plain data with :class:`TaggedNode` leaves.

    ``!ref <key>`` / ``!ref <key[sub][sub]>`` are replaced by the referenced value;
    arithmetic in references, ``!copy`` and other tags are refused.

    Args:
        text: Content of a hyperpyyaml file.

    Returns:
        The top-level mapping.

    Raises:
        ValueError: On YAML syntax errors, unknown tags, unsupported or dangling references,
            or a document that is not a mapping.
    """
    yaml = _yaml_module()

    class _Loader(yaml.SafeLoader):
        pass

    def _tagged(kind: str, loader: Any, target: str, node: Any) -> TaggedNode:
        if isinstance(node, yaml.MappingNode):
            value: Any = loader.construct_mapping(node, deep=True)
        elif isinstance(node, yaml.SequenceNode):
            value = loader.construct_sequence(node, deep=True)
        else:
            value = loader.construct_scalar(node) or None
        return TaggedNode(kind, target, value)

    def _ref(loader: Any, node: Any) -> _Ref:
        return _Ref(str(loader.construct_scalar(node)).strip())

    def _unknown(loader: Any, suffix: str, node: Any) -> None:
        raise ValueError(f"config.yaml: unsupported hyperpyyaml tag !{suffix} at {node.start_mark}")

    for kind in ("new", "name", "apply"):
        _Loader.add_multi_constructor(f"!{kind}:", functools.partial(_tagged, kind))
    _Loader.add_constructor("!ref", _ref)
    _Loader.add_multi_constructor("!", _unknown)
    try:
        data = yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as exc:
        raise ValueError(f"config.yaml is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ValueError(
            f"config.yaml must hold a mapping at the top level, got {type(data).__name__}"
        )
    return _resolve(data, data, depth=0)


def _lookup(root: Mapping[str, Any], expr: str) -> Any:
    match = _REF_RE.match(expr)
    if match is None:
        raise ValueError(f"config.yaml: unsupported !ref expression {expr!r} (only <key[sub]...>)")
    node: Any = root
    path = [match.group(1), *re.findall(r"\[([^\]]+)\]", match.group(2))]
    for part in path:
        if isinstance(node, TaggedNode):
            node = node.value
        if not isinstance(node, Mapping) or part not in node:
            raise ValueError(f"config.yaml: !ref {expr} points to a missing key {part!r}")
        node = node[part]
    return node


def _resolve(node: Any, root: Mapping[str, Any], depth: int) -> Any:
    if depth > 50:
        raise ValueError("config.yaml: !ref references nest too deeply (cycle?)")
    if isinstance(node, _Ref):
        return _resolve(_lookup(root, node.expr), root, depth + 1)
    if isinstance(node, TaggedNode):
        return TaggedNode(node.kind, node.target, _resolve(node.value, root, depth + 1))
    if isinstance(node, dict):
        return {k: _resolve(v, root, depth + 1) for k, v in node.items()}
    if isinstance(node, list):
        return [_resolve(v, root, depth + 1) for v in node]
    return node
