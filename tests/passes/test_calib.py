"""Calibration data: sources, checks against the model's inputs, and exact error messages."""

from __future__ import annotations

import logging
import os
import re
import sys

import numpy as np
import onnx
import pytest
from conftest import ONNX_TEST_DATA, parse_model, run_ort
from onnx import numpy_helper

from edgeopt import ir
from edgeopt.ir import EdgeoptError
from edgeopt.passes.calib import (
    CalibrationData,
    CalibrationError,
    Preprocess,
    load_calibration,
    parse_preprocess,
    random_calibration,
)

IMAGE_MODEL = """<ir_version: 8, opset_import: ["" : 17]>
g (float[N,3,8,8] x) => (float[N,3,8,8] y) { y = Relu(x) }"""

TWO_INPUTS = """<ir_version: 8, opset_import: ["" : 17]>
g (float[N,4] a, int64[N,2] ids) => (float[N,4] y, int64[N,2] z) {
    y = Relu(a)  z = Identity(ids) }"""

SHARED_SYMBOL = """<ir_version: 8, opset_import: ["" : 17]>
g (float[N,S] a, float[N,S] b) => (float[N,S] y) { y = Add(a, b) }"""

STATIC_BATCH = """<ir_version: 8, opset_import: ["" : 17]>
g (float[2,4] x) => (float[2,4] y) { y = Relu(x) }"""

SCALAR = """<ir_version: 8, opset_import: ["" : 17]>
g (float x) => (float y) { y = Relu(x) }"""

INT8_INPUT = """<ir_version: 8, opset_import: ["" : 17]>
g (int8[N,4] q) => (int8[N,4] y) { y = Identity(q) }"""

UINT8_IMAGE = """<ir_version: 8, opset_import: ["" : 17]>
g (uint8[N,4,6,3] img) => (uint8[N,4,6,3] y) { y = Identity(img) }"""

GRAY_IMAGE = """<ir_version: 8, opset_import: ["" : 17]>
g (float[N,1,5,5] x) => (float[N,1,5,5] y) { y = Relu(x) }"""

PREFIXES = """<ir_version: 8, opset_import: ["" : 17]>
g (float[N,2] x, float[N,2] x_mask) => (float[N,2] y) { y = Mul(x, x_mask) }"""

WITH_DEFAULT = """<ir_version: 8, opset_import: ["" : 17]>
g (float[N,2] x, float[2] bias) => (float[N,2] y) <float[2] bias = {1.0, 2.0}> {
    y = Add(x, bias) }"""


def exactly(message: str) -> str:
    """A ``match`` pattern for exactly this message."""
    return "^" + re.escape(message) + "$"


def rng_floats(shape, seed=0, dtype=np.float32):
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


# -- .npz files -------------------------------------------------------------------------------
def test_npz_by_input_name_casts_and_batches(tmp_path):
    model = parse_model(TWO_INPUTS)
    a = rng_floats((5, 4), dtype=np.float64)
    ids = np.arange(10, dtype=np.int32).reshape(5, 2)
    path = tmp_path / "calib.npz"
    np.savez(path, a=a, ids=ids)
    data = load_calibration(str(path), model)
    assert data.num_samples == 5 and not data.synthetic
    assert data.arrays["a"].dtype == np.float32 and data.arrays["ids"].dtype == np.int64
    np.testing.assert_array_equal(data.arrays["a"], a.astype(np.float32))
    np.testing.assert_array_equal(data.arrays["ids"], ids)
    batches = list(data.batches(2))
    assert [b["a"].shape for b in batches] == [(2, 4), (2, 4), (1, 4)]
    np.testing.assert_array_equal(np.concatenate([b["ids"] for b in batches]), ids)
    assert data.describe() == f"5 samples from {path}: a float32[5,4], ids int64[5,2]"
    # The loaded data really runs the model.
    out = run_ort(ir.to_proto(model), next(data.batches(8)))
    np.testing.assert_array_equal(out[0], np.maximum(a.astype(np.float32), 0))


