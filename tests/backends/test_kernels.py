"""The C int8 kernels (backends/c/runtime) against the Python TFLite reference, bit for bit.

Also: the fixed-point primitives against exact integer arithmetic, quantization against ONNX
Runtime, CRC-32 against zlib, and the build constraints (strict C99, the header as C++, no libm
in the int8 objects).
"""

from __future__ import annotations

import ctypes
import dataclasses
import math
import subprocess
import zlib
from fractions import Fraction

import ckernels
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from ckernels import RUNTIME, Csr, FcParams, PoolParams, broadcast_params, conv_params
from onnx import TensorProto, helper

from edgeopt.backends.c import reference as ref
from edgeopt.ir.sparse import CSRTensor

INT8_SOURCES = ["eo_kernels_s8.c", "eo_eltwise_s8.c", "eo_softmax_s8.c", "eo_convert.c",
                "eo_data.c", "eo_kernels_f32.c"]
I32_MIN, I32_MAX = -(1 << 31), (1 << 31) - 1


@pytest.fixture(scope="module")
def ck(tmp_path_factory):
    return ckernels.session_kernels(tmp_path_factory)


# ---- build constraints -------------------------------------------------------------------------


def test_structs_match_c_layout(ck):
    for i, struct in enumerate(ckernels.STRUCTS):
        assert ck.sizeof(i) == ctypes.sizeof(struct), struct.__name__


