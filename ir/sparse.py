"""Compressed sparse row (CSR) packing of a weight: the backend-neutral sparse layout.

A packed weight is a :class:`CSRTensor` set as the weight's ``Value.const_value``. It
satisfies the :class:`~edgeopt.ir.Tensor` protocol, so every pass still reads the dense array
(``numpy()`` is the exact :meth:`~CSRTensor.unpack`), while backends read the packed arrays.
A pass that rewrites the weight assigns a new tensor and so drops the packing; run the
``csr`` pass last.

The matrix
    A weight is seen as a 2-D matrix with one **row per output** and one column per input
    term, so that ``out[r] = sum_c matrix[r, c] * in[c]``:

    - ``layout="rows"``: ``matrix = dense.reshape(shape[0], -1)``. A Conv weight
      ``[M, C/group, *kernel]`` gives rows ``M`` and columns ``(c, *kernel)`` in ONNX order
      (the im2col column order of :func:`edgeopt.passes.recovery.im2col`); a Gemm
      ``transB=1`` weight ``[N, K]`` gives rows ``N``, columns ``K``.
    - ``layout="cols"``: ``matrix = dense.reshape(-1, shape[-1]).T``. A MatMul or Gemm
      ``transB=0`` weight ``[K, N]`` gives rows ``N``, columns ``K``.

The arrays (all C-contiguous, little-endian on disk, as a C backend emits them)
    - ``values[nnz]``: the non-zero entries row by row, columns ascending, in the weight's
      own dtype (float32, int8 after quantization, ...);
    - ``col_idx[nnz]``: their column, in the smallest unsigned type holding ``cols - 1``
      (uint8 up to 256 columns, uint16 up to 65536, else uint32);
    - ``row_ptr[rows + 1]``: row ``r``'s entries are ``values[row_ptr[r]:row_ptr[r + 1]]``;
      the smallest unsigned type holding ``nnz``.

:attr:`CSRTensor.stored_nbytes` is the sum of the three arrays' bytes; :attr:`nbytes` stays
the dense size, as for :class:`~edgeopt.ir.SparseTensor`. :func:`csr_nbytes` gives the packed
size of an array without building the packing.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np

from ._tensor import ArrayTensor, SparseTensor, Tensor, _TensorBase, nbytes_of
from ._types import DataType

__all__ = ["CSRTensor", "Layout", "csr_nbytes", "index_dtype"]

Layout = Literal["rows", "cols"]


def index_dtype(largest: int) -> np.dtype:
    """The smallest unsigned integer type that holds ``largest`` (uint8, uint16 or uint32)."""
    for dt in (np.uint8, np.uint16, np.uint32):
        if largest <= np.iinfo(dt).max:
            return np.dtype(dt)
    raise ValueError(f"{largest} does not fit a 32-bit index")


def _matrix(dense: np.ndarray, layout: Layout) -> np.ndarray:
    """The weight's 2-D matrix (rows = outputs), see the module docs."""
    if dense.ndim < 1:
        raise ValueError("a scalar cannot be CSR-packed")
    if layout == "rows":
        if dense.ndim == 1:
            return dense.reshape(1, dense.shape[0])
        return dense.reshape(dense.shape[0], math.prod(dense.shape[1:]))
    if layout == "cols":
        return dense.reshape(math.prod(dense.shape[:-1]), dense.shape[-1]).T
    raise ValueError(f"layout must be 'rows' or 'cols', not {layout!r}")


def csr_nbytes(dense: np.ndarray, layout: Layout = "rows", dtype: DataType | None = None
               ) -> int:
    """Bytes of the CSR packing of ``dense`` (values + col_idx + row_ptr), not built."""
    m = _matrix(np.asarray(dense), layout)
    nnz = int(np.count_nonzero(m))
    dt = dtype or DataType.from_numpy(m.dtype)
    return (nbytes_of(dt, (nnz,)) + nnz * index_dtype(max(m.shape[1] - 1, 0)).itemsize
            + (m.shape[0] + 1) * index_dtype(nnz).itemsize)


