"""Loading and saving ONNX files: safe for untrusted input, atomic on output.

``load`` parses the protobuf (a clean :class:`ModelLoadError` for anything truncated, corrupt or
hostile), checks every tensor against the bytes really present, and memory-maps external data.
``save`` writes through a temporary file in the destination folder and renames it into place,
so a failed save never leaves a partial file, and it refuses to overwrite the file (or the
external data) the model was loaded from.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from typing import IO

import onnx
from google.protobuf.message import DecodeError

from ._errors import EdgeoptError, ModelLoadError
from ._export import ExternalWriter, to_proto
from ._graph import Model
from ._import import from_proto
from ._safety import same_file
from ._tensor import ExternalTensor

__all__ = ["PROTOBUF_LIMIT", "load", "load_proto", "save", "save_proto"]

#: Protobuf cannot serialize messages of 2 GiB or more.
PROTOBUF_LIMIT = (1 << 31) - 1


def load_proto(path: str | os.PathLike) -> onnx.ModelProto:
    """Parse an ONNX file without resolving its external data.

    Raises:
        ModelLoadError: missing, unreadable, empty, truncated or not an ONNX model.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise ModelLoadError(f"{path}: no such file")
    if not os.path.isfile(path):
        raise ModelLoadError(f"{path}: not a regular file")
    size = os.path.getsize(path)
    if size == 0:
        raise ModelLoadError(f"{path}: file is empty")
    if size > PROTOBUF_LIMIT:
        raise ModelLoadError(f"{path}: {size} bytes is over protobuf's 2 GiB limit; large "
                             "models must keep their weights in external data")
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ModelLoadError(f"{path}: cannot read ({e.strerror})") from None
    proto = onnx.ModelProto()
    try:
        proto.ParseFromString(data)
    except (DecodeError, RuntimeError, ValueError) as e:
        raise ModelLoadError(f"{path}: not a valid ONNX model (protobuf parse failed: "
                             f"{str(e).splitlines()[0] if str(e) else type(e).__name__})") \
            from None
    del data
    if proto.ir_version <= 0 or not proto.HasField("graph"):
        raise ModelLoadError(f"{path}: not an ONNX model (no IR version or no graph)")
    return proto


def load(path: str | os.PathLike) -> Model:
    """Load an ONNX model into the IR.

    External data is checked (location inside the model's folder, sizes) and memory-mapped
    lazily; inline weights stay in the parsed protobuf and are referenced, not copied.

    Args:
        path: the ``.onnx`` file.

    Returns:
        The model, with ``source_path`` set.

    Raises:
        ModelLoadError: see :func:`load_proto`, plus any unsafe or inconsistent tensor.
    """
    path = os.fspath(path)
    proto = load_proto(path)
    model = from_proto(proto, os.path.dirname(os.path.abspath(path)), path)
    model.source_path = os.path.abspath(path)
    return model


def _external_sources(model: Model) -> set[str]:
    paths = set()
    for graph in [model.graph, *model.graph.subgraphs()]:
        for v in graph.initializers.values():
            if isinstance(v.const_value, ExternalTensor):
                paths.add(v.const_value.path)
    return paths


def _total_bytes(model: Model) -> int:
    total = 0
    for graph in [model.graph, *model.graph.subgraphs()]:
        total += sum(v.const_value.nbytes for v in graph.initializers.values())
    return total


class _Transaction:
    """Temporary files beside their destinations, renamed into place together on commit."""

    def __init__(self) -> None:
        self._pending: list[tuple[str, str]] = []

    @contextlib.contextmanager
    def open(self, path: str) -> Iterator[IO[bytes]]:
        """A temporary file in ``path``'s folder that :meth:`commit` renames onto ``path``."""
        folder = os.path.dirname(os.path.abspath(path))
        fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp",
                                   dir=folder)
        self._pending.append((tmp, path))
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())

    def commit(self) -> None:
        """Rename every file into place, in the order they were opened."""
        while self._pending:
            tmp, final = self._pending.pop(0)
            os.replace(tmp, final)

    def abort(self) -> None:
        """Delete whatever was not committed."""
        for tmp, _ in self._pending:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        self._pending.clear()


def save(model: Model, path: str | os.PathLike, *, external_data: bool | None = None,
         size_threshold: int = 1024) -> None:
    """Write a model to an ONNX file, atomically.

    Args:
        model: the model.
        path: destination ``.onnx`` path; its folder must exist.
        external_data: write tensors of at least ``size_threshold`` bytes to
            ``<file name>.data`` beside the model. ``None`` (default) does so when the model
            was loaded with external data or when inline weights would pass protobuf's 2 GiB
            limit.
        size_threshold: smallest tensor (bytes) that goes external.

    Raises:
        EdgeoptError: the destination is the model's own source (or one of its external
            data files), its folder is missing, or the model cannot be serialized.
    """
    path = os.path.abspath(os.fspath(path))
    folder = os.path.dirname(path)
    if not os.path.isdir(folder):
        raise EdgeoptError(f"{path}: output folder does not exist")
    if os.path.isdir(path):
        raise EdgeoptError(f"{path}: is a folder; give a file name")
    sources = _external_sources(model)
    if model.source_path and same_file(path, model.source_path):
        raise EdgeoptError(f"{path}: refusing to overwrite the input model")
    if external_data is None:
        external_data = bool(sources) or _total_bytes(model) > PROTOBUF_LIMIT - (64 << 20)
    location = os.path.basename(path) + ".data"
    data_path = os.path.join(folder, location)
    if external_data and any(same_file(data_path, s) for s in sources):
        raise EdgeoptError(f"{data_path}: refusing to overwrite the input model's external "
                           "data; save under another name")
    txn = _Transaction()
    try:
        if external_data:
            with txn.open(data_path) as data_file:
                writer = ExternalWriter(data_file.write, location, size_threshold)
                proto = to_proto(model, writer)
        else:
            proto = to_proto(model)
        _write_proto(proto, path, txn)
        txn.commit()  # data first, then the model that points at it
    finally:
        txn.abort()


def _write_proto(proto: onnx.ModelProto, path: str, txn: _Transaction) -> None:
    try:
        data = proto.SerializeToString()
    except ValueError as e:  # protobuf refuses > 2 GiB
        raise EdgeoptError(f"{path}: model too large to serialize inline ({e}); save with "
                           "external_data=True") from None
    with txn.open(path) as f:
        f.write(data)


def save_proto(proto: onnx.ModelProto, path: str | os.PathLike) -> None:
    """Write an already built ModelProto atomically (inline data only)."""
    txn = _Transaction()
    try:
        _write_proto(proto, os.path.abspath(os.fspath(path)), txn)
        txn.commit()
    finally:
        txn.abort()
