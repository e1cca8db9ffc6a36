"""The IR's mutators keep use-def chains, role flags and versions right by construction.

Graphs are tiny: ONNX text syntax through ``parse_model``, or built by hand from ``Value`` /
``Node`` / ``Graph``. Every test checks the exact edges (``uses()`` against a recomputation
from the node inputs), and most end with ``ir.verify``.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
from conftest import SCAN_CAPTURE, parse_model

from edgeopt import ir
from edgeopt.ir import Use

CHAIN = """<ir_version: 9, opset_import: ["" : 17]>
g (float[2] x) => (float[2] y) {
  a = Add(x, x)
  b = Relu(a)
  y = Mul(a, b)
}"""

# An If whose branches capture the outer value `a`.
IF_CAPTURE = """<ir_version: 9, opset_import: ["" : 17]>
g (bool c, float[2] x) => (float[2] y) {
  a = Relu(x)
  y = If(c) <then_branch = then_g () => (float[2] t) { t = Neg(a) },
             else_branch = else_g () => (float[2] e) { e = Identity(a) }>
}"""

# The else branch returns the outer `a` itself. ONNX Runtime refuses this (verify reports it),
# but the IR must still keep roles right for it: files like this exist and get repaired.
IF_RETURNS_OUTER = IF_CAPTURE.replace("(float[2] e) { e = Identity(a) }", "(float[2] a) {}")

LOOP_CAPTURE = """<ir_version: 9, opset_import: ["" : 17]>
g (int64 n, bool go, float[2] x) => (float[2] y) {
  w = Relu(x)
  y = Loop(n, go, x) <body = body (int64 i, bool c_in, float[2] acc) => (bool c_out, float[2] s) {
    c_out = Identity(c_in)
    s = Add(acc, w)
  }>
}"""


# Two levels of nesting: the inner If reads the main graph's `a`.
NESTED_CAPTURE = """<ir_version: 9, opset_import: ["" : 17]>
g (bool c, float[2] x) => (float[2] y) {
  a = Relu(x)
  y = If(c) <
    then_branch = outer_then () => (float[2] t) {
      t = If(c) <then_branch = inner_then () => (float[2] u) { u = Neg(a) },
                 else_branch = inner_else () => (float[2] v) { v = Abs(x) }>
    },
    else_branch = outer_else () => (float[2] e) { i = Identity(x)  e = Abs(i) }>
}"""


def node_named(model: ir.Model, output_name: str) -> ir.Node:
    """The node (at any depth) producing the value named ``output_name``."""
    return next(n for n in model.walk() if any(v.name == output_name for v in n.outputs))


def value_named(model: ir.Model, name: str) -> ir.Value:
    """The value named ``name``: a graph input, initializer or node output at any depth."""
    graphs = [model.graph, *model.graph.subgraphs()]
    for g in graphs:
        for v in [*g.inputs, *g.initializers.values()]:
            if v.name == name:
                return v
    return node_named(model, name).outputs[[v.name for v in node_named(model, name).outputs]
                                           .index(name)]


def assert_uses_consistent(model: ir.Model) -> None:
    """Every value's use list equals the one recomputed from all node inputs in the model."""
    expected: dict[int, list[Use]] = {}
    values: dict[int, ir.Value] = {}
    for node in model.walk():
        for i, v in enumerate(node.inputs):
            if v is not None:
                expected.setdefault(id(v), []).append(Use(node, i))
                values[id(v)] = v
        for v in node.outputs:
            values[id(v)] = v
    for g in [model.graph, *model.graph.subgraphs()]:
        for v in [*g.inputs, *g.initializers.values(), *g.outputs]:
            values[id(v)] = v
    for key, v in values.items():
        assert set(v.uses()) == set(expected.get(key, [])), v


# -- use lists -----------------------------------------------------------------------------
def test_use_lists_after_parsing():
    model = parse_model(CHAIN)
    add, relu, mul = model.graph.nodes
    x, a, b = model.graph.inputs[0], add.outputs[0], relu.outputs[0]
    assert x.uses() == (Use(add, 0), Use(add, 1))
    assert x.consumers() == (add,)
    assert a.uses() == (Use(relu, 0), Use(mul, 0))
    assert a.consumers() == (relu, mul)
    assert b.uses() == (Use(mul, 1),)
    assert (a.producer(), a.index(), x.producer(), x.index()) == (add, 0, None, None)
    assert add.successors() == (relu, mul)
    assert mul.predecessors() == (add, relu)
    assert add.predecessors() == ()
    assert mul.outputs[0].uses() == () and mul.outputs[0].is_graph_output()
    assert_uses_consistent(model)
    ir.verify(model)


