"""Writing a lowered :class:`~.program.Program` as C99 sources.

Files (``<p>`` is the prefix, ``<P>`` its upper case):

- ``<p>_model.h``: the API (``<p>_invoke``, ``<p>_invoke_f32``, ``<p>_verify``), I/O shapes
  and quantization, ``<P>_ARENA_SIZE``, the CRC-32 of the constants, provenance (source
  SHA-256, pipeline, tool version), and a summary of flash/RAM/MACs in a comment;
- ``<p>_weights.c``: every constant, ``const`` and aligned (``<P>_ALIGN``, default 16) in the
  overridable section ``<P>_WEIGHTS_SECTION``, plus the table ``<p>_verify`` checks;
- ``<p>_model.c``: the parameter blocks and the schedule, over one arena whose offsets come
  from :mod:`.memory` (two offset tables: the plain API reads inputs and writes outputs in
  the caller's buffers; the float wrapper keeps the int8 copies in the arena);
- the kernel library ``eo_kernels.h`` and its sources, copied from ``runtime/``.

Model-supplied names reach the code only through :func:`~.lower.c_identifier`; the pipeline
string is written as an escaped C string literal, never into a comment.
"""

from __future__ import annotations

import math
import os
import re
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from .program import Const, Op, Params, Program, Ptrs, TensorRef

__all__ = ["ArenaPlan", "c_string", "format_array", "liveness", "render"]


def c_string(text: str) -> str:
    """A C string literal holding ``text`` (printable ASCII kept, everything else escaped)."""
    out = []
    for ch in text:
        if ch in "\\\"":
            out.append("\\" + ch)
        elif " " <= ch <= "~" and ch != "?":  # '?' escaped: no trigraphs
            out.append(ch)
        else:
            out.extend(f"\\{b:03o}" for b in ch.encode("utf-8"))
    return '"' + "".join(out) + '"'


def _float_literal(x: float) -> str:
    if not math.isfinite(x):
        raise ValueError("constants must be finite to be written as C")
    text = f"{x:.9g}"
    if "e" not in text and "." not in text:
        text += ".0"
    return text + "f"


def format_array(data: np.ndarray, ctype: str, per_line: int = 16) -> str:
    """The body of a C array initializer, ``per_line`` values per line."""
    flat = np.asarray(data).ravel()
    if ctype == "float":
        items = [_float_literal(float(v)) for v in flat.astype(np.float32)]
    else:
        items = [str(int(v)) for v in flat.astype(np.int64)]
        if ctype == "int32_t":  # INT32_MIN is not a literal
            items = ["(-2147483647 - 1)" if s == "-2147483648" else s for s in items]
        if ctype == "uint32_t":
            items = [s + "u" for s in items]
    lines = [", ".join(items[i:i + per_line]) for i in range(0, len(items), per_line)]
    return "    " + ",\n    ".join(lines) if lines else "    0"


# -- liveness and the arena ---------------------------------------------------------------
@dataclass
class ArenaPlan:
    """Offsets of the arena tensors for one way of calling the schedule."""

    offsets: dict[str, int]
    size: int
    lower_bound: int
    naive: int
    peak: list[tuple[str, int]] = field(default_factory=list)


