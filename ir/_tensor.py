"""Constant tensor data behind a :class:`~edgeopt.ir.Value`.

Every weight in the IR is one of these, all satisfying the small :class:`Tensor` protocol
(``dtype``, ``shape``, ``nbytes``, ``numpy()``):

- :class:`ArrayTensor` wraps a numpy array that edgeopt computed.
- :class:`ProtoTensor` is data that came inline in the ONNX file. It keeps the file's
  ``TensorProto`` and exports it verbatim, so untouched weights round-trip bit for bit; the
  array is materialized only when a pass asks for it.
- :class:`ExternalTensor` is data in an external file, memory-mapped on first use.
- :class:`LazyTensor` computes its data on demand (channel slicing, rounding), so a pipeline
  never materializes a weight it does not need.
- :class:`SparseTensor` is an ONNX sparse initializer (COO values + indices).

Tensors are treated as immutable: a pass that changes a weight assigns a new tensor to
``Value.const_value`` instead of writing into the array.
"""

from __future__ import annotations

import math
import mmap
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np

from ._types import DataType

if TYPE_CHECKING:
    import onnx

__all__ = [
    "ArrayTensor",
    "ExternalTensor",
    "LazyTensor",
    "ProtoTensor",
    "SparseTensor",
    "Tensor",
    "nbytes_of",
]


def nbytes_of(dtype: DataType, shape: tuple[int, ...]) -> int:
    """Bytes of packed (``raw_data``) storage for a tensor; sub-byte types round up."""
    return (math.prod(shape) * dtype.bitwidth + 7) // 8


@runtime_checkable
class Tensor(Protocol):
    """What every constant tensor offers."""

    @property
    def dtype(self) -> DataType:
        """Element type."""

    @property
    def shape(self) -> tuple[int, ...]:
        """Static shape."""

    @property
    def nbytes(self) -> int:
        """Bytes of packed storage (what it costs in a file or in flash)."""

    def numpy(self) -> np.ndarray:
        """The data as a numpy array (a read-only view where possible)."""


