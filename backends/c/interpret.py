"""Running a lowered :class:`~.program.Program` in Python, kernel call by kernel call.

:func:`run` executes the schedule the C emitter writes, with NumPy arrays in the C storage
shapes (NHWC for 4-D activations) and the C element types. Each :class:`~.program.Op` is
dispatched by its kernel name through :data:`KERNELS`: int8 kernels call the bit-exact
integer model of :mod:`.reference` (so an int8 result equals the C kernels' bytes), float32
kernels compute in float32 with NumPy (equal to C up to the order of float additions), and
data movement copies bytes as the C code does. Aliases (free reshapes and layout relabels)
share their root tensor's storage. The arena is not modelled (every root has its own buffer),
so comparing C with the interpreter also checks the arena plan.

Arguments are decoded (:meth:`Machine.value`): tensors to arrays, a ``Params`` block to a dict
(an ``eo_csr`` weight stays a dict the kernels densify), the dims compound literals
``(const int32_t[]){...}`` to lists of ints. The written tensor is passed as its ``TensorRef``;
the kernel returns the values and :func:`execute` stores them.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from edgeopt.ir import EdgeoptError

from . import reference as ref
from .program import CTYPES, Const, Op, Params, Program, Ptrs, TensorRef

__all__ = ["KERNELS", "InterpretError", "lower_model", "run"]

FLT_MAX = float(np.finfo(np.float32).max)
_DIMS = re.compile(r"\(const int32_t\[\d*\]\)\{([-0-9,\s]*)\}")

#: kernel name -> function(*decoded args) returning the written tensor's values
KERNELS: dict[str, Callable[..., np.ndarray]] = {}


class InterpretError(EdgeoptError):
    """A Program the interpreter cannot run (unknown kernel, bad argument, unwritten read)."""


def kernel(*names: str):
    """Register a kernel implementation under the C function ``names``."""
    def decorate(fn):
        for name in names:
            KERNELS[name] = fn
        return fn
    return decorate


# -- storage and argument decoding -------------------------------------------------------------
class Machine:
    """The tensors' storage: one flat array per root tensor (aliases share it)."""

    def __init__(self) -> None:
        self.buffers: dict[int, np.ndarray] = {}

    def read(self, t: TensorRef) -> np.ndarray:
        """A copy of ``t`` in its storage shape."""
        buf = self.buffers.get(id(t.root()))
        if buf is None:
            raise InterpretError(f"{t.name} is read before any kernel wrote it")
        return buf.reshape(t.shape).copy()

    def write(self, t: TensorRef, values: np.ndarray) -> None:
        """Store ``values`` (any shape with ``t.size`` elements) as ``t``'s bytes."""
        values = np.asarray(values)
        if values.size != t.size:
            raise InterpretError(f"{t.name}: a kernel produced {values.size} values for "
                                 f"{t.size} elements")
        dtype = CTYPES[t.ctype][1]
        if np.dtype(dtype).kind in "iu" and values.dtype.kind == "f":
            raise InterpretError(f"{t.name}: float values for a {t.ctype} tensor")
        root = t.root()
        buf = self.buffers.setdefault(id(root), np.zeros(root.size, CTYPES[root.ctype][1]))
        if buf.size != t.size:
            raise InterpretError(f"alias {t.name} ({t.size}) and its root {root.name} "
                                 f"({root.size}) differ in size")
        buf[:] = values.reshape(-1).astype(dtype)

    def value(self, arg: Any) -> Any:
        """The decoded value of a kernel argument or parameter field."""
        if isinstance(arg, TensorRef):
            return self.read(arg)
        if isinstance(arg, Const):
            return arg.data
        if isinstance(arg, Params):
            return {k: self.value(v) for k, v in arg.fields.items()}
        if isinstance(arg, (Ptrs, list, tuple)):
            return [self.value(x) for x in (arg.items if isinstance(arg, Ptrs) else arg)]
        if isinstance(arg, str):
            return parse_literal(arg)
        return arg


