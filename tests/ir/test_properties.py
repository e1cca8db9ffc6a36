"""Property tests: random DAGs under random edit sequences keep the IR's invariants.

A DAG has float inputs ``x0``/``x1``, a bool ``c``, a few initializers, and nodes drawn from
Add/Mul/Relu/Identity/Concat/If, each wired to random earlier values; an If's branches capture
outer values. Every value is typed (float, rank 1, known length), so the untouched DAGs are
valid ONNX that onnx.checker, ONNX Runtime and onnx's reference evaluator all accept.

Edits (each chosen so the graph stays structurally valid): replace_all_uses_with onto a value
defined earlier, set_input to an earlier value (also inside If branches), safe removal of dead
nodes (one or a whole dead batch) and refused removal of live ones, insertion before/after an
anchor (also into a branch), shuffling then toposort, renaming, and clone-then-edit-the-clone.
After every edit ``verify(model, "structure")`` passes and every use list equals a
recomputation from scratch.

Hypothesis runs derandomized (fixed seed) with no example database, so runs are repeatable.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
from conftest import run_ort
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from onnx.reference import ReferenceEvaluator

from edgeopt import ir
from edgeopt.ir import Use

FLOAT = ir.DataType.FLOAT
OPS = ("Add", "Mul", "Relu", "Identity", "Concat", "If")
MAX_LEN = 8  # longest rank-1 value Concat may build

SETTINGS = settings(max_examples=60, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# -- building random DAGs ----------------------------------------------------------------------
def fval(name: str, length: int) -> ir.Value:
    return ir.Value(name, FLOAT, (length,))


def length(v: ir.Value) -> int:
    return v.shape[0]


def pick(data: st.DataObject, pool: list[ir.Value], size: int | None = None) -> ir.Value:
    """A random earlier value, optionally of a given length."""
    cands = [v for v in pool if size is None or length(v) == size]
    return data.draw(st.sampled_from(cands))


def make_if(data: st.DataObject, pool: list[ir.Value], cond: ir.Value, name: str) -> ir.Node:
    """An If whose branches compute from captured outer values."""
    a = pick(data, pool)
    b = pick(data, pool, length(a))
    mul = ir.Node("Mul", [a, b], outputs=[fval(f"{name}_t", length(a))])
    neg = ir.Node("Neg", [a], outputs=[fval(f"{name}_e", length(a))])
    then_g = ir.Graph(outputs=mul.outputs, nodes=[mul], name=f"{name}_then")
    else_g = ir.Graph(outputs=neg.outputs, nodes=[neg], name=f"{name}_else")
    return ir.Node("If", [cond], {"then_branch": then_g, "else_branch": else_g},
                   outputs=[fval(name, length(a))])


def make_node(data: st.DataObject, op: str, pool: list[ir.Value], cond: ir.Value,
              name: str) -> ir.Node:
    """One node of the given op reading random earlier values (shapes kept consistent)."""
    if op == "If":
        return make_if(data, pool, cond, name)
    a = pick(data, pool)
    n = length(a)
    if op in ("Add", "Mul"):
        return ir.Node(op, [a, pick(data, pool, n)], outputs=[fval(name, n)])
    if op == "Concat":
        b = pick(data, pool)
        if n + length(b) <= MAX_LEN:
            return ir.Node("Concat", [a, b], {"axis": 0}, outputs=[fval(name, n + length(b))])
        op = "Identity"
    return ir.Node(op, [a], outputs=[fval(name, n)])


def build_dag(data: st.DataObject, max_nodes: int = 8) -> ir.Model:
    """A random, valid, fully typed DAG."""
    rng = np.random.default_rng(data.draw(st.integers(0, 2**16), label="weights seed"))
    inputs = [fval("x0", 2), fval("x1", 2)]
    cond = ir.Value("c", ir.DataType.BOOL, ())
    inits = [ir.Value(f"w{i}", const_value=ir.ArrayTensor(
        rng.standard_normal(data.draw(st.sampled_from([2, 4]))).astype(np.float32)))
        for i in range(data.draw(st.integers(0, 2), label="initializers"))]
    pool = [*inputs, *inits]
    nodes = []
    for i in range(data.draw(st.integers(1, max_nodes), label="nodes")):
        op = data.draw(st.sampled_from(OPS), label="op")
        node = make_node(data, op, pool, cond, f"v{i}")
        node.name = f"{op.lower()}{i}"
        nodes.append(node)
        pool.append(node.outputs[0])
    produced = [n.outputs[0] for n in nodes]
    outputs = data.draw(st.lists(st.sampled_from(produced), min_size=1, max_size=2,
                                 unique_by=id), label="outputs")
    graph = ir.Graph([*inputs, cond], outputs, nodes, inits, name="g")
    model = ir.Model(graph, {"": 17}, ir_version=9)
    model.meta["test.counter"] = 0
    return model


# -- scopes and invariants -----------------------------------------------------------------------
def scope_before(node: ir.Node) -> list[ir.Value]:
    """Values a (sorted-graph) node may read: everything defined before it, in any scope."""
    graph = node.graph
    values = [*graph.inputs, *graph.initializers.values()]
    for other in graph:
        if other is node:
            break
        values.extend(v for v in other.outputs if v.name)
    if graph.parent is not None:
        values = scope_before(graph.parent) + values
    return values


def all_values(model: ir.Model) -> dict[int, ir.Value]:
    graphs = [model.graph, *model.graph.subgraphs()]
    values = [v for g in graphs for v in [*g.inputs, *g.initializers.values(), *g.outputs]]
    values += [v for n in model.walk() for v in [*n.inputs, *n.outputs] if v is not None]
    return {id(v): v for v in values}


def check_invariants(model: ir.Model, seen: dict[int, ir.Value]) -> None:
    """verify() passes, and every value ever seen has exactly the uses the nodes make."""
    ir.verify(model, "structure")
    expected: dict[int, set[Use]] = {}
    for node in model.walk():
        for i, v in enumerate(node.inputs):
            if v is not None:
                expected.setdefault(id(v), set()).add(Use(node, i))
    seen.update(all_values(model))
    for key, v in seen.items():
        assert set(v.uses()) == expected.get(key, set()), (v, v.uses())
    for g in [model.graph, *model.graph.subgraphs()]:
        for v in g.outputs:
            assert v.is_graph_output()
        for v in g.inputs:
            assert v.is_graph_input() and v.graph is g
        for name, v in g.initializers.items():
            assert v.is_initializer() and v.name == name


def fresh_name(model: ir.Model) -> str:
    model.meta["test.counter"] += 1
    return f"new{model.meta['test.counter']}"


# -- edits -------------------------------------------------------------------------------------
# Each edit returns True if it changed the model (so the version must have grown).
def edit_rauw(data: st.DataObject, model: ir.Model) -> bool:
    produced = [v for n in model.graph for v in n.outputs]
    old = data.draw(st.sampled_from(produced), label="rauw old")
    new = data.draw(st.sampled_from(scope_before(old.producer())), label="rauw new")
    flag = data.draw(st.booleans(), label="replace outputs") and new.producer() is not None
    changes = bool(old.uses()) or (flag and old.is_graph_output())
    old.replace_all_uses_with(new, replace_graph_outputs=flag)
    assert old.uses() == ()
    assert not (flag and old in list(model.graph.outputs))
    return changes


def edit_set_input(data: st.DataObject, model: ir.Model) -> bool:
    nodes = [n for n in model.walk() if n.inputs and n.op_type != "If"]
    node = data.draw(st.sampled_from(nodes), label="set_input node")
    index = data.draw(st.integers(0, len(node.inputs) - 1), label="index")
    value = data.draw(st.sampled_from(scope_before(node)), label="set_input value")
    changes = node.inputs[index] is not value
    node.set_input(index, value)
    assert node.inputs[index] is value and Use(node, index) in value.uses()
    return changes


def dead_nodes(graph: ir.Graph) -> list[ir.Node]:
    """Nodes of the graph no graph output depends on (captures included)."""
    live: set[int] = set()
    stack = [v for v in graph.outputs]
    while stack:
        v = stack.pop()
        node = v.producer()
        while node is not None and node.graph is not graph:  # climb out of subgraphs
            node = node.graph.parent
        if node is None or id(node) in live:
            continue
        live.add(id(node))
        stack.extend(v for v in node.inputs if v is not None)
        stack.extend(v for sub in node.subgraphs() for n in sub.walk() for v in n.inputs
                     if v is not None)
    return [n for n in graph if id(n) not in live]


def edit_remove(data: st.DataObject, model: ir.Model) -> bool:
    graph = model.graph
    dead = dead_nodes(graph)
    live = [n for n in graph if n not in dead]
    if live and data.draw(st.booleans(), label="try a live node"):
        node = data.draw(st.sampled_from(live), label="live node")
        if any(u.node.graph is not None for v in node.outputs for u in v.uses()) or any(
                v.is_graph_output() for v in node.outputs):
            before, version = ir.to_proto(model).SerializeToString(), model.version
            with pytest.raises(ValueError, match=r"^cannot remove Node\("):
                graph.remove(node)
            assert ir.to_proto(model).SerializeToString() == before
            assert model.version == version
    if not dead:
        return False
    if data.draw(st.booleans(), label="whole dead batch"):
        batch = data.draw(st.permutations(dead), label="batch order")
    else:  # a single dead node whose outputs nobody reads
        unused = [n for n in dead if not any(v.uses() for v in n.outputs)]
        batch = [data.draw(st.sampled_from(unused), label="dead node")]
    if data.draw(st.booleans(), label="repeat a node"):
        batch = [*batch, batch[0]]  # duplicates in a batch are ignored
    graph.remove(batch)
    assert all(n.graph is None and n.inputs == () for n in batch)
    return True


def edit_insert(data: st.DataObject, model: ir.Model) -> bool:
    graphs = [model.graph, *model.graph.subgraphs()]
    graph = data.draw(st.sampled_from(graphs), label="insert graph")
    if len(graph) == 0:
        return False
    anchor = data.draw(st.sampled_from(graph.nodes), label="anchor")
    after = data.draw(st.booleans(), label="after")
    pool = scope_before(anchor) + (list(anchor.outputs) if after else [])
    pool = [v for v in pool if v.dtype == FLOAT]  # not the condition `c`
    name = fresh_name(model)
    op = data.draw(st.sampled_from(OPS), label="new op")
    cond = model.graph.inputs[2]
    node = make_node(data, op, pool, cond, name)
    node.name = name
    (graph.insert_after if after else graph.insert_before)(anchor, node)
    position = graph.nodes.index(anchor) + (1 if after else -1)
    assert graph.nodes[position] is node
    return True


def edit_shuffle_toposort(data: st.DataObject, model: ir.Model) -> bool:
    graph = model.graph
    order = data.draw(st.permutations(graph.nodes), label="shuffle")
    for node in order:
        graph.append(node)  # moves the node: its edges are untouched
    assert graph.nodes == list(order)
    graph.toposort()
    version = model.version
    nodes = graph.nodes
    graph.toposort()  # idempotent, and a sorted graph is left alone
    assert graph.nodes == nodes and model.version == version
    return False  # the net order may be unchanged


def edit_rename(data: st.DataObject, model: ir.Model) -> bool:
    values = [v for v in all_values(model).values() if v.name]
    value = data.draw(st.sampled_from(values), label="rename")
    inits = model.graph.initializers
    was_init = value.is_initializer() and inits.get(value.name) is value
    value.name = fresh_name(model)
    assert not was_init or inits[value.name] is value
    return value.graph is not None


EDITS: dict[str, Callable[[st.DataObject, ir.Model], bool]] = {
    "rauw": edit_rauw,
    "set_input": edit_set_input,
    "remove": edit_remove,
    "insert": edit_insert,
    "shuffle+toposort": edit_shuffle_toposort,
    "rename": edit_rename,
}


def apply_edit(data: st.DataObject, model: ir.Model, name: str) -> None:
    event(name)  # shown by --hypothesis-show-statistics
    version = model.version
    changed = EDITS[name](data, model)
    assert model.version >= version
    if changed:
        assert model.version > version, name


@given(st.data())
@settings(SETTINGS, max_examples=150)  # cheap (~10 ms each), so a few more than elsewhere
def test_random_edits_keep_the_ir_valid(data):
    model = build_dag(data)
    seen: dict[int, ir.Value] = {}
    check_invariants(model, seen)
    for _ in range(data.draw(st.integers(1, 10), label="edits")):
        name = data.draw(st.sampled_from([*EDITS, "clone"]), label="edit")
        if name == "clone":
            event("clone")
            before, version = ir.to_proto(model).SerializeToString(), model.version
            clone = model.clone()
            apply_edit(data, clone, data.draw(st.sampled_from(list(EDITS)), label="on clone"))
            assert ir.to_proto(model).SerializeToString() == before
            assert model.version == version
            check_invariants(model, seen)
            if data.draw(st.booleans(), label="continue with the clone"):
                model, seen = clone, {}
        else:
            apply_edit(data, model, name)
        check_invariants(model, seen)


# -- round trip ------------------------------------------------------------------------------
def structure(graph: ir.Graph) -> tuple:
    """Everything about a graph's shape that a round trip must keep (names encode edges)."""
    def attr(a: ir.Attr) -> object:
        return structure(a.value) if a.type == ir.AttrType.GRAPH else (a.type, a.value)

    nodes = tuple(
        (n.op_type, n.domain, n.name, tuple(v.name if v else "" for v in n.inputs),
         tuple((v.name, v.dtype, v.shape) for v in n.outputs),
         tuple(sorted((k, attr(a)) for k, a in n.attrs.items())))
        for n in graph)
    return (graph.name, tuple((v.name, v.dtype, v.shape) for v in graph.inputs),
            tuple((k, v.dtype, v.shape, v.const_value.numpy().tobytes())
                  for k, v in graph.initializers.items()),
            nodes, tuple((v.name, v.dtype, v.shape) for v in graph.outputs))


