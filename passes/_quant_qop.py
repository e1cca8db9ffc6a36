"""QDQ -> QOperator lowering: QLinear operators with 8-bit tensors flowing between them.

A QDQ graph computes each quantized operator in float between ``DequantizeLinear`` (DQ) and
``QuantizeLinear`` (Q) nodes. :func:`lower_to_qoperator` rewrites each *island*
``DQ(s) -> Op [-> Relu/Clip] -> Q`` into an integer form that reads the DQs' integer inputs
and writes the Q's integer output, so quantized operators (residual Adds included) pass
int8/uint8 tensors to each other directly. The table :data:`_RULES` maps operators to:

* QLinearConv, QLinearMatMul, QGemm, QLinearAdd/Mul, QLinear(Global)AveragePool,
  QLinearConcat, QLinearSigmoid, QLinearLeakyRelu (``com.microsoft`` where ONNX has none);
* the same operator on the integers, for data movement (MaxPool, Reshape, Resize-nearest,
  Pad, ...) whose input and output share their quantization: exact, as ``Q(DQ(a)) == a``;
* for Relu/Clip: nothing when the output quantization already saturates at its bounds, an
  integer Clip when the quantization is shared, else QLinearLeakyRelu(alpha=0).

Islands no rule accepts stay QDQ (correct, just slower); the model's interface is kept.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from edgeopt.ir import Attr, DataType, Model, Node, QuantParams, Value, quant_params
from edgeopt.ir.quant import quantize

from ._quant_consts import Constants
from ._quant_plan import clip_bounds
from ._util import NameGen, constant_tensor, default_opset, substitute
from .dce import remove_unused_initializers

__all__ = ["MS_DOMAIN", "lower_to_qoperator"]

#: ONNX Runtime's contrib-operator domain (QLinearAdd, QGemm, ...), imported at version 1.
MS_DOMAIN = "com.microsoft"
_Q8 = (DataType.INT8, DataType.UINT8)
_DEFAULT = ("", "ai.onnx")
_SCALE_RTOL = 1e-6  # a bias scale this close to x_scale * w_scale is taken as equal
_STATS = ("qlinear_nodes", "integer_nodes", "activations_absorbed", "qdq_removed",
          "float_ops_kept", "activations_to_uint8")


@dataclass(frozen=True)
class _QT:
    """A quantized tensor as QLinear operators read it.

    ``value`` is a DQ's integer input (island inputs) or a Q's output (outputs, replaced).
    """

    value: Value
    params: QuantParams
    scale: Value
    zero_point: Value | None  # None: omitted in the Q/DQ (``params`` has its value)

    @property
    def per_tensor(self) -> bool:
        return self.params.scale.size == 1  # a 1-element vector counts


@dataclass
class _Island:
    """``DQ(s) -> node -> tail -> Q``: a float operator between quantized tensors.

    ``ins`` by input index; ``outs`` per output up to the last read one (None: unread);
    ``tail``: the Relu/Clip nodes before the Q that its quantization absorbs.
    """

    node: Node
    ins: dict[int, _QT]
    outs: list[_QT | None]
    tail: list[Node]

    @property
    def x(self) -> _QT:
        return self.ins[0]

    @property
    def y(self) -> _QT:
        out = self.outs[0]
        assert out is not None
        return out


class _Emit:
    """What one rule creates: nodes (inserted on success) and constants.

    A rule makes every check before it creates anything, so a refusal leaves no trace.
    """

    def __init__(self, cx: _Cx, island: _Island) -> None:
        self.cx, self.island = cx, island
        self.nodes: list[Node] = []

    def node(self, op: str, inputs: list[Value | None], attrs: dict | None = None,
             domain: str = "", n_out: int = 1) -> list[Value]:
        """Create ``op`` whose outputs mirror the island's outputs (shape, quantized type)."""
        outs = []
        for i in range(n_out):
            like, qt = self.island.node.outputs[i], self.island.outs[i]
            dtype = qt.params.dtype if qt is not None else None
            outs.append(Value(self.cx.names.fresh(f"{like.name or 'out'}_int"), dtype,
                              like.shape))
        node = Node(op, inputs, attrs or {}, domain=domain, outputs=outs,
                    name=self.island.node.name)
        self.nodes.append(node)
        return list(node.outputs)

    def zero_point(self, qt: _QT, scalar: bool = True) -> Value:
        """``qt``'s zero point as a value, made where the Q/DQ left it out.

        With ``scalar``, per-channel zero points that are all one value (what
        :func:`_weight` accepts) become one shared scalar, which QLinearConv and
        QLinearMatMul take beside per-channel scales; QGemm wants one per scale.
        """
        zp = qt.params.zero_point
        one = zp.size == 1 or len(np.unique(zp)) == 1
        if qt.zero_point is not None and (zp.size == 1 or not (scalar and one)):
            return qt.zero_point
        if scalar and one:
            return self.cx.consts.zero_point(zp.ravel()[:1].reshape(()))
        return self.const(f"{qt.value.name}_zp", zp)

    def triple(self, qt: _QT, scalar: bool = True) -> list[Value]:
        """``[value, scale, zero_point]``, the order QLinear operators read."""
        return [qt.value, qt.scale, self.zero_point(qt, scalar)]

    def const(self, base: str, array: np.ndarray) -> Value:
        """An initializer holding ``array`` (a scalar one may be shared)."""
        return self.cx.consts.add(base, array)


