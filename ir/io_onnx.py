"""Loading and saving ONNX files: safe for untrusted input, atomic on output.

``load`` parses the protobuf (a clean :class:`ModelLoadError` for anything truncated, corrupt or
hostile), checks every tensor against the bytes really present, and memory-maps external data.
``save`` writes through a temporary file in the destination folder and renames it into place,
so a failed save never leaves a partial file, and it refuses to overwrite the file (or the
external data) the model was loaded from.
"""

from __future__ import annotations

import contextlib
import io
import os
import tempfile
from collections.abc import Callable, Iterator
from typing import IO, Any

import onnx
from google.protobuf.message import DecodeError

from ._errors import EdgeoptError, ModelLoadError
from ._export import ExternalWriter, full_tensor_proto, tensor_bytes, to_proto
from ._graph import Model
from ._import import from_proto
from ._node import AttrType
from ._safety import check_model_proto, field_is_repeated, same_file
from ._tensor import ExternalTensor, ProtoTensor, SparseTensor, Tensor
from ._types import DataType

__all__ = ["PROTOBUF_LIMIT", "load", "load_proto", "save", "save_proto"]

#: Protobuf cannot serialize messages of 2 GiB or more.
PROTOBUF_LIMIT = (1 << 31) - 1
#: Files of at least this size are parsed field by field (see :class:`_WireReader`).
STREAM_MIN = 16 << 20
#: Fields of at least this size are parsed on their own when streaming.
STREAM_FIELD = 1 << 20