def test_num_samples_keeps_the_first_samples(tmp_path):
    model = parse_model(IMAGE_MODEL)
    x = rng_floats((6, 3, 8, 8))
    np.savez(tmp_path / "c.npz", x=x)
    data = load_calibration(str(tmp_path / "c.npz"), model, num_samples=4)
    assert data.num_samples == 4
    np.testing.assert_array_equal(data.arrays["x"], x[:4])
    with pytest.raises(CalibrationError, match=exactly(
            f"{tmp_path / 'c.npz'}: the number of samples must be at least 1, not 0")):
        load_calibration(str(tmp_path / "c.npz"), model, num_samples=0)


def test_unknown_input_name(tmp_path):
    path = tmp_path / "c.npz"
    np.savez(path, a=np.zeros((2, 4), np.float32), ids=np.zeros((2, 2), np.int64),
             extra=np.zeros(2))
    with pytest.raises(CalibrationError, match=exactly(
            f"{path}: unknown input 'extra' (model inputs: 'a', 'ids')")):
        load_calibration(str(path), parse_model(TWO_INPUTS))


def test_missing_input(tmp_path):
    path = tmp_path / "c.npz"
    np.savez(path, a=np.zeros((2, 4), np.float32))
    with pytest.raises(CalibrationError, match=exactly(
            f"{path}: missing input 'ids' (model inputs: 'a', 'ids')")):
        load_calibration(str(path), parse_model(TWO_INPUTS))


def test_wrong_rank(tmp_path):
    path = tmp_path / "c.npz"
    np.savez(path, x=np.zeros((2, 8, 8), np.float32))
    with pytest.raises(CalibrationError, match=exactly(
            f"{path}: input 'x' has shape ['N',3,8,8], got an array of shape [2, 8, 8] "
            "(expected rank 4, or 5 with a leading sample axis)")):
        load_calibration(str(path), parse_model(IMAGE_MODEL))


def test_wrong_static_dim(tmp_path):
    path = tmp_path / "c.npz"
    np.savez(path, x=np.zeros((2, 3, 8, 9), np.float32))
    with pytest.raises(CalibrationError, match=exactly(
            f"{path}: input 'x' dim 3 is 9, the model expects 8 (input shape ['N',3,8,8])")):
        load_calibration(str(path), parse_model(IMAGE_MODEL))


def test_unsafe_dtype(tmp_path):
    path = tmp_path / "c.npz"
    np.savez(path, a=np.zeros((2, 4), np.float32), ids=np.zeros((2, 2), np.float32))
    with pytest.raises(CalibrationError, match=exactly(
            f"{path}: input 'ids' expects int64, got float32 (no safe cast)")):
        load_calibration(str(path), parse_model(TWO_INPUTS))


def test_integer_cast_must_fit(tmp_path):
    model = parse_model(INT8_INPUT)
    ok = tmp_path / "ok.npz"
    np.savez(ok, q=np.array([[-128, 0, 5, 127]], np.int64))
    data = load_calibration(str(ok), model)
    assert data.arrays["q"].dtype == np.int8
    np.testing.assert_array_equal(data.arrays["q"], [[-128, 0, 5, 127]])
    bad = tmp_path / "bad.npz"
    np.savez(bad, q=np.array([[0, 0, 0, 128]], np.int64))
    with pytest.raises(CalibrationError, match=exactly(
            f"{bad}: input 'q' expects int8, got int64 values outside its range")):
        load_calibration(str(bad), model)


def test_different_sample_counts(tmp_path):
    path = tmp_path / "c.npz"
    np.savez(path, a=np.zeros((3, 4), np.float32), ids=np.zeros((2, 2), np.int64))
    with pytest.raises(CalibrationError, match=exactly(
            f"{path}: inputs have different sample counts ('a': 3, 'ids': 2)")):
        load_calibration(str(path), parse_model(TWO_INPUTS))


def test_symbolic_dims_are_bound_consistently(tmp_path):
    model = parse_model(SHARED_SYMBOL)
    good = tmp_path / "good.npz"
    np.savez(good, a=np.zeros((2, 7), np.float32), b=np.ones((2, 7), np.float32))
    assert load_calibration(str(good), model).num_samples == 2
    bad = tmp_path / "bad.npz"
    np.savez(bad, a=np.zeros((2, 7), np.float32), b=np.ones((2, 9), np.float32))
    with pytest.raises(CalibrationError, match=exactly(
            f"{bad}: input 'b' dim 1 ('S') is 9, but another input has 'S' = 7")):
        load_calibration(str(bad), model)


