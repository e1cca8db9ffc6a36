"""Nodes (operator applications) and their typed attributes."""

from __future__ import annotations

import enum
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from ._value import Use, Value

if TYPE_CHECKING:
    from ._graph import Graph

__all__ = ["Attr", "AttrType", "Node"]


class AttrType(enum.IntEnum):
    """Attribute kinds, numbered as ONNX's ``AttributeProto.AttributeType``."""

    UNDEFINED = 0
    FLOAT = 1
    INT = 2
    STRING = 3
    TENSOR = 4
    GRAPH = 5
    SPARSE_TENSOR = 11
    TYPE_PROTO = 13
    FLOATS = 6
    INTS = 7
    STRINGS = 8
    TENSORS = 9
    GRAPHS = 10
    SPARSE_TENSORS = 12
    TYPE_PROTOS = 14


@dataclass
class Attr:
    """A typed attribute.

    ``value`` is a Python scalar or list for FLOAT/INT/STRING(S)/FLOATS/INTS (strings are ``str``
    when they are UTF-8, else ``bytes``), a :class:`~edgeopt.ir.Tensor` (or list) for TENSOR(S),
    a :class:`~edgeopt.ir.Graph` (or list) for GRAPH(S), and the ONNX protobuf message kept
    verbatim for SPARSE_TENSOR(S) and TYPE_PROTO(S). Inside a function body an attribute may be a
    reference (``ref_attr_name``) to an attribute of the calling node.
    """

    name: str
    type: AttrType
    value: Any = None
    doc_string: str = ""
    ref_attr_name: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)

    def graphs(self) -> list[Graph]:
        """Subgraphs held by this attribute."""
        if self.type == AttrType.GRAPH and self.value is not None:
            return [self.value]
        if self.type == AttrType.GRAPHS and self.value is not None:
            return list(self.value)
        return []

    @classmethod
    def infer(cls, name: str, value: Any) -> Attr:
        """Build an attribute, deriving its type from a Python value.

        Raises:
            TypeError: the value's type has no attribute kind (or an empty list, which is
                ambiguous: build :class:`Attr` with an explicit type instead).
        """
        from ._graph import Graph
        from ._tensor import ArrayTensor, Tensor

        if isinstance(value, (bool, int, np.integer)):
            return cls(name, AttrType.INT, int(value))
        if isinstance(value, (float, np.floating)):
            return cls(name, AttrType.FLOAT, float(value))
        if isinstance(value, (str, bytes)):
            return cls(name, AttrType.STRING, value)
        if isinstance(value, np.ndarray):
            return cls(name, AttrType.TENSOR, ArrayTensor(value))
        if isinstance(value, Tensor):
            return cls(name, AttrType.TENSOR, value)
        if isinstance(value, Graph):
            return cls(name, AttrType.GRAPH, value)
        if isinstance(value, (list, tuple)) and value:
            first = value[0]
            if isinstance(first, (bool, int, np.integer)):
                return cls(name, AttrType.INTS, [int(v) for v in value])
            if isinstance(first, (float, np.floating)):
                return cls(name, AttrType.FLOATS, [float(v) for v in value])
            if isinstance(first, (str, bytes)):
                return cls(name, AttrType.STRINGS, list(value))
            if isinstance(first, Graph):
                return cls(name, AttrType.GRAPHS, list(value))
        raise TypeError(f"attribute {name!r}: cannot infer an attribute type for {value!r}")


