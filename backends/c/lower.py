"""Lowering an IR model to a :class:`~.program.Program` (a schedule of kernel calls).

The model is first bound to batch 1 with static shapes. Nodes are then lowered in graph
order by the rules of :mod:`.rules` (``RULES: op_type -> rule``). A QDQ model lowers to int8
kernels: a node whose activation inputs are all DequantizeLinear outputs of int8 tensors and
whose output goes (possibly through a Relu/Clip) to one QuantizeLinear runs as the int8 kernel
that reads the int8 tensors and writes the QuantizeLinear's output (TFLite's integer rules,
see ``runtime/eo_kernels.h``). Anything else runs in float32, with eo_dequantize /
eo_quantize where int8 and float meet: exactly what ONNX Runtime computes for a QDQ node it
does not fuse. uint8 activations become int8 with the zero point moved by -128 (the same real
values). Nodes no rule handles are collected and reported together in one
:class:`LoweringError`; nothing is written.

4-D activations are stored NHWC. A Flatten of an NHWC tensor is free (``flat_hwc``): the
Gemm/MatMul that reads it gets its weight columns reordered from CHW to HWC instead. Any
consumer that needs ONNX order gets an explicit transpose.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from edgeopt.ir import EdgeoptError, Model, Node, Value
from edgeopt.ir.quant import qdq_params
from edgeopt.passes._util import constant_tensor

from .program import CTYPES, Const, Op, Params, Program, TensorRef

__all__ = ["C_KEYWORDS", "Lowerer", "LoweringError", "QView", "c_identifier", "lower"]

C_KEYWORDS = frozenset((
    "auto", "break", "case", "char", "const", "continue", "default", "do", "double", "else",
    "enum", "extern", "float", "for", "goto", "if", "inline", "int", "long", "register",
    "restrict", "return", "short", "signed", "sizeof", "static", "struct", "switch", "typedef",
    "union", "unsigned", "void", "volatile", "while", "_Bool", "_Complex", "_Imaginary",
    "_Alignas", "_Alignof", "_Atomic", "_Generic", "_Noreturn", "_Static_assert", "_Thread_local",
    "asm", "bool", "class", "delete", "false", "friend", "namespace", "new", "operator", "private",
    "protected", "public", "template", "this", "throw", "true", "try", "typename", "using",
    "virtual", "NULL", "main",
))


class LoweringError(EdgeoptError):
    """The model cannot be lowered to C exactly; the message lists every node and reason."""


def c_identifier(text: str, fallback: str = "t") -> str:
    """A valid C identifier made of ``text``'s letters, digits and underscores (<= 40 chars).

    Everything else becomes ``_``; a leading digit, an empty result or a C/C++ keyword gets
    a prefix. Never contains ``*/``, quotes or newlines, so it is safe in code and comments.
    """
    name = re.sub(r"[^A-Za-z0-9_]", "_", text)[:40].strip("_")
    name = re.sub(r"_+", "_", name)
    if not name or name[0].isdigit() or name in C_KEYWORDS or name.startswith("__"):
        name = f"{fallback}_{name}".rstrip("_")
    return name


@dataclass
class QView:
    """A DequantizeLinear output: an int8 tensor and how it reads as float."""

    tensor: TensorRef
    scale: float
    zero_point: int


class Lowerer:
    """State of one lowering; the rules call its helpers."""

    def __init__(self, model: Model, prefix: str, sparse: bool = True) -> None:
        self.model = model
        self.prefix = prefix
        self.sparse = sparse  # CSR kernels for CSR-packed weights (when smaller)
        self.program = Program()
        self.env: dict[int, TensorRef] = {}     # value id -> float or int8 activation
        self.views: dict[int, QView] = {}       # value id -> dequantized int8 activation
        self.done: set[int] = set()             # node ids lowered as part of another node
        self.errors: list[str] = []
        self._names: set[str] = set()

    # -- names ----------------------------------------------------------------------------
    def fresh(self, base: str) -> str:
        """A new unique identifier ``<prefix>_<base>``."""
        name = f"{self.prefix}_{c_identifier(base)}"
        unique, n = name, 1
        while unique in self._names:
            n += 1
            unique = f"{name}_{n}"
        self._names.add(unique)
        return unique

    def label(self, node: Node) -> str:
        """The node's C-safe label (its sanitized name, else op type and output)."""
        raw = node.name or f"{node.op_type}_{node.outputs[0].name}"
        return c_identifier(raw, "node")

    # -- tensors --------------------------------------------------------------------------
    def new_tensor(self, value: Value | None, ctype: str, shape: tuple[int, ...], layout: str
                   = "plain", chw: tuple[int, int, int] | None = None, scale: float | None = None,
                   zero_point: int | None = None, alias: TensorRef | None = None,
                   base: str | None = None) -> TensorRef:
        """A new activation (bound to ``value`` when given)."""
        src = value.name if value is not None else (base or "tmp")
        t = TensorRef(self.fresh(base or src), src, ctype, tuple(int(d) for d in shape), layout,
                      chw, scale, zero_point, alias)
        self.program.tensors.append(t)
        if value is not None:
            self.env[id(value)] = t
        return t

    def const(self, base: str, ctype: str, data: np.ndarray, what: str = "") -> Const:
        """A new constant array."""
        c = Const(self.fresh(base), ctype, np.ascontiguousarray(data, CTYPES[ctype][1]), what)
        self.program.consts.append(c)
        return c

    def emit(self, op: Op) -> None:
        """Append a kernel call to the schedule."""
        self.program.ops.append(op)

    def params(self, struct: str, **fields: object) -> Params:
        """A parameter block."""
        return Params(struct, dict(fields))

    # -- reading inputs -------------------------------------------------------------------
    def shape(self, value: Value) -> tuple[int, ...]:
        """The value's static ONNX shape.

        Raises:
            LoweringError: the shape is unknown or symbolic.
        """
        if value.shape is None or not all(isinstance(d, int) for d in value.shape):
            raise LoweringError(f"value {c_identifier(value.name, 'v')!r} has no static shape")
        return tuple(int(d) for d in value.shape)  # type: ignore[arg-type]

    def constant(self, value: Value | None) -> np.ndarray | None:
        """A constant's float (or integer) data; a DequantizeLinear of a constant dequantized."""
        if value is None:
            return None
        if constant_tensor(value, self.model) is not None:  # IR < 4: initializer inputs too
            return np.asarray(value.const_value.numpy())
        node = value.producer()
        if node is not None and node.op_type == "DequantizeLinear" and \
                node.inputs[0] is not None and node.inputs[0].const_value is not None:
            qp = qdq_params(node)
            q = np.asarray(node.inputs[0].const_value.numpy())
            if qp is not None:
                s, z = qp.broadcast(q.ndim)
                return ((q.astype(np.float64) - z) * s).astype(np.float32)
        return None

    def qconstant(self, value: Value | None):
        """``(int data, QuantParams, stored tensor)`` of a DequantizeLinear of a constant."""
        node = value.producer() if value is not None else None
        if node is None or node.op_type != "DequantizeLinear" or node.inputs[0] is None \
                or constant_tensor(node.inputs[0], self.model) is None:
            return None
        qp = qdq_params(node)
        if qp is None:
            return None
        tensor = node.inputs[0].const_value
        return np.asarray(tensor.numpy()), qp, tensor

    def view(self, value: Value | None) -> QView | None:
        """The int8 activation a DequantizeLinear output reads, if it is one."""
        return None if value is None else self.views.get(id(value))

    def act(self, value: Value) -> TensorRef:
        """The float activation of ``value`` (dequantized once if it is an int8 view)."""
        t = self.env.get(id(value))
        if t is not None:
            return t
        v = self.views.get(id(value))
        if v is None:
            raise LoweringError(f"value {c_identifier(value.name)!r} is not computed by any "
                                "lowered node")
        out = self.new_tensor(value, "float", v.tensor.shape, v.tensor.layout, v.tensor.chw)
        self.emit(Op("eo_dequantize_s8", c_identifier(value.name), "DequantizeLinear",
                     [float(v.scale), int(v.zero_point), v.tensor, out, out.size],
                     [v.tensor], [out]))
        return out

    def int8_output(self, node: Node) -> tuple[Node, list[Node], float, int, int, int] | None:
        """Where a node's output is quantized: ``(Q, fused, scale, zp, act_min, act_max)``.

        The output must have one reader, a QuantizeLinear to int8/uint8, possibly after a
        Relu or a Clip with constant bounds (fused: the clamp bounds). None otherwise.
        """
        out = node.outputs[0]
        fused: list[Node] = []
        lo, hi = -np.inf, np.inf
        while True:
            uses = list(out.uses())
            if len(uses) != 1 or out.is_graph_output():
                return None
            reader = uses[0].node
            if reader.op_type == "QuantizeLinear" and uses[0].index == 0:
                break
            bounds = clamp_bounds(reader, self)
            if bounds is None:
                return None
            lo, hi = max(lo, bounds[0]), min(hi, bounds[1])
            fused.append(reader)
            out = reader.outputs[0]
        qp = qdq_params(reader)
        if qp is None or qp.per_channel or qp.dtype.name not in ("INT8", "UINT8"):
            return None
        scale, zp = float(qp.scale), int(qp.zero_point) - (128 if qp.dtype.name == "UINT8" else 0)
        amin = -128 if lo == -np.inf else max(-128, round(lo / scale) + zp)
        amax = 127 if hi == np.inf else min(127, round(hi / scale) + zp)
        return reader, fused, scale, zp, amin, amax

    def float_fusion(self, node: Node) -> tuple[Value, float, float, list[Node]]:
        """``(output value, lo, hi, fused nodes)`` of a float node and the Relu/Clip after it."""
        out, lo, hi, fused = node.outputs[0], -np.inf, np.inf, []
        while not out.is_graph_output():
            uses = list(out.uses())
            if len(uses) != 1:
                break
            bounds = clamp_bounds(uses[0].node, self)
            if bounds is None:
                break
            lo, hi = max(lo, bounds[0]), min(hi, bounds[1])
            fused.append(uses[0].node)
            out = uses[0].node.outputs[0]
        return out, lo, hi, fused

    # -- layouts --------------------------------------------------------------------------
    def as_layout(self, t: TensorRef, layout: str, value: Value | None = None) -> TensorRef:
        """``t`` in ``layout`` (``plain`` or ``nhwc``), transposed if needed."""
        if t.layout == layout:
            return t
        if layout == "nhwc" and t.layout == "plain" and len(t.shape) == 4:
            n, c, h, w = t.shape
            perm, dims, shape = (0, 2, 3, 1), t.shape, (n, h, w, c)
        elif layout == "plain" and t.layout == "nhwc":
            n, h, w, c = t.shape
            perm, dims, shape = (0, 3, 1, 2), t.shape, (n, c, h, w)
        elif layout == "plain" and t.layout == "flat_hwc":
            c, h, w = t.chw  # type: ignore[misc]
            n = t.shape[0]
            perm, dims, shape = (0, 3, 1, 2), (n, h, w, c), t.shape
        else:
            raise LoweringError(f"cannot convert {t.name} from {t.layout} to {layout}")
        out = TensorRef(self.fresh(t.source + "_" + layout), t.source, t.ctype, shape, layout,
                        None, t.scale, t.zero_point)
        self.program.tensors.append(out)
        self.emit(Op("eo_transpose", c_identifier(t.source), "Transpose",
                     [self.dims_const(dims), self.dims_const(perm), _elem(t), t, out],
                     [t], [out]))
        return out

    def dims_const(self, values) -> str:
        """A C compound literal ``(const int32_t[4]){...}`` (no constant array needed)."""
        vals = list(values) + [1] * (4 - len(values))
        return "(const int32_t[]){" + ", ".join(str(int(v)) for v in vals) + "}"

    def bind(self, value: Value, t: TensorRef) -> None:
        """Make ``value`` read as ``t``."""
        self.env[id(value)] = t


