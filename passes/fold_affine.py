"""``fold-affine``: fold Mul/Add/Sub/Div by constants into Conv/Gemm/MatMul weights.

A chain of element-wise ``Mul``, ``Add``, ``Sub`` and ``Div`` nodes whose other operand is a
constant computes ``y = a * x + b`` for constant ``a`` and ``b``. Such chains are what
Caffe-style "Scale" layers and split BatchNormalizations leave behind. The pass folds them
into the linear operator before them (backward), into the Convs after them (forward), or at
least merges a chain into one ``Mul`` and one ``Add``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from edgeopt.ir import DataType, Graph, Model, Node, Tensor, Value

from ._base import Context, PassResult
from ._registry import register_pass
from ._util import (
    NameGen,
    ShapeOracle,
    add_constant,
    as_tensor,
    constant_tensor,
    default_opset,
    graphs,
    is_default_domain,
    replace_constant_input,
    scaled_tensor,
    substitute,
)

__all__ = ["FoldAffineOptions", "fold_affine"]

#: Element types folded: the float types whose arithmetic is rounding, not wrapping or
#: truncating (integer Div truncates and integer Mul wraps, so they are never affine maps).
_FLOATS = frozenset({DataType.FLOAT, DataType.DOUBLE, DataType.FLOAT16})
#: Constants larger than this (elements) are left alone: per-channel constants are small, and
#: merging huge ones would read (maybe memory-mapped) data for little gain.
_MAX_ELEMENTS = 1 << 20


@dataclass(frozen=True)
class FoldAffineOptions:
    """Options of ``fold-affine``.

    Attributes:
        backward: fold a chain into the Conv/ConvTranspose/Gemm/MatMul that produces its input.
        forward: fold a chain into the Convs without padding that read its output.
        merge: rewrite a chain that folds nowhere into at most one ``Mul`` and one ``Add``.
    """

    backward: bool = True
    forward: bool = True
    merge: bool = True


@dataclass
class _Step:
    """One node of a chain: ``y = x op c`` (or ``c - x``) with a constant ``c``."""

    node: Node
    data: int  # index of the non-constant input
    op: str  # "mul", "add", "sub", "rsub" (c - x) or "div"
    c: np.ndarray  # float64
    dtype: DataType

    @property
    def x(self) -> Value:
        value = self.node.inputs[self.data]
        assert value is not None
        return value

    @property
    def y(self) -> Value:
        return self.node.outputs[0]

    def apply(self, a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Compose: if ``x = a * in + b`` then ``y = a' * in + b'``; returns ``(a', b')``."""
        return _APPLY[self.op](a, b, self.c)


_Pair = tuple[np.ndarray, np.ndarray]
#: How each kind of step maps ``(a, b)`` of its input to ``(a, b)`` of its output.
_APPLY: dict[str, Callable[[np.ndarray, np.ndarray, np.ndarray], _Pair]] = {
    "mul": lambda a, b, c: (a * c, b * c),
    "div": lambda a, b, c: (a / c, b / c),
    "add": lambda a, b, c: (a, b + c),
    "sub": lambda a, b, c: (a, b - c),
    "rsub": lambda a, b, c: (-a, c - b),
}


def _compose(steps: list[_Step]) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.ones(()), np.zeros(())
    for step in steps:
        a, b = step.apply(a, b)
    return a, b


def _reciprocal_ok(c: np.ndarray, dtype: DataType) -> bool:
    """Whether ``x / c`` may be computed as ``x * (1 / c)``.

    Folding a Div into weights multiplies them by ``1 / c`` in float64 and rounds once to
    ``dtype``, an error of the same order as the division's own rounding, provided that every
    ``c`` is finite and non-zero and ``1 / c`` is a finite *normal* number of ``dtype`` (a
    subnormal or overflowing reciprocal would lose precision or turn into 0 or inf).
    """
    if not np.all(np.isfinite(c)) or np.any(c == 0):
        return False
    inv = np.abs(1.0 / c)
    info = np.finfo(dtype.numpy())
    return bool(np.all((inv >= info.tiny) & (inv <= info.max)))


