"""Weightless copies of ModelProtos, for ONNX tools that read only small constants.

ONNX shape inference and the version converter read the data of small constants (shapes,
axes, pads) and only the type and dims of weights; copying and serializing a 100 MB model
costs them most of their time. :func:`proto_skeleton` strips the weights' data.
"""

from __future__ import annotations

__all__ = ["STUB_BYTES", "proto_skeleton"]

#: Constants at least this large are weights, not shapes: shape inference and the version
#: converter need their dims only. Integer ones stay up to :data:`INT_STUB_BYTES` (index
#: and shape tensors that data propagation may read).
STUB_BYTES = 1024
INT_STUB_BYTES = 1 << 16


def proto_skeleton(proto: object) -> tuple[object, set[str]]:
    """A copy of a ModelProto's main graph with its large constants stripped of their data.

    Initializers and ``Constant`` nodes' ``value`` tensors of at least :data:`STUB_BYTES`
    keep their name, type and dims only (so do tensors that are data-less already, such as
    the stubs of :func:`~edgeopt.ir.to_proto`'s ``deferred``). For shape inference and the
    version converter, which read the data of small constants (shapes, axes) only: copying
    a 100 MB model costs them most of their time. Returns the copy and the names of the
    stripped values (initializer names, ``Constant`` output names): put their data back with
    :func:`~edgeopt.ir.from_proto`'s ``tensors``.
    """
    import onnx

    out = onnx.ModelProto(ir_version=proto.ir_version)  # type: ignore[attr-defined]
    out.opset_import.extend(proto.opset_import)  # type: ignore[attr-defined]
    out.functions.extend(proto.functions)  # type: ignore[attr-defined]
    src, graph = proto.graph, out.graph  # type: ignore[attr-defined]
    graph.name, graph.doc_string = src.name, src.doc_string
    graph.metadata_props.extend(src.metadata_props)
    graph.quantization_annotation.extend(src.quantization_annotation)
    stripped: set[str] = set()
    for node in src.node:
        value = next((a for a in node.attribute if a.name == "value"), None) \
            if node.op_type == "Constant" and len(node.output) == 1 else None
        if value is None or not _large(value.t):
            graph.node.append(node)
            continue
        stub = graph.node.add(op_type="Constant", name=node.name, domain=node.domain)
        stub.output.extend(node.output)
        _stub_tensor(value.t, stub.attribute.add(name="value", type=value.type).t)
        stripped.add(node.output[0])
    graph.input.extend(src.input)
    graph.output.extend(src.output)
    graph.value_info.extend(src.value_info)
    for t in src.initializer:
        if _large(t):
            _stub_tensor(t, graph.initializer.add())
            stripped.add(t.name)
        else:
            graph.initializer.append(t)
    graph.sparse_initializer.extend(src.sparse_initializer)
    return out, stripped


def _large(t: object) -> bool:
    """A tensor with at least :data:`STUB_BYTES` of data, or one without data (a stub)."""
    size = len(t.raw_data) + 4 * (len(t.float_data) + len(t.int32_data)) + \
        8 * (len(t.int64_data) + len(t.double_data) + len(t.uint64_data))  # type: ignore[attr-defined]
    if size >= (INT_STUB_BYTES if t.data_type in (6, 7) else STUB_BYTES):  # type: ignore[attr-defined]  # INT32, INT64
        return True
    return not size and any(t.dims) and not len(t.string_data) and \
        t.data_location != 1  # type: ignore[attr-defined]  # no data at all, not external


def _stub_tensor(t: object, out: object) -> None:
    """Write ``t``'s name, type and dims into ``out`` (a new TensorProto), not its data."""
    out.name, out.data_type = t.name, t.data_type  # type: ignore[attr-defined]
    out.dims.extend(t.dims)  # type: ignore[attr-defined]
