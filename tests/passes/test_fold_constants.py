"""fold-constants: constant subgraphs become initializers, lazily where cheap."""

from __future__ import annotations

import numpy as np
import onnx.reference
import pytest
from conftest import parse_model, random_inputs, run_ort

import edgeopt.passes.fold_constants  # noqa: F401  (registers the pass)
from edgeopt import ir
from edgeopt.passes import PassManager

HEADER = '<ir_version: 8, opset_import: ["" : 17]>\n'
ZERO_STATS = {"nodes_folded": 0, "too_large": 0, "eval_failed": 0}


def run(model: ir.Model, spec: str = "fold-constants"):
    """Run one pass with verification; its StepReport."""
    return PassManager(spec, verify="each").run(model).steps[0]


def reference(model: ir.Model, feeds: dict) -> list[np.ndarray]:
    return onnx.reference.ReferenceEvaluator(ir.to_proto(model)).run(None, feeds)


def ops(graph: ir.Graph) -> list[str]:
    return [n.op_type for n in graph]


CHAIN = HEADER + """
g (float[2,3] x) => (float[2,3] y)
<int64[2] shp = {2, 3}, float k = {1.5}>
{
  c = ConstantOfShape <value = float[1] {2.0}> (shp)
  d = Add (c, k)
  e = Unsqueeze (d, axes)
  f = Squeeze (e, axes)
  y = Mul (x, f)
}"""


def chain_model() -> ir.Model:
    text = CHAIN.replace("<int64[2] shp", "<int64[1] axes = {0}, int64[2] shp")
    return parse_model(text)


def test_folds_a_whole_chain_in_one_sweep():
    model = chain_model()
    feeds = random_inputs(ir.to_proto(model), seed=0)
    expected = reference(model, feeds)
    step = run(model)
    assert step.modified
    assert step.stats == {"nodes_folded": 4, "too_large": 0, "eval_failed": 0}
    assert ops(model.graph) == ["Mul"]
    f = model.graph.nodes[0].inputs[1]
    assert f.name == "f" and f.is_initializer()
    np.testing.assert_array_equal(f.const_value.numpy(), np.full((2, 3), 3.5, np.float32))
    np.testing.assert_array_equal(reference(model, feeds)[0], expected[0])
    np.testing.assert_array_equal(run_ort(ir.to_proto(model), feeds)[0], expected[0])


def test_constant_of_shape_is_lazy_and_second_run_is_a_no_op():
    model = parse_model(HEADER + """
g (float[4,5] x) => (float[4,5] y)
<int64[2] shp = {4, 5}>
{
  c = ConstantOfShape <value = float[1] {0.25}> (shp)
  y = Add (x, c)
}""")
    assert run(model).stats == {"nodes_folded": 1, "too_large": 0, "eval_failed": 0}
    c = model.graph.initializers["c"]
    assert isinstance(c.const_value, ir.LazyTensor)
    assert (c.dtype, c.shape) == (ir.DataType.FLOAT, (4, 5))
    np.testing.assert_array_equal(c.const_value.numpy(), np.full((4, 5), 0.25, np.float32))
    again = run(model)
    assert not again.modified and again.stats == ZERO_STATS


def test_constant_of_shape_default_value_is_float_zero():
    model = parse_model(HEADER + """
g (float[3] x) => (float[3] y)
<int64[1] shp = {3}>
{
  c = ConstantOfShape (shp)
  y = Add (x, c)
}""")
    run(model)
    t = model.graph.initializers["c"].const_value
    assert t.dtype == ir.DataType.FLOAT
    np.testing.assert_array_equal(t.numpy(), np.zeros(3, np.float32))


def test_shape_and_size_of_static_tensors_fold_and_keep_output_names():
    model = parse_model(HEADER + """
g (float[2,3,4] x) => (float[3,4] y, int64 n, int64[2] s)
{
  s = Shape <start = 1> (x)
  y = ConstantOfShape <value = float[1] {7.0}> (s)
  n = Size (x)
}""")
    feeds = random_inputs(ir.to_proto(model), seed=1)
    expected = run_ort(ir.to_proto(model), feeds)
    step = run(model)
    assert step.stats == {"nodes_folded": 3, "too_large": 0, "eval_failed": 0}
    assert ops(model.graph) == []
    assert [v.name for v in model.graph.outputs] == ["y", "n", "s"]
    assert all(v.is_initializer() for v in model.graph.outputs)
    np.testing.assert_array_equal(model.graph.initializers["s"].const_value.numpy(), [3, 4])
    assert model.graph.initializers["n"].const_value.numpy() == 24
    got = run_ort(ir.to_proto(model), feeds)
    for g, e in zip(got, expected, strict=True):
        np.testing.assert_array_equal(g, e)


