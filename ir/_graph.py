"""Graphs (ordered nodes with inputs, outputs and initializers) and models."""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Iterator, MutableSequence
from typing import TYPE_CHECKING, Any

from ._errors import VerificationError
from ._node import Node
from ._value import Value

if TYPE_CHECKING:
    from ._tensor import Tensor

__all__ = ["Graph", "Model"]


class _ValueList(MutableSequence):
    """A graph's inputs or outputs: a list that keeps each value's role flags right."""

    def __init__(self, graph: Graph, role: str) -> None:
        self._graph = graph
        self._role = role  # "input" | "output"
        self._items: list[Value] = []

    def _claim(self, value: Value) -> None:
        if not isinstance(value, Value):
            raise TypeError(f"graph {self._role}s hold Values, not {type(value).__name__}")
        if self._role == "input":
            if value._producer is not None:
                raise ValueError(f"{value!r} is produced by a node; it cannot be a graph input")
            if value._input_of is not None and value._input_of is not self._graph:
                raise ValueError(f"{value!r} is already an input of another graph")
            if value._initializer_of is not None and value._initializer_of is not self._graph:
                raise ValueError(f"{value!r} is an initializer of another graph")
            value._input_of = self._graph
            value._graph = self._graph
        else:
            value._output_of.append(self._graph)

    def _release(self, value: Value) -> None:
        if self._role == "input":
            if sum(v is value for v in self._items) == 0:
                value._input_of = None
                if value._initializer_of is None:
                    value._graph = None
        else:
            value._output_of.remove(self._graph)

    def __getitem__(self, i: Any) -> Any:
        return self._items[i]

    def __len__(self) -> int:
        return len(self._items)

    def __setitem__(self, i: Any, value: Any) -> None:
        new = list(value) if isinstance(i, slice) else [value]
        old = self._items[i] if isinstance(i, slice) else [self._items[i]]
        items = list(self._items)
        items[i] = new if isinstance(i, slice) else value  # raises before any flag changes
        for v in new:
            self._claim(v)
        self._items = items
        for v in old:
            self._release(v)
        self._graph._bump()

    def __delitem__(self, i: Any) -> None:
        old = self._items[i] if isinstance(i, slice) else [self._items[i]]
        del self._items[i]
        for v in old:
            self._release(v)
        self._graph._bump()

    def insert(self, index: int, value: Value) -> None:
        """Insert a value at ``index``."""
        self._claim(value)
        self._items.insert(index, value)
        self._graph._bump()

    def __repr__(self) -> str:
        return repr(self._items)

    def __eq__(self, other: object) -> bool:
        return list(self) == list(other) if isinstance(other, (list, tuple, _ValueList)) \
            else NotImplemented


