"""Shared test fixtures: ONNX-text models, seeded reference runs, ORT runs."""

from __future__ import annotations

import os

import numpy as np
import onnx
import onnx.parser
import pytest

import edgeopt
from edgeopt import ir

ONNX_TEST_DATA = os.path.join(os.path.dirname(onnx.__file__), "backend", "test", "data")


def parse_model(text: str) -> ir.Model:
    """A model from ONNX text syntax (``onnx.parser``), imported into the IR."""
    proto = onnx.parser.parse_model(text)
    return ir.from_proto(proto)


def random_inputs(proto: onnx.ModelProto, seed: int = 0) -> dict[str, np.ndarray]:
    """Seeded inputs for every non-initializer graph input with a static shape."""
    rng = np.random.default_rng(seed)
    inits = {t.name for t in proto.graph.initializer}
    feeds = {}
    for vi in proto.graph.input:
        if vi.name in inits:
            continue
        tt = vi.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") else 1 for d in tt.shape.dim]
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type)
        if np.issubdtype(dtype, np.floating):
            feeds[vi.name] = rng.standard_normal(shape).astype(dtype)
        elif dtype == np.bool_:
            feeds[vi.name] = rng.integers(0, 2, shape).astype(np.bool_)
        else:
            feeds[vi.name] = rng.integers(0, 10, shape).astype(dtype)
    return feeds


def run_ort(model: onnx.ModelProto | str, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Run a model (proto or path) in ONNX Runtime on CPU."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = 1
    src = model if isinstance(model, str) else model.SerializeToString()
    sess = ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


@pytest.fixture
def tmp_model_dir(tmp_path):
    """A fresh folder for written models."""
    return tmp_path


__all__ = ["ONNX_TEST_DATA", "edgeopt", "parse_model", "random_inputs", "run_ort"]
