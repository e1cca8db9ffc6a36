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


def build_model(text: str, weights: dict[str, np.ndarray], keep_inputs: bool = False) -> ir.Model:
    """Parse ``text`` and turn the graph inputs named in ``weights`` into initializers.

    ``keep_inputs`` leaves them listed as graph inputs too (the IR < 4 convention, or a
    default value the caller may override for IR >= 4).
    """
    model = parse_model(text)
    graph = model.graph
    for name, arr in weights.items():
        value = next(v for v in graph.inputs if v.name == name)
        if not keep_inputs:
            graph.inputs.remove(value)
        value.const_value = ir.ArrayTensor(arr)
        graph.initializers.add(value)
    return model


#: A Scan whose body reads an outer value (shared by the mutator and clone tests).
SCAN_CAPTURE = """<ir_version: 9, opset_import: ["" : 17]>
g (float[2] init, float[3,2] xs) => (float[2] last, float[3,2] ys) {
  w = Relu(init)
  last, ys = Scan(init, xs) <num_scan_inputs = 1,
      body = body (float[2] s_in, float[2] x_i) => (float[2] s_out, float[2] y_i) {
    s_out = Add(s_in, x_i)
    y_i = Mul(s_out, w)
  }>
}"""


@pytest.fixture
def tmp_model_dir(tmp_path):
    """A fresh folder for written models."""
    return tmp_path


__all__ = ["ONNX_TEST_DATA", "SCAN_CAPTURE", "build_model", "edgeopt", "parse_model",
           "random_inputs", "run_ort"]
