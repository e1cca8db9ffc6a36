"""The Cortex-M4F/QEMU test bench (``edgeopt.backends.c.mcu``), on a hand-written program.

One image serves every test: the first input word picks a behaviour (compute, fail, fault, hang,
count). Skips, loudly, only when the cross toolchain or QEMU is not installed.
"""

from __future__ import annotations

import re
import struct
import subprocess
import time

import numpy as np
import pytest
from mcu_toolchain import require_toolchain

from edgeopt.backends.c import mcu

pytestmark = pytest.mark.mcu

MODE_COMPUTE, MODE_FAIL, MODE_LOAD, MODE_UNDEF, MODE_HANG, MODE_LOOP = range(6)
WEIGHTS = np.zeros(1000, np.int8)
WEIGHTS[:3] = [1, -2, 3]
ARENA_BYTES = 4096
COUNTER_INIT = 12345

PROGRAM = r"""
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#define N_WEIGHTS 1000
#define ARENA_BYTES 4096

/* A constant in the emitter's flash section, a zero-initialised arena, an initialised global. */
__attribute__((section(".edgeopt.weights"), aligned(16)))
const int8_t test_weights[N_WEIGHTS] = {1, -2, 3};
static int8_t test_arena[ARENA_BYTES] __attribute__((aligned(16)));
int32_t test_counter = 12345;

static int8_t sat8(int32_t v)
{
    return (int8_t)(v > 127 ? 127 : v < -128 ? -128 : v);
}

/* in: n, float x[n], float y[n], int8 a[m], int8 b[m]
   out: int32 counter, uint32 arena nonzero bytes, float sum(x), float dot(x, y),
        int8 sat(a + b + w), int8 sat((a * b + 64) >> 7)                                  */
static int compute(const uint8_t *p, size_t n_bytes, uint8_t *out, size_t out_bytes)
{
    uint32_t n;
    memcpy(&n, p, 4);
    p += 4;
    n_bytes -= 4;
    if (n_bytes < 8u * n || (n_bytes - 8u * n) % 2u != 0)
        return -3;
    size_t m = (n_bytes - 8u * n) / 2u;
    if (m > ARENA_BYTES || out_bytes < 16u + 2u * m)
        return -4;
    uint32_t nonzero = 0;
    for (size_t i = 0; i < ARENA_BYTES; i++)
        nonzero += test_arena[i] != 0;
    float sum = 0.0f, dot = 0.0f;
    for (uint32_t i = 0; i < n; i++) {
        float x, y;
        memcpy(&x, p + 4u * i, 4);
        memcpy(&y, p + 4u * (n + i), 4);
        sum += x;
        dot += x * y;
    }
    const int8_t *a = (const int8_t *)(p + 8u * n), *b = a + m;
    int8_t *add = (int8_t *)out + 16, *mul = add + m;
    for (size_t i = 0; i < m; i++) {
        test_arena[i] = sat8(a[i] + b[i] + test_weights[i % N_WEIGHTS]);
        mul[i] = sat8((a[i] * b[i] + 64) >> 7);
    }
    memcpy(add, test_arena, m);
    int32_t counter = test_counter++;
    memcpy(out, &counter, 4);
    memcpy(out + 4, &nonzero, 4);
    memcpy(out + 8, &sum, 4);
    memcpy(out + 12, &dot, 4);
    return (int)(16u + 2u * m);
}

int eo_test_run(const void *in, size_t in_bytes, void *out, size_t out_bytes)
{
    uint32_t mode, arg;
    if (in_bytes < 8)
        return -1;
    memcpy(&mode, in, 4);
    memcpy(&arg, (const uint8_t *)in + 4, 4);
    switch (mode) {
    case 0:
        return compute((const uint8_t *)in + 8, in_bytes - 8, out, out_bytes);
    case 1:
        return -(int)arg;
    case 2:
        return *(volatile int32_t *)(uintptr_t)arg;
    case 3:
        __asm__ volatile("udf #0");
        return 0;
    case 4:
        for (;;) {
        }
    case 5:
        /* exactly two instructions per iteration */
        __asm__ volatile("1: subs %0, %0, #1\n\tbne 1b" : "+r"(arg) : : "cc");
        return 0;
    }
    return -2;
}
"""