class _Initializers(dict):
    """A graph's initializers by name; registration keeps the value's role flags right."""

    def __init__(self, graph: Graph) -> None:
        super().__init__()
        self._graph = graph

    def add(self, value: Value) -> Value:
        """Register a constant value under its name and return it.

        Raises:
            ValueError: no ``const_value``, empty name, a producer, or the name is taken.
        """
        if value.const_value is None:
            raise ValueError(f"initializer {value.name!r} has no const_value")
        if not value.name:
            raise ValueError("an initializer needs a name")
        if value._producer is not None:
            raise ValueError(f"{value!r} is produced by a node; it cannot be an initializer")
        if value.name in self and self[value.name] is not value:
            raise ValueError(f"initializer name {value.name!r} is already taken")
        if value._initializer_of is not None and value._initializer_of is not self._graph:
            raise ValueError(f"{value!r} is already an initializer of another graph")
        if value._input_of is not None and value._input_of is not self._graph:
            raise ValueError(f"{value!r} is an input of another graph")
        super().__setitem__(value.name, value)
        value._initializer_of = self._graph
        value._graph = self._graph
        self._graph._bump()
        return value

    def __setitem__(self, name: str, value: Value) -> None:
        if name != value.name:
            raise ValueError(f"initializer {value.name!r} stored under name {name!r}")
        self.add(value)

    def __delitem__(self, name: str) -> None:
        value = self[name]
        super().__delitem__(name)
        value._initializer_of = None
        if value._input_of is None:
            value._graph = None
        self._graph._bump()

    def pop(self, name: str, *default: Any) -> Any:
        if name not in self:
            if default:
                return default[0]
            raise KeyError(name)
        value = self[name]
        del self[name]
        return value

    # dict's own bulk methods bypass __setitem__/__delitem__ and would skip the role flags.
    def update(self, *args: Any, **kwargs: Any) -> None:
        for name, value in dict(*args, **kwargs).items():
            self[name] = value

    def setdefault(self, *args: Any) -> Any:
        raise TypeError("use initializers.add(value)")

    def clear(self) -> None:
        for name in list(self):
            del self[name]

    def popitem(self) -> tuple[str, Value]:
        if not self:
            raise KeyError("popitem(): no initializers")
        name = next(reversed(self))
        return name, self.pop(name)

    def _rename(self, value: Value, new: str) -> None:
        if not new:
            raise ValueError(f"initializer {value.name!r}: an initializer needs a name")
        if new in self:
            raise ValueError(f"initializer name {new!r} is already taken")
        super().__delitem__(value.name)
        super().__setitem__(new, value)


