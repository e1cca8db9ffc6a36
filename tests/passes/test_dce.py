"""dce: dead nodes, unused initializers, Identity and inference Dropout, in every subgraph."""

from __future__ import annotations

import numpy as np
import onnx.reference
from conftest import parse_model, random_inputs, run_ort

from edgeopt import ir
from edgeopt.passes import PassManager

HEADER = '<ir_version: 8, opset_import: ["" : 17]>\n'
ZERO = {"nodes_removed": 0, "identity_removed": 0, "dropout_removed": 0,
        "initializers_removed": 0}


def stats(nodes=0, identity=0, dropout=0, inits=0) -> dict[str, int]:
    return {"nodes_removed": nodes, "identity_removed": identity, "dropout_removed": dropout,
            "initializers_removed": inits}


def run(model: ir.Model):
    return PassManager("dce", verify="each").run(model).steps[0]


def ops(graph: ir.Graph) -> list[str]:
    return [n.op_type for n in graph]


def reference(model: ir.Model, feeds: dict) -> list[np.ndarray]:
    return onnx.reference.ReferenceEvaluator(ir.to_proto(model)).run(None, feeds)


def check_exact(model: ir.Model, feeds: dict) -> dict[str, int]:
    """Run dce; outputs must be bit-identical before and after; a second run is a no-op."""
    expected = reference(model, feeds)
    step = run(model)
    for got in (reference(model, feeds), run_ort(ir.to_proto(model), feeds)):
        for g, e in zip(got, expected, strict=True):
            np.testing.assert_array_equal(g, e)
    again = run(model)
    assert not again.modified and again.stats == ZERO
    return step.stats


def test_removes_dead_chains_identity_dropout_and_unused_initializers():
    model = parse_model(HEADER + """
g (float[2,3] x) => (float[2,3] y)
<float[2,3] k = {1, 2, 3, 4, 5, 6}, float[2,3] unused = {0, 0, 0, 0, 0, 0}>
{
  a = Identity (x)
  b = Dropout (a)
  dead1 = Mul (a, k)
  dead2 = Relu (dead1)
  y = Add (b, k)
}""")
    feeds = random_inputs(ir.to_proto(model), seed=0)
    assert check_exact(model, feeds) == stats(nodes=4, identity=1, dropout=1, inits=1)
    assert ops(model.graph) == ["Add"]
    assert model.graph.nodes[0].inputs[0] is model.graph.inputs[0]
    assert list(model.graph.initializers) == ["k"]


def test_graph_outputs_keep_their_identity():
    model = parse_model(HEADER + """
g (float[2] x) => (float[2] y, float[2] z)
{
  y = Identity (x)
  z = Dropout (y)
}""")
    # z is a graph output, so its Dropout stays; y is read by it and is an output too.
    step = run(model)
    assert not step.modified and step.stats == ZERO
    assert ops(model.graph) == ["Identity", "Dropout"]


def test_identity_feeding_an_output_is_bypassed_but_the_output_name_stays():
    model = parse_model(HEADER + """
g (float[2] x) => (float[2] y)
{
  a = Identity (x)
  y = Neg (a)
}""")
    feeds = random_inputs(ir.to_proto(model), seed=0)
    assert check_exact(model, feeds) == stats(nodes=1, identity=1)
    assert [v.name for v in model.graph.outputs] == ["y"]


def test_dropout_whose_mask_is_read_is_kept():
    model = parse_model(HEADER + """
g (float[4] x) => (float[4] y, bool[4] z)
{
  d, mask = Dropout (x)
  y = Relu (d)
  z = Not (mask)
}""")
    step = run(model)
    assert not step.modified and ops(model.graph) == ["Dropout", "Relu", "Not"]


def test_dropout_in_training_mode_is_kept():
    model = parse_model(HEADER + """
g (float[4] x) => (float[4] y)
<float r = {0.5}, bool t = {1}>
{
  d = Dropout (x, r, t)
  y = Relu (d)
}""")
    step = run(model)
    assert not step.modified and ops(model.graph) == ["Dropout", "Relu"]


def test_dropout_with_constant_false_training_mode_is_removed():
    model = parse_model(HEADER + """
g (float[4] x) => (float[4] y)
<float r = {0.5}, bool t = {0}>
{
  d = Dropout (x, r, t)
  y = Relu (d)
}""")
    feeds = random_inputs(ir.to_proto(model), seed=0)
    assert check_exact(model, feeds) == stats(nodes=1, dropout=1, inits=2)
    assert ops(model.graph) == ["Relu"]


