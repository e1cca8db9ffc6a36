"""Checks applied to untrusted model files before any data is allocated or read.

Edge deployments receive models from outside, so the loader treats every file as hostile:
external-data locations must stay inside the model's folder, offsets and lengths must fit the
file, and every tensor's declared size must match the bytes actually present. Nothing in a file
is ever executed (no pickle, no eval).
"""

from __future__ import annotations

import math
import os
from typing import TYPE_CHECKING

from ._errors import ModelLoadError
from ._types import DataType

if TYPE_CHECKING:
    import onnx

__all__ = ["check_inline_tensor", "resolve_external_location", "same_file"]

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