class _Ctx:
    """What the rewrites share during one run of the pass."""

    def __init__(self, model: Model) -> None:
        self.model = model
        self.names = NameGen(model)
        self.shapes = ShapeOracle(model)
        self.opset = default_opset(model)

    def const(self, value: Value | None) -> np.ndarray | None:
        t = constant_tensor(value, self.model)
        return None if t is None else np.asarray(t.numpy(), dtype=np.float64)

    def weight(self, node: Node, index: int) -> Tensor | None:
        value = node.inputs[index] if index < len(node.inputs) else None
        t = constant_tensor(value, self.model)
        return t if t is not None and t.dtype in _FLOATS else None


_OPS = {"Mul": "mul", "Add": "add", "Sub": "sub", "Div": "div"}


def _step(node: Node, cx: _Ctx) -> _Step | None:
    """``node`` as a chain step, or None when it is not an element-wise op by a constant."""
    op = _OPS.get(node.op_type)
    if op is None or not is_default_domain(node) or cx.opset < 7 or len(node.inputs) != 2 \
            or len(node.outputs) != 1 or any(v is None for v in node.inputs):
        return None  # opset < 7: legacy broadcast/axis attributes, not numpy broadcasting
    tensors = [constant_tensor(v, cx.model) for v in node.inputs]
    if (tensors[0] is None) == (tensors[1] is None):
        return None  # both constant: fold-constants' job; neither: not affine
    data = 0 if tensors[0] is None else 1
    t = tensors[1 - data]
    assert t is not None
    x = node.inputs[data]
    if t.dtype not in _FLOATS or (x.dtype is not None and x.dtype != t.dtype) \
            or t.size > _MAX_ELEMENTS:
        return None
    if data == 1:
        if op == "div":
            return None  # c / x is not affine in x
        op = "rsub" if op == "sub" else op
    c = np.asarray(t.numpy(), dtype=np.float64)
    if not np.all(np.isfinite(c)) or (op == "div" and not _reciprocal_ok(c, t.dtype)):
        return None  # inf * 0 and nan do not survive being moved into weights
    return _Step(node, data, op, c, t.dtype)


def _chains(graph: Graph, cx: _Ctx) -> list[list[_Step]]:
    """The maximal chains of steps in ``graph``, each step the sole reader of the previous."""
    steps = {id(n): s for n in graph if (s := _step(n, cx)) is not None}
    following: dict[int, _Step] = {}
    for step in steps.values():
        y = step.y
        if y.is_graph_output() or len(y.uses()) != 1:
            continue
        use = y.uses()[0]
        nxt = steps.get(id(use.node))
        if nxt is not None and use.index == nxt.data:
            following[id(step.node)] = nxt
    inner = {id(s.node) for s in following.values()}
    chains = []
    for step in steps.values():
        if id(step.node) in inner:
            continue
        chain = [step]
        while id(chain[-1].node) in following:
            chain.append(following[id(chain[-1].node)])
        chains.append(chain)
    return chains


# -- per-channel constants ----------------------------------------------------------------
@dataclass(frozen=True)
class _Layout:
    """A value's element type, rank, channel axis and number of channels."""

    dtype: DataType
    rank: int
    axis: int
    channels: int

    def accepts(self, step: _Step) -> bool:
        """Whether ``step``'s constant is of this type and one number per channel (or one)."""
        c = step.c
        if step.dtype != self.dtype or c.ndim > self.rank:
            return False  # would raise the rank of the result
        shape = (1,) * (self.rank - c.ndim) + c.shape
        return all(d == 1 or (i == self.axis and d == self.channels)
                   for i, d in enumerate(shape))

    def vector(self, arr: np.ndarray) -> np.ndarray:
        """An accepted array as one float64 number per channel."""
        return np.array(np.broadcast_to(arr.reshape(-1), (self.channels,)), dtype=np.float64)


def _prefix(chain: list[_Step], layout: _Layout) -> list[_Step]:
    """The longest leading part of ``chain`` whose constants are all per-channel."""
    k = 0
    while k < len(chain) and layout.accepts(chain[k]):
        k += 1
    return chain[:k]


def _trivial(arr: np.ndarray, value: float) -> bool:
    return bool(np.all(arr == value))


