"""The C backend on the digits models: flash, arena plans, speed vs ORT, Cortex-M4 instructions.

For ``cnn``, ``resnet``, ``mobilenetv2`` and ``mlp`` (``examples/digits``), float and
``quant:int8`` (calibrated on ``calib.npz``), :func:`~edgeopt.backends.c.emit_c` writes the
library (prefix ``net``) and this prints two markdown tables.

Memory (bytes):

- ``flash``: the report's ``flash_bytes`` (every constant array; code not included);
- ``arena``: ``NET_ARENA_SIZE`` (``net_invoke``: inputs and outputs are the caller's buffers),
  next to its ``lower bound`` (the most bytes live at one step), the ``naive`` sum of every
  buffer, and TFLite Micro's ``GreedyMemoryPlanner`` (largest first, no in-place reuse:
  :func:`~edgeopt.backends.c.memory.greedy_by_size`) on the same buffers, which
  :func:`~edgeopt.backends.c.emit.liveness` builds from the lowered program;
- ``f32 API arena``: ``NET_ARENA_SIZE_F32`` (``net_invoke_f32`` keeps the int8 input and
  output copies in the arena).

Speed, one test image (the first of ``digits_16x16.npz``):

- ``C host``: ``net_invoke_f32`` (float in and out, as ONNX Runtime is called) compiled with
  ``gcc -std=c99 -O2`` in a small timing driver: ``--warmup`` calls, then the median of
  ``--runs`` calls timed one by one with ``clock_gettime(CLOCK_MONOTONIC)``;
- ``ORT``: ``InferenceSession.run`` on the same model (the QDQ model for int8; default graph
  optimizations, ``intra_op_num_threads = inter_op_num_threads = 1``), the median of
  ``--runs`` timed calls from Python after the same warm-up (includes a few microseconds of
  Python call overhead);
- ``M4 instructions``: ``net_invoke`` (int8 API for int8 models) on a Cortex-M4F, compiled with
  :mod:`edgeopt.backends.c.mcu` (``arm-none-eabi-gcc -O2``), run under
  ``qemu-system-arm -icount shift=0`` (+-40 instructions); needs the toolchain, else ``-``.

The C and ORT outputs of the timed image are checked to agree (same argmax).

Usage::

    python tools/bench/bench_c.py [--runs 200] [--warmup 20] [--models cnn,mlp] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from edgeopt import ir
from edgeopt.backends.c import _prepare, emit_c, mcu
from edgeopt.backends.c.emit import liveness
from edgeopt.backends.c.lower import lower
from edgeopt.backends.c.memory import greedy_by_size, plan
from edgeopt.backends.c.rules import register_all
from edgeopt.passes import Context, PassManager
from edgeopt.passes.calib import load_calibration
from edgeopt.tools._files import write_text_atomic

DIGITS = Path(__file__).resolve().parents[2] / "examples" / "digits"
MODELS = ("cnn", "resnet", "mobilenetv2", "mlp")
MODES = {"float": "", "int8": "quant:int8"}
PREFIX = "net"
HOST_CFLAGS = ("-std=c99", "-O2", "-Wall", "-Wextra", "-Werror", "-D_POSIX_C_SOURCE=199309L")

MEMORY_COLUMNS = ("model", "mode", "flash", "arena", "lower bound", "naive", "TFLM greedy",
                  "arena/lower", "f32 API arena")
SPEED_COLUMNS = ("model", "mode", "MACs", "C host us", "ORT us", "C/ORT", "M4 instructions",
                 "instr/MAC")

# Times net_invoke_f32 on one float input: argv IN OUT RUNS WARMUP; prints one ns per line.
DRIVER = """\
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include "net_model.h"

#ifdef NET_ARENA_SIZE_F32
#define ARENA_BYTES NET_ARENA_SIZE_F32
#else
#define ARENA_BYTES NET_ARENA_SIZE
#endif

static uint8_t arena[ARENA_BYTES + 1u] NET_ALIGNED;
static float in[NET_INPUT0_SIZE], out[NET_OUTPUT0_SIZE];

static long long now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

int main(int argc, char **argv)
{
    FILE *f;
    int i, runs, warmup;
    if (argc != 5 || !(f = fopen(argv[1], "rb")))
        return 2;
    if (fread(in, sizeof in, 1, f) != 1)
        return 3;
    fclose(f);
    runs = atoi(argv[3]);
    warmup = atoi(argv[4]);
    for (i = 0; i < warmup; ++i)
        if (net_invoke_f32(in, out, arena) != NET_OK)
            return 4;
    for (i = 0; i < runs; ++i) {
        long long t0 = now_ns();
        net_invoke_f32(in, out, arena);
        printf("%lld\\n", now_ns() - t0);
    }
    if (!(f = fopen(argv[2], "wb")) || fwrite(out, sizeof out, 1, f) != 1)
        return 5;
    fclose(f);
    return 0;
}
"""


def prepared(name: str, spec: str) -> ir.Model:
    """A digits model after ``spec`` (calibrated on ``calib.npz``)."""
    model = ir.load(DIGITS / f"{name}.onnx")
    if spec:
        ctx = Context(calib=load_calibration(str(DIGITS / "calib.npz"), model))
        PassManager(spec, verify="end").run(model, ctx)
    return model


def image() -> np.ndarray:
    """The first test image, NCHW float32 [1, 1, 16, 16]."""
    with np.load(DIGITS / "digits_16x16.npz") as d:
        return d["test_x"][:1].astype(np.float32)


def memory_row(model: ir.Model, report: dict[str, Any]) -> dict[str, Any]:
    """The arena plans of ``net_invoke`` on the emitter's own buffers."""
    program = lower(_prepare(model), PREFIX, register_all())
    buffers = liveness(program, False)
    ours = plan(buffers)
    tflm = greedy_by_size([replace(b, inplace_of=None) for b in buffers])
    arena = report["arena"]
    assert ours.arena_size == arena["size"], "the lowering here differs from emit_c's"
    return {"flash": report["flash_bytes"], "arena": arena["size"],
            "lower bound": arena["lower_bound"], "naive": arena["naive"],
            "TFLM greedy": tflm.arena_size,
            "arena/lower": round(arena["size"] / max(arena["lower_bound"], 1), 3),
            "f32 API arena": arena["size_f32"]}


