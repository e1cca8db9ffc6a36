"""Lowering rules for the layers: graph I/O, Q/DQ, Conv, Gemm/MatMul, pooling.

Each rule lowers one ONNX node (and the Relu/Clip/QuantizeLinear it absorbs) into kernel
calls; :data:`RULES` maps op types to rules (elementwise and data-movement rules live in
:mod:`.rules_elementwise`). Rules raise :class:`~.lower.LoweringError` with the reason.
"""

from __future__ import annotations

import math

import numpy as np

from edgeopt.ir import Node, Value
from edgeopt.ir.quant import qdq_params
from edgeopt.ir.sparse import CSRTensor

from .lower import Lowerer, LoweringError, QView, Rule, c_identifier
from .program import Op, Params
from .reference import quantize_multiplier, requant_params

__all__ = ["RULES", "bind_inputs", "bind_outputs", "rule"]

RULES: dict[str, Rule] = {}
FLT_MAX = "FLT_MAX"


def rule(*op_types: str):
    """Register a lowering rule for ``op_types``."""
    def decorate(fn: Rule) -> Rule:
        for op in op_types:
            RULES[op] = fn
        return fn
    return decorate


def c_shape(shape: tuple[int, ...]) -> tuple[tuple[int, ...], str]:
    """Storage shape and layout of an ONNX activation shape (4-D: NHWC)."""
    if len(shape) == 4:
        n, c, h, w = shape
        return (n, h, w, c), "nhwc"
    return tuple(shape), "plain"


def _int8_params(qp, what: str) -> tuple[float, int]:
    if qp is None or qp.per_channel or qp.dtype.name not in ("INT8", "UINT8"):
        raise LoweringError(f"{what}: only per-tensor int8/uint8 activations are supported")
    return float(qp.scale), int(qp.zero_point) - (128 if qp.dtype.name == "UINT8" else 0)


# -- graph inputs and outputs ---------------------------------------------------------------
def bind_inputs(lw: Lowerer) -> None:
    """C inputs for the graph inputs: int8 when every reader quantizes them alike."""
    for i, v in enumerate(x for x in lw.model.graph.inputs if not x.is_initializer()):
        if v.shape is None or not all(isinstance(d, int) for d in v.shape):
            raise LoweringError(f"cannot emit C: input {c_identifier(v.name)!r} has no static "
                                "shape")
        if v.dtype is None or v.dtype.name != "FLOAT":
            raise LoweringError(f"cannot emit C: input {c_identifier(v.name)!r} is "
                                f"{v.dtype.name if v.dtype else 'untyped'}; only float32 "
                                "inputs are supported")
        shape, layout = c_shape(lw.shape(v))
        readers = [u.node for u in v.uses()]
        qps = [qdq_params(n) for n in readers if n.op_type == "QuantizeLinear"]
        same = len(qps) == len(readers) and readers and all(
            q is not None and not q.per_channel and q.dtype.name in ("INT8", "UINT8")
            and float(q.scale) == float(qps[0].scale) and int(q.zero_point) == int(
                qps[0].zero_point) and q.dtype == qps[0].dtype for q in qps)
        if same:
            scale, zp = _int8_params(qps[0], "input")
            t = lw.new_tensor(None, "int8_t", shape, layout, scale=scale, zero_point=zp,
                              base=v.name)
            for n in readers:
                lw.done.add(id(n))
                lw.bind(n.outputs[0], t)
        else:
            t = lw.new_tensor(v, "float", shape, layout)
        t.io, t.index = "input", i
        lw.program.inputs.append(t)


def bind_outputs(lw: Lowerer) -> None:
    """C outputs for the graph outputs (an int8 tensor when the output is dequantized)."""
    for i, v in enumerate(lw.model.graph.outputs):
        view = lw.view(v)
        t = view.tensor if view is not None else lw.env.get(id(v))
        if t is None:
            t = lw.act(v)
        if t.layout == "flat_hwc":
            t = lw.as_layout(t, "plain")
        if t.alias is not None or t.io is not None:
            copy = lw.new_tensor(None, t.ctype, t.shape, t.layout, t.chw, t.scale,
                                 t.zero_point, base=v.name)
            lw.emit(Op("memcpy", c_identifier(v.name), "Identity", [copy, t, t.nbytes],
                       [t], [copy]))
            t = copy
        t.io, t.index = "output", i
        lw.program.outputs.append(t)


