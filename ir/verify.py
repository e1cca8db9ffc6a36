"""Invariant checks over the IR.

``verify(model)`` raises :class:`VerificationError` naming the node and value at fault. Levels:

- ``"structure"``: SSA (one producer per value, unique names per scope and no shadowing of
  outer names), every input defined before use (graph input, initializer, earlier node
  output, or an enclosing scope for subgraphs), use lists consistent in both directions, graph
  outputs defined (a subgraph's outputs inside the subgraph itself, as ONNX Runtime requires),
  initializers carry data, subgraph parents set.
- ``"types"`` (default): structure, plus initializer dtype/shape consistent with their data,
  per-op arity and attributes against the ONNX schema of the model's opset, and per-op shape
  hooks (Conv weight channels, BatchNormalization parameter lengths, quantization scale and
  zero-point shapes).
- ``"onnx"``: types, plus ``onnx.checker.check_model(full_check=True)`` on the export.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal

from ._errors import VerificationError
from ._node import AttrType, Node
from ._types import format_shape
from ._value import Use, Value

if TYPE_CHECKING:
    from ._graph import Graph, Model

__all__ = ["SHAPE_HOOKS", "verify"]

Level = Literal["structure", "types", "onnx"]


def verify(model: Model, level: Level = "types") -> None:
    """Check the model's invariants.

    Args:
        model: the model.
        level: how much to check (see the module docstring).

    Raises:
        VerificationError: the first problem found, naming graph, node and value; the
            message says how many more there are, and ``.errors`` lists all of them.
    """
    if level not in ("structure", "types", "onnx"):
        raise ValueError(f"unknown verify level {level!r}")
    checker = _Checker(model, level)
    checker.graph(model.graph, _Scope(None))
    checker.reverse_uses()
    if checker.errors:
        first, more = checker.errors[0], len(checker.errors) - 1
        err = VerificationError(first + (f" (and {_count(more, 'more problem')})"
                                         if more else ""))
        err.errors = list(checker.errors)  # type: ignore[attr-defined]
        raise err
    if level == "onnx":
        _onnx_check(model)


class _Scope:
    def __init__(self, parent: _Scope | None) -> None:
        self.parent = parent
        self.values: set[int] = set()
        self.names: set[str] = set()

    def defined(self, value: Value) -> bool:
        scope: _Scope | None = self
        while scope is not None:
            if id(value) in scope.values:
                return True
            scope = scope.parent
        return False

    def name_taken(self, name: str) -> bool:
        scope: _Scope | None = self
        while scope is not None:
            if name in scope.names:
                return True
            scope = scope.parent
        return False


def _node_label(node: Node) -> str:
    return f"node {node.name or '<unnamed>'!r} ({node.op_type})"


def _undefined(v: Value, graph: Graph) -> str:
    """Why an input that is not in scope is not: produced later, or not at all."""
    producer = v.producer()
    scopes: Graph | None = graph
    while producer is not None and scopes is not None:
        if producer.graph is scopes:
            return (f"is used before it is defined (its producer {_node_label(producer)} comes "
                    "later)")
        scopes = scopes.parent.graph if scopes.parent is not None else None
    return "is not defined in this graph or an enclosing one"


class _Checker:
    def __init__(self, model: Model, level: Level) -> None:
        self.model = model
        self.level = level
        self.errors: list[str] = []
        self.seen_values: dict[int, Value] = {}
        self.seen_nodes: set[int] = set()
        self.functions = {(f.domain, f.name) for f in model.functions}

    def fail(self, graph: Graph, msg: str) -> None:
        self.errors.append(f"graph {graph.name or '<unnamed>'!r}: {msg}")

    def define(self, graph: Graph, scope: _Scope, value: Value, what: str) -> None:
        self.seen_values[id(value)] = value
        if value.name in scope.names:
            self.fail(graph, f"{what} {value.name!r} is defined more than once (value names "
                             "must be unique)")
        elif value.name and scope.name_taken(value.name):
            self.fail(graph, f"{what} {value.name!r} shadows a value of an enclosing graph "
                             "(subgraphs may not reuse outer names)")
        if id(value) in scope.values:
            return
        scope.values.add(id(value))
        if value.name:
            scope.names.add(value.name)

    def graph(self, graph: Graph, parent: _Scope | None) -> None:
        scope = _Scope(parent)
        for v in graph.inputs:
            if v.producer() is not None:
                self.fail(graph, f"graph input {v.name!r} is also produced by "
                                 f"{_node_label(v.producer())}")
            if not v.name:
                self.fail(graph, "a graph input has no name")
            self.define(graph, scope, v, "graph input")
        for name, v in graph.initializers.items():
            if v.name != name:
                self.fail(graph, f"initializer {v.name!r} is registered as {name!r}")
            if v.const_value is None:
                self.fail(graph, f"initializer {name!r} has no data")
            elif self.level != "structure":
                self.initializer_types(graph, v)
            if not v.is_graph_input():
                self.define(graph, scope, v, "initializer")
        for node in graph:
            self.node(graph, scope, node)
        for i, v in enumerate(graph.outputs):
            if id(v) in scope.values:
                continue
            if scope.defined(v):  # only a subgraph has an enclosing scope
                self.fail(graph, f"graph output {i} {v.name!r} is a value of an enclosing "
                                 "graph (a subgraph must return a value it defines; insert "
                                 "an Identity)")
            else:
                self.fail(graph, f"graph output {i} {v.name!r} is not defined")

    def initializer_types(self, graph: Graph, v: Value) -> None:
        t = v.const_value
        if v.dtype is not None and v.dtype != t.dtype:
            self.fail(graph, f"initializer {v.name!r} is declared {v.dtype.name} but its data "
                             f"is {t.dtype.name}")
        if v.shape is not None:
            ok = len(v.shape) == len(t.shape) and all(
                not isinstance(d, int) or d == s for d, s in zip(v.shape, t.shape, strict=True))
            if not ok:
                self.fail(graph, f"initializer {v.name!r} is declared {format_shape(v.shape)} "
                                 f"but its data is {format_shape(t.shape)}")

    def node(self, graph: Graph, scope: _Scope, node: Node) -> None:
        label = _node_label(node)
        self.seen_nodes.add(id(node))
        if node.graph is not graph:
            self.fail(graph, f"{label} does not point back to its graph")
        for i, v in enumerate(node.inputs):
            if v is None:
                continue
            self.seen_values.setdefault(id(v), v)
            if Use(node, i) not in v._uses:
                self.fail(graph, f"{label}: input {i} {v.name!r} does not list the node as a "
                                 "user (broken use list)")
            if not scope.defined(v):
                self.fail(graph, f"{label}: input {i} {v.name!r} {_undefined(v, graph)}")
        for sub in node.subgraphs():
            if sub.parent is not node:
                self.fail(graph, f"{label}: subgraph {sub.name!r} does not point back to it")
            self.graph(sub, scope)
        for i, out in enumerate(node.outputs):
            if out.producer() is not node or out.index() != i:
                self.fail(graph, f"{label}: output {i} {out.name!r} names another producer")
            for role, flag in (("a graph input", out.is_graph_input()),
                               ("an initializer", out.is_initializer())):
                if flag:
                    self.fail(graph, f"{label}: output {i} {out.name!r} is also {role}")
            if not out.name and (out.uses() or out.is_graph_output()):
                self.fail(graph, f"{label}: unnamed output {i} is used")
            self.define(graph, scope, out, f"{label}: output {i}")
        if self.level != "structure":
            self.schema(graph, node)
            hook = SHAPE_HOOKS.get(("" if node.domain == "ai.onnx" else node.domain,
                                    node.op_type))
            if hook is not None:
                msg = hook(node)
                if msg:
                    self.fail(graph, f"{label}: {msg}")

    def schema(self, graph: Graph, node: Node) -> None:
        from onnx import defs

        label = _node_label(node)
        domain = "" if node.domain == "ai.onnx" else node.domain
        imports = self.model.opset_imports
        version = imports.get(domain)
        if version is None and domain == "":  # the default domain may be spelled "ai.onnx"
            version = imports.get("ai.onnx")
        if version is None:
            self.fail(graph, f"{label}: domain {node.domain!r} has no opset import")
            return
        if (node.domain, node.op_type) in self.functions:
            return  # a call of a model-local function: its body is opaque to the IR
        try:
            schema = defs.get_schema(node.op_type, version, domain)
        except defs.SchemaError:
            if domain in ("", "ai.onnx.ml", "ai.onnx.preview.training"):
                self.fail(graph, f"{label}: no operator {node.op_type!r} in opset {version} of "
                                 f"domain {domain or 'ai.onnx'!r}")
            return  # custom domains: unknown ops are passed through
        self.arity(graph, node, schema, version)
        self.attributes(graph, node, schema, version)

    def arity(self, graph: Graph, node: Node, schema: Any, version: int) -> None:
        from onnx import defs

        label = _node_label(node)
        n_in, n_out = len(node.inputs), len(node.outputs)
        if not schema.min_input <= n_in <= schema.max_input:
            self.fail(graph, f"{label}: has {_count(n_in, 'input')}; opset {version} allows "
                             f"{_bounds(schema.min_input, schema.max_input)}")
        if not schema.min_output <= n_out <= schema.max_output:
            self.fail(graph, f"{label}: has {_count(n_out, 'output')}; opset {version} allows "
                             f"{_bounds(schema.min_output, schema.max_output)}")
        single = defs.OpSchema.FormalParameterOption.Single
        for i, (v, param) in enumerate(zip(node.inputs, schema.inputs, strict=False)):
            if v is None and param.option == single:
                self.fail(graph, f"{label}: required input {i} ({param.name}) is omitted")

    def attributes(self, graph: Graph, node: Node, schema: Any, version: int) -> None:
        label = _node_label(node)
        for name, spec in schema.attributes.items():
            if spec.required and name not in node.attrs:
                self.fail(graph, f"{label}: required attribute {name!r} is missing")
        for name, attr in node.attrs.items():
            spec = schema.attributes.get(name)
            if spec is None:
                self.fail(graph, f"{label}: attribute {name!r} is not defined for "
                                 f"{node.op_type} in opset {version}")
            elif not attr.ref_attr_name and int(spec.type) != int(attr.type) \
                    and attr.type != AttrType.UNDEFINED:
                self.fail(graph, f"{label}: attribute {name!r} is {attr.type.name}, schema "
                                 f"wants {AttrType(int(spec.type)).name}")

    def reverse_uses(self) -> None:
        """Every recorded use must point at a node in the model that reads the value there."""
        for v in self.seen_values.values():
            for use in v._uses:
                node, i = use
                if i >= len(node.inputs) or node.inputs[i] is not v:
                    self.errors.append(f"value {v.name!r}: use list names {_node_label(node)} "
                                       f"input {i}, which reads something else")
                elif id(node) not in self.seen_nodes:
                    self.errors.append(f"value {v.name!r}: used by {_node_label(node)}, which "
                                       "is not in the model (removed without detaching?)")


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'s' * (n != 1)}"


def _bounds(low: int, high: int) -> str:
    """An arity range as people write it ("1..3", "1 or more", "2")."""
    if high >= 2**31 - 1:
        return f"{low} or more"
    return str(low) if low == high else f"{low}..{high}"


# -- per-op shape hooks --------------------------------------------------------------------
def _static_dim(v: Value | None, axis: int) -> int | None:
    if v is None or v.shape is None or not -len(v.shape) <= axis < len(v.shape):
        return None
    d = v.shape[axis]
    return d if isinstance(d, int) else None


def _input(node: Node, i: int) -> Value | None:
    """Input ``i``, or None when it is omitted (arity errors are the schema check's job)."""
    return node.inputs[i] if i < len(node.inputs) else None


def _conv(node: Node) -> str | None:
    x, w, b = _input(node, 0), _input(node, 1), _input(node, 2)
    c_in, w_in = _static_dim(x, 1), _static_dim(w, 1)
    group = node.attr("group", 1)
    if c_in is not None and w_in is not None and w_in * group != c_in:
        return (f"weight {w.name!r} has {w_in} input channels x group {group} != "
                f"{c_in} channels of {x.name!r}")
    c_out = _static_dim(w, 0)
    if b is None or b.shape is None:
        return None
    if len(b.shape) != 1 or (c_out is not None and isinstance(b.shape[0], int)
                             and b.shape[0] != c_out):
        return f"bias {b.name!r} has shape {format_shape(b.shape)}, expected [{c_out or 'C'}]"
    return None


def _batchnorm(node: Node) -> str | None:
    c = _static_dim(_input(node, 0), 1)
    if c is None:
        return None
    for v in node.inputs[1:5]:
        if v is not None and v.shape is not None and tuple(v.shape) != (c,) \
                and all(isinstance(d, int) for d in v.shape):
            return f"parameter {v.name!r} has shape {format_shape(v.shape)}, expected [{c}]"
    return None


def _qdq(node: Node) -> str | None:
    scale, zp = _input(node, 1), _input(node, 2)
    if scale is None or scale.shape is None:
        return None
    # A scalar and a one-element vector both mean per-tensor (onnx's own tests mix them).
    per_tensor = ((), (1,))
    if zp is not None and zp.shape is not None and tuple(zp.shape) != tuple(scale.shape) \
            and not (tuple(zp.shape) in per_tensor and tuple(scale.shape) in per_tensor):
        return (f"zero point {zp.name!r} {format_shape(zp.shape)} and scale {scale.name!r} "
                f"{format_shape(scale.shape)} differ in shape")
    if len(scale.shape) == 1 and node.attr("block_size", 0) == 0:
        n = _static_dim(_input(node, 0), node.attr("axis", 1))
        if n is not None and isinstance(scale.shape[0], int) and scale.shape[0] not in (1, n):
            return (f"per-axis scale {scale.name!r} has {scale.shape[0]} entries for axis of "
                    f"size {n}")
    return None


#: (domain, op_type) -> check returning an error message or None. Add entries for new ops.
SHAPE_HOOKS: dict[tuple[str, str], Callable[[Node], str | None]] = {
    ("", "Conv"): _conv,
    ("", "BatchNormalization"): _batchnorm,
    ("", "QuantizeLinear"): _qdq,
    ("", "DequantizeLinear"): _qdq,
}


def _onnx_check(model: Model) -> None:
    import onnx

    from ._export import to_proto

    try:
        onnx.checker.check_model(to_proto(model), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        raise VerificationError(f"onnx.checker: {str(e).strip().splitlines()[0]}") from None
