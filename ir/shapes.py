"""Shape and dtype inference into the IR.

ONNX's own inference does the work (with data propagation, so Reshape targets built from
Shape/Gather/Concat chains resolve); the results are merged into the IR's values without ever
weakening what the IR already knows. Large weights are not serialized for it: they are passed
as external-data placeholders, since inference only needs their dims.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import onnx

from ._errors import EdgeoptError
from ._export import ExternalWriter, to_proto
from ._graph import Graph, Model
from ._import import parse_type
from ._skeleton import proto_skeleton
from ._tensor import Tensor
from ._types import DataType
from ._value import Value

__all__ = ["infer_shapes", "static_shapes"]


class _Placeholders(ExternalWriter):
    """Marks large tensors external without reading or writing their bytes."""

    def __init__(self) -> None:
        super().__init__(lambda _: None, "__edgeopt_shape_inference_placeholder__", 4096)

    def wants(self, tensor: Tensor) -> bool:
        # Small integer tensors stay inline: data propagation reads shape constants.
        if tensor.dtype in (DataType.INT64, DataType.INT32) and tensor.nbytes <= 1 << 16:
            return False
        return super().wants(tensor)

    def write(self, tensor: Tensor, name: str) -> onnx.TensorProto:
        proto = onnx.TensorProto(name=name, data_type=int(tensor.dtype))
        proto.dims.extend(tensor.shape)
        proto.data_location = onnx.TensorProto.EXTERNAL
        proto.external_data.add(key="location", value=self.location)
        return proto


def _all_values(graph: Graph) -> Iterator[Value]:
    yield from graph.inputs
    yield from graph.initializers.values()
    for node in graph:
        yield from node.outputs
        for sub in node.subgraphs():
            yield from _all_values(sub)
    yield from graph.outputs


def _infos(g: onnx.GraphProto) -> Iterator[onnx.ValueInfoProto]:
    yield from g.input
    yield from g.output
    yield from g.value_info
    for n in g.node:
        for a in n.attribute:
            if a.HasField("g"):
                yield from _infos(a.g)
            for sub in a.graphs:
                yield from _infos(sub)


def _merge_shape(old: tuple | None, new: tuple | None, refine: bool) -> tuple | None:
    """Combine known and inferred dims without weakening what is known.

    Unknown dims (and, if ``refine``, symbolic ones) take the inferred value; static dims
    never change, and neither does a shape whose rank inference disagrees with.
    """
    if new is None:
        return old
    if old is None:
        return new
    if len(old) != len(new):
        return old
    return tuple(n if o is None or (refine and isinstance(o, str) and isinstance(n, int)) else o
                 for o, n in zip(old, new, strict=True))


def infer_shapes(model: Model, data_prop: bool = True, refine_symbolic: bool = False) -> int:
    """Fill in dtypes and shapes of the model's values, in place.

    Known dims are never replaced; unknown ones (``None``) and unknown ranks are filled with
    what ONNX inference finds, including symbolic dims.

    Args:
        model: the model.
        data_prop: let inference propagate small constant values (shape arithmetic).
        refine_symbolic: let a static size that inference derives replace a symbolic dim
            (used once inputs are fixed by :func:`static_shapes`).

    Returns:
        How many values gained type information.

    Raises:
        EdgeoptError: ONNX inference rejected the model (the message says why).
    """
    # Weights are placeholders; IR < 4 models write them as Constant nodes, stripped here.
    proto = proto_skeleton(to_proto(model, _Placeholders()))[0]
    try:
        inferred = onnx.shape_inference.infer_shapes(proto, check_type=False, strict_mode=False,
                                                     data_prop=data_prop)
    except (onnx.shape_inference.InferenceError, onnx.checker.ValidationError) as e:
        raise EdgeoptError(f"shape inference failed: {str(e).strip().splitlines()[0]}") \
            from None
    by_name: dict[str, Value] = {v.name: v for v in _all_values(model.graph) if v.name}
    changed = 0
    for vi in _infos(inferred.graph):
        value = by_name.get(vi.name)
        if value is None or not vi.HasField("type") or value.const_value is not None:
            continue
        dtype, shape = parse_type(vi.type)
        new_dtype = value.dtype if value.dtype is not None else dtype
        new_shape = _merge_shape(value.shape, shape, refine_symbolic)
        if (new_dtype, new_shape) != (value.dtype, value.shape):
            value.dtype, value.shape = new_dtype, new_shape
            changed += 1
        if value.type_proto is None and vi.type.WhichOneof("value") != "tensor_type":
            value.type_proto = vi.type  # sequences, maps, optionals: keep the inferred type
    return changed


#: Symbolic dim names that name no particular size: each such dim is free on its own
#: (Paddle's exporter writes ``?`` for every unknown dim), so two of them are never bound
#: together.
ANONYMOUS_DIMS = frozenset({"?", "-1", "unk__"})


def static_shapes(model: Model, input_shapes: Mapping[str, Sequence[int | None]]
                  ) -> dict[str, int]:
    """Fix the shapes of graph inputs, bind their symbolic dims everywhere, and re-infer.

    Args:
        model: the model, changed in place.
        input_shapes: input name -> full shape; a ``None`` dim keeps the declared one (so
            ``(1, None, None)`` binds only a batch axis).

    Returns:
        The symbolic dim bindings made (e.g. ``{"N": 1}``).

    Raises:
        EdgeoptError: unknown input, wrong rank, a conflict with a static dim, or one symbol
            bound to two sizes.
    """
    inputs = {v.name: v for v in model.graph.inputs if not v.is_initializer()}
    bindings: dict[str, int] = {}
    fixed: dict[str, tuple] = {}
    for name, dims in input_shapes.items():
        value = inputs.get(name)
        if value is None:
            raise EdgeoptError(f"no graph input named {name!r}; inputs are "
                               f"{', '.join(map(repr, inputs)) or 'none'}")
        dims = tuple(None if d is None else int(d) for d in dims)
        if any(d is not None and d < 0 for d in dims):
            raise EdgeoptError(f"input {name!r}: dims must be non-negative, got {list(dims)}")
        declared = value.shape
        if declared is not None and len(declared) != len(dims):
            raise EdgeoptError(f"input {name!r} has rank {len(declared)}, got shape "
                               f"{list(dims)}")
        for i, d in enumerate(dims):
            old: Any = declared[i] if declared is not None else None
            if d is None:
                continue
            if isinstance(old, int) and old != d:
                raise EdgeoptError(f"input {name!r} dim {i} is fixed at {old}, got {d}")
            if isinstance(old, str) and old not in ANONYMOUS_DIMS and \
                    bindings.setdefault(old, d) != d:
                raise EdgeoptError(f"symbolic dim {old!r} bound to both {bindings[old]} "
                                   f"and {d}")
        fixed[name] = tuple(d if d is not None else declared[i] if declared is not None
                            else None for i, d in enumerate(dims))
    for value in _all_values(model.graph):
        if value.shape is not None and any(isinstance(d, str) and d in bindings
                                           for d in value.shape):
            value.shape = tuple(bindings.get(d, d) if isinstance(d, str) else d
                                for d in value.shape)
    for name, dims in fixed.items():
        inputs[name].shape = dims
    infer_shapes(model, refine_symbolic=True)
    return bindings
