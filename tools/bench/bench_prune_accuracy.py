"""Test accuracy of the digits models after ``prune`` with each recovery mode.

    python tools/bench/bench_prune_accuracy.py [--models cnn,resnet] [--ratios 0.3,0.5]
        [--modes off,bias,lsq,lsq+scope=global] [--importance auto] [--extra]

Each model in ``examples/digits`` is pruned (``prune:RATIO,recover=MODE``, where a mode may add
``+``-separated options: ``lsq+scope=global+steps=3``) with the 256 bundled calibration images,
then evaluated in ONNX Runtime on the 360-image test split. Prints one markdown row per
(ratio, model): accuracy per mode, then the parameter reduction theta of the ``lsq`` modes.

``--extra`` adds, per mode, two measures on the 1181 training images that are not
calibration images (seen in training, never by the recovery; a larger and less noisy split
than the test one): the accuracy, and the KL divergence of the pruned model's softmax from
the unpruned model's (needs what ``tools/train_digits.py`` needs: scikit-learn, torch).
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


def logits(model: ir.Model, x: np.ndarray) -> np.ndarray:
    """The model's output on ``x`` in ONNX Runtime."""
    sess = ort.InferenceSession(ir.to_proto(model).SerializeToString(),
                                providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def accuracy(model: ir.Model, x: np.ndarray, y: np.ndarray) -> float:
    """Top-1 accuracy (%) of a model on the test split."""
    return 100 * float((logits(model, x).argmax(1) == y).mean())


def kl_divergence(ref: np.ndarray, out: np.ndarray) -> float:
    """Mean KL(softmax(ref) || softmax(out)) over the rows."""
    def log_softmax(z: np.ndarray) -> np.ndarray:
        z = z.astype(np.float64) - z.max(axis=1, keepdims=True)
        return z - np.log(np.exp(z).sum(axis=1, keepdims=True))

    lp, lq = log_softmax(ref), log_softmax(out)
    return float((np.exp(lp) * (lp - lq)).sum(axis=1).mean())


def extra_images() -> tuple[np.ndarray, np.ndarray]:
    """The training images that are not calibration images, and their labels.

    Rebuilt from scikit-learn's digits by the training script (which imports torch).
    """
    from edgeopt.tools.train_digits import N_CALIB, load_data

    data = load_data()
    return data.train_x[N_CALIB:].astype(np.float32), data.train_y[N_CALIB:]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="cnn,resnet,mobilenetv2,mlp")
    ap.add_argument("--ratios", default="0.3,0.5,0.6,0.7")
    ap.add_argument("--modes", default="off,bias,lsq,lsq+steps=3,lsq+scope=global,"
                                       "lsq+scope=global+steps=3,lsq+sequential=true,"
                                       "lsq+scope=global+sequential=true")
    ap.add_argument("--importance", default="auto")
    ap.add_argument("--extra", action="store_true",
                    help="also accuracy and KL to the unpruned model on the 1181 other "
                         "training images")
    args = ap.parse_args()
    with np.load(os.path.join(DIGITS, "digits_16x16.npz")) as data:
        x, y = data["test_x"].astype(np.float32), data["test_y"]
    modes = args.modes.split(",")
    thetas = [m for m in modes if m.startswith("lsq")]
    extra = [f" | {k} {m}" for m in modes for k in ("extra", "KL")] if args.extra else []
    xe, ye = extra_images() if args.extra else (None, None)
    print("| ratio | model | unpruned | " + " | ".join(modes) + "".join(
        f" | theta {m}" for m in thetas) + "".join(extra) + " | seconds (" + ", ".join(modes)
        + ") |")
    print("|---" * (4 + len(modes) + len(thetas) + len(extra)) + "|")
    for ratio in (float(r) for r in args.ratios.split(",")):
        for name in args.models.split(","):
            path = os.path.join(DIGITS, name + ".onnx")
            cells, times, theta, more = [], [], [], []
            ref = None if xe is None else logits(ir.load(path), xe)
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
                if xe is not None:
                    out = logits(model, xe)
                    more += [f"{100 * float((out.argmax(1) == ye).mean()):.2f}",
                             f"{kl_divergence(ref, out):.4f}"]
            base = accuracy(ir.load(path), x, y)
            print(f"| {ratio} | {name} | {base:.2f} | " + " | ".join(cells + theta + more) +
                  f" | {', '.join(times)} |", flush=True)


if __name__ == "__main__":
    main()