def test_use_lists_of_hand_built_graph():
    x = ir.Value("x", ir.DataType.FLOAT, (2,))
    w = ir.Value("w", const_value=ir.ArrayTensor(np.ones(2, np.float32)))
    add = ir.Node("Add", [x, w], name="add")
    assert x.uses() == (Use(add, 0),)  # registered at construction, before insertion
    assert add.graph is None and x.graph is None
    clip = ir.Node("Clip", [add.outputs[0], None, w], name="clip")  # omitted optional input
    add.outputs[0].name, clip.outputs[0].name = "s", "y"
    graph = ir.Graph([x], [clip.outputs[0]], [add, clip], [w], name="g")
    assert w.uses() == (Use(add, 1), Use(clip, 2))
    assert clip.inputs[1] is None
    assert (x.graph, w.graph, add.outputs[0].graph) == (graph, graph, graph)
    model = ir.Model(graph, {"": 17})
    assert_uses_consistent(model)
    ir.verify(model)


def test_node_refuses_outputs_that_are_already_defined():
    graph = ir.Graph(name="g")  # no nodes: an empty graph must not be mistaken for "none"
    w = graph.add_initializer("w", ir.ArrayTensor(np.zeros(2, np.float32)))
    with pytest.raises(ValueError, match=r"^value 'w' already has a definition$"):
        ir.Node("Relu", [], outputs=[w])
    x = ir.Value("x")
    graph.inputs.append(x)
    with pytest.raises(ValueError, match=r"^value 'x' already has a definition$"):
        ir.Node("Relu", [], outputs=[x])
    relu = ir.Node("Relu", [x])
    with pytest.raises(ValueError, match=r"^value '' already has a definition$"):
        ir.Node("Neg", [x], outputs=[relu.outputs[0]])
    fresh = ir.Value("f")
    with pytest.raises(ValueError, match=r"^a node cannot list the same value as two outputs$"):
        ir.Node("Split", [x], outputs=[fresh, fresh])
    assert fresh.producer() is None and x.uses() == (Use(relu, 0),)  # refusals left no trace
    with pytest.raises(ValueError, match=r"^value 'w' already has a definition$"):
        relu.append_output(w)


def test_append_output():
    model = parse_model(CHAIN)
    relu = model.graph.nodes[1]
    extra = relu.append_output(ir.Value("extra"))
    assert relu.outputs[1] is extra and (extra.producer(), extra.index()) == (relu, 1)
    unnamed = relu.append_output()
    assert unnamed.name == "" and unnamed.index() == 2


# -- set_input / set_inputs ------------------------------------------------------------------
def test_set_input_moves_the_use():
    model = parse_model(CHAIN)
    add, relu, mul = model.graph.nodes
    x, a, b = model.graph.inputs[0], add.outputs[0], relu.outputs[0]
    before = model.version
    mul.set_input(0, x)
    assert mul.inputs == (x, b)
    assert a.uses() == (Use(relu, 0),)
    assert x.uses() == (Use(add, 0), Use(add, 1), Use(mul, 0))
    assert model.version > before
    before = model.version
    mul.set_input(0, x)  # same value: nothing changes, not even the version
    assert model.version == before
    assert_uses_consistent(model)
    ir.verify(model)


def test_set_input_to_none_and_back():
    model = parse_model("""<ir_version: 9, opset_import: ["" : 17]>
        g (float[2] x, float lo) => (float[2] y) { y = Clip(x, lo) }""")
    clip = model.graph.nodes[0]
    lo = model.graph.inputs[1]
    clip.set_input(1, None)
    assert clip.inputs == (model.graph.inputs[0], None) and lo.uses() == ()
    clip.set_input(1, lo)
    assert lo.uses() == (Use(clip, 1),)
    with pytest.raises(IndexError):
        clip.set_input(2, lo)  # set_input never grows the input list
    assert lo.uses() == (Use(clip, 1),)


def test_set_inputs_changes_arity_and_uses():
    model = parse_model(CHAIN)
    add, relu, mul = model.graph.nodes
    x, a = model.graph.inputs[0], add.outputs[0]
    add.set_inputs([x])
    assert add.inputs == (x,) and x.uses() == (Use(add, 0),)
    mul.set_inputs([a, a, a])
    assert a.uses() == (Use(relu, 0), Use(mul, 0), Use(mul, 1), Use(mul, 2))
    assert relu.outputs[0].uses() == ()
    mul.set_inputs([])
    assert a.uses() == (Use(relu, 0),)
    assert_uses_consistent(model)


