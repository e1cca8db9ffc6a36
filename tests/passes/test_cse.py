"""cse: duplicate constants and nodes are merged; outputs stay bit-identical."""

from __future__ import annotations

import numpy as np
from conftest import random_inputs, run_ort
from onnx import TensorProto, helper

from edgeopt import ir
from edgeopt.passes import PassManager


def _model(nodes, inits=(), outputs=("y",), inputs=(("x", [1, 3, 4, 4]),), opset=17):
    ins = [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs]
    outs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in outputs]
    graph = helper.make_graph(nodes, "g", ins, outs, list(inits))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _w(name, value=0.5, shape=(3, 3, 1, 1)):
    return helper.make_tensor(name, TensorProto.FLOAT, shape, np.full(shape, value, np.float32))


def _run(proto, spec="cse"):
    model = ir.from_proto(proto)
    result = PassManager(spec, verify="each").run(model)
    return model, result


def _check_numerics(before, model):
    feeds = random_inputs(before, seed=0)
    want = run_ort(before, feeds)
    got = run_ort(ir.to_proto(model), feeds)
    for a, b in zip(want, got, strict=True):
        assert np.array_equal(a, b)


def test_duplicate_convs_on_identical_weights_merge_with_their_chain():
    proto = _model([
        helper.make_node("Conv", ["x", "w1"], ["c1"]), helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["x", "w2"], ["c2"]), helper.make_node("Relu", ["c2"], ["r2"]),
        helper.make_node("Add", ["r1", "r2"], ["y"])], [_w("w1"), _w("w2")])
    model, report = _run(proto, "cse,dce")
    assert report.steps[0].stats == {"constants_merged": 1, "nodes_merged": 2}
    assert [n.op_type for n in model.graph] == ["Conv", "Relu", "Add"]
    add = model.graph.nodes[-1]
    assert add.inputs[0] is add.inputs[1]
    assert list(model.graph.initializers) == ["w1"]
    _check_numerics(proto, model)
    assert not PassManager("cse").run(model).modified  # idempotent


def test_different_weights_attributes_or_random_ops_are_kept():
    proto = _model([
        helper.make_node("Conv", ["x", "w1"], ["c1"]),
        helper.make_node("Conv", ["x", "w2"], ["c2"]),  # other values
        helper.make_node("Conv", ["x", "w1"], ["c3"], pads=[1, 1, 1, 1]),  # other attribute
        helper.make_node("RandomNormalLike", ["x"], ["n1"]),
        helper.make_node("RandomNormalLike", ["x"], ["n2"]),
        helper.make_node("Sum", ["c1", "c2", "n1", "n2"], ["y"]),
        helper.make_node("Identity", ["c3"], ["z"])],
        [_w("w1"), _w("w2", 0.25)], outputs=("y", "z"))
    model, report = _run(proto)
    assert not report.modified
    assert report.steps[0].stats == {"constants_merged": 0, "nodes_merged": 0}
    assert len(model.graph) == 7


def test_graph_outputs_keep_their_producers_and_inputs_are_not_constants():
    proto = _model([
        helper.make_node("Relu", ["x"], ["y"]), helper.make_node("Relu", ["x"], ["z"]),
        helper.make_node("Mul", ["x", "s1"], ["m1"]), helper.make_node("Mul", ["x", "s2"], ["m2"]),
        helper.make_node("Add", ["m1", "m2"], ["w"])],
        [_w("s1", 2.0, (1,)), _w("s2", 2.0, (1,))], outputs=("y", "z", "w"),
        inputs=(("x", [1, 3, 4, 4]), ("s2", [1])))  # s2 is an overridable default
    model, report = _run(proto)
    assert not report.modified
    assert [n.op_type for n in model.graph] == ["Relu", "Relu", "Mul", "Mul", "Add"]


def test_tensor_attributes_compare_by_content():
    def const_of_shape(out, value):
        return helper.make_node("ConstantOfShape", ["shape"], [out],
                                value=helper.make_tensor("v", TensorProto.FLOAT, [1], [value]))

    shape = helper.make_tensor("shape", TensorProto.INT64, [2], [2, 2])
    proto = _model([const_of_shape("a", 1.0), const_of_shape("b", 1.0), const_of_shape("c", 2.0),
                    helper.make_node("Sum", ["x", "a", "b", "c"], ["y"])], [shape],
                   inputs=(("x", [2, 2]),))
    model, report = _run(proto, "cse,dce")
    assert report.steps[0].stats == {"constants_merged": 0, "nodes_merged": 1}
    assert [n.op_type for n in model.graph].count("ConstantOfShape") == 2
    _check_numerics(proto, model)


def test_inside_an_if_branch():
    then = helper.make_graph(
        [helper.make_node("Neg", ["x"], ["t1"]), helper.make_node("Neg", ["x"], ["t2"]),
         helper.make_node("Add", ["t1", "t2"], ["t"])], "then", [],
        [helper.make_tensor_value_info("t", TensorProto.FLOAT, None)])
    other = helper.make_graph([helper.make_node("Identity", ["x"], ["e"])], "else", [],
                              [helper.make_tensor_value_info("e", TensorProto.FLOAT, None)])
    proto = _model([helper.make_node("If", ["cond"], ["y"], then_branch=then, else_branch=other)],
                   inputs=(("x", [2, 2]),))
    proto.graph.input.append(helper.make_tensor_value_info("cond", TensorProto.BOOL, []))
    model, report = _run(proto)
    assert report.steps[0].stats == {"constants_merged": 0, "nodes_merged": 1}
    branch = model.graph.nodes[0].attrs["then_branch"].value
    assert [n.op_type for n in branch] == ["Neg", "Add"]
    for cond in (True, False):
        feeds = {"x": np.arange(4, dtype=np.float32).reshape(2, 2), "cond": np.array(cond)}
        assert np.array_equal(run_ort(proto, feeds)[0], run_ort(ir.to_proto(model), feeds)[0])


def test_large_constants_are_not_hashed():
    proto = _model([helper.make_node("Conv", ["x", "w1"], ["c1"]),
                    helper.make_node("Conv", ["x", "w2"], ["c2"]),
                    helper.make_node("Add", ["c1", "c2"], ["y"])], [_w("w1"), _w("w2")])
    _, report = _run(proto, "cse,max_bytes=8")
    assert report.steps[0].stats == {"constants_merged": 0, "nodes_merged": 0}