class CSRTensor(_TensorBase):
    """A weight packed as CSR (see the module docs for the layout).

    Build one with :meth:`pack`; ``numpy()`` / :meth:`unpack` give the dense array back
    exactly (same dtype, shape and values; see :meth:`pack` for ``-0.0``).

    Attributes:
        values: ``[nnz]`` non-zero entries, the weight's dtype.
        col_idx: ``[nnz]`` column of each entry (smallest unsigned type that fits).
        row_ptr: ``[rows + 1]`` offsets of each row's entries (smallest unsigned type).
        dims: ``(rows, cols)`` of the matrix.
        layout: ``"rows"`` or ``"cols"``: how the matrix maps onto the dense shape.
    """

    def __init__(self, values: np.ndarray, col_idx: np.ndarray, row_ptr: np.ndarray,
                 shape: tuple[int, ...], layout: Layout, dtype: DataType | None = None
                 ) -> None:
        self.values = np.ascontiguousarray(values)
        self.col_idx = np.ascontiguousarray(col_idx)
        self.row_ptr = np.ascontiguousarray(row_ptr)
        self.layout = layout
        self._shape = tuple(int(d) for d in shape)
        self._dtype = dtype if dtype is not None else DataType.from_numpy(self.values.dtype)
        probe = _matrix(np.empty(self._shape, np.uint8), layout)
        self.dims = (int(probe.shape[0]), int(probe.shape[1]))
        self._check()

    def _check(self) -> None:
        rows, cols = self.dims
        nnz = len(self.values)
        if self.row_ptr.shape != (rows + 1,) or len(self.col_idx) != nnz:
            raise ValueError(f"CSR arrays do not match dims {self.dims}: row_ptr "
                             f"{self.row_ptr.shape}, col_idx {self.col_idx.shape}, nnz {nnz}")
        ptr = self.row_ptr.astype(np.int64)
        if ptr[0] != 0 or ptr[-1] != nnz or np.any(np.diff(ptr) < 0):
            raise ValueError("CSR row_ptr must rise from 0 to nnz")
        if nnz and int(self.col_idx.max()) >= cols:
            raise ValueError(f"CSR column index out of range (cols={cols})")

    @classmethod
    def pack(cls, tensor: Tensor | np.ndarray, layout: Layout = "rows") -> CSRTensor:
        """Pack a dense tensor (any dtype) into CSR; entries equal to 0 are dropped.

        A negative zero (``-0.0``) is zero too: it unpacks as ``+0.0`` (equal in value and
        in every product, so a kernel cannot tell; a stored entry would only cost bytes).
        NaNs are kept.
        """
        dtype = tensor.dtype if isinstance(tensor, Tensor) else None
        dense = np.asarray(tensor.numpy() if isinstance(tensor, Tensor) else tensor)
        m = _matrix(dense, layout)
        rows, cols = np.nonzero(m)  # row-major: rows ascending, columns ascending
        nnz = len(rows)
        row_ptr = np.zeros(m.shape[0] + 1, np.int64)
        np.cumsum(np.bincount(rows, minlength=m.shape[0]), out=row_ptr[1:])
        return cls(m[rows, cols], cols.astype(index_dtype(max(m.shape[1] - 1, 0))),
                   row_ptr.astype(index_dtype(nnz)), dense.shape, layout, dtype)

    @property
    def nnz(self) -> int:
        """Stored entries."""
        return len(self.values)

    @property
    def density(self) -> float:
        """Stored entries / dense elements (1.0 for an empty tensor)."""
        return self.nnz / self.size if self.size else 1.0

    @property
    def stored_nbytes(self) -> int:
        """Bytes of the packed arrays (values + col_idx + row_ptr)."""
        return (nbytes_of(self._dtype, (self.nnz,)) + self.col_idx.nbytes
                + self.row_ptr.nbytes)

    @property
    def coo_nbytes(self) -> int:
        """Bytes of the ONNX sparse form (:meth:`to_coo`: values + int64 indices), not built."""
        return nbytes_of(self._dtype, (self.nnz,)) + 8 * self.nnz

    def unpack(self) -> np.ndarray:
        """The dense array, exactly as packed."""
        rows, cols = self.dims
        m = np.zeros((rows, cols), self.values.dtype)
        counts = np.diff(self.row_ptr.astype(np.int64))
        m[np.repeat(np.arange(rows), counts), self.col_idx.astype(np.int64)] = self.values
        if self.layout == "rows":
            return m.reshape(self._shape)
        return np.ascontiguousarray(m.T).reshape(self._shape)

    def numpy(self) -> np.ndarray:
        """The dense array (:meth:`unpack`)."""
        return self.unpack()

    def to_coo(self) -> SparseTensor:
        """The same data as an ONNX sparse tensor (linear int64 indices, ascending)."""
        rows, cols = self.dims
        r = np.repeat(np.arange(rows, dtype=np.int64), np.diff(self.row_ptr.astype(np.int64)))
        c = self.col_idx.astype(np.int64)
        if self.layout == "rows":
            linear = r * cols + c
            values = self.values
        else:  # dense [..., rows] with the matrix transposed: element (c, r)
            linear = c * rows + r
            order = np.argsort(linear, kind="stable")
            linear, values = linear[order], self.values[order]
        return SparseTensor(ArrayTensor(values, self._dtype), ArrayTensor(linear),
                            self._shape)

    def __repr__(self) -> str:
        return (f"CSRTensor({self._dtype.name}{list(self._shape)}, layout={self.layout}, "
                f"nnz={self.nnz}, {self.stored_nbytes}/{self.nbytes} bytes)")