# -- replace_all_uses_with -------------------------------------------------------------------
def test_replace_all_uses_with():
    model = parse_model(CHAIN)
    add, relu, mul = model.graph.nodes
    x, a = model.graph.inputs[0], add.outputs[0]
    a.replace_all_uses_with(x)
    assert relu.inputs == (x,) and mul.inputs[0] is x
    assert a.uses() == ()
    assert x.uses() == (Use(add, 0), Use(add, 1), Use(relu, 0), Use(mul, 0))
    before = model.version
    x.replace_all_uses_with(x)  # onto itself: a no-op
    assert model.version == before
    model.graph.remove(add)  # now dead, so safe removal succeeds
    assert_uses_consistent(model)
    ir.verify(model)


def test_replace_all_uses_with_graph_outputs_flag():
    model = parse_model(CHAIN)
    _add, relu, mul = model.graph.nodes
    y, b = mul.outputs[0], relu.outputs[0]
    y.replace_all_uses_with(b)
    assert list(model.graph.outputs) == [y]  # public output names stay by default
    assert y.is_graph_output() and not b.is_graph_output()
    y.replace_all_uses_with(b, replace_graph_outputs=True)
    assert list(model.graph.outputs) == [b]
    assert b.is_graph_output() and not y.is_graph_output()
    model.graph.remove(mul)
    assert [n.op_type for n in model.graph] == ["Add", "Relu"]
    ir.verify(model)


def test_replace_all_uses_with_reaches_into_subgraphs():
    model = parse_model(IF_CAPTURE)
    relu, if_node = model.graph.nodes
    then_g, else_g = if_node.subgraphs()
    neg, ident = then_g.nodes[0], else_g.nodes[0]
    x, a = model.graph.inputs[1], relu.outputs[0]
    assert a.uses() == (Use(neg, 0), Use(ident, 0))
    before = (model.version, then_g.version, else_g.version)
    a.replace_all_uses_with(x)
    assert neg.inputs == (x,) and ident.inputs == (x,)  # the captures now read x
    assert a.uses() == ()
    assert x.uses() == (Use(relu, 0), Use(neg, 0), Use(ident, 0))
    after = (model.version, then_g.version, else_g.version)
    assert all(n > o for n, o in zip(after, before, strict=True))
    model.graph.remove(relu)
    assert_uses_consistent(model)
    ir.verify(model)


def test_replace_all_uses_with_leaves_subgraph_outputs_unless_asked():
    model = parse_model(IF_RETURNS_OUTER)
    relu, if_node = model.graph.nodes
    else_g = list(if_node.subgraphs())[1]
    x, a = model.graph.inputs[1], relu.outputs[0]
    a.replace_all_uses_with(x)
    assert list(else_g.outputs) == [a] and a.is_graph_output()
    with pytest.raises(ValueError, match=r"output 'a' is an output of subgraph 'else_g'$"):
        model.graph.remove(relu)
    a.replace_all_uses_with(x, replace_graph_outputs=True)
    assert list(else_g.outputs) == [x] and not a.is_graph_output()
    model.graph.remove(relu)
    assert [n.op_type for n in model.walk()] == ["If", "Neg"]
    with pytest.raises(ir.VerificationError, match="graph output 0 'x' is a value of an "
                                                   "enclosing graph"):
        ir.verify(model)


# -- remove ----------------------------------------------------------------------------------
def test_remove_refuses_a_used_node_with_exact_message():
    model = parse_model(CHAIN)
    add, relu, mul = model.graph.nodes
    with pytest.raises(ValueError, match=re.escape(
            "cannot remove Node('': a = Add(x, x)): output 'a' is still used by "
            "Node('': b = Relu(a))")):
        model.graph.remove(add)
    with pytest.raises(ValueError, match=re.escape(
            "cannot remove Node('': y = Mul(a, b)): output 'y' is a graph output")):
        model.graph.remove(mul)
    # A batch is checked as a whole before anything goes: mul still reads both outputs.
    with pytest.raises(ValueError, match=re.escape(
            "cannot remove Node('': a = Add(x, x)): output 'a' is still used by "
            "Node('': y = Mul(a, b))")):
        model.graph.remove([add, relu])
    assert model.graph.nodes == [add, relu, mul]
    assert add.inputs and relu.inputs  # nothing was detached by the refused call
    assert_uses_consistent(model)
    ir.verify(model)


