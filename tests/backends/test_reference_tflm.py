"""The integer reference against TensorFlow Lite Micro's kernels, bit for bit.

Each test builds a one-operator .tflite model from float scales and zero points, runs it in the
``tflite-micro`` interpreter and compares with ``backends/c/reference.py`` fed the parameters its
own helpers derive from the same scales. Skipped when ``tflite-micro`` is not installed.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

pytest.importorskip("tflite_micro", reason="tflite-micro is not installed")

import tflm

from edgeopt.backends.c import reference as ref

S = tflm.S
Tensor = tflm.Tensor
ACT = {None: 0, "relu": 1, "relu6": 3}
BOUNDS = {None: {}, "relu": {"lo": 0.0}, "relu6": {"lo": 0.0, "hi": 6.0}}


def _same_pads(size: int, k: int, stride: int, dil: int) -> tuple[int, int, int]:
    """TFLite SAME padding: (out, before, after)."""
    out = -(-size // stride)
    total = max((out - 1) * stride + dil * (k - 1) + 1 - size, 0)
    return out, total // 2, total - total // 2


def _geometry(h, w, k, stride, dil, padding):
    if padding == "same":
        oh, top, bottom = _same_pads(h, k, stride, dil)
        ow, left, right = _same_pads(w, k, stride, dil)
        return (oh, ow), (top, left, bottom, right)
    eff = dil * (k - 1) + 1
    return ((h - eff) // stride + 1, (w - eff) // stride + 1), (0, 0, 0, 0)


def _act_quant(rng):
    s_in = np.float32(rng.uniform(0.01, 0.05))
    return s_in, int(rng.integers(-20, 20))


# H, W, C, O (or depth multiplier), K, stride, dilation, padding, activation
CONVS = [(9, 9, 3, 8, 3, 1, 1, "same", None), (10, 7, 4, 6, 3, 2, 1, "same", "relu6"),
         (11, 11, 5, 4, 3, 1, 2, "valid", "relu"), (8, 8, 8, 16, 1, 1, 1, "valid", None)]


@pytest.mark.parametrize("depthwise", [False, True])
@pytest.mark.parametrize("case", CONVS)
def test_conv_and_depthwise_match_tflm(case, depthwise):
    h, w, c, o, k, stride, dil, padding, act = case
    rng = np.random.default_rng(h * o)
    m = 1 + o % 2 if depthwise else 0
    o = c * m if depthwise else o
    x = rng.integers(-128, 128, (1, h, w, c)).astype(np.int8)
    s_in, zp_in = _act_quant(rng)
    s_w = rng.uniform(0.002, 0.02, o).astype(np.float32)
    wt = rng.integers(-127, 128, (1, k, k, o) if depthwise else (o, k, k, c)).astype(np.int8)
    bias = rng.integers(-4000, 4000, o).astype(np.int32)
    fan_in = k * k * (1 if depthwise else c)
    s_out = np.float32(s_in * s_w.mean() * 74 * 74 * math.sqrt(fan_in) / 40)
    zp_out = int(rng.integers(-10, 10))
    (oh, ow), pads = _geometry(h, w, k, stride, dil, padding)
    tensors = [Tensor(x.shape, np.int8, [s_in], [zp_in]),
               Tensor(wt.shape, np.int8, list(s_w), [0] * o, wt, 3 if depthwise else 0),
               Tensor((o,), np.int32, list(s_in * s_w), [0] * o, bias),
               Tensor((1, oh, ow, o), np.int8, [s_out], [zp_out])]
    common = dict(padding=S.Padding.SAME if padding == "same" else S.Padding.VALID,
                  strideW=stride, strideH=stride, fusedActivationFunction=ACT[act],
                  dilationWFactor=dil, dilationHFactor=dil)
    if depthwise:
        opts = tflm.options("DepthwiseConv2DOptionsT", depthMultiplier=m, **common)
        model = tflm.build(S.BuiltinOperator.DEPTHWISE_CONV_2D,
                           S.BuiltinOptions.DepthwiseConv2DOptions, opts, tensors, [0, 1, 2], [3])
    else:
        opts = tflm.options("Conv2DOptionsT", **common)
        model = tflm.build(S.BuiltinOperator.CONV_2D, S.BuiltinOptions.Conv2DOptions, opts,
                           tensors, [0, 1, 2], [3])
    mult, shift = ref.conv_requant(s_in, s_w, s_out)
    geo = dict(stride=(stride, stride), dilation=(dil, dil), pads=pads, in_zp=zp_in,
               out_zp=zp_out, act=ref.clamp_bounds(s_out, zp_out, **BOUNDS[act]))
    if depthwise:
        expected = ref.depthwise_conv(x, wt[0], bias, mult, shift, **geo)
    else:
        expected = ref.conv(x, wt, bias, mult, shift, **geo)
    np.testing.assert_array_equal(tflm.run(model, x), expected)


@pytest.mark.parametrize("act", [None, "relu"])
def test_fully_connected_matches_tflm(act):
    rng = np.random.default_rng(3)
    x = rng.integers(-128, 128, (5, 70)).astype(np.int8)
    wt = rng.integers(-127, 128, (12, 70)).astype(np.int8)
    bias = rng.integers(-4000, 4000, 12).astype(np.int32)
    s_in, zp_in = _act_quant(rng)
    s_w = np.float32(0.007)
    s_out, zp_out = np.float32(s_in * s_w * 74 * 74 * math.sqrt(70) / 40), 3
    tensors = [Tensor(x.shape, np.int8, [s_in], [zp_in]),
               Tensor(wt.shape, np.int8, [s_w], [0], wt),
               Tensor((12,), np.int32, [s_in * s_w], [0], bias),
               Tensor((5, 12), np.int8, [s_out], [zp_out])]
    opts = tflm.options("FullyConnectedOptionsT", fusedActivationFunction=ACT[act])
    model = tflm.build(S.BuiltinOperator.FULLY_CONNECTED, S.BuiltinOptions.FullyConnectedOptions,
                       opts, tensors, [0, 1, 2], [3])
    mult, shift = ref.conv_requant(s_in, s_w, s_out)
    expected = ref.fully_connected(x, wt, bias, mult, shift, in_zp=zp_in, out_zp=zp_out,
                                   act=ref.clamp_bounds(s_out, zp_out, **BOUNDS[act]))
    np.testing.assert_array_equal(tflm.run(model, x), expected)


BINARY = {"add": (S.BuiltinOperator.ADD, S.BuiltinOptions.AddOptions, "AddOptionsT"),
          "sub": (S.BuiltinOperator.SUB, S.BuiltinOptions.SubOptions, "SubOptionsT"),
          "mul": (S.BuiltinOperator.MUL, S.BuiltinOptions.MulOptions, "MulOptionsT")}


@pytest.mark.parametrize("name", ["add", "sub", "mul"])
@pytest.mark.parametrize("shape_b", [(1, 5, 7, 3), (1, 1, 7, 3), (1, 5, 1, 1)])
def test_binary_matches_tflm(name, shape_b):
    rng = np.random.default_rng(len(name) + shape_b[1])
    a = rng.integers(-128, 128, (1, 5, 7, 3)).astype(np.int8)
    b = rng.integers(-128, 128, shape_b).astype(np.int8)
    (s_a, zp_a), (s_b, zp_b) = _act_quant(rng), _act_quant(rng)
    s_out = np.float32(s_a * s_b * 130) if name == "mul" else np.float32((s_a + s_b) * 0.8)
    zp_out = -5
    op, opt_type, opt_cls = BINARY[name]
    tensors = [Tensor(a.shape, np.int8, [s_a], [zp_a]), Tensor(b.shape, np.int8, [s_b], [zp_b]),
               Tensor(a.shape, np.int8, [s_out], [zp_out])]
    model = tflm.build(op, opt_type, tflm.options(opt_cls, fusedActivationFunction=1), tensors,
                       [0, 1], [2])
    quant = (s_a, zp_a, s_b, zp_b, s_out, zp_out, ref.clamp_bounds(s_out, zp_out, lo=0.0))
    if name == "mul":
        expected = ref.mul(a, b, ref.mul_params(*quant))
    else:
        expected = getattr(ref, name)(a, b, ref.add_params(*quant))
    np.testing.assert_array_equal(tflm.run(model, a, b), expected)


@pytest.mark.parametrize(("k", "stride", "padding"), [(3, 2, "same"), (2, 2, "valid"),
                                                      (3, 1, "same")])
@pytest.mark.parametrize("kind", ["max", "avg"])
def test_pooling_matches_tflm(kind, k, stride, padding):
    rng = np.random.default_rng(k * 10 + stride)
    x = rng.integers(-128, 128, (1, 9, 8, 4)).astype(np.int8)
    (oh, ow), pads = _geometry(9, 8, k, stride, 1, padding)
    tensors = [Tensor(x.shape, np.int8, [0.02], [3]), Tensor((1, oh, ow, 4), np.int8, [0.02], [3])]
    opts = tflm.options("Pool2DOptionsT", padding=S.Padding.SAME if padding == "same"
                        else S.Padding.VALID, strideW=stride, strideH=stride, filterWidth=k,
                        filterHeight=k, fusedActivationFunction=1)
    op = S.BuiltinOperator.MAX_POOL_2D if kind == "max" else S.BuiltinOperator.AVERAGE_POOL_2D
    model = tflm.build(op, S.BuiltinOptions.Pool2DOptions, opts, tensors, [0], [1])
    fn = ref.max_pool if kind == "max" else ref.avg_pool
    expected = fn(x, (k, k), (stride, stride), pads, ref.clamp_bounds(0.02, 3, lo=0.0))
    np.testing.assert_array_equal(tflm.run(model, x), expected)


@pytest.mark.parametrize(("shape", "s_out"), [((1, 7, 7, 256), 0.011), ((2, 3, 5, 128), 0.05),
                                              ((1, 4, 4, 64), 0.2)])
def test_mean_hw_within_one_step_of_tflm(shape, s_out):
    """TFLM's MEAN now divides in float32 (reference_ops::QuantizedMeanOrSum); the reference
    keeps TFLite's integer kernel (reference_integer_ops::Mean, as the TFLite interpreter runs
    a 4-D mean over H and W), so the two agree to one step."""
    rng = np.random.default_rng(shape[1])
    x = rng.integers(-128, 128, shape).astype(np.int8)
    s_in, zp_in = _act_quant(rng)
    tensors = [Tensor(shape, np.int8, [s_in], [zp_in]),
               Tensor((2,), np.int32, data=np.array([1, 2], np.int32)),
               Tensor((shape[0], 1, 1, shape[3]), np.int8, [s_out], [-7])]
    model = tflm.build(S.BuiltinOperator.MEAN, S.BuiltinOptions.ReducerOptions,
                       tflm.options("ReducerOptionsT", keepDims=True), tensors, [0, 1], [2])
    mult, shift = ref.requant_params(s_in, s_out)
    diff = tflm.run(model, x).astype(int) - ref.mean_hw(x, zp_in, -7, mult, shift)
    assert np.abs(diff).max() <= 1 and (diff != 0).mean() < 0.2


@pytest.mark.parametrize(("n", "scale"), [(10, 0.1), (33, 0.02), (100, 0.5), (7, 2.0),
                                          (250, 0.01)])
def test_softmax_matches_tflm(n, scale):
    rng = np.random.default_rng(n)
    x = rng.integers(-128, 128, (64, n)).astype(np.int8)
    tensors = [Tensor(x.shape, np.int8, [scale], [5]),
               Tensor(x.shape, np.int8, [1 / 256], [-128])]
    model = tflm.build(S.BuiltinOperator.SOFTMAX, S.BuiltinOptions.SoftmaxOptions,
                       tflm.options("SoftmaxOptionsT", beta=1.0), tensors, [0], [1])
    expected = ref.softmax(x, ref.softmax_params(scale))
    np.testing.assert_array_equal(tflm.run(model, x), expected)


def test_leaky_relu_and_requantize_match_tflm():
    rng = np.random.default_rng(9)
    x = rng.integers(-128, 128, (1, 6, 6, 5)).astype(np.int8)
    tensors = [Tensor(x.shape, np.int8, [0.03], [4]), Tensor(x.shape, np.int8, [0.021], [-9])]
    model = tflm.build(S.BuiltinOperator.LEAKY_RELU, S.BuiltinOptions.LeakyReluOptions,
                       tflm.options("LeakyReluOptionsT", alpha=0.2), tensors, [0], [1])
    pm, ps, nm, ns = ref.prelu_params(0.03, 0.021, [0.2])
    np.testing.assert_array_equal(tflm.run(model, x), ref.prelu(x, 4, -9, pm, ps, nm, ns))
    model = tflm.build(S.BuiltinOperator.QUANTIZE, S.BuiltinOptions.QuantizeOptions,
                       tflm.options("QuantizeOptionsT"), tensors, [0], [1])
    mult, shift = ref.requant_params(0.03, 0.021)
    np.testing.assert_array_equal(tflm.run(model, x), ref.requantize(x, 4, -9, mult, shift))