def test_anonymous_question_mark_dims_are_free(tmp_path):
    """Paddle's exporter names every unknown dim '?' (PP-OCR's cls input is [-1, 3, ?, ?])."""
    model = parse_model('<ir_version: 8, opset_import: ["" : 17]>\n'
                        'g (float[N, 3, "?", "?"] x) => (float[N, 3, "?", "?"] y) { y = Relu(x) }')
    path = tmp_path / "c.npz"
    np.savez(path, x=np.zeros((2, 3, 48, 192), np.float32))
    assert load_calibration(str(path), model).num_samples == 2


def test_object_arrays_are_refused_without_unpickling(tmp_path):
    path = tmp_path / "evil.npz"
    np.savez(path, x=np.array([{"a": 1}, None], dtype=object))  # pickled inside the archive
    with pytest.raises(CalibrationError, match=exactly(
            f"{path}: cannot read calibration file (Object arrays cannot be loaded when "
            "allow_pickle=False)")):
        load_calibration(str(path), parse_model(IMAGE_MODEL))


def test_corrupt_files(tmp_path):
    npz = tmp_path / "broken.npz"
    npz.write_bytes(b"PK\x03\x04 definitely not a zip archive")
    with pytest.raises(CalibrationError, match="^" + re.escape(
            f"{npz}: cannot read calibration file (")):
        load_calibration(str(npz), parse_model(IMAGE_MODEL))
    folder = tmp_path / "d"
    folder.mkdir()
    (folder / "x_0.npy").write_bytes(b"\x93NUMPY garbage")
    with pytest.raises(CalibrationError, match="^" + re.escape(
            f"{folder / 'x_0.npy'}: cannot read calibration file (")):
        load_calibration(str(folder), parse_model(IMAGE_MODEL))


def test_missing_path_and_empty_folder(tmp_path):
    model = parse_model(IMAGE_MODEL)
    missing = tmp_path / "nope.npz"
    with pytest.raises(CalibrationError, match=exactly(
            f"{missing}: no such file or folder (give a .npz file, a folder of samples, or "
            "'random')")):
        load_calibration(str(missing), model)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "README.txt").write_text("labels, not samples")
    (empty / ".hidden.npy").write_bytes(b"")
    with pytest.raises(CalibrationError, match=exactly(
            f"{empty}: no calibration files (.npy, .npz, .pb or images)")):
        load_calibration(str(empty), model)


def test_calibration_errors_are_edgeopt_errors():
    assert issubclass(CalibrationError, EdgeoptError)


# -- folders ----------------------------------------------------------------------------------
def test_npy_folder_natural_order_with_and_without_batch_axis(tmp_path):
    model = parse_model(IMAGE_MODEL)
    samples = [np.full((3, 8, 8), i, np.float32) for i in range(12)]
    for i in range(10):  # one sample per file, no batch axis: x_0 ... x_9
        np.save(tmp_path / f"x_{i}.npy", samples[i])
    np.save(tmp_path / "x_10.npy", np.stack(samples[10:]))  # a batch of two
    (tmp_path / "notes.txt").write_text("skipped")
    data = load_calibration(str(tmp_path), model)
    assert data.num_samples == 12
    # Natural order: x_2 comes before x_10 (plain sorting would put x_10 after x_1).
    np.testing.assert_array_equal(data.arrays["x"][:, 0, 0, 0], np.arange(12))


def test_folder_num_samples_stops_reading(tmp_path):
    model = parse_model(IMAGE_MODEL)
    for i in range(3):
        np.save(tmp_path / f"x_{i}.npy", np.full((3, 8, 8), i, np.float32))
    (tmp_path / "x_9.npy").write_bytes(b"corrupt, but never read")
    data = load_calibration(str(tmp_path), model, num_samples=2)
    np.testing.assert_array_equal(data.arrays["x"][:, 0, 0, 0], [0, 1])
    with pytest.raises(CalibrationError, match=re.escape(str(tmp_path / "x_9.npy"))):
        load_calibration(str(tmp_path), model)