def parse_literal(text: str) -> Any:
    """A C expression argument: ``(const int32_t[]){1, 2}`` -> ``[1, 2]``, ``-FLT_MAX`` -> float."""
    text = text.strip()
    if text in ("FLT_MAX", "-FLT_MAX"):
        return -FLT_MAX if text[0] == "-" else FLT_MAX
    m = _DIMS.fullmatch(text)
    if m is None:
        raise InterpretError(f"cannot read the C argument {text!r}")
    return [int(v) for v in m.group(1).split(",") if v.strip()]


def run(program: Program, inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Execute ``program`` on ``inputs`` (the C API's types and storage shapes).

    Returns the outputs in their C storage shapes and types (int8 for an int8 output).

    Raises:
        ValueError: wrong number, element type or size of inputs.
        InterpretError: an unknown kernel or an inconsistent Program.
    """
    if len(inputs) != len(program.inputs):
        raise ValueError(f"expected {len(program.inputs)} inputs, got {len(inputs)}")
    m = Machine()
    for t, x in zip(program.inputs, inputs, strict=True):
        x = np.asarray(x)
        if x.dtype != CTYPES[t.ctype][1] or x.size != t.size:
            raise ValueError(f"input {t.name} must be {t.ctype} with {t.size} elements "
                             f"(shape {t.shape}), got {x.dtype} with {x.size}")
        m.write(t, x)
    for op in program.ops:
        execute(m, op)
    return [m.read(t) for t in program.outputs]


def execute(m: Machine, op: Op) -> None:
    """Run one kernel call and store what it writes."""
    fn = KERNELS.get(op.kernel)
    if fn is None:
        raise InterpretError(f"{op.node}: kernel {op.kernel!r} is not known to the "
                             f"interpreter (known: {', '.join(sorted(KERNELS))})")
    if len(op.writes) != 1:
        raise InterpretError(f"{op.node}: {op.kernel} writes {len(op.writes)} tensors")
    out = op.writes[0]
    args = [a if a is out else m.value(a) for a in op.args]
    m.write(out, fn(*args))


# -- helpers ------------------------------------------------------------------------------------
def densify(w: Any, shape: tuple[int, ...]) -> np.ndarray:
    """A weight argument as a dense array of ``shape``: a decoded ``eo_csr`` dict is expanded."""
    if isinstance(w, dict):
        dense = np.zeros((w["rows"], w["cols"]), w["values"].dtype)
        ptr = w["row_ptr"].astype(np.int64)
        rows = np.repeat(np.arange(w["rows"]), np.diff(ptr))
        np.add.at(dense, (rows, w["col_idx"].astype(np.int64)), w["values"])  # C sums repeats
        w = dense
    return np.asarray(w).reshape(shape)


def _geometry(p: dict, dilated: bool = True) -> dict[str, tuple]:
    """stride, (dilation) and the (top, left, bottom, right) pads that give out_h x out_w."""
    dil = (p["dil_h"], p["dil_w"]) if dilated else (1, 1)
    bottom = (p["out_h"] - 1) * p["stride_h"] + dil[0] * (p["k_h"] - 1) + 1 - p["in_h"]
    right = (p["out_w"] - 1) * p["stride_w"] + dil[1] * (p["k_w"] - 1) + 1 - p["in_w"]
    g = {"stride": (p["stride_h"], p["stride_w"]),
         "pads": (p["pad_top"], p["pad_left"], max(0, bottom - p["pad_top"]),
                  max(0, right - p["pad_left"]))}
    return g | ({"dilation": dil} if dilated else {})


def _crop(y: np.ndarray, p: dict) -> np.ndarray:
    return y[:, :p["out_h"], :p["out_w"]]


def _nhwc(x: np.ndarray, p: dict, c: str = "in_c") -> np.ndarray:
    return x.reshape(p["batch"], p["in_h"], p["in_w"], p[c])


def _act(p: dict) -> tuple[int, int]:
    return p["act_min"], p["act_max"]


def _fclamp(y: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """The C ``eo_i_fclamp`` in float32."""
    return np.clip(np.asarray(y, np.float32), np.float32(lo), np.float32(hi))


def _windows(x: np.ndarray, g: dict, k: tuple[int, int], fill: float) -> np.ndarray:
    """Sliding windows ``[N, OH, OW, C, KH, KW]`` of NHWC ``x`` padded with ``fill``."""
    top, left, bottom, right = g["pads"]
    dil = g.get("dilation", (1, 1))
    xp = np.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)), constant_values=fill)
    eff = (dil[0] * (k[0] - 1) + 1, dil[1] * (k[1] - 1) + 1)
    win = np.lib.stride_tricks.sliding_window_view(xp, eff, axis=(1, 2))
    return win[:, ::g["stride"][0], ::g["stride"][1], :, ::dil[0], ::dil[1]]


# -- convolution and fully connected -------------------------------------------------------------
@kernel("eo_conv_s8", "eo_conv_s8_csr")
def conv_s8(p, x, w, bias, mult, shift, out):
    """Conv (groups >= 1), dense OHWI or CSR weight, TFLite integer rules."""
    w = densify(w, (p["out_c"], p["k_h"], p["k_w"], p["in_c"] // p["groups"]))
    y = ref.conv(_nhwc(x, p), w, bias, mult, shift, in_zp=-p["in_offset"],
                 out_zp=p["out_offset"], groups=p["groups"], act=_act(p), **_geometry(p))
    return _crop(y, p)


@kernel("eo_depthwise_conv_s8")
def depthwise_conv_s8(p, x, w, bias, mult, shift, out):
    """Depthwise conv, weight ``[KH, KW, C*M]``."""
    w = densify(w, (p["k_h"], p["k_w"], p["out_c"]))
    y = ref.depthwise_conv(_nhwc(x, p), w, bias, mult, shift, in_zp=-p["in_offset"],
                           out_zp=p["out_offset"], act=_act(p), **_geometry(p))
    return _crop(y, p)


@kernel("eo_fc_s8", "eo_fc_s8_csr")
def fc_s8(p, x, w, bias, mult, shift, out):
    """Fully connected, weight ``[OUT][IN]`` dense or CSR."""
    w = densify(w, (p["out_features"], p["in_features"]))
    return ref.fully_connected(x.reshape(p["batch"], p["in_features"]), w, bias, mult, shift,
                               in_zp=-p["in_offset"], out_zp=p["out_offset"], act=_act(p))


@kernel("eo_fc_s8_f32")
def fc_s8_f32(p, x, w, bias, scale, out):
    """int8 fully connected with a float output: the int32 sums scaled per output row."""
    x = x.reshape(p["batch"], p["in_features"]).astype(np.int64) + p["in_offset"]
    w = np.asarray(w).reshape(p["out_features"], p["in_features"]).astype(np.int64)
    acc = (x @ w.T).astype(np.int32).astype(np.float32)
    y = acc * np.asarray(scale, np.float32) + (0 if bias is None else np.asarray(bias, np.float32))
    return _fclamp(y, p["fact_min"], p["fact_max"])


def _transpose_sums(p: dict, x: np.ndarray, w: np.ndarray, dtype) -> np.ndarray:
    """ConvTranspose sums ``[N, OH, OW, OC]`` by scatter (the C gathers the same terms)."""
    n, ih, iw = p["batch"], p["in_h"], p["in_w"]
    groups, oc = p["groups"], p["out_c"]
    icg, ocg = p["in_c"] // groups, oc // groups
    w = np.asarray(w).reshape(oc, p["k_h"], p["k_w"], icg).astype(dtype)
    acc = np.zeros((n, p["out_h"], p["out_w"], oc), dtype)
    x = x.reshape(n, ih, iw, p["in_c"]).astype(dtype)
    for ky in range(p["k_h"]):
        oy = np.arange(ih) * p["stride_h"] - p["pad_top"] + ky * p["dil_h"]
        iy = np.flatnonzero((oy >= 0) & (oy < p["out_h"]))
        for kx in range(p["k_w"]):
            ox = np.arange(iw) * p["stride_w"] - p["pad_left"] + kx * p["dil_w"]
            ix = np.flatnonzero((ox >= 0) & (ox < p["out_w"]))
            for g in range(groups):
                part = x[:, iy][:, :, ix][..., g * icg:(g + 1) * icg] @ \
                    w[g * ocg:(g + 1) * ocg, ky, kx].T
                acc[:, oy[iy][:, None], ox[ix][None, :], g * ocg:(g + 1) * ocg] += part
    return acc


@kernel("eo_conv_transpose_s8")
def conv_transpose_s8(p, x, w, bias, mult, shift, out):
    """int8 ConvTranspose: exact int64 sums, then Conv's per-channel requantization."""
    acc = _transpose_sums(p, np.asarray(x, np.int64) + p["in_offset"], w, np.int64)
    if bias is not None:
        acc = acc + np.asarray(bias, np.int64)
    return ref._out8(ref._wrap32(acc), mult, shift, p["out_offset"], _act(p))


@kernel("eo_conv_transpose_f32")
def conv_transpose_f32(p, x, w, bias, out):
    """Float ConvTranspose (float32 sums; the order differs from C's)."""
    y = _transpose_sums(p, x, w, np.float32) + (0 if bias is None else bias.astype(np.float32))
    return _fclamp(y, p["fact_min"], p["fact_max"])


@kernel("eo_conv_f32", "eo_conv_f32_csr")
def conv_f32(p, x, w, bias, out):
    """Float conv: per group, windows times the OHWI rows, in float32."""
    groups, icg = p["groups"], p["in_c"] // p["groups"]
    ocg = p["out_c"] // groups
    w = densify(w, (p["out_c"], p["k_h"], p["k_w"], icg)).astype(np.float32)
    win = _crop(_windows(_nhwc(x, p).astype(np.float32), _geometry(p), (p["k_h"], p["k_w"]),
                         0.0), p)
    n, oh, ow = win.shape[:3]
    outs = []
    for g in range(groups):
        patch = win[:, :, :, g * icg:(g + 1) * icg].transpose(0, 1, 2, 4, 5, 3)
        outs.append(patch.reshape(n * oh * ow, -1) @ w[g * ocg:(g + 1) * ocg].reshape(ocg, -1).T)
    y = np.concatenate(outs, axis=1) + (0 if bias is None else bias.astype(np.float32))
    return _fclamp(y, p["fact_min"], p["fact_max"])


@kernel("eo_depthwise_conv_f32")
def depthwise_conv_f32(p, x, w, bias, out):
    """Float depthwise conv: a conv with ``groups = in_c`` and the weight read as OHWI."""
    w = densify(w, (p["k_h"], p["k_w"], p["out_c"])).transpose(2, 0, 1)[..., None]
    return conv_f32(p | {"groups": p["in_c"]}, x, w, bias, out)


@kernel("eo_fc_f32", "eo_fc_f32_csr")
def fc_f32(p, x, w, bias, out):
    """Float fully connected."""
    w = densify(w, (p["out_features"], p["in_features"])).astype(np.float32)
    y = x.reshape(p["batch"], p["in_features"]).astype(np.float32) @ w.T
    return _fclamp(y + (0 if bias is None else bias), p["fact_min"], p["fact_max"])


# -- elementwise ----------------------------------------------------------------------------------
def broadcast(flat: np.ndarray, dims: Sequence[int], strides: Sequence[int]) -> np.ndarray:
    """``flat[sum(i_d * stride_d)]`` over the 4-D index space ``dims`` (eo_binary_params)."""
    idx = np.zeros(tuple(dims), np.int64)
    for d, (n, s) in enumerate(zip(dims, strides, strict=True)):
        idx = idx + (np.arange(n) * s).reshape([-1 if e == d else 1 for e in range(4)])
    return np.asarray(flat).reshape(-1)[idx]


def _operands(p, a, b) -> tuple[np.ndarray, np.ndarray]:
    return broadcast(a, p["dims"], p["a_stride"]), broadcast(b, p["dims"], p["b_stride"])


def _add_params(p: dict) -> ref.AddParams:
    keys = ("a_offset", "b_offset", "out_offset", "left_shift", "a_mult", "a_shift", "b_mult",
            "b_shift", "out_mult", "out_shift", "act_min", "act_max")
    return ref.AddParams(*(p[k] for k in keys))


KERNELS.update({  # TFLite int8 Add / Sub: left shift 20, input and output multipliers
    "eo_add_s8": lambda p, a, b, out: ref.add(*_operands(p, a, b), _add_params(p)),
    "eo_sub_s8": lambda p, a, b, out: ref.sub(*_operands(p, a, b), _add_params(p)),
})


@kernel("eo_mul_s8")
def mul_s8(p, a, b, out):
    """int8 Mul."""
    mp = ref.MulParams(p["a_offset"], p["b_offset"], p["out_offset"], p["out_mult"],
                       p["out_shift"], p["act_min"], p["act_max"])
    return ref.mul(*_operands(p, a, b), mp)


def _float_binary(fn):
    """A float binary kernel with broadcasting and the fused clamp."""
    def run_binary(p, a, b, out):
        x, y = _operands(p, a, b)
        with np.errstate(all="ignore"):
            z = fn(x.astype(np.float32), y.astype(np.float32))
        return _fclamp(z, p["fact_min"], p["fact_max"])
    return run_binary


for _name, _fn in (("add", np.add), ("sub", np.subtract), ("mul", np.multiply),
                   ("div", np.divide)):
    KERNELS[f"eo_{_name}_f32"] = _float_binary(_fn)


def _flat(fn):
    """A kernel ``(*params, in, out, n)``: ``fn(*params, first n values of in)``."""
    def run_flat(*args):
        *params, x, _out, n = args
        with np.errstate(all="ignore"):
            return fn(*params, x.reshape(-1)[:n])
    return run_flat


def _f32(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float32)


def _prelu_s8(p: dict, x: np.ndarray) -> np.ndarray:
    """TFLite LeakyRelu's two multipliers, the negative one per channel of the last axis."""
    return ref.prelu(x.reshape(-1, p["channels"]), -p["in_offset"], p["out_offset"],
                     p["pos_mult"], p["pos_shift"], p["neg_mult"], p["neg_shift"])


def _prelu_f32(slope: np.ndarray, x: np.ndarray) -> np.ndarray:
    v = x.reshape(-1, slope.size)
    return np.where(v >= 0, v, slope * v)


KERNELS.update({
    "eo_lut_s8": _flat(lambda table, x: np.asarray(table, np.int8)[x.astype(np.int64) + 128]),
    "eo_clamp_s8": _flat(lambda lo, hi, x: ref.clamp(x, lo, hi)),
    "eo_requantize_s8": _flat(lambda in_off, out_off, mult, shift, x: ref.requantize(
        x, -in_off, out_off, mult, shift)),
    "eo_prelu_s8": _flat(_prelu_s8),
    "eo_quantize_s8": _flat(lambda scale, zp, x: ref.quantize(x, scale, zp)),
    "eo_dequantize_s8": _flat(lambda scale, zp, x: ref.dequantize(x, scale, zp)),
    "eo_clamp_f32": _flat(lambda lo, hi, x: _fclamp(x, lo, hi)),
    "eo_sigmoid_f32": _flat(lambda x: np.float32(1) / (np.float32(1) + np.exp(-_f32(x)))),
    "eo_tanh_f32": _flat(lambda x: np.tanh(_f32(x))),
    "eo_hardswish_f32": _flat(lambda x: _f32(x) * np.clip(
        _f32(x) * (np.float32(1) / np.float32(6)) + np.float32(0.5), 0, 1)),
    "eo_leaky_relu_f32": _flat(lambda alpha, x: np.where(x >= 0, _f32(x),
                                                         np.float32(alpha) * _f32(x))),
    "eo_prelu_f32": _flat(lambda slope, ch, x: _prelu_f32(_f32(slope)[:ch], _f32(x))),
    "eo_sqrt_f32": _flat(lambda x: np.sqrt(_f32(x))),
    "eo_pow_f32": _flat(lambda e, x: _f32(x) * _f32(x) if e == 2 else
                        np.power(_f32(x), np.float32(e))),
})


@kernel("eo_softmax_s8")
def softmax_s8(rows, n, mult, left_shift, diff_min, x, out):
    """TFLite int8 Softmax over rows of ``n``."""
    return ref.softmax(x.reshape(rows, n), ref.SoftmaxParams(mult, left_shift, diff_min))


@kernel("eo_softmax_f32")
def softmax_f32(rows, n, x, out):
    """Float softmax over rows of ``n``."""
    v = x.reshape(rows, n).astype(np.float32)
    e = np.exp(v - v.max(axis=1, keepdims=True))
    return e * (np.float32(1) / e.sum(axis=1, keepdims=True, dtype=np.float32))


@kernel("eo_matmul_f32")
def matmul_f32(batch, m, k, n, a_stride, b_stride, lo, hi, a, b, out):
    """Batched float32 MatMul of two computed tensors (stride 0 broadcasts one matrix)."""
    av = a.reshape(-1).astype(np.float32)
    bv = b.reshape(-1).astype(np.float32)
    y = np.stack([av[t * a_stride:t * a_stride + m * k].reshape(m, k)
                  @ bv[t * b_stride:t * b_stride + k * n].reshape(k, n) for t in range(batch)])
    return np.clip(y, np.float32(lo), np.float32(hi))


@kernel("eo_reduce_f32")
def reduce_f32(kind, outer, n, inner, x, out):
    """Mean / sum / max / min over the middle axis of ``[outer, n, inner]``, in float32."""
    v = x.reshape(outer, n, inner).astype(np.float32)
    if kind in (2, 3):
        return v.max(axis=1) if kind == 2 else v.min(axis=1)
    total = v.sum(axis=1, dtype=np.float32)
    return total / np.float32(n) if kind == 0 else total


@kernel("eo_lrn_f32")
def lrn_f32(outer, channels, inner, size, alpha, beta, bias, x, out):
    """LRN across channels of ``[outer, channels, inner]``, in float32."""
    v = x.reshape(outer, channels, inner).astype(np.float32)
    sq = np.concatenate([np.zeros((outer, 1, inner), np.float32), np.cumsum(v * v, axis=1,
                                                                             dtype=np.float32)],
                        axis=1)
    c = np.arange(channels)
    first = np.maximum(c - (size - 1) // 2, 0)
    last = np.minimum(c + size - 1 - (size - 1) // 2, channels - 1)
    window = sq[:, last + 1] - sq[:, first]
    scale = np.float32(alpha) / np.float32(size)
    return v / np.power(np.float32(bias) + scale * window, np.float32(beta))


# -- pooling --------------------------------------------------------------------------------------
def _pool_s8(fn):
    """int8 max or average pooling (:func:`.reference.max_pool` / ``avg_pool``)."""
    def run_pool(p, x, out):
        g = _geometry(p, dilated=False)
        y = fn(_nhwc(x, p, "c"), (p["k_h"], p["k_w"]), g["stride"], g["pads"], _act(p))
        return _crop(y, p)
    return run_pool


KERNELS.update({"eo_maxpool_s8": _pool_s8(ref.max_pool), "eo_avgpool_s8": _pool_s8(ref.avg_pool)})


@kernel("eo_mean_hw_s8")
def mean_hw_s8(batch, hw, c, in_offset, out_offset, mult, shift, x, out):
    """TFLite int8 Mean over H and W."""
    return ref.mean_hw(x.reshape(batch, hw, 1, c), -in_offset, out_offset, mult, shift)


def _pool_f32(is_max: bool):
    """Float max or average pooling (windows clipped to the image, count_include_pad = 0)."""
    def run_pool(p, x, out):
        g, k = _geometry(p, dilated=False), (p["k_h"], p["k_w"])
        v = _nhwc(x, p, "c").astype(np.float32)
        if is_max:
            y = _windows(v, g, k, -np.inf).max(axis=(4, 5))
        else:
            total = _windows(v, g, k, 0.0).sum(axis=(4, 5), dtype=np.float32)
            count = _windows(np.ones_like(v[..., :1]), g, k, 0.0).sum(axis=(4, 5))
            y = total / np.maximum(count, 1).astype(np.float32)
        return _fclamp(_crop(y, p), p["fact_min"], p["fact_max"])
    return run_pool


KERNELS.update({"eo_maxpool_f32": _pool_f32(True), "eo_avgpool_f32": _pool_f32(False)})


@kernel("eo_mean_hw_f32")
def mean_hw_f32(batch, hw, c, x, out):
    """Float mean over H and W."""
    return x.reshape(batch, hw, c).sum(axis=1, dtype=np.float32) / np.float32(hw)


# -- data movement (bytes) ------------------------------------------------------------------------
def _bytes(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x).reshape(-1).view(np.uint8)


def _as(out: TensorRef, raw: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(raw).view(CTYPES[out.ctype][1])


@kernel("memcpy")
def memcpy(dst, src, nbytes):
    """``memcpy(dst, src, n)``: the whole tensor."""
    return _as(dst, _bytes(src)[:nbytes])


@kernel("eo_transpose")
def transpose(dims, perm, elem, x, out):
    """4-D transpose: ``out = x.reshape(dims).transpose(perm)``."""
    if elem != x.itemsize:
        raise InterpretError(f"eo_transpose: element size {elem} for {x.dtype} data")
    return x.reshape(dims).transpose(perm)


@kernel("eo_concat")
def concat(n, inputs, sizes, outer, out):
    """Concat: ``outer`` blocks; input i contributes ``sizes[i]`` bytes per block."""
    parts = [_bytes(x).reshape(outer, s) for x, s in zip(inputs[:n], sizes, strict=True)]
    return _as(out, np.concatenate(parts, axis=1))


@kernel("eo_slice")
def slice_(dims, starts, steps, out_dims, elem, x, out):
    """4-D strided slice: ``out[o] = x[starts + o * steps]`` on every axis."""
    if elem != x.itemsize:
        raise InterpretError(f"eo_slice: element size {elem} for {x.dtype} data")
    idx = np.ix_(*(starts[d] + steps[d] * np.arange(out_dims[d]) for d in range(4)))
    return x.reshape(dims[:4])[idx]


@kernel("eo_pad")
def pad(dims, pads, elem, value, x, out):
    """4-D constant pad; the fill is the first ``elem`` bytes of ``value`` (as C copies it)."""
    fill = _as(out, _bytes(value)[:elem])[0]
    return np.pad(x.reshape(dims), list(zip(pads[:4], pads[4:], strict=True)),
                  constant_values=fill)


@kernel("eo_resize_nearest")
def resize_nearest(dims, y_idx, x_idx, elem, x, out):
    """Nearest resize: ``x[n, y_idx[y], x_idx[x], c]`` over ``dims`` = n, in_h, in_w, c, ..."""
    n, ih, iw, c, oh, ow = (int(d) for d in dims[:6])
    if elem != x.itemsize:
        raise InterpretError(f"eo_resize_nearest: element size {elem} for {x.dtype} data")
    img = x.reshape(n, ih, iw, c)
    return img[:, np.asarray(y_idx[:oh], np.int64)][:, :, np.asarray(x_idx[:ow], np.int64)]


@kernel("eo_resize_linear_f32")
def resize_linear_f32(dims, y0, y1, fy, x0, x1, fx, x, out):
    """Bilinear resize in float32: the four neighbours weighted as ONNX Runtime sums them."""
    n, ih, iw, c, oh, ow = (int(d) for d in dims[:6])
    img = x.reshape(n, ih, iw, c).astype(np.float32)
    ry0, ry1 = np.asarray(y0[:oh], np.int64), np.asarray(y1[:oh], np.int64)
    cx0, cx1 = np.asarray(x0[:ow], np.int64), np.asarray(x1[:ow], np.int64)
    wy1 = _f32(fy)[:oh].reshape(1, oh, 1, 1)
    wx1 = _f32(fx)[:ow].reshape(1, 1, ow, 1)
    wy0, wx0 = np.float32(1) - wy1, np.float32(1) - wx1
    a, b = img[:, ry0][:, :, cx0], img[:, ry0][:, :, cx1]
    c_, d = img[:, ry1][:, :, cx0], img[:, ry1][:, :, cx1]
    return wy0 * wx0 * a + wy0 * wx1 * b + wy1 * wx0 * c_ + wy1 * wx1 * d


def lower_model(model, prefix: str = "model", sparse: bool = True,
                input_shapes: dict[str, tuple[int, ...]] | None = None) -> Program:
    """The Program ``emit_c(model, prefix=..., input_shapes=...)`` writes (same rules)."""
    from . import _prepare
    from .lower import c_identifier, lower
    from .rules import register_all

    return lower(_prepare(model, input_shapes), c_identifier(prefix, "m").lower(),
                 register_all(), sparse)
