"""A batch-1 model made to run many samples at once: :func:`unfix_batch`.

Many exported models fix their batch size to 1 (``[1, 3, 224, 224]`` inputs, ``Reshape`` to
``[1, 2048]``). Work that needs a statistic over several samples *inside* one ONNX Runtime
run (bias correction's per-channel means, measured layer after layer in one pass) needs the
samples in one batch. :func:`unfix_batch` rewrites an exported copy so that it takes any
batch size, and checks the rewrite or refuses it:

* every data input's batch dim (1) becomes the symbolic :data:`BATCH`;
* a constant ``Reshape`` shape (initializer or ``Constant``) starting with 1 starts with 0
  instead ("copy the input's dim", which is now the batch);
* ONNX shape inference (with data propagation, so that shapes computed by ``Shape``,
  ``Gather``, ``Concat``... follow the batch; ``Reshape(x, Shape(v))`` takes ``v``'s shape,
  which inference does not see) then runs on the copy, and every value
  computed from the data inputs (except through ``Shape``/``Size``, whose outputs describe
  a value, not a sample) must have :data:`BATCH` as its first dim: a value whose batch
  moved or vanished (a Transpose of axis 0, a reduction over it, a Reshape that folds it
  into another dim) is refused;
* operators that could mix samples while keeping the batch dim in place are refused:
  Softmax, LogSoftmax, Hardmax and LpNormalization over axis 0, CumSum,
  MeanVarianceNormalization, BatchNormalization in training mode, a Conv, ConvTranspose or
  Einsum whose weight (or second operand) is computed from the samples, and operators with
  subgraphs or of another domain (their semantics are not known here).

What is accepted runs sample by sample: each sample's outputs in the batch equal the batch-1
model's (up to the float rounding of other kernels).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from edgeopt.ir import proto_skeleton

__all__ = ["BATCH", "unfix_batch"]

#: The symbolic batch dim :func:`unfix_batch` gives the data inputs.
BATCH = "edgeopt_batch"

#: Operators that normalize along their ``axis`` attribute (default -1 from opset 13, 1
#: before, for all but LpNormalization). Before opset 13 the first three flatten the input
#: to 2-D at ``axis``; either way, only axis 0 spans the batch.
_AXIS_OPS = ("Softmax", "LogSoftmax", "Hardmax", "LpNormalization")


def unfix_batch(proto: object, inputs: Iterable[str]) -> str:
    """Make ``proto``'s main graph take any batch size on ``inputs`` (edited in place).

    Args:
        proto: an ``onnx.ModelProto``; its ``value_info`` is dropped and its batch dims
            (1 on every input in ``inputs``) become :data:`BATCH`.
        inputs: the data inputs (graph inputs that are not initializers).

    Returns:
        '' when the rewritten graph runs each sample as the batch-1 graph did (see the
        module docs); otherwise why not (``proto`` is then partly rewritten and
        must be thrown away).
    """
    import onnx
    from onnx import numpy_helper

    graph = proto.graph  # type: ignore[attr-defined]
    why = _mixing_node(graph)
    if why:
        return why
    wanted = set(inputs)
    for vi in graph.input:
        if vi.name not in wanted:
            continue
        dims = vi.type.tensor_type.shape.dim
        if not dims or dims[0].dim_value != 1:
            return f"input {vi.name!r} has no batch dim of 1"
        dims[0].Clear()
        dims[0].dim_param = BATCH
    for vi in graph.output:  # inference fills them in
        vi.type.tensor_type.ClearField("shape")
    del graph.value_info[:]
    consts = {t.name: t for t in graph.initializer}
    consts.update((n.output[0], a.t) for n in graph.node if n.op_type == "Constant"
                  for a in n.attribute if a.name == "value")
    for i, node in enumerate(graph.node):
        shape = consts.get(node.input[1]) if node.op_type == "Reshape" and \
            len(node.input) > 1 else None
        if shape is None:
            continue
        dims = numpy_helper.to_array(shape)
        if dims.ndim != 1 or not len(dims) or dims[0] != 1:
            continue
        if any(a.name == "allowzero" and a.i for a in node.attribute):
            return f"Reshape {node.name or node.output[0]!r} has allowzero=1"
        new = numpy_helper.from_array(np.concatenate([[0], dims[1:]]).astype(np.int64),
                                      f"{BATCH}.reshape{i}")
        graph.initializer.append(new)
        node.input[1] = new.name
    try:
        inferred = onnx.shape_inference.infer_shapes(proto_skeleton(proto)[0],
                                                     data_prop=True)
    except Exception as e:  # onnx raises its own error types
        return f"shape inference failed: {str(e).splitlines()[0] if str(e) else e}"
    opset = next((o.version for o in proto.opset_import  # type: ignore[attr-defined]
                  if o.domain in ("", "ai.onnx")), 0)
    return _batch_kept(inferred.graph, wanted, opset)


def _mixing_node(graph: object) -> str:
    """Why some node of ``graph`` could mix samples whatever its shapes ('' if none can)."""
    for node in graph.node:  # type: ignore[attr-defined]
        label = f"{node.op_type} {node.name or node.output[0]!r}"
        if node.domain not in ("", "ai.onnx"):
            return f"{label} is of domain {node.domain!r}"
        if any(a.g.node or a.graphs for a in node.attribute):
            return f"{label} has a subgraph"
        if node.op_type in ("CumSum", "MeanVarianceNormalization"):
            return f"{label} may accumulate over the batch axis"
        if node.op_type == "BatchNormalization" and any(
                a.name == "training_mode" and a.i for a in node.attribute):
            return f"{label} is in training mode"
    return ""


def _batch_kept(graph: object, inputs: set[str], opset: int) -> str:
    """Why a value computed from ``inputs`` lost its batch dim or mixes samples, or ''."""
    shapes = {vi.name: vi.type.tensor_type for vi in
              [*graph.input, *graph.value_info, *graph.output]}  # type: ignore[attr-defined]
    # Reshape(x, Shape(v)) gives x the shape of v, whose batch dim was checked: ONNX inference
    # does not follow a symbolic dim through Shape into Reshape (the version converter writes
    # this after every opset < 13 Softmax).
    shape_of = {n.output[0]: n.input[0] for n in graph.node  # type: ignore[attr-defined]
                if n.op_type == "Shape" and not n.attribute}
    per_sample = set(inputs)
    for node in graph.node:  # type: ignore[attr-defined]
        if node.op_type in ("Shape", "Size") or not per_sample.intersection(node.input):
            continue
        if node.op_type == "Reshape" and shape_of.get(node.input[1]) in per_sample:
            per_sample.add(node.output[0])
            continue
        label = f"{node.op_type} {node.name or node.output[0]!r}"
        if node.op_type in ("Conv", "ConvTranspose", "Einsum") and \
                per_sample.intersection(node.input[1:]):
            return f"{label} combines two values computed from the samples"
        if node.op_type in _AXIS_OPS and \
                _axis(node, shapes.get(node.input[0]), opset) in (0, None):
            return f"{label} may normalize over the batch axis"
        for out in node.output:
            if not out:
                continue
            t = shapes.get(out)
            dims = t.shape.dim if t is not None and t.HasField("shape") else None
            if not dims or dims[0].dim_param != BATCH:
                return f"value {out!r} of {label} " + (
                    "has no known shape" if dims is None else
                    "has an unknown first dim" if not dims[0].HasField("dim_param")
                    and not dims[0].HasField("dim_value") else "does not keep the batch dim")
            per_sample.add(out)
    return ""


def _axis(node: object, t: object, opset: int) -> int | None:
    """The non-negative ``axis`` of a Softmax-like node reading ``t`` (None: unknown)."""
    default = 1 if node.op_type != "LpNormalization" and opset < 13 else -1  # type: ignore[attr-defined]
    axis = next((a.i for a in node.attribute if a.name == "axis"), default)  # type: ignore[attr-defined]
    if axis >= 0:
        return axis
    if t is None or not t.HasField("shape"):  # type: ignore[attr-defined]
        return None
    return axis + len(t.shape.dim)  # type: ignore[attr-defined]