def test_header_compiles_as_cpp(tmp_path):
    src = tmp_path / "use.cpp"
    src.write_text('#include "eo_kernels.h"\nint main() { eo_csr w = eo_csr(); '
                   "return (int)eo_crc32(0, &w, sizeof w) & 0; }\n")
    proc = subprocess.run(["g++", "-Wall", "-Wextra", "-Werror", f"-I{RUNTIME}", "-c", str(src),
                           "-o", str(tmp_path / "use.o")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def _undefined(obj) -> set[str]:
    out = subprocess.run(["nm", "-u", str(obj)], capture_output=True, text=True, check=True)
    return {line.split()[-1] for line in out.stdout.splitlines() if line.strip()}


def test_int8_objects_need_no_libm(tmp_path):
    for name in INT8_SOURCES:
        obj = tmp_path / (name + ".o")
        ckernels.compile_sources([RUNTIME / name], obj, ["-c"])
        assert _undefined(obj) <= {"memcpy"}, name
    # the check does see libm where it is used
    obj = tmp_path / "act.o"
    ckernels.compile_sources([RUNTIME / "eo_activations_f32.c"], obj, ["-c"])
    assert {"expf", "tanhf"} <= _undefined(obj)


# ---- fixed point -------------------------------------------------------------------------------


@pytest.mark.parametrize(("real", "expected"), [
    (1.0, (1 << 30, 1)), (0.5, (1 << 30, 0)), (0.75, (3 << 29, 0)), (3.0, (3 << 29, 2)),
    (2.0 ** -31, (1 << 30, -30)), (1e-12, (0, 0)), (0.0, (0, 0)),
    (1.0 - 2.0 ** -40, (1 << 30, 1)),  # rounds up to 2^31: the fixup halves it
    (0.1, (1717986918, -3)), (-0.3, (-1288490189, -1)),
])
def test_quantize_multiplier_edge_cases(real, expected):
    assert ref.quantize_multiplier(real) == expected


def test_quantize_multiplier_is_nearest_q31():
    rng = np.random.default_rng(0)
    for real in np.exp(rng.uniform(np.log(1e-7), np.log(1e4), 2000)):
        m, s = ref.quantize_multiplier(real)
        assert (1 << 30) <= m < (1 << 31)
        err = abs(Fraction(m) * Fraction(2) ** (s - 31) - Fraction(real))
        assert err <= Fraction(2) ** (s - 32)  # half a unit of the Q31 mantissa
    with pytest.raises(ValueError, match="too large"):
        ref.quantize_multiplier(2.0 ** 40)


def _exact_srdhm(a: int, b: int) -> int:
    if a == b == I32_MIN:
        return I32_MAX
    ab = a * b
    t = ab + ((1 << 30) if ab >= 0 else 1 - (1 << 30))
    return int(Fraction(t, 1 << 31))  # truncation toward zero, as C's division


def _exact_rdbpot(x: int, e: int) -> int:
    q = Fraction(x, 1 << e)
    return math.floor(abs(q) + Fraction(1, 2)) * (1 if q >= 0 else -1)


def _edge_ints(rng, n):
    edges = [0, 1, -1, I32_MIN, I32_MAX, I32_MIN + 1, 1 << 30, -(1 << 30)]
    return np.concatenate([edges, rng.integers(I32_MIN, I32_MAX, n, endpoint=True)])


def test_srdhm(ck):
    rng = np.random.default_rng(1)
    a, b = _edge_ints(rng, 400), _edge_ints(rng, 400)
    assert ck.lib.eo_srdhm(I32_MIN, I32_MIN) == I32_MAX == ref.srdhm(I32_MIN, I32_MIN)
    for x, y in zip(a, rng.permutation(b), strict=True):
        expected = _exact_srdhm(int(x), int(y))
        assert ck.lib.eo_srdhm(int(x), int(y)) == expected == int(ref.srdhm(x, y))


def test_rdbpot_rounds_half_away_from_zero(ck):
    cases = {(-3, 1): -2, (-1, 1): -1, (-5, 2): -1, (-6, 2): -2, (5, 1): 3, (-7, 1): -4,
             (6, 2): 2, (I32_MIN, 31): -1, (I32_MAX, 31): 1, (-(1 << 30), 31): -1}
    for (x, e), expected in cases.items():
        assert ck.lib.eo_rdbpot(x, e) == expected == int(ref.rdbpot(x, e)), (x, e)
    rng = np.random.default_rng(2)
    xs, es = _edge_ints(rng, 500), rng.integers(0, 32, 508)
    got = ref.rdbpot(xs, es)
    for x, e, g in zip(xs, es, got, strict=True):
        assert ck.lib.eo_rdbpot(int(x), int(e)) == _exact_rdbpot(int(x), int(e)) == g


def test_mbqm_matches_reference(ck):
    rng = np.random.default_rng(3)
    xs = np.concatenate([_edge_ints(rng, 300), rng.integers(-100000, 100000, 300)])
    mults = rng.integers(1 << 30, 1 << 31, xs.size)
    shifts = rng.integers(-31, 12, xs.size)  # positive shifts wrap large x, like TFLite
    got = ref.mbqm(xs, mults, shifts)
    for x, m, s, g in zip(xs, mults, shifts, got, strict=True):
        assert ck.lib.eo_mbqm(int(x), int(m), int(s)) == g


# ---- convolution ------------------------------------------------------------------------------

# N, H, W, C, O, (KH, KW), stride, dilation, pads (top, left, bottom, right), groups
CONVS = [
    (1, 7, 9, 3, 5, (3, 3), (1, 1), (1, 1), (1, 1, 1, 1), 1),
    (2, 8, 6, 4, 6, (3, 2), (2, 2), (1, 1), (0, 1, 1, 0), 1),
    (1, 11, 10, 6, 9, (3, 3), (2, 1), (2, 2), (2, 1, 1, 2), 3),
    (1, 5, 5, 8, 16, (1, 1), (1, 1), (1, 1), (0, 0, 0, 0), 1),
    (1, 9, 9, 4, 4, (5, 5), (3, 3), (1, 1), (2, 2, 2, 2), 2),
    # pads wider than the dilated kernel: the corner outputs read padding only
    (1, 4, 5, 2, 3, (2, 2), (1, 1), (2, 1), (3, 3, 3, 2), 1),
]


def _out_hw(h, w, k, stride, dilation, pads):
    oh = (h + pads[0] + pads[2] - dilation[0] * (k[0] - 1) - 1) // stride[0] + 1
    ow = (w + pads[1] + pads[3] - dilation[1] * (k[1] - 1) - 1) // stride[1] + 1
    return oh, ow


def _layer_quant(rng, o, fan_in, sparsity=0.0):
    """Random int8 activations' zero points, per-channel scales, bias and requantization."""
    s_in = np.float32(rng.uniform(0.005, 0.05))
    s_w = rng.uniform(0.001, 0.01, o).astype(np.float32)
    s_out = np.float32(s_in * s_w.mean() * 74 * 74 * math.sqrt(fan_in * (1 - sparsity)) / 40)
    in_zp, out_zp = (int(v) for v in rng.integers(-20, 20, 2))
    bias = rng.integers(-5000, 5000, o).astype(np.int32)
    mult, shift = ref.conv_requant(s_in, s_w, s_out)
    act = (int(rng.integers(-128, -60)), int(rng.integers(60, 128)))
    return dict(in_zp=in_zp, out_zp=out_zp, act=act), bias, mult, shift


def _sparse(rng, w, sparsity):
    return np.where(rng.random(w.shape) < sparsity, 0, w).astype(np.int8)


def _csr(t: CSRTensor, idx_bytes=None, ptr_bytes=None):
    """A C ``eo_csr`` over a packed tensor, optionally with wider index arrays."""
    widths = {1: np.uint8, 2: np.uint16, 4: np.uint32}
    col = t.col_idx.astype(widths[idx_bytes]) if idx_bytes else t.col_idx
    rp = t.row_ptr.astype(widths[ptr_bytes]) if ptr_bytes else t.row_ptr
    keep = (t.values, col, rp)
    return Csr(ckernels.ptr(t.values), ckernels.ptr(col), ckernels.ptr(rp), t.dims[0],
               t.dims[1], col.itemsize, rp.itemsize), keep


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("case", CONVS)
def test_conv_dense_and_csr_bit_exact(ck, case, seed):
    n, h, w, c, o, k, stride, dil, pads, groups = case
    rng = np.random.default_rng(seed)
    x = rng.integers(-128, 128, (n, h, w, c)).astype(np.int8)
    wt = _sparse(rng, rng.integers(-127, 128, (o, *k, c // groups)), 0.6)
    q, bias, mult, shift = _layer_quant(rng, o, k[0] * k[1] * c // groups, 0.6)
    expected = ref.conv(x, wt, bias, mult, shift, stride=stride, dilation=dil, pads=pads,
                        groups=groups, **q)
    out_shape = (n, *_out_hw(h, w, k, stride, dil, pads), o)
    assert expected.shape == out_shape and len(np.unique(expected)) > 20  # not saturated
    p = conv_params(x.shape, k, out_shape, stride=stride, dilation=dil, pads=pads,
                    groups=groups, in_zp=q["in_zp"], out_zp=q["out_zp"], act=q["act"])
    dense = ck.layer("conv_s8", p, x, wt, bias, mult, shift, out_shape=out_shape)
    np.testing.assert_array_equal(dense, expected)
    csr, _keep = _csr(CSRTensor.pack(wt, "rows"))
    sparse = ck.layer("conv_s8_csr", p, x, csr, bias, mult, shift, out_shape=out_shape)
    np.testing.assert_array_equal(sparse, expected)


@pytest.mark.parametrize("idx_bytes", [1, 2, 4])
@pytest.mark.parametrize("ptr_bytes", [1, 2, 4])
def test_csr_index_widths(ck, idx_bytes, ptr_bytes):
    rng = np.random.default_rng(idx_bytes * 10 + ptr_bytes)
    x = rng.integers(-128, 128, (1, 6, 6, 4)).astype(np.int8)
    wt = _sparse(rng, rng.integers(-127, 128, (6, 3, 3, 4)), 0.7)  # 36 columns, nnz < 255
    q, bias, mult, shift = _layer_quant(rng, 6, 36, 0.7)
    p = conv_params(x.shape, (3, 3), (1, 6, 6, 6), pads=(1, 1, 1, 1), in_zp=q["in_zp"],
                    out_zp=q["out_zp"], act=q["act"])
    packed = CSRTensor.pack(wt, "rows")
    assert packed.col_idx.itemsize == packed.row_ptr.itemsize == 1
    csr, _keep = _csr(packed, idx_bytes, ptr_bytes)
    dense = ck.layer("conv_s8", p, x, wt, bias, mult, shift, out_shape=(1, 6, 6, 6))
    sparse = ck.layer("conv_s8_csr", p, x, csr, bias, mult, shift, out_shape=(1, 6, 6, 6))
    np.testing.assert_array_equal(sparse, dense)
    # fully connected over the same widths (64 columns, a natural 1-byte index)
    xf = rng.integers(-128, 128, (3, 64)).astype(np.int8)
    wf = _sparse(rng, rng.integers(-127, 128, (7, 64)), 0.7)
    qf, bf, mf, sf = _layer_quant(rng, 7, 64, 0.7)
    pf = FcParams(3, 64, 7, -qf["in_zp"], qf["out_zp"], *qf["act"])
    csr, _keep = _csr(CSRTensor.pack(wf, "rows"), idx_bytes, ptr_bytes)
    expected = ref.fully_connected(xf, wf, bf, mf, sf, **qf)
    np.testing.assert_array_equal(ck.layer("fc_s8_csr", pf, xf, csr, bf, mf, sf,
                                           out_shape=(3, 7)), expected)


def test_wide_csr_from_the_packer(ck):
    """cols > 256 and nnz > 255: the packer picks 2-byte indices; still bit-exact."""
    rng = np.random.default_rng(7)
    x = rng.integers(-128, 128, (1, 5, 5, 40)).astype(np.int8)
    wt = _sparse(rng, rng.integers(-127, 128, (12, 3, 3, 40)), 0.5)
    packed = CSRTensor.pack(wt, "rows")
    assert packed.col_idx.itemsize == packed.row_ptr.itemsize == 2
    q, bias, mult, shift = _layer_quant(rng, 12, 360, 0.5)
    p = conv_params(x.shape, (3, 3), (1, 3, 3, 12), in_zp=q["in_zp"], out_zp=q["out_zp"],
                    act=q["act"])
    csr, _keep = _csr(packed)
    expected = ref.conv(x, wt, bias, mult, shift, **q)
    got = ck.layer("conv_s8_csr", p, x, csr, bias, mult, shift, out_shape=(1, 3, 3, 12))
    np.testing.assert_array_equal(got, expected)


# N, H, W, C, multiplier, K, stride, dilation, pads
DEPTHWISE = [
    (1, 8, 8, 5, 1, 3, 1, 1, (1, 1, 1, 1)),
    (2, 9, 7, 3, 2, 3, 2, 1, (1, 1, 0, 0)),
    (1, 10, 10, 4, 2, 3, 1, 2, (2, 2, 2, 2)),
    (1, 7, 7, 6, 1, 5, 2, 1, (2, 2, 2, 2)),
    (1, 4, 4, 2, 2, 2, 1, 2, (3, 3, 3, 3)),  # corner outputs read padding only
]


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("case", DEPTHWISE)
def test_depthwise_bit_exact(ck, case, seed):
    n, h, w, c, m, k, s, d, pads = case
    rng = np.random.default_rng(seed)
    x = rng.integers(-128, 128, (n, h, w, c)).astype(np.int8)
    wt = rng.integers(-127, 128, (k, k, c * m)).astype(np.int8)
    q, bias, mult, shift = _layer_quant(rng, c * m, k * k)
    kw = dict(stride=(s, s), dilation=(d, d), pads=pads)
    expected = ref.depthwise_conv(x, wt, bias, mult, shift, **kw, **q)
    out_shape = (n, *_out_hw(h, w, (k, k), (s, s), (d, d), pads), c * m)
    p = conv_params(x.shape, (k, k), out_shape, groups=c, in_zp=q["in_zp"], out_zp=q["out_zp"],
                    act=q["act"], **kw)
    got = ck.layer("depthwise_conv_s8", p, x, wt, bias, mult, shift, out_shape=out_shape)
    np.testing.assert_array_equal(got, expected)
    # the same layer as a grouped convolution (OHWI weight [C*M, K, K, 1])
    ohwi = np.ascontiguousarray(wt.transpose(2, 0, 1)[..., None])
    grouped = ck.layer("conv_s8", p, x, ohwi, bias, mult, shift, out_shape=out_shape)
    np.testing.assert_array_equal(grouped, expected)
    csr, _keep = _csr(CSRTensor.pack(_sparse(rng, ohwi, 0.0), "rows"))
    sparse = ck.layer("conv_s8_csr", p, x, csr, bias, mult, shift, out_shape=out_shape)
    np.testing.assert_array_equal(sparse, expected)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fully_connected_bit_exact(ck, seed):
    rng = np.random.default_rng(seed)
    b, i, o = 3, 37 + seed * 50, 11
    x = rng.integers(-128, 128, (b, i)).astype(np.int8)
    wt = _sparse(rng, rng.integers(-127, 128, (o, i)), 0.5)
    q, bias, mult, shift = _layer_quant(rng, o, i, 0.5)
    expected = ref.fully_connected(x, wt, bias, mult, shift, **q)
    p = FcParams(b, i, o, -q["in_zp"], q["out_zp"], *q["act"])
    np.testing.assert_array_equal(ck.layer("fc_s8", p, x, wt, bias, mult, shift,
                                           out_shape=(b, o)), expected)
    np.testing.assert_array_equal(ck.layer("fc_s8", p, x, wt, None, mult, shift,
                                           out_shape=(b, o)),
                                  ref.fully_connected(x, wt, None, mult, shift, **q))
    csr, _keep = _csr(CSRTensor.pack(wt, "rows"))
    np.testing.assert_array_equal(ck.layer("fc_s8_csr", p, x, csr, bias, mult, shift,
                                           out_shape=(b, o)), expected)


# ---- elementwise -------------------------------------------------------------------------------

SHAPES = [((2, 5, 7, 3), (2, 5, 7, 3)), ((2, 5, 7, 3), (1, 1, 7, 3)), ((3, 1, 4), (1, 5, 1)),
          ((4,), (2, 3, 4)), ((2, 3, 1, 6), (1,))]


def _binary_case(rng, sa, sb):
    a = rng.integers(-128, 128, sa).astype(np.int8)
    b = rng.integers(-128, 128, sb).astype(np.int8)
    s_a, s_b = (np.float32(v) for v in rng.uniform(0.01, 0.1, 2))
    zp_a, zp_b, zp_o = (int(v) for v in rng.integers(-30, 30, 3))
    return a, b, (s_a, zp_a, s_b, zp_b), zp_o


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("shapes", SHAPES)
def test_add_sub_mul_broadcast_bit_exact(ck, shapes, seed):
    rng = np.random.default_rng(seed)
    a, b, quant, zp_o = _binary_case(rng, *shapes)
    act = (int(rng.integers(-128, -100)), int(rng.integers(100, 128)))
    for name, fn in (("add", ref.add), ("sub", ref.sub)):
        params = ref.add_params(*quant, np.float32((quant[0] + quant[2]) * 0.8), zp_o, act)
        expected = fn(a, b, params)
        p, out_shape = broadcast_params(a.shape, b.shape, **dataclasses.asdict(params))
        out = np.zeros(out_shape, np.int8)
        ck.call(f"{name}_s8", p, a, b, out)
        np.testing.assert_array_equal(out, expected, err_msg=name)
    params = ref.mul_params(*quant, np.float32(quant[0] * quant[2] * 130), zp_o, act)
    p, out_shape = broadcast_params(a.shape, b.shape, **dataclasses.asdict(params))
    out = np.zeros(out_shape, np.int8)
    ck.call("mul_s8", p, a, b, out)
    np.testing.assert_array_equal(out, ref.mul(a, b, params))
    assert np.isin(out, act).mean() < 0.2  # mostly not saturated


def test_add_reference_close_to_float():
    """Honesty check of the Add rules: within one step of the exactly rounded float sum."""
    rng = np.random.default_rng(5)
    a, b, (s_a, zp_a, s_b, zp_b), zp_o = _binary_case(rng, (1000,), (1000,))
    s_o = np.float32(0.07)
    got = ref.add(a, b, ref.add_params(s_a, zp_a, s_b, zp_b, s_o, zp_o))
    real = (s_a * (a.astype(np.float64) - zp_a) + s_b * (b.astype(np.float64) - zp_b)) / s_o
    exact = np.clip(np.round(real) + zp_o, -128, 127)
    assert np.abs(got - exact).max() <= 1


# N, H, W, C, kernel, stride, pads
POOLS = [(1, 7, 9, 3, (3, 3), (2, 2), (1, 1, 1, 1)), (2, 6, 6, 4, (2, 2), (2, 2), (0, 0, 0, 0)),
         (1, 9, 8, 5, (3, 2), (1, 2), (1, 0, 1, 1)), (1, 5, 5, 2, (5, 5), (1, 1), (2, 2, 2, 2))]


@pytest.mark.parametrize("case", POOLS)
def test_pooling_bit_exact(ck, case):
    n, h, w, c, k, s, pads = case
    rng = np.random.default_rng(h * w)
    x = rng.integers(-128, 128, (n, h, w, c)).astype(np.int8)
    oh, ow = _out_hw(h, w, k, s, (1, 1), pads)
    act = (-100, 120)
    p = PoolParams(n, h, w, c, oh, ow, k[0], k[1], s[0], s[1], pads[0], pads[1], *act)
    for name, fn in (("maxpool_s8", ref.max_pool), ("avgpool_s8", ref.avg_pool)):
        out = np.zeros((n, oh, ow, c), np.int8)
        ck.call(name, p, x, out)
        np.testing.assert_array_equal(out, fn(x, k, s, pads, act), err_msg=name)


@pytest.mark.parametrize("shape", [(1, 7, 7, 16), (2, 3, 5, 3), (1, 1, 1, 8)])
def test_mean_hw_bit_exact(ck, shape):
    rng = np.random.default_rng(len(shape) + shape[1])
    x = rng.integers(-128, 128, shape).astype(np.int8)
    s_in, s_out = np.float32(0.05), np.float32(0.011)
    mult, shift = ref.requant_params(s_in, s_out)
    expected = ref.mean_hw(x, 3, -7, mult, shift)
    out = np.zeros(expected.shape, np.int8)
    n, h, w, c = shape
    ck.call("mean_hw_s8", n, h * w, c, -3, -7, mult, shift, x, out)
    np.testing.assert_array_equal(out, expected)
    real = s_in * (x.astype(np.float64) - 3).mean(axis=(1, 2), keepdims=True) / s_out - 7
    assert np.abs(expected - np.clip(np.round(real), -128, 127)).max() <= 1


def test_lut_requantize_clamp_prelu(ck):
    rng = np.random.default_rng(11)
    x = rng.integers(-128, 128, (4, 9, 5)).astype(np.int8)
    table = ref.lut(lambda v: 1 / (1 + np.exp(-v)), 0.06, 5, 1 / 256, -128)
    real = 1 / (1 + np.exp(-0.06 * (np.arange(-128, 128) - 5.0)))
    err = ref.dequantize(table, 1 / 256, -128) - np.clip(real, 0, 255 / 256)
    assert np.abs(err).max() <= 0.5 / 256 + 1e-7
    out = np.zeros_like(x)
    ck.call("lut_s8", table, x, out, x.size)
    np.testing.assert_array_equal(out, table[x.astype(int) + 128])
    mult, shift = ref.requant_params(0.06, 0.045)
    ck.call("requantize_s8", -5, 9, mult, shift, x, out, x.size)
    np.testing.assert_array_equal(out, ref.requantize(x, 5, 9, mult, shift))
    ck.call("clamp_s8", -20, 33, x, out, x.size)
    np.testing.assert_array_equal(out, ref.clamp(x, -20, 33))
    slope = np.array([0.25, -0.5, 0.0, 1.5, 0.1], np.float32)
    pm, ps, nm, ns = ref.prelu_params(0.06, 0.05, slope)
    p = ckernels.PreluParams(5, -5, 2, pm, ps, ckernels.ptr(nm), ckernels.ptr(ns))
    ck.call("prelu_s8", p, x, out, x.size)
    expected = ref.prelu(x, 5, 2, pm, ps, nm, ns)
    np.testing.assert_array_equal(out, expected)
    v = 0.06 * (x - 5.0)
    real = np.clip(np.round(np.where(v >= 0, v, slope * v) / np.float32(0.05)) + 2, -128, 127)
    assert np.abs(expected - real).max() <= 1


@pytest.mark.parametrize(("rows", "n", "scale"), [(6, 10, 0.1), (4, 33, 0.02), (3, 100, 0.5),
                                                  (5, 7, 2.0), (2, 256, 0.05)])
def test_softmax_bit_exact(ck, rows, n, scale):
    rng = np.random.default_rng(n)
    x = rng.integers(-128, 128, (rows, n)).astype(np.int8)
    p = ref.softmax_params(scale)
    expected = ref.softmax(x, p)
    out = np.zeros_like(x)
    ck.call("softmax_s8", rows, n, p.input_multiplier, p.input_left_shift, p.diff_min, x, out)
    np.testing.assert_array_equal(out, expected)
    z = scale * x.astype(np.float64)
    probs = np.exp(z - z.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    assert np.abs(expected - np.clip(np.round(probs * 256) - 128, -128, 127)).max() <= 1


def test_softmax_long_uniform_row(ck):
    """Rows of > 256 equal values: every probability rounds to 0 (-128), in C and Python."""
    x = np.zeros((1, 600), np.int8)
    p = ref.softmax_params(0.1)
    out = np.ones_like(x)
    ck.call("softmax_s8", 1, 600, p.input_multiplier, p.input_left_shift, p.diff_min, x, out)
    np.testing.assert_array_equal(out, ref.softmax(x, p))
    assert (out == -128).all()


# ---- conversions and CRC ----------------------------------------------------------------------


def ort_run(nodes, inputs, outputs, inits, feeds):
    """Run a graph of ``nodes`` (opset 19, checked) in ONNX Runtime with no graph rewrites."""
    graph = helper.make_graph(nodes, "g", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])
    onnx.checker.check_model(model)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(model.SerializeToString(), so,
                                providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


@pytest.mark.parametrize(("scale", "zp"), [(0.25, 3), (0.0371, -11), (1e-3, 0)])
def test_quantize_dequantize_match_onnxruntime(ck, scale, zp):
    rng = np.random.default_rng(int(scale * 1e4))
    ties = (np.arange(-300, 300) + 0.5) * np.float32(scale)  # exact ties when scale = 2^-k
    x = np.concatenate([ties, rng.normal(0, 60 * scale, 5000), [np.inf, -np.inf, 0.0, -0.0]])
    x = x.astype(np.float32)
    q_out = helper.make_tensor_value_info("q", TensorProto.INT8, [x.size])
    d_out = helper.make_tensor_value_info("d", TensorProto.FLOAT, [x.size])
    inits = [helper.make_tensor("s", TensorProto.FLOAT, [], [scale]),
             helper.make_tensor("z", TensorProto.INT8, [], [zp])]
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]),
             helper.make_node("DequantizeLinear", ["q", "s", "z"], ["d"])]
    x_in = helper.make_tensor_value_info("x", TensorProto.FLOAT, [x.size])
    ort_q, ort_d = ort_run(nodes, [x_in], [q_out, d_out], inits, {"x": x})
    q = np.zeros(x.size, np.int8)
    ck.call("quantize_s8", float(scale), zp, x, q, x.size)
    np.testing.assert_array_equal(q, ort_q)
    np.testing.assert_array_equal(ref.quantize(x, scale, zp), ort_q)
    d = np.zeros(x.size, np.float32)
    ck.call("dequantize_s8", float(scale), zp, q, d, x.size)
    np.testing.assert_array_equal(d, ort_d)
    np.testing.assert_array_equal(ref.dequantize(q, scale, zp), ort_d)


def test_crc32_matches_zlib(ck):
    rng = np.random.default_rng(0)
    for size in (0, 1, 7, 1000, 4097):
        data = rng.integers(0, 256, size, dtype=np.uint8).tobytes()
        assert ck.crc32(0, data) == zlib.crc32(data)
        cut = size // 3
        assert ck.crc32(ck.crc32(0, data[:cut]), data[cut:]) == zlib.crc32(data)
    assert ck.crc32(0, b"123456789") == 0xCBF43926  # the standard check value