class _Cx:
    """What the lowering of one model shares."""

    def __init__(self, model: Model) -> None:
        self.model = model
        self.graph = model.graph
        self.names = NameGen(model)
        self.consts = Constants(self.graph, self.names)
        self.opset = default_opset(model)
        self.stats: Counter[str] = Counter(dict.fromkeys(_STATS, 0))

    def const(self, value: Value | None) -> np.ndarray | None:
        """The data of a compile-time constant, else None."""
        tensor = constant_tensor(value, self.model)
        return None if tensor is None else np.asarray(tensor.numpy())


# -- helpers shared by the rules ---------------------------------------------------------
def _same(a: QuantParams, b: QuantParams) -> bool:
    """Identical quantization (the integers of one mean the same reals in the other)."""
    return a.dtype == b.dtype and a.scale.size == b.scale.size \
        and np.array_equal(a.scale.ravel(), b.scale.ravel()) \
        and np.array_equal(a.zero_point.ravel(), b.zero_point.ravel()) \
        and (a.scale.size == 1 or a.axis == b.axis)


def _activations(isl: _Island, *qts: _QT) -> bool:
    """Per-tensor 8-bit tensors of the output's type (what QLinear operators chain on)."""
    return all(qt.per_tensor and qt.params.dtype == isl.y.params.dtype for qt in qts)


def _weight(x: _QT, w: _QT, axis: int, n: int | None) -> bool:
    """``w`` is int8 (uint8 beside uint8 ``x``), per tensor or along ``axis``, one zero point."""
    p = w.params
    if p.dtype != DataType.INT8 and not (p.dtype == DataType.UINT8 == x.params.dtype):
        return False
    if len(np.unique(p.zero_point)) != 1:
        return False
    shape = w.value.shape
    return p.scale.size == 1 or (shape is not None and p.axis is not None
                                 and p.axis % len(shape) == axis and p.scale.size == n)


def _bias(e: _Emit, qt: _QT, want: np.ndarray, n: int | None, factor: float = 1.0
          ) -> Value | None:
    """The int32 bias on scale ``want``: the DQ's integers, or a constant rounded onto it.

    The DQ's own integers serve when its scale (times ``factor``) already is ``want``.
    """
    p, shape = qt.params, qt.value.shape
    if p.dtype != DataType.INT32 or np.any(p.zero_point != 0) or shape != (n,):
        return None
    have = np.broadcast_to(p.scale.astype(np.float64) * factor, (n,))
    want = np.broadcast_to(np.asarray(want, np.float64), (n,))
    if np.allclose(have, want, rtol=_SCALE_RTOL, atol=0):
        return qt.value
    data = e.cx.const(qt.value)
    if data is None:
        return None
    q = np.rint(data.astype(np.float64) * have / want)
    if np.any(np.abs(q) > 2 ** 31 - 1):
        return None
    return e.const(f"{qt.value.name}_rescaled", q.astype(np.int32))


