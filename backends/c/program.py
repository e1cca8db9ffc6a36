"""What the C emitter writes: tensors, constants and a schedule of kernel calls.

:mod:`.lower` builds a :class:`Program` from an IR model; :mod:`.emit` turns it into C. Nothing
here knows ONNX: names are already C identifiers, shapes are the C storage shapes (NHWC for a
4-D activation), int8 tensors carry their scale and zero point.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Union

import numpy as np

__all__ = ["CTYPES", "Arg", "Const", "Op", "Params", "Program", "Ptrs", "TensorRef"]

#: C element type -> (bytes, numpy dtype)
CTYPES: dict[str, tuple[int, Any]] = {
    "float": (4, np.float32),
    "int8_t": (1, np.int8),
    "uint8_t": (1, np.uint8),
    "int16_t": (2, np.int16),
    "uint16_t": (2, np.uint16),
    "int32_t": (4, np.int32),
    "uint32_t": (4, np.uint32),
}


@dataclass(eq=False)
class TensorRef:
    """An activation: a region of the arena, or a caller's input/output buffer.

    Attributes:
        name: C identifier.
        source: the ONNX value name (reports only; never copied into code).
        ctype: element type.
        shape: C storage shape (NHWC for ``layout="nhwc"``).
        layout: ``plain`` (ONNX order), ``nhwc`` (an ONNX NCHW tensor stored NHWC) or
            ``flat_hwc`` (an ONNX ``[N, C*H*W]`` tensor stored in ``(h, w, c)`` order;
            ``chw`` holds ``(C, H, W)``).
        scale, zero_point: int8 quantization (None for float).
        alias: the tensor whose storage this one is (reshapes), or None.
        io: ``"input"``, ``"output"`` or None (an arena tensor).
        index: position among the inputs/outputs.
    """

    name: str
    source: str
    ctype: str
    shape: tuple[int, ...]
    layout: str = "plain"
    chw: tuple[int, int, int] | None = None
    scale: float | None = None
    zero_point: int | None = None
    alias: TensorRef | None = None
    io: str | None = None
    index: int = 0

    @property
    def size(self) -> int:
        """Elements."""
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """Bytes."""
        return self.size * CTYPES[self.ctype][0]

    def root(self) -> TensorRef:
        """The tensor that owns the storage."""
        t = self
        while t.alias is not None:
            t = t.alias
        return t


@dataclass(eq=False)
class Const:
    """A constant array in flash.

    Attributes:
        name: C identifier.
        ctype: element type.
        data: the values, any shape (written flattened, C order).
        what: a short description for reports (built from sanitized names only).
    """

    name: str
    ctype: str
    data: np.ndarray
    what: str = ""

    @property
    def nbytes(self) -> int:
        """Bytes."""
        return int(self.data.size) * CTYPES[self.ctype][0]

    def bytes(self) -> bytes:
        """The little-endian bytes the array holds in memory (what the CRC covers)."""
        dt = np.dtype(CTYPES[self.ctype][1]).newbyteorder("<")
        return np.ascontiguousarray(self.data, dt).tobytes()


@dataclass(eq=False)
class Params:
    """A ``static const`` parameter block: a struct type and its fields."""

    struct: str
    fields: dict[str, Any]


@dataclass(eq=False)
class Ptrs:
    """An argument that is an array of pointers to tensors or constants (Concat)."""

    items: list


#: An argument of a kernel call.
Arg = Union[TensorRef, Const, Params, Ptrs, str, int, float]  # noqa: UP007 - runtime alias


@dataclass(eq=False)
class Op:
    """One kernel call.

    Attributes:
        kernel: the C function.
        node: the layer's C-safe label (reports, comments).
        op_type: the ONNX operator (reports).
        args: the call's arguments in order.
        reads, writes: the activations it reads and writes.
        macs: multiply-accumulates.
        inplace: an input whose storage the output may share (elementwise ops).
    """

    kernel: str
    node: str
    op_type: str
    args: list[Arg]
    reads: list[TensorRef]
    writes: list[TensorRef]
    macs: int = 0
    inplace: TensorRef | None = None


@dataclass
class Program:
    """A lowered model."""

    inputs: list[TensorRef] = field(default_factory=list)
    outputs: list[TensorRef] = field(default_factory=list)
    tensors: list[TensorRef] = field(default_factory=list)
    consts: list[Const] = field(default_factory=list)
    ops: list[Op] = field(default_factory=list)

    @property
    def quantized(self) -> bool:
        """Whether any input or output is int8 (the float wrapper then converts)."""
        return any(t.ctype == "int8_t" for t in self.inputs + self.outputs)
