"""Helpers shared by the canonical passes: what is constant, fresh names, value substitution.

These are small building blocks, not analyses: they read the IR as it is at the moment of
the call and cache nothing across passes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, TypeVar

import numpy as np

from edgeopt.ir import ArrayTensor, DataType, Graph, LazyTensor, Model, Node, Tensor, Value

if TYPE_CHECKING:
    from edgeopt.ir import Shape

__all__ = [
    "NameGen",
    "ShapeOracle",
    "add_constant",
    "as_tensor",
    "constant_tensor",
    "default_opset",
    "earliest",
    "graphs",
    "is_default_domain",
    "levels",
    "replace_constant_input",
    "scaled_tensor",
    "substitute",
]

log = logging.getLogger(__name__)

T = TypeVar("T")


def constant_tensor(value: Value | None, model: Model) -> Tensor | None:
    """The constant data of ``value``, or None when it is not a compile-time constant.

    A value is constant when it carries ``const_value`` and is not a graph input: a graph input
    with an initializer is a default that the caller may override. The exception is a model
    with ``ir_version < 4``, where every initializer had to be listed as an input of the main
    graph; there, initializer-inputs of the main graph are constants too (they are how such
    files store their weights).

    Args:
        value: the value (None, for an omitted optional input, is never constant).
        model: the model the value belongs to (its IR version decides the rule above).
    """
    if value is None or value.const_value is None:
        return None
    if value.is_graph_input() and (model.ir_version >= 4 or value.graph is not model.graph):
        return None
    return value.const_value


def is_default_domain(node: Node) -> bool:
    """True for operators of the default ONNX domain (``""`` or ``"ai.onnx"``)."""
    return node.domain in ("", "ai.onnx")


def default_opset(model: Model) -> int:
    """The model's opset version of the default domain (0 when it imports none)."""
    return model.opset_imports.get("", model.opset_imports.get("ai.onnx", 0))


def graphs(model: Model) -> Iterator[Graph]:
    """The main graph, then every nested subgraph."""
    yield model.graph
    yield from model.graph.subgraphs()


class NameGen:
    """Fresh value names that clash with no name anywhere in the model (all scopes).

    Args:
        model: the model; its names are collected once, and every name handed out is added.
    """

    def __init__(self, model: Model) -> None:
        self.taken: set[str] = set()
        for graph in graphs(model):
            self.taken.update(v.name for v in graph.inputs)
            self.taken.update(graph.initializers)
            for node in graph:
                self.taken.update(v.name for v in node.outputs)

    def fresh(self, base: str) -> str:
        """``base`` if it is free, else ``base_1``, ``base_2``, ... (reserved on return)."""
        name, i = base, 0
        while name in self.taken:
            i += 1
            name = f"{base}_{i}"
        self.taken.add(name)
        return name


def earliest(nodes: Iterable[Node]) -> Node:
    """The node of ``nodes`` (all of one graph) that comes first in graph order."""
    nodes = list(nodes)
    graph = nodes[0].graph
    assert graph is not None
    wanted = {id(n) for n in nodes}
    return next(n for n in graph if id(n) in wanted)


def levels(graph: Graph, nodes: Sequence[T], node_of: Callable[[T], Node] = lambda x: x
           ) -> list[list[T]]:
    """``nodes`` grouped by how many of them lie upstream, in dependency order.

    No item of a level reads, even indirectly, the output of another item of the same
    level, so a level can be processed at once after the levels before it (level-by-level
    refits and corrections). ``node_of`` maps an item to its node.
    """
    index = {id(node_of(x)): x for x in nodes}
    depth: dict[str, int] = {}
    grouped: dict[int, list[T]] = {}
    for node in graph:
        d = max((depth.get(v.name, 0) for v in node.inputs if v is not None), default=0)
        if id(node) in index:
            grouped.setdefault(d, []).append(index[id(node)])
            d += 1
        for out in node.outputs:
            depth[out.name] = d
    return [grouped[k] for k in sorted(grouped)]


def add_constant(graph: Graph, names: NameGen, base: str, tensor: Tensor) -> Value:
    """Register a new initializer with a fresh name derived from ``base``."""
    return graph.add_initializer(names.fresh(base), tensor)


def replace_constant_input(node: Node, index: int, tensor: Tensor, names: NameGen) -> None:
    """Make input ``index`` of ``node`` read ``tensor``.

    The initializer is updated in place (keeping its name) when this node is its only reader
    and it is a plain initializer of the node's graph; otherwise (shared weights, graph
    inputs, outer-scope values) a new initializer is created in the node's graph, and the old
    one is left for ``dce``.
    """
    old = node.inputs[index] if index < len(node.inputs) else None
    graph = node.graph
    assert graph is not None
    if old is not None and old.is_initializer() and old.graph is graph \
            and not old.is_graph_input() and not old.is_graph_output() \
            and len(old.uses()) == 1:
        old.const_value = tensor
        return
    base = old.name if old is not None else f"{node.outputs[0].name}_input{index}"
    new = add_constant(graph, names, base, tensor)
    if index < len(node.inputs):
        node.set_input(index, new)
    else:
        node.set_inputs([*node.inputs, *([None] * (index - len(node.inputs))), new])