# -- backward: into the producer ----------------------------------------------------------
def _conv_layout(conv: Node, cx: _Ctx) -> _Layout | None:
    w = cx.weight(conv, 1)
    group = conv.attr("group", 1)
    if w is None or len(w.shape) < 3 or group < 1 or w.shape[0] % group:
        return None
    channels = w.shape[1] * group if conv.op_type == "ConvTranspose" else w.shape[0]
    return _Layout(w.dtype, len(w.shape), 1, channels)


def _gemm_layout(gemm: Node, cx: _Ctx) -> _Layout | None:
    w = cx.weight(gemm, 1)
    if w is None or len(w.shape) != 2:
        return None
    return _Layout(w.dtype, 2, 1, w.shape[0] if gemm.attr("transB", 0) else w.shape[1])


def _matmul_layout(matmul: Node, cx: _Ctx) -> _Layout | None:
    w = cx.weight(matmul, 1)
    a_in = matmul.inputs[0]
    if w is None or len(w.shape) != 2 or a_in is None \
            or constant_tensor(a_in, cx.model) is not None:
        return None
    # The output has A's rank (at least 1 for a 1-D A). Unknown: assume 1, so that only
    # constants of rank <= 1 qualify (they can never raise the output's rank).
    rank = max(cx.shapes.rank(a_in) or 1, 1)
    return _Layout(w.dtype, rank, rank - 1, w.shape[1])


