"""ctypes access to the C kernel library (backends/c/runtime) for the kernel tests.

``build(dir)`` compiles every runtime source into one shared library with the strict flags the
generated code must pass; ``Kernels`` wraps the entry points so tests call them with NumPy
arrays and the same geometry arguments as ``edgeopt.backends.c.reference``.
"""

from __future__ import annotations

import ctypes as ct
import pathlib
import subprocess

import numpy as np

RUNTIME = pathlib.Path(__file__).resolve().parents[2] / "backends" / "c" / "runtime"
CFLAGS = ["-std=c99", "-Wall", "-Wextra", "-Wpedantic", "-Werror"]
I32 = ct.c_int32

# sizeof of each parameter block as C sees it, to catch a ctypes mirror that drifted
_SIZES_C = """#include "eo_kernels.h"
size_t eo_test_sizeof(int which);
size_t eo_test_sizeof(int which) {
    switch (which) {
    case 0: return sizeof(eo_conv_params);
    case 1: return sizeof(eo_fc_params);
    case 2: return sizeof(eo_csr);
    case 3: return sizeof(eo_pool_params);
    case 4: return sizeof(eo_binary_params);
    default: return sizeof(eo_prelu_params);
    }
}
"""


def _fields(names: str, ctype=I32) -> list[tuple[str, object]]:
    return [(n, ctype) for n in names.split()]


class ConvParams(ct.Structure):
    _fields_ = (_fields("batch in_h in_w in_c out_h out_w out_c k_h k_w stride_h stride_w "
                        "dil_h dil_w pad_top pad_left groups in_offset out_offset act_min "
                        "act_max") + _fields("fact_min fact_max", ct.c_float))


class FcParams(ct.Structure):
    _fields_ = (_fields("batch in_features out_features in_offset out_offset act_min act_max")
                + _fields("fact_min fact_max", ct.c_float))


class Csr(ct.Structure):
    _fields_ = (_fields("values col_idx row_ptr", ct.c_void_p) + _fields("rows cols")
                + _fields("idx_bytes ptr_bytes", ct.c_uint8))


class PoolParams(ct.Structure):
    _fields_ = (_fields("batch in_h in_w c out_h out_w k_h k_w stride_h stride_w pad_top "
                        "pad_left act_min act_max") + _fields("fact_min fact_max", ct.c_float))


class BinaryParams(ct.Structure):
    _fields_ = [("dims", I32 * 4), ("a_stride", I32 * 4), ("b_stride", I32 * 4),
                *_fields("a_offset b_offset out_offset left_shift a_mult b_mult out_mult "
                         "a_shift b_shift out_shift act_min act_max"),
                *_fields("fact_min fact_max", ct.c_float)]


class PreluParams(ct.Structure):
    _fields_ = (_fields("channels in_offset out_offset pos_mult pos_shift")
                + _fields("neg_mult neg_shift", ct.c_void_p))


STRUCTS = (ConvParams, FcParams, Csr, PoolParams, BinaryParams, PreluParams)


def compile_sources(sources: list[pathlib.Path], out: pathlib.Path, extra: list[str]) -> None:
    """Compile ``sources`` with the strict flags; raise with the compiler output on failure."""
    cmd = ["gcc", *CFLAGS, "-O2", f"-I{RUNTIME}", *extra, *map(str, sources), "-o", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}\n{proc.stderr}")


def build(tmp: pathlib.Path) -> Kernels:
    """Compile the whole runtime into ``tmp/libeo.so`` and load it."""
    helper = tmp / "eo_test_sizes.c"
    helper.write_text(_SIZES_C)
    lib = tmp / "libeo.so"
    compile_sources([*sorted(RUNTIME.glob("*.c")), helper], lib, ["-shared", "-fPIC", "-lm"])
    return Kernels(ct.CDLL(str(lib)))


def ptr(a: np.ndarray) -> ct.c_void_p:
    """Address of a C-contiguous array (the caller keeps the array alive)."""
    assert a.flags["C_CONTIGUOUS"]
    return ct.c_void_p(a.ctypes.data)