def test_remove_refuses_a_node_of_another_graph():
    model = parse_model(CHAIN)
    stray = ir.Node("Relu", [model.graph.inputs[0]], name="stray")
    with pytest.raises(ValueError, match=r"^Node\('stray':  = Relu\(x\)\) is not in graph 'g'$"):
        model.graph.remove(stray)


def test_remove_batch_of_a_dead_chain_in_any_order():
    model = parse_model("""<ir_version: 9, opset_import: ["" : 17]>
        g (float[2] x) => (float[2] y) { a = Relu(x) b = Neg(a) c = Abs(b) y = Identity(x) }""")
    relu, neg, abs_, ident = model.graph.nodes
    x = model.graph.inputs[0]
    before = model.version
    model.graph.remove([abs_, relu, neg])  # consumers before or after producers: both fine
    assert model.graph.nodes == [ident] and len(model.graph) == 1
    assert x.uses() == (Use(ident, 0),)
    assert relu.inputs == () and relu.graph is None
    assert model.version > before
    ir.verify(model)


def test_remove_ignores_duplicates_in_a_batch():
    model = parse_model("""<ir_version: 9, opset_import: ["" : 17]>
        g (float[2] x) => (float[2] y) { a = Relu(x) y = Neg(x) }""")
    relu, neg = model.graph.nodes
    model.graph.remove([relu, relu])
    assert model.graph.nodes == [neg] and len(model.graph) == 1
    ir.verify(model)


def test_remove_unsafe_then_rewire():
    model = parse_model(CHAIN)
    add, _relu, _mul = model.graph.nodes
    x, a = model.graph.inputs[0], add.outputs[0]
    model.graph.remove(add, safe=False)
    with pytest.raises(ir.VerificationError, match="'a' is not defined"):
        ir.verify(model)
    a.replace_all_uses_with(x)
    ir.verify(model)
    assert_uses_consistent(model)


def test_removing_an_if_detaches_the_captures_of_its_branches():
    model = parse_model(IF_CAPTURE)
    relu, if_node = model.graph.nodes
    a = relu.outputs[0]
    then_g, else_g = if_node.subgraphs()
    neg, ident = then_g.nodes[0], else_g.nodes[0]
    assert a.uses() == (Use(neg, 0), Use(ident, 0))
    with pytest.raises(ValueError, match=re.escape(
            "cannot remove Node('': a = Relu(x)): output 'a' is still used by "
            "Node('': t = Neg(a))")):
        model.graph.remove(relu)
    if_node.outputs[0].replace_all_uses_with(a, replace_graph_outputs=True)
    model.graph.remove(if_node)
    assert a.uses() == ()
    assert list(model.graph.outputs) == [a]
    assert not model.graph.inputs[0].uses()  # the condition input is released too
    ir.verify(model)


def test_removing_an_if_releases_its_branch_outputs():
    model = parse_model(IF_RETURNS_OUTER)
    relu, if_node = model.graph.nodes
    a = relu.outputs[0]
    assert a.is_graph_output()  # of else_g
    model.graph.outputs[0] = model.graph.inputs[1]
    model.graph.remove(if_node)
    # `a` was an output of the dead else branch; that role must not outlive the branch.
    assert not a.is_graph_output()
    model.graph.remove(relu)
    assert len(model.graph) == 0
    ir.verify(model)


def test_removing_an_if_with_its_producer_in_one_batch():
    model = parse_model(IF_RETURNS_OUTER)
    relu, if_node = model.graph.nodes
    model.graph.outputs[0] = model.graph.inputs[1]  # make both nodes dead
    model.graph.remove([relu, if_node])  # else_g returning `a` goes with the batch
    assert len(model.graph) == 0
    assert not relu.outputs[0].is_graph_output() and relu.outputs[0].uses() == ()
    ir.verify(model)


# -- insertion and iteration -------------------------------------------------------------------
def test_insert_before_after_append_keep_order():
    model = parse_model(CHAIN)
    graph = model.graph
    add, relu, mul = graph.nodes
    x = graph.inputs[0]
    n1, n2, n3, n4 = (ir.Node("Identity", [x], name=f"n{i}") for i in range(1, 5))
    graph.insert_before(relu, [n1, n2])
    graph.insert_after(relu, n3)
    graph.append(n4)
    assert graph.nodes == [add, n1, n2, relu, n3, mul, n4] and len(graph) == 7
    graph.insert_before(add, ir.Node("Identity", [x], name="first"))
    graph.insert_after(n4, ir.Node("Identity", [x], name="last"))
    assert [n.name for n in graph][::8] == ["first", "last"]
    assert all(n.graph is graph for n in graph)
    ir.verify(model)


