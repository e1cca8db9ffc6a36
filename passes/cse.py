"""``cse``: common-subexpression elimination (duplicate constants, then duplicate nodes)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from edgeopt.ir import Attr, AttrType, Graph, Model, Node, Tensor, Value
from edgeopt.ir._export import tensor_bytes

from ._base import Context, PassResult
from ._registry import register_pass
from ._util import constant_tensor
from .fold_constants import NONDETERMINISTIC

__all__ = ["CseOptions", "cse"]


@dataclass(frozen=True)
class CseOptions:
    """Options of ``cse``.

    Attributes:
        max_bytes: constants larger than this are not compared (hashing them would
            materialize lazy weights); default 16 MiB.
    """

    max_bytes: int = 16 << 20

    def validate(self) -> None:
        """Raise ValueError for a negative cap."""
        if self.max_bytes < 0:
            raise ValueError("max_bytes must be >= 0")


def _digest(tensor: Tensor) -> str:
    h = hashlib.sha256()
    for block in tensor_bytes(tensor):
        h.update(block)
    return h.hexdigest()


def _dedupe_constants(graph: Graph, model: Model, opts: CseOptions) -> int:
    """Point readers of byte-identical constants at the first of them."""
    by_shape: dict[tuple, list[Value]] = {}
    for value in graph.initializers.values():
        tensor = constant_tensor(value, model)
        if tensor is not None and tensor.nbytes <= opts.max_bytes and value.uses() \
                and not value.is_graph_output() and tensor.dtype.bitwidth:
            by_shape.setdefault((tensor.dtype, tuple(tensor.shape)), []).append(value)
    merged = 0
    for values in by_shape.values():
        if len(values) < 2:
            continue
        first: dict[str, Value] = {}
        for value in values:
            keep = first.setdefault(_digest(value.const_value), value)
            if keep is not value:
                value.replace_all_uses_with(keep)
                merged += 1
    return merged


def _attr_key(attr: Attr) -> Any:
    value = attr.value
    if attr.type in (AttrType.TENSOR, AttrType.TENSORS):
        tensors = value if isinstance(value, list) else [value]
        value = tuple((t.dtype, tuple(t.shape), _digest(t)) for t in tensors)
    elif isinstance(value, list):
        value = tuple(value)
    return attr.name, int(attr.type), value, attr.ref_attr_name


def _node_key(node: Node) -> tuple | None:
    """What makes two nodes compute the same thing; None for nodes never merged."""
    if node.op_type in NONDETERMINISTIC or any(True for _ in node.subgraphs()) \
            or not node.outputs or any(a.type in (AttrType.GRAPH, AttrType.GRAPHS,
                                                  AttrType.SPARSE_TENSOR, AttrType.TYPE_PROTO,
                                                  AttrType.SPARSE_TENSORS, AttrType.TYPE_PROTOS)
                                       for a in node.attrs.values()):
        return None
    try:
        attrs = tuple(sorted(_attr_key(a) for a in node.attrs.values()))
        hash(attrs)
    except TypeError:
        return None
    return (node.domain, node.op_type, node.overload, len(node.outputs),
            tuple(id(v) if v is not None else None for v in node.inputs), attrs)


def _dedupe_nodes(graph: Graph) -> int:
    seen: dict[tuple, Node] = {}
    merged = 0
    for node in graph:
        key = _node_key(node)
        if key is None:
            continue
        twin = seen.setdefault(key, node)
        if twin is node or any(out.is_graph_output() for out in node.outputs):
            continue  # graph outputs keep their own names (and so their producers)
        for out, keep in zip(node.outputs, twin.outputs, strict=True):
            out.replace_all_uses_with(keep)
        graph.remove(node)
        merged += 1
    return merged


@register_pass("cse", options=CseOptions)
def cse(model: Model, ctx: Context, opts: CseOptions) -> PassResult:
    """Merge byte-identical constants and nodes that compute the same thing.

    Constants are compared by dtype, shape and a hash of their bytes (up to ``max_bytes``;
    graph inputs with defaults are not constants). Nodes are merged when they have the same
    operator, attributes and input values; random ops, nodes with subgraphs, and nodes whose
    outputs are graph outputs are kept. One sweep in topological order merges whole
    duplicated chains. Recurses into subgraphs (no merging across scopes). Unused constants
    are left for ``dce``.

    Requires: a topologically sorted graph. Preserves: nothing when it modifies; outputs are
    bit-identical.
    """
    stats = {"constants_merged": 0, "nodes_merged": 0}
    for graph in [model.graph, *model.graph.subgraphs()]:
        stats["constants_merged"] += _dedupe_constants(graph, model, opts)
        stats["nodes_merged"] += _dedupe_nodes(graph)
    return PassResult(modified=any(stats.values()), stats=stats)
