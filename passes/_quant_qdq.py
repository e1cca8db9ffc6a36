"""The QDQ rewrite of static quantization: a :class:`~._quant_plan.QuantPlan` made concrete.

* every planned activation ``t`` becomes ``QuantizeLinear(t) -> DequantizeLinear``, and every
  reader of ``t`` reads the dequantized value (graph outputs keep the float value itself);
* weights become int8 initializers read through a per-channel ``DequantizeLinear``; biases
  int32 with scale ``x_scale * w_scale`` and zero point 0 (what integer kernels accumulate);
* float constants of quantized Add/Mul are quantized per tensor;
* a fused Relu/Clip is dropped when the quantization after it clamps to the same bounds.

ONNX Runtime fuses ``DequantizeLinear -> op -> QuantizeLinear`` into its integer kernels
(QLinearConv, QLinearMatMul, QLinearAdd, ...).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

from edgeopt.ir import Attr, DataType, Graph, Model, Node, QuantParams, Value
from edgeopt.ir.quant import params_from_range, quantize, weight_params

from ._quant_consts import Constants
from ._quant_plan import RULES, QuantPlan, node_label, weight_axis
from ._util import NameGen, add_constant, as_tensor, constant_tensor, earliest

__all__ = ["FLOAT_WEIGHT", "apply_qdq"]

#: ``Node.meta`` key on a weight's DequantizeLinear: the float weight it replaced (for bias
#: correction; never exported).
FLOAT_WEIGHT = "edgeopt.float_weight"

log = logging.getLogger(__name__)


@dataclass
class _Rewrite:
    model: Model
    names: NameGen
    per_channel: bool
    consts: Constants
    stats: dict[str, int] = field(default_factory=lambda: {
        "tensors_quantized": 0, "weights_quantized": 0, "biases_quantized": 0,
        "activations_fused": 0, "weight_bytes_before": 0, "weight_bytes_after": 0})
    _weights: dict[tuple[int, int | None], tuple[Value, QuantParams]] = field(
        default_factory=dict)

    def dq(self, base: str, q: Value, qp: QuantParams, anchor: Node | None,
           implicit_zero: bool = True) -> Value:
        """A DequantizeLinear of the constant ``q``, placed before ``anchor``.

        A zero point of zeros is left out (it defaults to 0 of ``q``'s type) when
        ``implicit_zero``, or always for int32. Exceptions, where ONNX Runtime needs it
        spelled out: activations (its Q/DQ pair checks want all three inputs) and Gemm
        weights (its QGemm fusion reads the weight's zero point).
        """
        graph = self.model.graph
        s = self.consts.add(f"{base}_s", qp.scale)
        implicit = not qp.zero_point.any() and (implicit_zero or qp.dtype == DataType.INT32)
        z = None if implicit else self.consts.zero_point(qp.zero_point) if qp.axis is None \
            else self.consts.add(f"{base}_zp", qp.zero_point)
        attrs = [] if qp.axis is None else [Attr.infer("axis", qp.axis)]
        out = Value(self.names.fresh(f"{base}_dq"), DataType.FLOAT)
        node = Node("DequantizeLinear", (q, s) if z is None else (q, s, z), attrs, outputs=(out,),
                    name="")
        _place(graph, node, anchor)
        return out

    def stored(self, base: str, q: np.ndarray) -> Value:
        """A new initializer (never shared: bias correction rewrites biases in place)."""
        return add_constant(self.model.graph, self.names, f"{base}_q", as_tensor(q))

    # -- activations ---------------------------------------------------------------------------
    def activation(self, value: Value, qp: QuantParams) -> tuple[Node, Node]:
        """Quantize ``value``: its readers read ``DequantizeLinear(QuantizeLinear(value))``."""
        graph = self.model.graph
        uses = list(value.uses())
        base = value.name
        s = self.consts.add(f"{base}_s", qp.scale)
        z = self.consts.zero_point(qp.zero_point)
        qv = Value(self.names.fresh(f"{base}_q"), qp.dtype)
        out = Value(self.names.fresh(f"{base}_dq"), DataType.FLOAT)
        q = Node("QuantizeLinear", (value, s, z), outputs=(qv,))
        d = Node("DequantizeLinear", (qv, s, z), outputs=(out,))
        producer = value.producer()
        if producer is None:
            first = next(iter(graph), None)
            _place(graph, q, first)
            _place(graph, d, first)
        else:
            graph.insert_after(producer, [q, d])
        for use in uses:
            use.node.set_input(use.index, out)
        self.stats["tensors_quantized"] += 1
        return q, d

    # -- weights and biases --------------------------------------------------------------------
    def weight(self, node: Node, index: int) -> QuantParams | None:
        """Quantize ``node``'s constant weight (once per weight and axis); its parameters."""
        value = node.inputs[index]
        t = constant_tensor(value, self.model)
        if value is None or t is None:
            return None
        w = np.asarray(t.numpy(), np.float32)
        axis = weight_axis(node, w.ndim) if self.per_channel else None
        key = (id(value), axis)
        if key not in self._weights:
            qp = weight_params(w, axis)
            readers = [u.node for u in value.uses() if u.node.graph is node.graph]
            out = self.dq(value.name, self.stored(value.name, quantize(w, qp)), qp,
                          earliest(readers), all(n.op_type != "Gemm" for n in readers))
            out.producer().meta[FLOAT_WEIGHT] = t  # type: ignore[union-attr]
            self._weights[key] = (out, qp)
            self.stats["weights_quantized"] += 1
            self.stats["weight_bytes_before"] += w.nbytes
            self.stats["weight_bytes_after"] += w.size
        out, qp = self._weights[key]
        node.set_input(index, out)
        return qp

    def bias(self, node: Node, index: int, x_scale: np.ndarray, w: QuantParams) -> None:
        """Quantize ``node``'s constant bias to int32 with scale ``x_scale * w_scale``."""
        value = node.inputs[index] if index < len(node.inputs) else None
        t = constant_tensor(value, self.model)
        if value is None or t is None:
            return
        b = np.asarray(t.numpy(), np.float64)
        n = len(w.scale) if w.axis is not None else None
        if b.ndim > 1 and b.shape[:-1] == (1,) * (b.ndim - 1):
            b = b.reshape(-1)
        if b.ndim != 1 or (n is not None and len(b) != n):
            return
        scale = np.broadcast_to((x_scale.astype(np.float32) * w.scale).astype(np.float32),
                                b.shape)
        qp = QuantParams(scale, np.zeros(len(b), np.int32), DataType.INT32, 0)
        node.set_input(index, self.dq(value.name, self.stored(value.name, quantize(b, qp)), qp,
                                      node))
        self.stats["biases_quantized"] += 1

    def constant(self, node: Node, value: Value, dtype: DataType) -> None:
        t = constant_tensor(value, self.model)
        assert t is not None
        c = np.asarray(t.numpy(), np.float32)
        qp = params_from_range(float(c.min(initial=0)), float(c.max(initial=0)), dtype)
        q = self.consts.add(f"{value.name}_q", quantize(c, qp))
        out = self.dq(value.name, q, qp, node, implicit_zero=False)
        for i, v in enumerate(node.inputs):
            if v is value:
                node.set_input(i, out)


def _place(graph: Graph, node: Node, anchor: Node | None) -> None:
    if anchor is None:
        graph.append(node)
    else:
        graph.insert_before(anchor, [node])


def _fuse(rw: _Rewrite, act: Node, source: Value, q: Node, qp: QuantParams,
          clamp: tuple[float, float]) -> bool:
    """Drop ``act`` (a Relu/Clip) when ``q`` saturates at the same bounds; True if done."""
    hi = qp.range()[1]
    if int(qp.zero_point) != qp.qmin or float(hi) > clamp[1] * (1 + 1e-6):
        return False
    q.set_input(0, source)
    graph = rw.model.graph
    graph.remove(act)
    rw.stats["activations_fused"] += 1
    return True


def apply_qdq(model: Model, plan: QuantPlan, params: dict[str, QuantParams],
              per_channel: bool = True) -> dict[str, int]:
    """Rewrite ``model`` per ``plan``; ``params`` maps every planned tensor to its parameters.

    Returns:
        Counters for the pass report.
    """
    names = NameGen(model)
    rw = _Rewrite(model, names, per_channel, Constants(model.graph, names))
    act_dtype = next(iter(params.values())).dtype if params else DataType.INT8
    for node in plan.nodes:
        rule = RULES[node.op_type]
        if rule.weight is not None and rule.weight < len(node.inputs):
            wq = rw.weight(node, rule.weight)
            x = node.inputs[0]
            if wq is not None and rule.bias is not None and x is not None and x.name in params:
                rw.bias(node, rule.bias, params[x.name].scale, wq)
        for v in list(node.inputs):
            if v is not None and id(v) in plan.consts:
                rw.constant(node, v, act_dtype)
    quantizers = {name: rw.activation(value, params[name])
                  for name, value in plan.tensors.items()}
    for act, source in plan.fused.items():
        out = act.outputs[0].name
        if out in quantizers and not _fuse(rw, act, source, quantizers[out][0], params[out],
                                           plan.clamp[out]):
            log.debug("quant: %s kept (range %s)", node_label(act), params[out].range())
    return rw.stats