def test_npy_files_map_to_inputs_by_name(tmp_path):
    model = parse_model(PREFIXES)
    for i in range(2):
        np.save(tmp_path / f"x_{i}.npy", np.full((2,), i, np.float32))
        np.save(tmp_path / f"x_mask_{i}.npy", np.full((2,), 10 + i, np.float32))
    data = load_calibration(str(tmp_path), model)
    # The longest input name wins: x_mask_0.npy belongs to 'x_mask', not 'x'.
    np.testing.assert_array_equal(data.arrays["x"][:, 0], [0, 1])
    np.testing.assert_array_equal(data.arrays["x_mask"][:, 0], [10, 11])
    np.save(tmp_path / "other.npy", np.zeros(2, np.float32))
    with pytest.raises(CalibrationError, match=exactly(
            f"{tmp_path / 'other.npy'}: cannot tell which input this file is for; name it "
            "<input>.npy or <input>_<n>.npy with <input> one of 'x', 'x_mask'")):
        load_calibration(str(tmp_path), model)


def test_folder_errors_name_the_file(tmp_path):
    model = parse_model(IMAGE_MODEL)
    np.save(tmp_path / "x_0.npy", np.zeros((3, 8, 8), np.float32))
    np.save(tmp_path / "x_1.npy", np.zeros((3, 8, 7), np.float32))
    with pytest.raises(CalibrationError, match=exactly(
            f"{tmp_path / 'x_1.npy'}: input 'x' dim 3 is 7, the model expects 8 (input shape "
            "['N',3,8,8])")):
        load_calibration(str(tmp_path), model)


def test_folder_sample_shapes_must_agree_for_symbolic_dims(tmp_path):
    model = parse_model("""<ir_version: 8, opset_import: ["" : 17]>
        g (float[N,T] x) => (float[N,T] y) { y = Relu(x) }""")
    np.save(tmp_path / "x_0.npy", np.zeros(5, np.float32))
    np.save(tmp_path / "x_1.npy", np.zeros(5, np.float32))
    assert load_calibration(str(tmp_path), model).arrays["x"].shape == (2, 5)
    np.save(tmp_path / "x_2.npy", np.zeros(6, np.float32))
    with pytest.raises(CalibrationError, match=exactly(
            f"{tmp_path / 'x_2.npy'}: input 'x' dim 1 ('T') is 6, but another input has "
            "'T' = 5")):
        load_calibration(str(tmp_path), model)


def test_folder_missing_input_names_the_folder(tmp_path):
    np.save(tmp_path / "a_0.npy", np.zeros(4, np.float32))
    with pytest.raises(CalibrationError, match=exactly(
            f"{tmp_path}: missing input 'ids' (model inputs: 'a', 'ids')")):
        load_calibration(str(tmp_path), parse_model(TWO_INPUTS))


def test_npz_folder_per_sample_files_and_unnamed_arrays(tmp_path):
    model = parse_model(TWO_INPUTS)
    for i in range(3):
        np.savez(tmp_path / f"s{i}.npz", a=np.full(4, i, np.float32), ids=np.full(2, i))
    data = load_calibration(str(tmp_path), model)
    np.testing.assert_array_equal(data.arrays["ids"][:, 0], [0, 1, 2])
    np.savez(tmp_path / "s3.npz", a=np.zeros(4, np.float32), idz=np.zeros(2))
    with pytest.raises(CalibrationError, match=exactly(
            f"{tmp_path / 's3.npz'}: unknown input 'idz' (model inputs: 'a', 'ids')")):
        load_calibration(str(tmp_path), model)
    single = tmp_path / "single"
    single.mkdir()
    np.savez(single / "one.npz", np.ones((3, 8, 8), np.float32))  # key 'arr_0'
    assert load_calibration(str(single), parse_model(IMAGE_MODEL)).num_samples == 1


def test_pb_test_data_sets_of_onnx(tmp_path):
    folder = os.path.join(ONNX_TEST_DATA, "simple", "test_single_relu_model")
    model = ir.load(os.path.join(folder, "model.onnx"))
    data = load_calibration(folder, model)  # model.onnx skipped, test_data_set_0/ read
    expected = numpy_helper.to_array(onnx.load_tensor(
        os.path.join(folder, "test_data_set_0", "input_0.pb")))
    np.testing.assert_array_equal(data.arrays["x"], expected)
    out = run_ort(ir.to_proto(model), next(data.batches()))
    reference = numpy_helper.to_array(onnx.load_tensor(
        os.path.join(folder, "test_data_set_0", "output_0.pb")))
    np.testing.assert_array_equal(out[0], reference)


