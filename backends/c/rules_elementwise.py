"""Lowering rules for elementwise ops, activations, Softmax and data movement.

Binary ops broadcast like NumPy over at most 4 dims (strides of 0 repeat an operand). A
unary op on an int8 tensor is a 256-entry lookup table built here from the float function,
exactly as ONNX Runtime computes DequantizeLinear -> op -> QuantizeLinear element by
element. Reshape, Flatten, Squeeze, Unsqueeze, Identity and Dropout are free (an alias of
the input's storage) unless the layout forces a transpose.
"""

from __future__ import annotations

import math

import numpy as np

from edgeopt.ir import Node, Value

from . import reference as ref
from .lower import Lowerer, LoweringError, QView, clamp_bounds
from .program import CTYPES, Const, Op, Ptrs, TensorRef
from .rules import SPATIAL_REDUCTIONS, _flt, c_shape, pool, reduced_axes, rule

__all__ = ["UNARY"]


# -- binary -----------------------------------------------------------------------------------
def _operand(lw: Lowerer, v: Value, int8: bool):
    """``(tensor or None, constant or None, view or None)`` of one operand."""
    view = lw.view(v)
    if view is not None:
        return (view.tensor if int8 else None), None, view
    t = lw.env.get(id(v))
    if t is not None:
        return t, None, None
    c = lw.constant(v)
    if c is None:
        raise LoweringError(f"operand {v.name!r} is neither computed nor constant")
    return None, c, None


def _strides(shape: tuple[int, ...], out: tuple[int, ...]) -> list[int]:
    """Element strides of ``shape`` (rank-padded to ``out``) with 0 on broadcast axes."""
    shape = (1,) * (len(out) - len(shape)) + tuple(shape)
    strides, step = [0] * len(shape), 1
    for i in range(len(shape) - 1, -1, -1):
        strides[i] = 0 if shape[i] == 1 and out[i] != 1 else step
        step *= shape[i]
    return [0] * (4 - len(out)) + strides


def _const_operand(lw: Lowerer, base: str, c: np.ndarray, ys: tuple[int, ...], layout: str,
                   ctype: str, qparams: tuple[float, int] | None) -> tuple[Const, tuple]:
    arr = c.reshape((1,) * (len(ys) - c.ndim) + c.shape)
    if layout == "nhwc":
        arr = arr.transpose(0, 2, 3, 1)
    if qparams is not None:
        s, z = qparams
        arr = np.clip(np.round(arr.astype(np.float64) / s) + z, -128, 127)
    return lw.const(base, ctype, np.ascontiguousarray(arr)), arr.shape


BINARY = {"Add": "add", "Sub": "sub", "Mul": "mul", "Div": "div", "Sum": "add"}


@rule("Add", "Sub", "Mul", "Div", "Sum")
def binary(lw: Lowerer, node: Node) -> None:
    """Elementwise arithmetic with broadcasting (int8 for Add, Sub and Mul; Sum of two)."""
    if len(node.inputs) != 2:
        raise LoweringError(f"{len(node.inputs)} inputs (two are supported)")
    a, b = node.inputs[0], node.inputs[1]
    ys = lw.shape(node.outputs[0])
    if len(ys) > 4:
        raise LoweringError("more than 4 dimensions")
    q = lw.int8_output(node) if node.op_type in ("Add", "Sub", "Mul", "Sum") else None
    views = [lw.view(a), lw.view(b)]
    consts = [lw.qconstant(v) for v in (a, b)]
    int8 = q is not None and all(v is not None or (c is not None and not c[1].per_channel)
                                 for v, c in zip(views, consts, strict=True))
    ops = [_operand(lw, v, int8) for v in (a, b)]
    layout = "nhwc" if len(ys) == 4 and any((t is not None and t.layout == "nhwc") or
                                            (vw is not None and vw.tensor.layout == "nhwc")
                                            for t, _, vw in ops) else "plain"
    out_shape = c_shape(ys)[0] if layout == "nhwc" else ys
    base = lw.label(node)
    args, reads, qps = [], [], []
    for i, (v, (t, c, vw)) in enumerate(zip((a, b), ops, strict=True)):
        if int8:
            if vw is not None:
                t, qp = vw.tensor, (vw.scale, vw.zero_point)
            else:
                _ints, cqp, _ = consts[i]
                qp = (float(cqp.scale), int(cqp.zero_point) - (128 if cqp.dtype.name == "UINT8"
                                                               else 0))
                c = lw.constant(v)
        else:
            qp = None
            if t is None and c is None:
                t = lw.act(v)
        if t is not None:
            if t.layout == "flat_hwc" or (t.layout != layout and len(t.shape) == 4):
                t = lw.as_layout(t, layout)
            if len(lw.shape(v)) != len(ys) and layout == "nhwc":
                raise LoweringError("a lower-rank activation broadcast against a 4-D one")
            args.append(t)
            reads.append(t)
            shape = t.shape
        else:
            const, shape = _const_operand(lw, f"{base}_{'ab'[i]}", c, ys,  # type: ignore[arg-type]
                                          layout, "int8_t" if int8 else "float", qp)
            args.append(const)
        qps.append(qp)
        args.append(_strides(tuple(shape), out_shape))
    dims = [1] * (4 - len(out_shape)) + list(out_shape)
    same = [r for r in reads if r.shape == tuple(out_shape)]
    if int8:
        qnode, fused, s_out, zp_out, amin, amax = q  # type: ignore[misc]
        out = lw.new_tensor(qnode.outputs[0], "int8_t", out_shape, layout, scale=s_out,
                            zero_point=zp_out)
        lw.done.update(id(n) for n in (qnode, *fused))
        fields = _int8_binary("Add" if node.op_type == "Sum" else node.op_type, qps, s_out,
                              zp_out)
        fields |= {"act_min": amin, "act_max": amax, "fact_min": 0.0, "fact_max": 0.0}
        suffix = "s8"
    else:
        out_v, lo, hi, fused = lw.float_fusion(node)
        out = lw.new_tensor(out_v, "float", out_shape, layout)
        lw.done.update(id(n) for n in fused)
        fields = {"fact_min": _flt(lo), "fact_max": _flt(hi)}
        suffix = "f32"
    params = lw.params("eo_binary_params", dims=dims, a_stride=args[1], b_stride=args[3],
                       **fields)
    lw.emit(Op(f"eo_{BINARY[node.op_type]}_{suffix}", base, node.op_type,
               [params, args[0], args[2], out], reads, [out], 0,
               same[0] if same and out.ctype == same[0].ctype else None))