class Graph:
    """An ordered list of nodes with inputs, outputs and initializers.

    Nodes live in a doubly linked list, so insertion and removal are O(1), and iteration
    walks a snapshot, so a pass may remove or insert nodes while it iterates. ``version``
    increases on every mutation of this graph or of any graph nested in it (the pass manager
    uses it to catch a pass that changed the model but reported ``modified=False``).

    Args:
        inputs: graph inputs.
        outputs: graph outputs.
        nodes: nodes, in order.
        initializers: constant values to register.
        name: graph name.
    """

    def __init__(self, inputs: Iterable[Value] = (), outputs: Iterable[Value] = (),
                 nodes: Iterable[Node] = (), initializers: Iterable[Value] = (),
                 name: str = "") -> None:
        self.name = name
        self.doc_string = ""
        self.metadata_props: dict[str, str] = {}
        #: ONNX quantization annotations, as (tensor name, [(key, value tensor name)]).
        self.quantization_annotations: list[tuple[str, list[tuple[str, str]]]] = []
        self.parent: Node | None = None
        self.version = 0
        self._head: Node | None = None
        self._tail: Node | None = None
        self._count = 0
        self.inputs = _ValueList(self, "input")
        self.outputs = _ValueList(self, "output")
        self.initializers = _Initializers(self)
        self.inputs.extend(inputs)
        self.outputs.extend(outputs)
        for v in initializers:
            self.initializers.add(v)
        self.extend(nodes)

    # -- iteration ---------------------------------------------------------------------------
    def __iter__(self) -> Iterator[Node]:
        """This graph's nodes in order (not recursive); safe against concurrent edits."""
        for node in self._snapshot():
            if node._graph is self:
                yield node

    def __len__(self) -> int:
        return self._count

    def __bool__(self) -> bool:
        # A graph is an object, not a container to test for emptiness: ``if node.graph:``
        # must not be false for a graph that has no nodes yet.
        return True

    def _snapshot(self) -> list[Node]:
        nodes, node = [], self._head
        while node is not None:
            nodes.append(node)
            node = node._next
        return nodes

    @property
    def nodes(self) -> list[Node]:
        """The nodes, as a fresh list."""
        return self._snapshot()

    def walk(self) -> Iterator[Node]:
        """Every node of this graph and, recursively, of its subgraphs (pre-order)."""
        for node in self:
            yield node
            for sub in node.subgraphs():
                yield from sub.walk()

    def subgraphs(self) -> Iterator[Graph]:
        """Every graph nested below this one (recursive)."""
        for node in self:
            for sub in node.subgraphs():
                yield sub
                yield from sub.subgraphs()

    @property
    def root(self) -> Graph:
        """The outermost graph enclosing this one."""
        graph = self
        while graph.parent is not None and graph.parent.graph is not None:
            graph = graph.parent.graph
        return graph

    # -- insertion ---------------------------------------------------------------------------
    # A node that is already in this graph is moved (its edges are untouched); a node of
    # another graph is refused. Moving is how a pass reorders nodes without rewiring them.
    def append(self, node: Node) -> Node:
        """Add (or move) ``node`` at the end and return it.

        Raises:
            ValueError: the node belongs to another graph.
        """
        self._check_insertable([node], None)
        if node._graph is self:
            if node is self._tail:
                return node
            self._unlink(node)
        self._link(node, self._tail, None)
        return node

    def extend(self, nodes: Iterable[Node]) -> None:
        """Add (or move) nodes at the end, in order."""
        for node in nodes:
            self.append(node)

    def insert_before(self, anchor: Node, nodes: Node | Iterable[Node]) -> None:
        """Insert (or move) node(s) right before ``anchor``, in the order given.

        Raises:
            ValueError: ``anchor`` is not in this graph, is among ``nodes``, or a node
                belongs to another graph.
        """
        batch = [nodes] if isinstance(nodes, Node) else list(nodes)
        self._check_insertable(batch, anchor)
        for node in batch:
            if node._graph is self:
                self._unlink(node)
            self._link(node, anchor._prev, anchor)

    def insert_after(self, anchor: Node, nodes: Node | Iterable[Node]) -> None:
        """Insert (or move) node(s) right after ``anchor``, in the order given.

        Raises:
            ValueError: as for :meth:`insert_before`.
        """
        batch = [nodes] if isinstance(nodes, Node) else list(nodes)
        self._check_insertable(batch, anchor)
        prev = anchor
        for node in batch:
            if node._graph is self:
                self._unlink(node)
            self._link(node, prev, prev._next)
            prev = node

    def _check_insertable(self, batch: list[Node], anchor: Node | None) -> None:
        """Validate a whole insertion up front, so a refused one changes nothing."""
        if anchor is not None:
            self._check_member(anchor)
        if len(set(map(id, batch))) != len(batch):
            raise ValueError("a node is listed twice for insertion")
        for node in batch:
            if node is anchor:
                raise ValueError(f"cannot insert {node!r} next to itself")
            if node._graph is not None and node._graph is not self:
                raise ValueError(f"{node!r} already belongs to graph {node._graph.name!r}")
            if any(sub is self or self._inside(sub) for sub in node.subgraphs()):
                raise ValueError(f"cannot insert {node!r} into its own subgraph")

    def _inside(self, other: Graph) -> bool:
        """True if this graph is nested (at any depth) in ``other``."""
        graph: Graph | None = self
        while graph is not None and graph.parent is not None:
            graph = graph.parent.graph
            if graph is other:
                return True
        return False

    def _link(self, node: Node, prev: Node | None, nxt: Node | None) -> None:
        node._graph, node._prev, node._next = self, prev, nxt
        if prev is None:
            self._head = node
        else:
            prev._next = node
        if nxt is None:
            self._tail = node
        else:
            nxt._prev = node
        self._count += 1
        self._bump()

    def _unlink(self, node: Node) -> None:
        if node._prev is None:
            self._head = node._next
        else:
            node._prev._next = node._next
        if node._next is None:
            self._tail = node._prev
        else:
            node._next._prev = node._prev
        node._graph = node._prev = node._next = None
        self._count -= 1
        self._bump()

    def _check_member(self, node: Node) -> None:
        if node._graph is not self:
            raise ValueError(f"{node!r} is not in graph {self.name!r}")

    # -- removal -----------------------------------------------------------------------------
    def remove(self, nodes: Node | Iterable[Node], safe: bool = True) -> None:
        """Remove node(s), detaching their inputs (including uses made inside their subgraphs).

        The removed nodes' subgraphs are emptied of edges: their nodes drop their inputs and
        the subgraphs drop their outputs, so no outer value keeps a use or a graph-output role
        from a node that is gone. The nodes' own outputs are left as they are.

        Args:
            nodes: the node or nodes to remove (all must be in this graph; duplicates are
                ignored). Removing a batch checks uses against the whole batch, so a dead
                chain can go in one call.
            safe: refuse when an output is still used by a node that stays, or is an
                output of a graph that stays. Only callers that rewire those uses right
                after may pass False.

        Raises:
            ValueError: a node is not in this graph, or (``safe``) an output is still in use.
                Nothing is removed then.
        """
        batch = list(dict.fromkeys([nodes] if isinstance(nodes, Node) else nodes))
        gone = set(map(id, batch))
        for node in batch:
            self._check_member(node)
        if safe:
            for node in batch:
                self._check_unused(node, gone)
        for node in batch:
            _detach_inputs(node)
            self._unlink(node)

    def _check_unused(self, node: Node, gone: set[int]) -> None:
        for out in node.outputs:
            for use in out.uses():
                if id(_top_level_user(use.node, self)) not in gone:
                    raise ValueError(f"cannot remove {node!r}: output {out.name!r} is still "
                                     f"used by {use.node!r}")
            for graph in out._output_of:
                if graph is self:
                    raise ValueError(f"cannot remove {node!r}: output {out.name!r} is a graph "
                                     "output")
                # An output of a subgraph that is removed with the batch does not count.
                if id(_top_level_user(graph.parent, self)) not in gone:
                    raise ValueError(f"cannot remove {node!r}: output {out.name!r} is an "
                                     f"output of subgraph {graph.name!r}")

    # -- ordering ----------------------------------------------------------------------------
    def toposort(self) -> None:
        """Reorder nodes so each comes after the producers of everything it reads.

        Stable: among nodes that are ready, the earlier one comes first, so a sorted graph is
        left unchanged (and its version is not bumped). Subgraphs are sorted too. Values a
        subgraph captures or returns count as inputs of the node holding it.

        Raises:
            VerificationError: the graph has a cycle.
        """
        nodes = self._snapshot()
        index = {id(n): i for i, n in enumerate(nodes)}
        deps: dict[int, set[int]] = {i: set() for i in range(len(nodes))}
        users: dict[int, list[int]] = {i: [] for i in range(len(nodes))}
        for i, node in enumerate(nodes):
            for value in _reads(node):
                producer = value.producer()
                j = index.get(id(_top_level_user(producer, self))) if producer else None
                if j is not None and j != i and j not in deps[i]:
                    deps[i].add(j)
                    users[j].append(i)
        ready = [i for i, d in deps.items() if not d]
        heapq.heapify(ready)
        order: list[int] = []
        while ready:
            i = heapq.heappop(ready)
            order.append(i)
            for k in users[i]:
                deps[k].discard(i)
                if not deps[k]:
                    heapq.heappush(ready, k)
        if len(order) != len(nodes):
            # Every unplaced node still waits on an unplaced one; following those waits from
            # any of them must run into a cycle, so the node reported is really on it.
            i, seen = next(i for i in range(len(nodes)) if deps[i]), set()
            while i not in seen:
                seen.add(i)
                i = min(deps[i])
            raise VerificationError(f"graph {self.name!r} has a cycle through {nodes[i]!r}")
        if order != sorted(order):  # bump the version only when something moved
            self._relink([nodes[i] for i in order])
        for node in nodes:
            for sub in node.subgraphs():
                sub.toposort()

    def _relink(self, nodes: list[Node]) -> None:
        """Rebuild the linked list in the given order (same nodes, new order)."""
        self._head = self._tail = None
        prev = None
        for node in nodes:
            node._prev, node._next = prev, None
            if prev is None:
                self._head = node
            else:
                prev._next = node
            prev = node
        self._tail = prev
        self._bump()

    # -- misc --------------------------------------------------------------------------------
    def add_initializer(self, name: str, tensor: Tensor) -> Value:
        """Create and register a constant value."""
        return self.initializers.add(Value(name, const_value=tensor))

    def _bump(self) -> None:
        graph: Graph | None = self
        while graph is not None:
            graph.version += 1
            graph = graph.parent.graph if graph.parent is not None else None

    def __repr__(self) -> str:
        return (f"Graph({self.name!r}, {len(self.inputs)} inputs, {len(self.outputs)} outputs, "
                f"{self._count} nodes, {len(self.initializers)} initializers)")


