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
class _Writer:
    """Renders the schedule's C expressions."""

    def __init__(self, program: Program, prefix: str) -> None:
        self.program = program
        self.prefix = prefix
        self.params: list[str] = []
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


def render(program: Program, prefix: str, plans: Sequence[ArenaPlan], header_info: dict
           ) -> dict[str, str]:
    """The generated files (name -> text); see the module docs."""
    from .emit_files import header, model_c, test_c, weights_c

    writer = _Writer(program, prefix)
    return {f"{prefix}_model.h": header(program, prefix, plans, header_info),
            f"{prefix}_weights.c": weights_c(program, prefix),
            f"{prefix}_model.c": model_c(program, prefix, plans, writer),
            f"{prefix}_test.c": test_c(program, prefix, plans)}