def edges(model: ir.Model) -> set[tuple]:
    """(value name, consumer name, input index) for every use, captures included."""
    return {(v.name, u.node.name, u.index) for v in all_values(model).values()
            for u in v.uses()}


@given(st.data())
@SETTINGS
def test_round_trip_preserves_structure(data):
    model = build_dag(data)
    ir.verify(model, "onnx")  # the generator makes valid ONNX
    proto = ir.to_proto(model)
    again = ir.from_proto(proto)
    assert structure(again.graph) == structure(model.graph)
    assert edges(again) == edges(model)
    assert [n.op_type for n in again.walk()] == [n.op_type for n in model.walk()]
    assert ir.to_proto(again).SerializeToString() == proto.SerializeToString()
    ir.verify(again)


# -- numerics of semantics-preserving edits --------------------------------------------------------
def feeds_for(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"x0": rng.standard_normal(2).astype(np.float32),
            "x1": rng.standard_normal(2).astype(np.float32),
            "c": np.array(bool(seed % 2))}


def outputs(model: ir.Model, feeds: dict[str, np.ndarray]) -> list[list[np.ndarray]]:
    proto = ir.to_proto(model)
    return [run_ort(proto, feeds), ReferenceEvaluator(proto).run(None, feeds)]


@given(st.data())
@SETTINGS
def test_semantics_preserving_edits_keep_numerics(data):
    model = build_dag(data, max_nodes=6)
    feeds = feeds_for(data.draw(st.integers(0, 1000), label="feeds seed"))
    expected = outputs(model, feeds)
    clone = model.clone()
    # Shuffle and sort; add a dead node and remove it again; both are no-ops semantically.
    for node in data.draw(st.permutations(clone.graph.nodes), label="shuffle"):
        clone.graph.append(node)
    clone.graph.toposort()
    anchor = data.draw(st.sampled_from(clone.graph.nodes), label="anchor")
    dead = ir.Node("Relu", [clone.graph.inputs[0]], outputs=[fval("dead", 2)])
    clone.graph.insert_after(anchor, dead)
    check_invariants(clone, {})
    clone.graph.remove(dead)
    check_invariants(clone, {})
    for engine, (want, got) in enumerate(zip(expected, outputs(clone, feeds), strict=True)):
        assert len(got) == len(want)
        for w, g in zip(want, got, strict=True):
            np.testing.assert_array_equal(g, w, err_msg=f"engine {engine}")
    # The two engines agree with each other too (tiny float graphs: a few ulps at most).
    for ort_out, ref_out in zip(*expected, strict=True):
        np.testing.assert_allclose(ort_out, ref_out, rtol=1e-5, atol=1e-6)