def _quantized_bounds(bounds: tuple[float, float], p: QuantParams) -> tuple[int, int]:
    with np.errstate(over="ignore", invalid="ignore"):
        q = quantize(np.array(bounds, np.float32), p)
    return int(q[0]), int(q[1])


def _clamps(node: Node, cx: _Cx, p: QuantParams) -> bool:
    """Quantizing to ``p`` already clamps as ``node`` does: ``Q(clip(x)) == Q(x)``.

    Q is monotone, so ``Q(clip(x, lo, hi)) == clip(Q(x), Q(lo), Q(hi))``: ``Q(x)`` exactly
    when ``Q(lo)`` is ``qmin`` and ``Q(hi)`` is ``qmax``.
    """
    bounds = clip_bounds(node, cx.model)
    return bounds is not None and _quantized_bounds(bounds, p) == (p.qmin, p.qmax)


def _attrs(node: Node, drop: tuple[str, ...] = ()) -> dict[str, Attr]:
    return {k: dataclasses.replace(a) for k, a in node.attrs.items() if k not in drop}


# -- rules: each returns the new integer outputs (aligned with island.outs) or None -------
def _conv(e: _Emit, isl: _Island) -> list[Value] | None:
    x, w, y = isl.x, isl.ins[1], isl.y
    n = w.value.shape[0] if w.value.shape else None
    if not _activations(isl, x) or not _weight(x, w, 0, n):
        return None
    bias = None
    if 2 in isl.ins:
        bias = _bias(e, isl.ins[2], x.params.scale * w.params.scale, n)
        if bias is None:
            return None
    ins = [*e.triple(x), *e.triple(w), y.scale, e.zero_point(y), *([] if bias is None else [bias])]
    return e.node("QLinearConv", ins, _attrs(isl.node))


def _matmul(e: _Emit, isl: _Island) -> list[Value] | None:
    a, b, y = isl.x, isl.ins[1], isl.y
    shape = b.value.shape
    per_column = shape is not None and len(shape) == 2
    if not _activations(isl, a) or not (b.per_tensor or per_column) \
            or not _weight(a, b, 1, shape[1] if per_column else None):
        return None
    return e.node("QLinearMatMul", [*e.triple(a), *e.triple(b), y.scale, e.zero_point(y)])


def _gemm(e: _Emit, isl: _Island) -> list[Value] | None:
    """Gemm -> QGemm: bias on the int32 accumulator, one rounding (as in the QDQ graph)."""
    a, b, y, node = isl.x, isl.ins[1], isl.y, isl.node
    trans_b = node.attr("transB", 0)
    alpha, beta = node.attr("alpha", 1.0), node.attr("beta", 1.0)
    shape = b.value.shape
    n = None if shape is None or len(shape) != 2 else shape[0 if trans_b else 1]
    if n is None or not _activations(isl, a) or not _weight(a, b, 0 if trans_b else 1, n):
        return None
    bias = None
    if 2 in isl.ins:
        want = np.float32(alpha) * a.params.scale * b.params.scale
        bias = _bias(e, isl.ins[2], want, n, factor=beta)
        if bias is None:
            return None
    ins = [*e.triple(a), *e.triple(b, scalar=False), bias, y.scale, e.zero_point(y)]
    return e.node("QGemm", ins, _attrs(node, drop=("beta",)), MS_DOMAIN)


def _binary(op: str) -> Callable[[_Emit, _Island], list[Value] | None]:
    def lower(e: _Emit, isl: _Island) -> list[Value] | None:
        a, b, y = isl.x, isl.ins[1], isl.y
        if not _activations(isl, a, b):
            return None
        return e.node(op, [*e.triple(a), *e.triple(b), y.scale, e.zero_point(y)], domain=MS_DOMAIN)
    return lower