def _into_conv(conv: Node, a: np.ndarray, b: np.ndarray, cx: _Ctx) -> Value | None:
    """Scale the output channels of a Conv / ConvTranspose (any group) and shift its bias."""
    w = cx.weight(conv, 1)
    assert w is not None
    group = conv.attr("group", 1)
    k = (1,) * (len(w.shape) - 2)
    if conv.op_type == "ConvTranspose":  # W is [C_in, C_out/group, k...]
        view = (group, w.shape[0] // group, *w.shape[1:])
        fshape = (group, 1, w.shape[1], *k)
    else:  # W is [C_out, C_in/group, k...]
        view, fshape = tuple(w.shape), (w.shape[0], 1, *k)
    bias_v = conv.inputs[2] if len(conv.inputs) > 2 else None
    bias = cx.const(bias_v) if bias_v is not None else np.zeros(len(a))
    if bias is None or bias.shape != a.shape:
        return None
    if not _trivial(a, 1.0):
        replace_constant_input(conv, 1, scaled_tensor(w, a, view, fshape), cx.names)
    if bias_v is not None or not _trivial(b, 0.0):
        new_bias = (bias * a + b).astype(w.dtype.numpy())
        replace_constant_input(conv, 2, as_tensor(new_bias), cx.names)
    return conv.outputs[0]


def _into_gemm(gemm: Node, a: np.ndarray, b: np.ndarray, cx: _Ctx) -> Value | None:
    """Scale the columns of ``B`` and fold the shift into ``C`` (``beta`` becomes 1)."""
    w = cx.weight(gemm, 1)
    assert w is not None
    trans_b = gemm.attr("transB", 0)
    c_v = gemm.inputs[2] if len(gemm.inputs) > 2 else None
    c = cx.const(c_v) if c_v is not None else None
    if c_v is not None and c is None:
        return None
    if not _trivial(a, 1.0):
        fshape = (len(a), 1) if trans_b else (1, len(a))
        replace_constant_input(gemm, 1, scaled_tensor(w, a, tuple(w.shape), fshape), cx.names)
    if c is not None or not _trivial(b, 0.0):
        # Broadcasts as Gemm broadcasts C: [N], [1, N], [M, 1] and [M, N] all stay valid.
        new_c = gemm.attr("beta", 1.0) * c * a + b if c is not None else b
        replace_constant_input(gemm, 2, as_tensor(new_c.astype(w.dtype.numpy())), cx.names)
        gemm.attrs["beta"] = 1.0
    return gemm.outputs[0]


def _into_matmul(matmul: Node, a: np.ndarray, b: np.ndarray, cx: _Ctx) -> Value | None:
    """Scale the columns of ``W``; a shift becomes one bias ``Add`` after the MatMul."""
    w = cx.weight(matmul, 1)
    assert w is not None
    if not _trivial(a, 1.0):
        replace_constant_input(matmul, 1, scaled_tensor(w, a, tuple(w.shape), (1, -1)),
                               cx.names)
    if _trivial(b, 0.0):
        return matmul.outputs[0]
    graph = matmul.graph
    assert graph is not None
    y = matmul.outputs[0]
    bias = add_constant(graph, cx.names, f"{y.name}_bias", as_tensor(b.astype(w.dtype.numpy())))
    out = Value(cx.names.fresh(f"{y.name}_biased"), y.dtype, y.shape)
    graph.insert_after(matmul, Node("Add", [y, bias], name=out.name, outputs=[out]))
    return out


@dataclass(frozen=True)
class _Producer:
    layout: Callable[[Node, _Ctx], _Layout | None]
    fold: Callable[[Node, np.ndarray, np.ndarray, _Ctx], Value | None]
    #: whether a shift costs a new node (a MatMul has no bias input)
    shift_costs_a_node: bool = False


_PRODUCERS: dict[str, _Producer] = {
    "Conv": _Producer(_conv_layout, _into_conv),
    "ConvTranspose": _Producer(_conv_layout, _into_conv),
    "Gemm": _Producer(_gemm_layout, _into_gemm),
    "MatMul": _Producer(_matmul_layout, _into_matmul, shift_costs_a_node=True),
}


def _replace_chain(steps: list[_Step], new: Value) -> None:
    """Let ``new`` take the place of the last step's output; remove all ``steps``."""
    substitute(steps[-1].node, [(steps[-1].y, new)])
    if len(steps) > 1:
        graph = steps[0].node.graph
        assert graph is not None
        graph.remove([s.node for s in steps[:-1]])


def _backward(chain: list[_Step], cx: _Ctx) -> tuple[int, int]:
    """Fold the per-channel head of ``chain`` into its producer.

    Returns:
        ``(steps, removed)``: how many leading steps were folded (0: nothing changed) and how
        many nodes that removed.
    """
    x = chain[0].x
    producer = x.producer()
    if producer is None or producer.graph is not chain[0].node.graph \
            or not is_default_domain(producer) or producer.outputs[0] is not x \
            or len(x.uses()) != 1 or x.is_graph_output():
        return 0, 0
    handler = _PRODUCERS.get(producer.op_type)
    layout = handler.layout(producer, cx) if handler is not None else None
    if handler is None or layout is None or layout.channels < 1:
        return 0, 0
    prefix = _prefix(chain, layout)
    if not prefix:
        return 0, 0
    a, b = (layout.vector(v) for v in _compose(prefix))
    cost = int(handler.shift_costs_a_node and not _trivial(b, 0.0))
    if len(prefix) <= cost:
        return 0, 0  # a MatMul followed by its bias Add is already as small as it gets
    new = handler.fold(producer, a, b, cx)
    if new is None:
        return 0, 0
    _replace_chain(prefix, new)
    return len(prefix), len(prefix) - cost


# -- forward: into the Convs that read the chain's output ----------------------------------
def _unpadded_conv(node: Node, index: int) -> bool:
    return index == 0 and node.op_type == "Conv" and is_default_domain(node) \
        and node.attr("auto_pad", "NOTSET") in ("NOTSET", "VALID") \
        and not any(node.attr("pads", []))


def _forward_weights(conv: Node, a: np.ndarray, b: np.ndarray,
                     cx: _Ctx) -> tuple[Tensor | None, np.ndarray | None] | None:
    """Folded (weight, bias) of a Conv reading ``a * x + b``: W' = W * a, B' = B + W . b.

    None entries mean "unchanged"; None overall means the Conv cannot absorb the map.
    """
    w = cx.weight(conv, 1)
    assert w is not None
    group = conv.attr("group", 1)
    bias_v = conv.inputs[2] if len(conv.inputs) > 2 else None
    bias = cx.const(bias_v) if bias_v is not None else np.zeros(w.shape[0])
    if bias is None or bias.shape != (w.shape[0],):
        return None
    # [group, C_out/group, C_in/group, kernel]: output channel o of group g reads input
    # channels g * C_in/group ... (g + 1) * C_in/group - 1.
    view = (group, w.shape[0] // group, w.shape[1], -1)
    fshape = (group, 1, w.shape[1], 1)
    new_w = None if _trivial(a, 1.0) else scaled_tensor(w, a, view, fshape)
    if _trivial(b, 0.0):
        return new_w, None
    arr = np.asarray(w.numpy(), dtype=np.float64).reshape(view)
    shift = (arr * b.reshape(fshape)).sum(axis=(2, 3)).reshape(-1)
    return new_w, bias + shift


def _forward_layout(chain: list[_Step], cx: _Ctx) -> _Layout | None:
    y = chain[-1].y
    uses = y.uses()
    if not uses or y.is_graph_output() or not all(_unpadded_conv(*u) for u in uses):
        return None
    layouts = set()
    for use in uses:
        w = cx.weight(use.node, 1)
        group = use.node.attr("group", 1)
        if w is None or len(w.shape) < 3 or group < 1 or w.shape[0] % group:
            return None
        layouts.add(_Layout(w.dtype, len(w.shape), 1, w.shape[1] * group))
    return layouts.pop() if len(layouts) == 1 else None


def _forward(chain: list[_Step], cx: _Ctx) -> int:
    """Fold the per-channel tail of ``chain`` into the Convs reading it; the nodes removed."""
    layout = _forward_layout(chain, cx)
    if layout is None:
        return 0
    suffix = _prefix(chain[::-1], layout)[::-1]
    if not suffix:
        return 0
    x = suffix[0].x
    shape = cx.shapes.shape(x)
    # The Convs then read x itself: it must already have their rank and channel count (a
    # constant could have broadcast a rank or a single channel up to them).
    if shape is None or len(shape) != layout.rank or not (
            shape[1] == layout.channels or all(s.c.size == 1 for s in suffix)):
        return 0
    a, b = (layout.vector(v) for v in _compose(suffix))
    y = suffix[-1].y
    convs = [u.node for u in y.uses()]
    folded = [_forward_weights(conv, a, b, cx) for conv in convs]
    if any(f is None for f in folded):
        return 0
    for conv, (new_w, new_b) in zip(convs, folded, strict=True):  # type: ignore[misc]
        dtype = cx.weight(conv, 1).dtype.numpy()  # type: ignore[union-attr]
        if new_w is not None:
            replace_constant_input(conv, 1, new_w, cx.names)
        if new_b is not None:
            replace_constant_input(conv, 2, as_tensor(new_b.astype(dtype)), cx.names)
    y.replace_all_uses_with(x)
    graph = suffix[0].node.graph
    assert graph is not None
    graph.remove([s.node for s in suffix])
    return len(suffix)


# -- merge: what folds nowhere becomes one Mul and one Add ---------------------------------
def _merge(chain: list[_Step], cx: _Ctx) -> int:
    """Rewrite ``chain`` as ``Mul(x, a)`` then ``Add(., b)`` when shorter; the nodes removed.

    Any broadcasting is fine here (numpy's rules are ONNX's): the result has the broadcast
    shape of x and every constant either way. A factor of one or a shift of zero is dropped
    only when the other constant carries its shape, so the output shape never changes.
    """
    if len({s.dtype for s in chain}) != 1:
        return 0
    a, b = _compose(chain)
    if max(a.size, b.size) > max(s.c.size for s in chain):
        return 0  # e.g. Add [1, W] then Mul [C, 1]: merging would build a larger constant
    both = np.broadcast_shapes(a.shape, b.shape)
    need_mul = not _trivial(a, 1.0) or both != b.shape
    need_add = not _trivial(b, 0.0) or both != a.shape or not need_mul
    if need_mul + need_add >= len(chain):
        return 0
    dtype = chain[0].dtype.numpy()
    with np.errstate(over="ignore"):  # overflow is checked right below
        consts = {name: arr.astype(dtype) for name, arr, needed in
                  (("scale", a, need_mul), ("shift", b, need_add)) if needed}
    if not all(np.all(np.isfinite(v)) for v in consts.values()):
        return 0  # the product of finite constants overflowed the element type
    graph = chain[0].node.graph
    assert graph is not None
    last, value = chain[-1].y, chain[0].x
    nodes = []
    for name, op in (("scale", "Mul"), ("shift", "Add")):
        if name not in consts:
            continue
        const = add_constant(graph, cx.names, f"{last.name}_{name}", as_tensor(consts[name]))
        out = Value(cx.names.fresh(f"{last.name}_{name}d"), last.dtype,
                    last.shape if name == "shift" or "shift" not in consts else None)
        nodes.append(Node(op, [value, const], name=out.name, outputs=[out]))
        value = out
    graph.insert_before(chain[-1].node, nodes)
    _replace_chain(chain, value)
    return len(chain) - len(nodes)


def _fold_chain(chain: list[_Step], cx: _Ctx, opts: FoldAffineOptions,
                stats: dict[str, int]) -> bool:
    """Apply the rewrites to one chain, in order of preference; whether anything changed."""
    changed = False
    if opts.backward:
        steps, removed = _backward(chain, cx)
        if steps:
            stats["affine_folded"] += removed
            chain, changed = chain[steps:], True
    if chain and opts.forward:
        steps = _forward(chain, cx)
        if steps:
            stats["affine_folded_forward"] += steps
            chain, changed = chain[:len(chain) - steps], True
    if len(chain) > 1 and opts.merge:
        removed = _merge(chain, cx)
        if removed:
            stats["affine_merged"] += removed
            changed = True
    return changed


@register_pass("fold-affine", options=FoldAffineOptions)
def fold_affine(model: Model, ctx: Context, opts: FoldAffineOptions) -> PassResult:
    """Fold Mul/Add/Sub/Div by per-channel constants into Conv/ConvTranspose/Gemm/MatMul.

    A *chain* is a run of ``Mul``, ``Add``, ``Sub`` or ``Div`` nodes (opset >= 7, float
    types) whose other operand is a constant, each the sole reader of the previous one; it
    computes ``a * x + b``. Per chain, in every subgraph:

    1. backward (option ``backward``): its leading steps with per-channel constants (one
       number, or one per output channel: axis 1 of a Conv/ConvTranspose output, the last
       axis of a Gemm/MatMul output; e.g. ``[C]``, ``[C, 1, 1]``, ``[1, C, 1, 1]``, a scalar)
       fold into the Conv/ConvTranspose (any group), Gemm (any ``transB``/``alpha``/``beta``,
       with or without ``C``) or MatMul (2-D weight) producing its input, when that producer
       has constant weights and no other reader. Weights are scaled along the output-channel
       axis and the shift goes into the bias (created if absent, ``beta`` becomes 1); a
       MatMul keeps one bias ``Add`` when there is a shift (so a MatMul + bias Add alone is
       left as it is);
    2. forward (option ``forward``): its trailing per-channel steps fold into the Convs that
       read its output, when all of them are Convs without padding (padded zeros would not
       go through the map) with constant weights, any group including depthwise: W' = W * a
       per input channel, B' = B + sum(W * b); needs the chain input's shape (from the IR or
       ONNX shape inference) to prove that no broadcasting happens;
    3. merge (option ``merge``): what is left of a chain of two or more nodes becomes one
       ``Mul`` and one ``Add`` (or one of them) when that is shorter; any broadcasting is
       allowed, as long as no merged constant is larger than the largest original.

    ``Div`` by ``c`` is treated as ``Mul`` by ``1 / c`` only when every ``c`` is finite and
    non-zero and ``1 / c`` is a finite normal number of the element type (then folding it
    costs one rounding, as for a Mul); ``c / x`` is not affine and ends a chain. Constants
    with inf or nan are never moved. Constants that are graph inputs are not constants
    (except the initializer-inputs of an IR < 4 main graph). Folded weights are lazy tensors
    computed in float64 and cast back; shared weights are copied, never changed in place.
    The value replacing a chain's output takes its name.

    Requires: a topologically sorted graph. Preserves: nothing when it modifies; outputs equal
    up to float rounding (about 1e-6 relative in float32).
    """
    cx = _Ctx(model)
    stats = {"affine_folded": 0, "affine_folded_forward": 0, "affine_merged": 0}
    for graph in list(graphs(model)):
        # Rounds until nothing changes, so that one run leaves nothing to do. Every change
        # removes at least one node, so the bound is only a safety net.
        for _ in range(len(graph.nodes) + 1):
            if not any([_fold_chain(chain, cx, opts, stats) for chain in _chains(graph, cx)]):
                break
    return PassResult(modified=any(stats.values()), stats=stats)