def _int8_binary(op: str, qps, s_out: float, zp_out: int) -> dict[str, int]:
    """TFLite's int8 Add/Sub (left shift 20, input and output multipliers) or Mul parameters."""
    (sa, za), (sb, zb) = qps
    if op == "Mul":
        m = ref.mul_params(sa, za, sb, zb, s_out, zp_out)
        return {"a_offset": m.a_offset, "b_offset": m.b_offset, "out_offset": m.out_offset,
                "left_shift": 0, "a_mult": 0, "a_shift": 0, "b_mult": 0, "b_shift": 0,
                "out_mult": m.out_mult, "out_shift": m.out_shift}
    a = ref.add_params(sa, za, sb, zb, s_out, zp_out)
    return {k: getattr(a, k) for k in ("a_offset", "b_offset", "out_offset", "left_shift",
                                       "a_mult", "a_shift", "b_mult", "b_shift", "out_mult",
                                       "out_shift")}


# -- unary ------------------------------------------------------------------------------------
def _hardswish(x: np.ndarray) -> np.ndarray:
    return x * np.clip(x / np.float32(6) + np.float32(0.5), 0, 1)


def _exponent(node: Node) -> float:
    """The constant scalar exponent of a Pow."""
    e = node.inputs[1].const_value if len(node.inputs) > 1 and node.inputs[1] else None
    if e is None or e.numpy().size != 1:
        raise LoweringError("Pow needs a constant scalar exponent")
    return float(np.asarray(e.numpy()).ravel()[0])


#: op_type -> (float kernel, numpy function for the int8 lookup table, the float kernel's
#: arguments before the tensors)
UNARY = {
    "Sigmoid": ("eo_sigmoid_f32", lambda x, n: 1 / (1 + np.exp(-x)), lambda n: []),
    "Tanh": ("eo_tanh_f32", lambda x, n: np.tanh(x), lambda n: []),
    "HardSwish": ("eo_hardswish_f32", lambda x, n: _hardswish(x), lambda n: []),
    "LeakyRelu": ("eo_leaky_relu_f32",
                  lambda x, n: np.where(x < 0, x * np.float32(n.attr("alpha", 0.01)), x),
                  lambda n: [float(n.attr("alpha", 0.01))]),
    "HardSigmoid": (None, lambda x, n: np.clip(np.float32(n.attr("alpha", 0.2)) * x
                                               + np.float32(n.attr("beta", 0.5)), 0, 1),
                    lambda n: []),
    "Sqrt": ("eo_sqrt_f32", lambda x, n: np.sqrt(x), lambda n: []),
    "Pow": ("eo_pow_f32", lambda x, n: np.power(x, np.float32(_exponent(n))),
            lambda n: [_exponent(n)]),
}


def _lut(fn, node: Node, vw: QView, s_out: float, zp_out: int, lo: float, hi: float
         ) -> np.ndarray:
    """The int8 table of ``clip(fn(x), lo, hi)``, quantized as ONNX QuantizeLinear does."""
    def f(x: np.ndarray) -> np.ndarray:
        y = np.asarray(fn(x, node), np.float32) if fn is not None else x
        return np.clip(y, np.float32(lo), np.float32(hi))
    return ref.lut(f, vw.scale, vw.zero_point, s_out, zp_out, half_even=True)