def test_pb_files_by_tensor_name_or_index(tmp_path):
    model = parse_model(TWO_INPUTS)
    for k in range(2):
        d = tmp_path / f"test_data_set_{k}"
        d.mkdir()
        # Unnamed tensor: input_0 -> model input 0 ('a'). Named tensor: its name wins over
        # the file's index (input_0 here names the second input).
        onnx.save_tensor(numpy_helper.from_array(np.full((1, 4), k, np.float32), ""),
                         str(d / "input_1.pb"))
        onnx.save_tensor(numpy_helper.from_array(np.full((1, 2), k, np.int64), "ids"),
                         str(d / "input_0.pb"))
        onnx.save_tensor(numpy_helper.from_array(np.zeros(3, np.float32), "y"),
                         str(d / "output_0.pb"))  # expected outputs are skipped
    with pytest.raises(CalibrationError, match=exactly(
            f"{tmp_path / 'test_data_set_0' / 'input_1.pb'}: input 'ids' expects int64, got "
            "float32 (no safe cast)")):
        load_calibration(str(tmp_path), model)  # input_1 -> 'ids' by index: wrong data
    for k in range(2):
        d = tmp_path / f"test_data_set_{k}"
        os.rename(d / "input_0.pb", d / "input_9.pb")
        os.rename(d / "input_1.pb", d / "input_0.pb")
    data = load_calibration(str(tmp_path), model)
    np.testing.assert_array_equal(data.arrays["a"], [[0] * 4, [1] * 4])
    np.testing.assert_array_equal(data.arrays["ids"], [[0, 0], [1, 1]])
    onnx.save_tensor(numpy_helper.from_array(np.zeros((1, 4), np.float32), ""),
                     str(tmp_path / "input_2.pb"))
    with pytest.raises(CalibrationError, match=exactly(
            f"{tmp_path / 'input_2.pb'}: cannot tell which input this tensor is for (tensor "
            "name '', model inputs: 'a', 'ids')")):
        load_calibration(str(tmp_path), model)


def test_pb_with_external_data_is_refused(tmp_path):
    tensor = numpy_helper.from_array(np.zeros((1, 2), np.float32), "x")
    tensor.ClearField("raw_data")
    tensor.data_location = onnx.TensorProto.EXTERNAL
    tensor.external_data.add(key="location", value="/etc/passwd")
    (tmp_path / "input_0.pb").write_bytes(tensor.SerializeToString())
    folder = os.path.join(ONNX_TEST_DATA, "simple", "test_single_relu_model")
    with pytest.raises(CalibrationError, match=exactly(
            f"{tmp_path / 'input_0.pb'}: cannot read calibration file (external tensor data "
            "is not supported)")):
        load_calibration(str(tmp_path), ir.load(os.path.join(folder, "model.onnx")))


def test_optional_input_with_default_may_be_overridden(tmp_path):
    model = parse_model(WITH_DEFAULT)
    assert [v.name for v in model.graph.inputs if v.is_initializer()] == ["bias"]
    np.savez(tmp_path / "x.npz", x=np.ones((3, 2), np.float32))
    assert load_calibration(str(tmp_path / "x.npz"), model).input_names == ["x"]
    np.savez(tmp_path / "xb.npz", x=np.ones((3, 2), np.float32),
             bias=np.ones((3, 2), np.float32))
    assert load_calibration(str(tmp_path / "xb.npz"), model).input_names == ["x", "bias"]


# -- batching ---------------------------------------------------------------------------------
def test_static_batch_takes_whole_batches(tmp_path):
    model = parse_model(STATIC_BATCH)
    np.savez(tmp_path / "c.npz", x=rng_floats((6, 4)))
    data = load_calibration(str(tmp_path / "c.npz"), model)
    assert data.fixed_batch == 2
    assert [b["x"].shape for b in data.batches(5)] == [(2, 4)] * 3
    assert data.subset(5).num_samples == 4 and data.subset(1).num_samples == 2
    np.savez(tmp_path / "odd.npz", x=rng_floats((5, 4)))
    with pytest.raises(CalibrationError, match=exactly(
            f"{tmp_path / 'odd.npz'}: 5 samples of input 'x' is not a multiple of its static "
            "batch size 2")):
        load_calibration(str(tmp_path / "odd.npz"), model)


