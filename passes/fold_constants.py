"""``fold-constants``: evaluate constant subgraphs at compile time."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from edgeopt.ir import DataType, Graph, LazyTensor, Model, Node, Tensor, Value, shape_is_static

from ._base import Context, PassResult
from ._registry import register_pass
from ._util import as_tensor, constant_tensor, is_default_domain, substitute

__all__ = ["FoldConstantsOptions", "fold_constants"]

log = logging.getLogger(__name__)

#: Operators whose result is not a function of their inputs: never folded.
NONDETERMINISTIC = frozenset({"RandomNormal", "RandomUniform", "RandomNormalLike",
                              "RandomUniformLike", "Bernoulli", "Multinomial", "Dropout"})


@dataclass(frozen=True)
class FoldConstantsOptions:
    """Options of ``fold-constants``.

    Attributes:
        max_bytes: cap (bytes) on what generic evaluation may materialize: the summed inputs
            and the summed outputs of one node each. 16 MiB keeps evaluation cheap and
            bounded; larger constant computations stay in the graph.
        max_lazy_bytes: cap (bytes) on a lazily computed result (``ConstantOfShape``). Lazy
            results cost nothing until export, so the cap is large (1 GiB): it only guards
            against absurd shapes.
    """

    max_bytes: int = 16 << 20
    max_lazy_bytes: int = 1 << 30

    def validate(self) -> None:
        """Raise ValueError for negative caps."""
        if self.max_bytes < 0 or self.max_lazy_bytes < 0:
            raise ValueError("max_bytes and max_lazy_bytes must be >= 0")


class _TooLarge(Exception):
    """The node is constant but its evaluation would exceed a size cap."""


class _Folder:
    """Folds one node at a time; holds the model and the options."""

    def __init__(self, model: Model, opts: FoldConstantsOptions) -> None:
        self.model = model
        self.opts = opts

    def inputs(self, node: Node) -> list[Tensor | None] | None:
        """The constant inputs of ``node`` (None entries for omitted ones), or None."""
        tensors: list[Tensor | None] = []
        for v in node.inputs:
            t = constant_tensor(v, self.model) if v is not None else None
            if v is not None and t is None:
                return None
            tensors.append(t)
        return tensors

    def fold(self, node: Node) -> list[Tensor] | None:
        """Constant outputs of ``node`` (one per output), or None when it cannot be folded.

        Raises:
            _TooLarge: the node is constant but over a size cap.
            Exception: evaluation failed (the caller counts it and leaves the node alone).
        """
        special = _SPECIAL.get(node.op_type)
        if special is not None:
            result = special(self, node)
            if result is not None:
                return result
        inputs = self.inputs(node)
        if inputs is None:
            return None
        return self.evaluate(node, inputs)

    def evaluate(self, node: Node, inputs: list[Tensor | None]) -> list[Tensor]:
        """Run ``node`` on its constant inputs with ``onnx.reference.ReferenceEvaluator``."""
        if sum(t.nbytes for t in inputs if t is not None) > self.opts.max_bytes:
            raise _TooLarge
        known = [_static_nbytes(v) for v in node.outputs if v.name]
        if all(k is not None for k in known) and sum(known) > self.opts.max_bytes:
            raise _TooLarge
        arrays = _run_reference(node, inputs, self.model)
        if sum(a.nbytes for a in arrays) > self.opts.max_bytes:
            raise _TooLarge
        tensors = []
        for value, arr in zip((v for v in node.outputs if v.name), arrays, strict=True):
            tensors.append(_checked(value, arr))
        return tensors


def _static_nbytes(v: Value) -> int | None:
    if v.dtype is None or not shape_is_static(v.shape):
        return None
    return math.prod(v.shape) * max(v.dtype.bitwidth, 8) // 8


def _checked(value: Value, arr: np.ndarray) -> Tensor:
    """Wrap an evaluated array, refusing one that contradicts the value's declared type."""
    dtype = value.dtype if value.dtype is not None else DataType.from_numpy(arr.dtype)
    if value.dtype is not None and value.dtype != DataType.STRING \
            and np.dtype(arr.dtype) != value.dtype.numpy():
        raise TypeError(f"{value.name}: evaluated {arr.dtype}, declared {value.dtype.name}")
    if shape_is_static(value.shape) and tuple(arr.shape) != tuple(value.shape):
        raise ValueError(f"{value.name}: evaluated shape {arr.shape}, declared {value.shape}")
    return as_tensor(arr, dtype)


def _run_reference(node: Node, inputs: list[Tensor | None], model: Model) -> list[np.ndarray]:
    """Evaluate one node alone, as a one-node model of the same opsets."""
    import onnx.reference

    from edgeopt.ir import to_proto

    feeds, ins = {}, []
    for i, t in enumerate(inputs):
        if t is None:
            ins.append(None)
            continue
        v = Value(f"in{i}", t.dtype, t.shape)
        feeds[v.name] = t.numpy()
        ins.append(v)
    outs = [Value(f"out{i}" if o.name else "") for i, o in enumerate(node.outputs)]
    tmp = Node(node.op_type, ins, list(node.attrs.values()), domain=node.domain, outputs=outs)
    graph = Graph([v for v in ins if v is not None], [o for o in outs if o.name], [tmp])
    proto = to_proto(Model(graph, dict(model.opset_imports), max(model.ir_version, 4)))
    results = onnx.reference.ReferenceEvaluator(proto).run(None, feeds)
    arrays = []
    for r in results:
        if not isinstance(r, (np.ndarray, np.generic)):
            raise TypeError(f"{node.op_type} produced a {type(r).__name__}, not a tensor")
        arrays.append(np.asarray(r))
    return arrays


