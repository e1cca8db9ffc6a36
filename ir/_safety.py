"""Checks applied to untrusted model files before any data is allocated or read.

Edge deployments receive models from outside, so the loader treats every file as hostile:
external-data locations must stay inside the model's folder, offsets and lengths must fit the
file, and every tensor's declared size must match the bytes actually present. Nothing in a file
is ever executed (no pickle, no eval).
"""

from __future__ import annotations

import functools
import math
import os
from typing import TYPE_CHECKING, Any

from ._errors import ModelLoadError
from ._types import DataType

if TYPE_CHECKING:
    import onnx

__all__ = [
    "check_header",
    "check_inline_tensor",
    "check_model_proto",
    "field_is_repeated",
    "resolve_external_location",
    "same_file",
]

# Which repeated TensorProto field carries the data of each element type when raw_data is
# absent, and how many entries one element takes there.
_FIELD_OF = {
    DataType.FLOAT: ("float_data", 1), DataType.COMPLEX64: ("float_data", 2),
    DataType.DOUBLE: ("double_data", 1), DataType.COMPLEX128: ("double_data", 2),
    DataType.INT64: ("int64_data", 1),
    DataType.UINT32: ("uint64_data", 1), DataType.UINT64: ("uint64_data", 1),
    DataType.STRING: ("string_data", 1),
}


