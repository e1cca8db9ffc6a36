"""Quantization without calibration data: weight-only int8, dynamic int8, float16 weights.

- :func:`quantize_weights`: Conv/ConvTranspose/Gemm/MatMul weights stored as int8 and read
  through ``DequantizeLinear`` (or ``Cast`` + ``Mul``); the arithmetic stays float.
- :func:`quantize_dynamic`: MatMul/Gemm by constant weights run in integers, the activation
  quantized at run time (the pattern ONNX Runtime fuses into ``DynamicQuantizeMatMul``).
- :func:`convert_fp16`: float32 weights stored as float16, cast back to float32 on read.

Only the main graph is rewritten: a weight read by a subgraph, a skipped node or an operator
the mode does not handle stays float. Weights are symmetric (zeros stay exactly zero), and a
weight read by several nodes is quantized once.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Literal

import numpy as np

from edgeopt.ir import DataType, Model, Node, QuantParams, Tensor, Value
from edgeopt.ir.quant import quantize, weight_params

from ._quant_plan import weight_axis
from ._util import (
    NameGen,
    add_constant,
    as_tensor,
    constant_tensor,
    default_opset,
    earliest,
    substitute,
)

__all__ = ["convert_fp16", "quantize_dynamic", "quantize_weights"]

log = logging.getLogger(__name__)

Skip = Callable[[Node], bool]

#: Opsets the rewrites need: per-axis DequantizeLinear, DynamicQuantizeLinear.
PER_AXIS_DQ_OPSET = 13
DYNAMIC_OPSET = 11
#: Tensors smaller than this stay float32 in :func:`convert_fp16` (epsilons, exponents, clip
#: bounds: converting them saves nothing, and a 1e-12 epsilon would flush to zero).
FP16_MIN_ELEMENTS = 16
FP16_MAX = float(np.finfo(np.float16).max)


def _keep_all(node: Node) -> bool:
    return False


# -- which weights ------------------------------------------------------------------------
@dataclass
class _Weight:
    """A constant float32 weight and the nodes reading it (all as input 1)."""

    value: Value
    tensor: Tensor
    readers: list[Node] = field(default_factory=list)

    def axis(self, per_channel: bool) -> int | None:
        """The common channel axis of the readers; None for per-tensor."""
        axes = {weight_axis(n, len(self.tensor.shape)) for n in self.readers}
        return axes.pop() if per_channel and len(axes) == 1 else None


def _weights(model: Model, accepts: Callable[[Node], bool], skip: Skip) -> list[_Weight]:
    """Constant float32 weights (input 1) of main-graph nodes that ``accepts``.

    A weight is taken only when every use is such a node's input 1 and it is not a graph
    output: any other reader (a skipped node, a subgraph, another operator) keeps it float.
    """
    found: dict[int, _Weight] = {}
    for node in model.graph:
        if len(node.inputs) < 2 or id(node.inputs[1]) in found or not accepts(node):
            continue
        w = node.inputs[1]
        tensor = constant_tensor(w, model)
        if tensor is None or tensor.dtype != DataType.FLOAT or w.is_graph_output() \
                or 0 in tensor.shape:
            continue
        readers = [u.node for u in w.uses()]
        if all(u.index == 1 and u.node.graph is model.graph and accepts(u.node)
               and not skip(u.node) for u in w.uses()):
            found[id(w)] = _Weight(w, tensor, list(dict.fromkeys(readers)))
    return list(found.values())


def _is_weighted_op(node: Node) -> bool:
    return node.domain in ("", "ai.onnx") and node.op_type in (
        "Conv", "ConvTranspose", "Gemm", "MatMul")


# -- shared arithmetic and rewiring ---------------------------------------------------------
def _new(names: NameGen, base: str, dtype: DataType, shape: object = None) -> Value:
    return Value(names.fresh(base), dtype, shape)  # type: ignore[arg-type]


def _drop(old: Value) -> None:
    """Remove the unread initializer ``old`` (and its graph-input listing, ir_version < 4)."""
    graph = old.graph
    assert graph is not None and not old.uses()
    if old.is_graph_input():
        graph.inputs.remove(old)
    del graph.initializers[old.name]


def _retire(old: Value, replacement: Value) -> None:
    """Let every reader of the initializer ``old`` read ``replacement``, which takes its name."""
    old.replace_all_uses_with(replacement)
    _drop(old)
    replacement.name = old.name


@dataclass
class _Stats:
    """Counters every mode returns."""

    nodes: int = 0
    weights: int = 0
    before: int = 0
    after: int = 0

    def add(self, w: _Weight, new: list[Tensor]) -> None:
        self.weights += 1
        self.before += w.tensor.nbytes
        self.after += sum(t.nbytes for t in new)

    def as_dict(self, noun: str) -> dict[str, int]:
        return {f"nodes_{noun}": self.nodes, f"weights_{noun}": self.weights,
                "weight_bytes_before": self.before, "weight_bytes_after": self.after}


# -- weight-only int8 -----------------------------------------------------------------------
def _dequantizer(model: Model, names: NameGen, w: _Weight, qp: QuantParams, q: np.ndarray,
                 form: str) -> tuple[list[Node], list[Tensor]]:
    """Nodes turning the int8 ``q`` back into float32 (their last output is the weight).

    ``DequantizeLinear`` for ``form="qdq"`` where the opset allows it (per-axis needs 13);
    otherwise ``Cast`` + ``Mul`` by the scales, which is the same arithmetic.
    """
    graph = model.graph
    base = w.value.name
    q_t, s_t = as_tensor(q), as_tensor(qp.scale)
    wq = add_constant(graph, names, f"{base}_q", q_t)
    out = _new(names, f"{base}_dq", DataType.FLOAT, q.shape)
    if form == "qdq" and (qp.axis is None or default_opset(model) >= PER_AXIS_DQ_OPSET):
        # The zero point (0: the weights are symmetric) is left out: it defaults to 0 of
        # the int8 input's type.
        attrs = {} if qp.axis is None else {"axis": qp.axis}
        scale = add_constant(graph, names, f"{base}_s", s_t)
        return [Node("DequantizeLinear", [wq, scale], attrs, outputs=[out])], [q_t, s_t]
    s_t = as_tensor(qp.broadcast(q.ndim)[0])
    scale = add_constant(graph, names, f"{base}_s", s_t)
    cast = _new(names, f"{base}_f", DataType.FLOAT, q.shape)
    return [Node("Cast", [wq], {"to": int(DataType.FLOAT)}, outputs=[cast]),
            Node("Mul", [cast, scale], outputs=[out])], [q_t, s_t]


def quantize_weights(model: Model, *, per_channel: bool = True, skip: Skip = _keep_all,
                     form: Literal["qdq", "cast"] = "qdq") -> dict[str, int]:
    """Store Conv/ConvTranspose/Gemm/MatMul weights as int8 read through DequantizeLinear.

    Each constant float32 weight (input 1) of those operators in the main graph becomes a
    symmetric int8 initializer (zero point 0, scales per output channel: Conv axis 0,
    ConvTranspose axis 1, Gemm axis 0 with ``transB`` else 1, MatMul the last axis; per
    tensor without ``per_channel`` or when readers disagree on the axis) and a
    ``DequantizeLinear`` whose output takes the weight's name. Biases stay float. Every
    dequantized value is within ``scale / 2`` of the original.

    ``form="cast"`` (and, for per-channel weights, opsets below 13, which have no per-axis
    DequantizeLinear) writes ``Cast`` + ``Mul`` by the scales instead: ONNX Runtime folds
    that at load and runs at float speed. It keeps a DequantizeLinear (unless the session
    sets ``session.disable_quant_qdq=1``): a Conv then dequantizes on every run and loses
    its NCHWc layout (PP-OCRv4 det: 1.44x the float time), and a MatMul becomes
    ``MatMulNBits``, which by default also quantizes its activation to int8
    (``session.qdq_matmulnbits_accuracy_level=1`` keeps it float). DequantizeLinear is what
    other runtimes and edgeopt's C backend read as an int8 weight.

    Args:
        model: the model, rewritten in place.
        per_channel: scales per output channel (else one per tensor).
        skip: nodes for which it is True keep their float weight.
        form: ``qdq`` (DequantizeLinear) or ``cast`` (Cast + Mul).

    Returns:
        ``nodes_quantized``, ``weights_quantized``, ``weight_bytes_before``/``_after``.
    """
    stats, names = _Stats(), NameGen(model)
    for w in _weights(model, _is_weighted_op, skip):
        arr = np.asarray(w.tensor.numpy(), np.float32)
        qp = weight_params(arr, w.axis(per_channel))
        nodes, tensors = _dequantizer(model, names, w, qp, quantize(arr, qp), form)
        model.graph.insert_before(earliest(w.readers), nodes)
        _retire(w.value, nodes[-1].outputs[0])
        stats.add(w, tensors)
        stats.nodes += len(w.readers)
    return stats.as_dict("quantized")


# -- dynamic int8 ---------------------------------------------------------------------------
def _trans_b(node: Node) -> bool:
    return node.op_type == "Gemm" and bool(node.attr("transB", 0))


def _integer_matmul(node: Node) -> bool:
    """MatMul, or Gemm without ``transA``, by a 2-D weight: what MatMulInteger computes."""
    w = node.inputs[1] if len(node.inputs) > 1 else None
    if node.domain not in ("", "ai.onnx") or w is None or w.shape is None or len(w.shape) != 2:
        return False
    return node.op_type == "MatMul" or (node.op_type == "Gemm" and not node.attr("transA", 0))


def _integer_conv(node: Node) -> bool:
    """A Conv without groups: depthwise ConvInteger is 5-9x slower than float in ORT."""
    return node.domain in ("", "ai.onnx") and node.op_type == "Conv" \
        and node.attr("group", 1) == 1


@dataclass
class _IntWeight:
    """A weight as the integer kernels read it."""

    q: Value
    zero_point: Value
    scale: np.ndarray  # float32; broadcasts against the kernel's int32 output
    tensors: list[Tensor]
    base: str
    scales: dict[float, Value] = field(default_factory=dict)  # by Gemm alpha


def _int_weight(model: Model, names: NameGen, w: _Weight, per_channel: bool) -> _IntWeight:
    """Quantize ``w`` once for all its readers (which share a layout: checked by the caller).

    MatMul weights are int8 ``[K, N]`` (Gemm's ``transB`` is undone) with zero points per
    column: ORT's fast u8s8 kernels. Conv weights are uint8 with the zero point 128: ORT's
    ConvInteger takes one zero point only, and runs u8s8 about five times slower than u8u8.
    """
    arr = np.asarray(w.tensor.numpy(), np.float32)
    conv = w.readers[0].op_type == "Conv"
    if _trans_b(w.readers[0]):
        arr = np.ascontiguousarray(arr.T)
    qp = weight_params(arr, (0 if conv else 1) if per_channel else None,
                       DataType.UINT8 if conv else DataType.INT8)
    zp, scale = qp.zero_point, qp.scale
    if conv:  # symmetric uint8: every zero point is 128; scales along the output's axis 1
        zp = zp.reshape(-1)[:1].reshape(())
        scale = scale.reshape(-1, *(1,) * (arr.ndim - 2)) if per_channel else scale
    tensors = [as_tensor(quantize(arr, qp)), as_tensor(zp), as_tensor(scale)]
    base = w.value.name
    return _IntWeight(add_constant(model.graph, names, f"{base}_q", tensors[0]),
                      add_constant(model.graph, names, f"{base}_zp", tensors[1]),
                      scale, tensors, base)


def _bias(node: Node, model: Model, names: NameGen) -> tuple[Value | None, list[Node]]:
    """The float term added after the integer product: Conv's B, or Gemm's ``beta * C``."""
    c = node.inputs[2] if len(node.inputs) > 2 else None
    if c is None:
        return None, []
    graph, data = model.graph, constant_tensor(c, model)
    if node.op_type == "Conv":  # a constant (_dynamic_ok), along the output's axis 1
        w = node.inputs[1]  # the float weight, still in place
        assert data is not None and w is not None and w.shape is not None
        arr = np.asarray(data.numpy()).reshape(-1, *(1,) * (len(w.shape) - 2))
        return add_constant(graph, names, f"{c.name}_reshaped", as_tensor(arr)), []
    beta = float(node.attr("beta", 1.0))
    if beta == 1.0:
        return c, []
    if data is not None:
        arr = (np.asarray(data.numpy(), np.float64) * beta).astype(np.float32)
        return add_constant(graph, names, f"{c.name}_beta", as_tensor(arr)), []
    k = add_constant(graph, names, f"{c.name}_beta", as_tensor(np.float32(beta)))
    out = _new(names, f"{c.name}_scaled", DataType.FLOAT, c.shape)
    return out, [Node("Mul", [c, k], outputs=[out])]


def _dynamic_ok(node: Node, model: Model) -> bool:
    """Whether ``node``'s other inputs allow the rewrite (a Conv bias must be constant)."""
    if node.op_type != "Conv" or len(node.inputs) < 3 or node.inputs[2] is None:
        return True
    return constant_tensor(node.inputs[2], model) is not None


def _weight_scale(node: Node, iw: _IntWeight, model: Model, names: NameGen) -> Value:
    """The weight scales of one reader, Gemm's ``alpha`` folded in (one constant per alpha)."""
    alpha = float(node.attr("alpha", 1.0)) if node.op_type == "Gemm" else 1.0
    if alpha not in iw.scales:
        arr = (iw.scale.astype(np.float64) * alpha).astype(np.float32)
        iw.scales[alpha] = add_constant(model.graph, names, f"{iw.base}_s", as_tensor(arr))
    return iw.scales[alpha]


def _dynamic_node(node: Node, iw: _IntWeight, model: Model, names: NameGen) -> None:
    """Replace one reader by DynamicQuantizeLinear + integer kernel + Cast, Mul (+ Add)."""
    x, y = node.inputs[0], node.outputs[0]
    base = node.name or y.name
    xq = _new(names, f"{base}_xq", DataType.UINT8, x.shape if x else None)
    xs = _new(names, f"{base}_xs", DataType.FLOAT, ())
    xz = _new(names, f"{base}_xzp", DataType.UINT8, ())
    acc = _new(names, f"{base}_acc", DataType.INT32)
    accf = _new(names, f"{base}_accf", DataType.FLOAT)
    scale = _new(names, f"{base}_s", DataType.FLOAT)
    out = _new(names, f"{base}_y", DataType.FLOAT, y.shape)
    conv = node.op_type == "Conv"
    attrs = [replace(a) for a in node.attrs.values()] if conv else []
    nodes = [
        Node("DynamicQuantizeLinear", [x], outputs=[xq, xs, xz]),
        Node("ConvInteger" if conv else "MatMulInteger", [xq, iw.q, xz, iw.zero_point], attrs,
             outputs=[acc]),
        Node("Cast", [acc], {"to": int(DataType.FLOAT)}, outputs=[accf]),
        Node("Mul", [xs, _weight_scale(node, iw, model, names)], outputs=[scale]),
        Node("Mul", [accf, scale], outputs=[out]),
    ]
    bias, bias_nodes = _bias(node, model, names)
    if bias is not None:
        biased = _new(names, f"{base}_yb", DataType.FLOAT, y.shape)
        nodes += [*bias_nodes, Node("Add", [out, bias], outputs=[biased])]
    model.graph.insert_before(node, nodes)
    substitute(node, [(y, nodes[-1].outputs[0])])


def quantize_dynamic(model: Model, *, per_channel: bool = True, skip: Skip = _keep_all,
                     conv: Literal["float", "integer"] = "float") -> dict[str, int]:
    """Run MatMul/Gemm by constant weights in int8, quantizing activations at run time.

    Each MatMul (2-D weight) and Gemm (no ``transA``) of the main graph whose weight is a
    constant float32 matrix becomes ``DynamicQuantizeLinear`` (uint8 activation, per-tensor
    range of this run) + ``MatMulInteger`` by the int8 weight (symmetric, per output column) +
    ``Cast`` + ``Mul`` by ``activation scale * weight scales`` (+ ``Add`` of Gemm's
    ``beta * C``): the pattern ONNX Runtime fuses into ``DynamicQuantizeMatMul``. The node's
    output keeps its name. A MatMul of two activations (attention) stays float.

    ``conv="integer"`` also rewrites Convs without groups to ``ConvInteger`` (uint8 weights,
    scales per output channel applied after it). Off by default: in ORT it is slower than
    float Conv except on wide 1x1 convolutions (depthwise: 5-9x slower, never rewritten), and
    per-tensor activations cost accuracy on detection maps. ORT's own ``quantize_dynamic``
    makes every Conv a ConvInteger with int8 weights (its slow path) and one weight scale per
    tensor, whatever ``per_channel`` says: in PP-OCRv4 rec one Conv's output channels span
    1e-40..22.5, so most round to zero, and that alone matches no sequence.

    Args:
        model: the model, rewritten in place (needs opset >= 11; below it nothing changes).
        per_channel: weight scales per output channel (else one per tensor).
        skip: nodes for which it is True stay float.
        conv: ``float`` (leave Convs) or ``integer`` (ConvInteger for Convs without groups).

    Returns:
        ``nodes_quantized``, ``weights_quantized``, ``weight_bytes_before``/``_after``.
    """
    stats, names = _Stats(), NameGen(model)
    if default_opset(model) < DYNAMIC_OPSET:
        log.warning("quant: dynamic int8 needs opset >= %d (the model has %d); nothing done",
                    DYNAMIC_OPSET, default_opset(model))
        return stats.as_dict("quantized")

    def accepts(node: Node) -> bool:
        kind = _integer_conv(node) if conv == "integer" else False
        return (kind or _integer_matmul(node)) and _dynamic_ok(node, model)

    for w in _weights(model, accepts, skip):
        if len({_trans_b(n) for n in w.readers}) > 1:
            continue  # the readers need two layouts: rare, left float
        iw = _int_weight(model, names, w, per_channel)
        for node in w.readers:
            _dynamic_node(node, iw, model, names)
        stats.add(w, iw.tensors)
        stats.nodes += len(w.readers)
        _drop(w.value)
    return stats.as_dict("quantized")


# -- float16 --------------------------------------------------------------------------------
def _fp16_candidate(value: Value, model: Model, skip: Skip) -> Tensor | None:
    """The float32 data of an initializer :func:`convert_fp16` may convert, else None."""
    t = constant_tensor(value, model)
    if t is None or t.dtype != DataType.FLOAT or int(np.prod(t.shape)) < FP16_MIN_ELEMENTS \
            or value.is_graph_output() or not value.uses():
        return None
    if any(u.node.graph is not model.graph or skip(u.node) for u in value.uses()):
        return None
    return t


def convert_fp16(model: Model, *, skip: Skip = _keep_all) -> dict[str, int]:
    """Store the main graph's float32 initializers as float16, cast back to float32 on read.

    Each float32 initializer of at least :data:`FP16_MIN_ELEMENTS` elements, read only by
    main-graph nodes that ``skip`` keeps, becomes a float16 initializer and a ``Cast`` to
    float32 whose output takes its name: the file's weights halve, the model's inputs,
    outputs and arithmetic stay float32 (ONNX Runtime folds the Cast when it loads the
    model, so it runs as fast as before). Full float16 compute is not offered: ORT's CPU
    provider has no float16 kernels on x86 (it casts around every operator itself).

    A tensor holding finite values beyond float16's range (65504) stays float32, with a
    warning, rather than turning them into infinities; infinities and NaN convert as they are.

    Args:
        model: the model, rewritten in place.
        skip: initializers read by a node for which it is True stay float32.

    Returns:
        ``tensors_converted``, ``tensors_out_of_range``, ``weight_bytes_before``/``_after``.
    """
    graph, names, stats, out_of_range = model.graph, NameGen(model), _Stats(), 0
    for value in list(graph.initializers.values()):
        t = _fp16_candidate(value, model, skip)
        if t is None:
            continue
        arr = np.asarray(t.numpy(), np.float32)
        if np.any(np.abs(arr[np.isfinite(arr)]) > FP16_MAX):
            log.warning("quant: %r has values beyond the float16 range; it stays float32",
                        value.name)
            out_of_range += 1
            continue
        half = as_tensor(arr.astype(np.float16))
        out = _new(names, f"{value.name}_float32", DataType.FLOAT, t.shape)
        src = add_constant(graph, names, f"{value.name}_fp16", half)
        cast = Node("Cast", [src], {"to": int(DataType.FLOAT)}, outputs=[out])
        graph.insert_before(earliest(u.node for u in value.uses()), cast)
        _retire(value, out)
        stats.add(_Weight(value, t), [half])
    return {"tensors_converted": stats.weights, "tensors_out_of_range": out_of_range,
            "weight_bytes_before": stats.before, "weight_bytes_after": stats.after}
