"""ONNX protobuf -> IR.

Everything the IR does not rewrite is carried over so that export reproduces it: opsets,
metadata, doc strings, value_info types (verbatim, including non-tensor and denoted types),
sparse initializers, quantization annotations, custom domains and unknown ops, nested
subgraphs, and (as opaque messages) model-local functions and training info. ``Constant`` nodes
become initializers, so every pass sees one representation of constant data.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import Any

import numpy as np
import onnx

from ._errors import ModelLoadError
from ._graph import Graph, Model
from ._node import Attr, AttrType, Node
from ._safety import check_header, check_inline_tensor, resolve_external_location
from ._tensor import ArrayTensor, ExternalTensor, ProtoTensor, SparseTensor, Tensor
from ._types import DataType
from ._value import Value

__all__ = ["from_proto", "parse_type"]


def parse_type(tp: onnx.TypeProto) -> tuple[DataType | None, tuple | None]:
    """The (dtype, shape) a TypeProto describes; (None, None) for non-tensor types."""
    if tp.WhichOneof("value") != "tensor_type":
        return None, None
    tt = tp.tensor_type
    dtype = DataType(tt.elem_type) if tt.elem_type in DataType._value2member_map_ and \
        tt.elem_type else None
    if not tt.HasField("shape"):
        return dtype, None
    dims: list[Any] = []
    for d in tt.shape.dim:
        kind = d.WhichOneof("value")
        # Some exporters (Paddle) write -1 for a dynamic dim: that is an unknown dim.
        dims.append((d.dim_value if d.dim_value >= 0 else None) if kind == "dim_value"
                    else d.dim_param if kind == "dim_param" else None)
    return dtype, tuple(dims)


def _copy(msg: Any) -> Any:
    new = type(msg)()
    new.CopyFrom(msg)
    return new


class _Scope:
    """Name -> Value for one graph, chained to the enclosing graph's scope."""

    def __init__(self, parent: _Scope | None) -> None:
        self.parent = parent
        self.names: dict[str, Value] = {}

    def lookup(self, name: str) -> Value | None:
        scope: _Scope | None = self
        while scope is not None:
            if name in scope.names:
                return scope.names[name]
            scope = scope.parent
        return None

    def define(self, value: Value, where: str) -> None:
        if self.lookup(value.name) is not None:
            raise ModelLoadError(f"{where}: value {value.name!r} is defined more than once")
        self.names[value.name] = value


