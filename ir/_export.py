"""IR -> ONNX protobuf, with inline or external tensor data."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from ._graph import Graph, Model
from ._import import parse_type
from ._node import Attr, AttrType, Node
from ._tensor import ExternalTensor, ProtoTensor, SparseTensor, Tensor
from ._types import DataType, Shape
from ._value import Value
from .sparse import CSRTensor

__all__ = ["ExternalWriter", "tensor_bytes", "to_proto"]


def tensor_bytes(tensor: Tensor, chunk: int = 1 << 24) -> Iterator[bytes | memoryview]:
    """The tensor's packed little-endian bytes (ONNX ``raw_data`` layout), in chunks.

    External data is streamed with plain reads, arrays are exposed without a copy, so
    writing a large model does not hold its weights twice.
    """
    if isinstance(tensor, ExternalTensor):
        yield from tensor.iter_bytes(chunk)
        return
    if isinstance(tensor, ProtoTensor) and tensor.proto.HasField("raw_data"):
        yield tensor.proto.raw_data
        return
    dtype = tensor.dtype
    arr = tensor.numpy()
    if dtype.bitwidth % 8 or dtype in (DataType.BFLOAT16,) or dtype.bitwidth == 0 \
            or arr.dtype.kind == "O":
        yield _to_tensor_proto(tensor, "").raw_data
        return
    arr = np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<"))
    view = memoryview(arr.reshape(-1)).cast("B") if arr.size else memoryview(b"")
    for start in range(0, len(view), chunk):
        yield view[start:start + chunk]


def _to_tensor_proto(tensor: Tensor, name: str) -> onnx.TensorProto:
    """An inline TensorProto for a tensor (verbatim for ProtoTensor)."""
    if isinstance(tensor, ProtoTensor):
        proto = onnx.TensorProto()
        proto.CopyFrom(tensor.proto)
        if proto.name != name:
            proto.name = name
        return proto
    arr = tensor.numpy()
    if tensor.dtype == DataType.STRING:
        proto = onnx.helper.make_tensor(name, onnx.TensorProto.STRING, list(arr.shape),
                                        [s if isinstance(s, bytes) else str(s).encode()
                                         for s in arr.reshape(-1)])
        return proto
    if isinstance(tensor, ExternalTensor) or np.dtype(arr.dtype) == tensor.dtype.numpy():
        proto = numpy_helper.from_array(np.asarray(arr), name)
        if proto.data_type != int(tensor.dtype):  # e.g. bfloat16 carried as uint16 storage
            proto.data_type = int(tensor.dtype)
        return proto
    return numpy_helper.from_array(np.asarray(arr).astype(tensor.dtype.numpy()), name)


class ExternalWriter:
    """Chooses which tensors go to an external data file and writes them there.

    Args:
        sink: writes bytes to the data file (an open binary file's ``write``).
        location: the data file's name relative to the model file.
        threshold: tensors smaller than this many bytes stay inline.
    """

    ALIGN_THRESHOLD = 1 << 20  # tensors this large start at a multiple of ALIGNMENT (mmap-able)
    ALIGNMENT = 1 << 16

    def __init__(self, sink: Callable[[Any], Any], location: str, threshold: int = 1024) -> None:
        self.sink = sink
        self.location = location
        self.threshold = threshold
        self.offset = 0

    def wants(self, tensor: Tensor) -> bool:
        """True if the tensor goes to the data file."""
        return tensor.dtype != DataType.STRING and tensor.nbytes >= self.threshold

    def write(self, tensor: Tensor, name: str) -> onnx.TensorProto:
        """Append the tensor's bytes and return its external TensorProto."""
        if tensor.nbytes >= self.ALIGN_THRESHOLD and self.offset % self.ALIGNMENT:
            pad = self.ALIGNMENT - self.offset % self.ALIGNMENT
            self.sink(b"\0" * pad)
            self.offset += pad
        start = self.offset
        for block in tensor_bytes(tensor):
            self.sink(block)
            self.offset += len(block)
        if self.offset - start != tensor.nbytes:
            raise OSError(f"tensor {name!r}: wrote {self.offset - start} bytes, expected "
                          f"{tensor.nbytes}")
        proto = _set(onnx.TensorProto(), name=name, data_type=int(tensor.dtype))
        proto.dims.extend(tensor.shape)
        if isinstance(tensor, ProtoTensor):
            _set(proto, doc_string=tensor.proto.doc_string)
            proto.metadata_props.extend(tensor.proto.metadata_props)
        proto.data_location = onnx.TensorProto.EXTERNAL
        for key, val in (("location", self.location), ("offset", str(start)),
                         ("length", str(tensor.nbytes))):
            proto.external_data.add(key=key, value=val)
        return proto


class _Exporter:
    def __init__(self, model: Model, external: ExternalWriter | None,
                 deferred: dict[str, Tensor] | None, sparse: bool = False,
                 value_info: str = "all") -> None:
        if value_info not in VALUE_INFO_POLICIES:
            raise ValueError(f"value_info must be one of {', '.join(VALUE_INFO_POLICIES)}, "
                             f"got {value_info!r}")
        self.value_info = value_info
        self.model = model
        self.external = external
        self.deferred = deferred
        self.sparse_initializers = sparse
        self.wrote_sparse = False

    def as_sparse(self, tensor: Tensor) -> SparseTensor | None:
        """The ONNX sparse form of a CSR-packed weight, when asked for and smaller."""
        if not (self.sparse_initializers and isinstance(tensor, CSRTensor)) \
                or tensor.coo_nbytes >= tensor.nbytes:
            return None
        return tensor.to_coo()

    def tensor(self, tensor: Tensor, name: str) -> onnx.TensorProto:
        if self.external is not None and self.external.wants(tensor):
            return self.external.write(tensor, name)
        return _to_tensor_proto(tensor, name)

    def initializer(self, graph: Graph, tensor: Tensor, name: str) -> onnx.TensorProto:
        """A main-graph initializer, or a data-less stub when the caller streams the file.

        See :func:`to_proto`: a large inline tensor is then never copied into the proto.
        """
        if self.deferred is not None and graph is self.model.graph and name \
                and tensor.nbytes >= DEFER_BYTES and not (
                    self.external is not None and self.external.wants(tensor)):
            self.deferred[name] = tensor
            stub = _set(onnx.TensorProto(), name=name, data_type=int(tensor.dtype))
            stub.dims.extend(tensor.shape)
            return stub
        return self.tensor(tensor, name)

    def sparse(self, tensor: SparseTensor, name: str) -> onnx.SparseTensorProto:
        sp = onnx.SparseTensorProto(dims=tensor.shape)
        sp.values.CopyFrom(self.tensor(tensor.values, name))
        # The indices keep their own name (usually empty); it is part of the file.
        sp.indices.CopyFrom(self.tensor(tensor.indices, _tensor_name(tensor.indices)))
        return sp

    def graph(self, graph: Graph, g: onnx.GraphProto) -> None:
        """Fill ``g`` (built in place: copying a finished GraphProto would copy its weights)."""
        _set(g, name=graph.name, doc_string=graph.doc_string)
        _props(g.metadata_props, graph.metadata_props)
        listed = set()
        for v in graph.inputs:
            g.input.append(value_info(v))
            listed.add(id(v))
        free_consts: list[Value] = []
        for v in graph.initializers.values():
            if self.model.ir_version < 4 and not v.is_graph_input():
                free_consts.append(v)  # IR < 4 requires initializers to be inputs
            elif isinstance(v.const_value, SparseTensor):
                g.sparse_initializer.append(self.sparse(v.const_value, v.name))
            elif (coo := self.as_sparse(v.const_value)) is not None:
                g.sparse_initializer.append(self.sparse(coo, v.name))
                self.wrote_sparse = True
            else:
                g.initializer.append(self.initializer(graph, v.const_value, v.name))
        for v in free_consts:
            g.node.append(onnx.helper.make_node(
                "Constant", [], [v.name], value=_to_tensor_proto(v.const_value, "")))
        for v in graph.outputs:
            g.output.append(value_info(v))
            listed.add(id(v))
        for node in graph:
            g.node.append(self.node(node))
            for out in node.outputs:
                if id(out) not in listed and out.name and self.keeps_info(node, out):
                    g.value_info.append(value_info(out))
        for v in graph.initializers.values():
            # Type information a file attached to a weight through value_info (some exporters
            # annotate weights, Constant outputs often are) goes back there; weights a pass
            # created have no type_proto and need no entry.
            if id(v) not in listed and (v.type_proto is not None or v.doc_string
                                        or v.metadata_props):
                g.value_info.append(value_info(v))
        for tensor_name, entries in graph.quantization_annotations:
            ann = g.quantization_annotation.add(tensor_name=tensor_name)
            for key, val in entries:
                ann.quant_parameter_tensor_names.add(key=key, value=val)

    def keeps_info(self, node: Node, v: Value) -> bool:
        """Whether the output ``v`` of ``node`` (not a graph output) gets a value_info entry.

        ``all``: whenever anything about its type is known. ``file``: what the file had (a
        ``type_proto``, a doc string, metadata) goes back, and a type that a pass or shape
        inference worked out only where ONNX shape inference could not work it out again,
        i.e. for outputs of operators outside the standard domain. For a standard operator
        the entry only costs bytes: on a quantized model the QuantizeLinear/DequantizeLinear
        outputs alone are about 3% of the file.
        """
        if v.type_proto is not None or v.doc_string or v.metadata_props:
            return True
        if v.dtype is None and v.shape is None:
            return False
        return self.value_info == "all" or node.domain not in ("", "ai.onnx")

    def node(self, node: Node) -> onnx.NodeProto:
        n = _set(onnx.NodeProto(), op_type=node.op_type, domain=node.domain, name=node.name,
                 overload=node.overload, doc_string=node.doc_string)
        n.input.extend("" if v is None else v.name for v in node.inputs)
        n.output.extend(v.name for v in node.outputs)
        _props(n.metadata_props, node.metadata_props)
        for c in node.extra_protos.get("device_configurations", []):
            n.device_configurations.add().CopyFrom(c)
        for attr in node.attrs.values():
            n.attribute.append(self.attribute(attr))
        return n

    def attribute(self, attr: Attr) -> onnx.AttributeProto:
        a = _set(onnx.AttributeProto(), name=attr.name, type=int(attr.type),
                 doc_string=attr.doc_string, ref_attr_name=attr.ref_attr_name)
        v, k = attr.value, attr.type
        if attr.ref_attr_name and v is None:
            return a
        if k == AttrType.FLOAT:
            a.f = v
        elif k == AttrType.INT:
            a.i = v
        elif k == AttrType.STRING:
            a.s = _encode(v)
        elif k == AttrType.TENSOR:
            a.t.CopyFrom(_to_tensor_proto(v, _tensor_name(v)))
        elif k == AttrType.GRAPH:
            self.graph(v, a.g)
        elif k == AttrType.FLOATS:
            a.floats.extend(v)
        elif k == AttrType.INTS:
            a.ints.extend(v)
        elif k == AttrType.STRINGS:
            a.strings.extend(_encode(s) for s in v)
        elif k == AttrType.TENSORS:
            a.tensors.extend(_to_tensor_proto(t, _tensor_name(t)) for t in v)
        elif k == AttrType.GRAPHS:
            for sub in v:
                self.graph(sub, a.graphs.add())
        elif k == AttrType.SPARSE_TENSOR:
            a.sparse_tensor.CopyFrom(v)
        elif k == AttrType.SPARSE_TENSORS:
            a.sparse_tensors.extend(v)
        elif k == AttrType.TYPE_PROTO:
            a.tp.CopyFrom(v)
        elif k == AttrType.TYPE_PROTOS:
            a.type_protos.extend(v)
        return a


def _set(msg: Any, **fields: Any) -> Any:
    """Set only non-empty fields: ONNX is proto2, where an empty string set is still 'present'."""
    for key, val in fields.items():
        if val:
            setattr(msg, key, val)
    return msg


def _tensor_name(tensor: Tensor) -> str:
    return tensor.proto.name if isinstance(tensor, ProtoTensor) else ""


def _encode(s: str | bytes) -> bytes:
    return s if isinstance(s, bytes) else s.encode("utf-8")


def _props(field: Any, props: dict[str, str]) -> None:
    for key, val in props.items():
        field.add(key=key, value=val)


#: The ``value_info`` policies of :func:`to_proto`.
VALUE_INFO_POLICIES = ("all", "file")


def type_proto(dtype: DataType | None, shape: Shape | None) -> onnx.TypeProto:
    """A tensor TypeProto for a dtype and shape (either may be unknown)."""
    tp = onnx.TypeProto()
    tt = tp.tensor_type
    tt.elem_type = int(dtype) if dtype is not None else 0
    if shape is not None:
        tt.shape.SetInParent()
        for d in shape:
            dim = tt.shape.dim.add()
            if isinstance(d, int):
                dim.dim_value = d
            elif isinstance(d, str):
                dim.dim_param = d
    return tp


def value_info(v: Value) -> onnx.ValueInfoProto:
    """The ValueInfoProto of a value: its file type verbatim while still accurate."""
    vi = _set(onnx.ValueInfoProto(), name=v.name, doc_string=v.doc_string)
    _props(vi.metadata_props, v.metadata_props)
    if v.type_proto is not None and (parse_type(v.type_proto) == (v.dtype, v.shape)
                                     or v.type_proto.WhichOneof("value") != "tensor_type"):
        vi.type.CopyFrom(v.type_proto)
    elif v.dtype is not None or v.shape is not None:
        vi.type.CopyFrom(type_proto(v.dtype, v.shape))
    return vi


#: Inline main-graph initializers this large are deferred by a streaming writer.
DEFER_BYTES = 4096
#: First IR version with ``sparse_initializer``.
SPARSE_IR_VERSION = 6


def full_tensor_proto(tensor: Tensor, name: str) -> onnx.TensorProto:
    """The complete inline TensorProto of a deferred initializer (built when it is written)."""
    return _to_tensor_proto(tensor, name)


def to_proto(model: Model, external: ExternalWriter | None = None,
             deferred: dict[str, Tensor] | None = None, sparse_initializers: bool = False,
             value_info: str = "all") -> onnx.ModelProto:
    """Build the ModelProto of a model.

    Args:
        model: the model.
        external: where large tensors go; None writes every tensor inline.
        deferred: if given, large inline initializers of the main graph are written as
            data-less stubs and collected here by name; the caller (a streaming file writer)
            must substitute :func:`full_tensor_proto` for each stub. The result is then NOT a
            complete model by itself.
        sparse_initializers: write each CSR-packed weight (:class:`~edgeopt.ir.CSRTensor`)
            whose ONNX sparse form (values + int64 indices) is smaller than its dense bytes
            as a ``sparse_initializer`` (the model's IR version is raised to 6 if needed);
            otherwise every CSR-packed weight is written dense.
        value_info: which intermediate values get a ``value_info`` entry: ``all`` (every
            value whose type is known; what shape inference and the checker are given) or
            ``file`` (what the loaded file had, plus types ONNX inference cannot recover:
            outputs of custom-domain operators; what :func:`~edgeopt.ir.save` writes).
            Graph inputs and outputs always have theirs.
    """
    exp = _Exporter(model, external, deferred, sparse_initializers, value_info)
    proto = _set(onnx.ModelProto(), ir_version=model.ir_version,
                 producer_name=model.producer_name, producer_version=model.producer_version,
                 domain=model.domain, model_version=model.model_version,
                 doc_string=model.doc_string)
    for domain, version in model.opset_imports.items():
        proto.opset_import.add(domain=domain, version=version)
    _props(proto.metadata_props, model.metadata_props)
    exp.graph(model.graph, proto.graph)
    if exp.wrote_sparse and proto.ir_version < SPARSE_IR_VERSION:
        proto.ir_version = SPARSE_IR_VERSION
    proto.functions.extend(model.functions)
    proto.training_info.extend(model.training_info)
    proto.configuration.extend(model.configuration)
    return proto
