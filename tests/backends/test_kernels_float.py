"""The C float32 kernels and data movement (backends/c/runtime) against NumPy."""

from __future__ import annotations

import ckernels
import numpy as np
import pytest
from ckernels import Csr, FcParams, PoolParams, broadcast_params, conv_params
from test_kernels import CONVS, DEPTHWISE, POOLS, SHAPES, _out_hw

from edgeopt.ir.sparse import CSRTensor

RTOL = 1e-5
BIG = 3.0e38


@pytest.fixture(scope="module")
def ck(tmp_path_factory):
    return ckernels.session_kernels(tmp_path_factory)


def _close(got, expected):
    """Within RTOL of the output's magnitude (float accumulation order differs)."""
    scale = max(float(np.abs(expected).max()), 1e-30)
    np.testing.assert_allclose(got, expected, rtol=RTOL, atol=RTOL * scale)


def _conv64(x, w, stride, dil, pads, groups):
    """Float64 NHWC conv with OHWI weights (an independent loop over kernel taps)."""
    n, h, wd, _ = x.shape
    o, kh, kw, icg = w.shape
    xp = np.pad(x.astype(np.float64), ((0, 0), (pads[0], pads[2]), (pads[1], pads[3]), (0, 0)))
    oh, ow = _out_hw(h, wd, (kh, kw), stride, dil, pads)
    out = np.zeros((n, oh, ow, o))
    ocg = o // groups
    for y in range(kh):
        for x_ in range(kw):
            tap = xp[:, y * dil[0]:, x_ * dil[1]:][:, :oh * stride[0]:stride[0],
                                                   :ow * stride[1]:stride[1]]
            for g in range(groups):
                sl = slice(g * ocg, (g + 1) * ocg)
                out[..., sl] += tap[..., g * icg:(g + 1) * icg] @ w[sl, y, x_].T.astype(float)
    return out


@pytest.mark.parametrize("case", CONVS)
def test_conv_f32(ck, case):
    n, h, w, c, o, k, stride, dil, pads, groups = case
    rng = np.random.default_rng(sum(k) + o)
    x = rng.standard_normal((n, h, w, c)).astype(np.float32)
    wt = rng.standard_normal((o, *k, c // groups)).astype(np.float32)
    wt[rng.random(wt.shape) < 0.5] = 0
    bias = rng.standard_normal(o).astype(np.float32)
    expected = _conv64(x, wt, stride, dil, pads, groups) + bias
    p = conv_params(x.shape, k, expected.shape, stride=stride, dilation=dil, pads=pads,
                    groups=groups, fact=(-BIG, BIG))
    _close(ck.layer("conv_f32", p, x, wt, bias, out_shape=expected.shape, dtype=np.float32),
           expected)
    t = CSRTensor.pack(wt, "rows")
    csr = Csr(ckernels.ptr(t.values), ckernels.ptr(t.col_idx), ckernels.ptr(t.row_ptr),
              *t.dims, t.col_idx.itemsize, t.row_ptr.itemsize)
    _close(ck.layer("conv_f32_csr", p, x, csr, bias, out_shape=expected.shape,
                    dtype=np.float32), expected)
    p.fact_min, p.fact_max = 0.0, 6.0  # fused ReLU6
    _close(ck.layer("conv_f32", p, x, wt, bias, out_shape=expected.shape, dtype=np.float32),
           np.clip(expected, 0, 6))


@pytest.mark.parametrize("case", DEPTHWISE)
def test_depthwise_f32(ck, case):
    n, h, w, c, m, k, s, d, pads = case
    rng = np.random.default_rng(c * m)
    x = rng.standard_normal((n, h, w, c)).astype(np.float32)
    wt = rng.standard_normal((k, k, c * m)).astype(np.float32)
    bias = rng.standard_normal(c * m).astype(np.float32)
    ohwi = wt.transpose(2, 0, 1)[..., None]
    expected = _conv64(x, ohwi, (s, s), (d, d), pads, c) + bias
    p = conv_params(x.shape, (k, k), expected.shape, stride=(s, s), dilation=(d, d), pads=pads,
                    groups=c, fact=(-BIG, BIG))
    _close(ck.layer("depthwise_conv_f32", p, x, wt, bias, out_shape=expected.shape,
                    dtype=np.float32), expected)


def test_fc_f32(ck):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 300)).astype(np.float32)
    wt = rng.standard_normal((9, 300)).astype(np.float32)
    wt[rng.random(wt.shape) < 0.7] = 0
    bias = rng.standard_normal(9).astype(np.float32)
    expected = x.astype(np.float64) @ wt.T + bias
    p = FcParams(3, 300, 9, 0, 0, -128, 127, -BIG, BIG)
    _close(ck.layer("fc_f32", p, x, wt, bias, out_shape=(3, 9), dtype=np.float32), expected)
    t = CSRTensor.pack(wt, "rows")
    csr = Csr(ckernels.ptr(t.values), ckernels.ptr(t.col_idx), ckernels.ptr(t.row_ptr),
              *t.dims, t.col_idx.itemsize, t.row_ptr.itemsize)
    _close(ck.layer("fc_f32_csr", p, x, csr, bias, out_shape=(3, 9), dtype=np.float32),
           expected)