# -- cheap special cases: no evaluator, nothing materialized ------------------------------
def _constant_of_shape(folder: _Folder, node: Node) -> list[Tensor] | None:
    shape_t = constant_tensor(node.inputs[0], folder.model) if node.inputs else None
    if shape_t is None:
        return None
    dims = tuple(int(d) for d in np.asarray(shape_t.numpy()).reshape(-1))
    if any(d < 0 for d in dims):
        return None  # invalid model: leave the error to the runtime
    fill = node.attr("value")
    if fill is None:
        scalar, dtype = np.zeros((), np.float32), DataType.FLOAT
    else:
        scalar, dtype = np.asarray(fill.numpy()).reshape(-1)[0], fill.dtype
    if math.prod(dims) * max(dtype.bitwidth, 8) // 8 > folder.opts.max_lazy_bytes:
        raise _TooLarge
    np_dtype = dtype.numpy()
    return [LazyTensor(lambda: np.full(dims, scalar, dtype=np_dtype), dtype, dims)]


def _shape(folder: _Folder, node: Node) -> list[Tensor] | None:
    src = node.inputs[0] if node.inputs else None
    if src is None or not shape_is_static(src.shape):
        return None
    dims = src.shape[node.attr("start", 0):node.attr("end", len(src.shape))]
    return [as_tensor(np.array(dims, dtype=np.int64), DataType.INT64)]


def _size(folder: _Folder, node: Node) -> list[Tensor] | None:
    src = node.inputs[0] if node.inputs else None
    if src is None or not shape_is_static(src.shape):
        return None
    return [as_tensor(np.array(math.prod(src.shape), dtype=np.int64), DataType.INT64)]


#: op_type -> folder returning the outputs, or None to fall back to generic evaluation.
_SPECIAL: dict[str, Callable[[_Folder, Node], list[Tensor] | None]] = {
    "ConstantOfShape": _constant_of_shape,
    "Shape": _shape,
    "Size": _size,
}


#: Operators that are how a weight is stored: folding DequantizeLinear(int8 constant) would
#: turn a quantized weight back into float.
STORAGE = frozenset({"DequantizeLinear"})


def _foldable(node: Node) -> bool:
    return is_default_domain(node) and node.op_type not in NONDETERMINISTIC | STORAGE \
        and not any(True for _ in node.subgraphs()) \
        and any(out.uses() or out.is_graph_output() for out in node.outputs)


def _replace(node: Node, tensors: list[Tensor]) -> None:
    """Swap the node for initializers that keep its outputs' names (graph outputs too)."""
    graph = node.graph
    assert graph is not None
    named = [v for v in node.outputs if v.name]
    consts = [Value(old.name, const_value=t) for old, t in zip(named, tensors, strict=True)]
    substitute(node, list(zip(named, consts, strict=True)))
    for const in consts:
        graph.initializers.add(const)


@register_pass("fold-constants", options=FoldConstantsOptions, primary="max_bytes")
def fold_constants(model: Model, ctx: Context, opts: FoldConstantsOptions) -> PassResult:
    """Replace nodes whose inputs are all constant by initializers holding their outputs.

    A node folds when it is in the default domain, deterministic, not a DequantizeLinear (a
    quantized weight stays quantized), holds no subgraph, has a
    used output, and its inputs are constants (see ``_util.constant_tensor``: initializers
    that are not graph inputs, plus initializer-inputs of the main graph in IR < 4 models).
    ``Shape``/``Size`` also fold when their input merely has a static shape, and
    ``ConstantOfShape`` folds into a lazy tensor that is materialized only at export. Other
    nodes run through ``onnx.reference.ReferenceEvaluator`` within ``max_bytes``. One forward
    sweep folds whole chains (a folded value is constant for its readers), in every subgraph.

    The initializer replacing an output keeps that output's name, so folded graph outputs keep
    their public names (they become initializers listed as outputs).

    Requires: a topologically sorted graph. Preserves: nothing when it modifies; the values
    computed are the ones the runtime would compute.
    """
    folder = _Folder(model, opts)
    stats = {"nodes_folded": 0, "too_large": 0, "eval_failed": 0}
    for node in model.graph.walk():
        if node.graph is None or not _foldable(node):
            continue
        try:
            tensors = folder.fold(node)
        except _TooLarge:
            stats["too_large"] += 1
            continue
        except Exception as e:  # the reference evaluator can raise anything on odd inputs
            log.debug("cannot fold %r: %s: %s", node, type(e).__name__, e)
            stats["eval_failed"] += 1
            continue
        if tensors is None:
            continue
        _replace(node, tensors)
        stats["nodes_folded"] += 1
    return PassResult(modified=stats["nodes_folded"] > 0, stats=stats)