def test_stacked_samples_are_fed_without_sample_axis(tmp_path):
    model = parse_model(SCALAR)
    np.savez(tmp_path / "c.npz", x=np.array([1.0, -2.0, 3.0], np.float32))
    data = load_calibration(str(tmp_path / "c.npz"), model)
    assert data.unbatched == {"x"} and data.fixed_batch == 1
    feeds = list(data.batches(8))
    assert [f["x"].shape for f in feeds] == [(), (), ()]
    assert [run_ort(ir.to_proto(model), f)[0].item() for f in feeds] == [1.0, 0.0, 3.0]
    np.savez(tmp_path / "bad.npz", x=np.float32(1.0))
    with pytest.raises(CalibrationError, match=exactly(
            f"{tmp_path / 'bad.npz'}: input 'x' has shape [], got an array of shape [] "
            "(expected rank 1 (the sample axis))")):
        load_calibration(str(tmp_path / "bad.npz"), model)


def test_scalar_samples_one_per_file(tmp_path):
    for i in range(3):
        np.save(tmp_path / f"x_{i}.npy", np.float32(i))  # 0-d: one sample of a scalar input
    data = load_calibration(str(tmp_path), parse_model(SCALAR))
    assert data.unbatched == {"x"}
    assert [f["x"].item() for f in data.batches()] == [0.0, 1.0, 2.0]


def test_inputs_disagreeing_on_samples_per_run():
    model = parse_model("""<ir_version: 8, opset_import: ["" : 17]>
        g (float[2,3] a, float[3] b) => (float[2,3] y) { y = Add(a, b) }""")
    with pytest.raises(CalibrationError, match=exactly(
            "<arrays>: inputs need different numbers of samples per run ('a': 2, 'b': 1)")):
        CalibrationData.for_model({"a": np.zeros((4, 3)), "b": np.zeros((4, 3))}, model)


def test_direct_construction_checks_counts():
    data = CalibrationData({"x": np.zeros((3, 2))})
    assert data.num_samples == 3 and data.fixed_batch is None
    with pytest.raises(CalibrationError, match=exactly(
            "<arrays>: inputs have different sample counts ('x': 3, 'y': 2)")):
        CalibrationData({"x": np.zeros((3, 2)), "y": np.zeros((2, 2))})
    with pytest.raises(CalibrationError, match=exactly("<arrays>: no inputs in the "
                                                        "calibration data")):
        CalibrationData({})
    with pytest.raises(ValueError, match="batch_size must be at least 1, not 0"):
        list(data.batches(0))


# -- random -----------------------------------------------------------------------------------
def test_random_is_seeded_loud_and_shaped(caplog):
    model = parse_model(TWO_INPUTS)
    with caplog.at_level(logging.WARNING, logger="edgeopt.passes.calib"):
        data = load_calibration("random", model, num_samples=5, seed=3)
    assert data.synthetic and data.source == "random"
    assert data.arrays["a"].shape == (5, 4) and data.arrays["a"].dtype == np.float32
    assert data.arrays["ids"].dtype == np.int64
    assert data.arrays["ids"].min() >= 0 and data.arrays["ids"].max() < 10
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "RANDOM" in warnings[0].getMessage()
    assert "5 synthetic samples" in warnings[0].getMessage()
    again = random_calibration(model, 5, seed=3)
    np.testing.assert_array_equal(again.arrays["a"], data.arrays["a"])
    other = random_calibration(model, 5, seed=4)
    assert not np.array_equal(other.arrays["a"], data.arrays["a"])


def test_random_default_count_symbolic_dims_and_static_batch():
    model = parse_model("""<ir_version: 8, opset_import: ["" : 17]>
        g (float[N,C,H] x) => (float[N,C,H] y) { y = Relu(x) }""")
    data = load_calibration("random", model, dim_values={"C": 3, "H": 5})
    assert data.arrays["x"].shape == (8, 3, 5)
    # A full input shape wins; its batch axis is replaced by the samples.
    data = load_calibration("random:4", model, input_shapes={"x": (1, 2, 7)})
    assert data.arrays["x"].shape == (4, 2, 7)
    assert data.run_shapes() == {"x": (1, 2, 7)}
    assert load_calibration("random:3", parse_model(STATIC_BATCH)).arrays["x"].shape == (4, 4)
    assert load_calibration("random:3", parse_model(SCALAR)).arrays["x"].shape == (3,)
    with pytest.raises(CalibrationError, match=exactly(
            "random:x: expected random or random:N with N a number")):
        load_calibration("random:x", parse_model(SCALAR))


