"""``Model.clone()``: a deep copy of the IR that shares (immutable) tensors.

The clone must be independent (edits never reach the original, nor its version), keep every
edge including subgraph captures (the clone's inner nodes read the clone's outer values), and
export to exactly the same ModelProto.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import SCAN_CAPTURE, parse_model
from onnx.reference import ReferenceEvaluator

from edgeopt import ir
from edgeopt.ir import Use

IF_LOOP = """<ir_version: 9, opset_import: ["" : 17]>
g (bool c, int64 n, float[2] x) => (float[2] y, float[2] z) <float[2] w = {1.0, -2.0}> {
  a = Add(x, w)
  y = If(c) <then_branch = then_g () => (float[2] t) { t = Mul(a, w) },
             else_branch = else_g () => (float[2] e) { e = Neg(a) }>
  z = Loop(n, c, x) <body = body (int64 i, bool c_in, float[2] acc) => (bool c_out, float[2] s) {
    c_out = Identity(c_in)
    s = Add(acc, a)
  }>
}"""


CONV = """<ir_version: 8, opset_import: ["" : 13]>
g (float[1,2,4,4] x) => (float[1,3,4,4] y) {
  y = Conv <pads = [1, 1, 1, 1], kernel_shape = [3, 3]> (x, w)
}"""


def conv_model() -> ir.Model:
    model = parse_model(CONV.replace("(x, w)", "(x, x)"))  # w is wired in below
    w = ir.Value("w", const_value=ir.ArrayTensor(
        np.random.default_rng(0).standard_normal((3, 2, 3, 3)).astype(np.float32)))
    model.graph.initializers.add(w)
    model.graph.nodes[0].set_input(1, w)
    return model


def all_values(model: ir.Model) -> list[ir.Value]:
    graphs = [model.graph, *model.graph.subgraphs()]
    values = [v for g in graphs for v in [*g.inputs, *g.initializers.values(), *g.outputs]]
    values += [v for n in model.walk() for v in [*n.inputs, *n.outputs] if v is not None]
    return list({id(v): v for v in values}.values())


def serialized(model: ir.Model) -> bytes:
    return ir.to_proto(model).SerializeToString(deterministic=True)


def test_clone_is_deep():
    model = parse_model(IF_LOOP)
    clone = model.clone()
    assert clone.graph is not model.graph
    originals = {id(x) for x in [*model.walk(), *all_values(model), *model.graph.subgraphs()]}
    copies = [*clone.walk(), *all_values(clone), *clone.graph.subgraphs()]
    assert len(copies) == len(originals)
    assert not any(id(x) in originals for x in copies)
    assert [n.op_type for n in clone.walk()] == [n.op_type for n in model.walk()]
    assert [v.name for v in all_values(clone)] == [v.name for v in all_values(model)]
    assert all(g.parent is not None and g.parent.graph is not None and g.root is clone.graph
               for g in clone.graph.subgraphs())
    ir.verify(clone, "onnx")


def test_editing_the_clone_leaves_the_original_and_its_version_alone():
    model = parse_model(IF_LOOP)
    before, version = serialized(model), model.version
    versions = [g.version for g in model.graph.subgraphs()]
    clone = model.clone()
    add, if_node, loop = clone.graph.nodes
    then_g = next(if_node.subgraphs())
    then_g.nodes[0].set_input(1, clone.graph.inputs[2])  # edit inside a subgraph
    then_g.nodes[0].attrs["note"] = "edited"
    a = add.outputs[0]
    a.name = "renamed"
    a.shape = (7,)
    clone.graph.initializers["w"].name = "w2"
    clone.graph.add_initializer("extra", ir.ArrayTensor(np.zeros(1, np.float32)))
    clone.graph.outputs.pop()
    clone.graph.remove(loop)
    clone.graph.inputs[0].meta["k"] = 1
    clone.opset_imports["acme"] = 1
    clone.metadata_props["who"] = "clone"
    assert clone.version > 0
    assert serialized(model) == before
    assert model.version == version
    assert [g.version for g in model.graph.subgraphs()] == versions
    assert model.graph.inputs[0].meta == {} and "acme" not in model.opset_imports
    assert model.metadata_props == {}
    ir.verify(model)


def test_clone_shares_tensors():
    model = conv_model()
    clone = model.clone()
    w, w2 = model.graph.initializers["w"], clone.graph.initializers["w"]
    assert w2 is not w and w2.const_value is w.const_value
    assert w2.is_initializer() and w2.graph is clone.graph
    assert w2.uses() == (Use(clone.graph.nodes[0], 1),)
    assert w.uses() == (Use(model.graph.nodes[0], 1),)  # the clone added no use on w
    # Attribute lists are copied, so editing one in place stays local.
    clone.graph.nodes[0].attrs["pads"].value[0] = 0
    assert model.graph.nodes[0].attr("pads") == [1, 1, 1, 1]


def test_clone_keeps_subgraph_captures_on_the_clone_values():
    model = parse_model(IF_LOOP)
    clone = model.clone()
    add = clone.graph.nodes[0]
    a, w = add.outputs[0], clone.graph.initializers["w"]
    inner = {n.op_type + n.outputs[0].name: n for n in clone.walk()}
    mul, neg, body_add = inner["Mult"], inner["Nege"], inner["Adds"]
    assert mul.inputs == (a, w) and neg.inputs == (a,) and body_add.inputs[1] is a
    assert a.uses() == (Use(mul, 0), Use(neg, 0), Use(body_add, 1))
    assert a.consumers() == (mul, neg, body_add)
    original_a = model.graph.nodes[0].outputs[0]
    assert all(u.node.graph.root is model.graph for u in original_a.uses())
    # Removing the clone's If detaches its captures from the clone's `a` only.
    clone.graph.outputs[0] = clone.graph.inputs[2]
    clone.graph.remove(clone.graph.nodes[1])
    assert a.uses() == (Use(body_add, 1),) and len(original_a.uses()) == 3


def test_clone_of_scan_keeps_captures():
    model = parse_model(SCAN_CAPTURE)
    clone = model.clone()
    w = clone.graph.nodes[0].outputs[0]
    mul = next(n for n in clone.walk() if n.op_type == "Mul")
    assert mul.inputs[1] is w and w.consumers() == (mul,)
    ir.verify(clone, "onnx")


@pytest.mark.parametrize("text", [IF_LOOP, SCAN_CAPTURE], ids=["if-loop", "scan"])
def test_clone_round_trips_identically(text):
    model = parse_model(text)
    model.producer_name, model.doc_string = "tests", "a doc"
    model.metadata_props["k"] = "v"
    model.graph.nodes[0].metadata_props["n"] = "1"
    model.graph.nodes[0].doc_string = "node doc"
    model.graph.inputs[0].doc_string = "input doc"
    clone = model.clone()
    assert serialized(clone) == serialized(model)
    assert (clone.producer_name, clone.doc_string, clone.ir_version) == (
        "tests", "a doc", model.ir_version)
    assert clone.opset_imports == model.opset_imports
    assert clone.opset_imports is not model.opset_imports


def test_clone_round_trips_a_model_with_functions_and_value_info():
    proto = onnx.parser.parse_model("""<ir_version: 9, opset_import: ["" : 17, "local" : 1]>
        g (float[N,2] x) => (float[N,2] y) {
          h = local.MyRelu(x)
          y = Neg(h)
        }
        <domain: "local", opset_import: ["" : 17]>
        MyRelu (a) => (b) { b = Relu(a) }""")
    proto.graph.value_info.append(onnx.helper.make_tensor_value_info("h", 1, ["N", 2]))
    model = ir.from_proto(proto)
    clone = model.clone()
    assert serialized(clone) == serialized(model)
    assert clone.functions[0] is not model.functions[0]
    assert clone.functions[0] == model.functions[0]


def test_clone_round_trips_external_data(tmp_path):
    model = conv_model()
    path = tmp_path / "m.onnx"
    ir.save(model, path, external_data="m.data", size_threshold=0)
    loaded = ir.load(path)
    clone = loaded.clone()
    w, w2 = loaded.graph.initializers["w"], clone.graph.initializers["w"]
    assert isinstance(w2.const_value, ir.ExternalTensor) and w2.const_value is w.const_value
    assert serialized(clone) == serialized(loaded)
    ir.save(clone, tmp_path / "clone.onnx")
    again = ir.load(tmp_path / "clone.onnx")
    np.testing.assert_array_equal(again.graph.initializers["w"].const_value.numpy(),
                                  w.const_value.numpy())


def test_clone_of_an_unsorted_graph_keeps_edges():
    model = parse_model(IF_LOOP)
    add = model.graph.nodes[0]
    model.graph.append(add)  # consumers (and captures) now come before the producer
    clone = model.clone()
    c_add = clone.graph.nodes[2]
    assert [n.op_type for n in clone.graph] == ["If", "Loop", "Add"]
    a = c_add.outputs[0]
    assert a.producer() is c_add
    assert {u.node.op_type for u in a.uses()} == {"Mul", "Neg", "Add"}
    clone.graph.toposort()
    model.graph.toposort()
    assert serialized(clone) == serialized(model)
    ir.verify(clone)


def test_clone_computes_the_same():
    model = parse_model(IF_LOOP)
    clone = model.clone()
    feeds = {"c": np.array(True), "n": np.array(3, np.int64),
             "x": np.array([0.5, -1.5], np.float32)}
    expected = ReferenceEvaluator(ir.to_proto(model)).run(None, feeds)
    got = ReferenceEvaluator(ir.to_proto(clone)).run(None, feeds)
    for e, g in zip(expected, got, strict=True):
        np.testing.assert_array_equal(g, e)
    x, w = feeds["x"], np.array([1.0, -2.0], np.float32)
    np.testing.assert_array_equal(expected[0], (x + w) * w)  # then branch: Mul(a, w)
    np.testing.assert_array_equal(expected[1], x + 3 * (x + w))  # three Loop steps of acc + a


def test_clone_copies_node_and_value_fields():
    model = parse_model(IF_LOOP)
    node = model.graph.nodes[0]
    node.name, node.meta["edgeopt.k"] = "add0", [1]
    node.outputs[0].meta["edgeopt.importance"] = 0.5
    node.outputs[0].metadata_props["m"] = "p"
    clone = model.clone()
    c_node = clone.graph.nodes[0]
    assert (c_node.name, c_node.meta, c_node.outputs[0].meta) == (
        "add0", {"edgeopt.k": [1]}, {"edgeopt.importance": 0.5})
    c_node.meta["edgeopt.other"] = 1
    c_node.outputs[0].metadata_props["m"] = "changed"
    assert "edgeopt.other" not in node.meta and node.outputs[0].metadata_props["m"] == "p"
    assert clone.graph.outputs[0].type_proto is not None
    assert clone.graph.outputs[0].type_proto is not model.graph.outputs[0].type_proto