def _unary(op: str, keep: tuple[str, ...] = (), extra: dict | None = None
           ) -> Callable[[_Emit, _Island], list[Value] | None]:
    """A one-input QLinear contrib op; other attributes than ``keep`` make it refuse."""
    def lower(e: _Emit, isl: _Island) -> list[Value] | None:
        node = isl.node
        other = [k for k in node.attrs if k not in keep]
        if other and (other != ["dilations"] or set(node.attr("dilations")) != {1}):
            return None
        if not _activations(isl, isl.x):
            return None
        attrs = {**_attrs(node, drop=("dilations",)), **(extra or {})}
        ins = [*e.triple(isl.x), isl.y.scale, e.zero_point(isl.y)]
        return e.node(op, ins, attrs, MS_DOMAIN)
    return lower


def _concat(e: _Emit, isl: _Island) -> list[Value] | None:
    ins = [isl.ins[i] for i in range(len(isl.node.inputs))]
    if not _activations(isl, *ins):
        return None
    if all(_same(qt.params, isl.y.params) for qt in ins):  # plain Concat of the integers
        return e.node("Concat", [qt.value for qt in ins], _attrs(isl.node))
    flat = [v for qt in ins for v in e.triple(qt)]
    return e.node("QLinearConcat", [isl.y.scale, e.zero_point(isl.y), *flat],
                  _attrs(isl.node), MS_DOMAIN)


def _clamp(e: _Emit, isl: _Island) -> list[Value] | None:
    """Relu/Clip between quantized tensors: nothing, an integer Clip, or a table lookup."""
    x, y = isl.x, isl.y
    bounds = clip_bounds(isl.node, e.cx.model)
    if bounds is None or not _activations(isl, x):
        return None
    if _same(x.params, y.params):
        lo, hi = _quantized_bounds(bounds, y.params)
        if (lo, hi) == (y.params.qmin, y.params.qmax):
            return [x.value]  # the quantization already clamps: the op disappears
        if e.cx.opset < 12:  # integer Clip
            return None
        np_type = y.params.zero_point.dtype
        lo_v, hi_v = (e.const(f"{isl.node.outputs[0].name}_{k}", np.array(b, np_type))
                      for k, b in (("min", lo), ("max", hi)))
        return e.node("Clip", [x.value, lo_v, hi_v])
    if isl.node.op_type == "Relu":  # requantizing Relu: LeakyRelu's lookup table, alpha 0
        return e.node("QLinearLeakyRelu", [*e.triple(x), y.scale, e.zero_point(y)],
                      {"alpha": 0.0}, MS_DOMAIN)
    return None


def _move(accept: Callable[[Node], bool] | None = None, optional_outputs: bool = False
          ) -> Callable[[_Emit, _Island], list[Value] | None]:
    """The same operator on the integers, when every output shares the input's quantization.

    Every output must be read unless ``optional_outputs`` (MaxPool's Indices).
    """
    def lower(e: _Emit, isl: _Island) -> list[Value] | None:
        if not optional_outputs and len(isl.outs) != len(isl.node.outputs):
            return None
        if not all(qt is not None and _same(qt.params, isl.x.params) for qt in isl.outs):
            return None
        if accept is not None and not accept(isl.node):
            return None
        ins = [isl.x.value, *isl.node.inputs[1:]]
        return e.node(isl.node.op_type, ins, _attrs(isl.node), n_out=len(isl.outs))
    return lower


def _pad(e: _Emit, isl: _Island) -> list[Value] | None:
    """Pad on the integers; the constant pad value becomes its quantized value."""
    node, p = isl.node, isl.x.params
    if not all(qt is not None and _same(qt.params, p) for qt in isl.outs):
        return None
    ins = list(node.inputs) + [None] * (3 - len(node.inputs))
    ins[0] = isl.x.value
    if node.attr("mode", "constant") == "constant":
        c = e.cx.const(ins[2]) if ins[2] is not None else np.float32(0)
        if c is None or c.size != 1:
            return None
        ins[2] = e.const(f"{node.outputs[0].name}_pad_value", quantize(c.reshape(()), p))
    return e.node("Pad", ins, _attrs(node))