@rule("Relu", "Clip", "Sigmoid", "Tanh", "HardSwish", "LeakyRelu", "HardSigmoid", "Sqrt", "Pow")
def unary(lw: Lowerer, node: Node) -> None:
    """Activations: int8 lookup tables, or float kernels (Relu/Clip: a clamp)."""
    x = node.inputs[0]
    q, vw = lw.int8_output(node), lw.view(x)
    base = lw.label(node)
    bounds = clamp_bounds(node, lw)
    if node.op_type == "Clip" and bounds is None:
        raise LoweringError("Clip bounds must be constant")
    fn = None if bounds is not None else UNARY[node.op_type][1]
    if q is not None and vw is not None:
        qnode, fused, s_out, zp_out, amin, amax = q
        lo, hi = bounds if bounds is not None else (-np.inf, np.inf)
        lut = _lut(fn, node, vw, s_out, zp_out, lo, hi)
        lut = np.clip(lut, amin, amax).astype(np.int8)
        t = vw.tensor
        out = lw.new_tensor(qnode.outputs[0], "int8_t", t.shape, t.layout, t.chw, s_out, zp_out)
        lw.done.update(id(n) for n in (qnode, *fused))
        table = lw.const(base + "_lut", "int8_t", lut)
        lw.emit(Op("eo_lut_s8", base, node.op_type, [table, t, out, t.size], [t], [out], 0, t))
        return
    t = lw.act(x)
    if bounds is not None:
        out_v, lo, hi, fused = lw.float_fusion(node)
        lo, hi = max(lo, bounds[0]), min(hi, bounds[1])
        out = lw.new_tensor(out_v, "float", t.shape, t.layout, t.chw)
        lw.done.update(id(n) for n in fused)
        lw.emit(Op("eo_clamp_f32", base, node.op_type, [_flt(lo), _flt(hi), t, out, t.size],
                   [t], [out], 0, t))
        return
    if node.op_type == "HardSigmoid":
        _hard_sigmoid_f32(lw, node, t)
        return
    out = lw.new_tensor(node.outputs[0], "float", t.shape, t.layout, t.chw)
    kernel, _fn, extra = UNARY[node.op_type]
    lw.emit(Op(kernel, base, node.op_type, [*extra(node), t, out, t.size], [t], [out], 0, t))


def _hard_sigmoid_f32(lw: Lowerer, node: Node, t: TensorRef) -> None:
    """``clip(alpha * x + beta, 0, 1)`` as a Mul and an Add with a clamp (float kernels)."""
    base, full = lw.label(node), _strides(t.shape, t.shape)
    dims = [1] * (4 - len(t.shape)) + list(t.shape)
    alpha = lw.const(base + "_alpha", "float", np.array([node.attr("alpha", 0.2)]))
    beta = lw.const(base + "_beta", "float", np.array([node.attr("beta", 0.5)]))
    scaled = lw.new_tensor(None, "float", t.shape, t.layout, t.chw, base=base + "_scaled")
    out = lw.new_tensor(node.outputs[0], "float", t.shape, t.layout, t.chw)
    for kernel, src, c, dst, lo, hi in (("eo_mul_f32", t, alpha, scaled, "-FLT_MAX", "FLT_MAX"),
                                        ("eo_add_f32", scaled, beta, out, 0.0, 1.0)):
        params = lw.params("eo_binary_params", dims=dims, a_stride=full, b_stride=[0] * 4,
                           fact_min=lo, fact_max=hi)
        lw.emit(Op(kernel, base, "HardSigmoid", [params, src, c, dst], [src], [dst], 0, src))


@rule("PRelu")
def prelu(lw: Lowerer, node: Node) -> None:
    """PRelu with a constant slope per channel (or one slope), float."""
    t = lw.act(node.inputs[0])
    slope = lw.constant(node.inputs[1])
    if slope is None:
        raise LoweringError("the slope is not constant")
    channels = slope.size
    if channels > 1:
        xs = lw.shape(node.inputs[0])
        ch_axis = 1 if len(xs) >= 2 else 0
        if slope.size != xs[ch_axis] or t.layout == "flat_hwc":
            raise LoweringError("the slope must be per channel (axis 1) or a scalar")
        if t.layout == "plain" and len(xs) > 2:
            t = lw.as_layout(t, "nhwc") if len(xs) == 4 else t
            if t.layout == "plain":
                raise LoweringError("per-channel slope on a tensor of rank 3 or above 4")
    out = lw.new_tensor(node.outputs[0], "float", t.shape, t.layout, t.chw)
    c = lw.const(lw.label(node) + "_slope", "float", slope.ravel())
    lw.emit(Op("eo_prelu_f32", lw.label(node), "PRelu", [c, channels, t, out, t.size], [t],
               [out], 0, t))