def substitute(node: Node, replacements: list[tuple[Value, Value]]) -> None:
    """Let each ``new`` take the place of ``old``, an output of ``node``; remove ``node``.

    Every reader of ``old`` reads ``new`` afterwards, including the graph outputs that list
    ``old``; ``new`` then takes over ``old``'s name (so the model's public output names and
    the names downstream stay as they were) and its documentation. Each ``new`` must be a
    fresh value or one that only ``old``'s place refers to: it is renamed.

    Args:
        node: the producer of the ``old`` values; its other outputs must be unused.
        replacements: ``(old, new)`` pairs; ``new`` is defined before ``old``'s readers (or
            is a constant the caller registers right after).
    """
    for old, new in replacements:
        old.replace_all_uses_with(new, replace_graph_outputs=True)
    graph = node.graph
    assert graph is not None
    graph.remove(node)
    for old, new in replacements:
        if new.type_proto is None and old.type_proto is not None:
            new.type_proto = old.type_proto
        new.doc_string = new.doc_string or old.doc_string
        for key, val in old.metadata_props.items():
            new.metadata_props.setdefault(key, val)
        if old.name and new.name != old.name:
            new.name = old.name


def as_tensor(array: np.ndarray, dtype: DataType | None = None) -> ArrayTensor:
    """Wrap a computed array (made read-only: tensors are immutable by convention)."""
    arr = np.asarray(array)
    arr.flags.writeable = False
    return ArrayTensor(arr, dtype)


def scaled_tensor(w: Tensor, factor: np.ndarray, view: tuple[int, ...],
                  fshape: tuple[int, ...]) -> LazyTensor:
    """``w`` viewed as ``view`` times ``factor`` reshaped to ``fshape``, in float64, cast back.

    The product is computed only when the data is needed (export, a numeric check), so
    rescaling a large weight costs nothing until then; ``w`` itself is never changed.

    Args:
        w: the tensor to scale (any float type).
        factor: the factors (float64), as many as ``fshape`` holds.
        view: a shape ``w`` is reshaped to for the product (``-1`` allowed once).
        fshape: the shape ``factor`` takes so that it broadcasts against ``view``.
    """
    factor = np.asarray(factor, dtype=np.float64).reshape(fshape)

    def compute() -> np.ndarray:
        arr = np.asarray(w.numpy(), dtype=np.float64).reshape(view)
        return (arr * factor).reshape(w.shape).astype(w.dtype.numpy())

    return LazyTensor(compute, w.dtype, w.shape)


class ShapeOracle:
    """Shapes of values, from the IR or (once, on demand) from ONNX shape inference.

    Inference runs on a clone of the model, so asking never modifies the model itself (a
    pass that only looks must be able to report ``modified=False``). Values are matched by
    name; a value created after the inference ran is known only through its own shape.

    Args:
        model: the model.
    """

    def __init__(self, model: Model) -> None:
        self.model = model
        self._inferred: dict[str, Shape | None] | None = None

    def shape(self, value: Value) -> Shape | None:
        """The shape of ``value`` (dims may be symbolic or None), or None if the rank is unknown."""
        if value.shape is not None:
            return value.shape
        if self._inferred is None:
            self._inferred = self._infer()
        return self._inferred.get(value.name)

    def rank(self, value: Value) -> int | None:
        """The rank of ``value``, or None when unknown."""
        shape = self.shape(value)
        return None if shape is None else len(shape)

    def _infer(self) -> dict[str, Shape | None]:
        from edgeopt.ir import infer_shapes

        clone = self.model.clone()
        try:
            infer_shapes(clone)
        except Exception as e:  # only a hint: a model ONNX cannot infer keeps unknown ranks
            log.debug("shape inference failed, shapes stay unknown: %s", e)
            return {}
        return {v.name: v.shape for g in graphs(clone) for n in g for v in n.outputs}



def computed_weights(graph: Graph) -> list[tuple[str, str]]:
    """Layers whose weight is computed from constants instead of held.

    ``(layer, op that computes its weight)`` for each Conv, ConvTranspose, Gemm and MatMul of
    ``graph`` whose weight (input 1) is the output of nodes that read only constants (e.g.
    the onnx ``light/`` models' ``ConstantOfShape`` weights, or a ``Transpose`` of an
    initializer). Passes that need constant weights (``prune``, ``quant``) cannot see them;
    ``simplify`` folds them into constants.
    """
    found = []
    for node in graph:
        if node.op_type not in ("Conv", "ConvTranspose", "Gemm", "MatMul") \
                or len(node.inputs) < 2 or node.inputs[1] is None:
            continue
        w = node.inputs[1]
        producer = w.producer()
        if w.const_value is None and producer is not None and _from_constants(w):
            found.append((node.name or node.outputs[0].name, producer.op_type))
    return found


#: Ops in a weight's recipe that mark it as quantized on purpose (int8 stored, float computed).
_DEQUANTIZING = ("DequantizeLinear", "Cast")


def _from_constants(value: Value) -> bool:
    """Whether ``value`` is computed (in its graph) from constants only, not dequantized."""
    seen: set[int] = set()
    todo = [value]
    while todo:
        v = todo.pop()
        if v.const_value is not None or id(v) in seen:
            continue
        seen.add(id(v))
        node = v.producer()
        if node is None or next(node.subgraphs(), None) is not None or len(seen) > 64 \
                or node.op_type in _DEQUANTIZING:
            return False  # a graph input, a subgraph, too deep, or a quantized weight
        todo.extend(x for x in node.inputs if x is not None)
    return True


def computed_weights_hint(graph: Graph, then: str) -> str | None:
    """The warning for :func:`computed_weights` (None when there are none)."""
    computed = computed_weights(graph)
    if not computed:
        return None
    layer, op = computed[0]
    return (f"{len(computed)} Conv/Gemm/MatMul layer(s) compute their weights instead of "
            f"holding them (e.g. {layer!r}, from {op}); {then}")