@dataclass(frozen=True)
class _Rule:
    """How one float operator is lowered.

    ``lower`` builds the integer form (or returns None) of an island whose ``quantized``
    inputs (None: all) are DQ outputs, in models of opset ``min_opset`` or more.
    """

    lower: Callable[[_Emit, _Island], list[Value] | None]
    quantized: tuple[int, ...] | None = (0,)
    min_opset: int = 10


_POOL_ATTRS = ("auto_pad", "ceil_mode", "count_include_pad", "kernel_shape", "pads", "strides")

_RULES: dict[str, _Rule] = {
    "Conv": _Rule(_conv, (0, 1, 2)),
    "MatMul": _Rule(_matmul, (0, 1)),
    "Gemm": _Rule(_gemm, (0, 1, 2)),
    "Add": _Rule(_binary("QLinearAdd"), (0, 1)),
    "Mul": _Rule(_binary("QLinearMul"), (0, 1)),
    "GlobalAveragePool": _Rule(_unary("QLinearGlobalAveragePool",
                                      extra={"channels_last": 0})),
    "AveragePool": _Rule(_unary("QLinearAveragePool", _POOL_ATTRS)),
    "Sigmoid": _Rule(_unary("QLinearSigmoid")),
    "LeakyRelu": _Rule(_unary("QLinearLeakyRelu", ("alpha",))),
    "Concat": _Rule(_concat, None),
    "Relu": _Rule(_clamp),
    "Clip": _Rule(_clamp),
    "MaxPool": _Rule(_move(optional_outputs=True), min_opset=12),  # ORT's int8 MaxPool
    **{op: _Rule(_move()) for op in ("Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze",
                                     "Identity", "Slice", "Split", "Gather")},
    "Resize": _Rule(_move(lambda n: n.attr("mode", "nearest") in ("nearest", b"nearest")),
                    min_opset=11),
    "Pad": _Rule(_pad, min_opset=11),
}


# -- matching ----------------------------------------------------------------------------
def _is_op(node: Node | None, op: str) -> bool:
    return node is not None and node.op_type == op and node.domain in _DEFAULT


def _qt(node: Node, value: Value) -> _QT | None:
    """``value``'s quantization through ``node`` (its DQ or Q), with constant parameters."""
    params = quant_params(value)
    ins = (*node.inputs, None)
    if params is None or ins[1] is None or any(v.is_graph_input() for v in ins[1:3] if v) \
            or (ins[2] is None and node.attr("output_dtype") is not None):
        return None  # (quant_params reads an omitted Q zero point as uint8)
    integer = ins[0] if node.op_type == "DequantizeLinear" else node.outputs[0]
    assert integer is not None
    return _QT(integer, params, ins[1], ins[2])


def _dequantized(value: Value | None, cx: _Cx) -> _QT | None:
    node = value.producer() if value is not None else None
    if not _is_op(node, "DequantizeLinear") or node.graph is not cx.graph:
        return None
    return _qt(node, value)


def _requantized(value: Value, cx: _Cx) -> _QT | None:
    """The tensor of the one Q reading ``value`` (and nothing else reading it)."""
    uses = value.uses()
    if len(uses) != 1 or value.is_graph_output() or uses[0].index != 0:
        return None
    q = uses[0].node
    if not _is_op(q, "QuantizeLinear") or q.graph is not cx.graph:
        return None
    qt = _qt(q, value)
    return qt if qt is not None and qt.per_tensor and qt.params.dtype in _Q8 else None