def conv_params(x_shape, w_shape, out_shape, *, stride=(1, 1), dilation=(1, 1),
                pads=(0, 0, 0, 0), groups=1, in_zp=0, out_zp=0, act=(-128, 127),
                fact=(-3.4e38, 3.4e38)) -> ConvParams:
    """The C parameter block of a convolution (NHWC shapes; ``w_shape`` is (KH, KW))."""
    n, h, w, c = x_shape
    return ConvParams(n, h, w, c, out_shape[1], out_shape[2], out_shape[3], w_shape[0],
                      w_shape[1], stride[0], stride[1], dilation[0], dilation[1], pads[0],
                      pads[1], groups, -in_zp, out_zp, act[0], act[1], fact[0], fact[1])


def broadcast_params(a_shape, b_shape, **fields) -> tuple[BinaryParams, tuple[int, ...]]:
    """Broadcast dims and element strides of two NumPy shapes (rank <= 4) for the C kernels."""
    out = np.broadcast_shapes(a_shape, b_shape)
    dims = (1,) * (4 - len(out)) + tuple(out)

    def strides(shape):
        shape = (1,) * (4 - len(shape)) + tuple(shape)
        contiguous = np.cumprod((1, *shape[:0:-1]))[::-1]
        return [0 if s == 1 and d > 1 else int(k) for s, d, k in zip(shape, dims, contiguous,
                                                                     strict=True)]

    p = BinaryParams((I32 * 4)(*dims), (I32 * 4)(*strides(a_shape)),
                     (I32 * 4)(*strides(b_shape)), **fields)
    return p, tuple(out)


class Kernels:
    """The loaded library; every method allocates its output and returns it."""

    def __init__(self, lib: ct.CDLL) -> None:
        self.lib = lib
        lib.eo_srdhm.restype = I32
        lib.eo_rdbpot.restype = I32
        lib.eo_mbqm.restype = I32
        lib.eo_crc32.restype = ct.c_uint32
        lib.eo_crc32.argtypes = [ct.c_uint32, ct.c_void_p, ct.c_size_t]
        lib.eo_test_sizeof.restype = ct.c_size_t
        for name in ("eo_srdhm", "eo_rdbpot", "eo_mbqm"):
            getattr(lib, name).argtypes = [I32, I32] + ([I32] if name == "eo_mbqm" else [])

    def sizeof(self, which: int) -> int:
        """``sizeof`` of parameter block ``which`` (the order of ``STRUCTS``) in C."""
        return int(self.lib.eo_test_sizeof(which))

    def call(self, name: str, *args) -> None:
        """Call ``eo_<name>``: arrays become pointers, structures are passed by reference."""
        conv = []
        for a in args:
            if isinstance(a, np.ndarray):
                conv.append(ptr(a))
            elif isinstance(a, ct.Structure | ct.Array):
                conv.append(ct.byref(a))
            elif isinstance(a, float):
                conv.append(ct.c_float(a))
            elif a is None:
                conv.append(ct.c_void_p(0))
            else:
                conv.append(I32(a))
        getattr(self.lib, f"eo_{name}")(*conv)

    def layer(self, name: str, p, x: np.ndarray, w, *rest, out_shape, dtype=np.int8):
        """A conv / FC style kernel ``eo_<name>(p, x, w, *rest, out)``."""
        out = np.zeros(out_shape, dtype)
        self.call(name, p, np.ascontiguousarray(x), w, *rest, out)
        return out

    def crc32(self, crc: int, data: bytes) -> int:
        """``eo_crc32`` over a bytes object."""
        return int(self.lib.eo_crc32(crc, data, len(data)))


_CACHE: dict[str, Kernels] = {}


def session_kernels(tmp_path_factory) -> Kernels:
    """The library built once per test session (pytest's ``tmp_path_factory``)."""
    if "lib" not in _CACHE:
        _CACHE["lib"] = build(tmp_path_factory.mktemp("eo_runtime"))
    return _CACHE["lib"]
