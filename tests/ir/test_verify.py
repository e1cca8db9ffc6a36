"""One test per ``ir.verify`` rule, each with the exact message it reports.

Models are tiny (ONNX text through ``parse_model``, or hand-built); the broken ones are made
with the public mutators where the IR allows the mistake, and by corrupting private state
only where construction makes the mistake impossible (use lists, role flags, parents).
"""

from __future__ import annotations

import glob
import os
import re

import numpy as np
import pytest
from conftest import ONNX_TEST_DATA, parse_model

from edgeopt import ir
from edgeopt.ir import Use

OPSET = '<ir_version: 9, opset_import: ["" : 17]>'

CHAIN = OPSET + """
g (float[2] x) => (float[2] y) {
  a = Relu(x)
  b = Neg(a)
  y = Abs(b)
}"""

IF_CAPTURE = OPSET + """
g (bool c, float[2] x) => (float[2] y) {
  a = Relu(x)
  y = If(c) <then_branch = then_g () => (float[2] t) { t = Neg(a) },
             else_branch = else_g () => (float[2] e) { e = Abs(a) }>
}"""

LOOP_CAPTURE = OPSET + """
g (int64 n, bool go, float[2] x) => (float[2] y) {
  w = Relu(x)
  y = Loop(n, go, x) <body = body (int64 i, bool c_in, float[2] acc) => (bool c_out, float[2] s) {
    c_out = Identity(c_in)
    s = Add(acc, w)
  }>
}"""


def only_error(model: ir.Model, level: str = "types") -> str:
    """The message of the single problem ``verify`` reports (fails if there are more)."""
    with pytest.raises(ir.VerificationError) as info:
        ir.verify(model, level)
    assert info.value.errors == [str(info.value)], info.value.errors
    return str(info.value)


def one_node(text_body: str, inputs: str = "float[2] x", outputs: str = "float[2] y",
             opsets: str = '"" : 17', extra: str = "") -> ir.Model:
    """A one-graph model around some node text."""
    return parse_model(f"<ir_version: 9, opset_import: [{opsets}]>\n"
                       f"g ({inputs}) => ({outputs}) {extra} {{ {text_body} }}")


# -- valid models ----------------------------------------------------------------------------
@pytest.mark.parametrize("text", [CHAIN, IF_CAPTURE, LOOP_CAPTURE], ids=["chain", "if", "loop"])
@pytest.mark.parametrize("level", ["structure", "types", "onnx"])
def test_valid_models_pass_every_level(text, level):
    ir.verify(parse_model(text), level)


def test_unknown_level_is_refused():
    with pytest.raises(ValueError, match=r"^unknown verify level 'full'$"):
        ir.verify(parse_model(CHAIN), "full")  # type: ignore[arg-type]


# -- SSA and names ---------------------------------------------------------------------------
def test_duplicate_name_in_one_scope():
    model = parse_model(CHAIN)
    model.graph.nodes[1].outputs[0].name = "a"
    assert only_error(model) == ("graph 'g': node '<unnamed>' (Neg): output 0 'a' is defined "
                                 "more than once (value names must be unique)")


def test_duplicate_graph_input():
    model = parse_model(CHAIN)
    model.graph.inputs.append(model.graph.inputs[0])
    assert only_error(model, "structure") == (
        "graph 'g': graph input 'x' is defined more than once (value names must be unique)")


def test_subgraph_may_not_shadow_an_outer_name():
    model = parse_model(IF_CAPTURE)
    then_g = next(model.graph.nodes[1].subgraphs())
    then_g.nodes[0].outputs[0].name = "x"
    assert only_error(model) == (
        "graph 'then_g': node '<unnamed>' (Neg): output 0 'x' shadows a value of an "
        "enclosing graph (subgraphs may not reuse outer names)")


def test_sibling_subgraphs_may_reuse_names():
    model = parse_model(IF_CAPTURE)
    _then_g, else_g = model.graph.nodes[1].subgraphs()
    else_g.nodes[0].outputs[0].name = "t"  # same name as in then_g: different scopes
    ir.verify(model)


def test_output_names_another_producer():
    model = parse_model(CHAIN)
    relu, neg, _abs = model.graph.nodes
    neg.outputs[0]._producer = relu  # corrupt: construction makes this impossible
    errors = _errors(model, "structure")
    assert errors[0] == "graph 'g': node '<unnamed>' (Neg): output 0 'b' names another producer"