MAIN_RETURNS_42 = "int main(void) { return 42; }\n"


@pytest.fixture(scope="module")
def tc() -> mcu.Toolchain:
    found = require_toolchain()
    return found


@pytest.fixture(scope="module")
def elf(tc, tmp_path_factory):
    src = tmp_path_factory.mktemp("src") / "program.c"
    src.write_text(PROGRAM)
    return mcu.build([src], out_dir=src.parent, cflags=["-Wpedantic"])


def _cmd(mode: int, arg: int = 0) -> bytes:
    return struct.pack("<II", mode, arg)


def _host_compute(x, y, a, b):
    """The program's arithmetic, float32 rounding after every operation as C99 does."""
    sum_, dot = np.float32(0), np.float32(0)
    for xi, yi in zip(x, y, strict=True):
        sum_ = np.float32(sum_ + xi)
        dot = np.float32(dot + np.float32(xi * yi))
    w = WEIGHTS[np.arange(len(a)) % len(WEIGHTS)].astype(np.int32)
    add = np.clip(a.astype(np.int32) + b + w, -128, 127).astype(np.int8)
    mul = np.clip((a.astype(np.int32) * b + 64) >> 7, -128, 127).astype(np.int8)
    head = struct.pack("<iI", COUNTER_INIT, 0) + sum_.tobytes() + dot.tobytes()
    return head + add.tobytes() + mul.tobytes()


def test_output_is_bit_exact_with_host(elf):
    rng = np.random.default_rng(0)
    n, m = 257, 1000
    x = rng.standard_normal(n).astype(np.float32) * np.float32(1e3)
    y = rng.standard_normal(n).astype(np.float32)
    x[:2], y[:2] = [-3e38, 3e38], [0.5, 0.25]  # near FLT_MAX, cancelling in the sum
    a = rng.integers(-128, 128, m).astype(np.int8)
    b = rng.integers(-128, 128, m).astype(np.int8)
    a[:4], b[:4] = [127, -128, -128, 127], [127, -128, 127, -128]  # saturation corners
    payload = struct.pack("<I", n) + x.tobytes() + y.tobytes() + a.tobytes() + b.tobytes()

    got = mcu.run(elf, _cmd(MODE_COMPUTE) + payload)

    assert got == _host_compute(x, y, a, b)


def test_main_return_value_is_qemu_exit_status(tc, tmp_path):
    src = tmp_path / "main42.c"
    src.write_text(MAIN_RETURNS_42)
    elf = mcu.build([src], out_dir=tmp_path, harness=False)
    with pytest.raises(mcu.McuRunError, match=r"exited with status 42 ") as info:
        mcu.run(elf, b"")
    assert info.value.returncode == 42


def test_negative_status_surfaces_with_harness_message(elf):
    with pytest.raises(mcu.McuRunError) as info:
        mcu.run(elf, _cmd(MODE_FAIL, 5))
    assert info.value.returncode == 13
    assert "eo_test_run failed with status -5" in str(info.value)
    assert "harness: eo_test_run returned a negative status" in str(info.value)


