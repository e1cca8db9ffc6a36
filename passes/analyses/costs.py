"""Compute cost of a model: multiply-accumulates per node, from static shapes."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from edgeopt.ir import Model, Node, Tensor, Value, infer_shapes, static_shapes

__all__ = ["MAC_RULES", "LayerCost", "bind_batch", "layer_costs", "stored_constant"]


@dataclass(frozen=True)
class LayerCost:
    """MACs and parameters of one node."""

    node: str
    op_type: str
    macs: int
    params: int
    output_shape: tuple


def stored_constant(v: Value | None) -> Tensor | None:
    """The constant behind ``v``: its own data, or what a DequantizeLinear reads.

    A weight of a QDQ model is an integer constant read through a DequantizeLinear; it
    counts as that layer's parameters.
    """
    if v is None:
        return None
    if v.const_value is not None:
        return v.const_value
    node = v.producer()
    if node is not None and node.op_type == "DequantizeLinear" and node.inputs \
            and node.inputs[0] is not None:
        return node.inputs[0].const_value
    return None


def _weight_shape(v: Value | None) -> tuple[int, ...] | None:
    t = stored_constant(v)
    shape = t.shape if t is not None else None if v is None else v.shape
    return None if shape is None or not all(isinstance(d, int) for d in shape) \
        else tuple(shape)  # type: ignore[arg-type]


def _numel(v: Value | None) -> int | None:
    if v is None or v.shape is None or not all(isinstance(d, int) for d in v.shape):
        return None
    return math.prod(v.shape)


def _conv(node: Node) -> int | None:
    out, w = _numel(node.outputs[0]), _weight_shape(node.inputs[1])
    if out is None or w is None:
        return None
    return out * math.prod(w[1:])  # each output element: C_in/group * kernel MACs


def _conv_transpose(node: Node) -> int | None:
    x, w = _numel(node.inputs[0]), _weight_shape(node.inputs[1])
    if x is None or w is None:
        return None
    return x * math.prod(w[1:])  # each input element scatters C_out/group * kernel


def _matmul(node: Node) -> int | None:
    a, out = node.inputs[0], _numel(node.outputs[0])
    if a is None or a.shape is None or out is None or not a.shape:
        return None
    k = a.shape[-1]
    if node.op_type == "Gemm" and node.attr("transA", 0):
        k = a.shape[0]
    return out * k if isinstance(k, int) else None


#: op_type -> MAC count of one node (None when shapes are unknown). Add rules for new ops.
MAC_RULES: dict[str, Callable[[Node], int | None]] = {
    "Conv": _conv,
    "ConvTranspose": _conv_transpose,
    "Gemm": _matmul,
    "MatMul": _matmul,
}


def bind_batch(model: Model, size: int = 1) -> Model:
    """A clone whose symbolic input dims are bound to ``size`` and shapes re-inferred."""
    clone = model.clone()
    shapes = {}
    for v in clone.graph.inputs:
        if v.is_initializer() or v.shape is None:
            continue
        shapes[v.name] = tuple(d if isinstance(d, int) else size for d in v.shape)
    if shapes:
        static_shapes(clone, shapes)
    else:
        infer_shapes(clone)
    return clone


def layer_costs(model: Model) -> list[LayerCost]:
    """MACs and weight parameters of every node with a MAC rule (all graphs).

    The model should have static shapes (see :func:`bind_batch`); nodes whose shapes are
    unknown report 0 MACs.
    """
    costs = []
    for node in model.walk():
        rule = MAC_RULES.get(node.op_type) if node.domain in ("", "ai.onnx") else None
        if rule is None:
            continue
        params = sum(t.size for t in map(stored_constant, node.inputs) if t is not None)
        out = node.outputs[0].shape or ()
        costs.append(LayerCost(node.name or node.outputs[0].name, node.op_type,
                               rule(node) or 0, params, tuple(out)))
    return costs