class _Importer:
    def __init__(self, base_dir: str | None, label: str,
                 supplied: Mapping[str, Tensor] | None = None) -> None:
        self.base_dir = base_dir
        self.label = label  # file name used as the prefix of every error message
        self.supplied = supplied or {}
        self.main: Graph | None = None  # the main graph, once its import starts

    # -- tensors -----------------------------------------------------------------------------
    def tensor(self, t: onnx.TensorProto, what: str) -> Tensor:
        where = f"{self.label}: {what}"
        if t.data_location == onnx.TensorProto.EXTERNAL:
            return self.external_tensor(t, where)
        check_inline_tensor(t, where)
        return ProtoTensor(t)

    def supplied_tensor(self, t: onnx.TensorProto, what: str, name: str | None = None
                        ) -> Tensor:
        """The tensor supplied for a data-less stub, if its type and dims match the stub's.

        ``name``: the value it is supplied for (default: the stub's own name).
        """
        tensor = self.supplied[t.name if name is None else name]
        if check_header(t, f"{self.label}: {what}") != tensor.dtype or \
                tuple(t.dims) != tuple(tensor.shape):
            raise ModelLoadError(f"{self.label}: {what}: the supplied tensor is "
                                 f"{tensor.dtype.name}{list(tensor.shape)}, the stub "
                                 f"{DataType.parse(t.data_type).name}{list(t.dims)}")
        return tensor

    def external_tensor(self, t: onnx.TensorProto, where: str) -> ExternalTensor:
        dtype = check_header(t, where)
        if dtype == DataType.STRING:
            raise ModelLoadError(f"{where}: string tensors cannot use external data")
        if self.base_dir is None:
            raise ModelLoadError(f"{where}: external data needs the model's file path")
        info = {e.key: e.value for e in t.external_data}
        path = resolve_external_location(self.base_dir, info.get("location", ""), where)
        try:
            offset = int(info.get("offset", "0"))
            length = int(info["length"]) if "length" in info else None
        except ValueError:
            raise ModelLoadError(f"{where}: external data offset/length are not integers") \
                from None
        size = os.path.getsize(path)
        shape = tuple(int(d) for d in t.dims)
        expected = (math.prod(shape) * dtype.bitwidth + 7) // 8
        if offset < 0 or offset > size:
            raise ModelLoadError(f"{where}: external data offset {offset} is outside "
                                 f"{info['location']!r} ({size} bytes)")
        if length is None:
            length = expected
        if length < 0 or offset + length > size:
            raise ModelLoadError(f"{where}: external data [{offset}, {offset + length}) does "
                                 f"not fit in {info['location']!r} ({size} bytes)")
        if length != expected:
            raise ModelLoadError(f"{where}: declares {math.prod(shape)} elements of "
                                 f"{dtype.name} ({expected} bytes) but external data holds "
                                 f"{length} bytes")
        return ExternalTensor(path, offset, length, dtype, shape, info["location"])

    def sparse_tensor(self, sp: onnx.SparseTensorProto, what: str) -> SparseTensor:
        values = self.tensor(sp.values, f"{what} (values)")
        indices = self.tensor(sp.indices, f"{what} (indices)")
        dims = tuple(int(d) for d in sp.dims)
        nnz = math.prod(values.shape)
        if len(values.shape) != 1 or indices.shape not in ((nnz,), (nnz, len(dims))):
            raise ModelLoadError(f"{self.label}: {what}: sparse indices {list(indices.shape)} "
                                 f"do not match {nnz} values in shape {list(dims)}")
        if indices.dtype != DataType.INT64:
            raise ModelLoadError(f"{self.label}: {what}: sparse indices must be INT64, not "
                                 f"{indices.dtype.name}")
        idx = indices.numpy()
        # Linear indices address the flattened tensor; coordinates are checked per axis.
        limits = np.array([math.prod(dims)] if idx.ndim == 1 else dims, dtype=np.int64)
        if idx.size and ((idx < 0).any() or (idx >= limits).any()):
            raise ModelLoadError(f"{self.label}: {what}: sparse index out of range")
        return SparseTensor(values, indices, dims)

    # -- graphs ------------------------------------------------------------------------------
    def graph(self, g: onnx.GraphProto, parent: _Scope | None) -> Graph:
        scope = _Scope(parent)
        gname = g.name or "main"
        where = f"{self.label}: graph {gname!r}"
        graph = Graph(name=g.name)
        if parent is None:
            self.main = graph
        graph.doc_string = g.doc_string
        graph.metadata_props = {p.key: p.value for p in g.metadata_props}
        for vi in g.input:
            value = self.value_from_info(vi)
            scope.define(value, where)
            graph.inputs.append(value)
        for t in g.initializer:
            what = f"initializer {t.name!r}"
            tensor = self.supplied_tensor(t, what) if parent is None and \
                t.name in self.supplied else self.tensor(t, what)
            self.add_initializer(graph, scope, t.name, tensor, where)
        for sp in g.sparse_initializer:
            tensor = self.sparse_tensor(sp, f"sparse initializer {sp.values.name!r}")
            self.add_initializer(graph, scope, sp.values.name, tensor, where)
        # Phase 1: define every node output so forward references inside subgraphs resolve.
        outputs: list[list[Value]] = []
        for n in g.node:
            outs = [Value(name) for name in n.output]
            for v in outs:
                if v.name:
                    scope.define(v, f"{where}: node {n.name or n.op_type!r}")
            outputs.append(outs)
        for n, outs in zip(g.node, outputs, strict=True):
            self.node(n, outs, graph, scope)
        for vi in g.output:
            value = scope.lookup(vi.name) if vi.name else None
            if value is None:
                value = Value(vi.name)  # undefined output: kept so verify() can name it
            self.apply_info(value, vi)
            graph.outputs.append(value)
        for vi in g.value_info:
            value = scope.lookup(vi.name)
            if value is not None:
                self.apply_info(value, vi)
        graph.quantization_annotations = [
            (a.tensor_name, [(e.key, e.value) for e in a.quant_parameter_tensor_names])
            for a in g.quantization_annotation]
        graph.version = 0
        return graph

    def add_initializer(self, graph: Graph, scope: _Scope, name: str, tensor: Tensor,
                        where: str) -> None:
        existing = scope.names.get(name)
        if existing is not None and existing.is_graph_input() and not existing.is_initializer():
            # An initializer that is also a graph input (a default the caller may override):
            # the declared input type stays the value's type.
            existing._const_value = tensor
            if existing.dtype is None and existing.shape is None:
                existing._dtype, existing._shape = tensor.dtype, tuple(tensor.shape)
            graph.initializers.add(existing)
            return
        value = Value(name, const_value=tensor)
        scope.define(value, where)
        graph.initializers.add(value)

    def node(self, n: onnx.NodeProto, outs: list[Value], graph: Graph, scope: _Scope) -> None:
        label = n.name or f"{n.op_type} -> {', '.join(n.output)}"
        what = f"node {label!r}"
        if n.op_type == "Constant" and n.domain in ("", "ai.onnx") and len(n.output) == 1 \
                and n.output[0] and not any(a.ref_attr_name for a in n.attribute):
            tensor = self.supplied_tensor(n.attribute[0].t, what, n.output[0]) \
                if graph is self.main and n.output[0] in self.supplied and \
                len(n.attribute) == 1 and n.attribute[0].name == "value" else \
                self.constant_value(n, what)
            if tensor is not None:
                value = outs[0]
                value._const_value = tensor
                value._dtype, value._shape = tensor.dtype, tuple(tensor.shape)
                graph.initializers.add(value)
                return
        inputs = []
        for name in n.input:
            if not name:
                inputs.append(None)
                continue
            value = scope.lookup(name)
            if value is None:
                value = Value(name)  # undefined: kept dangling so verify() reports it
                scope.names[name] = value
            inputs.append(value)
        attrs = [self.attribute(a, f"{what} attribute {a.name!r}", scope) for a in n.attribute]
        node = Node(n.op_type, inputs, attrs, domain=n.domain, outputs=outs, name=n.name,
                    overload=n.overload)
        node.doc_string = n.doc_string
        node.metadata_props = {p.key: p.value for p in n.metadata_props}
        if len(n.device_configurations):
            node.extra_protos["device_configurations"] = [
                _copy(c) for c in n.device_configurations]
        graph.append(node)

    def constant_value(self, n: onnx.NodeProto, what: str) -> Tensor | None:
        """The tensor a Constant node produces, or None if it must stay a node."""
        if len(n.attribute) != 1:
            return None
        a = n.attribute[0]
        import numpy as np

        if a.name == "value":
            return self.tensor(a.t, what)
        if a.name == "sparse_value":
            return self.sparse_tensor(a.sparse_tensor, what)
        if a.name == "value_float":
            return ArrayTensor(np.array(a.f, dtype=np.float32))
        if a.name == "value_floats":
            return ArrayTensor(np.array(a.floats, dtype=np.float32))
        if a.name == "value_int":
            return ArrayTensor(np.array(a.i, dtype=np.int64))
        if a.name == "value_ints":
            return ArrayTensor(np.array(a.ints, dtype=np.int64))
        if a.name == "value_string":
            return ArrayTensor(np.array(a.s, dtype=object), DataType.STRING)
        if a.name == "value_strings":
            return ArrayTensor(np.array(list(a.strings), dtype=object).reshape(-1),
                               DataType.STRING)
        return None

    def attribute(self, a: onnx.AttributeProto, what: str, scope: _Scope) -> Attr:
        kind = AttrType(a.type) if a.type in AttrType._value2member_map_ else AttrType.UNDEFINED
        if kind == AttrType.UNDEFINED and not a.ref_attr_name:
            kind = _infer_attr_type(a)
        value: Any
        if kind == AttrType.FLOAT:
            value = a.f
        elif kind == AttrType.INT:
            value = a.i
        elif kind == AttrType.STRING:
            value = _decode(a.s)
        elif kind == AttrType.TENSOR:
            value = self.tensor(a.t, what)
        elif kind == AttrType.GRAPH:
            value = self.graph(a.g, scope)
        elif kind == AttrType.FLOATS:
            value = list(a.floats)
        elif kind == AttrType.INTS:
            value = list(a.ints)
        elif kind == AttrType.STRINGS:
            value = [_decode(s) for s in a.strings]
        elif kind == AttrType.TENSORS:
            value = [self.tensor(t, what) for t in a.tensors]
        elif kind == AttrType.GRAPHS:
            value = [self.graph(g, scope) for g in a.graphs]
        elif kind == AttrType.SPARSE_TENSOR:
            value = _copy(a.sparse_tensor)
        elif kind == AttrType.SPARSE_TENSORS:
            value = [_copy(s) for s in a.sparse_tensors]
        elif kind == AttrType.TYPE_PROTO:
            value = _copy(a.tp)
        elif kind == AttrType.TYPE_PROTOS:
            value = [_copy(t) for t in a.type_protos]
        else:
            value = None
        return Attr(a.name, kind, value, a.doc_string, a.ref_attr_name)

    # -- value info --------------------------------------------------------------------------
    def value_from_info(self, vi: onnx.ValueInfoProto) -> Value:
        value = Value(vi.name)
        self.apply_info(value, vi)
        return value

    def apply_info(self, value: Value, vi: onnx.ValueInfoProto) -> None:
        """Take type, doc string and metadata from a ValueInfoProto (first one wins)."""
        if vi.HasField("type") and value.type_proto is None:
            dtype, shape = parse_type(vi.type)
            if value.const_value is None or (value.dtype is None and value.shape is None):
                if value._dtype is None:
                    value._dtype = dtype
                if value._shape is None:
                    value._shape = shape
            value.type_proto = _copy(vi.type)
        if vi.doc_string and not value.doc_string:
            value.doc_string = vi.doc_string
        for p in vi.metadata_props:
            value.metadata_props.setdefault(p.key, p.value)