class Attrs(dict):
    """A node's attributes by name; assignments keep subgraph parents and versions right."""

    def __init__(self, node: Node) -> None:
        super().__init__()
        self._node = node

    def __setitem__(self, name: str, attr: Attr) -> None:
        if not isinstance(attr, Attr):
            attr = Attr.infer(name, attr)
        if attr.name != name:
            raise ValueError(f"attribute stored under {name!r} is named {attr.name!r}")
        home = self._node.graph
        for g in attr.graphs():  # check before changing anything
            if g.parent is not None and g.parent is not self._node:
                raise ValueError(f"graph {g.name!r} already belongs to {g.parent!r}")
            if home is not None and (g is home or home._inside(g)):
                raise ValueError(f"graph {g.name!r} encloses {self._node!r}; it cannot be its "
                                 "subgraph")
        old = self.get(name)
        if old is not None:
            for g in old.graphs():
                self._node._detach_subgraph(g)
        for g in attr.graphs():
            g.parent = self._node
        super().__setitem__(name, attr)
        self._node._bump()

    def __delitem__(self, name: str) -> None:
        for g in self[name].graphs():
            self._node._detach_subgraph(g)
        super().__delitem__(name)
        self._node._bump()

    def pop(self, name: str, *default: Any) -> Any:
        if name not in self:
            if default:
                return default[0]
            raise KeyError(name)
        attr = self[name]
        del self[name]
        return attr

    def update(self, *args: Any, **kwargs: Any) -> None:
        for k, v in dict(*args, **kwargs).items():
            self[k] = v

    def setdefault(self, *args: Any) -> Any:
        raise TypeError("use attrs[name] = Attr(...)")

    # dict's own clear/popitem bypass __delitem__ and would leave subgraph parents set.
    def clear(self) -> None:
        for name in list(self):
            del self[name]

    def popitem(self) -> tuple[str, Attr]:
        if not self:
            raise KeyError("popitem(): attributes are empty")
        name = next(reversed(self))
        return name, self.pop(name)


def _check_fresh(value: Value) -> None:
    """Refuse to adopt a value that is already defined (SSA: one definition per value)."""
    # ``is not None`` matters: a Graph defines __len__, so an empty graph is falsy.
    if value._producer is not None or value._input_of is not None \
            or value._initializer_of is not None:
        raise ValueError(f"value {value.name!r} already has a definition")


