"""Bit-exact NumPy model of TensorFlow Lite's int8 rules, as the C kernels implement them.

Every int8 kernel of ``runtime/eo_kernels.h`` has a counterpart here that returns the same
bytes, and the ``*_params`` helpers derive the kernels' integer parameters from float scales
and zero points exactly as TFLite's ``Prepare`` functions do (including where TFLite computes
in float32 rather than float64). The C emitter uses the helpers; the tests use both.

Conventions: activations are NHWC int8 arrays; conv weights OHWI ``[O, KH, KW, I/groups]``,
depthwise ``[KH, KW, C*M]``, fully connected ``[OUT, IN]``; bias int32. Python functions take
zero points (the C kernels take TFLite offsets: ``in_offset = -in_zp``, ``out_offset = out_zp``).
Integer arithmetic is done in int64 NumPy arrays with int32 semantics; accumulations that are
int32 in C are reduced modulo 2^32 (they never overflow in practice).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

__all__ = [
    "AddParams",
    "MulParams",
    "SoftmaxParams",
    "add",
    "add_params",
    "avg_pool",
    "clamp",
    "clamp_bounds",
    "conv",
    "conv_requant",
    "depthwise_conv",
    "dequantize",
    "fully_connected",
    "lut",
    "max_pool",
    "mbqm",
    "mean_hw",
    "mul",
    "mul_params",
    "prelu",
    "prelu_params",
    "quantize",
    "quantize_multiplier",
    "quantize_multipliers",
    "rdbpot",
    "requant_params",
    "requantize",
    "softmax",
    "softmax_params",
    "srdhm",
    "sub",
]

INT32_MIN = -(1 << 31)
INT32_MAX = (1 << 31) - 1
Pads = tuple[int, int, int, int]  # top, left, bottom, right


def _i64(x) -> np.ndarray:
    return np.asarray(x, dtype=np.int64)


def _wrap32(x) -> np.ndarray:
    """Reduce int64 values modulo 2^32 into the int32 range (two's complement)."""
    return ((_i64(x) + (1 << 31)) & 0xFFFFFFFF) - (1 << 31)


def _round_away(x) -> np.ndarray:
    """Round to nearest, ties away from zero (C ``round``/``roundf``), exactly."""
    x = np.asarray(x)
    whole = np.floor(np.abs(x))
    return np.sign(x) * (whole + (np.abs(x) - whole >= 0.5))  # the difference is exact


def _saturate8(x) -> np.ndarray:
    return np.clip(x, -128, 127).astype(np.int8)


# ---- fixed point ----------------------------------------------------------------------------


def quantize_multiplier(real: float) -> tuple[int, int]:
    """TFLite ``QuantizeMultiplier``: ``real ~= mult * 2^(shift - 31)``, mult a Q31 int32.

    frexp, round half away from zero, the ``q == 2^31`` fixup and ``shift < -31 -> (0, 0)``.

    Raises:
        ValueError: if the shift would exceed 31 (real >= 2^31), which no C shift can do.
    """
    real = float(real)
    if real == 0.0:
        return 0, 0
    q, shift = math.frexp(real)
    v = abs(q) * (1 << 31)  # exact: a power-of-two scaling
    q_fixed = math.floor(v) + (1 if v - math.floor(v) >= 0.5 else 0)
    q_fixed = q_fixed if q > 0 else -q_fixed
    if q_fixed == 1 << 31:
        q_fixed //= 2
        shift += 1
    if shift < -31:
        return 0, 0
    if shift > 31:
        raise ValueError(f"multiplier {real!r} is too large for a Q31 multiplier and shift")
    return q_fixed, shift


def quantize_multipliers(reals) -> tuple[np.ndarray, np.ndarray]:
    """:func:`quantize_multiplier` over an array: (int32 multipliers, int32 shifts)."""
    pairs = [quantize_multiplier(r) for r in np.asarray(reals, np.float64).ravel()]
    mult = np.array([m for m, _ in pairs], dtype=np.int32)
    shift = np.array([s for _, s in pairs], dtype=np.int32)
    return mult, shift


def srdhm(a, b) -> np.ndarray:
    """The gemmlowp ``SaturatingRoundingDoublingHighMul`` (elementwise, int64 in and out)."""
    a, b = _i64(a), _i64(b)
    t = a * b
    t = t + np.where(t >= 0, 1 << 30, 1 - (1 << 30))
    q = np.where(t >= 0, t >> 31, -((-t) >> 31))  # C division truncates toward zero
    return np.where((a == b) & (a == INT32_MIN), INT32_MAX, q)


def rdbpot(x, exponent) -> np.ndarray:
    """The gemmlowp ``RoundingDivideByPOT``: ``x / 2^exponent``, ties away from zero (0..31)."""
    x, e = _i64(x), _i64(exponent)
    mask = (np.int64(1) << e) - 1
    threshold = (mask >> 1) + (x < 0)
    return (x >> e) + ((x & mask) > threshold)


def mbqm(x, multiplier, shift) -> np.ndarray:
    """TFLite ``MultiplyByQuantizedMultiplier`` (double rounding); broadcasts like NumPy."""
    shift = _i64(shift)
    left = np.maximum(shift, 0)
    return rdbpot(srdhm(_wrap32(_i64(x) << left), multiplier), np.maximum(-shift, 0))


def _out8(acc, mult, shift, out_zp: int, act: tuple[int, int]) -> np.ndarray:
    """Requantize int32 accumulators, add the output zero point and clamp to int8 ``act``."""
    return np.clip(mbqm(acc, mult, shift) + out_zp, act[0], act[1]).astype(np.int8)


# ---- parameters from float scales ------------------------------------------------------------


def _f64(s) -> np.ndarray:
    """Scales as TFLite stores them (float32), widened to float64."""
    return np.asarray(s, dtype=np.float32).astype(np.float64)


def conv_requant(s_in: float, s_w, s_out: float) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel (mult, shift) of conv / depthwise / FC: ``s_in * s_w[c] / s_out`` in float64.

    As TFLite's ``PopulateConvolutionQuantizationParams``; ``s_w`` may be a scalar.
    """
    return quantize_multipliers(_f64(s_in) * np.atleast_1d(_f64(s_w)) / _f64(s_out))


def requant_params(s_in: float, s_out: float) -> tuple[int, int]:
    """(mult, shift) of ``s_in / s_out`` (Requantize, and Mean before its division by H*W)."""
    return quantize_multiplier(float(_f64(s_in) / _f64(s_out)))


def clamp_bounds(scale: float, zero_point: int, lo: float | None = None,
                 hi: float | None = None) -> tuple[int, int]:
    """Int8 clamp bounds of a float activation range (TFLite ``CalculateActivationRange``).

    ``zero_point + round(f / scale)`` in float32 with ties away from zero, intersected with
    [-128, 127]; ``None`` leaves a side open (ReLU is ``lo=0``, ReLU6 ``lo=0, hi=6``).
    """

    def q(f: float) -> int:
        v = np.float32(f) / np.float32(scale)
        return zero_point + int(_round_away(np.clip(v, -1e6, 1e6)))

    return (-128 if lo is None else max(-128, q(lo)), 127 if hi is None else min(127, q(hi)))


@dataclass(frozen=True)
class AddParams:
    """Integer parameters of int8 Add/Sub: the C ``eo_binary_params`` fields (TFLite offsets)."""

    a_offset: int
    b_offset: int
    out_offset: int
    left_shift: int
    a_mult: int
    a_shift: int
    b_mult: int
    b_shift: int
    out_mult: int
    out_shift: int
    act_min: int = -128
    act_max: int = 127


def add_params(s_a: float, zp_a: int, s_b: float, zp_b: int, s_out: float, zp_out: int,
               act: tuple[int, int] = (-128, 127)) -> AddParams:
    """TFLite add.cc / sub.cc ``Prepare`` for int8.

    left_shift is 20, the inputs are rescaled by ``s / (2 * max(s_a, s_b))`` and the sum by
    ``2 * max(s_a, s_b) / (2^20 * s_out)``.
    """
    left_shift = 20
    twice_max = 2.0 * max(_f64(s_a), _f64(s_b))
    a_mult, a_shift = quantize_multiplier(float(_f64(s_a) / twice_max))
    b_mult, b_shift = quantize_multiplier(float(_f64(s_b) / twice_max))
    # (1 << 20) * s_out is a float32 product in TFLite: exact, a power of two
    out_mult, out_shift = quantize_multiplier(float(twice_max / ((1 << left_shift) * _f64(s_out))))
    return AddParams(-zp_a, -zp_b, zp_out, left_shift, a_mult, a_shift, b_mult, b_shift,
                     out_mult, out_shift, act[0], act[1])


@dataclass(frozen=True)
class MulParams:
    """Integer parameters of int8 Mul (the C ``eo_binary_params`` fields it reads)."""

    a_offset: int
    b_offset: int
    out_offset: int
    out_mult: int
    out_shift: int
    act_min: int = -128
    act_max: int = 127


def mul_params(s_a: float, zp_a: int, s_b: float, zp_b: int, s_out: float, zp_out: int,
               act: tuple[int, int] = (-128, 127)) -> MulParams:
    """TFLite mul.cc ``Prepare``: ``s_a * s_b / s_out`` evaluated in float32, as TFLite does."""
    real = np.float32(s_a) * np.float32(s_b) / np.float32(s_out)
    mult, shift = quantize_multiplier(float(real))
    return MulParams(-zp_a, -zp_b, zp_out, mult, shift, act[0], act[1])


@dataclass(frozen=True)
class SoftmaxParams:
    """Integer parameters of int8 Softmax (TFLite ``SoftmaxParams``)."""

    input_multiplier: int
    input_left_shift: int
    diff_min: int


def softmax_params(s_in: float, beta: float = 1.0) -> SoftmaxParams:
    """TFLite ``PreprocessSoftmaxScaling`` and ``CalculateInputRadius`` (5 integer bits)."""
    real = min(beta * float(_f64(s_in)) * (1 << 26), (1 << 31) - 1.0)
    mult, shift = quantize_multiplier(real)
    if shift < 0:
        raise ValueError(f"softmax input scale {s_in!r} is too small (multiplier below one)")
    radius = math.floor(31.0 * (1 << 26) / (1 << shift))
    return SoftmaxParams(mult, shift, -radius)


def prelu_params(s_in: float, s_out: float, slope) -> tuple[int, int, np.ndarray, np.ndarray]:
    """(pos_mult, pos_shift, neg_mult[c], neg_shift[c]) of ``eo_prelu_s8``.

    As TFLite's LeakyRelu ``Prepare``: ``s_in / s_out`` and ``s_in * slope[c] / s_out``, in
    float32 like TFLite.
    """
    s_in32, s_out32 = np.float32(s_in), np.float32(s_out)
    pos_mult, pos_shift = quantize_multiplier(float(s_in32 / s_out32))
    neg = s_in32 * np.atleast_1d(np.asarray(slope, np.float32)) / s_out32
    neg_mult, neg_shift = quantize_multipliers(neg)
    return pos_mult, pos_shift, neg_mult, neg_shift


# ---- convolution and fully connected ---------------------------------------------------------


def _windows(x: np.ndarray, kernel: tuple[int, int], stride: tuple[int, int],
             dilation: tuple[int, int], pads: Pads, fill) -> np.ndarray:
    """Sliding windows of NHWC ``x`` padded with ``fill``: ``[N, OH, OW, C, KH, KW]``."""
    top, left, bottom, right = pads
    xp = np.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)), constant_values=fill)
    eff = (dilation[0] * (kernel[0] - 1) + 1, dilation[1] * (kernel[1] - 1) + 1)
    win = np.lib.stride_tricks.sliding_window_view(xp, eff, axis=(1, 2))
    return win[:, :: stride[0], :: stride[1], :, :: dilation[0], :: dilation[1]]


def conv(x: np.ndarray, w: np.ndarray, bias, mult, shift, *, in_zp: int, out_zp: int,
         stride: tuple[int, int] = (1, 1), dilation: tuple[int, int] = (1, 1),
         pads: Pads = (0, 0, 0, 0), groups: int = 1,
         act: tuple[int, int] = (-128, 127)) -> np.ndarray:
    """TFLite ``ConvPerChannel`` (with groups): NHWC int8 ``x``, OHWI int8 ``w``.

    Padding positions contribute nothing (as if they held the input zero point). The output
    size is ``(H + top + bottom - dilation * (K - 1) - 1) // stride + 1``.
    """
    o, kh, kw, icg = w.shape
    # float64 is exact here: every product is below 2^15 and every partial sum below 2^53
    win = _windows(x.astype(np.float64) - in_zp, (kh, kw), stride, dilation, pads, 0.0)
    n, oh, ow = win.shape[:3]
    ocg = o // groups
    outs = []
    for g in range(groups):
        patch = win[:, :, :, g * icg:(g + 1) * icg].transpose(0, 1, 2, 4, 5, 3)
        wg = w[g * ocg:(g + 1) * ocg].reshape(ocg, -1).astype(np.float64)
        outs.append(patch.reshape(n * oh * ow, -1) @ wg.T)
    acc = np.rint(np.concatenate(outs, axis=1)).astype(np.int64).reshape(n, oh, ow, o)
    if bias is not None:
        acc = acc + _i64(bias)
    return _out8(_wrap32(acc), mult, shift, out_zp, act)


def depthwise_conv(x: np.ndarray, w: np.ndarray, bias, mult, shift, *, in_zp: int, out_zp: int,
                   stride: tuple[int, int] = (1, 1), dilation: tuple[int, int] = (1, 1),
                   pads: Pads = (0, 0, 0, 0), act: tuple[int, int] = (-128, 127)) -> np.ndarray:
    """TFLite ``DepthwisePerChannel``: ``w`` is ``[KH, KW, C*M]``; out channel o reads o // M."""
    kh, kw, o = w.shape
    m = o // x.shape[3]
    win = _windows(x.astype(np.int64) - in_zp, (kh, kw), stride, dilation, pads, 0)
    win = np.repeat(win, m, axis=3)  # [N, OH, OW, O, KH, KW]
    acc = np.einsum("nhwoyx,yxo->nhwo", win, w.astype(np.int64))
    if bias is not None:
        acc = acc + _i64(bias)
    return _out8(_wrap32(acc), mult, shift, out_zp, act)


def fully_connected(x: np.ndarray, w: np.ndarray, bias, mult, shift, *, in_zp: int,
                    out_zp: int, act: tuple[int, int] = (-128, 127)) -> np.ndarray:
    """TFLite ``FullyConnectedPerChannel``: ``x`` is ``[B, IN]``, ``w`` is ``[OUT, IN]``."""
    acc = (x.astype(np.int64) - in_zp) @ w.astype(np.int64).T
    if bias is not None:
        acc = acc + _i64(bias)
    return _out8(_wrap32(acc), mult, shift, out_zp, act)


# ---- elementwise -------------------------------------------------------------------------------


def _addsub(a, b, p: AddParams, sign: int) -> np.ndarray:
    sa = mbqm(_wrap32((_i64(a) + p.a_offset) << p.left_shift), p.a_mult, p.a_shift)
    sb = mbqm(_wrap32((_i64(b) + p.b_offset) << p.left_shift), p.b_mult, p.b_shift)
    raw = mbqm(sa + sign * sb, p.out_mult, p.out_shift) + p.out_offset
    return np.clip(raw, p.act_min, p.act_max).astype(np.int8)


def add(a: np.ndarray, b: np.ndarray, p: AddParams) -> np.ndarray:
    """TFLite int8 Add (reference_integer_ops/add.h) with NumPy broadcasting."""
    return _addsub(a, b, p, 1)


def sub(a: np.ndarray, b: np.ndarray, p: AddParams) -> np.ndarray:
    """TFLite int8 Sub: :func:`add` with the rescaled second input subtracted."""
    return _addsub(a, b, p, -1)


def mul(a: np.ndarray, b: np.ndarray, p: MulParams) -> np.ndarray:
    """TFLite int8 Mul (reference_integer_ops/mul.h) with NumPy broadcasting."""
    prod = (_i64(a) + p.a_offset) * (_i64(b) + p.b_offset)
    raw = mbqm(prod, p.out_mult, p.out_shift) + p.out_offset
    return np.clip(raw, p.act_min, p.act_max).astype(np.int8)


def clamp(x: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """Clamp int8 values to [lo, hi]."""
    return np.clip(x, lo, hi).astype(np.int8)


def requantize(x: np.ndarray, in_zp: int, out_zp: int, mult: int, shift: int) -> np.ndarray:
    """TFLite Requantize: ``saturate(mbqm(x - in_zp, mult, shift) + out_zp)``."""
    return _saturate8(mbqm(_i64(x) - in_zp, mult, shift) + out_zp)


def prelu(x: np.ndarray, in_zp: int, out_zp: int, pos_mult: int, pos_shift: int, neg_mult,
          neg_shift) -> np.ndarray:
    """``eo_prelu_s8``: TFLite LeakyRelu's two multipliers, the negative one per channel.

    The channel is the last axis; the multipliers come from :func:`prelu_params`.
    """
    v = _i64(x) - in_zp
    pos = mbqm(v, pos_mult, pos_shift)
    neg = mbqm(v, _i64(neg_mult), _i64(neg_shift))
    return _saturate8(np.where(v >= 0, pos, neg) + out_zp)


def lut(fn: Callable[[np.ndarray], np.ndarray], in_scale: float, in_zp: int, out_scale: float,
        out_zp: int, half_even: bool = False) -> np.ndarray:
    """The 256-entry table of ``eo_lut_s8`` (entry ``q + 128``) for a float function ``fn``.

    Default: TFLite's ``LUTPopulate``, all float32: ``x = in_scale * (q - in_zp)``,
    ``round_half_away(fn(x) * (1 / out_scale)) + out_zp``, saturated. ``half_even=True``
    instead quantizes as ONNX QuantizeLinear does (``rint(fn(x) / out_scale)``), which is
    what ONNX Runtime computes for a DQ -> fn -> Q chain.
    """
    x = dequantize(np.arange(-128, 128).astype(np.int8), in_scale, in_zp)
    with np.errstate(all="ignore"):
        y = np.asarray(fn(x), dtype=np.float32)
        if half_even:
            return quantize(y, out_scale, out_zp)
        r = _round_away(np.nan_to_num(y * (np.float32(1) / np.float32(out_scale))))
    return _saturate8(np.clip(r, -1024, 1024).astype(np.int64) + out_zp)


def quantize(x: np.ndarray, scale: float, zero_point: int) -> np.ndarray:
    """ONNX QuantizeLinear to int8: ``saturate(rint(x / scale) + zp)`` in float32 (NaN -> zp)."""
    with np.errstate(all="ignore"):
        v = np.asarray(x, np.float32) / np.float32(scale)
    v = np.clip(np.rint(np.nan_to_num(v, nan=0.0)), -256, 256)
    return _saturate8(v.astype(np.int64) + zero_point)


def dequantize(q: np.ndarray, scale: float, zero_point: int) -> np.ndarray:
    """ONNX DequantizeLinear: ``float32(q - zp) * scale``."""
    return (np.asarray(q, np.int32) - zero_point).astype(np.float32) * np.float32(scale)


# ---- pooling and mean --------------------------------------------------------------------------


def _div_round(acc, n) -> np.ndarray:
    """C ``acc > 0 ? (acc + n/2) / n : (acc - n/2) / n`` (ties away from zero)."""
    acc, n = _i64(acc), _i64(n)
    return np.sign(acc) * ((np.abs(acc) + n // 2) // n)


def max_pool(x: np.ndarray, kernel: tuple[int, int], stride: tuple[int, int],
             pads: Pads = (0, 0, 0, 0), act: tuple[int, int] = (-128, 127)) -> np.ndarray:
    """TFLite int8 MaxPool: windows clipped to the image, then clamped to ``act``."""
    win = _windows(x.astype(np.int64), kernel, stride, (1, 1), pads, -129)
    return np.clip(win.max(axis=(4, 5)), act[0], act[1]).astype(np.int8)


def avg_pool(x: np.ndarray, kernel: tuple[int, int], stride: tuple[int, int],
             pads: Pads = (0, 0, 0, 0), act: tuple[int, int] = (-128, 127)) -> np.ndarray:
    """TFLite int8 AveragePool: the mean of the in-image values, ties away from zero.

    count_include_pad = 0; the result is clamped to ``act``.
    """
    total = _windows(x.astype(np.int64), kernel, stride, (1, 1), pads, 0).sum(axis=(4, 5))
    ones = np.ones((*x.shape[:3], 1), np.int64)
    count = _windows(ones, kernel, stride, (1, 1), pads, 0).sum(axis=(4, 5))
    return np.clip(_div_round(total, np.maximum(count, 1)), act[0], act[1]).astype(np.int8)


def mean_hw(x: np.ndarray, in_zp: int, out_zp: int, mult: int, shift: int) -> np.ndarray:
    """TFLite ``reference_integer_ops::Mean`` over H and W of NHWC ``x`` -> ``[N, 1, 1, C]``.

    ``mult, shift = requant_params(s_in, s_out)``; the division by H*W comes after.
    """
    n, h, w, c = x.shape
    acc = (x.astype(np.int64) - in_zp).sum(axis=(1, 2))
    out = _div_round(mbqm(_wrap32(acc), mult, shift), h * w) + out_zp
    return _saturate8(out).reshape(n, 1, 1, c)


# ---- softmax (gemmlowp fixed point) --------------------------------------------------------------

_EXP_MULTS = (1672461947, 1302514674, 790015084, 290630308, 39332535, 720401, 242)


def _sat_shl(x, e: int) -> np.ndarray:
    """The gemmlowp ``SaturatingRoundingMultiplyByPOT<e>`` for 0 < e < 31."""
    x = _i64(x)
    thr = (1 << (31 - e)) - 1
    return np.where(x > thr, INT32_MAX, np.where(x < -thr, INT32_MIN, x << e))


def _exp_negative(a: np.ndarray) -> np.ndarray:
    """The gemmlowp ``exp_on_negative_values``: Q5.26 in (a <= 0), Q0.31 out."""
    a_mod = (a & ((1 << 24) - 1)) - (1 << 24)
    x = _sat_shl(a_mod, 5) + (1 << 28)  # Taylor expansion around -1/8
    x2 = srdhm(x, x)
    x3 = srdhm(x2, x)
    x4 = srdhm(x2, x2)
    poly = rdbpot(srdhm(rdbpot(x4, 2) + x3, 715827883) + x2, 1)
    r = 1895147668 + srdhm(1895147668, x + poly)
    remainder = a_mod - a
    for k, m in enumerate(_EXP_MULTS):
        r = np.where(remainder & (1 << (24 + k)), srdhm(r, m), r)
    return np.where(a == 0, INT32_MAX, r)


def _one_over_one_plus_x(a: np.ndarray) -> np.ndarray:
    """The gemmlowp ``one_over_one_plus_x_for_x_in_0_1``: Q0.31 in [0, 1) -> Q0.31."""
    half = (a + INT32_MAX + 1) // 2  # RoundingHalfSum(a, One); the sum is never negative here
    x = 1515870810 + srdhm(half, -1010580540)
    for _ in range(3):
        x = x + _sat_shl(srdhm(x, (1 << 29) - srdhm(half, x)), 2)
    return _sat_shl(x, 1)


def softmax(x: np.ndarray, p: SoftmaxParams) -> np.ndarray:
    """TFLite int8 Softmax over the last axis; the output has scale 1/256, zero point -128."""
    x = x.astype(np.int64)
    diff = x - x.max(axis=-1, keepdims=True)
    ok = diff >= p.diff_min
    e = _exp_negative(srdhm(_wrap32(diff << p.input_left_shift), p.input_multiplier))
    total = np.where(ok, rdbpot(e, 12), 0).sum(axis=-1, keepdims=True)  # Q12.19
    headroom = 32 - np.frexp(total.astype(np.float64))[1].astype(np.int64)
    scale = _one_over_one_plus_x(_wrap32((total << headroom) - (1 << 31)))
    exponent = 12 - headroom + 23
    # beyond 31 (rows of > 256 near-equal values) TFLite is undefined; the rounded value is 0
    v = np.where(exponent > 31, 0, rdbpot(srdhm(scale, e), np.minimum(exponent, 31)))
    return np.where(ok, np.clip(v - 128, -128, 127), -128).astype(np.int8)