def check_inline_tensor(t: onnx.TensorProto, where: str) -> DataType:
    """Validate an inline tensor's element type, dims and data length.

    Args:
        t: the tensor as parsed from the file.
        where: prefix for error messages ("model.onnx: initializer 'W'").

    Returns:
        The tensor's element type.

    Raises:
        ModelLoadError: unknown type, negative dims, segments, or a data size mismatch.
    """
    dtype = check_header(t, where)
    count = math.prod(t.dims)
    if t.HasField("raw_data"):
        if dtype == DataType.STRING:
            raise ModelLoadError(f"{where}: string tensor stored as raw_data")
        expected = (count * dtype.bitwidth + 7) // 8
        got = len(t.raw_data)
        if got != expected:
            raise ModelLoadError(f"{where}: declares {count} elements of {dtype.name} "
                                 f"({expected} bytes) but holds {got} bytes")
        return dtype
    field, per = _FIELD_OF.get(dtype, ("int32_data", 1))
    if dtype.bitwidth and dtype.bitwidth < 8:
        # int4/uint4/float4 pack two values per int32 entry in onnx<1.17 and one byte per entry
        # later; accept either packing.
        lo, hi = -(-count * dtype.bitwidth // 32), -(-count * dtype.bitwidth // 8)
        got = len(getattr(t, field))
        if not (lo <= got <= hi):
            raise ModelLoadError(f"{where}: declares {count} elements of {dtype.name} but "
                                 f"holds {got} packed entries")
        return dtype
    got = len(getattr(t, field))
    if got != count * per:
        raise ModelLoadError(f"{where}: declares {count} elements of {dtype.name} but holds "
                             f"{got // per if per else got} in {field}")
    return dtype


def check_header(t: onnx.TensorProto, where: str) -> DataType:
    """Validate the element type and dims of a tensor (inline or external)."""
    try:
        dtype = DataType.parse(t.data_type)
    except ValueError as e:
        raise ModelLoadError(f"{where}: {e}") from None
    if dtype == DataType.UNDEFINED:
        raise ModelLoadError(f"{where}: tensor has no element type")
    if any(d < 0 for d in t.dims):
        raise ModelLoadError(f"{where}: negative dimension in {list(t.dims)}")
    if t.HasField("segment"):
        raise ModelLoadError(f"{where}: segmented tensors are not supported")
    return dtype


def resolve_external_location(base_dir: str, location: str, where: str) -> str:
    """Resolve an external-data location to a real path inside ``base_dir``.

    Rejects absolute paths, ``..`` components, NUL bytes, symlinks whose target leaves the
    model's folder, and anything that is not an existing regular file.

    Raises:
        ModelLoadError: the location is unsafe or missing.
    """
    if not location:
        raise ModelLoadError(f"{where}: external data has no location")
    if "\x00" in location:
        raise ModelLoadError(f"{where}: external data location contains a NUL byte")
    if os.path.isabs(location) or location.startswith(("/", "\\")) or (
            len(location) > 1 and location[1] == ":"):
        raise ModelLoadError(f"{where}: external data location {location!r} is an absolute "
                             "path; only paths inside the model's folder are allowed")
    parts = location.replace("\\", "/").split("/")
    if ".." in parts:
        raise ModelLoadError(f"{where}: external data location {location!r} leaves the "
                             "model's folder ('..')")
    base_real = os.path.realpath(base_dir)
    real = os.path.realpath(os.path.join(base_real, location))
    if os.path.commonpath([real, base_real]) != base_real:
        raise ModelLoadError(f"{where}: external data location {location!r} resolves outside "
                             "the model's folder (symlink)")
    if not os.path.isfile(real):
        raise ModelLoadError(f"{where}: external data file {location!r} not found next to "
                             "the model")
    return real


def same_file(a: str, b: str) -> bool:
    """True when two paths name the same existing file (or the same real path)."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)


def check_model_proto(proto: onnx.ModelProto, label: str) -> None:
    """Reject a parsed file that is not a usable ONNX model, before the importer sees it.

    Protobuf parses many byte strings (random bytes, a file cut at a field boundary) into a
    "valid" message, so this checks what every real model has: an IR version, a graph with
    at least one output, opset imports (IR version 3 and later), and text fields that are
    valid UTF-8 (protobuf hands invalid ones over as ``bytes``). It also checks the tensors of
    model-local functions and training info, which the importer keeps as opaque messages.

    Args:
        proto: the parsed model.
        label: the file name that starts every error message.

    Raises:
        ModelLoadError: the first problem found.
    """
    if proto.ir_version <= 0 or not proto.HasField("graph"):
        raise ModelLoadError(f"{label}: not an ONNX model (no IR version or no graph)")
    if proto.ir_version >= 3 and not len(proto.opset_import):
        raise ModelLoadError(f"{label}: not a valid ONNX model (IR version "
                             f"{proto.ir_version} without opset imports)")
    if not len(proto.graph.output):
        raise ModelLoadError(f"{label}: not a usable ONNX model (the graph has no outputs)")
    _walk_messages(proto, label)


def field_is_repeated(fd: Any) -> bool:
    """True for a repeated protobuf field (works across protobuf versions)."""
    flag = getattr(fd, "is_repeated", None)  # protobuf >= 5.28; older ones have .label
    return bool(flag) if flag is not None else fd.label == fd.LABEL_REPEATED


@functools.cache
def _fields_of(descriptor: Any) -> tuple[tuple[tuple[str, bool], ...],
                                         tuple[tuple[str, bool], ...]]:
    """(string fields, message fields) of a message type, each as (name, repeated)."""
    strings = tuple((fd.name, field_is_repeated(fd)) for fd in descriptor.fields
                    if fd.type == fd.TYPE_STRING)
    messages = tuple((fd.name, field_is_repeated(fd)) for fd in descriptor.fields
                     if fd.type == fd.TYPE_MESSAGE)
    return strings, messages


def _walk_messages(proto: onnx.ModelProto, label: str) -> None:
    """Check every text field, and the tensors inside functions and training info.

    Fields are read by name (never ``ListFields``), so ``bytes`` fields such as ``raw_data``
    are not copied out of the message.
    """
    import onnx

    stack: list[tuple[Any, str, str | None]] = [(proto, "model", None)]
    while stack:
        msg, path, opaque = stack.pop()
        if opaque is not None and isinstance(msg, onnx.TensorProto):
            _check_opaque_tensor(msg, f"{label}: {opaque}")
        strings, messages = _fields_of(msg.DESCRIPTOR)
        for name, rep in strings:
            for text in (getattr(msg, name) if rep else (getattr(msg, name),)):
                if not isinstance(text, str):
                    raise ModelLoadError(f"{label}: text field {path}.{name} is not valid "
                                         "UTF-8 (corrupt file)")
        for name, rep in messages:
            if not rep and not msg.HasField(name):
                continue
            where = opaque
            if msg is proto and name in ("functions", "training_info"):
                where = "model-local function" if name == "functions" else "training info"
            for child in (getattr(msg, name) if rep else (getattr(msg, name),)):
                child_where = where
                if where is not None and msg is proto and name == "functions":
                    child_where = f"{where} {child.name!r}"
                stack.append((child, f"{path}.{name}", child_where))


def _check_opaque_tensor(t: onnx.TensorProto, where: str) -> None:
    """Tensors the importer keeps verbatim: sizes must hold, and no external data.

    Their external data would be neither checked nor copied on save, so the saved model
    would point at a file that is not there (or, from a hostile file, anywhere).
    """
    import onnx

    what = f"{where}: tensor {t.name!r}" if t.name else f"{where}: tensor"
    if t.data_location == onnx.TensorProto.EXTERNAL:
        raise ModelLoadError(f"{what} uses external data, which is supported only for "
                             "graph initializers and Constant nodes")
    check_inline_tensor(t, what)