class _TensorBase:
    """Shared conveniences; subclasses set ``_dtype`` and ``_shape``."""

    _dtype: DataType
    _shape: tuple[int, ...]

    @property
    def dtype(self) -> DataType:
        """Element type."""
        return self._dtype

    @property
    def shape(self) -> tuple[int, ...]:
        """Static shape."""
        return self._shape

    @property
    def size(self) -> int:
        """Number of elements."""
        return math.prod(self._shape)

    @property
    def nbytes(self) -> int:
        """Bytes of packed storage."""
        return nbytes_of(self._dtype, self._shape)

    def numpy(self) -> np.ndarray:  # pragma: no cover - abstract
        """The data as a numpy array."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._dtype.name}{list(self._shape)})"


class ArrayTensor(_TensorBase):
    """A tensor held as a numpy array.

    Args:
        array: the data. It is not copied; callers must not mutate it afterwards.
        dtype: the ONNX element type when the numpy dtype is ambiguous (defaults to the
            type numpy's dtype maps to).
    """

    def __init__(self, array: np.ndarray | Any, dtype: DataType | None = None) -> None:
        arr = np.asarray(array)
        self._array = arr
        self._dtype = dtype if dtype is not None else DataType.from_numpy(arr.dtype)
        self._shape = tuple(int(d) for d in arr.shape)

    def numpy(self) -> np.ndarray:
        """The wrapped array."""
        return self._array


class ProtoTensor(_TensorBase):
    """Inline data of an ONNX ``TensorProto``, exported verbatim.

    Args:
        proto: a ``TensorProto`` with inline data, already checked by the loader
            (its byte count matches its dims).
    """

    def __init__(self, proto: onnx.TensorProto) -> None:
        self.proto = proto
        self._dtype = DataType(proto.data_type)
        self._shape = tuple(int(d) for d in proto.dims)

    def numpy(self) -> np.ndarray:
        """Decode the proto's data (a fresh array each call; nothing is cached)."""
        from onnx import numpy_helper

        return numpy_helper.to_array(self.proto)


class ExternalTensor(_TensorBase):
    """Data stored in an external file, memory-mapped read-only on first use.

    Args:
        path: absolute path of the data file (already checked to be inside the model's folder).
        offset: byte offset of the data in the file.
        length: byte length of the data; equals ``nbytes``.
        dtype: element type.
        shape: static shape.
        location: the location string as written in the model (kept for reports).
    """

    def __init__(self, path: str, offset: int, length: int, dtype: DataType,
                 shape: tuple[int, ...], location: str = "") -> None:
        self.path = path
        self.offset = offset
        self.length = length
        self.location = location
        self._dtype = dtype
        self._shape = tuple(shape)
        self._array: np.ndarray | None = None

    def numpy(self) -> np.ndarray:
        """A read-only array over the mapped file (pages load as they are touched)."""
        if self._array is None:
            self._array = self._map()
        return self._array

    def _map(self) -> np.ndarray:
        if self.length == 0:
            raw = np.zeros(0, dtype=np.uint8)
        else:
            # Map only this tensor's pages: mapping the whole file once per tensor would
            # reserve (tensors x file size) of address space.
            start = self.offset - self.offset % mmap.ALLOCATIONGRANULARITY
            with open(self.path, "rb") as f:
                mm = mmap.mmap(f.fileno(), self.offset + self.length - start,
                               access=mmap.ACCESS_READ, offset=start)
            raw = np.frombuffer(mm, dtype=np.uint8, count=self.length,
                                offset=self.offset - start)
        return _decode_raw(raw, self._dtype, self._shape)

    def iter_bytes(self, chunk: int = 1 << 24):
        """Yield the raw bytes in chunks with plain reads (no mapping, so no RSS growth)."""
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            left = self.length
            while left > 0:
                block = f.read(min(chunk, left))
                if not block:
                    raise OSError(f"{self.path}: file shrank while reading external data")
                left -= len(block)
                yield block


class LazyTensor(_TensorBase):
    """A tensor computed on demand.

    Args:
        fn: returns the array; called on every :meth:`numpy` unless ``cache`` is set.
        dtype: element type of the result.
        shape: shape of the result (checked when computed).
        cache: keep the first result.
    """

    def __init__(self, fn: Callable[[], np.ndarray], dtype: DataType, shape: tuple[int, ...],
                 cache: bool = False) -> None:
        self._fn = fn
        self._dtype = dtype
        self._shape = tuple(shape)
        self._cache = cache
        self._value: np.ndarray | None = None

    def numpy(self) -> np.ndarray:
        """Compute (or return the cached) array.

        Raises:
            ValueError: the function returned an array of another shape.
        """
        if self._value is not None:
            return self._value
        arr = np.asarray(self._fn())
        if tuple(arr.shape) != self._shape:
            raise ValueError(f"LazyTensor produced shape {arr.shape}, declared {self._shape}")
        if self._cache:
            self._value = arr
        return arr


class SparseTensor(_TensorBase):
    """An ONNX sparse tensor: ``values`` at ``indices`` (COO) inside a dense ``shape``.

    Args:
        values: 1-D tensor of the non-zero values; its name is the sparse initializer's name.
        indices: ``[NNZ]`` linearized or ``[NNZ, rank]`` coordinate indices (int64).
        shape: the dense shape.
    """

    def __init__(self, values: Tensor, indices: Tensor, shape: tuple[int, ...]) -> None:
        self.values = values
        self.indices = indices
        self._dtype = values.dtype
        self._shape = tuple(shape)

    @property
    def stored_nbytes(self) -> int:
        """Bytes the sparse form takes (values + indices)."""
        return self.values.nbytes + self.indices.nbytes

    def numpy(self) -> np.ndarray:
        """Densify."""
        vals = self.values.numpy()
        idx = self.indices.numpy().astype(np.int64)
        dense = np.zeros(self.size, dtype=vals.dtype)
        if idx.ndim == 2:
            idx = np.ravel_multi_index(tuple(idx.T), self._shape) if idx.size else idx[:, 0]
        dense[idx] = vals
        return dense.reshape(self._shape)


def _decode_raw(raw: np.ndarray, dtype: DataType, shape: tuple[int, ...]) -> np.ndarray:
    """Interpret little-endian packed bytes (ONNX ``raw_data`` layout) as an array."""
    if dtype.bitwidth % 8 == 0 and dtype != DataType.STRING:
        np_dtype = dtype.numpy().newbyteorder("<")
        return raw.view(np_dtype).reshape(shape)
    # Sub-byte types: let onnx unpack them (rare, and only from small tensors in practice).
    from onnx import helper, numpy_helper

    proto = helper.make_tensor("t", int(dtype), shape, raw.tobytes(), raw=True)
    return numpy_helper.to_array(proto)


def file_size(path: str) -> int:
    """Size of a file in bytes."""
    return os.stat(path).st_size
