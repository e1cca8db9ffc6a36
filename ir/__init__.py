"""edgeopt's graph IR: values with use-def chains, nodes, graphs with subgraphs, models.

A small, ONNX-shaped IR (names follow onnx-ir: ``producer()``, ``uses()``, ``consumers()``,
``replace_all_uses_with``, ``const_value``) whose invariants are kept by construction and
checked by :func:`verify`. ONNX files come in through :func:`load` and go out through
:func:`save`; everything the IR does not rewrite survives the round trip.
"""

from __future__ import annotations

from ._errors import EdgeoptError, ModelLoadError, VerificationError
from ._export import to_proto
from ._graph import Graph, Model
from ._import import from_proto
from ._node import Attr, AttrType, Node
from ._skeleton import proto_skeleton
from ._tensor import (
    ArrayTensor,
    ExternalTensor,
    LazyTensor,
    ProtoTensor,
    SparseTensor,
    Tensor,
)
from ._types import DataType, Dim, Shape, format_shape, shape_is_static
from ._value import Use, Value
from .io_onnx import load, save
from .quant import QuantParams, quant_params
from .shapes import infer_shapes, static_shapes
from .sparse import CSRTensor, csr_nbytes
from .verify import verify

__all__ = [
    "ArrayTensor",
    "Attr",
    "AttrType",
    "CSRTensor",
    "DataType",
    "Dim",
    "EdgeoptError",
    "ExternalTensor",
    "Graph",
    "LazyTensor",
    "Model",
    "ModelLoadError",
    "Node",
    "ProtoTensor",
    "QuantParams",
    "Shape",
    "SparseTensor",
    "Tensor",
    "Use",
    "Value",
    "VerificationError",
    "csr_nbytes",
    "format_shape",
    "from_proto",
    "infer_shapes",
    "load",
    "proto_skeleton",
    "quant_params",
    "save",
    "shape_is_static",
    "static_shapes",
    "to_proto",
    "verify",
]
