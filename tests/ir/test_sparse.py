"""CSR packing (ir/sparse.py): exact round trips, index widths, byte accounting, ONNX export."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import build_model, run_ort
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from edgeopt import ir
from edgeopt.ir.sparse import CSRTensor, csr_nbytes, index_dtype

SETTINGS = settings(max_examples=150, deadline=None, derandomize=True, database=None)

DTYPES = (np.float32, np.int8, np.uint8, np.int32, np.float16, np.float64)


@st.composite
def sparse_arrays(draw):
    """Arrays of 1-4 dims with random zero patterns, empty/full rows and zero-sized dims."""
    dtype = draw(st.sampled_from(DTYPES))
    shape = draw(hnp.array_shapes(min_dims=1, max_dims=4, min_side=0, max_side=6))
    if np.issubdtype(dtype, np.floating):
        elems = st.floats(-100, 100, width=np.dtype(dtype).itemsize * 8, allow_nan=False)
    else:
        info = np.iinfo(dtype)
        elems = st.integers(max(info.min, -1000), min(info.max, 1000))
    arr = draw(hnp.arrays(dtype, shape, elements=elems))
    mask = draw(hnp.arrays(np.bool_, shape))  # independent zero pattern
    arr = np.where(mask, arr, np.zeros((), dtype))
    if arr.ndim >= 2 and arr.shape[0] > 1 and draw(st.booleans()):
        arr[0] = 0  # an empty row
        arr[-1] = np.where(arr[-1] == 0, np.ones((), dtype), arr[-1])  # a full row
    return arr


@SETTINGS
@given(sparse_arrays(), st.sampled_from(("rows", "cols")))
def test_unpack_pack_is_exact(arr, layout):
    t = CSRTensor.pack(arr, layout)
    out = t.unpack()
    assert out.dtype == arr.dtype and out.shape == arr.shape
    assert np.array_equal(out, arr)
    assert t.nnz == np.count_nonzero(arr)
    assert t.stored_nbytes == csr_nbytes(arr, layout)
    assert np.array_equal(t.to_coo().numpy(), arr)  # the ONNX sparse form holds the same
    assert t.coo_nbytes == t.to_coo().stored_nbytes


@SETTINGS
@given(sparse_arrays())
def test_rows_are_outputs_and_columns_ascend(arr):
    t = CSRTensor.pack(arr, "rows")
    rows, cols = t.dims
    m = arr.reshape(rows, cols) if arr.ndim > 1 else arr.reshape(1, -1)
    ptr = t.row_ptr.astype(np.int64)
    for r in range(rows):
        c = t.col_idx[ptr[r]:ptr[r + 1]].astype(np.int64)
        assert np.all(np.diff(c) > 0)
        assert np.array_equal(t.values[ptr[r]:ptr[r + 1]], m[r, c])
        assert np.count_nonzero(m[r]) == len(c)


def test_cols_layout_packs_the_transpose():
    w = np.array([[1, 0, 2], [0, 0, 3]], np.float32)  # MatMul weight [K=2, N=3]
    t = CSRTensor.pack(w, "cols")
    assert t.dims == (3, 2)
    assert t.row_ptr.tolist() == [0, 1, 1, 3] and t.col_idx.tolist() == [0, 0, 1]
    assert t.values.tolist() == [1, 2, 3]


@pytest.mark.parametrize("cols, width", [(255, 1), (256, 1), (257, 2), (65535, 2), (65536, 2),
                                         (65537, 4)])
def test_column_index_width_boundaries(cols, width):
    w = np.zeros((2, cols), np.int8)
    w[0, -1] = 5  # the largest column index is cols - 1
    w[1, 0] = -3
    t = CSRTensor.pack(w)
    assert t.col_idx.dtype.itemsize == width
    assert t.col_idx.tolist() == [cols - 1, 0]
    assert np.array_equal(t.unpack(), w)
    assert t.stored_nbytes == 2 + 2 * width + 3  # values, col_idx, row_ptr (uint8: nnz 2)


@pytest.mark.parametrize("nnz, width", [(255, 1), (256, 2), (65535, 2), (65536, 4)])
def test_row_pointer_width_holds_nnz(nnz, width):
    w = np.zeros(70000, np.float32)
    w[:nnz] = 1.0
    t = CSRTensor.pack(w.reshape(1, -1))
    assert t.row_ptr.dtype.itemsize == width and int(t.row_ptr[-1]) == nnz
    assert np.array_equal(t.unpack().ravel(), w)


def test_index_dtype():
    assert [index_dtype(n).itemsize for n in (0, 255, 256, 65535, 65536, 2**32 - 1)] == \
        [1, 1, 2, 2, 4, 4]
    with pytest.raises(ValueError, match="does not fit a 32-bit index"):
        index_dtype(2**32)


def test_negative_zero_is_zero_and_nan_is_kept():
    w = np.array([[-0.0, 1.0, np.nan]], np.float32)
    t = CSRTensor.pack(w)
    assert t.nnz == 2
    out = t.unpack()
    assert out[0, 0] == 0 and np.isnan(out[0, 2]) and out[0, 1] == 1


def test_inconsistent_arrays_are_refused():
    with pytest.raises(ValueError, match="row_ptr must rise from 0 to nnz"):
        CSRTensor(np.ones(2, np.float32), np.zeros(2, np.uint8), np.array([0, 3], np.uint8),
                  (1, 4), "rows")
    with pytest.raises(ValueError, match=r"column index out of range \(cols=4\)"):
        CSRTensor(np.ones(1, np.float32), np.array([4], np.uint8), np.array([0, 1], np.uint8),
                  (1, 4), "rows")
    with pytest.raises(ValueError, match="CSR arrays do not match dims"):
        CSRTensor(np.ones(1, np.float32), np.array([0], np.uint8), np.array([0, 1], np.uint8),
                  (2, 4), "rows")


def test_tensor_protocol_reports_dense_and_stored_bytes():
    w = np.zeros((4, 8), np.float32)
    w[1, 2] = 1.0
    t = CSRTensor.pack(ir.ArrayTensor(w))
    assert isinstance(t, ir.Tensor)
    assert (t.dtype, t.shape, t.nbytes, t.size) == (ir.DataType.FLOAT, (4, 8), 128, 32)
    assert t.stored_nbytes == 4 + 1 + 5
    assert t.density == 1 / 32


# -- ONNX export ----------------------------------------------------------------------------
MODEL = """<ir_version: 8, opset_import: ["" : 17]>
g (float[2, 64] x, float[64, 48] W, float[32, 48] B, int8[64, 64] Q, float s)
    => (float[2, 32] y, float[2, 64] z) {
  h = MatMul(x, W)
  y = Gemm(h, B) <transB = 1>
  q = DequantizeLinear(Q, s)
  z = MatMul(x, q)
}"""


def sparse_model(density: float) -> tuple[ir.Model, dict]:
    rng = np.random.default_rng(0)
    def thin(shape, dtype=np.float32):
        a = rng.standard_normal(shape) * 50
        return np.where(rng.random(shape) < density, a, 0).astype(dtype)
    weights = {"W": thin((64, 48)), "B": thin((32, 48)), "Q": thin((64, 64), np.int8),
               "s": np.float32(0.01)}
    model = build_model(MODEL, weights)
    for lw, layout in (("W", "cols"), ("B", "rows"), ("Q", "cols")):
        v = model.graph.initializers[lw]
        v.const_value = CSRTensor.pack(v.const_value, layout)
    return model, weights


def test_sparse_initializers_load_in_ort_with_identical_outputs(tmp_path):
    model, _ = sparse_model(0.1)
    dense_path, sparse_path = tmp_path / "dense.onnx", tmp_path / "sparse.onnx"
    ir.save(model, dense_path)
    ir.save(model, sparse_path, sparse_initializers=True)
    proto = onnx.load(str(sparse_path))
    assert sorted(sp.values.name for sp in proto.graph.sparse_initializer) == ["B", "Q", "W"]
    assert {t.name for t in proto.graph.initializer} == {"s"}
    assert not onnx.load(str(dense_path)).graph.sparse_initializer
    onnx.checker.check_model(proto)
    assert sparse_path.stat().st_size < dense_path.stat().st_size / 2
    x = {"x": np.random.default_rng(1).standard_normal((2, 64)).astype(np.float32)}
    for a, b in zip(run_ort(str(dense_path), x), run_ort(str(sparse_path), x), strict=True):
        assert np.array_equal(a, b)
    back = ir.load(sparse_path)  # loads as the same dense values
    for name in ("W", "B", "Q"):
        assert np.array_equal(back.graph.initializers[name].const_value.numpy(),
                              model.graph.initializers[name].const_value.numpy())


def test_sparse_form_is_written_only_where_smaller(tmp_path):
    model, _ = sparse_model(0.6)  # int64 COO indices make it bigger than dense
    ir.save(model, tmp_path / "m.onnx", sparse_initializers=True)
    assert not onnx.load(str(tmp_path / "m.onnx")).graph.sparse_initializer


def test_sparse_initializers_raise_old_ir_versions(tmp_path):
    model, _ = sparse_model(0.1)
    model.ir_version = 4
    ir.save(model, tmp_path / "m.onnx", sparse_initializers=True)
    proto = onnx.load(str(tmp_path / "m.onnx"))
    assert proto.ir_version == 6 and len(proto.graph.sparse_initializer) == 3
