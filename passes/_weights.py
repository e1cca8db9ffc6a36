"""The weight matrix of a layer: which constant it is and how its axes map to inputs/outputs.

Shared by ``sparsify`` (N:M groups run along the input axis) and ``csr`` (the packing's
``layout``, one row per output; see :mod:`edgeopt.ir.sparse`). A layer is a Conv, Gemm or
2-D MatMul whose weight (input 1) is a constant initializer, read directly (float) or
through a DequantizeLinear (the integer weight of a QDQ model).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterator
from dataclasses import dataclass

from edgeopt.ir import Model, Node, Value
from edgeopt.ir.sparse import Layout

from ._util import constant_tensor, is_default_domain

__all__ = ["LayerWeight", "layer_weight", "layer_weights"]


@dataclass(frozen=True)
class LayerWeight:
    """A layer's constant weight.

    Attributes:
        node: the Conv / Gemm / MatMul.
        value: the initializer holding the stored data (the integer one behind a
            DequantizeLinear for a quantized layer).
        layout: how the dense weight maps onto the ``[outputs, inputs]`` matrix
            (:mod:`edgeopt.ir.sparse`).
        in_axis: the dense weight's input axis (input channels of a Conv, ``K`` of a Gemm).
        dequantize: the DequantizeLinear between ``value`` and the layer, or None.
    """

    node: Node
    value: Value
    layout: Layout
    in_axis: int
    dequantize: Node | None = None

    def matches(self, patterns: tuple[str, ...]) -> bool:
        """Whether the node's name or the weight's name matches an fnmatch pattern."""
        names = [n for n in (self.node.name, self.value.name) if n]
        return any(fnmatch.fnmatchcase(n, p) for n in names for p in patterns)


def _axes(node: Node, rank: int) -> tuple[Layout, int] | None:
    if node.op_type == "Conv" and rank >= 3:
        return "rows", 1
    if node.op_type == "Gemm" and rank == 2:
        return ("rows", 1) if node.attr("transB", 0) else ("cols", 0)
    if node.op_type == "MatMul" and rank == 2:
        return "cols", 0
    return None


def layer_weight(node: Node, model: Model) -> LayerWeight | None:
    """The weight of ``node``, or None if it is not a layer with a constant weight."""
    if not is_default_domain(node) or node.op_type not in ("Conv", "Gemm", "MatMul") \
            or len(node.inputs) < 2 or node.inputs[1] is None:
        return None
    w, dq = node.inputs[1], None
    if constant_tensor(w, model) is None:
        dq = w.producer()
        if dq is None or dq.op_type != "DequantizeLinear" or not is_default_domain(dq) \
                or dq.inputs[0] is None or constant_tensor(dq.inputs[0], model) is None:
            return None
        w = dq.inputs[0]
    axes = _axes(node, len(w.const_value.shape))  # type: ignore[union-attr]
    return None if axes is None else LayerWeight(node, w, *axes, dq)


def layer_weights(model: Model) -> Iterator[LayerWeight]:
    """Every layer weight of the model (all graphs, walk order)."""
    for node in model.walk():
        lw = layer_weight(node, model)
        if lw is not None:
            yield lw