def _decode(s: bytes) -> str | bytes:
    try:
        return s.decode("utf-8")
    except UnicodeDecodeError:
        return s


def _infer_attr_type(a: onnx.AttributeProto) -> AttrType:
    """Attribute type of old files that left ``type`` unset."""
    for field, kind in (("floats", AttrType.FLOATS), ("ints", AttrType.INTS),
                        ("strings", AttrType.STRINGS), ("tensors", AttrType.TENSORS),
                        ("graphs", AttrType.GRAPHS)):
        if len(getattr(a, field)):
            return kind
    for field, kind in (("f", AttrType.FLOAT), ("i", AttrType.INT), ("s", AttrType.STRING),
                        ("t", AttrType.TENSOR), ("g", AttrType.GRAPH)):
        if a.HasField(field):
            return kind
    return AttrType.UNDEFINED


def from_proto(proto: onnx.ModelProto, base_dir: str | None = None,
               label: str = "<model>", tensors: Mapping[str, Tensor] | None = None) -> Model:
    """Build the IR of a parsed ModelProto.

    Args:
        proto: the model. Inline tensors stay inside it (the IR references them, so weights
            are held once); do not mutate it afterwards.
        base_dir: folder that external-data locations are relative to.
        label: file name to start error messages with.
        tensors: data of main-graph initializers and ``Constant`` nodes (by output name),
            used instead of the proto's: for data-less stubs (:func:`~edgeopt.ir.to_proto`'s
            ``deferred``, :func:`~edgeopt.ir.proto_skeleton`); their type and dims
            must be the proto's.

    Raises:
        ModelLoadError: the model is malformed or hostile.
    """
    if not proto.HasField("graph"):
        raise ModelLoadError(f"{label}: not an ONNX model (no graph)")
    imp = _Importer(base_dir, label, tensors)
    graph = imp.graph(proto.graph, None)
    model = Model(graph, {o.domain: o.version for o in proto.opset_import}, proto.ir_version)
    model.producer_name = proto.producer_name
    model.producer_version = proto.producer_version
    model.domain = proto.domain
    model.model_version = proto.model_version
    model.doc_string = proto.doc_string
    model.metadata_props = {p.key: p.value for p in proto.metadata_props}
    model.functions = [_copy(f) for f in proto.functions]
    model.training_info = [_copy(t) for t in proto.training_info]
    model.configuration = [_copy(c) for c in proto.configuration]
    return model
