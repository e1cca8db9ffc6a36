"""Deep copy of models and graphs (values, nodes, subgraphs; tensors are shared)."""

from __future__ import annotations

import copy

from ._graph import Graph, Model
from ._node import Attr, AttrType, Node
from ._value import Value

__all__ = ["clone_graph", "clone_model"]


def clone_model(model: Model) -> Model:
    """Deep-copy a model; see :meth:`Model.clone`."""
    new = Model(clone_graph(model.graph, {}), dict(model.opset_imports), model.ir_version)
    for attr in ("producer_name", "producer_version", "domain", "model_version", "doc_string",
                 "source_path"):
        setattr(new, attr, getattr(model, attr))
    new.metadata_props = dict(model.metadata_props)
    new.functions = [copy.deepcopy(f) for f in model.functions]
    new.training_info = [copy.deepcopy(t) for t in model.training_info]
    new.configuration = [copy.deepcopy(c) for c in model.configuration]
    new.meta = dict(model.meta)
    return new


def _copy_value(v: Value) -> Value:
    new = Value(v.name, v.dtype, v.shape, v.const_value)
    new.type_proto = copy.deepcopy(v.type_proto)  # a mutable protobuf message
    new.doc_string = v.doc_string
    new.metadata_props = dict(v.metadata_props)
    new.meta = dict(v.meta)
    return new


def clone_graph(graph: Graph, outer: dict[int, Value]) -> Graph:
    """Deep-copy ``graph``.

    Args:
        graph: the graph to copy.
        outer: id(value) -> copy for every value of the enclosing scopes, so that captures in
            the copy read the enclosing copy's values. Pass ``{}`` for a main graph.

    Returns:
        The copy, with version 0 and no parent.
    """
    vmap: dict[int, Value] = dict(outer)
    new = Graph(name=graph.name)
    new.doc_string = graph.doc_string
    new.metadata_props = dict(graph.metadata_props)
    new.quantization_annotations = copy.deepcopy(graph.quantization_annotations)
    for v in graph.inputs:
        vmap[id(v)] = _copy_value(v)
        new.inputs.append(vmap[id(v)])
    for v in graph.initializers.values():
        if id(v) not in vmap:
            vmap[id(v)] = _copy_value(v)
        new.initializers.add(vmap[id(v)])
    # Copy every node output first: a graph need not be sorted, and subgraphs may read values
    # produced later in the enclosing graph, so a consumer can come before its producer.
    nodes = graph.nodes
    for node in nodes:
        for out in node.outputs:
            vmap[id(out)] = _copy_value(out)
    for node in nodes:
        new.append(_clone_node(node, vmap))
    for v in graph.outputs:
        new.outputs.append(_lookup(vmap, v))
    new.version = 0
    return new


def _lookup(vmap: dict[int, Value], v: Value) -> Value:
    if id(v) not in vmap:  # dangling reference (an invalid model): copy it as it is
        vmap[id(v)] = _copy_value(v)
    return vmap[id(v)]


def _clone_node(node: Node, vmap: dict[int, Value]) -> Node:
    attrs = [_clone_attr(a, vmap) for a in node.attrs.values()]
    inputs = [None if v is None else _lookup(vmap, v) for v in node.inputs]
    new = Node(node.op_type, inputs, attrs, domain=node.domain,
               outputs=[vmap[id(out)] for out in node.outputs], name=node.name,
               overload=node.overload)
    new.doc_string = node.doc_string
    new.metadata_props = dict(node.metadata_props)
    new.extra_protos = copy.deepcopy(node.extra_protos)
    new.meta = dict(node.meta)
    return new


def _clone_attr(attr: Attr, vmap: dict[int, Value]) -> Attr:
    value = attr.value
    if attr.type == AttrType.GRAPH:
        value = clone_graph(value, vmap)
    elif attr.type == AttrType.GRAPHS:
        value = [clone_graph(g, vmap) for g in value]
    elif isinstance(value, list):
        value = list(value)
    return Attr(attr.name, attr.type, value, attr.doc_string, attr.ref_attr_name,
                dict(attr.metadata))