def test_node_output_that_is_also_an_initializer_or_input():
    model = parse_model(CHAIN)
    a = model.graph.nodes[0].outputs[0]
    a._initializer_of = model.graph  # corrupt: initializers.add refuses produced values
    assert only_error(model, "structure") == (
        "graph 'g': node '<unnamed>' (Relu): output 0 'a' is also an initializer")
    a._initializer_of, a._input_of = None, model.graph
    assert only_error(model, "structure") == (
        "graph 'g': node '<unnamed>' (Relu): output 0 'a' is also a graph input")


def test_unnamed_output_that_is_used():
    model = parse_model(CHAIN)
    model.graph.nodes[0].outputs[0].name = ""
    assert only_error(model) == "graph 'g': node '<unnamed>' (Relu): unnamed output 0 is used"


def test_unnamed_unused_outputs_are_fine():
    model = one_node("y, mask = Dropout(x)", outputs="float[2] y")
    model.graph.nodes[0].outputs[1].name = ""  # an omitted optional output
    ir.verify(model, "onnx")


# -- definitions before use ------------------------------------------------------------------
def test_input_used_before_its_definition():
    model = parse_model(CHAIN)
    relu, neg, _abs = model.graph.nodes
    model.graph.insert_before(relu, neg)
    assert only_error(model) == (
        "graph 'g': node '<unnamed>' (Neg): input 0 'a' is used before it is defined (its "
        "producer node '<unnamed>' (Relu) comes later)")


def test_capture_of_a_value_defined_later_in_the_outer_graph():
    model = parse_model(IF_CAPTURE)
    relu, if_node = model.graph.nodes
    model.graph.insert_before(relu, if_node)
    errors = _errors(model)
    assert errors == [
        "graph 'then_g': node '<unnamed>' (Neg): input 0 'a' is used before it is defined (its "
        "producer node '<unnamed>' (Relu) comes later)",
        "graph 'else_g': node '<unnamed>' (Abs): input 0 'a' is used before it is defined (its "
        "producer node '<unnamed>' (Relu) comes later)"]


def test_undefined_input():
    model = parse_model(CHAIN)
    model.graph.nodes[1].set_input(0, ir.Value("ghost"))
    assert only_error(model) == ("graph 'g': node '<unnamed>' (Neg): input 0 'ghost' is not "
                                 "defined in this graph or an enclosing one")


def test_undefined_input_from_the_importer():
    model = one_node("y = Relu(ghost)")
    assert only_error(model, "structure") == (
        "graph 'g': node '<unnamed>' (Relu): input 0 'ghost' is not defined in this graph or "
        "an enclosing one")


def test_value_of_a_sibling_subgraph_is_not_in_scope():
    model = parse_model(IF_CAPTURE)
    then_g, else_g = model.graph.nodes[1].subgraphs()
    else_g.nodes[0].set_input(0, then_g.nodes[0].outputs[0])
    assert only_error(model) == ("graph 'else_g': node '<unnamed>' (Abs): input 0 't' is not "
                                 "defined in this graph or an enclosing one")


def test_graph_output_not_defined():
    model = parse_model(CHAIN)
    model.graph.outputs.append(ir.Value("nowhere"))
    assert only_error(model) == "graph 'g': graph output 1 'nowhere' is not defined"


def test_graph_output_from_the_importer_not_defined():
    model = one_node("y = Relu(x)", outputs="float[2] y, float[2] z")
    assert only_error(model) == "graph 'g': graph output 1 'z' is not defined"


def test_subgraph_output_may_not_be_an_outer_value():
    model = parse_model(IF_CAPTURE.replace("(float[2] e) { e = Abs(a) }", "(float[2] a) {}"))
    # ONNX Runtime refuses a branch returning an outer value directly ("add an Identity").
    assert only_error(model, "structure") == (
        "graph 'else_g': graph output 0 'a' is a value of an enclosing graph (a subgraph must "
        "return a value it defines; insert an Identity)")


def test_graph_may_return_its_own_input():
    ir.verify(one_node("", outputs="float[2] x"), "onnx")


# -- use lists -------------------------------------------------------------------------------
def test_use_missing_from_the_use_list():
    model = parse_model(CHAIN)
    neg = model.graph.nodes[1]
    a = neg.inputs[0]
    del a._uses[Use(neg, 0)]  # corrupt
    assert only_error(model) == ("graph 'g': node '<unnamed>' (Neg): input 0 'a' does not list "
                                 "the node as a user (broken use list)")