def liveness(program: Program, io_in_arena: bool) -> list:
    """Buffers for the planner: every storage root with its first and last step.

    Inputs are live from step 0 (as step -1 would be before any op) and outputs to the end;
    with ``io_in_arena`` False they are the caller's buffers and are left out.
    """
    from .memory import Buffer

    first: dict[str, int] = {}
    last: dict[str, int] = {}
    roots: dict[str, TensorRef] = {}
    end = len(program.ops)
    for step, op in enumerate(program.ops):
        for t in op.writes:
            r = t.root()
            roots[r.name] = r
            first.setdefault(r.name, step)
            last[r.name] = max(last.get(r.name, step), step)
        for t in op.reads:
            r = t.root()
            roots[r.name] = r
            last[r.name] = max(last.get(r.name, step), step)
    for t in program.inputs:
        roots[t.name], first[t.name] = t, 0
        last.setdefault(t.name, 0)
    for t in program.outputs:
        last[t.root().name] = end
    inplace = {}
    for step, op in enumerate(program.ops):
        if op.inplace is not None and op.writes:
            w, r = op.writes[0].root(), op.inplace.root()
            if r.io is None and w.io is None and first.get(w.name) == step:
                inplace[w.name] = r.name
    buffers = []
    for name, t in roots.items():
        if t.io is not None and not io_in_arena:
            continue
        if t.io is not None and t.ctype == "float":
            continue  # float I/O is always the caller's
        buffers.append(Buffer(name, t.nbytes, first.get(name, 0), last.get(name, end),
                              inplace.get(name)))
    return buffers


def arena_plan(program: Program, io_in_arena: bool, alignment: int) -> ArenaPlan:
    """Plan the arena (best of the planner's strategies)."""
    from .memory import peak, plan

    buffers = liveness(program, io_in_arena)
    p = plan(buffers, alignment=alignment)
    p.check(buffers)
    live = peak(buffers, alignment=alignment).live
    return ArenaPlan(dict(p.offsets), p.arena_size, p.lower_bound, p.naive_size,
                     [(b.name, b.size) for b in live])


# -- rendering ------------------------------------------------------------------------------
_STRUCTS: dict[str, list[tuple[str, str, int]]] = {}


def struct_fields(struct: str) -> list[tuple[str, str, int]]:
    """``(field, C type, count)`` of a parameter block, in declaration order.

    Read from ``runtime/eo_kernels.h``, so the byte image cannot drift from the header.
    """
    if not _STRUCTS:
        path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "runtime",
                            "eo_kernels.h")
        with open(path, encoding="utf-8") as f:
            text = re.sub(r"/\*.*?\*/", "", f.read(), flags=re.S)
        for body, name in re.findall(r"typedef struct \{(.*?)\}\s*(\w+);", text, flags=re.S):
            fields = []
            for decl in filter(None, (d.strip() for d in body.split(";"))):
                ctype, _, names = decl.rpartition(" ") if "," not in decl else \
                    (decl.split()[0], "", decl[len(decl.split()[0]):])
                if "*" in decl:
                    fields.append((decl, "pointer", 1))
                    continue
                for item in names.split(","):
                    m = re.match(r"\s*(\w+)\s*(?:\[(\d+)\])?", item)
                    fields.append((m.group(1), ctype.strip(), int(m.group(2) or 1)))
            _STRUCTS[name] = fields
    return _STRUCTS[struct]


_PACK = {"int32_t": "<i4", "float": "<f4"}


def params_bytes(p: Params) -> bytes | None:
    """The little-endian byte image of a parameter block.

    None if it holds pointers or a field type that is not a plain 4-byte word.
    """
    out = []
    for name, ctype, count in struct_fields(p.struct):
        if ctype not in _PACK:
            return None
        value = p.fields.get(name, 0)
        values = list(value) if isinstance(value, (list, tuple)) else [value]
        if len(values) != count:
            raise ValueError(f"{p.struct}.{name}: {len(values)} values for {count}")
        if ctype == "float":
            values = [np.float32(np.finfo(np.float32).max) * (-1 if v.startswith("-") else 1)
                      if isinstance(v, str) else v for v in values]
        out.append(np.asarray(values, _PACK[ctype]).tobytes())
    return b"".join(out)


