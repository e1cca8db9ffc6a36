"""The C backend: self-contained C99 sources for a model, or its constants only.

``emit_c(model, out_dir)`` (CLI ``--emit c``) writes a library for the model: header, weights,
schedule and the portable kernel library, over one statically planned arena, with a CRC-32
integrity check. The model is lowered on a clone bound to batch 1 (float models are
simplified first: BatchNormalization folded, constants folded); a QDQ model from ``quant``
runs on int8 kernels that follow TFLite's integer rules. Everything is generated in memory
first: an unsupported model or a missed ``budget`` writes nothing.
"""

from __future__ import annotations

import hashlib
import os
import zlib
from dataclasses import dataclass, field
from typing import Any

from edgeopt.ir import EdgeoptError, Model, infer_shapes

from .emit import ArenaPlan, arena_plan, render
from .lower import LoweringError, c_identifier, lower
from .program import Program

__all__ = ["BudgetError", "EmitResult", "LoweringError", "emit_c", "parse_budget",
           "parse_input_shapes"]

RUNTIME = os.path.join(os.path.dirname(os.path.abspath(__file__)), "runtime")


class BudgetError(EdgeoptError):
    """The model does not fit the flash or RAM budget; the message breaks the bytes down."""


@dataclass
class EmitResult:
    """What :func:`emit_c` produced."""

    files: dict[str, str]
    report: dict[str, Any] = field(default_factory=dict)


def parse_budget(text: str) -> dict[str, int]:
    """``"flash=256K,ram=64K"`` -> ``{"flash": 262144, "ram": 65536}`` (K, M: binary units).

    Raises:
        EdgeoptError: an unknown key or an unreadable size.
    """
    out = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = part.partition("=")
        key, value = key.strip().lower(), value.strip().upper()
        mult = {"K": 1024, "M": 1024 ** 2}.get(value[-1:], 1)
        digits = value[:-1] if value[-1:] in ("K", "M") else value
        if key not in ("flash", "ram") or not sep or not digits.isdigit():
            raise EdgeoptError(f"--budget {text!r}: expected flash=SIZE and/or ram=SIZE "
                               "(bytes, or with K/M), e.g. flash=256K,ram=64K")
        out[key] = int(digits) * mult
    return out


def parse_input_shapes(text: str) -> dict[str, tuple[int, ...]]:
    """``"x:1x3x48x192,y:1x4"`` -> ``{"x": (1, 3, 48, 192), "y": (1, 4)}``.

    Raises:
        EdgeoptError: an entry that is not ``name:DxDx...``.
    """
    out = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, dims = part.rpartition(":")
        sizes = dims.lower().split("x")
        if not sep or not name or not all(d.isdigit() for d in sizes):
            raise EdgeoptError(f"--input-shape {part!r}: expected NAME:DxDx..., e.g. "
                               "x:1x3x48x192")
        out[name] = tuple(int(d) for d in sizes)
    return out


def _forget_shapes(model: Model) -> None:
    """Drop the shapes of every node output (declared ones may hold stale symbols)."""
    for node in model.walk():
        for out in node.outputs:
            out.shape = None


def _prepare(model: Model, input_shapes: dict[str, tuple[int, ...]] | None = None) -> Model:
    """A clone with static shapes (batch 1, or ``input_shapes``).

    A float model (not a QDQ one) is simplified too.
    """
    from edgeopt.ir import static_shapes
    from edgeopt.ir.sparse import CSRTensor
    from edgeopt.passes import Context, PassManager
    from edgeopt.passes.analyses.costs import bind_batch

    shapes = dict(input_shapes or {})
    for v in model.graph.inputs:
        if v.is_initializer() or v.shape is None or v.name in shapes:
            continue
        free = [d for d in v.shape[1:] if not isinstance(d, int)]
        if free:
            raise LoweringError(f"cannot emit C: input {c_identifier(v.name, 'v')!r} has "
                                f"symbolic dimensions besides the batch ({len(free)}); C needs "
                                "static shapes: give them with --input-shape NAME:DxDx...")
    clone = model.clone()
    _forget_shapes(clone)
    if shapes:
        static_shapes(clone, shapes)
    clone = bind_batch(clone, 1)
    if any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in clone.walk()):
        # QDQ: fold shape computations only (DequantizeLinear weights are never folded);
        # each round's shapes let the next fold the Shape nodes downstream.
        for _ in range(16):
            report = PassManager("fold-constants,dce", verify="end").run(clone, Context())
            _forget_shapes(clone)
            infer_shapes(clone)
            if not report.modified:
                break
    else:
        packed = any(isinstance(v.const_value, CSRTensor) for v in clone.graph.initializers
                     .values())
        # Folding BatchNormalization rewrites weights, which drops their CSR packing: pack
        # again what is still worth it. The shapes inferred after a round let the next fold
        # the Shape nodes behind a Reshape whose target was computed (exporters' attention
        # blocks: Shape -> Slice -> Concat -> Reshape).
        for _ in range(16):
            report = PassManager("simplify,csr" if packed else "simplify", verify="end").run(
                clone, Context())
            _forget_shapes(clone)  # an earlier round's inference may have left symbols
            infer_shapes(clone)  # values the passes created (a decomposed BatchNormalization)
            if not report.modified or not any(n.op_type == "Shape" for n in clone.graph):
                break
    return clone