class Node:
    """One operator application.

    The node creates its own output values (or adopts fresh ones passed in), so every value has
    exactly one producer. ``inputs`` and ``outputs`` are tuples: edges change only through
    :meth:`set_input` / :meth:`set_inputs` and :meth:`Value.replace_all_uses_with`, which keep the
    use lists right. ``None`` in ``inputs`` is an omitted optional input.

    Args:
        op_type: operator name, e.g. ``"Conv"``.
        inputs: input values (``None`` for an omitted optional input).
        attrs: attributes, as :class:`Attr` objects or a name->Python-value mapping.
        domain: operator domain ("" is the default ONNX domain).
        num_outputs: how many outputs to create when ``outputs`` is not given.
        outputs: fresh values (no producer yet) to adopt as outputs.
        name: node name.
        overload: ONNX function overload identifier.
    """

    #: Plain fields that end up in the exported model: assigning one counts as a mutation.
    _TRACKED = frozenset({"op_type", "domain", "overload", "name", "doc_string"})

    def __setattr__(self, key: str, value: Any) -> None:
        if key in Node._TRACKED and getattr(self, "_graph", None) is not None \
                and getattr(self, key, None) != value:
            object.__setattr__(self, key, value)
            self._graph._bump()
            return
        object.__setattr__(self, key, value)

    def __init__(self, op_type: str, inputs: Iterable[Value | None] = (),
                 attrs: Iterable[Attr] | dict[str, Any] = (), *, domain: str = "",
                 num_outputs: int = 1, outputs: Sequence[Value] | None = None, name: str = "",
                 overload: str = "") -> None:
        self.op_type = op_type
        self.domain = domain
        self.overload = overload
        self.name = name
        self.doc_string = ""
        self.metadata_props: dict[str, str] = {}
        #: Opaque extra ONNX NodeProto fields (device_configurations), kept for export.
        self.extra_protos: dict[str, list[Any]] = {}
        self.meta: dict[str, Any] = {}
        self._graph: Graph | None = None
        self._prev: Node | None = None
        self._next: Node | None = None
        self._inputs: tuple[Value | None, ...] = ()
        # Validate the outputs before anything links to this node, so a refused node leaves
        # no trace (no subgraph parent, no use) behind.
        outputs = [Value() for _ in range(num_outputs)] if outputs is None else list(outputs)
        for out in outputs:
            _check_fresh(out)
        if len(set(map(id, outputs))) != len(outputs):
            raise ValueError("a node cannot list the same value as two outputs")
        self.attrs = Attrs(self)
        items = attrs.items() if isinstance(attrs, dict) else ((a.name, a) for a in attrs)
        for key, attr in items:
            self.attrs[key] = attr
        for i, out in enumerate(outputs):
            out._producer, out._index = self, i
        self._outputs: tuple[Value, ...] = tuple(outputs)
        self.set_inputs(inputs)

    # -- edges -------------------------------------------------------------------------------
    @property
    def inputs(self) -> tuple[Value | None, ...]:
        """Input values in order; ``None`` marks an omitted optional input."""
        return self._inputs

    @property
    def outputs(self) -> tuple[Value, ...]:
        """Output values in order (an omitted optional output has the empty name)."""
        return self._outputs

    def set_input(self, index: int, value: Value | None) -> None:
        """Replace input ``index`` (which must exist), keeping use lists right."""
        old = self._inputs[index]
        if old is value:
            return
        if old is not None:
            old._uses.pop(Use(self, index), None)
        if value is not None:
            value._uses[Use(self, index)] = None
        self._inputs = (*self._inputs[:index], value, *self._inputs[index + 1:])
        self._bump()

    def set_inputs(self, values: Iterable[Value | None]) -> None:
        """Replace the whole input list (arity may change)."""
        for i, old in enumerate(self._inputs):
            if old is not None:
                old._uses.pop(Use(self, i), None)
        self._inputs = tuple(values)
        for i, value in enumerate(self._inputs):
            if value is not None:
                value._uses[Use(self, i)] = None
        self._bump()

    def append_output(self, value: Value | None = None) -> Value:
        """Add a new output (e.g. an optional output that was omitted) and return it.

        Raises:
            ValueError: ``value`` already has a producer or is a graph input or initializer.
        """
        value = value if value is not None else Value()
        _check_fresh(value)
        value._producer, value._index = self, len(self._outputs)
        self._outputs = (*self._outputs, value)
        self._bump()
        return value

    def predecessors(self) -> tuple[Node, ...]:
        """Distinct producers of this node's inputs."""
        prods = (v.producer() for v in self._inputs if v is not None)
        return tuple(dict.fromkeys(p for p in prods if p is not None))

    def successors(self) -> tuple[Node, ...]:
        """Distinct consumers of this node's outputs."""
        return tuple(dict.fromkeys(n for v in self._outputs for n in v.consumers()))

    # -- attributes and subgraphs ------------------------------------------------------------
    def attr(self, name: str, default: Any = None) -> Any:
        """The value of attribute ``name``, or ``default`` when it is absent."""
        attr = self.attrs.get(name)
        return default if attr is None else attr.value

    def attr_str(self, name: str, default: str) -> str:
        """A string attribute as ``str`` (ONNX stores them as bytes), or ``default``."""
        value = self.attr(name, default)
        return value.decode() if isinstance(value, bytes) else str(value)

    def subgraphs(self) -> Iterator[Graph]:
        """Graphs held directly in this node's attributes (not recursive)."""
        for attr in self.attrs.values():
            yield from attr.graphs()

    def _detach_subgraph(self, graph: Graph) -> None:
        if graph.parent is self:
            graph.parent = None

    # -- placement ---------------------------------------------------------------------------
    @property
    def graph(self) -> Graph | None:
        """The graph this node is in, or None while detached."""
        return self._graph

    def _bump(self) -> None:
        if self._graph is not None:
            self._graph._bump()

    def __repr__(self) -> str:
        op = f"{self.domain}::{self.op_type}" if self.domain else self.op_type
        ins = ", ".join("" if v is None else v.name for v in self._inputs)
        outs = ", ".join(v.name for v in self._outputs)
        return f"Node({self.name!r}: {outs} = {op}({ins}))"
