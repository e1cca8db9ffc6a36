"""proto_skeleton: large constants without their data, and put back by from_proto(tensors=)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import run_ort
from onnx import helper, numpy_helper

from edgeopt import ir
from edgeopt.ir import ModelLoadError, proto_skeleton
from edgeopt.ir._skeleton import STUB_BYTES
from edgeopt.passes.quant import _ensure_opset

RNG = np.random.default_rng(0)


def _model(ir_version: int = 3, opset: int = 9) -> onnx.ModelProto:
    """Conv (initializer weight) -> Conv (Constant-node weight) -> Reshape (small shape)."""
    w1 = RNG.standard_normal((8, 4, 3, 3)).astype(np.float32)  # 1152 bytes: stripped
    w2 = RNG.standard_normal((8, 8, 1, 1)).astype(np.float32)  # 256 bytes: kept
    w3 = RNG.standard_normal((8, 8, 3, 3)).astype(np.float32)  # Constant node: stripped
    nodes = [
        helper.make_node("Constant", [], ["w3"], value=numpy_helper.from_array(w3, "")),
        helper.make_node("Conv", ["x", "w1"], ["a"], pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["a", "w2"], ["b"]),
        helper.make_node("Conv", ["b", "w3"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Reshape", ["c", "shape"], ["y"]),
    ]
    inits = [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2"),
             numpy_helper.from_array(np.array([1, -1], np.int64), "shape")]
    inputs = [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 4, 6, 6])]
    if ir_version < 4:  # initializers must be graph inputs
        inputs += [helper.make_tensor_value_info(t.name, t.data_type, t.dims) for t in inits]
    graph = helper.make_graph(nodes, "g", inputs,
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)],
                              inits, doc_string="the graph's own words")
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)],
                             ir_version=ir_version)


def test_large_initializers_and_constants_lose_their_data_only():
    proto = _model()
    skel, stripped = proto_skeleton(proto)
    assert stripped == {"w1", "w3"}
    inits = {t.name: t for t in skel.graph.initializer}
    assert not inits["w1"].raw_data and list(inits["w1"].dims) == [8, 4, 3, 3]
    assert inits["w2"] == next(t for t in proto.graph.initializer if t.name == "w2")
    assert numpy_helper.to_array(inits["shape"]).tolist() == [1, -1]
    const = skel.graph.node[0].attribute[0].t
    assert not const.raw_data and list(const.dims) == [8, 8, 3, 3]
    assert skel.graph.doc_string == "the graph's own words"
    assert len(skel.SerializeToString()) < STUB_BYTES + 1000 < len(proto.SerializeToString())


@pytest.mark.parametrize("ir_version", [3, 8])  # 3: initializers come back as Constant nodes
def test_opset_upgrade_puts_every_weight_back_without_a_copy(ir_version):
    proto = _model(ir_version)
    x = RNG.standard_normal((1, 4, 6, 6)).astype(np.float32)
    want = run_ort(proto, {"x": x})[0]
    model = ir.from_proto(proto)
    before = {n: v.const_value for n, v in model.graph.initializers.items()}
    assert _ensure_opset(model) == 9 and model.opset_imports[""] == 13
    after = {n: v.const_value for n, v in model.graph.initializers.items()}
    assert after.keys() == before.keys()
    for name in ("w1", "w3"):  # the stripped ones are the very same tensors
        assert after[name] is before[name]
    assert model.graph.doc_string == "the graph's own words"
    np.testing.assert_allclose(run_ort(ir.to_proto(model), {"x": x})[0], want, rtol=1e-5,
                               atol=1e-4)  # float rounding of other kernels


def test_a_supplied_tensor_must_match_its_stub():
    skel, _ = proto_skeleton(_model(8))
    wrong = ir.ArrayTensor(np.zeros((8, 4, 3, 2), np.float32))
    with pytest.raises(ModelLoadError, match=r"^<model>: initializer 'w1': the supplied tensor "
                       r"is FLOAT\[8, 4, 3, 2\], the stub FLOAT\[8, 4, 3, 3\]$"):
        ir.from_proto(skel, tensors={"w1": wrong})
