"""unfix_batch: a batch-1 model made to take any batch, or refused with the reason."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.parser
import pytest
from conftest import run_ort
from models import BUILDERS

from edgeopt.passes._batch import BATCH, unfix_batch

HEADER = '<ir_version: 8, opset_import: ["" : 17, "com.example" : 1]>\n'


def _unfix(proto: onnx.ModelProto) -> str:
    inits = {t.name for t in proto.graph.initializer}
    return unfix_batch(proto, [v.name for v in proto.graph.input if v.name not in inits])


@pytest.mark.parametrize("name", sorted(set(BUILDERS) - {"mlp"}))  # mlp: static batch 2
def test_each_sample_of_a_batch_runs_as_the_batch_one_model(name):
    # Flatten -> Gemm, residual adds, depthwise convs, SE's broadcast Mul, Concat on
    # channels, MatMul layers, and ShuffleNet's Reshape-Transpose-Reshape channel shuffle
    # (two constant Reshape shapes that start with the batch).
    proto = BUILDERS[name]()
    x = np.random.default_rng(0).standard_normal(
        (3, *[d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim[1:]]),
        dtype=np.float32)
    want = np.concatenate([run_ort(proto, {"x": x[i:i + 1]})[0] for i in range(3)])
    batched = onnx.ModelProto()
    batched.CopyFrom(proto)
    assert _unfix(batched) == ""
    assert batched.graph.input[0].type.tensor_type.shape.dim[0].dim_param == BATCH
    got = run_ort(batched, {"x": x})[0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_reshape_to_the_batch_dim_becomes_a_copy_of_it():
    proto = BUILDERS["shuffle"]()
    assert _unfix(proto) == ""
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in proto.graph.initializer}
    shapes = [inits[n.input[1]].tolist() for n in proto.graph.node if n.op_type == "Reshape"]
    assert shapes == [[0, 2, 8, 8, 8], [0, 16, 8, 8]]


def _graph(body: str, x: str = "float[1,4] x", out: str = "float y") -> onnx.ModelProto:
    return onnx.parser.parse_model(HEADER + f"g ({x}) => ({out}) {{\n{body}\n}}")


REFUSED = {
    "softmax over the batch": (
        "y = Softmax <axis = 0> (x)", "Softmax 'y' may normalize over the batch axis"),
    "softmax of a vector": (
        "v = Flatten <axis = 0> (x)\n  f = Squeeze(v)\n  y = Softmax(f)",
        "value 'v' of Flatten 'v' does not keep the batch dim"),
    "transpose of the batch": (
        "y = Transpose <perm = [1, 0]> (x)", "value 'y' of Transpose 'y' does not keep the "
        "batch dim"),
    "reduction over the batch": (
        "y = ReduceSum <keepdims = 1> (x)", "value 'y' of ReduceSum 'y' does not keep the "
        "batch dim"),
    "reshape folding the batch": (
        "s = Constant <value = int64[1] {-1}> ()\n  y = Reshape(x, s)",
        "value 'y' of Reshape 'y' does not keep the batch dim"),
    "reshape with allowzero": (
        "s = Constant <value = int64[2] {1, 4}> ()\n  y = Reshape <allowzero = 1> (x, s)",
        "Reshape 'y' has allowzero=1"),
    "cumulative sum": (
        "a = Constant <value = int64 {1}> ()\n  y = CumSum(x, a)",
        "CumSum 'y' may accumulate over the batch axis"),
    "custom operator": (
        "y = com.example.Thing(x)", "Thing 'y' is of domain 'com.example'"),
    "weight from the samples": (
        "w = Reshape(x, s)\n  y = Conv(x4, w)",
        "Conv 'y' combines two values computed from the samples"),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_what_could_mix_samples_is_refused_with_the_reason(case):
    body, reason = REFUSED[case]
    if case == "weight from the samples":
        proto = onnx.parser.parse_model(
            HEADER + "g (float[1,4] x, float[1,1,2,2] x4) => (float y) {\n"
            "  s = Constant <value = int64[4] {1, 1, 2, 2}> ()\n" + body + "\n}")
    else:
        proto = _graph(body)
    assert _unfix(proto) == reason


def test_an_input_without_a_batch_of_one_is_refused():
    assert _unfix(_graph("y = Relu(x)", x="float[2,4] x")) == "input 'x' has no batch dim of 1"
    assert _unfix(_graph("y = Relu(x)", x="float x")) == "input 'x' has no batch dim of 1"
    assert _unfix(BUILDERS["mlp"]()) == "input 'x' has no batch dim of 1"  # [2, 1, 8, 8]


def test_a_subgraph_is_refused():
    proto = onnx.parser.parse_model(HEADER + """g (float[1,4] x, bool c) => (float y) {
  y = If(c) <then_branch = t () => (float a) { a = Relu(x) },
             else_branch = e () => (float b) { b = Neg(x) }>
}""")
    assert _unfix(proto) == "If 'y' has a subgraph"


def test_shape_outputs_are_not_samples():
    proto = _graph("y = Relu(x)\n  z = Shape(x)\n  k = Size(x)",
                   out="float y, int64[2] z, int64 k")
    assert _unfix(proto) == ""
    x = np.arange(-6, 6, dtype=np.float32).reshape(3, 4)
    y, z, k = run_ort(proto, {"x": x})
    np.testing.assert_array_equal(y, np.maximum(x, 0))
    assert z.tolist() == [3, 4] and k == 12


def test_a_shape_computed_at_run_time_follows_the_batch():
    # Shape -> Gather -> Unsqueeze -> Concat -> Reshape (a dynamic flatten): ONNX inference
    # with data propagation sees that the Reshape keeps the batch.
    proto = _graph("""t = Shape(x)
  i = Constant <value = int64 {0}> ()
  n = Gather(t, i)
  m = Constant <value = int64[1] {-1}> ()
  n1 = Unsqueeze(n, i)
  s = Concat <axis = 0> (n1, m)
  y = Reshape(x, s)""", x="float[1,2,2] x")
    assert _unfix(proto) == ""
    x = np.arange(12, dtype=np.float32).reshape(3, 2, 2)
    np.testing.assert_array_equal(run_ort(proto, {"x": x})[0], x.reshape(3, 4))


def test_a_reshape_to_the_shape_of_a_sample_value_keeps_the_batch():
    # What the version converter writes for an opset < 13 Softmax: inference cannot give the
    # Reshape a shape, but it is the shape of x, whose batch dim is known.
    proto = _graph("""s = Shape(x)
  f = Flatten(x)
  m = Softmax(f)
  y = Reshape(m, s)""", x="float[1,3,2] x")
    assert _unfix(proto) == ""
    x = np.random.default_rng(0).standard_normal((4, 3, 2)).astype(np.float32)
    want = np.concatenate([run_ort(_graph("""s = Shape(x)
  f = Flatten(x)
  m = Softmax(f)
  y = Reshape(m, s)""", x="float[1,3,2] x"), {"x": x[i:i + 1]})[0] for i in range(4)])
    np.testing.assert_allclose(run_ort(proto, {"x": x})[0], want, rtol=1e-6)