def test_use_list_names_a_node_that_reads_something_else():
    model = parse_model(CHAIN)
    _relu, _neg, abs_ = model.graph.nodes
    x = model.graph.inputs[0]
    x._uses[Use(abs_, 0)] = None  # corrupt: abs_ reads b, not x
    assert only_error(model) == ("value 'x': use list names node '<unnamed>' (Abs) input 0, "
                                 "which reads something else")


def test_use_by_a_node_that_is_not_in_the_model():
    model = parse_model(CHAIN)
    stray = ir.Node("Neg", [model.graph.inputs[0]], name="stray")  # never inserted
    assert only_error(model) == ("value 'x': used by node 'stray' (Neg), which is not in the "
                                 "model (removed without detaching?)")
    stray.set_inputs([])
    ir.verify(model)


def test_replacing_a_subgraph_leaves_its_captures_visible_to_verify():
    model = parse_model(IF_CAPTURE)
    if_node = model.graph.nodes[1]
    ident = ir.Node("Identity", [model.graph.inputs[1]], outputs=[ir.Value("f")])
    fresh = ir.Graph(outputs=[ident.outputs[0]], nodes=[ident], name="fresh")
    if_node.attrs["then_branch"] = fresh  # the old then_g still holds its Neg on `a`
    assert only_error(model) == ("value 'a': used by node '<unnamed>' (Neg), which is not in "
                                 "the model (removed without detaching?)")


# -- initializers ----------------------------------------------------------------------------
INIT = OPSET + """
g (float[2] x) => (float[2] y) <float[2] w = {1.0, 2.0}> { y = Add(x, w) }"""


def test_initializer_without_data():
    model = parse_model(INIT)
    model.graph.initializers["w"].const_value = None
    assert only_error(model, "structure") == "graph 'g': initializer 'w' has no data"


def test_initializer_declared_dtype_differs_from_data():
    model = parse_model(INIT)
    model.graph.initializers["w"].dtype = ir.DataType.INT64
    assert only_error(model) == ("graph 'g': initializer 'w' is declared INT64 but its data is "
                                 "FLOAT")
    ir.verify(model, "structure")  # a types-level rule


def test_initializer_declared_shape_differs_from_data():
    model = parse_model(INIT)
    w = model.graph.initializers["w"]
    w.shape = (3,)
    assert only_error(model) == "graph 'g': initializer 'w' is declared [3] but its data is [2]"
    w.shape = (2, 1)
    assert only_error(model) == ("graph 'g': initializer 'w' is declared [2,1] but its data is "
                                 "[2]")
    w.shape = ("N",)  # symbolic dims match anything
    ir.verify(model)


def test_initializer_registered_under_another_name():
    model = parse_model(INIT)
    inits = model.graph.initializers
    dict.__setitem__(inits, "v", dict.pop(inits, "w"))  # corrupt: bypass the container
    assert only_error(model, "structure") == ("graph 'g': initializer 'w' is registered as "
                                              "'v'")


def test_initializer_that_is_also_a_graph_input():
    model = parse_model(OPSET + """
        g (float[2] x, float[2] w) => (float[2] y) <float[2] w = {1.0, 2.0}> { y = Add(x, w) }""")
    w = model.graph.initializers["w"]
    assert w.is_graph_input() and w.is_initializer()
    ir.verify(model, "onnx")


# -- subgraph parents ------------------------------------------------------------------------
def test_subgraph_parent_pointer_broken():
    model = parse_model(IF_CAPTURE)
    then_g = next(model.graph.nodes[1].subgraphs())
    then_g.parent = None
    assert only_error(model) == ("graph 'g': node '<unnamed>' (If): subgraph 'then_g' does not "
                                 "point back to it")