def test_insert_moves_a_node_within_the_graph_without_touching_edges():
    model = parse_model(CHAIN)
    graph = model.graph
    add, relu, mul = graph.nodes
    uses = relu.outputs[0].uses()
    graph.insert_before(add, relu)  # now out of order: a moved node keeps its edges
    assert graph.nodes == [relu, add, mul] and relu.outputs[0].uses() == uses
    with pytest.raises(ir.VerificationError, match="is used before it is defined"):
        ir.verify(model)
    graph.insert_after(add, relu)
    assert graph.nodes == [add, relu, mul] and len(graph) == 3
    graph.append(add)
    assert graph.nodes == [relu, mul, add]
    graph.toposort()
    assert graph.nodes == [add, relu, mul]
    ir.verify(model)


def test_insert_refusals():
    model = parse_model(CHAIN)
    other = parse_model(CHAIN)
    graph = model.graph
    add, relu, mul = graph.nodes
    foreign = other.graph.nodes[0]
    with pytest.raises(ValueError, match=r"^Node\('': a = Add\(x, x\)\) already belongs to "
                                         r"graph 'g'$"):
        graph.append(foreign)
    with pytest.raises(ValueError, match=r"is not in graph 'g'$"):
        graph.insert_before(foreign, ir.Node("Relu", [graph.inputs[0]]))
    with pytest.raises(ValueError, match=r"next to itself$"):
        graph.insert_after(relu, [mul, relu])
    fresh = ir.Node("Relu", [graph.inputs[0]])
    with pytest.raises(ValueError, match=r"^a node is listed twice for insertion$"):
        graph.insert_after(relu, [fresh, fresh])
    assert graph.nodes == [add, relu, mul]  # every refusal happened before any change
    if_model = parse_model(IF_CAPTURE)
    if_node = if_model.graph.nodes[1]
    then_g = next(if_node.subgraphs())
    if_model.graph.remove(if_node, safe=False)
    with pytest.raises(ValueError, match="into its own subgraph"):
        then_g.append(if_node)


def test_remove_and_insert_while_iterating():
    model = parse_model("""<ir_version: 9, opset_import: ["" : 17]>
        g (float[2] x) => (float[2] y) {
          a = Identity(x)  b = Relu(a)  c = Identity(b)  y = Neg(c)
        }""")
    graph = model.graph
    seen = []
    for node in graph:  # fold every Identity while iterating
        seen.append(node.op_type)
        if node.op_type == "Identity":
            node.outputs[0].replace_all_uses_with(node.inputs[0])
            graph.remove(node)
            graph.insert_before(graph.nodes[-1], ir.Node("Abs", [graph.inputs[0]], name="new"))
    assert seen == ["Identity", "Relu", "Identity", "Neg"]  # inserted nodes are not visited
    assert [n.op_type for n in graph] == ["Relu", "Abs", "Abs", "Neg"]
    for node in graph:  # removing a node that was not yet visited skips it
        if node.op_type == "Relu":
            graph.remove(graph.nodes[1])
        assert node.graph is graph
    assert [n.op_type for n in graph] == ["Relu", "Abs", "Neg"]
    assert_uses_consistent(model)
    ir.verify(model)


def test_walk_is_recursive_and_safe_to_edit():
    model = parse_model(NESTED_CAPTURE)
    ops = [n.op_type for n in model.walk()]
    assert ops == ["Relu", "If", "If", "Neg", "Abs", "Identity", "Abs"]
    for node in model.walk():
        if node.op_type == "Identity":
            node.outputs[0].replace_all_uses_with(node.inputs[0])
            node.graph.remove(node)
    assert [n.op_type for n in model.walk()] == ["Relu", "If", "If", "Neg", "Abs", "Abs"]
    assert len(list(model.graph.subgraphs())) == 4
    ir.verify(model)


# -- toposort --------------------------------------------------------------------------------
def test_toposort_leaves_a_sorted_graph_alone():
    model = parse_model("""<ir_version: 9, opset_import: ["" : 17]>
        g (float[2] x) => (float[2] y) { p = Neg(x) q = Abs(x) r = Relu(x) y = Sum(p, q, r) }""")
    nodes = model.graph.nodes
    before = model.version
    model.graph.toposort()
    assert model.graph.nodes == nodes and model.version == before