def load_proto(path: str | os.PathLike) -> onnx.ModelProto:
    """Parse an ONNX file without resolving its external data.

    Raises:
        ModelLoadError: missing, unreadable, empty, truncated or not an ONNX model.
    """
    path = os.fspath(path)
    if "\x00" in path:
        raise ModelLoadError(f"{path!r}: path contains a NUL byte")
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
    proto = onnx.ModelProto()
    try:
        with open(path, "rb") as f:
            if size < STREAM_MIN:
                proto.ParseFromString(f.read())
            else:
                _parse_streaming(proto, _WireReader(f, size))
    except OSError as e:
        raise ModelLoadError(f"{path}: cannot read ({e.strerror or e})") from None
    except (DecodeError, RuntimeError, ValueError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ModelLoadError(f"{path}: not a valid ONNX model (protobuf parse failed: "
                             f"{reason})") from None
    check_model_proto(proto, path)
    return proto


class _WireReader:
    """Protobuf wire format read straight from a file, one field at a time.

    Parsing a whole file with ``ParseFromString`` needs the file's bytes and the parsed
    message at once: inline weights held twice. Reading field by field lets the big fields
    (initializers, nodes) be parsed one at a time into the message, so only one of them is
    ever held twice.
    """

    def __init__(self, f: IO[bytes], size: int) -> None:
        self.f = f
        self.pos = 0
        self.size = size

    def read(self, n: int, end: int) -> bytes:
        """The next ``n`` bytes, which must end at or before ``end``."""
        if self.pos + n > end:
            raise DecodeError(f"truncated field at byte {self.pos}")
        data = self.f.read(n)
        if len(data) != n:
            raise DecodeError(f"truncated field at byte {self.pos}")
        self.pos += n
        return data

    def varint(self, end: int) -> tuple[int, bytes]:
        """A varint and its raw bytes."""
        raw = bytearray()
        while True:
            b = self.read(1, end)
            raw += b
            if b[0] < 0x80:
                break
            if len(raw) == 10:
                raise DecodeError(f"malformed varint at byte {self.pos}")
        value = 0
        for i, byte in enumerate(raw):
            value |= (byte & 0x7F) << (7 * i)
        return value, bytes(raw)


def _merge_fields(msg: Any, reader: _WireReader, end: int,
                  streamed: dict[int, Callable[[int], None]]) -> None:
    """Merge the fields in ``[reader.pos, end)`` into ``msg``.

    Length-delimited fields of at least ``STREAM_FIELD`` bytes whose number is in
    ``streamed`` go to their handler (called with the field's length, it reads the payload);
    everything else is collected in order and merged in blocks, which protobuf's merge
    semantics (repeated fields append, the last scalar wins) make equal to one parse.
    """
    pending = bytearray()
    while reader.pos < end:
        tag, header = reader.varint(end)
        number, wire = tag >> 3, tag & 7
        if wire == 2:
            length, prefix = reader.varint(end)
            if length >= STREAM_FIELD and number in streamed:
                if pending:  # merged first: repeated fields keep their order
                    msg.MergeFromString(bytes(pending))
                    pending.clear()
                if reader.pos + length > end:
                    raise DecodeError(f"truncated field at byte {reader.pos}")
                streamed[number](length)
                continue
            pending += header + prefix + reader.read(length, end)
        elif wire in (0, 1, 5):
            pending += header + (reader.varint(end)[1] if wire == 0 else
                                 reader.read(8 if wire == 1 else 4, end))
        else:  # groups (3, 4) are not used by ONNX; 6 and 7 do not exist
            raise DecodeError(f"unsupported wire type {wire} at byte {reader.pos}")
        if len(pending) >= STREAM_FIELD:
            msg.MergeFromString(bytes(pending))
            pending.clear()
    if pending:
        msg.MergeFromString(bytes(pending))


def _parse_streaming(proto: onnx.ModelProto, reader: _WireReader) -> None:
    """Parse a model file field by field: its graph's nodes and initializers one at a time."""
    graph = proto.graph

    def add_to(field: Any) -> Callable[[int], None]:
        return lambda n: field.add().MergeFromString(reader.read(n, reader.size))

    graph_fields = {1: add_to(graph.node), 5: add_to(graph.initializer),
                    15: add_to(graph.sparse_initializer)}

    def parse_graph(n: int) -> None:
        _merge_fields(graph, reader, reader.pos + n, graph_fields)

    _merge_fields(proto, reader, reader.size, {7: parse_graph})


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


def _tensors(model: Model) -> Iterator[Tensor]:
    """Every tensor of the model: initializers (sparse parts too) and tensor attributes."""
    for graph in [model.graph, *model.graph.subgraphs()]:
        for v in graph.initializers.values():
            t = v.const_value
            if isinstance(t, SparseTensor):
                yield t.values
                yield t.indices
            elif t is not None:
                yield t
    for node in model.walk():
        for attr in node.attrs.values():
            if attr.type == AttrType.TENSOR and attr.value is not None:
                yield attr.value
            elif attr.type == AttrType.TENSORS and attr.value:
                yield from attr.value


def _external_sources(model: Model) -> set[str]:
    """The files the model's external tensors read from (they must not be overwritten)."""
    return {t.path for t in _tensors(model) if isinstance(t, ExternalTensor)}


def _inline_bytes(model: Model) -> int:
    """Bytes the model's tensors would take inline (an estimate of the protobuf's size)."""
    return sum(t.nbytes for t in _tensors(model))


def _needs_external(model: Model) -> bool:
    """True when inline weights would come too close to protobuf's 2 GiB limit.

    The headroom (1/32 of the limit: 64 MiB) leaves room for the graph itself and for typed
    fields, which take a little more than ``nbytes``.
    """
    return _inline_bytes(model) >= PROTOBUF_LIMIT - PROTOBUF_LIMIT // 32


def _file_mode() -> int:
    """Mode for new files: what ``open()`` would give (mkstemp's 0600 is too private)."""
    try:
        with open("/proc/self/status") as f:  # reading the umask without changing it
            for line in f:
                if line.startswith("Umask:"):
                    return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # not thread-safe, hence only the fallback
    os.umask(mask)
    return 0o666 & ~mask


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
            os.fchmod(f.fileno(), _file_mode())
            yield f
            f.flush()
            os.fsync(f.fileno())

    def discard(self, path: str) -> None:
        """Drop the pending file for ``path``: it will not be renamed into place."""
        for tmp, final in list(self._pending):
            if final == path:
                os.unlink(tmp)
                self._pending.remove((tmp, final))

    def commit(self) -> None:
        """Rename every file into place, in the order they were opened.

        If a rename fails, the files already renamed are rolled back (an overwritten one is
        restored from a hard link taken just before), so the destination folder is left as
        it was: an existing model never ends up pointing at a new data file.
        """
        done: list[tuple[str, str | None, bool]] = []  # (file, backup, existed before)
        try:
            for tmp, final in self._pending:
                existed = os.path.lexists(final)
                backup = _hard_link(final, tmp + ".bak") if existed and len(self._pending) > 1 \
                    else None
                try:
                    os.replace(tmp, final)
                except BaseException:
                    if backup is not None:
                        os.unlink(backup)
                    raise
                done.append((final, backup, existed))
        except BaseException:
            for final, backup, existed in reversed(done):
                with contextlib.suppress(OSError):
                    if backup is not None:
                        os.replace(backup, final)
                    elif not existed:
                        os.unlink(final)
            raise
        finally:
            for _, backup, _ in done:
                if backup is not None:
                    with contextlib.suppress(OSError):
                        os.unlink(backup)
        self._pending.clear()
        for folder in {os.path.dirname(os.path.abspath(final)) for final, _, _ in done}:
            with contextlib.suppress(OSError):  # make the renames durable where possible
                fd = os.open(folder, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)

    def abort(self) -> None:
        """Delete whatever was not committed."""
        for tmp, _ in self._pending:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        self._pending.clear()


def _hard_link(path: str, link: str) -> str | None:
    """Hard-link ``path`` as ``link``; None where the file system cannot."""
    try:
        os.link(path, link)
        return link
    except OSError:
        return None


def save(model: Model, path: str | os.PathLike, *, external_data: bool | None = None,
         size_threshold: int = 1024, sparse_initializers: bool = False,
         value_info: str = "file") -> None:
    """Write a model to an ONNX file, atomically.

    Args:
        model: the model.
        path: destination ``.onnx`` path; its folder must exist.
        external_data: write tensors of at least ``size_threshold`` bytes to
            ``<file name>.data`` beside the model. ``None`` (default) does so when the model
            was loaded with external data or when inline weights would come close to
            protobuf's 2 GiB limit. No data file is written when no tensor goes there.
        size_threshold: smallest tensor (bytes) that goes external.
        sparse_initializers: write CSR-packed weights as ONNX ``sparse_initializer``
            where that is smaller (see :func:`~edgeopt.ir.to_proto`).
        value_info: ``file`` (default) writes the value_info entries the loaded file had,
            plus the types ONNX shape inference cannot recover (custom-domain outputs);
            ``all`` also writes every type a pass or shape inference found (see
            :func:`~edgeopt.ir.to_proto`).

    Raises:
        EdgeoptError: the destination is the model's own source (or one of its external
            data files), its folder is missing, it cannot be written, or the model is too
            large to write inline.
    """
    path = os.path.abspath(os.fspath(path))
    sources = _external_sources(model)
    if external_data is None:
        external_data = bool(sources) or _needs_external(model)
    data_path = path + ".data"
    _check_destination(model, path, data_path if external_data else None, sources)
    if not external_data and _inline_bytes(model) >= PROTOBUF_LIMIT:
        raise EdgeoptError(f"{path}: weights are over protobuf's 2 GiB limit; save with "
                           "external_data=True")
    txn = _Transaction()
    try:
        if external_data:
            with txn.open(data_path) as data_file:
                writer = ExternalWriter(data_file.write, os.path.basename(data_path),
                                        size_threshold)
                proto = to_proto(model, writer, sparse_initializers=sparse_initializers,
                                 value_info=value_info)
            if writer.offset == 0:
                txn.discard(data_path)  # nothing went external: no empty data file
        else:
            deferred = {}  # large inline weights are serialized one at a time while writing
            proto = to_proto(model, deferred=deferred, sparse_initializers=sparse_initializers,
                             value_info=value_info)
        _write_proto(proto, path, txn, deferred if not external_data else None)
        txn.commit()  # data first, then the model that points at it
    except OSError as e:
        raise EdgeoptError(f"{path}: cannot write the model ({e.strerror or e})") from e
    finally:
        txn.abort()


def _check_destination(model: Model, path: str, data_path: str | None,
                       sources: set[str]) -> None:
    """Refuse destinations that are missing, folders, or files the model reads from."""
    if not os.path.isdir(os.path.dirname(path)):
        raise EdgeoptError(f"{path}: output folder does not exist")
    if os.path.isdir(path):
        raise EdgeoptError(f"{path}: is a folder; give a file name")
    for target in (path, data_path):
        if target is None:
            continue
        if model.source_path and same_file(target, model.source_path):
            raise EdgeoptError(f"{target}: refusing to overwrite the input model")
        if any(same_file(target, s) for s in sources):
            raise EdgeoptError(f"{target}: refusing to overwrite the input model's external "
                               "data; save under another name")


def _write_proto(proto: onnx.ModelProto, path: str, txn: _Transaction,
                 deferred: dict[str, Tensor] | None = None) -> None:
    """Serialize ``proto`` into a pending file for ``path``, one node or tensor at a time.

    ``SerializeToString`` would build the whole file in memory (and protobuf briefly needs
    twice that), holding every inline weight two or three times over. The output is the
    same bytes, written in pieces. ``deferred`` holds the tensors of initializer stubs left
    by ``to_proto(..., deferred=...)``: each is encoded only when it is written.
    """
    plan = _plan(proto, _STREAMED_FIELDS, deferred or {})
    size = _plan_size(plan)
    if size > PROTOBUF_LIMIT:
        raise EdgeoptError(f"{path}: model too large to serialize inline ({size} bytes); "
                           "save with external_data=True")
    with txn.open(path) as f:
        _write_plan(plan, f.write)


#: Fields written element by element (the rest of a message is serialized in one piece).
_STREAMED_FIELDS: dict[str, dict] = {
    "graph": {"node": {}, "initializer": {}, "sparse_initializer": {}}}

# A plan is a message's wire encoding in field order: ``bytes`` for runs of small fields, and
# ``(field header, message, nested plan or None, payload size)`` for each element of a streamed
# field.
_Plan = list[Any]


def _plan(msg: Any, streamed: dict[str, dict], deferred: dict[str, Tensor]) -> _Plan:
    """The plan of ``msg``; elements of ``streamed`` fields are planned (or kept) separately."""
    skeleton = type(msg)()
    for fd in msg.DESCRIPTOR.fields:  # copy the small fields (proto2: presence is known)
        if fd.name in streamed:
            continue
        if field_is_repeated(fd):
            getattr(skeleton, fd.name).extend(getattr(msg, fd.name))
        elif msg.HasField(fd.name):
            if fd.type == fd.TYPE_MESSAGE:
                getattr(skeleton, fd.name).CopyFrom(getattr(msg, fd.name))
            else:
                setattr(skeleton, fd.name, getattr(msg, fd.name))
    small = _split_fields(skeleton.SerializeToString())
    plan: _Plan = []
    for fd in sorted((msg.DESCRIPTOR.fields_by_name[n] for n in streamed), key=_number):
        while small and small[0][0] < fd.number:  # protobuf writes fields in number order
            plan.append(small.pop(0)[1])
        value = getattr(msg, fd.name)
        elems = value if field_is_repeated(fd) else [value] if msg.HasField(fd.name) else []
        header = _varint(fd.number << 3 | 2)
        for e in elems:
            if fd.name == "initializer" and e.name in deferred:
                piece = _deferred_piece(deferred[e.name], e.name)
                plan.append((header, piece, None, piece.size))
                continue
            nested = _plan(e, streamed[fd.name], deferred) if streamed[fd.name] else None
            size = _plan_size(nested) if nested is not None else e.ByteSize()
            plan.append((header, e, nested, size))
    plan.extend(raw for _, raw in small)
    return plan


class _DeferredTensor:
    """An initializer encoded only while it is written.

    Raw-data tensors are written as their small fields plus the raw bytes streamed from the
    tensor itself (no TensorProto copy at all); tensors the file stored in typed fields
    (float_data, strings) are re-encoded verbatim, one at a time.
    """

    _RAW_DATA = 9  # TensorProto.raw_data field number

    def __init__(self, tensor: Tensor, name: str) -> None:
        self.tensor, self.name = tensor, name
        self.verbatim = tensor.dtype == DataType.STRING or (
            isinstance(tensor, ProtoTensor) and not tensor.proto.HasField("raw_data"))
        if self.verbatim:
            self.size = full_tensor_proto(tensor, name).ByteSize()  # transient copy
            return
        stub = onnx.TensorProto(data_type=int(tensor.dtype))
        stub.dims.extend(tensor.shape)
        if name:
            stub.name = name
        if isinstance(tensor, ProtoTensor):
            if tensor.proto.doc_string:
                stub.doc_string = tensor.proto.doc_string
            stub.metadata_props.extend(tensor.proto.metadata_props)
        fields = _split_fields(stub.SerializeToString())  # protobuf's field order is kept
        self.before = b"".join(raw for num, raw in fields if num < self._RAW_DATA)
        self.after = b"".join(raw for num, raw in fields if num > self._RAW_DATA)
        self.raw_header = _varint(self._RAW_DATA << 3 | 2) + _varint(tensor.nbytes)
        self.size = len(self.before) + len(self.raw_header) + tensor.nbytes + len(self.after)

    def write(self, write: Callable[[Any], Any]) -> None:
        """Encode and write the tensor."""
        if self.verbatim:
            data = full_tensor_proto(self.tensor, self.name).SerializeToString()
            if len(data) != self.size:
                raise OSError(f"initializer {self.name!r} changed size while being written")
            write(data)
            return
        write(self.before + self.raw_header)
        written = 0
        for block in tensor_bytes(self.tensor):
            write(block)
            written += len(block)
        if written != self.tensor.nbytes:
            raise OSError(f"initializer {self.name!r}: wrote {written} bytes, expected "
                          f"{self.tensor.nbytes}")
        write(self.after)


def _deferred_piece(tensor: Tensor, name: str) -> _DeferredTensor:
    return _DeferredTensor(tensor, name)


def _number(fd: Any) -> int:
    return fd.number


def _split_fields(data: bytes) -> list[tuple[int, bytes]]:
    """(field number, encoded bytes) of each top-level field of an encoded message."""
    reader = _WireReader(io.BytesIO(data), len(data))
    out = []
    while reader.pos < len(data):
        start = reader.pos
        tag, _ = reader.varint(len(data))
        wire = tag & 7
        if wire == 2:
            reader.read(reader.varint(len(data))[0], len(data))
        elif wire == 0:
            reader.varint(len(data))
        else:  # the encoder writes no groups
            reader.read(8 if wire == 1 else 4, len(data))
        out.append((tag >> 3, data[start:reader.pos]))
    return out


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _plan_size(plan: _Plan) -> int:
    return sum(len(p) if isinstance(p, bytes) else len(p[0]) + len(_varint(p[3])) + p[3]
               for p in plan)


def _write_plan(plan: _Plan, write: Callable[[bytes], Any]) -> None:
    for piece in plan:
        if isinstance(piece, bytes):
            write(piece)
            continue
        header, msg, nested, size = piece
        write(header + _varint(size))
        if nested is not None:
            _write_plan(nested, write)
        elif isinstance(msg, _DeferredTensor):
            msg.write(write)
        else:
            write(msg.SerializeToString())


def save_proto(proto: onnx.ModelProto, path: str | os.PathLike) -> None:
    """Write an already built ModelProto atomically (inline data only).

    Raises:
        EdgeoptError: the folder is missing or the file cannot be written.
    """
    path = os.path.abspath(os.fspath(path))
    if not os.path.isdir(os.path.dirname(path)):
        raise EdgeoptError(f"{path}: output folder does not exist")
    if os.path.isdir(path):
        raise EdgeoptError(f"{path}: is a folder; give a file name")
    txn = _Transaction()
    try:
        _write_proto(proto, path, txn)
        txn.commit()
    except OSError as e:
        raise EdgeoptError(f"{path}: cannot write the model ({e.strerror or e})") from e
    finally:
        txn.abort()