def time_c(src: Path, x_nhwc: np.ndarray, runs: int, warmup: int) -> tuple[float, np.ndarray]:
    """Median microseconds of ``net_invoke_f32`` on the host, and its output."""
    driver = src.parent / "driver.c"
    driver.write_text(DRIVER)
    library = [str(p) for p in sorted(src.glob("*.c")) if p.name != f"{PREFIX}_test.c"]
    exe = src.parent / "driver"
    subprocess.run(["gcc", *HOST_CFLAGS, f"-I{src}", *library, str(driver), "-o", str(exe),
                    "-lm"], check=True, capture_output=True, text=True)
    (src.parent / "in.bin").write_bytes(x_nhwc.astype(np.float32).tobytes())
    proc = subprocess.run([str(exe), str(src.parent / "in.bin"), str(src.parent / "out.bin"),
                           str(runs), str(warmup)], check=True, capture_output=True, text=True)
    ns = [int(line) for line in proc.stdout.split()]
    return statistics.median(ns) / 1e3, np.fromfile(src.parent / "out.bin", np.float32)


def time_ort(model: ir.Model, x: np.ndarray, runs: int, warmup: int) -> tuple[float, np.ndarray]:
    """Median microseconds of one ``InferenceSession.run`` (1 thread), and its output."""
    import onnxruntime

    so = onnxruntime.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    sess = onnxruntime.InferenceSession(ir.to_proto(model).SerializeToString(), so,
                                        providers=["CPUExecutionProvider"])
    feed = {sess.get_inputs()[0].name: x}
    for _ in range(warmup):
        sess.run(None, feed)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter_ns()
        sess.run(None, feed)
        times.append(time.perf_counter_ns() - t0)
    return statistics.median(times) / 1e3, sess.run(None, feed)[0].ravel()


def mcu_instructions(src: Path, report: dict[str, Any], x_nhwc: np.ndarray) -> int | None:
    """Instructions of one ``net_invoke`` on the Cortex-M4F (None without the toolchain)."""
    if mcu.toolchain() is None:
        return None
    elf = mcu.build(sorted(src.glob("*.c")), [src], src.parent / "mcu")
    spec = report["inputs"][0]
    if spec["type"] == "int8_t":
        q = np.round(x_nhwc / spec["scale"]) + spec["zero_point"]
        data = np.clip(q, -128, 127).astype(np.int8).tobytes()
    else:
        data = x_nhwc.astype(np.float32).tobytes()
    return mcu.run_detailed(elf, data, icount=True).instructions


def measure(name: str, mode: str, work: Path, runs: int, warmup: int) -> dict[str, Any]:
    """Every figure of one model and mode."""
    model = prepared(name, MODES[mode])
    src = work / f"{name}-{mode}" / "src"
    report = emit_c(model, str(src), prefix=PREFIX).report
    x = image()
    x_nhwc = x.transpose(0, 2, 3, 1)
    c_us, c_out = time_c(src, x_nhwc, runs, warmup)
    ort_us, ort_out = time_ort(model, x, runs, warmup)
    if c_out.argmax() != ort_out.argmax():
        raise RuntimeError(f"{name} {mode}: C predicts {c_out.argmax()}, ORT {ort_out.argmax()}")
    insns = mcu_instructions(src, report, x_nhwc)
    macs = report["macs"]
    return {"model": name, "mode": mode, **memory_row(model, report), "MACs": macs,
            "C host us": round(c_us, 1), "ORT us": round(ort_us, 1),
            "C/ORT": round(c_us / ort_us, 2), "M4 instructions": insns,
            "instr/MAC": None if insns is None else round(insns / macs, 2)}


def table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    """A markdown table (integers with thousands separators, None as ``-``)."""
    def cell(v: Any) -> str:
        if v is None:
            return "-"
        return f"{v:,}" if isinstance(v, int) else str(v)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r[c]) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=200, help="timed calls per measurement")
    ap.add_argument("--warmup", type=int, default=20, help="untimed calls first")
    ap.add_argument("--models", default=",".join(MODELS), help="comma-separated digits models")
    ap.add_argument("--json", help="also write the rows here")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="edgeopt-bench-c-") as tmp:
        rows = [measure(name, mode, Path(tmp), args.runs, args.warmup)
                for name in args.models.split(",") for mode in MODES]
    print(table(rows, MEMORY_COLUMNS))
    print()
    print(table(rows, SPEED_COLUMNS))
    if mcu.toolchain() is None:
        print(f"\nM4 instructions skipped: {mcu.toolchain_missing_reason()}")
    if args.json:
        write_text_atomic(args.json, json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