@rule("Softmax")
def softmax(lw: Lowerer, node: Node) -> None:
    """Softmax over the last storage axis (ONNX axis -1, or the channels of an NCHW tensor)."""
    t = lw.act(node.inputs[0])
    xs = lw.shape(node.inputs[0])
    axis = int(node.attr("axis", -1 if lw.model.opset_imports.get("", 13) >= 13 else 1))
    axis %= len(xs)
    if t.layout == "flat_hwc":
        t = lw.as_layout(t, "plain")
    last = (t.layout == "nhwc" and axis == 1) or (t.layout == "plain" and axis == len(xs) - 1)
    if not last:
        raise LoweringError(f"Softmax over axis {axis} of a rank-{len(xs)} tensor")
    out = lw.new_tensor(node.outputs[0], "float", t.shape, t.layout, t.chw)
    n = t.shape[-1]
    lw.emit(Op("eo_softmax_f32", lw.label(node), "Softmax", [t.size // n, n, t, out], [t],
               [out]))


#: Reductions and their eo_reduce_f32 kind.
REDUCTIONS = {"ReduceMean": 0, "ReduceSum": 1, "ReduceMax": 2, "ReduceMin": 3}


@rule(*REDUCTIONS)
def reduce(lw: Lowerer, node: Node) -> None:
    """ReduceMean/Sum/Max/Min over adjacent axes, in float (LayerNorm's means, ...).

    Over the H and W of a 4-D tensor, ReduceMean and ReduceMax are global pooling (int8
    too, see :func:`~.rules.pool`).
    """
    xs, ys = lw.shape(node.inputs[0]), lw.shape(node.outputs[0])
    axes = reduced_axes(lw, node, max(len(xs), 1))
    if node.op_type in SPATIAL_REDUCTIONS and len(xs) == 4 and axes == {2, 3}:
        pool(lw, node)
        return
    if not axes or axes != set(range(min(axes), max(axes) + 1)):
        raise LoweringError(f"{node.op_type} over axes {sorted(axes)} (only over adjacent "
                            "axes)")
    t = lw.act(node.inputs[0])
    if t.layout != "plain":
        t = lw.as_layout(t, "plain")
    a, b = min(axes), max(axes) + 1
    out = lw.new_tensor(node.outputs[0], "float", tuple(ys), "plain")
    lw.emit(Op("eo_reduce_f32", lw.label(node), node.op_type,
               [REDUCTIONS[node.op_type], math.prod(xs[:a]), math.prod(xs[a:b]),
                math.prod(xs[b:]), t, out], [t], [out]))


@rule("LRN")
def lrn(lw: Lowerer, node: Node) -> None:
    """Local response normalization across channels (AlexNet, ZFNet, Inception v1), float."""
    t = lw.act(node.inputs[0])
    xs = lw.shape(node.inputs[0])
    if len(xs) < 3:
        raise LoweringError(f"LRN of a rank-{len(xs)} tensor (needs N, C and spatial dims)")
    if t.layout == "flat_hwc":
        t = lw.as_layout(t, "plain")
    size = int(node.attr("size", 0))
    if size < 1:
        raise LoweringError("LRN size must be a positive integer")
    if t.layout == "nhwc":  # channels last: a window of adjacent values
        outer, inner = t.size // xs[1], 1
    else:
        outer, inner = xs[0], math.prod(xs[2:])
    out = lw.new_tensor(node.outputs[0], "float", t.shape, t.layout, t.chw)
    lw.emit(Op("eo_lrn_f32", lw.label(node), "LRN",
               [outer, xs[1], inner, size, float(node.attr("alpha", 1e-4)),
                float(node.attr("beta", 0.75)), float(node.attr("bias", 1.0)), t, out],
               [t], [out]))


# -- data movement ----------------------------------------------------------------------------
def _source(lw: Lowerer, v: Value) -> tuple[TensorRef, QView | None]:
    vw = lw.view(v)
    return (vw.tensor, vw) if vw is not None else (lw.act(v), None)


def _bind_result(lw: Lowerer, node: Node, t: TensorRef, vw: QView | None, i: int = 0) -> None:
    if vw is not None:
        lw.views[id(node.outputs[i])] = QView(t, vw.scale, vw.zero_point)
    else:
        lw.bind(node.outputs[i], t)


def _alias(lw: Lowerer, node: Node, src: TensorRef, shape, layout: str, chw=None) -> TensorRef:
    t = lw.new_tensor(None, src.ctype, shape, layout, chw, src.scale, src.zero_point,
                      alias=src, base=node.outputs[0].name)
    return t


@rule("Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity", "Dropout")
def reshape(lw: Lowerer, node: Node) -> None:
    """Free reshapes: an alias of the input's storage (after a transpose if the layout needs)."""
    src, vw = _source(lw, node.inputs[0])
    if node.op_type in ("Identity", "Dropout"):
        _bind_result(lw, node, src, vw)
        return
    xs, ys = lw.shape(node.inputs[0]), lw.shape(node.outputs[0])
    if src.layout == "plain" or (src.layout == "nhwc" and xs[2] * xs[3] == 1):
        # Same bytes in ONNX order; a 4-D result with 1x1 spatial dims is NHWC as well.
        one = len(ys) == 4 and ys[2] * ys[3] == 1
        shape, layout, chw = (c_shape(ys)[0], "nhwc", None) if one else (ys, "plain", None)
    elif src.layout == "nhwc" and len(ys) == 2 and ys[0] == xs[0]:
        shape, layout, chw = ys, "flat_hwc", (xs[1], xs[2], xs[3])
    elif src.layout == "flat_hwc" and tuple(ys) == tuple(xs):
        shape, layout, chw = ys, "flat_hwc", src.chw
    else:
        src = lw.as_layout(src, "plain")
        shape, layout, chw = ys, "plain", None
    _bind_result(lw, node, _alias(lw, node, src, shape, layout, chw), vw)


def _merge_dims(dims, perm) -> tuple[tuple[int, ...], list[int]]:
    """Drop axes of size 1 and merge input axes that stay adjacent and in order under ``perm``.

    The same transpose (the same bytes out) over fewer dims: a channel shuffle's 5-D
    transpose becomes 4-D, and so does attention's ``[1, N, 3, heads, dim]`` split into q,
    k and v (perm ``[2, 0, 3, 1, 4]``).
    """
    keep = [a for a in range(len(dims)) if dims[a] != 1] or [0]
    dims, perm = [dims[a] for a in keep], [keep.index(a) for a in perm if a in keep]
    groups: list[list[int]] = []
    for axis in perm:
        if groups and groups[-1][-1] + 1 == axis:
            groups[-1].append(axis)
        else:
            groups.append([axis])
    order = sorted(range(len(groups)), key=lambda g: groups[g][0])
    merged = tuple(math.prod(dims[a] for a in groups[g]) for g in order)
    return merged, [order.index(g) for g in range(len(groups))]


@rule("Transpose")
def transpose(lw: Lowerer, node: Node) -> None:
    """Transpose: free when it only changes the layout label, else eo_transpose (rank <= 4)."""
    src, vw = _source(lw, node.inputs[0])
    xs, ys = lw.shape(node.inputs[0]), lw.shape(node.outputs[0])
    perm = list(node.attr("perm", list(range(len(xs)))[::-1]))
    if len(xs) > 4:
        xs, perm = _merge_dims(xs, perm)
        if len(xs) > 4:
            raise LoweringError("a transpose of more than 4 dimensions that cannot be merged")
    if src.layout == "nhwc" and perm == [0, 2, 3, 1]:  # NCHW -> NHWC: the data already is
        _bind_result(lw, node, _alias(lw, node, src, ys, "plain"), vw)
        return
    if src.layout == "plain" and perm == [0, 3, 1, 2] and len(xs) == 4:
        _bind_result(lw, node, _alias(lw, node, src, c_shape(ys)[0], "nhwc"), vw)
        return
    src = lw.as_layout(src, "plain")
    dims = list(xs) + [1] * (4 - len(xs))
    perm4 = perm + list(range(len(perm), 4))
    out = lw.new_tensor(None, src.ctype, ys, "plain", None, src.scale, src.zero_point,
                        base=node.outputs[0].name)
    lw.emit(Op("eo_transpose", lw.label(node), "Transpose",
               [lw.dims_const(dims), lw.dims_const(perm4), src.nbytes // src.size, src, out],
               [src], [out]))
    _bind_result(lw, node, out, vw)


def _concat_const(lw: Lowerer, base: str, v: Value, layout: str, q) -> Const:
    """A constant Concat input in the output's layout.

    int8: quantized with the output's parameters as ORT's QuantizeLinear would, or its own
    integers if they are already at those parameters.
    """
    qc = lw.qconstant(v) if q is not None else None
    if qc is not None and not qc[1].per_channel and (
            float(qc[1].scale), int(qc[1].zero_point) - (128 if qc[1].dtype.name == "UINT8"
                                                         else 0)) == q[2:4]:
        data = qc[0].astype(np.int16) - (128 if qc[1].dtype.name == "UINT8" else 0)
    else:
        data = lw.constant(v)
        if data is None:
            raise LoweringError(f"input {v.name!r} is neither computed nor constant")
        if q is not None:
            data = ref.quantize(np.asarray(data, np.float32), q[2], q[3])
    if layout == "nhwc":
        data = data.transpose(0, 2, 3, 1)
    return lw.const(base, "int8_t" if q is not None else "float", data)


@rule("Concat")
def concat(lw: Lowerer, node: Node) -> None:
    """Concat (int8 when every computed input has the output's scale and zero point)."""
    ys = lw.shape(node.outputs[0])
    axis = int(node.attr("axis")) % len(ys)
    q = lw.int8_output(node)
    computed = [v for v in node.inputs if id(v) in lw.env or id(v) in lw.views]
    int8 = q is not None and all(lw.view(v) is not None and (
        lw.view(v).scale, lw.view(v).zero_point) == q[2:4] for v in computed)  # type: ignore
    srcs = {id(v): lw.view(v).tensor if int8 else lw.act(v) for v in computed}  # type: ignore
    layout = "nhwc" if len(ys) == 4 and any(s.layout == "nhwc" for s in srcs.values()) \
        else "plain"
    items: list = []
    for i, v in enumerate(node.inputs):
        if id(v) in srcs:
            items.append(lw.as_layout(srcs[id(v)], layout))
        else:
            items.append(_concat_const(lw, f"{lw.label(node)}_in{i}", v, layout,
                                       q if int8 else None))
    c_axis = {0: 0, 1: 3, 2: 1, 3: 2}[axis] if layout == "nhwc" else axis
    shape = c_shape(ys)[0] if layout == "nhwc" else ys
    elem = CTYPES["int8_t" if int8 else "float"][0]
    dims = [lw.shape(v) for v in node.inputs]
    dims = [c_shape(d)[0] if layout == "nhwc" else d for d in dims]
    sizes = [math.prod(d[c_axis:]) * elem for d in dims]
    outer = math.prod(shape[:c_axis])
    if int8:
        qnode, fused, s_out, zp_out, _amin, _amax = q  # type: ignore[misc]
        if fused:
            raise LoweringError("an activation after an int8 Concat")
        out = lw.new_tensor(qnode.outputs[0], "int8_t", shape, layout, scale=s_out,
                            zero_point=zp_out)
        lw.done.add(id(qnode))
    else:
        out = lw.new_tensor(node.outputs[0], "float", shape, layout)
    reads = [x for x in items if isinstance(x, TensorRef)]
    lw.emit(Op("eo_concat", lw.label(node), "Concat",
               [len(items), Ptrs(items), "(const int32_t[]){" + ", ".join(map(str, sizes)) + "}",
                outer, out], reads, [out]))


@rule("Pad")
def pad(lw: Lowerer, node: Node) -> None:
    """Constant padding of a tensor of rank <= 4 (pads of an NCHW tensor applied in NHWC)."""
    mode = node.attr_str("mode", "constant")
    if mode != "constant":
        raise LoweringError(f"Pad mode {mode!r} is not supported")
    pads = lw.constant(node.inputs[1]) if len(node.inputs) > 1 else np.array(node.attr("pads"))
    if pads is None or (len(node.inputs) > 3 and node.inputs[3] is not None):
        raise LoweringError("pads must be constant and cover every axis")
    value = lw.constant(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2] is not None \
        else np.zeros(())
    src, vw = _source(lw, node.inputs[0])
    xs, ys = lw.shape(node.inputs[0]), lw.shape(node.outputs[0])
    r = len(xs)
    if r > 4 or np.any(pads < 0):
        raise LoweringError("only non-negative pads of tensors up to rank 4")
    before, after = list(pads[:r]), list(pads[r:])
    if src.layout == "flat_hwc":
        src = lw.as_layout(src, "plain")
    if src.layout == "nhwc":
        order = [0, 2, 3, 1]
        before, after = [before[i] for i in order], [after[i] for i in order]
        dims, shape = list(src.shape), c_shape(ys)[0]
    else:
        dims, shape = list(xs), ys
    dims += [1] * (4 - len(dims))
    before += [0] * (4 - len(before))
    after += [0] * (4 - len(after))
    if vw is not None:
        fill = np.clip(np.round(float(value) / vw.scale) + vw.zero_point, -128, 127)
        vc = lw.const(lw.label(node) + "_value", "int8_t", np.array([fill]))
    else:
        vc = lw.const(lw.label(node) + "_value", src.ctype if src.ctype != "int8_t" else "float",
                      np.array([float(value)]))
    out = lw.new_tensor(None, src.ctype, shape, src.layout, None, src.scale, src.zero_point,
                        base=node.outputs[0].name)
    lw.emit(Op("eo_pad", lw.label(node), "Pad",
               [lw.dims_const(dims), lw.dims_const(before + after), src.nbytes // src.size,
                vc, src, out], [src], [out]))
    _bind_result(lw, node, out, vw)


@rule("Slice", "Split")
def slice_(lw: Lowerer, node: Node) -> None:
    """Slice and Split of tensors up to rank 4, int8 or float alike.

    Starts, ends, axes, steps (negative ones too) and split sizes must be constant; each
    output is a strided copy in the storage layout (NHWC axes for a 4-D activation).
    """
    src, vw = _source(lw, node.inputs[0])
    xs = lw.shape(node.inputs[0])
    if src.layout == "flat_hwc" or len(xs) > 4:
        src = lw.as_layout(src, "plain")
    for i, ranges in enumerate(_slice_ranges(lw, node, xs)):
        if not node.outputs[i].uses() and not node.outputs[i].is_graph_output():
            continue
        dims = list(xs)
        if len(xs) > 4:  # axes of size 1 that stay whole do not move a byte: drop them
            whole = [a for a in range(len(xs)) if xs[a] == 1 and len(ranges[a]) == 1]
            ranges = [r for a, r in enumerate(ranges) if a not in whole]
            dims = [d for a, d in enumerate(xs) if a not in whole]
            if len(dims) > 4:
                raise LoweringError(f"{node.op_type} of a rank-{len(xs)} tensor (at most 4 "
                                    "axes of size above 1)")
        ys = [len(r) for r in ranges]
        starts, steps = [r.start for r in ranges], [r.step for r in ranges]
        shape = ys
        if src.layout == "nhwc":
            order = [0, 2, 3, 1]
            dims, shape = list(src.shape), list(c_shape(tuple(ys))[0])
            starts, steps = [starts[a] for a in order], [steps[a] for a in order]
        pad = 4 - len(dims)
        out_shape = tuple(shape) if len(xs) <= 4 else lw.shape(node.outputs[i])
        out = lw.new_tensor(None, src.ctype, out_shape, src.layout, None, src.scale,
                            src.zero_point, base=node.outputs[i].name)
        lw.emit(Op("eo_slice", lw.label(node) + (f"_{i}" if len(node.outputs) > 1 else ""),
                   node.op_type, [lw.dims_const(dims), lw.dims_const(starts + [0] * pad),
                                  lw.dims_const(steps), lw.dims_const(shape),
                                  src.nbytes // src.size, src, out], [src], [out]))
        _bind_result(lw, node, out, vw, i)


def _slice_ranges(lw: Lowerer, node: Node, xs) -> list[list[range]]:
    """Per output, the input indices it takes along every axis (ONNX clamping rules)."""
    r = len(xs)

    def const(i: int, what: str) -> np.ndarray | None:
        if len(node.inputs) <= i or node.inputs[i] is None:
            return None
        c = lw.constant(node.inputs[i])
        if c is None:
            raise LoweringError(f"{node.op_type} {what} must be constant")
        return c.ravel().astype(np.int64)

    if node.op_type == "Slice":
        if len(node.inputs) == 1:  # Slice-1: attributes
            starts, ends = node.attr("starts"), node.attr("ends")
            axes, steps = node.attr("axes", None), None
        else:
            starts, ends = const(1, "starts"), const(2, "ends")
            axes, steps = const(3, "axes"), const(4, "steps")
        axes = list(range(len(starts))) if axes is None else [int(a) % r for a in axes]
        steps = [1] * len(axes) if steps is None else [int(s) for s in steps]
        full = [range(d) for d in xs]
        for a, b, e, st in zip(axes, starts, ends, steps, strict=True):
            if st == 0:
                raise LoweringError("Slice step 0")
            full[a] = range(*slice(int(b), int(e), st).indices(xs[a]))
        return [full]
    axis = int(node.attr("axis", 0)) % r
    split = const(1, "split")
    if split is None and node.attr("split", None) is not None:
        split = np.asarray(node.attr("split"), np.int64)
    n = len(node.outputs)
    if split is None:  # equal parts; opset 18 num_outputs: the last one may be smaller
        size = -(-xs[axis] // n)
        split = np.array([min(size, xs[axis] - k * size) for k in range(n)])
    if len(split) != n or int(split.sum()) != xs[axis]:
        raise LoweringError(f"Split sizes {split.tolist()} do not cover axis {axis} "
                            f"({xs[axis]}) in {n} outputs")
    out, start = [], 0
    for size in split.tolist():
        ranges = [range(d) for d in xs]
        ranges[axis] = range(start, start + int(size))
        out.append(ranges)
        start += int(size)
    return out


#: Resize's coordinate_transformation_mode -> original coordinate of output index x (float32,
#: as ONNX Runtime computes it).
_COORDS = {
    "half_pixel": lambda x, s, n_in, n_out: (x + 0.5) / s - 0.5,
    "pytorch_half_pixel": lambda x, s, n_in, n_out: (x + 0.5) / s - 0.5 if n_out > 1
    else x * 0,
    "align_corners": lambda x, s, n_in, n_out: x * np.float32(n_in - 1) / np.float32(n_out - 1)
    if n_out > 1 else x * 0,
    "asymmetric": lambda x, s, n_in, n_out: x / s,
    "tf_half_pixel_for_nn": lambda x, s, n_in, n_out: (x + 0.5) / s,
}


def nearest_indices(n_in: int, n_out: int, scale: float, coords: str, rounding: str
                    ) -> np.ndarray:
    """The input index each output index of a nearest Resize reads (ONNX semantics)."""
    if coords not in _COORDS:
        raise LoweringError(f"Resize coordinate_transformation_mode {coords!r} is not supported")
    x = np.arange(n_out, dtype=np.float32)
    xo = np.asarray(_COORDS[coords](x, np.float32(scale), n_in, n_out), np.float32)
    low = np.floor(xo)
    half = xo - low == np.float32(0.5)
    if rounding == "round_prefer_floor":
        idx = np.where(half, low, np.round(xo))
    elif rounding == "round_prefer_ceil":
        idx = np.where(half, low + 1, np.round(xo))
    elif rounding == "floor":
        idx = low
    elif rounding == "ceil":
        idx = np.ceil(xo)
    else:
        raise LoweringError(f"Resize nearest_mode {rounding!r} is not supported")
    return np.clip(idx, 0, n_in - 1).astype(np.int32)


def linear_taps(n_in: int, n_out: int, scale: float, coords: str
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(i0, i1, f)`` of a linear Resize axis: output ``x`` is ``(1 - f) in[i0] + f in[i1]``.

    As ONNX Runtime computes it: the original coordinate clamped to ``[0, n_in - 1]``, its
    floor and the next index (the last one repeats at the edge, with weight 0).
    """
    if coords not in _COORDS or coords == "tf_half_pixel_for_nn":
        raise LoweringError(f"linear Resize with coordinate_transformation_mode {coords!r} "
                            "is not supported")
    x = np.arange(n_out, dtype=np.float32)
    xo = np.asarray(_COORDS[coords](x, np.float32(scale), n_in, n_out), np.float32)
    xo = np.clip(xo, np.float32(0), np.float32(n_in - 1))
    i0 = np.minimum(xo.astype(np.int32), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    f = np.where(i0 == i1, np.float32(0), xo - i0.astype(np.float32)).astype(np.float32)
    return i0.astype(np.int32), i1.astype(np.int32), f


@rule("Resize", "Upsample")
def resize(lw: Lowerer, node: Node) -> None:
    """Nearest or bilinear Resize over H and W of a 4-D tensor (FPN, YOLO, segmentation).

    Nearest is a gather by index tables computed here, for float and int8 alike (quant
    gives Resize its input's scale); linear blends two rows and two columns by tables of
    indices and weights, in float (an int8 input is dequantized first).
    """
    mode = node.attr_str("mode", "nearest")
    if mode not in ("nearest", "linear", "bilinear"):  # bilinear: Upsample-7's name
        raise LoweringError(f"Resize mode {mode!r} is not supported (only 'nearest' and "
                            "'linear')")
    if int(node.attr("antialias", 0)) or node.attr("axes", None) is not None:
        raise LoweringError("Resize with antialias or axes is not supported")
    xs, ys = lw.shape(node.inputs[0]), lw.shape(node.outputs[0])
    if len(xs) != 4 or xs[0] != ys[0] or xs[1] != ys[1]:
        raise LoweringError("Resize is supported over the H and W of a 4-D tensor only")
    if node.op_type == "Upsample" or len(node.inputs) == 2:  # Upsample, Resize-10: (X, scales)
        scales = lw.constant(node.inputs[1])
        coords, rounding = "asymmetric", "round_prefer_floor"
        if node.op_type == "Upsample":
            rounding = "floor"  # Upsample-9 picks floor(x / scale)
    else:
        scales = lw.constant(node.inputs[2]) if len(node.inputs) > 2 \
            and node.inputs[2] is not None else None
        if scales is not None and scales.size == 0:
            scales = None
        coords = node.attr_str("coordinate_transformation_mode", "half_pixel")
        rounding = node.attr_str("nearest_mode", "round_prefer_floor")
    if scales is None:  # sizes given: the scale is out / in
        scales = np.array([1.0, 1.0, ys[2] / xs[2], ys[3] / xs[3]], np.float32)
    if mode != "nearest":
        _resize_linear(lw, node, xs, ys, scales, coords)
        return
    tables = [lw.const(lw.label(node) + axis, "int32_t",
                       nearest_indices(xs[i], ys[i], float(scales[i]), coords, rounding))
              for axis, i in (("_rows", 2), ("_cols", 3))]
    src, vw = _source(lw, node.inputs[0])
    src, dims, shape = _images(lw, src, xs, ys)
    out = lw.new_tensor(None, src.ctype, shape, src.layout, None, src.scale, src.zero_point,
                        base=node.outputs[0].name)
    lw.emit(Op("eo_resize_nearest", lw.label(node), node.op_type,
               [lw.dims_const(dims), *tables, src.nbytes // src.size, src, out], [src], [out]))
    _bind_result(lw, node, out, vw)


def _images(lw: Lowerer, src: TensorRef, xs, ys) -> tuple[TensorRef, list[int], tuple]:
    """``(source, dims, output storage shape)`` of a resize of the H and W of ``src``.

    ``dims`` = n, in_h, in_w, c, out_h, out_w as the resize kernels take them: NHWC, or NCHW
    as ``[n * c]`` images of one channel.
    """
    if src.layout == "flat_hwc":
        src = lw.as_layout(src, "plain")
    if src.layout == "nhwc":
        return src, [xs[0], xs[2], xs[3], xs[1], ys[2], ys[3]], c_shape(ys)[0]
    return src, [xs[0] * xs[1], xs[2], xs[3], 1, ys[2], ys[3]], tuple(ys)


def _resize_linear(lw: Lowerer, node: Node, xs, ys, scales: np.ndarray, coords: str) -> None:
    base = lw.label(node)
    tables = []
    for axis, i in (("_rows", 2), ("_cols", 3)):
        i0, i1, f = linear_taps(xs[i], ys[i], float(scales[i]), coords)
        tables += [lw.const(base + axis + "0", "int32_t", i0),
                   lw.const(base + axis + "1", "int32_t", i1),
                   lw.const(base + axis + "_f", "float", f)]
    src, dims, shape = _images(lw, lw.act(node.inputs[0]), xs, ys)
    out = lw.new_tensor(node.outputs[0], "float", shape, src.layout)
    lw.emit(Op("eo_resize_linear_f32", base, node.op_type,
               [lw.dims_const(dims), *tables, src, out], [src], [out],
               4 * math.prod(ys)))