def test_toposort_sorts_a_shuffled_graph_stably():
    x = ir.Value("x", ir.DataType.FLOAT, (2,))
    a = ir.Node("Relu", [x], name="a")
    b = ir.Node("Neg", [a.outputs[0]], name="b")
    c = ir.Node("Abs", [x], name="c")  # independent of a and b
    d = ir.Node("Sum", [b.outputs[0], c.outputs[0]], name="d")
    for n in (a, b, c, d):
        n.outputs[0].name = n.name
    graph = ir.Graph([x], [d.outputs[0]], [d, b, c, a], name="g")
    model = ir.Model(graph, {"": 17})
    with pytest.raises(ir.VerificationError):
        ir.verify(model)
    before = model.version
    graph.toposort()
    # c is ready at once but a comes first among ready nodes only after c (stable by position).
    assert [n.name for n in graph] == ["c", "a", "b", "d"]
    assert model.version > before
    ir.verify(model)


def test_toposort_counts_subgraph_captures_as_dependencies():
    model = parse_model(IF_CAPTURE)
    relu, if_node = model.graph.nodes
    model.graph.insert_before(relu, if_node)  # the If now comes before what it captures
    with pytest.raises(ir.VerificationError, match=r"input 0 'a' is used before it is defined"):
        ir.verify(model)
    model.graph.toposort()
    assert model.graph.nodes == [relu, if_node]
    ir.verify(model)


def test_toposort_counts_subgraph_outputs_as_dependencies():
    model = parse_model(IF_RETURNS_OUTER)
    relu, if_node = model.graph.nodes
    neg = next(if_node.subgraphs()).nodes[0]
    neg.set_input(0, model.graph.inputs[1])  # only else_g's output still refers to `a`
    model.graph.insert_before(relu, if_node)
    model.graph.toposort()
    assert model.graph.nodes == [relu, if_node]


def test_toposort_sorts_subgraphs_too():
    model = parse_model(NESTED_CAPTURE)
    inner_then = next(g for g in model.graph.subgraphs() if g.name == "inner_then")
    outer_then = next(g for g in model.graph.subgraphs() if g.name == "outer_then")
    neg = inner_then.nodes[0]
    extra = ir.Node("Abs", [neg.outputs[0]], outputs=[ir.Value("u2")])
    inner_then.insert_before(neg, extra)
    inner_then.outputs[0] = extra.outputs[0]
    before = outer_then.version
    model.graph.toposort()
    assert inner_then.nodes == [neg, extra]
    assert outer_then.version > before
    ir.verify(model)


def test_toposort_reports_a_cycle():
    model = parse_model(CHAIN)
    add, _relu, mul = model.graph.nodes
    add.set_input(1, mul.outputs[0])  # a = Add(x, y) and y depends on a
    nodes = model.graph.nodes
    with pytest.raises(ir.VerificationError, match=re.escape(
            "graph 'g' has a cycle through Node('': a = Add(x, y))")):
        model.graph.toposort()
    assert model.graph.nodes == nodes  # left as it was


# -- versions --------------------------------------------------------------------------------
def bumps(model: ir.Model, edit) -> bool:
    before = model.version
    edit()
    return model.version > before


def test_every_mutation_bumps_the_version():
    model = parse_model(IF_CAPTURE)
    graph = model.graph
    relu, if_node = graph.nodes
    then_g = next(if_node.subgraphs())
    neg = then_g.nodes[0]
    c, x = graph.inputs
    a = relu.outputs[0]
    w = ir.Value("w", const_value=ir.ArrayTensor(np.ones(2, np.float32)))
    edits = {
        "set_input": lambda: relu.set_input(0, c),
        "set_inputs": lambda: relu.set_inputs([x]),
        "subgraph edit": lambda: neg.set_input(0, x),
        "subgraph insert": lambda: then_g.append(ir.Node("Abs", [x])),
        "attribute assignment": lambda: relu.attrs.__setitem__("alpha", 0.5),
        "attribute deletion": lambda: relu.attrs.pop("alpha"),
        "subgraph attribute": lambda: neg.attrs.__setitem__("note", "n"),
        "initializer add": lambda: graph.initializers.add(w),
        "initializer rename": lambda: setattr(w, "name", "w2"),
        "initializer remove": lambda: graph.initializers.pop("w2"),
        "input append": lambda: graph.inputs.append(ir.Value("z")),
        "input delete": lambda: graph.inputs.pop(),
        "output edit": lambda: graph.outputs.append(a),
        "value rename": lambda: setattr(a, "name", "a2"),
        "dtype": lambda: setattr(a, "dtype", ir.DataType.DOUBLE),
        "shape": lambda: setattr(a, "shape", (3,)),
        "append_output": lambda: relu.append_output(),
        "insert": lambda: graph.insert_after(relu, ir.Node("Abs", [x])),
        "remove": lambda: graph.remove(graph.nodes[1]),
    }
    for what, edit in edits.items():
        assert bumps(model, edit), what
    assert model.version == graph.version