def _tail(value: Value, cx: _Cx) -> tuple[list[Node], Value]:
    """Relu/Clip nodes that alone read ``value`` (in a chain), and the chain's end."""
    tail: list[Node] = []
    while len(value.uses()) == 1 and not value.is_graph_output():
        use = value.uses()[0]
        if use.index != 0 or use.node.graph is not cx.graph \
                or not (_is_op(use.node, "Relu") or _is_op(use.node, "Clip")):
            break
        tail.append(use.node)
        value = use.node.outputs[0]
    return tail, value


def _match(node: Node, rule: _Rule, cx: _Cx) -> _Island | None:
    """The island around ``node``, if its inputs and outputs are quantized as ``rule`` needs."""
    indices = range(len(node.inputs)) if rule.quantized is None else rule.quantized
    ins = {i: _dequantized(node.inputs[i], cx) for i in indices
           if i < len(node.inputs) and node.inputs[i] is not None}
    x = ins.get(0)
    if x is None or None in ins.values() or not x.per_tensor or x.params.dtype not in _Q8:
        return None
    tail, end = _tail(node.outputs[0], cx) if len(node.outputs) == 1 else ([], node.outputs[0])
    values = [end, *node.outputs[1:]]
    read = [v.uses() or v.is_graph_output() for v in values]
    outs = [_requantized(v, cx) if r else None for v, r in zip(values, read, strict=True)]
    if any(r and qt is None for r, qt in zip(read, outs, strict=True)):
        return None
    while outs and outs[-1] is None:
        outs.pop()
    if not outs or outs[0] is None or not all(_clamps(t, cx, outs[0].params) for t in tail):
        return None
    return _Island(node, ins, outs, tail)  # type: ignore[arg-type]  # None refused above


# -- rewriting ---------------------------------------------------------------------------
def _commit(isl: _Island, emit: _Emit, new: list[Value], cx: _Cx) -> None:
    """Put the emitted nodes in place of the island; drop the Q/DQ nodes left unread."""
    graph = cx.graph
    dqs = list(dict.fromkeys(v.producer() for v in isl.node.inputs if v is not None
                             and _is_op(v.producer(), "DequantizeLinear")))
    qs = [qt.value.producer() for qt in isl.outs if qt is not None]
    read = [v for n in (isl.node, *isl.tail, *dqs, *qs) if n is not None for v in n.inputs]
    graph.insert_after(isl.node, emit.nodes)
    created = {id(v) for n in emit.nodes for v in n.outputs}
    for qt, value in zip(isl.outs, new, strict=False):
        if qt is None:
            continue
        q = qt.value.producer()
        assert q is not None
        if id(value) not in created and not qt.value.is_graph_output():
            qt.value.replace_all_uses_with(value)  # an existing integer tensor goes on
            graph.remove(q)
        else:
            if id(value) not in created:  # a public name needs a node of its own
                ident = Node("Identity", [value], outputs=[Value("", qt.params.dtype)])
                graph.insert_after(isl.node, ident)
                value = ident.outputs[0]
            substitute(q, [(qt.value, value)])
        cx.stats["qdq_removed"] += 1
    graph.remove([isl.node, *isl.tail])
    for dq in dqs:
        out = dq.outputs[0]
        if not out.uses() and not out.is_graph_output():
            graph.remove(dq)
            cx.stats["qdq_removed"] += 1
    remove_unused_initializers(cx.graph, cx.model, read)
    if any(n.domain == MS_DOMAIN for n in emit.nodes):
        cx.model.opset_imports.setdefault(MS_DOMAIN, 1)
    cx.stats["activations_absorbed"] += len(isl.tail) + (not emit.nodes)
    for node in emit.nodes:
        qlinear = node.op_type.startswith("QLinear") or node.op_type == "QGemm"
        cx.stats["qlinear_nodes" if qlinear else "integer_nodes"] += 1


def _lower(node: Node, cx: _Cx) -> None:
    rule = _RULES.get(node.op_type) if node.domain in _DEFAULT else None
    if rule is None or cx.opset < rule.min_opset:
        return
    isl = _match(node, rule, cx)
    if isl is None:
        return
    emit = _Emit(cx, isl)
    new = rule.lower(emit, isl)
    if new is not None:
        _commit(isl, emit, new, cx)
    else:
        assert not emit.nodes, f"{node.op_type}'s rule refused after creating nodes"