class _Writer:
    """Renders the schedule's C expressions."""

    def __init__(self, program: Program, prefix: str) -> None:
        self.program = program
        self.prefix = prefix
        self.params: list[str] = []
        #: pointer-free parameter blocks: (name, byte image), covered by the CRC
        self.images: list[tuple[str, bytes]] = []
        self.index = {t.name: i for i, t in enumerate(_roots(program))}

    def tensor(self, t: TensorRef, const: bool) -> str:
        """A pointer expression for ``t`` inside ``run()`` (caller buffers or the arena)."""
        r = t.root()
        q = "const " if const else ""
        if r.io == "input":
            if not const:
                raise ValueError(f"{r.name} is an input and cannot be written")
            return f"in{r.index}"
        if r.io == "output":
            return f"({q}{t.ctype} *)out{r.index}" if const else f"out{r.index}"
        return f"({q}{t.ctype} *)(mem + o[{self.index[r.name]}])"

    def value(self, arg, const: bool = True) -> str:
        if isinstance(arg, TensorRef):
            return self.tensor(arg, const)
        if isinstance(arg, Const):
            return arg.name
        if isinstance(arg, Params):
            return "&" + self.param_block(arg)
        if isinstance(arg, Ptrs):
            return "(const void *const[]){" + ", ".join(self.value(x) for x in arg.items) + "}"
        if isinstance(arg, bool):
            return str(int(arg))
        if isinstance(arg, float):
            return _float_literal(arg)
        return str(arg)

    def field(self, v) -> str:
        if isinstance(v, (list, tuple)):
            return "{" + ", ".join(self.field(x) for x in v) + "}"
        if isinstance(v, Const):
            return v.name
        return self.value(v)

    def param_block(self, p: Params) -> str:
        name = f"{self.prefix}_p{len(self.params)}"
        body = ", ".join(f".{k} = {self.field(v)}" for k, v in p.fields.items())
        self.params.append(f"static const {p.struct} {name} = {{{body}}};")
        image = params_bytes(p)
        if image is not None:
            self.images.append((name, image))
        return name

    def call(self, op: Op) -> str:
        outs = {id(t) for t in op.writes}
        if op.kernel == "memcpy":
            dst, src, n = op.args
            return f"memcpy({self.tensor(dst, False)}, {self.tensor(src, True)}, {n});"
        args = [self.value(a, const=not (isinstance(a, TensorRef) and id(a) in outs))
                for a in op.args]
        return f"{op.kernel}({', '.join(args)});"


def _roots(program: Program) -> list[TensorRef]:
    seen, out = set(), []
    for t in program.tensors:
        r = t.root()
        if id(r) not in seen:
            seen.add(id(r))
            out.append(r)
    return out


def offset_tables(program: Program, prefix: str, plans: Sequence[ArenaPlan]
                  ) -> list[tuple[str, np.ndarray]]:
    """The arena offset tables of ``<p>_model.c``: plain API, float wrapper."""
    roots = _roots(program)
    return [(f"{prefix}_off{suffix}", np.array([plan.offsets.get(r.name, 0) for r in roots]
                                               or [0], np.uint32))
            for suffix, plan in (("", plans[0]), ("_f32", plans[-1]))]


def render(program: Program, prefix: str, plans: Sequence[ArenaPlan], header_info: dict
           ) -> dict[str, str]:
    """The generated files (name -> text); see the module docs.

    Sets ``header_info["crc32"]`` and ``["crc_bytes"]``: the CRC-32 (zlib's) of every constant
    array, then every pointer-free parameter block and the offset tables, in that order, as
    ``<p>_verify`` walks them.
    """
    from .emit_files import header, model_c, test_c, weights_c

    writer = _Writer(program, prefix)
    model = model_c(program, prefix, plans, writer)
    blobs = [c.bytes() for c in program.consts] + [b for _, b in writer.images] + [
        a.astype("<u4").tobytes() for _, a in offset_tables(program, prefix, plans)]
    header_info["crc32"] = zlib.crc32(b"".join(blobs)) & 0xFFFFFFFF
    header_info["crc_bytes"] = sum(len(b) for b in blobs)
    return {f"{prefix}_model.h": header(program, prefix, plans, header_info),
            f"{prefix}_weights.c": weights_c(program, prefix),
            f"{prefix}_model.c": model,
            f"{prefix}_test.c": test_c(program, prefix, plans)}