# -- schema ----------------------------------------------------------------------------------
@pytest.mark.parametrize(("body", "message"), [
    ("y = Relu(x, x)", "node '<unnamed>' (Relu): has 2 inputs; opset 17 allows 1"),
    ("y = Add(x)", "node '<unnamed>' (Add): has 1 input; opset 17 allows 2"),
    ("y = Concat <axis = 0> ()", "node '<unnamed>' (Concat): has 0 inputs; opset 17 allows "
                                  "1 or more"),
    ("y = Clip(x, x, x, x)", "node '<unnamed>' (Clip): has 4 inputs; opset 17 allows 1..3"),
    ("y, z = Relu(x)", "node '<unnamed>' (Relu): has 2 outputs; opset 17 allows 1"),
    ("y = Conv(x, , x)", "node '<unnamed>' (Conv): required input 1 (W) is omitted"),
    ("y = Relu <alpha = 0.5> (x)", "node '<unnamed>' (Relu): attribute 'alpha' is not "
                                   "defined for Relu in opset 17"),
    ("y = Cast(x)", "node '<unnamed>' (Cast): required attribute 'to' is missing"),
    ("y = Cast <to = 1.0> (x)", "node '<unnamed>' (Cast): attribute 'to' is FLOAT, schema "
                                "wants INT"),
    ("y = Frobnicate(x)", "node '<unnamed>' (Frobnicate): no operator 'Frobnicate' in opset 17 "
                          "of domain 'ai.onnx'"),
    ("y = Gelu(x)", "node '<unnamed>' (Gelu): no operator 'Gelu' in opset 17 of domain "
                    "'ai.onnx'"),
    ("y = acme.Foo(x)", "node '<unnamed>' (Foo): domain 'acme' has no opset import"),
], ids=["too-many-inputs", "too-few-inputs", "variadic-empty", "too-many-optional",
        "too-many-outputs", "required-input-omitted", "unknown-attribute",
        "missing-required-attribute", "wrong-attribute-type", "unknown-op", "op-from-later-opset",
        "domain-not-imported"])
def test_schema_rules(body, message):
    outputs = "float[2] y, float[2] z" if body.startswith("y, z") else "float[2] y"
    model = one_node(body, outputs=outputs)
    assert only_error(model) == f"graph 'g': {message}"
    ir.verify(model, "structure")  # schema rules are types-level


def test_schema_follows_the_model_opset():
    ir.verify(one_node("y = Gelu(x)", opsets='"" : 20'))
    model = one_node("y = Relu(x)", opsets='"ai.onnx" : 17')  # the default domain's long name
    ir.verify(model)


def test_subgraph_nodes_are_schema_checked():
    model = parse_model(IF_CAPTURE)
    then_g = next(model.graph.nodes[1].subgraphs())
    then_g.nodes[0].attrs["alpha"] = 1.0
    assert only_error(model) == ("graph 'then_g': node '<unnamed>' (Neg): attribute 'alpha' is "
                                 "not defined for Neg in opset 17")


def test_unknown_op_in_a_custom_domain_is_accepted():
    ir.verify(one_node("y = acme.Foo <anything = 3> (x, x)", opsets='"" : 17, "acme" : 1'))


def test_op_of_a_custom_domain_does_not_borrow_the_default_version():
    model = one_node("y = acme.Foo(x)", opsets='"ai.onnx" : 17')
    assert only_error(model) == ("graph 'g': node '<unnamed>' (Foo): domain 'acme' has no "
                                 "opset import")


def test_onnx_ml_domain_is_schema_checked():
    model = one_node("y = ai.onnx.ml.Frob(x)", opsets='"" : 17, "ai.onnx.ml" : 3')
    assert only_error(model) == ("graph 'g': node '<unnamed>' (Frob): no operator 'Frob' in "
                                 "opset 3 of domain 'ai.onnx.ml'")


LOCAL_FUNCTION = """<ir_version: 9, opset_import: ["" : 17, "local" : 1]>
g (float[2] x) => (float[2] y) { y = local.MyRelu(x) }
<domain: "local", opset_import: ["" : 17]>
MyRelu (a) => (b) { b = Relu(a) }"""


def test_call_of_a_model_local_function_is_accepted():
    model = parse_model(LOCAL_FUNCTION)
    assert [f.name for f in model.functions] == ["MyRelu"]
    ir.verify(model, "onnx")
    model.opset_imports.pop("local")  # onnx requires the function's domain to be imported
    assert only_error(model) == ("graph 'g': node '<unnamed>' (MyRelu): domain 'local' has no "
                                 "opset import")


def test_model_local_function_shadowing_an_onnx_op_name():
    # A local function named like no ONNX op but living in the default-domain's namespace
    # would be refused; in its own domain it is accepted with any arity and attributes.
    model = parse_model(LOCAL_FUNCTION)
    model.graph.nodes[0].set_inputs([model.graph.inputs[0]] * 3)
    ir.verify(model)


