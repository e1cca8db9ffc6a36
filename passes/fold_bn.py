"""``fold-bn``: fold inference-mode BatchNormalization into neighbouring linear operators."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from edgeopt.ir import Model, Node, Tensor, Value

from ._base import Context, PassResult
from ._registry import register_pass
from ._util import (
    NameGen,
    ShapeOracle,
    add_constant,
    as_tensor,
    constant_tensor,
    default_opset,
    is_default_domain,
    replace_constant_input,
    scaled_tensor,
    substitute,
)

__all__ = ["FoldBnOptions", "fold_bn"]


@dataclass(frozen=True)
class FoldBnOptions:
    """Options of ``fold-bn``.

    Attributes:
        forward: fold a BatchNormalization into the Convs that read it when it cannot be
            folded into its producer (only Convs without padding: padded zeros would not go
            through the normalization).
        decompose: rewrite a BatchNormalization that can be folded nowhere into ``Mul`` +
            ``Add`` with per-channel constants, so that no BatchNormalization remains.
    """

    forward: bool = True
    decompose: bool = True


@dataclass
class _Affine:
    """``y = a * x + b`` per channel (axis 1): the inference form of one BatchNormalization."""

    node: Node
    a: np.ndarray  # float64 [C]
    b: np.ndarray  # float64 [C]

    @property
    def x(self) -> Value:
        value = self.node.inputs[0]
        assert value is not None
        return value

    @property
    def y(self) -> Value:
        return self.node.outputs[0]


class _Ctx:
    """What the rewrites share during one run of the pass."""

    def __init__(self, model: Model) -> None:
        self.model = model
        self.names = NameGen(model)
        self.shapes = ShapeOracle(model)

    def const(self, value: Value | None) -> np.ndarray | None:
        t = constant_tensor(value, self.model)
        return None if t is None else np.asarray(t.numpy())

    def weight(self, node: Node, index: int) -> Tensor | None:
        return constant_tensor(node.inputs[index] if index < len(node.inputs) else None,
                               self.model)


def _affine(node: Node, cx: _Ctx) -> _Affine | None:
    """The per-channel affine map of an inference-mode BatchNormalization, or None."""
    if not is_default_domain(node) or node.op_type != "BatchNormalization" \
            or len(node.inputs) != 5 or node.inputs[0] is None:
        return None
    if default_opset(cx.model) < 7 or node.attr("training_mode", 0) != 0 \
            or node.attr("spatial", 1) != 1:
        return None  # opset < 7 had is_test (training by default) and no clear inference form
    if any(out.name for out in node.outputs[1:]):
        return None  # extra outputs mean training mode (opsets 7-13) or are invalid
    params = [cx.const(v) for v in node.inputs[1:]]
    if any(p is None or p.ndim != 1 for p in params) or len({p.shape for p in params}) != 1:
        return None
    scale, bias, mean, var = (p.astype(np.float64) for p in params)  # type: ignore[union-attr]
    a = scale / np.sqrt(var + node.attr("epsilon", 1e-5))
    return _Affine(node, a, bias - mean * a)



def _sole_reader(bn: _Affine, producer: Node) -> bool:
    x = bn.x
    return producer.outputs[0] is x and len(x.uses()) == 1 and not x.is_graph_output()


# -- backward: into the producer; each rewrite returns the value replacing the BN output ---
def _into_conv(bn: _Affine, conv: Node, cx: _Ctx) -> Value | None:
    """Scale the output channels of a Conv / ConvTranspose (any group) and shift its bias."""
    w = cx.weight(conv, 1)
    group = conv.attr("group", 1)
    if w is None or len(w.shape) < 3 or group < 1 or w.shape[0] % group:
        return None
    k = (1,) * (len(w.shape) - 2)
    if conv.op_type == "ConvTranspose":  # W is [C_in, C_out/group, k...]
        c_out = w.shape[1] * group
        view = (group, w.shape[0] // group, *w.shape[1:])
        fshape = (group, 1, w.shape[1], *k)
    else:  # W is [C_out, C_in/group, k...]
        c_out = w.shape[0]
        view, fshape = tuple(w.shape), (c_out, 1, *k)
    bias_v = conv.inputs[2] if len(conv.inputs) > 2 else None
    bias = cx.const(bias_v) if bias_v is not None else np.zeros(c_out)
    if c_out != len(bn.a) or bias is None or bias.shape != (c_out,):
        return None
    replace_constant_input(conv, 1, scaled_tensor(w, bn.a, view, fshape), cx.names)
    new_bias = (bias.astype(np.float64) * bn.a + bn.b).astype(w.dtype.numpy())
    replace_constant_input(conv, 2, as_tensor(new_bias), cx.names)
    return conv.outputs[0]


def _into_gemm(bn: _Affine, gemm: Node, cx: _Ctx) -> Value | None:
    """Scale the columns of ``B`` and fold the shift into ``C`` (``beta`` becomes 1)."""
    w = cx.weight(gemm, 1)
    if w is None or len(w.shape) != 2:
        return None
    trans_b = gemm.attr("transB", 0)
    n = w.shape[0] if trans_b else w.shape[1]
    c_v = gemm.inputs[2] if len(gemm.inputs) > 2 else None
    c = cx.const(c_v) if c_v is not None else np.zeros(n)
    if n != len(bn.a) or c is None:
        return None
    beta = gemm.attr("beta", 1.0) if c_v is not None else 0.0
    new_c = beta * c.astype(np.float64) * bn.a + bn.b  # broadcasts as Gemm broadcasts C
    fshape = (n, 1) if trans_b else (1, n)
    replace_constant_input(gemm, 1, scaled_tensor(w, bn.a, tuple(w.shape), fshape), cx.names)
    replace_constant_input(gemm, 2, as_tensor(new_c.astype(w.dtype.numpy())), cx.names)
    gemm.attrs["beta"] = 1.0
    return gemm.outputs[0]


def _into_matmul(bn: _Affine, matmul: Node, cx: _Ctx) -> Value | None:
    """``MatMul(A, W)`` with rank-2 ``A`` becomes ``Gemm(A, W * a, b)``."""
    w = cx.weight(matmul, 1)
    a_in = matmul.inputs[0]
    if w is None or len(w.shape) != 2 or w.shape[1] != len(bn.a) or a_in is None \
            or cx.shapes.rank(a_in) != 2:
        return None
    graph = matmul.graph
    assert graph is not None
    base = bn.node.name or bn.y.name
    new_w = add_constant(graph, cx.names, f"{base}_weight",
                         scaled_tensor(w, bn.a, tuple(w.shape), (1, -1)))
    new_c = add_constant(graph, cx.names, f"{base}_bias", as_tensor(bn.b.astype(w.dtype.numpy())))
    out = Value(cx.names.fresh(f"{base}_gemm"), bn.y.dtype, bn.y.shape)
    gemm = Node("Gemm", [a_in, new_w, new_c], name=out.name, outputs=[out])
    graph.insert_after(matmul, gemm)
    return out


#: producer op_type -> rewrite folding the BatchNormalization into it (None: not possible).
_BACKWARD: dict[str, Callable[[_Affine, Node, _Ctx], Value | None]] = {
    "Conv": _into_conv,
    "ConvTranspose": _into_conv,
    "Gemm": _into_gemm,
    "MatMul": _into_matmul,
}


def _backward(bn: _Affine, cx: _Ctx) -> bool:
    producer = bn.x.producer()
    if producer is None or not is_default_domain(producer) or not _sole_reader(bn, producer):
        return False
    handler = _BACKWARD.get(producer.op_type)
    new = handler(bn, producer, cx) if handler is not None else None
    if new is None:
        return False
    substitute(bn.node, [(bn.y, new)])
    if producer.graph is not None and not any(o.uses() or o.is_graph_output()
                                              for o in producer.outputs):
        producer.graph.remove(producer)  # a MatMul replaced by a Gemm
    return True


# -- forward: into the Convs that read the BN output ---------------------------------------
def _unpadded_conv(node: Node, index: int) -> bool:
    return index == 0 and node.op_type == "Conv" and is_default_domain(node) \
        and node.attr("auto_pad", "NOTSET") in ("NOTSET", "VALID") \
        and not any(node.attr("pads", []))


def _forward_weights(bn: _Affine, conv: Node, cx: _Ctx) -> tuple[Tensor, np.ndarray] | None:
    """Folded (weight, bias) of a Conv reading ``a * x + b``: W' = W * a, B' = B + W . b."""
    w = cx.weight(conv, 1)
    group = conv.attr("group", 1)
    if w is None or len(w.shape) < 3 or group < 1 or w.shape[0] % group \
            or w.shape[1] * group != len(bn.a):
        return None
    bias_v = conv.inputs[2] if len(conv.inputs) > 2 else None
    bias = cx.const(bias_v) if bias_v is not None else np.zeros(w.shape[0])
    if bias is None:
        return None
    view = (group, w.shape[0] // group, w.shape[1], -1)  # [g, C_out/g, C_in/g, kernel]
    fshape = (group, 1, w.shape[1], 1)
    arr = np.asarray(w.numpy(), dtype=np.float64).reshape(view)
    shift = (arr * bn.b.reshape(fshape)).sum(axis=(2, 3)).reshape(-1)
    new_w = scaled_tensor(w, bn.a, view, fshape)
    return new_w, (bias.astype(np.float64) + shift).astype(w.dtype.numpy())


def _forward(bn: _Affine, cx: _Ctx) -> bool:
    uses = bn.y.uses()
    if not uses or bn.y.is_graph_output() or not all(_unpadded_conv(*u) for u in uses):
        return False
    folded = [_forward_weights(bn, u.node, cx) for u in uses]
    if any(f is None for f in folded):
        return False
    for use, (new_w, new_b) in zip(uses, folded, strict=True):  # type: ignore[misc]
        replace_constant_input(use.node, 1, new_w, cx.names)
        replace_constant_input(use.node, 2, as_tensor(new_b), cx.names)
    bn.y.replace_all_uses_with(bn.x)
    graph = bn.node.graph
    assert graph is not None
    graph.remove(bn.node)
    return True


# -- otherwise: Mul + Add ------------------------------------------------------------------
def _decompose(bn: _Affine, cx: _Ctx) -> bool:
    rank = cx.shapes.rank(bn.x)
    if rank is None or rank < 2:
        return False  # per-channel constants need the rank to broadcast along axis 1
    scale_t = cx.weight(bn.node, 1)
    dtype = bn.x.dtype if bn.x.dtype is not None else scale_t.dtype  # type: ignore[union-attr]
    shape = (len(bn.a),) + (1,) * (rank - 2)
    graph = bn.node.graph
    assert graph is not None
    base = bn.node.name or bn.y.name
    mul_c = add_constant(graph, cx.names, f"{base}_scale",
                         as_tensor(bn.a.astype(dtype.numpy()).reshape(shape)))
    add_c = add_constant(graph, cx.names, f"{base}_shift",
                         as_tensor(bn.b.astype(dtype.numpy()).reshape(shape)))
    scaled = Value(cx.names.fresh(f"{base}_scaled"), dtype, bn.x.shape)
    out = Value(cx.names.fresh(f"{base}_shifted"), dtype, bn.y.shape)
    mul = Node("Mul", [bn.x, mul_c], name=scaled.name, outputs=[scaled])
    add = Node("Add", [scaled, add_c], name=out.name, outputs=[out])
    graph.insert_before(bn.node, [mul, add])
    substitute(bn.node, [(bn.y, out)])
    return True


def _rewrite(bn: _Affine, cx: _Ctx, opts: FoldBnOptions) -> str | None:
    """Fold one BatchNormalization; the name of the statistic to count, or None if kept."""
    if _backward(bn, cx):
        return "bn_folded"
    if opts.forward and _forward(bn, cx):
        return "bn_folded_forward"
    if opts.decompose and _decompose(bn, cx):
        return "bn_decomposed"
    return None


@register_pass("fold-bn", options=FoldBnOptions)
def fold_bn(model: Model, ctx: Context, opts: FoldBnOptions) -> PassResult:
    """Fold inference-mode BatchNormalization into Conv/ConvTranspose/Gemm/MatMul.

    For each BatchNormalization in inference form (``training_mode`` 0, only output 0,
    constant parameters, opset >= 7), in every subgraph, the first rewrite that applies wins:

    1. backward: its input comes from a Conv or ConvTranspose (any group), a Gemm (any
       ``transB``, ``alpha``/``beta``, with or without ``C``), or a MatMul of a rank-2
       activation by a 2-D weight, with constant weights and no other reader: the weights and
       bias are rescaled (a bias is created if absent; a MatMul becomes a Gemm);
    2. forward (option ``forward``): its output feeds only Convs without padding, with
       constant weights: those Convs absorb it;
    3. decompose (option ``decompose``): ``Mul`` + ``Add`` with per-channel constants (needs
       the input's rank, from the IR or ONNX shape inference).

    The value replacing the BatchNormalization's output takes its name. Folded weights are
    lazy tensors (computed in float64 and cast back at export). Shared weights are copied,
    never changed in place; the originals are left for ``dce``.

    Requires: a topologically sorted graph. Preserves: nothing when it modifies; outputs equal
    up to float rounding (about 1e-6 relative in float32).
    """
    cx = _Ctx(model)
    stats = {"bn_folded": 0, "bn_folded_forward": 0, "bn_decomposed": 0, "bn_kept": 0}
    for node in model.graph.walk():
        if node.graph is None or node.op_type != "BatchNormalization" \
                or not is_default_domain(node):
            continue
        bn = _affine(node, cx)
        key = _rewrite(bn, cx, opts) if bn is not None else None
        stats[key or "bn_kept"] += 1
    modified = any(v for k, v in stats.items() if k != "bn_kept")
    return PassResult(modified=modified, stats=stats)