def _elem(t: TensorRef) -> int:
    return CTYPES[t.ctype][0]


def clamp_bounds(node: Node, lw: Lowerer) -> tuple[float, float] | None:
    """``(lo, hi)`` of a Relu or of a Clip with constant bounds; None for other nodes."""
    if node.domain not in ("", "ai.onnx"):
        return None
    if node.op_type == "Relu":
        return 0.0, np.inf
    if node.op_type != "Clip":
        return None
    if "min" in node.attrs or "max" in node.attrs:  # opset < 11
        return float(node.attr("min", -np.inf)), float(node.attr("max", np.inf))
    bounds = []
    for i, default in ((1, -np.inf), (2, np.inf)):
        v = node.inputs[i] if len(node.inputs) > i else None
        if v is None:
            bounds.append(default)
            continue
        c = lw.constant(v)
        if c is None or c.size != 1:
            return None
        bounds.append(float(c.reshape(())))
    return bounds[0], bounds[1]


Rule = Callable[[Lowerer, Node], None]


def lower(model: Model, prefix: str, rules: dict[str, Rule], sparse: bool = True) -> Program:
    """Lower a model with static shapes (batch 1) to a Program.

    Raises:
        LoweringError: unsupported nodes (all listed), dynamic shapes, or values of types the
            backend does not handle.
    """
    lw = Lowerer(model, prefix, sparse)
    from .rules import bind_inputs, bind_outputs

    bind_inputs(lw)
    failed: set[int] = set()  # values of nodes that could not be lowered
    for node in model.graph:
        if id(node) in lw.done:
            continue
        if any(v is not None and id(v) in failed for v in node.inputs):
            failed.update(id(v) for v in node.outputs)  # reported at its cause only
            continue
        before = len(lw.errors)
        if node.domain not in ("", "ai.onnx") or node.op_type not in rules:
            lw.errors.append(f"{node.op_type} node {lw.label(node)!r}: operator not supported "
                             "by the C backend")
            failed.update(id(v) for v in node.outputs)
            continue
        if list(node.subgraphs()):
            lw.errors.append(f"{node.op_type} node {lw.label(node)!r}: subgraphs are not "
                             "supported by the C backend")
            failed.update(id(v) for v in node.outputs)
            continue
        try:
            rules[node.op_type](lw, node)
        except LoweringError as e:
            lw.errors.append(f"{node.op_type} node {lw.label(node)!r}: {e}")
        if len(lw.errors) > before:
            failed.update(id(v) for v in node.outputs)
    if not lw.errors:
        bind_outputs(lw)
    if lw.errors:
        raise LoweringError("cannot emit C:\n  " + "\n  ".join(lw.errors))
    return lw.program
