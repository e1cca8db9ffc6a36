"""Generated C on a Cortex-M4F (QEMU ``mps2-an386``) against the same C on the host (issue 7).

For the digits CNN and MobileNetV2, float and int8 (calibrated on ``examples/digits/calib.npz``),
and an int8 CNN with CSR layers (``sparsify:0.8,quant:int8,csr``), the library from
:func:`~edgeopt.backends.c.emit_c` is compiled twice: for the host (``gcc -std=c99 -O2``, the
generated host main ``-DNET_TEST_MAIN``) and for the Cortex-M4F (:mod:`edgeopt.backends.c.mcu`,
constants in the section ``.edgeopt.weights`` through ``NET_WEIGHTS_SECTION``). Six test
images (the last one scaled 8x, so that input quantization and activations saturate) run on
both:

- through ``net_invoke`` (the generated ``eo_test_run``): outputs are compared byte for byte.
  Float outputs are bit-identical too: ``-std=c99`` turns off FMA contraction, both targets
  compute in IEEE binary32 without excess precision, and these models need no libm;
  (Built with ``-ffp-contract=fast`` the M4 fuses into ``vfma`` and float outputs move by up
  to 3e-7 of the largest output);
- through ``net_invoke_f32`` (``eo_test_run_as(..., 1)`` behind a small shim): within 1e-5 of
  the largest output magnitude (measured: bit-identical as well).

The linked image is then held against the emitter's report: the ``.edgeopt`` output section
holds exactly the report's constants, each symbol as large as the constant, at a 16-byte
boundary, so the section is ``flash_bytes`` plus the padding between them; the only model
symbol in RAM is the test program's arena, ``NET_ARENA_SIZE[_F32] + 1`` bytes.

Skips, loudly, only when the cross toolchain or QEMU is missing (as ``test_mcu.py`` does).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from mcu_toolchain import require_toolchain

from edgeopt import ir
from edgeopt.backends.c import emit_c, mcu
from edgeopt.backends.c.memory import align_up
from edgeopt.passes import Context, PassManager
from edgeopt.passes.calib import load_calibration

pytestmark = pytest.mark.mcu

DIGITS = Path(__file__).resolve().parents[2] / "examples" / "digits"
PREFIX = "net"
SECTION = ".edgeopt.weights"
ALIGN = 16  # NET_ALIGN's default
N_IMAGES = 6
HOST_CFLAGS = ["-std=c99", "-O2", "-Wall", "-Wextra", "-Wpedantic", "-Werror"]

# case -> (digits model, pipeline, kernels the case must exercise)
CASES = {
    "cnn-float": ("cnn", "", {"eo_conv_f32", "eo_maxpool_f32", "eo_fc_f32"}),
    "cnn-int8": ("cnn", "quant:int8", {"eo_conv_s8", "eo_maxpool_s8", "eo_fc_s8"}),
    "mobilenetv2-float": ("mobilenetv2", "", {"eo_depthwise_conv_f32", "eo_add_f32"}),
    "mobilenetv2-int8": ("mobilenetv2", "quant:int8",
                         {"eo_depthwise_conv_s8", "eo_add_s8", "eo_mean_hw_s8"}),
    "cnn-int8-csr": ("cnn", "sparsify:0.8,quant:int8,csr", {"eo_conv_s8_csr", "eo_fc_s8_csr"}),
}

# eo_test_run over the float wrapper: the generated one is renamed inside this unit only.
F32_SHIM = f"""\
#define eo_test_run eo_test_run_plain
#include "{PREFIX}_test.c"
#undef eo_test_run
int eo_test_run(const void *in, size_t in_bytes, void *out, size_t out_bytes)
{{
    return eo_test_run_as(in, in_bytes, out, out_bytes, 1);
}}
"""


@dataclass
class Built:
    """One emitted library, built for the host and (twice) for the MCU."""

    case: str
    report: dict
    header: str
    host: Path  # prog IN OUT [f32]
    elf: Path  # eo_test_run = net_invoke
    elf_f32: Path  # eo_test_run = net_invoke_f32
    work: Path


@pytest.fixture(scope="module")
def tc() -> mcu.Toolchain:
    found = require_toolchain()
    if shutil.which("gcc") is None:
        pytest.skip("mcu: needs the host gcc to compare with")
    return found


def _prepared(name: str, spec: str) -> ir.Model:
    model = ir.load(DIGITS / f"{name}.onnx")
    if spec:
        ctx = Context(calib=load_calibration(str(DIGITS / "calib.npz"), model))
        PassManager(spec, verify="end").run(model, ctx)
    return model


@pytest.fixture(scope="module", params=list(CASES))
def built(request, tc, tmp_path_factory) -> Built:
    name, spec, _ = CASES[request.param]
    work = tmp_path_factory.mktemp(request.param)
    src = work / "src"
    report = emit_c(_prepared(name, spec), str(src), prefix=PREFIX).report
    sources = sorted(src.glob("*.c"))
    host = work / "host"
    subprocess.run(["gcc", *HOST_CFLAGS, f"-D{PREFIX.upper()}_TEST_MAIN", f"-I{src}",
                    *map(str, sources), "-o", str(host), "-lm"],
                   check=True, capture_output=True, text=True)
    section = {f"{PREFIX.upper()}_WEIGHTS_SECTION": f'__attribute__((section("{SECTION}")))'}
    elf = mcu.build(sources, [src], work, defines=section, cflags=["-Wpedantic"], name="app")
    shim = work / "f32_shim.c"
    shim.write_text(F32_SHIM)
    library = [s for s in sources if s.name != f"{PREFIX}_test.c"]
    elf_f32 = mcu.build([*library, shim], [src], work, defines=section, cflags=["-Wpedantic"],
                        name="app_f32")
    header = (src / f"{PREFIX}_model.h").read_text()
    return Built(request.param, report, header, host, elf, elf_f32, work)


def _images() -> np.ndarray:
    """NHWC float32 test images; the last one scaled to saturate."""
    with np.load(DIGITS / "digits_16x16.npz") as d:
        x = d["test_x"][:N_IMAGES].astype(np.float32).transpose(0, 2, 3, 1).copy()
    x[-1] *= 8.0
    return x


def _api_input(report: dict, x: np.ndarray) -> bytes:
    """One image as ``net_invoke`` takes it: int8 (quantized with the report's scale and
    zero point) or float32."""
    spec = report["inputs"][0]
    assert spec["layout"] == "nhwc" and list(x.shape) == spec["shape"][1:]
    if spec["type"] == "int8_t":
        q = np.round(x / spec["scale"]) + spec["zero_point"]
        return np.clip(q, -128, 127).astype(np.int8).tobytes()
    return x.astype(np.float32).tobytes()


def _host_run(b: Built, data: bytes, as_float: bool) -> bytes:
    (b.work / "in.bin").write_bytes(data)
    subprocess.run([str(b.host), str(b.work / "in.bin"), str(b.work / "out.bin"),
                    *(["f32"] if as_float else [])], check=True)
    return (b.work / "out.bin").read_bytes()


def _output_dtype(report: dict) -> type:
    return np.int8 if report["outputs"][0]["type"] == "int8_t" else np.float32


def test_case_runs_the_kernels_it_is_meant_to_test(built):
    kernels = {layer["kernel"] for layer in built.report["layers"]}
    assert CASES[built.case][2] <= kernels


def test_invoke_is_bit_exact_with_host(built):
    n_out = int(np.prod(built.report["outputs"][0]["shape"]))
    for i, x in enumerate(_images()):
        data = _api_input(built.report, x)
        want = _host_run(built, data, as_float=False)
        got = mcu.run(built.elf, data)
        assert len(want) == n_out * np.dtype(_output_dtype(built.report)).itemsize
        assert got == want, (
            f"image {i}: MCU {np.frombuffer(got, _output_dtype(built.report))} != host "
            f"{np.frombuffer(want, _output_dtype(built.report))}")


def test_invoke_f32_matches_host(built):
    for i, x in enumerate(_images()):
        data = x.astype(np.float32).tobytes()
        want = np.frombuffer(_host_run(built, data, as_float=True), np.float32)
        got = np.frombuffer(mcu.run(built.elf_f32, data), np.float32)
        assert got.shape == want.shape
        span = float(np.abs(want).max())
        assert np.abs(got - want).max() <= 1e-5 * span, f"image {i}: {got} != {want}"


def test_weights_section_holds_exactly_the_reported_constants(built):
    sections = mcu.size(built.elf)["sections"]
    sec = sections[".edgeopt"]
    assert (sec["flash"], sec["ram"]) == (sec["size"], 0)
    start, end = sec["addr"], sec["addr"] + sec["size"]
    inside = sorted((s.addr, name, s.size) for name, s in mcu.symbols(built.elf).items()
                    if start <= s.addr < end)
    constants = {c["name"]: c["bytes"] for c in built.report["constants"]}
    assert {name: size for _, name, size in inside} == constants
    assert sum(constants.values()) == built.report["flash_bytes"]
    assert all(addr % ALIGN == 0 for addr, _, _ in inside)
    # Packed back to back at 16-byte boundaries: the only overhead is the padding after every
    # constant but the last (8 bytes on the dense models here, 123 with CSR's odd-sized arrays).
    padding = sum(align_up(size, ALIGN) - size for _, _, size in inside[:-1])
    assert sec["size"] == built.report["flash_bytes"] + padding
    assert padding < ALIGN * len(inside)


def _header_macro(header: str, name: str) -> int:
    return int(re.search(rf"^#define {PREFIX.upper()}_{name} (\d+)u", header, re.M).group(1))


def test_only_the_arena_is_in_ram_and_it_has_the_header_size(built):
    arena = built.report["arena"]
    quantized = "ARENA_SIZE_F32" in built.header
    assert _header_macro(built.header, "ARENA_SIZE") == arena["size"]
    size = _header_macro(built.header, "ARENA_SIZE_F32") if quantized else arena["size"]
    assert size == arena["size_f32"] >= arena["size"]
    ram_lo, ram_hi = mcu.RAM[0], mcu.RAM[0] + mcu.RAM[1]
    in_ram = {name: s for name, s in mcu.symbols(built.elf).items()
              if name.startswith(PREFIX + "_") and ram_lo <= s.addr < ram_hi}
    assert list(in_ram) == [f"{PREFIX}_test_arena"]
    symbol = in_ram[f"{PREFIX}_test_arena"]
    assert symbol.size == size + 1  # <p>_test.c allocates SIZE + 1u
    assert symbol.addr % ALIGN == 0
    bss = mcu.size(built.elf)["sections"][".bss"]
    assert bss["addr"] <= symbol.addr < bss["addr"] + bss["size"]
