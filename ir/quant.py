"""Quantization parameters in a backend-neutral form, and the reference arithmetic.

A quantized tensor is ``q = saturate(round(x / scale) + zero_point)`` (round half to even, as
ONNX ``QuantizeLinear``), read back as ``x' = (q - zero_point) * scale``. :class:`QuantParams`
holds ``scale``, ``zero_point``, the integer type and the axis of per-channel parameters; the
ONNX backend writes it as QuantizeLinear/DequantizeLinear pairs (QDQ) or QLinear operators,
the C backend as int8 arrays with requantization multipliers. :func:`quant_params` reads it
back from a value of a QDQ graph, so a backend never parses the pattern itself.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ._node import Node
from ._types import DataType
from ._value import Value

__all__ = ["QuantParams", "dequantize", "params_from_range", "qdq_params", "quant_params",
           "quantize",
           "type_range", "weight_params"]

_RANGES = {
    DataType.INT8: (-128, 127),
    DataType.UINT8: (0, 255),
    DataType.INT16: (-32768, 32767),
    DataType.UINT16: (0, 65535),
    DataType.INT32: (-(2 ** 31), 2 ** 31 - 1),
}

_NUMPY = {DataType.INT8: np.int8, DataType.UINT8: np.uint8, DataType.INT16: np.int16,
          DataType.UINT16: np.uint16, DataType.INT32: np.int32}


def type_range(dtype: DataType, symmetric: bool = False) -> tuple[int, int]:
    """``(qmin, qmax)`` of an integer type.

    ``symmetric`` drops the lowest value of a signed type (int8 weights use -127..127, so
    that ``-x`` is representable).
    """
    if dtype not in _RANGES:
        raise ValueError(f"no quantized range for {dtype.name}")
    lo, hi = _RANGES[dtype]
    return (-hi if symmetric and lo < 0 else lo), hi


@dataclass(frozen=True, eq=False)
class QuantParams:
    """How one tensor is quantized.

    Attributes:
        scale: float32, shape ``()`` (per tensor) or ``(C,)`` (per channel along ``axis``).
        zero_point: the integer type's numpy dtype, the same shape as ``scale``.
        dtype: the quantized type (INT8, UINT8, INT16, UINT16 or INT32).
        axis: the channel axis of per-channel parameters (None: per tensor).
    """

    scale: np.ndarray
    zero_point: np.ndarray
    dtype: DataType
    axis: int | None = None

    def __post_init__(self) -> None:
        if self.dtype not in _NUMPY:
            raise ValueError(f"cannot quantize to {self.dtype.name}")
        scale = np.asarray(self.scale, np.float32)
        zp = np.asarray(self.zero_point).astype(_NUMPY[self.dtype])
        if scale.shape != zp.shape or scale.ndim > 1:
            raise ValueError(f"scale {scale.shape} and zero point {zp.shape} must be the same "
                             "scalar or 1-D shape")
        if (self.axis is None) != (scale.ndim == 0):
            raise ValueError("per-channel parameters need an axis; per-tensor ones none")
        if not (np.all(np.isfinite(scale)) and np.all(scale > 0)):
            raise ValueError("scales must be finite and positive")
        object.__setattr__(self, "scale", scale)
        object.__setattr__(self, "zero_point", zp)

    @property
    def qmin(self) -> int:
        """The type's smallest value."""
        return _RANGES[self.dtype][0]

    @property
    def qmax(self) -> int:
        """The type's largest value."""
        return _RANGES[self.dtype][1]

    @property
    def per_channel(self) -> bool:
        """Whether the parameters are per channel."""
        return self.axis is not None

    def broadcast(self, ndim: int) -> tuple[np.ndarray, np.ndarray]:
        """``scale`` and ``zero_point`` shaped to broadcast against a rank-``ndim`` tensor."""
        if self.axis is None:
            return self.scale, self.zero_point
        shape = [1] * ndim
        shape[self.axis % ndim] = -1
        return self.scale.reshape(shape), self.zero_point.reshape(shape)

    def range(self) -> tuple[np.ndarray, np.ndarray]:
        """The real values of ``qmin`` and ``qmax``: what quantization clamps to."""
        zp = self.zero_point.astype(np.float64)
        return (self.qmin - zp) * self.scale, (self.qmax - zp) * self.scale


def quantize(x: np.ndarray, qp: QuantParams) -> np.ndarray:
    """ONNX ``QuantizeLinear``: ``saturate(round_half_even(x / scale) + zero_point)``.

    In float32, as QuantizeLinear computes, except for int32 (biases), whose quotients need
    more than float32's 24 bits of mantissa: there the arithmetic is float64.
    """
    ftype = np.float64 if qp.dtype == DataType.INT32 else np.float32
    x = np.asarray(x, ftype)
    scale, zp = qp.broadcast(x.ndim)
    q = np.rint(x / scale.astype(ftype)) + zp.astype(ftype)
    return np.clip(q, qp.qmin, qp.qmax).astype(_NUMPY[qp.dtype])


