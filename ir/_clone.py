"""Deep copy of models and graphs (values, nodes, subgraphs; tensors are shared)."""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING

from ._graph import Graph, Model
from ._node import Attr, Node
from ._value import Value

if TYPE_CHECKING:
    pass

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
    new.type_proto = v.type_proto
    new.doc_string = v.doc_string
    new.metadata_props = dict(v.metadata_props)
    new.meta = dict(v.meta)
    return new


def clone_graph(graph: Graph, outer: dict[int, Value]) -> Graph:
    """Deep-copy ``graph``; ``outer`` maps id(outer value) -> its copy for captured values."""
    vmap: dict[int, Value] = dict(outer)

    def get(v: Value | None) -> Value | None:
        if v is None:
            return None
        if id(v) not in vmap:  # dangling reference (invalid model): copy it as is
            vmap[id(v)] = _copy_value(v)
        return vmap[id(v)]

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
    for node in graph:
        outputs = []
        for out in node.outputs:
            vmap[id(out)] = _copy_value(out)
            outputs.append(vmap[id(out)])
        attrs = [_clone_attr(a, vmap) for a in node.attrs.values()]
        copy_node = Node(node.op_type, [get(v) for v in node.inputs], attrs, domain=node.domain,
                         outputs=outputs, name=node.name, overload=node.overload)
        copy_node.doc_string = node.doc_string
        copy_node.metadata_props = dict(node.metadata_props)
        copy_node.extra_protos = copy.deepcopy(node.extra_protos)
        copy_node.meta = dict(node.meta)
        new.append(copy_node)
    for v in graph.outputs:
        new.outputs.append(get(v))
    new.version = 0
    return new


def _clone_attr(attr: Attr, vmap: dict[int, Value]) -> Attr:
    value = attr.value
    if attr.type.name == "GRAPH":
        value = clone_graph(value, vmap)
    elif attr.type.name == "GRAPHS":
        value = [clone_graph(g, vmap) for g in value]
    elif isinstance(value, list):
        value = list(value)
    return Attr(attr.name, attr.type, value, attr.doc_string, attr.ref_attr_name)
