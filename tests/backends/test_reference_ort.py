"""The integer reference (backends/c/reference.py) against ONNX Runtime's QDQ execution.

ONNX Runtime runs DequantizeLinear -> float op -> QuantizeLinear literally (graph optimizations
off, so no fused integer kernels): the float result rounded half to even. The TFLite integer
rules round a fixed-point product half away from zero, so the two may differ by one step where
the real value sits near a rounding boundary, never by more.
"""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper
from test_kernels import ort_run
from test_kernels_float import _conv64

from edgeopt.backends.c import reference as ref

MAX_OFF_BY_ONE = 0.05  # fraction of outputs one step away from ORT


def _qparams(lo: float, hi: float) -> tuple[np.float32, int]:
    """Asymmetric int8 scale and zero point covering [lo, hi] (and 0)."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = np.float32((hi - lo) / 255)
    return scale, int(np.clip(round(-128 - lo / scale), -128, 127))


def _run(nodes, inputs, out_shape, inits, feeds) -> np.ndarray:
    out = helper.make_tensor_value_info("yq", TensorProto.INT8, out_shape)
    return ort_run(nodes, inputs, [out], inits, feeds)[0]


def _qdq_input(name: str, scale, zp) -> tuple[list, list]:
    """Q -> DQ nodes and their initializers for float input ``name`` (output ``name_d``)."""
    inits = [helper.make_tensor(f"{name}_s", TensorProto.FLOAT, [], [scale]),
             helper.make_tensor(f"{name}_z", TensorProto.INT8, [], [zp])]
    nodes = [helper.make_node("QuantizeLinear", [name, f"{name}_s", f"{name}_z"], [f"{name}_q"]),
             helper.make_node("DequantizeLinear", [f"{name}_q", f"{name}_s", f"{name}_z"],
                              [f"{name}_d"])]
    return nodes, inits


def _weights(rng, wq: np.ndarray, s_x) -> tuple[list, list, np.ndarray, np.ndarray]:
    """Per-channel int8 weights and int32 bias behind DequantizeLinear (axis 0)."""
    o = wq.shape[0]
    s_w = rng.uniform(0.002, 0.02, o).astype(np.float32)
    bias = rng.integers(-3000, 3000, o).astype(np.int32)
    inits = [numpy_helper.from_array(wq, "w_q"), numpy_helper.from_array(s_w, "w_s"),
             numpy_helper.from_array(np.zeros(o, np.int8), "w_z"),
             numpy_helper.from_array(bias, "b_q"),
             numpy_helper.from_array((s_x * s_w).astype(np.float32), "b_s"),
             numpy_helper.from_array(np.zeros(o, np.int32), "b_z")]
    nodes = [helper.make_node("DequantizeLinear", ["w_q", "w_s", "w_z"], ["w_d"], axis=0),
             helper.make_node("DequantizeLinear", ["b_q", "b_s", "b_z"], ["b_d"], axis=0)]
    return nodes, inits, s_w, bias


def _output_q(y_name: str, y_float: np.ndarray, relu: bool) -> tuple[list, list, tuple]:
    s_y, zp_y = _qparams(float(y_float.min()), float(y_float.max()))
    nodes, src = [], y_name
    if relu:
        nodes.append(helper.make_node("Relu", [y_name], ["y_relu"]))
        src = "y_relu"
    inits = [helper.make_tensor("y_s", TensorProto.FLOAT, [], [s_y]),
             helper.make_tensor("y_z", TensorProto.INT8, [], [zp_y])]
    nodes.append(helper.make_node("QuantizeLinear", [src, "y_s", "y_z"], ["yq"]))
    act = ref.clamp_bounds(s_y, zp_y, lo=0.0 if relu else None)
    return nodes, inits, (s_y, zp_y, act)


def _compare(got: np.ndarray, expected: np.ndarray) -> float:
    """Assert at most one step apart; return the fraction one step apart."""
    diff = np.abs(got.astype(np.int32) - expected.astype(np.int32))
    assert diff.max() <= 1
    assert len(np.unique(expected)) > 40  # a spread of values, not a saturated output
    frac = float((diff == 1).mean())
    assert frac <= MAX_OFF_BY_ONE
    return frac


# C, H, W, O, kernel, stride, dilation, pads, group, relu
CONV_CASES = [(3, 12, 12, 8, 3, 1, 1, (1, 1, 1, 1), 1, False),
              (8, 11, 9, 16, 3, 2, 1, (1, 0, 1, 1), 1, True),
              (8, 10, 10, 8, 3, 1, 2, (2, 2, 2, 2), 8, False),
              (6, 9, 9, 12, 1, 1, 1, (0, 0, 0, 0), 3, True)]


@pytest.mark.parametrize("case", CONV_CASES)
def test_qdq_conv_within_one_step_of_ort(case):
    c, h, w, o, k, s, d, pads, group, relu = case
    rng = np.random.default_rng(o + k)
    x = (rng.standard_normal((1, c, h, w)) + 0.3).astype(np.float32)
    s_x, zp_x = _qparams(float(x.min()), float(x.max()))
    wq = rng.integers(-127, 128, (o, c // group, k, k)).astype(np.int8)
    in_nodes, in_inits = _qdq_input("x", s_x, zp_x)
    w_nodes, w_inits, s_w, bias = _weights(rng, wq, s_x)
    xq = ref.quantize(x, s_x, zp_x).transpose(0, 2, 3, 1)
    ohwi = wq.transpose(0, 2, 3, 1)
    y_float = _conv64(ref.dequantize(xq, s_x, zp_x), ohwi * s_w[:, None, None, None], (s, s),
                      (d, d), pads, group)
    out_nodes, out_inits, (s_y, zp_y, act) = _output_q("y", y_float, relu)
    conv = helper.make_node("Conv", ["x_d", "w_d", "b_d"], ["y"], strides=[s, s],
                            dilations=[d, d], pads=list(pads), group=group)
    x_info = helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))
    out_shape = [1, o, y_float.shape[1], y_float.shape[2]]
    got = _run(in_nodes + w_nodes + [conv] + out_nodes, [x_info], out_shape,
               in_inits + w_inits + out_inits, {"x": x})
    mult, shift = ref.conv_requant(s_x, s_w, s_y)
    expected = ref.conv(xq, ohwi, bias, mult, shift, in_zp=zp_x, out_zp=zp_y, stride=(s, s),
                        dilation=(d, d), pads=pads, groups=group, act=act)
    _compare(got.transpose(0, 2, 3, 1), expected)


@pytest.mark.parametrize(("batch", "k", "n", "relu"), [(32, 64, 10, False), (8, 300, 32, True)])
def test_qdq_gemm_within_one_step_of_ort(batch, k, n, relu):
    rng = np.random.default_rng(k)
    x = rng.standard_normal((batch, k)).astype(np.float32)
    s_x, zp_x = _qparams(float(x.min()), float(x.max()))
    wq = rng.integers(-127, 128, (n, k)).astype(np.int8)
    in_nodes, in_inits = _qdq_input("x", s_x, zp_x)
    w_nodes, w_inits, s_w, bias = _weights(rng, wq, s_x)
    xq = ref.quantize(x, s_x, zp_x)
    y_float = ref.dequantize(xq, s_x, zp_x).astype(np.float64) @ (wq * s_w[:, None]).T
    out_nodes, out_inits, (s_y, zp_y, act) = _output_q("y", y_float, relu)
    gemm = helper.make_node("Gemm", ["x_d", "w_d", "b_d"], ["y"], transB=1)
    x_info = helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))
    got = _run(in_nodes + w_nodes + [gemm] + out_nodes, [x_info], [batch, n],
               in_inits + w_inits + out_inits, {"x": x})
    mult, shift = ref.conv_requant(s_x, s_w, s_y)
    expected = ref.fully_connected(xq, wq, bias, mult, shift, in_zp=zp_x, out_zp=zp_y, act=act)
    _compare(got, expected)


@pytest.mark.parametrize(("shape_b", "relu"), [((1, 8, 6, 7), False), ((1, 8, 1, 1), True)])
def test_qdq_add_within_one_step_of_ort(shape_b, relu):
    rng = np.random.default_rng(len(shape_b) + shape_b[-1])
    a = rng.standard_normal((1, 8, 6, 7)).astype(np.float32)
    b = (rng.standard_normal(shape_b) * 2.5 - 0.5).astype(np.float32)
    (s_a, zp_a), (s_b, zp_b) = (_qparams(float(v.min()), float(v.max())) for v in (a, b))
    a_nodes, a_inits = _qdq_input("a", s_a, zp_a)
    b_nodes, b_inits = _qdq_input("b", s_b, zp_b)
    aq, bq = ref.quantize(a, s_a, zp_a), ref.quantize(b, s_b, zp_b)
    y_float = ref.dequantize(aq, s_a, zp_a) + ref.dequantize(bq, s_b, zp_b)
    out_nodes, out_inits, (s_y, zp_y, act) = _output_q("y", y_float, relu)
    add = helper.make_node("Add", ["a_d", "b_d"], ["y"])
    infos = [helper.make_tensor_value_info(n, TensorProto.FLOAT, list(v.shape))
             for n, v in (("a", a), ("b", b))]
    got = _run(a_nodes + b_nodes + [add] + out_nodes, infos, list(a.shape),
               a_inits + b_inits + out_inits, {"a": a, "b": b})
    params = ref.add_params(s_a, zp_a, s_b, zp_b, s_y, zp_y, act)
    expected = ref.add(aq.transpose(0, 2, 3, 1), bq.transpose(0, 2, 3, 1), params)
    _compare(got.transpose(0, 2, 3, 1), expected)


LUT_FNS = {
    "Sigmoid": (lambda v: 1 / (1 + np.exp(-v)), {}),
    "Tanh": (np.tanh, {}),
    "HardSwish": (lambda v: v * np.clip(v / 6 + 0.5, 0, 1), {}),
    "LeakyRelu": (lambda v: np.where(v >= 0, v, np.float32(0.5) * v), {"alpha": 0.5}),
}


@pytest.mark.parametrize("op", sorted(LUT_FNS))
def test_lut_matches_ort_qdq(op):
    """All 256 int8 inputs through DQ -> op -> Q: the half-to-even table is ORT's, and the
    TFLite (half away from zero) table differs at most by one step on exact ties."""
    fn, attrs = LUT_FNS[op]
    s_in, zp_in, s_out, zp_out = np.float32(0.0625), 3, np.float32(0.0625), -20
    q = np.arange(-128, 128).astype(np.int8)
    nodes, inits = _qdq_input("x", s_in, zp_in)
    nodes = nodes[1:]  # the input is already int8: DQ only
    nodes[0].input[0] = "x"
    nodes.append(helper.make_node(op, ["x_d"], ["y"], **attrs))
    out_nodes, out_inits, _ = _output_q("y", np.array([-1.0, 1.0]), relu=False)
    out_inits = [helper.make_tensor("y_s", TensorProto.FLOAT, [], [s_out]),
                 helper.make_tensor("y_z", TensorProto.INT8, [], [zp_out])]
    x_info = helper.make_tensor_value_info("x", TensorProto.INT8, [256])
    got = _run(nodes + out_nodes, [x_info], [256], inits + out_inits, {"x": q})
    even = ref.lut(fn, s_in, zp_in, s_out, zp_out, half_even=True)
    away = ref.lut(fn, s_in, zp_in, s_out, zp_out)
    assert np.abs(got.astype(int) - even).max() <= 1
    assert np.abs(got.astype(int) - away).max() <= 1
    assert (got != even).sum() <= 2  # ORT's own sigmoid/tanh approximations
    if op == "LeakyRelu":  # x/2 of an odd negative step is a tie: the two rules part
        assert (away != even).sum() > 10