@pytest.mark.parametrize("shapes", SHAPES)
def test_binary_f32_broadcast(ck, shapes):
    rng = np.random.default_rng(len(shapes[0]))
    a = rng.standard_normal(shapes[0]).astype(np.float32)
    b = (rng.standard_normal(shapes[1]) + 3).astype(np.float32)
    for name, fn in (("add", np.add), ("sub", np.subtract), ("mul", np.multiply),
                     ("div", np.divide)):
        p, out_shape = broadcast_params(a.shape, b.shape, fact_min=-BIG, fact_max=BIG)
        out = np.zeros(out_shape, np.float32)
        ck.call(f"{name}_f32", p, a, b, out)
        np.testing.assert_array_equal(out, fn(a, b), err_msg=name)  # one float op: exact


@pytest.mark.parametrize("case", POOLS)
def test_pooling_f32(ck, case):
    n, h, w, c, k, s, pads = case
    rng = np.random.default_rng(h)
    x = rng.standard_normal((n, h, w, c)).astype(np.float32)
    oh, ow = _out_hw(h, w, k, s, (1, 1), pads)
    xp = np.pad(x, ((0, 0), (pads[0], pads[2] + k[0]), (pads[1], pads[3] + k[1]), (0, 0)),
                constant_values=np.nan)
    win = np.stack([xp[:, y:y + oh * s[0]:s[0], x_:x_ + ow * s[1]:s[1]]
                    for y in range(k[0]) for x_ in range(k[1])])
    p = PoolParams(n, h, w, c, oh, ow, k[0], k[1], s[0], s[1], pads[0], pads[1], 0, 0,
                   -BIG, BIG)
    for name, expected in (("maxpool_f32", np.nanmax(win, 0)), ("avgpool_f32",
                                                                np.nanmean(win, 0))):
        out = np.zeros((n, oh, ow, c), np.float32)
        ck.call(name, p, x, out)
        _close(out, expected)


def test_mean_and_activations_f32(ck):
    rng = np.random.default_rng(3)
    x = (rng.standard_normal((2, 5, 7, 6)) * 4).astype(np.float32)
    out = np.zeros((2, 6), np.float32)
    ck.call("mean_hw_f32", 2, 35, 6, x, out)
    _close(out, x.astype(np.float64).mean(axis=(1, 2)))
    slope = rng.standard_normal(6).astype(np.float32)
    cases = {
        "sigmoid_f32": ((), 1 / (1 + np.exp(-x.astype(np.float64)))),
        "tanh_f32": ((), np.tanh(x.astype(np.float64))),
        "hardswish_f32": ((), x * np.clip(x / 6.0 + 0.5, 0, 1)),
        "leaky_relu_f32": ((0.1,), np.where(x >= 0, x, 0.1 * x)),
        "clamp_f32": ((-1.5, 2.0), np.clip(x, -1.5, 2.0)),
        "prelu_f32": ((slope, 6), np.where(x >= 0, x, slope * x)),
    }
    for name, (args, expected) in cases.items():
        out = np.zeros_like(x)
        ck.call(name, *args, x, out, x.size)
        np.testing.assert_allclose(out, expected, rtol=RTOL, atol=1e-6, err_msg=name)
    z = x.reshape(10, 42)
    out = np.zeros_like(z)
    ck.call("softmax_f32", 10, 42, z, out)
    e = np.exp(z - z.max(axis=1, keepdims=True).astype(np.float64))
    np.testing.assert_allclose(out, e / e.sum(axis=1, keepdims=True), rtol=RTOL, atol=1e-7)


# ---- data movement -----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.int8, np.float32, np.int16])
def test_concat(ck, dtype):
    rng = np.random.default_rng(0)
    parts = [rng.integers(-100, 100, (2, 3, d, 4)).astype(dtype) for d in (1, 5, 2)]
    expected = np.concatenate(parts, axis=2)
    arrays = (ckernels.ct.c_void_p * 3)(*(p.ctypes.data for p in parts))
    sizes = np.array([p[0, 0].nbytes for p in parts], np.int32)
    out = np.zeros_like(expected)
    ck.call("concat", 3, arrays, sizes, 6, out)
    np.testing.assert_array_equal(out, expected)


@pytest.mark.parametrize("perm", [(0, 2, 3, 1), (0, 3, 1, 2), (3, 2, 1, 0), (1, 0, 2, 3)])
def test_transpose(ck, perm):
    x = np.arange(2 * 3 * 4 * 5, dtype=np.float32).reshape(2, 3, 4, 5)
    out = np.zeros(x.transpose(perm).shape, np.float32)
    ck.call("transpose", np.array(x.shape, np.int32), np.array(perm, np.int32), 4, x, out)
    np.testing.assert_array_equal(out, x.transpose(perm))


def test_pad(ck):
    x = np.arange(1 * 3 * 4 * 2, dtype=np.int8).reshape(1, 3, 4, 2)
    pads = np.array([0, 1, 2, 1, 1, 2, 0, 3], np.int32)
    expected = np.pad(x, list(zip(pads[:4], pads[4:], strict=True)), constant_values=-7)
    out = np.zeros_like(expected)
    ck.call("pad", np.array(x.shape, np.int32), pads, 1, np.array([-7], np.int8), x, out)
    np.testing.assert_array_equal(out, expected)