def _check_budget(program: Program, plan: ArenaPlan, budget: dict[str, int]) -> None:
    flash = sum(c.nbytes for c in program.consts)
    problems = []
    if "flash" in budget and flash > budget["flash"]:
        big = sorted(program.consts, key=lambda c: -c.nbytes)[:10]
        problems.append(f"flash: {flash:,} bytes of constants > budget {budget['flash']:,}; "
                        "largest: " + ", ".join(f"{c.name} {c.nbytes:,}" for c in big))
    if "ram" in budget and plan.size > budget["ram"]:
        problems.append(f"RAM: arena {plan.size:,} bytes (lower bound {plan.lower_bound:,}) > "
                        f"budget {budget['ram']:,}; live at the peak: " + ", ".join(
                            f"{n} {s:,}" for n, s in plan.peak[:10]))
    if problems:
        raise BudgetError("the model does not fit the budget:\n  " + "\n  ".join(problems))


def _report(program: Program, plans: list[ArenaPlan], info: dict[str, Any]) -> dict[str, Any]:
    core = plans[0]
    return {
        "flash_bytes": sum(c.nbytes for c in program.consts),
        "ram_bytes": core.size,
        "arena": {"size": core.size, "lower_bound": core.lower_bound, "naive": core.naive,
                  "size_f32": plans[-1].size, "peak": core.peak},
        "macs": sum(op.macs for op in program.ops),
        "crc32": f"0x{info['crc32']:08X}",
        "crc_bytes": info.get("crc_bytes"),
        "constants": [{"name": c.name, "type": c.ctype, "bytes": c.nbytes, "what": c.what}
                      for c in program.consts],
        "tensors": [{"name": t.name, "type": t.ctype, "shape": list(t.shape), "bytes": t.nbytes,
                     "offset": core.offsets.get(t.name), "io": t.io}
                    for t in program.tensors if t.alias is None],
        "layers": [{"node": op.node, "op": op.op_type, "kernel": op.kernel, "macs": op.macs}
                   for op in program.ops],
        "inputs": [_io(t) for t in program.inputs],
        "outputs": [_io(t) for t in program.outputs],
    }


def _io(t) -> dict[str, Any]:
    return {"name": t.name, "type": t.ctype, "shape": list(t.shape), "layout": t.layout,
            "scale": t.scale, "zero_point": t.zero_point}


def emit_c(model: Model, out_dir: str | None = None, prefix: str = "model", *,
           mode: str = "c", budget: dict[str, int] | None = None, alignment: int = 16,
           pipeline: str = "", source_sha256: str = "",
           input_shapes: dict[str, tuple[int, ...]] | None = None) -> EmitResult:
    """Generate the C library of ``model`` (and write it to ``out_dir`` when given).

    Args:
        model: the model (not changed).
        out_dir: folder to write into (created if missing); None only returns the files.
        prefix: C prefix of every symbol and file (sanitized into an identifier).
        mode: ``"c"`` (the library) or ``"c-header"`` (``<prefix>_constants.h`` only, dense
            weights in CMSIS-NN layouts).
        budget: ``{"flash": bytes, "ram": bytes}`` limits (see :func:`parse_budget`).
        alignment: arena offset alignment (the header's ``<P>_ALIGN`` default is 16).
        pipeline: the pipeline spec, recorded in the header.
        source_sha256: SHA-256 of the source model file, recorded in the header.
        input_shapes: static shapes of inputs whose dims are symbolic beyond the batch
            (``{"x": (1, 3, 48, 192)}``; see :func:`parse_input_shapes`).

    Raises:
        LoweringError: nodes the backend cannot lower exactly (all listed).
        BudgetError: the model does not fit ``budget``.
    """
    from edgeopt import __version__

    from .rules import register_all

    if mode not in ("c", "c-header"):
        raise ValueError(f"mode must be 'c' or 'c-header', not {mode!r}")
    prefix = c_identifier(prefix, "m").lower()
    program = lower(_prepare(model, input_shapes), prefix, register_all(), sparse=mode == "c")
    plans = [arena_plan(program, False, alignment)]
    if program.quantized:
        plans.append(arena_plan(program, True, alignment))
    _check_budget(program, plans[0], budget or {})
    info: dict[str, Any] = {"version": __version__, "sha256": source_sha256,
                            "pipeline": pipeline}
    if mode == "c-header":
        from .emit_header import constants_header

        info["crc32"] = zlib.crc32(b"".join(c.bytes() for c in program.consts)) & 0xFFFFFFFF
        files = {f"{prefix}_constants.h": constants_header(program, prefix, info)}
    else:
        files = render(program, prefix, plans, info)  # sets the CRC of what verify covers
        for name in sorted(os.listdir(RUNTIME)):
            if name.endswith((".c", ".h")):
                with open(os.path.join(RUNTIME, name), encoding="utf-8") as f:
                    files[name] = f.read()
    result = EmitResult(files, _report(program, plans, info))
    if out_dir is not None:
        write_files(out_dir, files)
    return result


def write_files(out_dir: str, files: dict[str, str]) -> None:
    """Write every file atomically (temporary file + rename) into ``out_dir``."""
    from edgeopt.tools._files import write_text_atomic

    os.makedirs(out_dir, exist_ok=True)
    for name, text in files.items():
        write_text_atomic(os.path.join(out_dir, name), text)


def file_sha256(path: str) -> str:
    """SHA-256 of a file, hex."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
