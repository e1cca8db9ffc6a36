"""Compute cost of a model: multiply-accumulates per node, from static shapes."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from edgeopt.ir import Model, Node, Tensor, Value, infer_shapes, static_shapes

__all__ = ["MAC_RULES", "LayerCost", "bind_batch", "layer_costs", "stored_constant",
           "unbound_inputs"]


@dataclass(frozen=True)
class LayerCost:
    """MACs and parameters of one node."""

    node: str
    op_type: str
    macs: int | None  # None: shapes unknown
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


def bind_batch(model: Model, size: int = 1,
               shapes: Mapping[str, Sequence[int]] | None = None) -> Model:
    """A clone with its inputs' batch bound to ``size`` (or shaped as ``shapes`` says).

    ``shapes`` (input name -> full shape, e.g. from ``--input-shape`` or the calibration data)
    wins. Otherwise only a symbolic axis 0 is bound: other symbolic dims (an image's height
    and width) stay symbolic, and the MACs of the nodes they reach stay unknown rather than
    being counted at a made-up size.
    """
    clone = model.clone()
    given = dict(shapes or {})
    bound: dict[str, Sequence[int | None]] = {}
    for v in clone.graph.inputs:
        if v.is_initializer() or v.shape is None:
            continue
        if v.name in given:
            bound[v.name] = given[v.name]
        elif v.shape:
            bound[v.name] = [d if isinstance(d, int) else size if i == 0 else None
                             for i, d in enumerate(v.shape)]
    if bound:
        static_shapes(clone, bound)
    else:
        infer_shapes(clone)
    return clone


def unbound_inputs(model: Model, shapes: Mapping[str, Sequence[int]] | None = None
                   ) -> list[Value]:
    """Graph inputs with symbolic dims besides the batch (axis 0) that ``shapes`` does not give.

    While there is one, a MAC count would depend on sizes nobody stated: report it unknown.
    """
    return [v for v in model.graph.inputs
            if not v.is_initializer() and v.shape is not None and v.name not in (shapes or {})
            and any(not isinstance(d, int) for d in v.shape[1:])]


def layer_costs(model: Model) -> list[LayerCost]:
    """MACs and weight parameters of every node with a MAC rule (all graphs).

    The model should have static shapes (see :func:`bind_batch`); nodes whose shapes are
    unknown have ``macs`` None.
    """
    costs = []
    for node in model.walk():
        rule = MAC_RULES.get(node.op_type) if node.domain in ("", "ai.onnx") else None
        if rule is None:
            continue
        params = sum(t.size for t in map(stored_constant, node.inputs) if t is not None)
        out = node.outputs[0].shape or ()
        costs.append(LayerCost(node.name or node.outputs[0].name, node.op_type,
                               rule(node), params, tuple(out)))
    return costs