def test_no_op_edits_do_not_bump_the_version():
    model = parse_model(CHAIN)
    add, relu, mul = model.graph.nodes
    a = add.outputs[0]
    for edit in (lambda: relu.set_input(0, a), lambda: setattr(a, "name", "a"),
                 lambda: setattr(a, "shape", a.shape), lambda: model.graph.toposort(),
                 lambda: a.replace_all_uses_with(a), lambda: model.graph.append(mul)):
        assert not bumps(model, edit)


def test_subgraph_version_propagates_through_every_level():
    model = parse_model(NESTED_CAPTURE)
    inner = next(g for g in model.graph.subgraphs() if g.name == "inner_then")
    outer = inner.parent.graph
    assert outer.name == "outer_then" and inner.root is model.graph
    versions = (inner.version, outer.version, model.version)
    inner.nodes[0].attrs["note"] = "x"
    after = (inner.version, outer.version, model.version)
    assert all(n == o + 1 for n, o in zip(after, versions, strict=True))


# -- names and roles -------------------------------------------------------------------------
def test_renaming_an_initializer_rekeys_the_initializers():
    model = parse_model("""<ir_version: 9, opset_import: ["" : 17]>
        g (float[2] x) => (float[2] y) <float[2] w = {1.0, 2.0}, float[2] v = {3.0, 4.0}> {
          y = Add(x, w)
        }""")
    inits = model.graph.initializers
    w = inits["w"]
    w.name = "weight"
    assert list(inits) == ["v", "weight"] and inits["weight"] is w and "w" not in inits
    with pytest.raises(ValueError, match=r"^initializer name 'v' is already taken$"):
        w.name = "v"
    with pytest.raises(ValueError, match=r"^initializer 'weight': an initializer needs a name$"):
        w.name = ""
    assert w.name == "weight" and inits["weight"] is w
    assert ir.to_proto(model).graph.node[0].input[1] == "weight"
    ir.verify(model)


def test_initializer_container_keeps_roles():
    graph = ir.Graph(name="g")
    w = ir.Value("w", const_value=ir.ArrayTensor(np.zeros(3, np.float32)))
    graph.initializers["w"] = w
    assert w.is_initializer() and w.is_constant() and w.graph is graph
    with pytest.raises(ValueError, match=r"^initializer 'w' stored under name 'k'$"):
        graph.initializers["k"] = w
    with pytest.raises(ValueError, match=r"^initializer 'n' has no const_value$"):
        graph.initializers.add(ir.Value("n"))
    with pytest.raises(ValueError, match=r"^initializer name 'w' is already taken$"):
        graph.add_initializer("w", ir.ArrayTensor(np.zeros(1, np.float32)))
    with pytest.raises(ValueError, match=r"^an initializer needs a name$"):
        graph.add_initializer("", ir.ArrayTensor(np.zeros(1, np.float32)))
    v = ir.Value("v", const_value=ir.ArrayTensor(np.zeros(1, np.float32)))
    graph.initializers.update({"v": v})
    assert v.is_initializer()
    graph.initializers.clear()
    assert not w.is_initializer() and not v.is_initializer() and w.graph is None
    assert w.is_constant()  # the data stays with the value


