"""Guards for the bundled example models in examples/digits (written by tools/train_digits.py).

The tests use only the committed files: each model must still load in ONNX Runtime and in
edgeopt, keep the interface the README promises, and reproduce exactly the test-split
predictions recorded in ``accuracy.json`` when the training script wrote it.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import run_ort

import edgeopt
from edgeopt import ir

DIGITS = Path(__file__).resolve().parents[1] / "examples" / "digits"
MODELS = ("cnn", "resnet", "mobilenetv2", "mlp")
CONV_MODELS = ("cnn", "resnet", "mobilenetv2")
MEAN, STD = 0.305, 0.319  # tools/train_digits.py and examples/digits/README.md
MIN_ACCURACY = 0.95


@pytest.fixture(scope="module")
def record() -> dict:
    """The parsed ``accuracy.json``."""
    return json.loads((DIGITS / "accuracy.json").read_text())


@pytest.fixture(scope="module")
def data() -> dict[str, np.ndarray]:
    """The arrays of ``digits_16x16.npz``."""
    with np.load(DIGITS / "digits_16x16.npz") as npz:
        return {k: npz[k] for k in npz.files}


def _predictions(logits: np.ndarray) -> str:
    return "".join(str(int(p)) for p in logits.argmax(axis=1))


def test_data_arrays(data: dict[str, np.ndarray], record: dict) -> None:
    env = record["environment"]
    assert sorted(data) == ["calib_x", "calib_y", "test_x", "test_y"]
    assert data["calib_x"].shape == (256, 1, 16, 16) and data["calib_x"].dtype == np.float32
    assert data["calib_y"].shape == (256,) and data["calib_y"].dtype == np.int64
    n = data["test_y"].shape[0]
    assert n == env["n_test"] == 360
    assert data["test_x"].shape == (n, 1, 16, 16) and data["test_x"].dtype == np.float32
    assert data["test_y"].dtype == np.int64
    # Every class is present, and the pixels are [0, 1] values normalized with MEAN/STD.
    assert set(np.unique(data["test_y"]).tolist()) == set(range(10))
    for x in (data["calib_x"], data["test_x"]):
        assert np.isfinite(x).all()
        assert x.min() == pytest.approx((0 - MEAN) / STD, abs=1e-6)
        assert x.max() == pytest.approx((1 - MEAN) / STD, abs=1e-6)
    assert (env["mean"], env["std"]) == (MEAN, STD)
    # Calibration images come from the training split, so none is a test image.
    test_rows = {row.tobytes() for row in data["test_x"]}
    assert not any(row.tobytes() in test_rows for row in data["calib_x"])


def test_calib_npz_matches(data: dict[str, np.ndarray]) -> None:
    with np.load(DIGITS / "calib.npz") as npz:
        assert npz.files == ["input"]
        calib = npz["input"]
    assert calib.dtype == np.float32
    np.testing.assert_array_equal(calib, data["calib_x"])


def test_folder_is_small() -> None:
    sizes = {p.name: p.stat().st_size for p in DIGITS.iterdir()}
    assert sizes["digits_16x16.npz"] + sizes["calib.npz"] < 1 << 20
    for name in MODELS:
        assert sizes[f"{name}.onnx"] < 1 << 20


def _dims(value_info: onnx.ValueInfoProto) -> list[int | str]:
    dims = value_info.type.tensor_type.shape.dim
    return [d.dim_param if d.HasField("dim_param") else d.dim_value for d in dims]


@pytest.mark.parametrize("name", MODELS)
def test_model_file_interface(name: str, record: dict) -> None:
    path = DIGITS / f"{name}.onnx"
    entry = record["models"][name]
    assert hashlib.sha256(path.read_bytes()).hexdigest() == entry["sha256"]
    proto = onnx.load(str(path), load_external_data=False)
    onnx.checker.check_model(proto, full_check=True)
    assert {o.domain: o.version for o in proto.opset_import} == {"": 17}
    graph = proto.graph
    assert [i.name for i in graph.input] == ["input"]
    assert _dims(graph.input[0]) == ["N", 1, 16, 16]
    assert graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert [o.name for o in graph.output] == ["logits"]
    assert _dims(graph.output[0]) == ["N", 10]
    assert all(t.data_location == onnx.TensorProto.DEFAULT for t in graph.initializer)
    ops = Counter(n.op_type for n in graph.node)
    assert dict(ops) == entry["ops"]
    assert "Identity" not in ops
    assert sum(int(np.prod(t.dims)) for t in graph.initializer) == entry["initializer_elements"]


@pytest.mark.parametrize("name", CONV_MODELS)
def test_batchnorm_left_unfolded(name: str) -> None:
    model = edgeopt.load(DIGITS / f"{name}.onnx")
    nodes = list(model.graph.walk())
    bns = [n for n in nodes if n.op_type == "BatchNormalization"]
    assert len(bns) == sum(n.op_type == "Conv" for n in nodes)
    for bn in bns:
        assert bn.inputs[0].producer().op_type == "Conv"
        # scale, bias, mean and variance are weights the fold-bn pass can read.
        assert all(v.is_initializer() and v.const_value is not None for v in bn.inputs[1:])
        assert bn.attr("training_mode", 0) == 0


@pytest.mark.parametrize("name", MODELS)
def test_ort_reproduces_recorded_accuracy(
        name: str, record: dict, data: dict[str, np.ndarray]) -> None:
    entry = record["models"][name]
    (logits,) = run_ort(str(DIGITS / f"{name}.onnx"), {"input": data["test_x"]})
    assert logits.shape == (entry["n_test"], 10)
    assert _predictions(logits) == entry["predictions"]
    correct = int((logits.argmax(axis=1) == data["test_y"]).sum())
    assert correct == entry["correct"]
    assert correct / entry["n_test"] == pytest.approx(entry["test_accuracy"], abs=1e-6)
    assert entry["test_accuracy"] >= MIN_ACCURACY


@pytest.mark.parametrize("name", MODELS)
def test_edgeopt_round_trip_keeps_predictions(
        name: str, record: dict, data: dict[str, np.ndarray], tmp_path: Path) -> None:
    path = DIGITS / f"{name}.onnx"
    model = edgeopt.load(path)
    edgeopt.verify(model, level="onnx")
    assert model.graph.inputs[0].shape == ("N", 1, 16, 16)
    assert model.graph.outputs[0].shape == ("N", 10)
    (expected,) = run_ort(str(path), {"input": data["test_x"]})
    (in_memory,) = run_ort(ir.to_proto(model), {"input": data["test_x"]})
    out = tmp_path / f"{name}.onnx"
    edgeopt.save(model, out)
    (saved,) = run_ort(str(out), {"input": data["test_x"]})
    for logits in (in_memory, saved):
        # The round trip is lossless, so ONNX Runtime computes the very same logits.
        np.testing.assert_array_equal(logits, expected)
        assert _predictions(logits) == record["models"][name]["predictions"]


@pytest.mark.parametrize("name", MODELS)
def test_batch_dimension_is_free(name: str, data: dict[str, np.ndarray]) -> None:
    path = str(DIGITS / f"{name}.onnx")
    (full,) = run_ort(path, {"input": data["test_x"][:8]})
    (one,) = run_ort(path, {"input": data["test_x"][3:4]})
    assert full.shape == (8, 10) and one.shape == (1, 10)
    np.testing.assert_allclose(one[0], full[3], rtol=0, atol=1e-5)