@pytest.mark.parametrize(("start", "end", "expected"), [
    (0, None, [2, 3, 4, 5]), (-2, None, [4, 5]), (1, -1, [3, 4]), (-9, 9, [2, 3, 4, 5]),
    (3, 1, []),
])
def test_shape_honours_start_and_end(start, end, expected):
    attrs = f"start = {start}" + (f", end = {end}" if end is not None else "")
    model = parse_model(HEADER + f"""
g (float[2,3,4,5] x) => (int64[{len(expected)}] s)
{{
  s = Shape <{attrs}> (x)
}}""")
    feeds = random_inputs(ir.to_proto(model), seed=0)
    ort_out = run_ort(ir.to_proto(model), feeds)[0]
    run(model)
    got = model.graph.initializers["s"].const_value.numpy()
    assert got.dtype == np.int64
    np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(got, ort_out)


def test_shape_of_a_symbolic_tensor_stays():
    model = parse_model(HEADER + """
g (float[N,3] x) => (int64[2] s)
{
  s = Shape (x)
}""")
    step = run(model)
    assert not step.modified and step.stats == ZERO_STATS
    assert ops(model.graph) == ["Shape"]


def test_multi_output_node_folds_every_output():
    model = parse_model(HEADER + """
g (float[2] x) => (float[2] y)
<float[4] k = {1.0, 2.0, 3.0, 4.0}>
{
  a, b = Split (k)
  y = Sub (a, b)
}""")
    assert run(model).stats == {"nodes_folded": 2, "too_large": 0, "eval_failed": 0}
    assert ops(model.graph) == []
    np.testing.assert_array_equal(model.graph.initializers["y"].const_value.numpy(), [-2, -2])


def test_size_caps():
    model = parse_model(HEADER + """
g (float[512,512] x, float[300] u) => (float[512,512] y, float[300] z)
<int64[2] shp = {512, 512}, float[300] k = {ONES}>
{
  c = ConstantOfShape <value = float[1] {1.0}> (shp)
  d = Neg (k)
  y = Add (x, c)
  z = Add (u, d)
}""".replace("ONES", ", ".join(["1.0"] * 300)))
    # The lazy result is 1 MiB (over 1e6 bytes); the generic input is 1200 bytes (over 1000).
    step = run(model, "fold-constants:1000,max_lazy_bytes=1000000")
    assert not step.modified
    assert step.stats == {"nodes_folded": 0, "too_large": 2, "eval_failed": 0}
    assert ops(model.graph) == ["ConstantOfShape", "Neg", "Add", "Add"]
    assert run(model, "fold-constants").stats == {"nodes_folded": 2, "too_large": 0,
                                                  "eval_failed": 0}
    assert ops(model.graph) == ["Add", "Add"]


def test_generic_result_over_cap_is_discarded():
    model = parse_model(HEADER + """
g (float[100,100] x) => (float[100,100] y)
<float[1] one = {1.0}, int64[2] shp = {100, 100}>
{
  e = Expand (one, shp)
  y = Add (x, e)
}""")
    step = run(model, "fold-constants:1000")  # the inputs are 20 bytes, the result 40 kB
    assert step.stats == {"nodes_folded": 0, "too_large": 1, "eval_failed": 0}
    assert ops(model.graph) == ["Expand", "Add"]


def test_nondeterministic_ops_are_never_folded():
    model = parse_model(HEADER + """
g (float[2,2] x) => (float[2,2] y, float[2,2] z)
<float[2,2] k = {1.0, 2.0, 3.0, 4.0}>
{
  r = RandomUniform <shape = [2, 2]> ()
  y = Add (x, r)
  q = RandomNormalLike (k)
  z = Add (x, q)
}""")
    step = run(model)
    assert not step.modified and step.stats == ZERO_STATS
    assert ops(model.graph) == ["RandomUniform", "Add", "RandomNormalLike", "Add"]


def test_dead_nodes_are_left_to_dce():
    model = parse_model(HEADER + """
g (float[2] x) => (float[2] y)
<float[2] k = {1.0, 2.0}>
{
  unused = Neg (k)
  y = Relu (x)
}""")
    step = run(model)
    assert not step.modified and step.stats == ZERO_STATS