def test_missing_input_is_an_input_error(elf, tc, tmp_path):
    # Run QEMU by hand in an empty directory: the harness finds no eo_in.bin.
    proc = subprocess.run(
        [tc.qemu, *mcu.QEMU_ARGS, "-kernel", str(elf)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 10
    assert "cannot read input file: eo_in.bin" in proc.stderr


def test_bus_fault_is_reported_as_hardfault(elf):
    with pytest.raises(mcu.McuRunError) as info:
        mcu.run(elf, _cmd(MODE_LOAD, 0x3000_0000), timeout=30)
    msg = str(info.value)
    assert info.value.returncode == 243
    assert "fault: HardFault" in msg
    assert "edgeopt-mcu: fault: HardFault (exception 3) PRECISERR FORCED: pc=0x" in msg
    assert "BFAR=0x30000000" in msg


def test_undefined_instruction_is_reported(elf):
    with pytest.raises(mcu.McuRunError, match=r"HardFault \(exception 3\) UNDEFINSTR FORCED"):
        mcu.run(elf, _cmd(MODE_UNDEF), timeout=30)


def test_timeout_kills_qemu(elf):
    start = time.perf_counter()
    with pytest.raises(mcu.McuTimeout, match=r"timed out after 1.5 s") as info:
        mcu.run(elf, _cmd(MODE_HANG), timeout=1.5)
    assert time.perf_counter() - start < 10
    assert info.value.returncode is None


def test_icount_counts_instructions(elf):
    counts = [
        mcu.run_detailed(elf, _cmd(MODE_LOOP, n), icount=True).instructions
        for n in (1000, 101_000, 101_000)
    ]
    assert counts[1] == counts[2]  # deterministic
    # 2 instructions per iteration; the timer resolves 40 instructions.
    assert abs((counts[1] - counts[0]) - 200_000) <= 2 * mcu.INSNS_PER_TICK
    plain = mcu.run_detailed(elf, _cmd(MODE_LOOP, 1000))
    assert plain.instructions is None


def test_size_matches_linked_sections(elf, tc):
    report = mcu.size(elf)
    sections = report["sections"]
    berkeley = subprocess.run([tc.size, "-B", "-d", str(elf)], capture_output=True, text=True)
    text, data, _ = map(int, berkeley.stdout.splitlines()[1].split()[:3])
    assert report["flash"] == text + data  # Berkeley "data" also counts flash's .init_array
    assert report["ram"] == sections[".data"]["size"] + sections[".bss"]["size"]
    assert report["flash"] == sum(s["flash"] for s in sections.values())
    assert not any(name.startswith((".debug", ".comment")) for name in sections)

    syms = mcu.symbols(elf)
    weights, arena, counter = syms["test_weights"], syms["test_arena"], syms["test_counter"]
    assert (weights.size, arena.size, counter.size) == (len(WEIGHTS), ARENA_BYTES, 4)
    edgeopt = sections[".edgeopt"]
    assert edgeopt["addr"] <= weights.addr < edgeopt["addr"] + edgeopt["size"]
    assert weights.addr % 16 == 0 and arena.addr % 16 == 0
    assert edgeopt["flash"] >= len(WEIGHTS) and edgeopt["ram"] == 0
    bss_sec, data_sec = sections[".bss"], sections[".data"]
    assert bss_sec["addr"] <= arena.addr < bss_sec["addr"] + bss_sec["size"]
    assert (bss_sec["flash"], bss_sec["ram"]) == (0, bss_sec["size"])
    assert (data_sec["flash"], data_sec["ram"]) == (data_sec["size"], data_sec["size"])
    assert data_sec["addr"] <= counter.addr < data_sec["addr"] + data_sec["size"]


def test_unplaced_section_fails_the_link(tc, tmp_path):
    src = tmp_path / "orphan.c"
    src.write_text(
        "#include <stddef.h>\n"
        '__attribute__((section(".weights"))) const int w[4] = {1, 2, 3, 4};\n'
        "int eo_test_run(const void *in, size_t n, void *out, size_t out_n)\n"
        "{ (void)in; (void)n; (void)out; (void)out_n; return w[n & 3u]; }\n"
    )
    with pytest.raises(mcu.McuBuildError, match=r"orphan section `\.weights'"):
        mcu.build([src], out_dir=tmp_path)


def test_compiler_error_surfaces(tc, tmp_path):
    src = tmp_path / "bad.c"
    src.write_text("int eo_test_run(void) { int unused; return 0; }\n")
    with pytest.raises(mcu.McuBuildError, match=r"unused variable 'unused'.*-Werror"):
        mcu.build([src], out_dir=tmp_path)


def test_toolchain_reason_is_empty_when_found(tc):
    assert mcu.toolchain_missing_reason() == ""
    assert re.search(r"qemu-system-arm$", tc.qemu)