# -- QuantizeLinear / DequantizeLinear --------------------------------------------------------
@rule("DequantizeLinear")
def dequantize_linear(lw: Lowerer, node: Node) -> None:
    """An int8 activation read as float: a view, nothing is computed until a float op needs it."""
    x = node.inputs[0]
    if x is not None and x.const_value is not None:
        return  # a weight: rules read it through Lowerer.qconstant
    t = lw.env.get(id(x)) if x is not None else None
    if t is None or t.ctype != "int8_t":
        raise LoweringError("input is not an int8 activation")
    scale, zp = _int8_params(qdq_params(node), "DequantizeLinear")
    if (scale, zp) != (t.scale, t.zero_point):
        raise LoweringError("parameters differ from the QuantizeLinear that produced the input")
    lw.views[id(node.outputs[0])] = QView(t, scale, zp)


@rule("QuantizeLinear")
def quantize_linear(lw: Lowerer, node: Node) -> None:
    """Float to int8 (eo_quantize_s8), or int8 to int8 (free, or eo_requantize_s8)."""
    scale, zp = _int8_params(qdq_params(node), "QuantizeLinear")
    x, out = node.inputs[0], node.outputs[0]
    view = lw.view(x)
    if view is not None:
        src = view.tensor
        if (view.scale, view.zero_point) == (scale, zp):
            lw.bind(out, src)
            return
        t = lw.new_tensor(out, "int8_t", src.shape, src.layout, src.chw, scale, zp)
        mult, shift = quantize_multiplier(view.scale / scale)
        lw.emit(Op("eo_requantize_s8", lw.label(node), "QuantizeLinear",
                   [-view.zero_point, zp, mult, shift, src, t, t.size], [src], [t]))
        return
    src = lw.act(x)
    t = lw.new_tensor(out, "int8_t", src.shape, src.layout, src.chw, scale, zp)
    lw.emit(Op("eo_quantize_s8", lw.label(node), "QuantizeLinear",
               [scale, zp, src, t, t.size], [src], [t]))


