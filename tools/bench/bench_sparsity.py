"""Unstructured sparsity on the digits models: accuracy, and what CSR packing saves.

    python tools/bench/bench_sparsity.py [--models cnn,resnet] [--ratios 0.5,0.9]
        [--modes magnitude,wanda,magnitude+refit=true] [--sizes-only]

Accuracy table: each model in ``examples/digits`` is sparsified (``sparsify:RATIO`` plus the
mode's ``+``-separated options; ``magnitude`` = the defaults) with the 256 bundled calibration
images, then evaluated in ONNX Runtime on the 360-image test split. Beside it, structured
channel pruning at the same parameter count: ``prune`` with ``target=params`` removing the
same fraction of all parameters as sparsify zeroed (``scope=global,steps=3``, least-squares
recovery: the best prune setting of the pruning table).

Size table (ratios 0.8 and 0.9, magnitude): the layer weights' dense bytes, their CSR bytes as
float32 (``sparsify,csr``) and as int8 (``sparsify,quant:int8,csr``), and the ONNX file sizes
written dense and with ``sparse_initializers``.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_prune_accuracy import DIGITS, accuracy

from edgeopt import ir
from edgeopt.passes import Context, PassManager
from edgeopt.passes._weights import layer_weights
from edgeopt.passes.calib import load_calibration

PRUNE = "scope=global,steps=3"


def run(name: str, spec: str) -> tuple[ir.Model, float]:
    """The model after ``spec`` (calibrated on the bundled images) and the seconds it took."""
    model = ir.load(os.path.join(DIGITS, name + ".onnx"))
    ctx = Context(calib=load_calibration(os.path.join(DIGITS, "calib.npz"), model))
    t0 = time.perf_counter()
    PassManager(spec, verify="none").run(model, ctx)
    return model, time.perf_counter() - t0


def nonzero_params(model: ir.Model) -> int:
    """Non-zero elements of every initializer (what a sparse format has to store)."""
    return sum(int(np.count_nonzero(v.const_value.numpy()))
               for g in [model.graph, *model.graph.subgraphs()]
               for v in g.initializers.values())


def weight_bytes(model: ir.Model) -> tuple[int, int]:
    """(dense, stored) bytes of the layer weights."""
    seen, dense, stored = set(), 0, 0
    for lw in layer_weights(model):
        if id(lw.value) not in seen:
            seen.add(id(lw.value))
            t = lw.value.const_value
            dense += t.nbytes
            stored += getattr(t, "stored_nbytes", t.nbytes)
    return dense, stored


def accuracy_table(models: list[str], ratios: list[float], modes: list[str],
                   x: np.ndarray, y: np.ndarray) -> None:
    print("| sparsity | model | dense | " + " | ".join(modes)
          + " | prune (same params) | params kept | seconds (" + ", ".join(modes) + ") |")
    print("|---" * (6 + len(modes)) + "|")
    for ratio in ratios:
        for name in models:
            base = ir.load(os.path.join(DIGITS, name + ".onnx"))
            total = sum(v.const_value.size for v in base.graph.initializers.values())
            cells, times, kept = [], [], 0
            for mode in modes:
                _, *extra = mode.split("+")
                model, secs = run(name, ",".join([f"sparsify:{ratio}", *extra]))
                cells.append(f"{accuracy(model, x, y):.2f}")
                times.append(f"{secs:.1f}")
                kept = nonzero_params(model)
            pruned, _ = run(name, f"prune:{1 - kept / total:.4f},target=params,{PRUNE}")
            print(f"| {ratio} | {name} | {accuracy(base, x, y):.2f} | " + " | ".join(cells)
                  + f" | {accuracy(pruned, x, y):.2f} ({pruned_params(pruned):,}) "
                  f"| {kept:,} / {total:,} | {', '.join(times)} |", flush=True)


def pruned_params(model: ir.Model) -> int:
    return sum(v.const_value.size for v in model.graph.initializers.values())


def size_table(models: list[str], ratios: list[float]) -> None:
    print("| sparsity | model | weights dense | CSR float32 | x dense | CSR int8 | x int8 dense "
          "| ONNX dense | ONNX sparse_initializers | int8 ONNX dense | int8 ONNX sparse |")
    print("|---" * 11 + "|")
    with tempfile.TemporaryDirectory() as tmp:
        for ratio in ratios:
            for name in models:
                f32, _ = run(name, f"sparsify:{ratio},csr:0")
                q8, _ = run(name, f"sparsify:{ratio},quant:int8,csr:0")
                (d32, s32), (d8, s8) = weight_bytes(f32), weight_bytes(q8)
                files = []
                for model in (f32, q8):
                    for sparse in (False, True):
                        path = os.path.join(tmp, "m.onnx")
                        ir.save(model, path, sparse_initializers=sparse)
                        files.append(f"{os.path.getsize(path):,}")
                print(f"| {ratio} | {name} | {d32:,} | {s32:,} | {s32 / d32:.3f} | {s8:,} | "
                      f"{s8 / d8:.3f} | " + " | ".join(files) + " |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="cnn,resnet,mobilenetv2,mlp")
    ap.add_argument("--ratios", default="0.5,0.7,0.8,0.9")
    ap.add_argument("--modes", default="magnitude,wanda+criterion=wanda,"
                                       "magnitude+refit=true,wanda+criterion=wanda+refit=true")
    ap.add_argument("--sizes-only", action="store_true")
    args = ap.parse_args()
    models = args.models.split(",")
    ratios = [float(r) for r in args.ratios.split(",")]
    if not args.sizes_only:
        with np.load(os.path.join(DIGITS, "digits_16x16.npz")) as data:
            x, y = data["test_x"].astype(np.float32), data["test_y"]
        accuracy_table(models, ratios, args.modes.split(","), x, y)
        print()
    size_table(models, [r for r in ratios if r >= 0.8] or ratios)


if __name__ == "__main__":
    main()