def _top_level_user(node: Node | None, graph: Graph) -> Node | None:
    """The node of ``graph`` that is (or encloses, through subgraphs) ``node``."""
    while node is not None and node.graph is not graph:
        owner = node.graph.parent if node.graph is not None else None
        node = owner
    return node


def _reads(node: Node) -> Iterator[Value]:
    """Values a node reads, including those read inside its subgraphs."""
    for v in node.inputs:
        if v is not None:
            yield v
    for sub in node.subgraphs():
        for inner in sub.walk():
            for v in inner.inputs:
                if v is not None:
                    yield v
        yield from sub.outputs


def _detach_inputs(node: Node) -> None:
    """Drop every use the node (and nodes in its subgraphs) makes, and subgraph outputs."""
    node.set_inputs(())
    for sub in node.subgraphs():
        for inner in sub.walk():
            inner.set_inputs(())
        del sub.outputs[:]
        for nested in sub.subgraphs():
            del nested.outputs[:]


class Model:
    """A model: the main graph plus the ONNX model-level fields.

    Model-local functions, training info and device configurations are kept as the ONNX
    messages they came in (opaque to passes, exported verbatim); a node that calls a local
    function is an ordinary node of the function's domain.

    Args:
        graph: the main graph.
        opset_imports: domain -> version ("" is the default ONNX domain).
        ir_version: ONNX IR version.
    """

    def __init__(self, graph: Graph, opset_imports: dict[str, int] | None = None,
                 ir_version: int = 9) -> None:
        self.graph = graph
        self.opset_imports: dict[str, int] = dict(opset_imports or {"": 17})
        self.ir_version = ir_version
        self.producer_name = ""
        self.producer_version = ""
        self.domain = ""
        self.model_version = 0
        self.doc_string = ""
        self.metadata_props: dict[str, str] = {}
        self.functions: list[Any] = []
        self.training_info: list[Any] = []
        self.configuration: list[Any] = []
        #: Where the model was loaded from (used to refuse overwriting it).
        self.source_path: str | None = None
        self.meta: dict[str, Any] = {}

    @property
    def version(self) -> int:
        """Mutation counter of the main graph (covers nested subgraphs)."""
        return self.graph.version

    def upgrade_ir_version(self, version: int) -> None:
        """Raise ``ir_version`` to at least ``version``, keeping what the graph means.

        Before IR 4 every initializer had to be listed as a graph input, so the listing meant
        nothing: those are the file's weights (constants; see
        ``edgeopt.passes._util.constant_tensor``). From IR 4 on, a listed initializer is an
        input whose default a caller may override, which neither passes nor ONNX Runtime
        treat as a constant. Crossing IR 4 therefore unlists the main graph's initializers.
        """
        if version <= self.ir_version:
            return
        if self.ir_version < 4 <= version:
            for v in [v for v in self.graph.inputs if v.is_initializer()]:
                self.graph.inputs.remove(v)
        self.ir_version = version

    def walk(self) -> Iterator[Node]:
        """Every node, recursively through subgraphs."""
        return self.graph.walk()

    def clone(self) -> Model:
        """A deep copy of the IR. Tensors are shared: they are immutable by convention."""
        from ._clone import clone_model

        return clone_model(self)

    def __repr__(self) -> str:
        return f"Model(opsets={self.opset_imports}, ir_version={self.ir_version}, {self.graph!r})"