def test_failed_evaluation_is_counted_and_the_node_kept():
    model = parse_model(HEADER + """
g (float[2] x) => (float[4] y)
<float[6] k = {1.0, 2.0, 3.0, 4.0, 5.0, 6.0}, int64[1] shp = {4}>
{
  r = Reshape (k, shp)
  y = Add (x, r)
}""")
    step = run(model)
    assert step.stats == {"nodes_folded": 0, "too_large": 0, "eval_failed": 1}
    assert not step.modified
    assert ops(model.graph) == ["Reshape", "Add"]


IR_INPUT_INIT = """
g (float[3] x, float[3] w) => (float[3] y)
<float[3] w = {1.0, 2.0, 3.0}>
{
  n = Neg (w)
  y = Add (x, n)
}"""


def test_initializer_inputs_are_overridable_from_ir_4():
    model = parse_model(HEADER + IR_INPUT_INIT)
    step = run(model)
    assert not step.modified and step.stats == ZERO_STATS


def test_initializer_inputs_of_ir_3_models_are_constants():
    model = parse_model('<ir_version: 3, opset_import: ["" : 9]>\n' + IR_INPUT_INIT)
    feeds = {"x": np.array([1, 1, 1], np.float32)}
    expected = reference(model, {**feeds, "w": np.array([1, 2, 3], np.float32)})
    step = run(model)
    assert step.stats == {"nodes_folded": 1, "too_large": 0, "eval_failed": 0}
    np.testing.assert_array_equal(model.graph.initializers["n"].const_value.numpy(), [-1, -2, -3])
    # IR 3 exports the new free initializer as a Constant node; ORT accepts the file.
    np.testing.assert_array_equal(run_ort(ir.to_proto(model), feeds)[0], expected[0])


IF_MODEL = HEADER + """
g (bool c, float[2] x) => (float[2] y)
<float[2] k = {1.0, 2.0}>
{
  y = If (c) <
    then_branch = t () => (float[2] ty) <float[2] j = {10.0, 20.0}> {
      s = Add (k, j)
      ty = Mul (x, s)
    },
    else_branch = e () => (float[2] ey) {
      ey = Neg (k)
    }
  >
}"""


def test_folds_inside_if_branches():
    model = parse_model(IF_MODEL)
    x = np.array([0.5, -2.0], np.float32)
    cases = [{"c": np.array(flag), "x": x} for flag in (True, False)]
    expected = [reference(model, f)[0] for f in cases]
    step = run(model)
    assert step.stats == {"nodes_folded": 2, "too_large": 0, "eval_failed": 0}
    then_g, else_g = (model.graph.nodes[0].attrs[k].value for k in ("then_branch",
                                                                       "else_branch"))
    assert ops(then_g) == ["Mul"] and ops(else_g) == []
    np.testing.assert_array_equal(then_g.initializers["s"].const_value.numpy(), [11, 22])
    assert else_g.outputs[0].is_initializer() and else_g.initializers["ey"] is else_g.outputs[0]
    for feeds, want in zip(cases, expected, strict=True):
        np.testing.assert_array_equal(reference(model, feeds)[0], want)
        np.testing.assert_array_equal(run_ort(ir.to_proto(model), feeds)[0], want)
    assert not run(model).modified


def test_no_constants_is_a_no_op():
    model = parse_model(HEADER + """
g (float[2] x) => (float[2] y)
{
  y = Relu (x)
}""")
    version = model.version
    step = run(model)
    assert not step.modified and step.stats == ZERO_STATS
    assert model.version == version


def test_negative_caps_are_rejected():
    from edgeopt.passes import OptionError

    with pytest.raises(OptionError, match="max_bytes and max_lazy_bytes must be >= 0"):
        PassManager("fold-constants:-1")


def test_dequantized_weights_stay_quantized():
    """DequantizeLinear(int8 constant) is how a quantized weight is stored: never folded
    (``quant`` then ``simplify`` must keep int8 weights), while a Shape chain next to it is.
    Opset 21: onnx's reference evaluator implements DequantizeLinear from opset 19, so this
    is where folding it would happen."""
    model = parse_model("""<ir_version: 10, opset_import: ["" : 21]>
g (float[2, 4] x) => (float[2, 3] y, int64[2] s) {
  q = Constant <value = int8[4, 3] {1, -2, 3, 4, -5, 6, 7, -8, 9, 10, -11, 12}> ()
  sc = Constant <value = float {0.5}> ()
  w = DequantizeLinear(q, sc)
  y = MatMul(x, w)
  s = Shape(x)
}""")
    step = run(model)
    assert [n.op_type for n in model.graph] == ["DequantizeLinear", "MatMul"]
    assert step.stats.get("nodes_folded") == 1