def _float_ops_kept(cx: _Cx) -> int:
    """Operators still computing in float on dequantized tensors (islands left as QDQ)."""
    return sum(not _is_op(node, "DequantizeLinear")
               and any(_is_op(v.producer(), "DequantizeLinear") for v in node.inputs if v)
               for node in cx.graph)


def _activations_to_uint8(cx: _Cx) -> None:
    """Move int8 activations to uint8: ``q + 128`` with zero point ``z + 128``, exactly.

    Each QuantizeLinear to int8 whose output only DQs of the same parameters read gets a
    uint8 zero point, and so do those DQs: the real values are unchanged (the clamp bounds
    move by 128 too), weights stay int8, and the integer kernels run u8s8, which ONNX
    Runtime's x86 kernels run several times faster than s8s8.
    """
    for q in cx.graph:
        x, out = q.inputs[0] if q.inputs else None, q.outputs[0]
        if not _is_op(q, "QuantizeLinear") or x is None or len(x.uses()) != 1 \
                or _is_op(x.producer(), "DequantizeLinear"):
            continue  # quant_params(x) reports this Q's parameters only when it alone reads x
        qt = _qt(q, x)
        if qt is None or qt.params.dtype != DataType.INT8 or not qt.per_tensor \
                or out.is_graph_output() or not out.uses():
            continue
        readers = [_dequantized(u.node.outputs[0], cx) for u in out.uses()]
        if not all(r is not None and r.value is out and _same(r.params, qt.params)
                   for r in readers):
            continue
        zp = cx.consts.zero_point(np.array(int(qt.params.zero_point.ravel()[0]) + 128,
                                           np.uint8))
        nodes = (q, *(u.node for u in out.uses()))
        old = [(*n.inputs, None)[2] for n in nodes]
        for n in nodes:
            n.set_inputs([*n.inputs[:2], zp])
        remove_unused_initializers(cx.graph, cx.model, old)
        out.dtype = DataType.UINT8
        cx.stats["activations_to_uint8"] += 1


def lower_to_qoperator(model: Model, uint8_activations: bool = False) -> dict[str, int]:
    """Rewrite the QDQ islands of the main graph into QLinear (QOperator) form, in place.

    Precondition: the main graph is topologically sorted. Each ``DQ(s) -> Op -> Q`` island
    whose operator has a rule in the table, whose inputs are all DQ outputs with constant
    scale and zero point, and whose output only that Q reads, becomes the operator's integer
    form (see the module docstring); the DQs it read are removed when nothing else reads
    them. The model's inputs and outputs keep their names and types. ``com.microsoft``
    (version 1) is imported when a contrib operator is created.

    Args:
        model: a QDQ model, e.g. as ``onnxruntime.quantization`` writes it.
        uint8_activations: first move int8 activations to uint8 (exact; see
            :func:`_activations_to_uint8`): ONNX Runtime's x86 kernels are several times
            faster on u8s8 than on s8s8 (on ARM both are fast).

    Returns:
        Statistics: ``qlinear_nodes`` (QLinear*/QGemm created), ``integer_nodes`` (other
        operators run on integers), ``activations_absorbed`` (Relu/Clip folded into an
        output quantization), ``qdq_removed`` (Q and DQ nodes gone), ``float_ops_kept``
        (operators still computing in float on dequantized tensors) and
        ``activations_to_uint8`` (Q nodes moved from int8 to uint8).
    """
    cx = _Cx(model)
    if uint8_activations:
        _activations_to_uint8(cx)
    for node in cx.graph:
        if node.graph is cx.graph:  # a node removed as an earlier island's tail is skipped
            _lower(node, cx)
    cx.stats["float_ops_kept"] = _float_ops_kept(cx)
    return dict(cx.stats)