# -- convolution ------------------------------------------------------------------------------
def conv_geometry(node: Node, x: tuple[int, ...], y: tuple[int, ...], k: tuple[int, int]
                  ) -> dict[str, int]:
    """Strides, dilations and top/left padding of a 2-D Conv or pool (``pads`` or auto_pad)."""
    strides = list(node.attr("strides", [1, 1]))
    dil = list(node.attr("dilations", [1, 1]))
    auto = node.attr_str("auto_pad", "NOTSET")
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        pads = []
        for i in range(2):
            total = max(0, (y[2 + i] - 1) * strides[i] + (k[i] - 1) * dil[i] + 1 - x[2 + i])
            pads.append(total // 2 if auto == "SAME_UPPER" else total - total // 2)
    elif auto == "VALID":
        pads = [0, 0]
    else:
        pads = list(node.attr("pads", [0, 0, 0, 0]))[:2]
    return {"stride_h": strides[0], "stride_w": strides[1], "dil_h": dil[0], "dil_w": dil[1],
            "pad_top": pads[0], "pad_left": pads[1]}


def _conv_weights(w: np.ndarray, depthwise: bool) -> np.ndarray:
    """ONNX ``[O, I/g, kh, kw]`` -> OHWI, or ``[kh, kw, O]`` for a depthwise conv."""
    if depthwise:
        return np.ascontiguousarray(w[:, 0].transpose(1, 2, 0))
    return np.ascontiguousarray(w.transpose(0, 2, 3, 1))


def _csr_or_dense(lw: Lowerer, base: str, ctype: str, matrix: np.ndarray, packed: bool):
    """The weight as a CSR block (when the IR packed it and CSR is smaller) or dense."""
    if packed and lw.sparse:
        csr = CSRTensor.pack(matrix.reshape(matrix.shape[0], -1))
        if csr.stored_nbytes < matrix.size * np.dtype(matrix.dtype).itemsize:
            return csr_block(lw, base, ctype, csr)
    return lw.const(base + "_w", ctype, matrix)


def csr_block(lw: Lowerer, base: str, ctype: str, csr: CSRTensor):
    """The ``eo_csr`` parameter block of a packed weight (its arrays become constants)."""
    values = lw.const(base + "_csr_values", ctype, csr.values)
    idx_t = f"uint{csr.col_idx.dtype.itemsize * 8}_t"
    ptr_t = f"uint{csr.row_ptr.dtype.itemsize * 8}_t"
    cols = lw.const(base + "_csr_cols", idx_t, csr.col_idx)
    rows = lw.const(base + "_csr_rows", ptr_t, csr.row_ptr)
    return lw.params("eo_csr", values=values, col_idx=cols, row_ptr=rows, rows=csr.dims[0],
                     cols=csr.dims[1], idx_bytes=csr.col_idx.dtype.itemsize,
                     ptr_bytes=csr.row_ptr.dtype.itemsize)


def _bias_int32(lw: Lowerer, b: Value | None, s_in: float, s_w: np.ndarray) -> np.ndarray:
    """The int32 bias at ``s_in * s_w[c]`` (the file's own integers when they are at it)."""
    n = len(s_w)
    if b is None:
        return np.zeros(n, np.int32)
    expected = (np.float32(s_in) * s_w.astype(np.float32)).astype(np.float64)
    q = lw.qconstant(b)
    if q is not None:
        ints, qp, _ = q
        scale = np.broadcast_to(np.asarray(qp.scale, np.float64), (n,))
        if qp.dtype.name == "INT32" and not np.any(qp.zero_point) and np.allclose(
                scale, expected, rtol=1e-6, atol=0):
            return np.broadcast_to(ints.ravel(), (n,)).astype(np.int32)
    f = lw.constant(b)
    if f is None:
        raise LoweringError("bias is not constant")
    return np.clip(np.round(np.broadcast_to(f.ravel(), (n,)) / expected), -2**31,
                   2**31 - 1).astype(np.int32)


def _multipliers(lw: Lowerer, base: str, real: np.ndarray):
    pairs = [quantize_multiplier(float(r)) for r in real]
    return (lw.const(base + "_mult", "int32_t", np.array([m for m, _ in pairs], np.int32)),
            lw.const(base + "_shift", "int32_t", np.array([s for _, s in pairs], np.int32)))


def _layer_weight(lw: Lowerer, node: Node) -> tuple[np.ndarray, tuple | None, bool]:
    """``(weight, its int8 form or None, runs in int8)`` of a Conv-like layer.

    The layer runs in int8 when its input and output are int8 activations and its weight
    is a quantized constant; the weight returned is then the integers, else the floats.
    """
    q, view, wq = lw.int8_output(node), lw.view(node.inputs[0]), lw.qconstant(node.inputs[1])
    int8 = q is not None and view is not None and wq is not None
    wf = wq[0] if int8 else lw.constant(node.inputs[1])
    if wf is None:
        raise LoweringError("the weight is not constant")
    return wf, wq, int8


@rule("Conv")
def conv(lw: Lowerer, node: Node) -> None:
    """2-D Conv (any stride, padding, dilation, groups; depthwise kernel for depthwise)."""
    x, w = node.inputs[0], node.inputs[1]
    xs, ys = lw.shape(x), lw.shape(node.outputs[0])
    if len(xs) != 4:
        raise LoweringError(f"only 2-D convolutions are supported (input rank {len(xs)})")
    group = int(node.attr("group", 1))
    wf, wq, int8 = _layer_weight(lw, node)
    kh, kw = wf.shape[2], wf.shape[3]
    depthwise = group > 1 and group == xs[1] and wf.shape[1] == 1
    stored = wq[2] if wq is not None else w.const_value  # a float layer may read int8
    packed = isinstance(stored, CSRTensor) and not depthwise
    base = lw.label(node)
    p = {"batch": xs[0], "in_h": xs[2], "in_w": xs[3], "in_c": xs[1], "out_h": ys[2],
         "out_w": ys[3], "out_c": ys[1], "k_h": kh, "k_w": kw,
         **conv_geometry(node, xs, ys, (kh, kw)), "groups": group}
    macs = math.prod(ys) * wf.shape[1] * kh * kw
    kernel = "eo_depthwise_conv" if depthwise else "eo_conv"
    if int8:
        _int8_conv_layer(lw, node, kernel, p, macs, wq, np.asarray(wq[1].scale),
                         lambda: _csr_or_dense(lw, base, "int8_t", _conv_weights(
                             wf.astype(np.int8), depthwise), packed))
        return
    _float_conv_layer(lw, node, kernel, p, macs, lambda: _csr_or_dense(
        lw, base, "float", _conv_weights(wf.astype(np.float32), depthwise), packed))


def _int8_conv_layer(lw: Lowerer, node: Node, kernel: str, p: dict, macs: int, wq,
                     s_w: np.ndarray, weights) -> None:
    """Emit an int8 Conv-like layer: int32 bias at s_in * s_w[c], per-channel multipliers.

    ``weights()`` builds the weight constant (dense or CSR: ``_csr`` is added to ``kernel``).
    """
    x, b = node.inputs[0], node.inputs[2] if len(node.inputs) > 2 else None
    ys, base = lw.shape(node.outputs[0]), lw.label(node)
    view = lw.view(x)
    qnode, fused, s_out, zp_out, amin, amax = lw.int8_output(node)
    if np.any(wq[1].zero_point):
        raise LoweringError("int8 weights must be symmetric (zero point 0)")
    s_w = np.broadcast_to(np.asarray(s_w, np.float32).ravel(), (ys[1],))
    xt = lw.as_layout(view.tensor, "nhwc")
    bias = lw.const(base + "_b", "int32_t", _bias_int32(lw, b, view.scale, s_w))
    mult, shift = _multipliers(lw, base, view.scale * s_w.astype(np.float64) / s_out)
    w = weights()
    out = lw.new_tensor(qnode.outputs[0], "int8_t", c_shape(ys)[0], "nhwc", scale=s_out,
                        zero_point=zp_out)
    lw.done.update(id(n) for n in (qnode, *fused))
    params = lw.params("eo_conv_params", **p, in_offset=-view.zero_point, out_offset=zp_out,
                       act_min=amin, act_max=amax, fact_min=0.0, fact_max=0.0)
    name = kernel + "_s8" + ("_csr" if isinstance(w, Params) else "")
    lw.emit(Op(name, base, node.op_type, [params, xt, w, bias, mult, shift, out], [xt], [out],
               macs))


def _float_conv_layer(lw: Lowerer, node: Node, kernel: str, p: dict, macs: int,
                      weights) -> None:
    """Emit a float Conv-like layer (``weights()`` as for :func:`_int8_conv_layer`)."""
    x, b = node.inputs[0], node.inputs[2] if len(node.inputs) > 2 else None
    ys, base = lw.shape(node.outputs[0]), lw.label(node)
    xt = lw.as_layout(lw.act(x), "nhwc")
    out_v, lo, hi, fused = lw.float_fusion(node)
    bf = lw.constant(b) if b is not None else np.zeros(ys[1], np.float32)
    if bf is None:
        raise LoweringError("bias is not constant")
    bias = lw.const(base + "_b", "float", np.broadcast_to(bf.ravel(), (ys[1],)))
    w = weights()
    out = lw.new_tensor(out_v, "float", c_shape(ys)[0], "nhwc")
    lw.done.update(id(n) for n in fused)
    params = lw.params("eo_conv_params", **p, in_offset=0, out_offset=0, act_min=-128,
                       act_max=127, fact_min=_flt(lo), fact_max=_flt(hi))
    name = kernel + "_f32" + ("_csr" if isinstance(w, Params) else "")
    lw.emit(Op(name, base, node.op_type, [params, xt, w, bias, out], [xt], [out], macs))


@rule("ConvTranspose")
def conv_transpose(lw: Lowerer, node: Node) -> None:
    """2-D ConvTranspose (stride, pads, dilation, output_padding, groups), float or int8.

    The kernel gathers: each output reads the inputs whose scatter lands on it, with the
    weight reordered to ``[out_c][k_h][k_w][in_c/groups]``, so int8 accumulates and
    requantizes per output channel exactly as Conv does.
    """
    x = node.inputs[0]
    xs, ys = lw.shape(x), lw.shape(node.outputs[0])
    if len(xs) != 4 or node.attr("output_shape", None) is not None \
            or node.attr_str("auto_pad", "NOTSET") != "NOTSET":
        raise LoweringError("only 2-D ConvTranspose with explicit pads (no output_shape or "
                            "auto_pad) is supported")
    group = int(node.attr("group", 1))
    wf, wq, int8 = _layer_weight(lw, node)
    cin_g, cout_g, kh, kw = xs[1] // group, wf.shape[1], wf.shape[2], wf.shape[3]
    ohwi = wf.reshape(group, cin_g, cout_g, kh, kw).transpose(0, 2, 3, 4, 1) \
        .reshape(group * cout_g, kh, kw, cin_g)
    strides = list(node.attr("strides", [1, 1]))
    dil = list(node.attr("dilations", [1, 1]))
    pads = list(node.attr("pads", [0, 0, 0, 0]))
    base = lw.label(node)
    p = {"batch": xs[0], "in_h": xs[2], "in_w": xs[3], "in_c": xs[1], "out_h": ys[2],
         "out_w": ys[3], "out_c": ys[1], "k_h": kh, "k_w": kw, "stride_h": strides[0],
         "stride_w": strides[1], "dil_h": dil[0], "dil_w": dil[1], "pad_top": pads[0],
         "pad_left": pads[1], "groups": group}
    macs = math.prod(xs) * cout_g * kh * kw  # every input element scatters
    if int8:
        s_w = np.asarray(wq[1].scale, np.float32).ravel()
        _int8_conv_layer(lw, node, "eo_conv_transpose", p, macs, wq,
                         np.tile(s_w, group) if len(s_w) == cout_g else s_w,
                         lambda: lw.const(base + "_w", "int8_t", ohwi.astype(np.int8)))
        return
    _float_conv_layer(lw, node, "eo_conv_transpose", p, macs,
                      lambda: lw.const(base + "_w", "float", ohwi.astype(np.float32)))


def _flt(x: float):
    """A float clamp bound for C (infinities become FLT_MAX)."""
    if x == np.inf:
        return FLT_MAX
    if x == -np.inf:
        return "-" + FLT_MAX
    return float(x)


# -- fully connected --------------------------------------------------------------------------
def _fc_matrix(lw: Lowerer, node: Node, w: np.ndarray) -> np.ndarray:
    """The weight as ``[out][in]``."""
    if node.op_type == "Gemm":
        if node.attr("transA", 0):
            raise LoweringError("Gemm with transA is not supported")
        return w if node.attr("transB", 0) else w.T
    if w.ndim != 2:
        raise LoweringError("MatMul needs a constant 2-D weight")
    return w.T


def _hwc_columns(m: np.ndarray, chw: tuple[int, int, int]) -> np.ndarray:
    """Reorder ``[out][C*H*W]`` columns to the ``(h, w, c)`` order of a flattened NHWC input."""
    c, h, w = chw
    return np.ascontiguousarray(m.reshape(m.shape[0], c, h, w).transpose(0, 2, 3, 1)
                                .reshape(m.shape[0], -1))


@rule("Gemm", "MatMul")
def fully_connected(lw: Lowerer, node: Node) -> None:
    """Gemm / MatMul with a constant weight (a batch of rows times ``[in, out]``)."""
    a, w = node.inputs[0], node.inputs[1]
    b = node.inputs[2] if node.op_type == "Gemm" and len(node.inputs) > 2 else None
    xs, ys = lw.shape(a), lw.shape(node.outputs[0])
    if len(xs) < 2:
        raise LoweringError("the input must have a batch axis")
    q, view, wq = lw.int8_output(node), lw.view(a), lw.qconstant(w)
    int8 = q is not None and view is not None and wq is not None
    alpha, beta = float(node.attr("alpha", 1.0)), float(node.attr("beta", 1.0))
    if int8 and (alpha != 1.0 or beta != 1.0):
        raise LoweringError("int8 Gemm needs alpha = beta = 1")
    # int8 in and weights: an int8 kernel, whether or not the output is quantized
    int8_in = view is not None and wq is not None and alpha == 1.0 and beta == 1.0
    wf = wq[0] if int8_in else lw.constant(w)
    if wf is None and node.op_type == "MatMul":
        _matmul_activations(lw, node)
        return
    if wf is None:
        raise LoweringError("the weight is not constant")
    m = _fc_matrix(lw, node, wf)
    src = view.tensor if int8_in else lw.act(a)
    if src.layout == "nhwc":
        src = lw.as_layout(src, "plain")
    if src.layout == "flat_hwc":
        m = _hwc_columns(m, src.chw)  # type: ignore[arg-type]
    stored = wq[2] if wq is not None else w.const_value  # a float layer may read int8
    packed = isinstance(stored, CSRTensor)
    base, batch = lw.label(node), math.prod(xs[:-1])
    p = {"batch": batch, "in_features": m.shape[1], "out_features": m.shape[0]}
    macs = batch * m.shape[0] * m.shape[1]
    if int8:
        qnode, fused, s_out, zp_out, amin, amax = q
        _i, wqp, _ = wq
        if np.any(wqp.zero_point):
            raise LoweringError("int8 weights must be symmetric (zero point 0)")
        s_w = np.broadcast_to(np.asarray(wqp.scale, np.float32).ravel(), (m.shape[0],))
        bias = lw.const(base + "_b", "int32_t", _bias_int32(lw, b, view.scale, s_w))
        mult, shift = _multipliers(lw, base, view.scale * s_w.astype(np.float64) / s_out)
        weights = _csr_or_dense(lw, base, "int8_t", m.astype(np.int8), packed)
        out = lw.new_tensor(qnode.outputs[0], "int8_t", ys, scale=s_out, zero_point=zp_out)
        lw.done.update(id(n) for n in (qnode, *fused))
        params = lw.params("eo_fc_params", **p, in_offset=-view.zero_point, out_offset=zp_out,
                           act_min=amin, act_max=amax, fact_min=0.0, fact_max=0.0)
        name = "eo_fc_s8" + ("_csr" if isinstance(weights, Params) else "")
        lw.emit(Op(name, base, node.op_type, [params, src, weights, bias, mult, shift, out],
                   [src], [out], macs))
        return
    out_v, lo, hi, fused = lw.float_fusion(node)
    bf = np.zeros(m.shape[0], np.float32) if b is None else lw.constant(b)
    if bf is None:
        raise LoweringError("bias is not constant")
    if int8_in:
        _fc_int8_float_out(lw, node, view, wq, m, bf, (out_v, lo, hi, fused), p, macs)
        return
    bias = lw.const(base + "_b", "float", np.broadcast_to(
        (np.float32(beta) * bf.astype(np.float32)).ravel(), (m.shape[0],)))
    weights = _csr_or_dense(lw, base, "float", (np.float32(alpha) * m).astype(np.float32),
                            packed)
    out = lw.new_tensor(out_v, "float", ys)
    lw.done.update(id(n) for n in fused)
    params = lw.params("eo_fc_params", **p, in_offset=0, out_offset=0, act_min=-128,
                       act_max=127, fact_min=_flt(lo), fact_max=_flt(hi))
    name = "eo_fc_f32" + ("_csr" if isinstance(weights, Params) else "")
    lw.emit(Op(name, base, node.op_type, [params, src, weights, bias, out], [src], [out], macs))


def _fc_int8_float_out(lw: Lowerer, node: Node, view: QView, wq, m: np.ndarray,
                       bf: np.ndarray, fusion, p: dict, macs: int) -> None:
    """An int8 layer whose output stays float (a model's last Gemm): ``eo_fc_s8_f32``.

    int8 weights in flash, int32 sums, one float multiply-add per output: what ORT's
    DequantizeLinear -> Gemm computes, up to float rounding.
    """
    _i, wqp, _ = wq
    if np.any(wqp.zero_point):
        raise LoweringError("int8 weights must be symmetric (zero point 0)")
    out_v, lo, hi, fused = fusion
    base = lw.label(node)
    s_w = np.broadcast_to(np.asarray(wqp.scale, np.float32).ravel(), (m.shape[0],))
    src = lw.as_layout(view.tensor, "plain") if view.tensor.layout == "nhwc" else view.tensor
    weights = lw.const(base + "_w", "int8_t", m.astype(np.int8))
    bias = lw.const(base + "_b", "float", np.broadcast_to(bf.astype(np.float32).ravel(),
                                                         (m.shape[0],)))
    scale = lw.const(base + "_scale", "float", np.float32(view.scale) * s_w)
    out = lw.new_tensor(out_v, "float", lw.shape(node.outputs[0]))
    lw.done.update(id(n) for n in fused)
    params = lw.params("eo_fc_params", **p, in_offset=-view.zero_point, out_offset=0,
                       act_min=-128, act_max=127, fact_min=_flt(lo), fact_max=_flt(hi))
    lw.emit(Op("eo_fc_s8_f32", base, node.op_type, [params, src, weights, bias, scale, out],
               [src], [out], macs))


def _matmul_activations(lw: Lowerer, node: Node) -> None:
    """MatMul of two computed tensors (attention's q k^T and its weights times v), float.

    ``[..., M, K] x [..., K, N]``: the batch dims of each side are its own or broadcast from
    a single matrix (stride 0).
    """
    a_v, b_v = node.inputs[0], node.inputs[1]
    xs, ws, ys = lw.shape(a_v), lw.shape(b_v), lw.shape(node.outputs[0])
    if len(xs) < 2 or len(ws) < 2:
        raise LoweringError("MatMul of two computed tensors needs both of rank >= 2")
    batch = math.prod(ys[:-2])
    strides = []
    for shape in (xs, ws):
        own = math.prod(shape[:-2])
        if own not in (1, batch) or (own == batch and tuple(shape[:-2]) !=
                                     tuple(ys[len(ys) - len(shape):-2])):
            raise LoweringError(f"MatMul batch dims {list(xs[:-2])} x {list(ws[:-2])}: only "
                                "equal ones or a single matrix broadcast")
        strides.append(0 if own == 1 and batch > 1 else shape[-2] * shape[-1])
    a = lw.act(a_v)
    b = lw.act(b_v)
    a = lw.as_layout(a, "plain") if a.layout != "plain" else a
    b = lw.as_layout(b, "plain") if b.layout != "plain" else b
    out_v, lo, hi, fused = lw.float_fusion(node)
    out = lw.new_tensor(out_v, "float", tuple(ys), "plain")
    lw.done.update(id(n) for n in fused)
    m, k, n = xs[-2], xs[-1], ws[-1]
    lw.emit(Op("eo_matmul_f32", lw.label(node), "MatMul",
               [batch, m, k, n, strides[0], strides[1], _flt(lo), _flt(hi), a, b, out],
               [a, b], [out], batch * m * k * n))


# -- pooling ----------------------------------------------------------------------------------
def _pool_params(node: Node, xs, ys, k) -> dict[str, int]:
    g = conv_geometry(node, xs, ys, k)
    if g["dil_h"] != 1 or g["dil_w"] != 1:
        raise LoweringError("dilated pooling is not supported")
    return {"batch": xs[0], "in_h": xs[2], "in_w": xs[3], "c": xs[1], "out_h": ys[2],
            "out_w": ys[3], "k_h": k[0], "k_w": k[1], "stride_h": g["stride_h"],
            "stride_w": g["stride_w"], "pad_top": g["pad_top"], "pad_left": g["pad_left"]}


#: Reductions that are global pooling when they reduce the H and W of a 4-D tensor.
SPATIAL_REDUCTIONS = {"ReduceMean": "GlobalAveragePool", "ReduceMax": "GlobalMaxPool"}


def reduced_axes(lw: Lowerer, node: Node, rank: int) -> set[int]:
    """The axes a Reduce* node reduces (an attribute, or an input from opset 13/18 on)."""
    if len(node.inputs) > 1 and node.inputs[1] is not None:
        c = lw.constant(node.inputs[1])
        if c is None:
            raise LoweringError(f"{node.op_type} axes must be constant")
        axes = c.ravel().tolist()
    else:
        axes = list(node.attr("axes", []))
    if not axes:
        return set() if node.attr("noop_with_empty_axes", 0) else set(range(rank))
    return {int(a) % rank for a in axes}


@rule("MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool")
def pool(lw: Lowerer, node: Node) -> None:
    """Max / average pooling; global average pooling is a mean over H and W.

    A ReduceMean over H and W is global average pooling too (ReduceMax: global max
    pooling); with ``keepdims=0`` its ``[N, C]`` result has the bytes of NHWC ``[N, 1, 1, C]``.
    """
    x = node.inputs[0]
    xs, ys = lw.shape(x), lw.shape(node.outputs[0])
    if len(xs) != 4:
        raise LoweringError("only 2-D pooling is supported")
    op = SPATIAL_REDUCTIONS.get(node.op_type, node.op_type)  # over H and W: the caller checks
    out_shape, out_layout = c_shape(ys)
    if len(node.outputs) > 1 and node.outputs[1].uses():
        raise LoweringError("MaxPool indices are not supported")
    if node.op_type == "AveragePool" and node.attr("count_include_pad", 0) and \
            any(node.attr("pads", [0])):
        raise LoweringError("count_include_pad=1 with padding is not supported")
    glob = op.startswith("Global")
    k = (xs[2], xs[3]) if glob else tuple(node.attr("kernel_shape"))
    p = {"batch": xs[0], "in_h": xs[2], "in_w": xs[3], "c": xs[1], "out_h": 1, "out_w": 1,
         "k_h": k[0], "k_w": k[1], "stride_h": 1, "stride_w": 1, "pad_top": 0,
         "pad_left": 0} if glob else _pool_params(node, xs, ys, k)
    mean = op == "GlobalAveragePool"
    kind = "max" if "Max" in op else "avg"
    q, view = lw.int8_output(node), lw.view(x)
    base, macs = lw.label(node), math.prod(ys) * k[0] * k[1]
    if q is not None and view is not None:
        qnode, fused, s_out, zp_out, amin, amax = q
        xt = lw.as_layout(view.tensor, "nhwc")
        out = lw.new_tensor(qnode.outputs[0], "int8_t", out_shape, out_layout, scale=s_out,
                            zero_point=zp_out)
        if mean:
            mult, shift = requant_params(view.scale, s_out)  # TFLite Mean: divides after
            op = Op("eo_mean_hw_s8", base, node.op_type, [xs[0], xs[2] * xs[3], xs[1],
                    -view.zero_point, zp_out, mult, shift, xt, out], [xt], [out], macs)
        elif (view.scale, view.zero_point) != (s_out, zp_out):
            if (amin, amax) != (-128, 127):
                raise LoweringError("int8 pooling needs the same scale and zero point in and "
                                    "out when an activation is fused into it")
            # ORT's QLinearAveragePool may change the scale (and QDQ around a ReduceMax
            # may); CMSIS-NN's pooling cannot: pool in the input's scale, then requantize
            # (like a QuantizeLinear between two int8 tensors; the max commutes with it).
            mid = lw.new_tensor(None, "int8_t", out.shape, out_layout, scale=view.scale,
                                zero_point=view.zero_point, base=base + "_" + kind)
            params = lw.params("eo_pool_params", **p, act_min=-128, act_max=127,
                               fact_min=0.0, fact_max=0.0)
            lw.emit(Op(f"eo_{kind}pool_s8", base, node.op_type, [params, xt, mid], [xt], [mid],
                       macs))
            mult, shift = quantize_multiplier(view.scale / s_out)
            op = Op("eo_requantize_s8", base + "_requant", node.op_type,
                    [-view.zero_point, zp_out, mult, shift, mid, out, out.size], [mid], [out])
        else:
            params = lw.params("eo_pool_params", **p, act_min=amin, act_max=amax,
                               fact_min=0.0, fact_max=0.0)
            op = Op(f"eo_{kind}pool_s8", base, node.op_type, [params, xt, out], [xt], [out], macs)
        lw.done.update(id(n) for n in (qnode, *fused))
        lw.emit(op)
        return
    xt = lw.as_layout(lw.act(x), "nhwc")
    out_v, lo, hi, fused = lw.float_fusion(node)
    out = lw.new_tensor(out_v, "float", out_shape, out_layout)
    lw.done.update(id(n) for n in fused)
    if mean and lo == -np.inf and hi == np.inf:
        op = Op("eo_mean_hw_f32", base, node.op_type, [xs[0], xs[2] * xs[3], xs[1], xt, out],
                [xt], [out], macs)
    else:
        params = lw.params("eo_pool_params", **p, act_min=-128, act_max=127,
                           fact_min=_flt(lo), fact_max=_flt(hi))
        op = Op(f"eo_{kind}pool_f32", base, node.op_type, [params, xt, out], [xt], [out], macs)
    lw.emit(op)


def register_all() -> dict[str, Rule]:
    """Every rule (importing the elementwise module registers its rules)."""
    from . import rules_elementwise  # noqa: F401

    return RULES