def test_random_refuses_to_guess_dims_besides_the_batch():
    """A 1 x 1 'image' would calibrate on nothing like the real inputs: say what to give."""
    model = parse_model("""<ir_version: 8, opset_import: ["" : 17]>
        g (float[N,3,H,W] x) => (float[N,3,H,W] y) { y = Relu(x) }""")
    with pytest.raises(CalibrationError, match=exactly(
            "random: input 'x' ['N',3,'H','W'] has symbolic dims besides the batch, and random "
            "samples need their sizes: give the shape to run at, e.g. --input-shape x:1x3xD2xD3 "
            "(D2, D3: the sizes of your real inputs)")):
        load_calibration("random", model)
    with pytest.raises(CalibrationError, match=exactly(
            "input shape x:1x4x8x8 does not fit the input's ['N',3,'H','W']")):
        load_calibration("random", model, input_shapes={"x": (1, 4, 8, 8)})
    data = load_calibration("random:2", model, input_shapes={"x": (1, 3, 8, 6)})
    assert data.arrays["x"].shape == (2, 3, 8, 6)


def test_random_needs_known_shapes():
    model = parse_model("""<ir_version: 8, opset_import: ["" : 17]>
        g (float x) => (float y) { y = Relu(x) }""")
    model.graph.inputs[0].shape = None
    with pytest.raises(CalibrationError, match=exactly(
            "random: cannot synthesize input 'x': its shape is unknown")):
        random_calibration(model)


# -- preprocess and images --------------------------------------------------------------------
def test_parse_preprocess_grammar():
    pre = parse_preprocess("resize=32x32,layout=nchw,mean=0.485|0.456|0.406,"
                           "std=0.229|0.224|0.225,scale=255,grayscale=false")
    assert pre == Preprocess(resize=(32, 32), layout="nchw", mean=(0.485, 0.456, 0.406),
                             std=(0.229, 0.224, 0.225), scale=255.0, grayscale=False)
    assert parse_preprocess(None) == Preprocess() == parse_preprocess("")
    assert parse_preprocess("resize=24, crop=20x16, interp=NEAREST").crop == (20, 16)
    assert parse_preprocess("resize=24").resize == (24, 24)


@pytest.mark.parametrize("spec, message", [
    ("size=3", "--preprocess: unknown key 'size' (valid: crop, grayscale, interp, layout, "
               "mean, resize, scale, std)"),
    ("resize", "--preprocess: expected key=value, got 'resize'"),
    ("resize=32x", "--preprocess: resize must be HxW or S (positive integers), got '32x'"),
    ("crop=0x4", "--preprocess: crop must be HxW or S (positive integers), got '0x4'"),
    ("layout=ncwh", "--preprocess: layout must be one of nchw, nhwc, chw, hwc, nhw, hw; got "
                    "'ncwh'"),
    ("std=0.5|0", "--preprocess: std must be finite and non-zero, got '0.5|0'"),
    ("mean=a", "--preprocess: mean must be a number or numbers separated by |, got 'a'"),
    ("scale=1|2", "--preprocess: scale takes one number, got '1|2'"),
    ("grayscale=maybe", "--preprocess: grayscale must be true or false, got 'maybe'"),
    ("scale=2,scale=3", "--preprocess: 'scale' given twice"),
])
def test_parse_preprocess_errors(spec, message):
    with pytest.raises(CalibrationError, match=exactly(message)):
        parse_preprocess(spec)


def _write_images(folder, count, size=(10, 12), mode="RGB", ext=".png"):
    from PIL import Image

    rng = np.random.default_rng(7)
    pixels = []
    for i in range(count):
        shape = (size[0], size[1], 3) if mode == "RGB" else size
        arr = rng.integers(0, 256, shape, dtype=np.uint8)
        Image.fromarray(arr, mode).save(folder / f"img{i}{ext}")
        pixels.append(arr)
    return pixels


