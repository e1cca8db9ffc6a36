"""Test accuracy of the digits models after ``prune`` with each recovery mode.

    python tools/bench/bench_prune_accuracy.py [--models cnn,resnet] [--ratios 0.3,0.5]
        [--modes off,bias,lsq,lsq+scope=global] [--importance auto]

Each model in ``examples/digits`` is pruned (``prune:RATIO,recover=MODE``, where a mode may add
``+``-separated options: ``lsq+scope=global+steps=3``) with the 256 bundled calibration images,
then evaluated in ONNX Runtime on the 360-image test split. Prints one markdown row per
(ratio, model): accuracy per mode, then the parameter reduction theta of the ``lsq`` modes.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import onnxruntime as ort

from edgeopt import ir
from edgeopt.passes import Context, PassManager
from edgeopt.passes.calib import load_calibration

DIGITS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "examples", "digits")


def accuracy(model: ir.Model, x: np.ndarray, y: np.ndarray) -> float:
    """Top-1 accuracy (%) of a model on the test split."""
    sess = ort.InferenceSession(ir.to_proto(model).SerializeToString(),
                                providers=["CPUExecutionProvider"])
    out = sess.run(None, {sess.get_inputs()[0].name: x})[0]
    return 100 * float((out.argmax(1) == y).mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="cnn,resnet,mobilenetv2,mlp")
    ap.add_argument("--ratios", default="0.3,0.5,0.6,0.7")
    ap.add_argument("--modes", default="off,bias,lsq,lsq+steps=3,lsq+scope=global,"
                                       "lsq+scope=global+steps=3")
    ap.add_argument("--importance", default="auto")
    args = ap.parse_args()
    with np.load(os.path.join(DIGITS, "digits_16x16.npz")) as data:
        x, y = data["test_x"].astype(np.float32), data["test_y"]
    modes = args.modes.split(",")
    thetas = [m for m in modes if m.startswith("lsq")]
    print("| ratio | model | unpruned | " + " | ".join(modes) + "".join(
        f" | theta {m}" for m in thetas) + " | seconds (" + ", ".join(modes) + ") |")
    print("|---" * (4 + len(modes) + len(thetas)) + "|")
    for ratio in (float(r) for r in args.ratios.split(",")):
        for name in args.models.split(","):
            path = os.path.join(DIGITS, name + ".onnx")
            cells, times, theta = [], [], []
            for mode in modes:
                model = ir.load(path)
                ctx = Context(calib=load_calibration(os.path.join(DIGITS, "calib.npz"), model))
                recover, *extra = mode.split("+")
                spec = ",".join([f"prune:{ratio}", f"recover={recover}",
                                 f"importance={args.importance}", *extra])
                t0 = time.perf_counter()
                report = PassManager(spec, verify="none").run(model, ctx)
                times.append(f"{time.perf_counter() - t0:.1f}")
                cells.append(f"{accuracy(model, x, y):.2f}")
                if mode in thetas:
                    theta.append(f"{report.stat('theta'):.2f}")
            base = accuracy(ir.load(path), x, y)
            print(f"| {ratio} | {name} | {base:.2f} | " + " | ".join(cells + theta) +
                  f" | {', '.join(times)} |", flush=True)


if __name__ == "__main__":
    main()
