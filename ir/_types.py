"""Element types and shapes of tensor values.

``DataType`` mirrors ``onnx.TensorProto.DataType`` numerically, so conversion to and from ONNX is
an integer copy, but it is edgeopt's own enum: the rest of the IR never imports ``onnx``.
A shape is a plain tuple whose dims are ``int`` (static), ``str`` (symbolic, e.g. ``"N"``) or
``None`` (unknown); ``None`` in place of the whole shape means the rank itself is unknown.
"""

from __future__ import annotations

import enum
from typing import Union

import numpy as np

__all__ = ["DataType", "Dim", "Shape", "format_shape", "shape_is_static"]

Dim = Union[int, str, None]  # noqa: UP007 - a runtime alias on Python 3.10
Shape = tuple  # tuple[Dim, ...]; kept as a plain alias so that annotations stay readable


class DataType(enum.IntEnum):
    """Tensor element type, numbered as ONNX numbers them."""

    UNDEFINED = 0
    FLOAT = 1
    UINT8 = 2
    INT8 = 3
    UINT16 = 4
    INT16 = 5
    INT32 = 6
    INT64 = 7
    STRING = 8
    BOOL = 9
    FLOAT16 = 10
    DOUBLE = 11
    UINT32 = 12
    UINT64 = 13
    COMPLEX64 = 14
    COMPLEX128 = 15
    BFLOAT16 = 16
    FLOAT8E4M3FN = 17
    FLOAT8E4M3FNUZ = 18
    FLOAT8E5M2 = 19
    FLOAT8E5M2FNUZ = 20
    UINT4 = 21
    INT4 = 22
    FLOAT4E2M1 = 23
    FLOAT8E8M0 = 24
    UINT2 = 25
    INT2 = 26
    FLOAT6E2M3 = 27
    FLOAT6E3M2 = 28

    @property
    def bitwidth(self) -> int:
        """Bits one element occupies in packed storage (``raw_data``); 0 for STRING/UNDEFINED."""
        return _BITS.get(self, 0)

    @property
    def itemsize(self) -> float:
        """Bytes per element; fractional for the sub-byte types (int4 is 0.5)."""
        return self.bitwidth / 8

    def numpy(self) -> np.dtype:
        """The numpy dtype that holds one unpacked element of this type.

        Raises:
            TypeError: the type has no numpy counterpart.
        """
        from onnx import helper  # local: keeps ``onnx`` out of the IR's import graph

        try:
            return np.dtype(helper.tensor_dtype_to_np_dtype(int(self)))
        except (KeyError, ValueError, TypeError) as e:
            raise TypeError(f"element type {self.name} has no numpy equivalent") from e

    @classmethod
    def from_numpy(cls, dtype: np.dtype | type) -> DataType:
        """The element type for a numpy dtype.

        Raises:
            TypeError: numpy dtype with no ONNX element type.
        """
        from onnx import helper

        try:
            return cls(helper.np_dtype_to_tensor_dtype(np.dtype(dtype)))
        except (KeyError, ValueError, TypeError) as e:
            raise TypeError(f"numpy dtype {dtype} has no ONNX element type") from e

    @classmethod
    def parse(cls, value: int) -> DataType:
        """Validate an element type number read from a file.

        Raises:
            ValueError: the number is not a known element type.
        """
        try:
            return cls(value)
        except ValueError:
            raise ValueError(f"unknown tensor element type {value}") from None


_BITS = {
    DataType.FLOAT: 32,
    DataType.UINT8: 8,
    DataType.INT8: 8,
    DataType.UINT16: 16,
    DataType.INT16: 16,
    DataType.INT32: 32,
    DataType.INT64: 64,
    DataType.BOOL: 8,
    DataType.FLOAT16: 16,
    DataType.DOUBLE: 64,
    DataType.UINT32: 32,
    DataType.UINT64: 64,
    DataType.COMPLEX64: 64,
    DataType.COMPLEX128: 128,
    DataType.BFLOAT16: 16,
    DataType.FLOAT8E4M3FN: 8,
    DataType.FLOAT8E4M3FNUZ: 8,
    DataType.FLOAT8E5M2: 8,
    DataType.FLOAT8E5M2FNUZ: 8,
    DataType.UINT4: 4,
    DataType.INT4: 4,
    DataType.FLOAT4E2M1: 4,
    DataType.FLOAT8E8M0: 8,
    DataType.UINT2: 2,
    DataType.INT2: 2,
    DataType.FLOAT6E2M3: 6,
    DataType.FLOAT6E3M2: 6,
}


def shape_is_static(shape: Shape | None) -> bool:
    """True when the rank and every dim are known integers."""
    return shape is not None and all(isinstance(d, int) for d in shape)


def format_shape(shape: Shape | None) -> str:
    """Human form of a shape: ``[1,3,'N',?]``; ``?`` for an unknown rank."""
    if shape is None:
        return "?"
    return "[" + ",".join("?" if d is None else repr(d) if isinstance(d, str) else str(d)
                          for d in shape) + "]"