def test_opset_6_dropout_without_is_test_is_training_and_kept():
    # Dropout-6: is_test defaults to 0, i.e. training mode (random output), so it must stay.
    model = parse_model('<ir_version: 3, opset_import: ["" : 6]>\n' + """
g (float[4] x) => (float[4] y)
{
  d = Dropout (x)
  y = Relu (d)
}""")
    step = run(model)
    assert not step.modified and ops(model.graph) == ["Dropout", "Relu"]


def test_opset_6_dropout_in_test_mode_is_removed():
    model = parse_model('<ir_version: 3, opset_import: ["" : 6]>\n' + """
g (float[4] x) => (float[4] y)
{
  d = Dropout <is_test = 1> (x)
  y = Relu (d)
}""")
    assert run(model).stats == stats(nodes=1, dropout=1)
    assert ops(model.graph) == ["Relu"]


IR_INIT_INPUT = """
g (float[2] x, float[2] w, float[2] v) => (float[2] y)
<float[2] w = {1, 2}, float[2] v = {3, 4}>
{
  y = Add (x, v)
}"""


def test_unused_initializer_inputs_are_interface_from_ir_4():
    model = parse_model(HEADER + IR_INIT_INPUT)
    step = run(model)
    assert not step.modified and step.stats == ZERO
    assert [v.name for v in model.graph.inputs] == ["x", "w", "v"]


def test_unused_initializer_inputs_of_ir_3_models_are_removed():
    model = parse_model('<ir_version: 3, opset_import: ["" : 9]>\n' + IR_INIT_INPUT)
    feeds = {"x": np.array([1, 1], np.float32)}
    assert check_exact(model, feeds) == stats(inits=1)
    assert [v.name for v in model.graph.inputs] == ["x", "v"]
    assert list(model.graph.initializers) == ["v"]


IF_MODEL = HEADER + """
g (bool c, float[2] x) => (float[2] y)
<float[2] k = {1, 2}, float[2] only_dead = {5, 6}>
{
  outer_dead = Neg (x)
  y = If (c) <
    then_branch = t () => (float[2] ty) <float[2] j = {9, 9}> {
      i = Identity (x)
      unused = Mul (outer_dead, only_dead)
      ty = Add (i, k)
    },
    else_branch = e () => (float[2] ey) {
      ey = Identity (k)
    }
  >
}"""


def test_sweeps_inside_if_branches_and_frees_outer_values():
    model = parse_model(IF_MODEL)
    x = np.array([0.5, -1.5], np.float32)
    cases = [{"c": np.array(flag), "x": x} for flag in (True, False)]
    expected = [reference(model, f)[0] for f in cases]
    step = run(model)
    # then: Identity bypassed + removed, Mul removed, j unused; else: Identity is the branch
    # output (kept). Outer: the Neg read only by the removed Mul, and only_dead.
    assert step.stats == stats(nodes=3, identity=1, inits=2)
    then_g, else_g = (model.graph.nodes[0].attrs[k].value for k in ("then_branch",
                                                                       "else_branch"))
    assert ops(model.graph) == ["If"]
    assert ops(then_g) == ["Add"] and ops(else_g) == ["Identity"]
    assert list(then_g.initializers) == [] and list(model.graph.initializers) == ["k"]
    for feeds, want in zip(cases, expected, strict=True):
        np.testing.assert_array_equal(reference(model, feeds)[0], want)
        np.testing.assert_array_equal(run_ort(ir.to_proto(model), feeds)[0], want)
    assert not run(model).modified


def test_loop_body_is_swept():
    model = parse_model(HEADER + """
g (int64 n, float[2] x) => (float[2] y)
<bool t = {1}>
{
  y = Loop (n, t, x) <
    body = b (int64 i, bool cond, float[2] acc) => (bool cond_out, float[2] acc_out) {
      cond_out = Identity (cond)
      waste = Sin (acc)
      acc_out = Add (acc, x)
    }
  >
}""")
    feeds = {"n": np.array(3, np.int64), "x": np.array([1.0, 2.0], np.float32)}
    assert check_exact(model, feeds) == stats(nodes=1)
    body = model.graph.nodes[0].attrs["body"].value
    assert ops(body) == ["Identity", "Add"]  # the Identity is a body output: kept


def test_live_model_is_a_no_op():
    model = parse_model(HEADER + "g (float[2] x) => (float[2] y) { y = Relu (x) }")
    version = model.version
    step = run(model)
    assert not step.modified and step.stats == ZERO and model.version == version