# -- shape hooks -----------------------------------------------------------------------------
CONV = """<ir_version: 9, opset_import: ["" : 17]>
g (float[1,4,5,5] x) => (float[1,6,5,5] y)
  <float[6,2,1,1] w = {@W@}, float[6] b = {0.0, 0.0, 0.0, 0.0, 0.0, 0.0}> {
  y = Conv <group = 2> (x, w, b)
}""".replace("@W@", ", ".join(["1.0"] * 12))


def test_conv_hook_accepts_a_consistent_conv():
    ir.verify(parse_model(CONV), "onnx")


def test_conv_weight_channels_times_group():
    model = parse_model(CONV)
    model.graph.nodes[0].attrs["group"] = 1
    assert only_error(model) == ("graph 'g': node '<unnamed>' (Conv): weight 'w' has 2 input "
                                 "channels x group 1 != 4 channels of 'x'")


def test_conv_bias_length():
    model = parse_model(CONV)
    b = model.graph.initializers["b"]
    conv = model.graph.nodes[0]
    b5 = model.graph.add_initializer("b5", ir.ArrayTensor(np.zeros(5, np.float32)))
    conv.set_input(2, b5)
    del model.graph.initializers["b"]
    assert b.uses() == ()
    assert only_error(model) == ("graph 'g': node '<unnamed>' (Conv): bias 'b5' has shape [5], "
                                 "expected [6]")
    scalar = model.graph.add_initializer("s", ir.ArrayTensor(np.zeros((), np.float32)))
    conv.set_input(2, scalar)
    assert "bias 's' has shape [], expected [6]" in _errors(model)[0]


def test_conv_hook_tolerates_missing_inputs_and_unknown_shapes():
    model = one_node("y = Conv(x)", inputs="float[1,4,5,5] x")
    assert only_error(model) == ("graph 'g': node '<unnamed>' (Conv): has 1 input; opset 17 "
                                 "allows 2..3")
    ir.verify(one_node("y = Conv(x, w)", inputs="float[N,C,H,W] x, float[M,K,1,1] w"))


BN = """<ir_version: 9, opset_import: ["" : 17]>
g (float[1,3,2,2] x, float[3] s, float[3] bias, float[3] mean, float[%s] var)
  => (float[1,3,2,2] y) { y = BatchNormalization(x, s, bias, mean, var) }"""


def test_batchnorm_parameter_lengths():
    ir.verify(parse_model(BN % "3"))
    assert only_error(parse_model(BN % "4")) == (
        "graph 'g': node '<unnamed>' (BatchNormalization): parameter 'var' has shape [4], "
        "expected [3]")
    ir.verify(parse_model(BN % "K"))  # symbolic: not known to be wrong


QDQ = """<ir_version: 9, opset_import: ["" : 21]>
g (float[2,4] x) => (float[2,4] y)
  <float[%s] scale = {%s}, uint8[%s] zp = {%s}> {
  q = QuantizeLinear <axis = %d> (x, scale, zp)
  y = DequantizeLinear <axis = %d> (q, scale, zp)
}"""


def qdq(scale_n: int, zp_n: int, axis: int = 1) -> ir.Model:
    return parse_model(QDQ % (scale_n, ", ".join(["0.5"] * scale_n), zp_n,
                              ", ".join(["1"] * zp_n), axis, axis))


def test_qdq_hooks_accept_per_tensor_and_per_axis():
    ir.verify(qdq(1, 1), "onnx")
    ir.verify(qdq(4, 4), "onnx")
    ir.verify(qdq(2, 2, axis=0), "onnx")
    model = parse_model(OPSET.replace("17", "21") + """
        g (float[2,4] x) => (float[2,4] y) <float s = {0.5}, uint8[1] z = {1}> {
          y = DequantizeLinear(x, s, z)
        }""".replace("float[2,4] x", "uint8[2,4] x"))
    ir.verify(model)  # a scalar scale with a one-element zero point: both per-tensor


def test_qdq_scale_and_zero_point_shapes_differ():
    errors = _errors(qdq(4, 2))
    assert errors == [
        "graph 'g': node '<unnamed>' (QuantizeLinear): zero point 'zp' [2] and scale 'scale' "
        "[4] differ in shape",
        "graph 'g': node '<unnamed>' (DequantizeLinear): zero point 'zp' [2] and scale 'scale' "
        "[4] differ in shape"]