def test_images_resized_normalized_nchw(tmp_path):
    Image = pytest.importorskip("PIL.Image")
    _write_images(tmp_path, 3)
    spec = "mean=0.5|0.25|0,std=0.5|0.5|2"
    data = load_calibration(str(tmp_path), parse_model(IMAGE_MODEL), preprocess=spec)
    assert data.arrays["x"].shape == (3, 3, 8, 8) and data.arrays["x"].dtype == np.float32
    for i in range(3):
        with Image.open(tmp_path / f"img{i}.png") as img:
            px = np.asarray(img.convert("RGB").resize((8, 8), Image.Resampling.BILINEAR))
        expected = (px.astype(np.float32) / 255 - np.float32([0.5, 0.25, 0])) / \
            np.float32([0.5, 0.5, 2])
        np.testing.assert_array_equal(data.arrays["x"][i], expected.transpose(2, 0, 1))


def test_images_nhwc_uint8_model_gets_raw_pixels(tmp_path):
    pytest.importorskip("PIL")
    pixels = _write_images(tmp_path, 2, size=(4, 6), ext=".bmp")
    data = load_calibration(str(tmp_path), parse_model(UINT8_IMAGE))
    assert data.arrays["img"].dtype == np.uint8
    np.testing.assert_array_equal(data.arrays["img"], np.stack(pixels))


def test_grayscale_pgm_with_crop(tmp_path):
    pytest.importorskip("PIL")
    pixels = _write_images(tmp_path, 2, size=(7, 9), mode="L", ext=".pgm")
    data = load_calibration(str(tmp_path), parse_model(GRAY_IMAGE),
                            preprocess="resize=7x9,crop=5,scale=1")
    assert data.arrays["x"].shape == (2, 1, 5, 5)
    np.testing.assert_array_equal(data.arrays["x"][:, 0], np.stack(pixels)[:, 1:6, 2:7])


def test_image_preprocess_mismatches(tmp_path):
    pytest.importorskip("PIL")
    _write_images(tmp_path, 1)
    img = tmp_path / "img0.png"
    with pytest.raises(CalibrationError, match=exactly(
            f"{img}: --preprocess mean has 2 values for 3 channel(s) of input 'x'")):
        load_calibration(str(tmp_path), parse_model(IMAGE_MODEL), preprocess="mean=1|2")
    with pytest.raises(CalibrationError, match=exactly(
            f"{img}: --preprocess layout=hwc has 3 axes, but input 'x' has shape "
            "['N',3,8,8]")):
        load_calibration(str(tmp_path), parse_model(IMAGE_MODEL), preprocess="layout=hwc")
    with pytest.raises(CalibrationError, match=exactly(
            f"{img}: input 'x' dim 2 is 10, the model expects 8 (input shape ['N',3,8,8])")):
        load_calibration(str(tmp_path), parse_model(IMAGE_MODEL), preprocess="resize=10x8")
    with pytest.raises(CalibrationError, match=exactly(
            f"{img}: --preprocess crop=9x9 is larger than the image (8x8 after resizing)")):
        load_calibration(str(tmp_path), parse_model(IMAGE_MODEL), preprocess="crop=9")


def test_corrupt_image(tmp_path):
    pytest.importorskip("PIL")
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    with pytest.raises(CalibrationError, match="^" + re.escape(
            f"{tmp_path / 'bad.jpg'}: cannot read calibration file (")):
        load_calibration(str(tmp_path), parse_model(IMAGE_MODEL))


def test_images_without_pillow(tmp_path, monkeypatch):
    (tmp_path / "img0.png").write_bytes(b"not read anyway")
    monkeypatch.setitem(sys.modules, "PIL", None)  # makes `import PIL` fail
    with pytest.raises(CalibrationError, match=exactly(
            f"{tmp_path / 'img0.png'}: reading images needs Pillow: pip install pillow")):
        load_calibration(str(tmp_path), parse_model(IMAGE_MODEL))


def test_preprocess_without_images_warns(tmp_path, caplog):
    np.save(tmp_path / "x.npy", np.zeros((1, 3, 8, 8), np.float32))
    with caplog.at_level(logging.WARNING, logger="edgeopt.passes.calib"):
        load_calibration(str(tmp_path), parse_model(IMAGE_MODEL), preprocess="resize=8")
    assert [r.getMessage() for r in caplog.records] == [
        f"--preprocess ignored: {tmp_path} holds no images"]