def test_role_flags_follow_list_edits():
    graph = ir.Graph(name="g")
    x, z = ir.Value("x"), ir.Value("z")
    graph.inputs.extend([x, x])  # listed twice
    del graph.inputs[0]
    assert x.is_graph_input() and x.graph is graph  # still listed once
    graph.inputs.remove(x)
    assert not x.is_graph_input() and x.graph is None
    graph.inputs[:] = [x, z]
    graph.inputs[1] = x
    assert not z.is_graph_input() and x.is_graph_input()
    with pytest.raises(ValueError, match="attempt to assign sequence of size 1"):
        graph.inputs[::-1] = [z]  # an extended slice of the wrong length
    assert not z.is_graph_input() and list(graph.inputs) == [x, x]
    with pytest.raises(TypeError, match=r"^graph inputs hold Values, not str$"):
        graph.inputs.append("x")
    relu = graph.append(ir.Node("Relu", [x]))
    y = relu.outputs[0]
    with pytest.raises(ValueError, match=r"is produced by a node; it cannot be a graph input"):
        graph.inputs.append(y)
    graph.outputs.extend([y, y])
    graph.outputs.pop()
    assert y.is_graph_output()
    graph.outputs.clear()
    assert not y.is_graph_output()
    other = ir.Graph(name="other")
    with pytest.raises(ValueError, match=r"is already an input of another graph"):
        other.inputs.append(x)
    w = graph.add_initializer("w", ir.ArrayTensor(np.zeros(2, np.float32)))
    graph.inputs.append(w)  # an initializer that is also an input: an overridable default
    assert w.is_graph_input() and w.is_initializer()
    del graph.initializers["w"]
    assert w.is_graph_input() and not w.is_initializer() and w.graph is graph
    with pytest.raises(ValueError, match=r"is already an input of another graph"):
        other.inputs.append(w)


# -- subgraph captures ----------------------------------------------------------------------
@pytest.mark.parametrize(("text", "outer", "inner_op"), [
    (IF_CAPTURE, "a", "Neg"),
    (LOOP_CAPTURE, "w", "Add"),
    (SCAN_CAPTURE, "w", "Mul"),
    (NESTED_CAPTURE, "a", "Neg"),
], ids=["if", "loop", "scan", "nested-if"])
def test_outer_values_used_in_bodies_register_real_uses(text, outer, inner_op):
    model = parse_model(text)
    value = value_named(model, outer)
    inner = next(n for n in model.walk() if n.op_type == inner_op)
    assert inner.graph is not model.graph
    assert inner in value.consumers()
    assert Use(inner, inner.inputs.index(value)) in value.uses()
    with pytest.raises(ValueError, match=re.escape(
            f"output '{outer}' is still used by {inner!r}")):
        model.graph.remove(value.producer())
    # The capture is a dependency: a holder moved before the producer gets sorted back.
    holder = next(n for n in model.graph if list(n.subgraphs()))
    model.graph.insert_before(value.producer(), holder)
    with pytest.raises(ir.VerificationError, match=f"'{outer}' is used before it is defined"):
        ir.verify(model)
    model.graph.toposort()
    assert model.graph.nodes.index(holder) > model.graph.nodes.index(value.producer())
    assert_uses_consistent(model)
    ir.verify(model)


def test_subgraph_attributes_keep_parents():
    model = parse_model(IF_CAPTURE)
    if_node = model.graph.nodes[1]
    then_g, else_g = if_node.subgraphs()
    assert then_g.parent is if_node and then_g.root is model.graph
    with pytest.raises(ValueError, match=r"^graph 'then_g' already belongs to Node"):
        ir.Node("If", [model.graph.inputs[0]], {"then_branch": then_g})
    assert then_g.parent is if_node
    fresh = ir.Graph(name="fresh")
    fresh.outputs.append(model.graph.inputs[1])
    if_node.attrs["else_branch"] = fresh
    assert fresh.parent is if_node and else_g.parent is None
    assert if_node.attrs["else_branch"].type == ir.AttrType.GRAPH
    if_node.attrs.clear()
    assert then_g.parent is None and fresh.parent is None
    relu = model.graph.nodes[0]
    with pytest.raises(ValueError, match=r"^graph 'g' encloses Node\('': a = Relu\(x\)\); it "
                                         r"cannot be its subgraph$"):
        relu.attrs["body"] = model.graph
    assert model.graph.parent is None and "body" not in relu.attrs


def test_plain_node_fields_bump_the_version_and_empty_graphs_are_truthy():
    from edgeopt.ir import Graph, Node, Value

    x = Value("x")
    node = Node("Relu", [x], name="r")
    graph = Graph(inputs=[x], outputs=[node.outputs[0]])
    assert graph  # no nodes yet, still a graph
    graph.append(node)
    for field, value in (("op_type", "Sigmoid"), ("name", "s"), ("doc_string", "d"),
                         ("domain", "ai.onnx"), ("overload", "o")):
        before = graph.version
        setattr(node, field, value)
        assert graph.version == before + 1, field
        setattr(node, field, value)  # same value: not a change
        assert graph.version == before + 1, field