def test_qdq_per_axis_length():
    # Only QuantizeLinear is reported: the shape of q (DequantizeLinear's input) is unknown.
    assert _errors(qdq(3, 3)) == [
        "graph 'g': node '<unnamed>' (QuantizeLinear): per-axis scale 'scale' has 3 entries "
        "for axis of size 4"]
    errors = _errors(qdq(4, 4, axis=0))  # axis 0 has 2 entries
    assert errors[0].endswith("per-axis scale 'scale' has 4 entries for axis of size 2")


# -- levels and reporting --------------------------------------------------------------------
def test_structure_level_skips_types_checks():
    model = one_node('y = Frobnicate <colour = "red"> (x, x)')
    ir.verify(model, "structure")
    with pytest.raises(ir.VerificationError, match="no operator 'Frobnicate'"):
        ir.verify(model)


def test_onnx_level_runs_the_onnx_checker():
    model = one_node("y = Add(x, n)", inputs="float[2] x, int64[2] n")
    ir.verify(model)  # types-level rules do not look at tensor element types
    with pytest.raises(ir.VerificationError) as info:
        ir.verify(model, "onnx")
    assert str(info.value) == ("onnx.checker: [ShapeInferenceError] (op_type:Add): B has "
                               "inconsistent type tensor(int64)")


def test_onnx_level_reports_its_own_problems_first():
    model = parse_model(CHAIN)
    model.graph.outputs.append(ir.Value("nowhere"))
    with pytest.raises(ir.VerificationError, match=r"^graph 'g': graph output 1 'nowhere'"):
        ir.verify(model, "onnx")


def test_message_counts_further_problems_and_lists_them():
    model = parse_model(CHAIN)
    relu, neg, abs_ = model.graph.nodes
    relu.attrs["alpha"] = 0.5
    neg.attrs["beta"] = 1
    abs_.attrs["gamma"] = "g"
    with pytest.raises(ir.VerificationError) as info:
        ir.verify(model)
    assert str(info.value) == ("graph 'g': node '<unnamed>' (Relu): attribute 'alpha' is not "
                               "defined for Relu in opset 17 (and 2 more problems)")
    assert info.value.errors == [
        "graph 'g': node '<unnamed>' (Relu): attribute 'alpha' is not defined for Relu in "
        "opset 17",
        "graph 'g': node '<unnamed>' (Neg): attribute 'beta' is not defined for Neg in opset 17",
        "graph 'g': node '<unnamed>' (Abs): attribute 'gamma' is not defined for Abs in "
        "opset 17"]
    del abs_.attrs["gamma"]
    with pytest.raises(ir.VerificationError, match=r"opset 17 \(and 1 more problem\)$"):
        ir.verify(model)
    assert isinstance(info.value, ir.EdgeoptError)


def test_named_nodes_are_named_in_messages():
    model = one_node("y = Relu <alpha = 0.5> (x)")
    model.graph.nodes[0].name = "act1"
    assert only_error(model) == ("graph 'g': node 'act1' (Relu): attribute 'alpha' is not "
                                 "defined for Relu in opset 17")


# -- real models -------------------------------------------------------------------------------
REAL_MODELS = sorted(glob.glob(os.path.join(ONNX_TEST_DATA, "light", "*.onnx"))) + sorted(
    glob.glob(os.path.join(ONNX_TEST_DATA, "pytorch-*", "*", "model.onnx")))


def test_real_models_were_found():
    assert len(REAL_MODELS) > 100


@pytest.mark.parametrize("path", REAL_MODELS,
                         ids=[os.path.relpath(p, ONNX_TEST_DATA) for p in REAL_MODELS])
def test_real_models_verify(path):
    model = ir.load(path)
    ir.verify(model)
    ir.verify(model.clone())


def _errors(model: ir.Model, level: str = "types") -> list[str]:
    """Every problem ``verify`` finds, or [] when it passes."""
    try:
        ir.verify(model, level)
    except ir.VerificationError as e:
        return list(e.errors)
    return []


def test_errors_helper_sees_a_clean_model():
    assert _errors(parse_model(CHAIN)) == []
    assert re.fullmatch(r".*'nope'.*", _errors(one_node("y = Relu(nope)"))[0])