def dequantize(q: np.ndarray, qp: QuantParams) -> np.ndarray:
    """ONNX ``DequantizeLinear``: ``(q - zero_point) * scale`` in float32."""
    scale, zp = qp.broadcast(np.ndim(q))
    return ((np.asarray(q).astype(np.int64) - zp.astype(np.int64)) * scale).astype(np.float32)


def params_from_range(lo: np.ndarray | float, hi: np.ndarray | float, dtype: DataType,
                      symmetric: bool = False, axis: int | None = None) -> QuantParams:
    """Scale and zero point that map ``[lo, hi]`` onto ``dtype`` (ONNX Runtime's formula).

    The range is widened to hold 0 (so that 0, padding and ReLU's floor are exact); a
    symmetric range is ``[-max|.|, max|.|]`` with a zero point of 0 (signed types use
    ``-127..127``, unsigned ones the middle value). An empty range gets scale 1.
    """
    lo = np.minimum(np.asarray(lo, np.float64), 0.0)
    hi = np.maximum(np.asarray(hi, np.float64), 0.0)
    qmin, qmax = type_range(dtype, symmetric)
    if symmetric:
        hi = np.maximum(-lo, hi)
        lo = -hi
    scale = (hi - lo) / (qmax - qmin)
    tiny = scale < np.finfo(np.float32).tiny * 1e3
    scale = np.where(tiny, 1.0, scale).astype(np.float32)
    if symmetric:
        zp = np.full(scale.shape, 0 if qmin < 0 else (qmin + qmax + 1) // 2, np.int64)
    else:
        zp = np.clip(np.rint(qmin - lo / scale.astype(np.float64)), qmin, qmax)
        zp = np.where(tiny, 0 if qmin <= 0 <= qmax else qmin, zp)
    if axis is None and scale.ndim:
        raise ValueError("a per-channel range needs an axis")
    return QuantParams(scale, zp, dtype, axis if scale.ndim else None)


def _const(v: Value | None) -> np.ndarray | None:
    return None if v is None or v.const_value is None else np.asarray(v.const_value.numpy())


def qdq_params(node: Node) -> QuantParams | None:
    """The parameters of one QuantizeLinear / DequantizeLinear node (constant ones only)."""
    scale = _const(node.inputs[1] if len(node.inputs) > 1 else None)
    if scale is None:
        return None
    zp_value = node.inputs[2] if len(node.inputs) > 2 else None
    zp = _const(zp_value)
    if zp is None:
        if zp_value is not None:
            return None
        # No zero point: 0, of the input's type (uint8 for a QuantizeLinear).
        x = node.inputs[0] if node.op_type == "DequantizeLinear" else None
        dt = x.dtype if x is not None and x.dtype is not None else DataType.UINT8
        zp = np.zeros(scale.shape, _NUMPY.get(dt, np.uint8))
    dtype = DataType.from_numpy(zp.dtype)
    if scale.size == 1 and zp.size == 1:  # [1]-shaped parameters mean the same as scalars
        scale, zp = scale.reshape(()), zp.reshape(())
    axis = int(node.attr("axis", 1)) if scale.ndim else None
    try:
        return QuantParams(scale.astype(np.float32), zp, dtype, axis)
    except ValueError:
        return None


def quant_params(value: Value) -> QuantParams | None:
    """The quantization of ``value`` in a QDQ graph, if it has one.

    A value produced by ``DequantizeLinear`` (a quantized weight or activation as float ops
    read it) or read by a ``QuantizeLinear`` (an activation about to be quantized) carries
    that node's parameters; with constant scale and zero point only. ``block_size`` (blocked
    quantization) is not represented.
    """
    node = value.producer()
    if node is not None and node.op_type == "DequantizeLinear" and node.domain in ("", "ai.onnx") \
            and not node.attr("block_size", 0):
        return qdq_params(node)
    for use in value.uses():
        n = use.node
        if n.op_type == "QuantizeLinear" and n.domain in ("", "ai.onnx") and use.index == 0 \
                and not n.attr("block_size", 0):
            return qdq_params(n)
    return None


def weight_params(w: np.ndarray, axis: int | None, dtype: DataType = DataType.INT8
                  ) -> QuantParams:
    """Symmetric parameters of a weight: per channel along ``axis``, or per tensor (None).

    Zero stays exactly zero (zero point 0), so pruned or sparse weights stay sparse.
    """
    w = np.asarray(w, np.float64)
    if axis is None:
        m = np.abs(w).max(initial=0.0)
        return params_from_range(-m, m, dtype, symmetric=True)
    axis %= w.ndim
    m = np.abs(w).max(axis=tuple(i for i in range(w.ndim) if i != axis), initial=0.0)
    return params_from_range(-m, m, dtype, symmetric=True, axis=axis)
