"""Values: the edges of the graph, with their use-def chains."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, NamedTuple

from ._types import DataType, Shape, format_shape

if TYPE_CHECKING:
    from ._graph import Graph
    from ._node import Node
    from ._tensor import Tensor

__all__ = ["Use", "Value"]


class Use(NamedTuple):
    """One consumption of a value: ``node.inputs[index] is value``."""

    node: Node
    index: int


class Value:
    """A named, typed edge: a graph input, an initializer, or the output of one node.

    A value has at most one producer (the node that created it as an output) and an
    insertion-ordered set of uses. Uses are maintained only by :class:`Node` (its constructor,
    :meth:`Node.set_input`, and graph removal), so they are correct by construction. Nodes inside
    subgraphs that read an outer-scope value hold that very value, so captures are ordinary uses.

    Identity semantics: two values are equal only if they are the same object.

    Args:
        name: the value's name, unique within its model ("" only for omitted optional outputs).
        dtype: element type, if known.
        shape: dims (``int``, ``str`` for symbolic, ``None`` for unknown); ``None`` for an
            unknown rank.
        const_value: constant data, for initializers.
    """

    def __init__(self, name: str = "", dtype: DataType | None = None, shape: Shape | None = None,
                 const_value: Tensor | None = None) -> None:
        self._name = name
        self._dtype = dtype
        self._shape = None if shape is None else tuple(shape)
        self._const_value = const_value
        if const_value is not None:
            self._dtype = const_value.dtype if dtype is None else dtype
            self._shape = tuple(const_value.shape) if shape is None else self._shape
        self._producer: Node | None = None
        self._index: int | None = None
        self._uses: dict[Use, None] = {}
        self._graph: Graph | None = None  # owner when this is a graph input or initializer
        self._input_of: Graph | None = None
        self._initializer_of: Graph | None = None
        self._output_of: list[Graph] = []  # one entry per listing, duplicates allowed
        #: Non-tensor ONNX type (sequence, map, optional, ...) or a tensor type carrying
        #: denotations, kept verbatim for export. Opaque to passes.
        self.type_proto: Any = None
        self.doc_string = ""
        self.metadata_props: dict[str, str] = {}
        #: Analysis scratch space; never serialized. Use namespaced keys ("edgeopt.importance").
        self.meta: dict[str, Any] = {}

    # -- identity and type -------------------------------------------------------------------
    @property
    def name(self) -> str:
        """The value's name."""
        return self._name

    @name.setter
    def name(self, new: str) -> None:
        if new == self._name:
            return
        if self._initializer_of is not None:
            self._initializer_of.initializers._rename(self, new)
        self._name = new
        self._bump()

    @property
    def dtype(self) -> DataType | None:
        """Element type, or None when unknown (or not a tensor)."""
        return self._dtype

    @dtype.setter
    def dtype(self, dtype: DataType | None) -> None:
        if dtype != self._dtype:
            self._dtype = dtype
            self._bump()

    @property
    def shape(self) -> Shape | None:
        """Shape as a tuple of dims, or None when the rank is unknown."""
        return self._shape

    @shape.setter
    def shape(self, shape: Shape | None) -> None:
        shape = None if shape is None else tuple(shape)
        if shape != self._shape:
            self._shape = shape
            self._bump()

    @property
    def const_value(self) -> Tensor | None:
        """Constant data (initializers); None for computed values."""
        return self._const_value

    @const_value.setter
    def const_value(self, tensor: Tensor | None) -> None:
        self._const_value = tensor
        if tensor is not None:
            self._dtype = tensor.dtype
            self._shape = tuple(tensor.shape)
        self._bump()

    # -- use-def -----------------------------------------------------------------------------
    def producer(self) -> Node | None:
        """The node whose output this is, or None for inputs and initializers."""
        return self._producer

    def index(self) -> int | None:
        """Position among the producer's outputs."""
        return self._index

    def uses(self) -> tuple[Use, ...]:
        """Every ``(node, input_index)`` reading this value, in the order they were made."""
        return tuple(self._uses)

    def consumers(self) -> tuple[Node, ...]:
        """The distinct nodes reading this value (including nodes inside subgraphs)."""
        return tuple(dict.fromkeys(u.node for u in self._uses))

    def replace_all_uses_with(self, new: Value, replace_graph_outputs: bool = False) -> None:
        """Make every consumer read ``new`` instead of this value.

        Consumers include nodes inside subgraphs that capture this value.

        Args:
            new: the replacement.
            replace_graph_outputs: also substitute ``new`` wherever this value is listed as a
                graph output (main graph or subgraph). Off by default because main-graph
                outputs carry the model's public names, and because a subgraph may not return
                a value of an enclosing graph directly (ONNX Runtime refuses such a model).
        """
        if new is self:
            return
        for use in list(self._uses):
            use.node.set_input(use.index, new)
        if replace_graph_outputs:
            for graph in dict.fromkeys(self._output_of):
                graph.outputs[:] = [new if v is self else v for v in graph.outputs]

    # -- roles -------------------------------------------------------------------------------
    @property
    def graph(self) -> Graph | None:
        """The graph that defines this value (producer's graph, or owning graph)."""
        if self._producer is not None:
            return self._producer.graph
        return self._graph

    def is_graph_input(self) -> bool:
        """True if the value is listed in a graph's inputs."""
        return self._input_of is not None

    def is_graph_output(self) -> bool:
        """True if the value is listed in any graph's outputs."""
        return bool(self._output_of)

    def is_initializer(self) -> bool:
        """True if the value is registered in a graph's initializers."""
        return self._initializer_of is not None

    def is_constant(self) -> bool:
        """True if the value carries constant data."""
        return self._const_value is not None

    def _bump(self) -> None:
        graph = self.graph
        if graph is not None:
            graph._bump()

    def __repr__(self) -> str:
        dtype = self._dtype.name.lower() if self._dtype is not None else "?"
        return f"Value({self._name!r}, {dtype}{format_shape(self._shape)})"
