"""Train and export the bundled example models (scikit-learn digits, upsampled to 16x16).

This is a fixture generator, not part of edgeopt: it is the only place in the project that
uses PyTorch, and neither the package nor the tests import it. The tests use only what it
writes (the ``.onnx`` models, the ``.npz`` data and ``accuracy.json``).

What it does, deterministically (fixed seeds, 2 CPU threads, deterministic algorithms):

1. Loads ``sklearn.datasets.load_digits`` (1797 grey 8x8 images, values 0..16), scales the
   pixels to [0, 1], upsamples to 16x16 with bilinear interpolation (half-pixel centres, the
   same as ``torch.nn.functional.interpolate(..., mode="bilinear", align_corners=False)``,
   done here in float64 NumPy) and normalizes with the fixed :data:`MEAN` / :data:`STD`.
2. Splits with a seeded permutation into train (1437 images) and test (360 images); the
   calibration set is 256 images taken from the train split.
3. Trains four models (``cnn``, ``resnet``, ``mobilenetv2``, ``mlp``) on CPU.
4. Exports each in eval mode to ONNX opset 17 (input ``input`` ``[N,1,16,16]``, output
   ``logits`` ``[N,10]``, batch dimension symbolic ``N``, BatchNormalization kept in the graph,
   weights as initializers, no external data), checks with ONNX Runtime that the file
   reproduces the PyTorch logits, and measures test accuracy with ONNX Runtime.

Outputs (in ``--out``): ``cnn.onnx``, ``resnet.onnx``, ``mobilenetv2.onnx``, ``mlp.onnx``,
``digits_16x16.npz`` (``calib_x``, ``calib_y``, ``test_x``, ``test_y``), ``calib.npz``
(``input`` = ``calib_x``, the format ``--calib`` accepts) and ``accuracy.json``.

Command line (needs ``torch`` (CPU build) and ``scikit-learn``)::

    python tools/train_digits.py --out examples/digits [--models cnn,mlp]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import random
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort
import torch
from sklearn.datasets import load_digits
from torch import nn

log = logging.getLogger("train_digits")

MEAN = 0.305  # mean of the [0, 1]-scaled, upsampled images over all 1797 digits (0.3053)
STD = 0.319  # their standard deviation (0.3189)
SEED = 0
N_TEST = 360
N_CALIB = 256
THREADS = 2
OPSET = 17
MODEL_NAMES = ("cnn", "resnet", "mobilenetv2", "mlp")


# --------------------------------------------------------------------------- data


def upsample_matrix(n_in: int = 8, factor: int = 2) -> np.ndarray:
    """The 1-D bilinear interpolation matrix with half-pixel centres and edge clamping.

    Args:
        n_in: Input length.
        factor: Integer upsampling factor.

    Returns:
        A float64 ``(n_in * factor, n_in)`` matrix ``A``; an image ``X`` upsamples to
        ``A @ X @ A.T``.
    """
    n_out = n_in * factor
    a = np.zeros((n_out, n_in))
    for i in range(n_out):
        src = (i + 0.5) / factor - 0.5
        k0 = int(np.floor(src))
        frac = src - k0
        a[i, min(max(k0, 0), n_in - 1)] += 1.0 - frac
        a[i, min(max(k0 + 1, 0), n_in - 1)] += frac
    return a


@dataclass(frozen=True)
class DigitsData:
    """The normalized 16x16 digits split into train, calibration and test."""

    train_x: np.ndarray  # (1437, 1, 16, 16) float32
    train_y: np.ndarray  # (1437,) int64
    calib_x: np.ndarray  # (256, 1, 16, 16) float32, a subset of train_x
    calib_y: np.ndarray
    test_x: np.ndarray  # (360, 1, 16, 16) float32
    test_y: np.ndarray


def load_data() -> DigitsData:
    """Load, upsample, normalize and split scikit-learn's digits (see the module docstring)."""
    digits = load_digits()
    images = digits.images.astype(np.float64) / 16.0
    a = upsample_matrix()
    up = np.einsum("ij,njk,lk->nil", a, images, a)
    x = ((up - MEAN) / STD).astype(np.float32)[:, None, :, :]
    y = digits.target.astype(np.int64)
    order = np.random.default_rng(SEED).permutation(len(y))
    test_idx, train_idx = order[:N_TEST], order[N_TEST:]
    calib_idx = train_idx[:N_CALIB]
    return DigitsData(
        train_x=x[train_idx], train_y=y[train_idx],
        calib_x=x[calib_idx], calib_y=y[calib_idx],
        test_x=x[test_idx], test_y=y[test_idx],
    )


# --------------------------------------------------------------------------- models


def conv_bn(c_in: int, c_out: int, k: int = 3, stride: int = 1, groups: int = 1) -> list[nn.Module]:
    """A bias-free Conv2d ('same' padding) followed by BatchNorm2d."""
    return [nn.Conv2d(c_in, c_out, k, stride, k // 2, groups=groups, bias=False),
            nn.BatchNorm2d(c_out)]


class PlainCNN(nn.Module):
    """Four Conv-BN-ReLU blocks with three MaxPools, then Flatten -> Linear -> ReLU -> Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            *conv_bn(1, 16), nn.ReLU(),                       # 16x16
            *conv_bn(16, 32), nn.ReLU(), nn.MaxPool2d(2),     # 8x8
            *conv_bn(32, 64), nn.ReLU(), nn.MaxPool2d(2),     # 4x4
            *conv_bn(64, 64), nn.ReLU(), nn.MaxPool2d(2),     # 2x2
        )
        # Flatten keeps a 2x2 spatial extent, so channel pruning must map 64 channels onto
        # 256 Linear input features.
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(64 * 2 * 2, 64), nn.ReLU(), nn.Linear(64, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 Conv-BN, residual Add, ReLU; 1x1 strided shortcut if needed."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1) -> None:
        super().__init__()
        self.body = nn.Sequential(
            *conv_bn(c_in, c_out, 3, stride), nn.ReLU(), *conv_bn(c_out, c_out))
        self.shortcut = (nn.Sequential(*conv_bn(c_in, c_out, 1, stride))
                         if stride != 1 or c_in != c_out else nn.Identity())
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.body(x) + self.shortcut(x))


class ResNetSmall(nn.Module):
    """Stem + three basic blocks (one with a 1x1 stride-2 downsample) + GAP -> Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(*conv_bn(1, 16), nn.ReLU())
        self.blocks = nn.Sequential(
            BasicBlock(16, 16), BasicBlock(16, 32, stride=2), BasicBlock(32, 32))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)))


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand - 3x3 depthwise - 1x1 linear project, Add if shapes match."""

    def __init__(self, c_in: int, c_out: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = c_in * expand
        self.body = nn.Sequential(
            *conv_bn(c_in, hidden, 1), nn.ReLU6(),
            *conv_bn(hidden, hidden, 3, stride, groups=hidden), nn.ReLU6(),
            *conv_bn(hidden, c_out, 1))
        self.residual = stride == 1 and c_in == c_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.body(x)
        return x + y if self.residual else y


class MobileNetV2Small(nn.Module):
    """Stem, five inverted residual blocks (expansion 4), 1x1 Conv 32->64, GAP -> Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(*conv_bn(1, 16), nn.ReLU6())
        self.blocks = nn.Sequential(
            InvertedResidual(16, 16, 1, 4),   # residual, 16x16
            InvertedResidual(16, 24, 2, 4),   # 8x8
            InvertedResidual(24, 24, 1, 4),   # residual
            InvertedResidual(24, 32, 2, 4),   # 4x4
            InvertedResidual(32, 32, 1, 4),   # residual
        )
        self.head = nn.Sequential(
            *conv_bn(32, 64, 1), nn.ReLU6(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)))


def make_mlp() -> nn.Module:
    """Flatten -> Linear 256 -> ReLU -> Linear 128 -> ReLU -> Linear 10."""
    return nn.Sequential(nn.Flatten(), nn.Linear(256, 256), nn.ReLU(),
                         nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 10))


@dataclass(frozen=True)
class Recipe:
    """How one model is built and trained."""

    build: Callable[[], nn.Module]
    summary: str  # one line for the README
    epochs: int = 40
    lr: float = 3e-3
    weight_decay: float = 1e-4


RECIPES: dict[str, Recipe] = {
    "cnn": Recipe(PlainCNN, "4x [Conv3x3-BN-ReLU] 16/32/64/64, MaxPool after convs 2-4, "
                  "Flatten(64x2x2) -> Linear 64 -> ReLU -> Linear 10"),
    "resnet": Recipe(ResNetSmall, "stem Conv3x3-BN-ReLU 16, BasicBlocks 16 -> 32 (stride 2, "
                     "1x1 Conv-BN shortcut) -> 32, residual Add, GlobalAveragePool -> Linear 10"),
    "mobilenetv2": Recipe(MobileNetV2Small, "stem Conv3x3-BN-ReLU6 16, 5 inverted residuals "
                          "(1x1 expand x4 - 3x3 depthwise - 1x1 project) 16/24/24/32/32, "
                          "Adds where shapes match, 1x1 Conv 64, GlobalAveragePool -> Linear 10"),
    "mlp": Recipe(make_mlp, "Flatten(256) -> Linear 256 -> ReLU -> Linear 128 -> ReLU -> "
                  "Linear 10"),
}


# --------------------------------------------------------------------------- training

BATCH = 64


def seed_everything(seed: int = SEED) -> None:
    """Seed every RNG the training touches and make PyTorch deterministic on 2 threads."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.set_num_threads(THREADS)
    torch.use_deterministic_algorithms(True)


def train(recipe: Recipe, data: DigitsData) -> nn.Module:
    """Train one model with AdamW and a one-cycle schedule; returns it in eval mode.

    Args:
        recipe: The model builder and hyperparameters.
        data: The digits split; only ``train_x``/``train_y`` are used.

    Returns:
        The trained module, switched to eval mode.
    """
    seed_everything()
    model = recipe.build()
    x, y = torch.from_numpy(data.train_x), torch.from_numpy(data.train_y)
    steps = -(-len(y) // BATCH)
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=recipe.lr, total_steps=recipe.epochs * steps)
    gen = torch.Generator().manual_seed(SEED)
    model.train()
    for _ in range(recipe.epochs):
        perm = torch.randperm(len(y), generator=gen)
        for i in range(0, len(y), BATCH):
            idx = perm[i:i + BATCH]
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()


# --------------------------------------------------------------------------- export + check


def export(model: nn.Module, path: str) -> None:
    """Export ``model`` (eval mode) to ONNX with the legacy TorchScript exporter.

    ``training=PRESERVE`` on an eval-mode model keeps BatchNormalization nodes: with
    ``TrainingMode.EVAL`` the exporter's eval peephole folds BN into the preceding Conv,
    and edgeopt's own fold-bn pass should be the one doing that on these fixtures.
    """
    if model.training:
        raise ValueError("export() needs a module in eval mode")
    with warnings.catch_warnings():
        # The legacy exporter's deprecation notice, and a constant-folding caveat that only
        # applies to modules in training mode (ours is in eval mode).
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export")
        warnings.filterwarnings("ignore", message=".*constant folding be turned off")
        torch.onnx.export(
            model, (torch.zeros(1, 1, 16, 16),), path, dynamo=False,
            input_names=["input"], output_names=["logits"],
            dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}},
            opset_version=OPSET, training=torch.onnx.TrainingMode.PRESERVE,
            do_constant_folding=True, export_params=True)
    proto = onnx.load(path)
    if materialize_identity_initializers(proto):
        onnx.save(proto, path)
    onnx.checker.check_model(proto, full_check=True)
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    n_bn_onnx = sum(n.op_type == "BatchNormalization" for n in proto.graph.node)
    if n_bn != n_bn_onnx:
        raise RuntimeError(f"{path}: {n_bn} BatchNorm2d modules but {n_bn_onnx} ONNX BN nodes")


def materialize_identity_initializers(proto: onnx.ModelProto) -> int:
    """Replace ``Identity(initializer)`` nodes by a copy of the initializer, in place.

    The exporter deduplicates initializers with equal contents and reads the duplicate through
    an Identity node. In ``resnet`` the biases of the two BatchNormalizations feeding the
    downsampling block's Add are bit-identical (they receive the same gradient), so one BN's
    bias would otherwise not be an initializer. The fixtures keep every weight an initializer.

    Returns:
        The number of Identity nodes replaced.
    """
    graph = proto.graph
    inits = {t.name: t for t in graph.initializer}
    outputs = {o.name for o in graph.output}
    keep, replaced = [], 0
    for node in graph.node:
        if node.op_type == "Identity" and node.input[0] in inits and node.output[0] not in outputs:
            copy = onnx.TensorProto()
            copy.CopyFrom(inits[node.input[0]])
            copy.name = node.output[0]
            graph.initializer.append(copy)
            replaced += 1
        else:
            keep.append(node)
    del graph.node[:]
    graph.node.extend(keep)
    return replaced


def ort_session(path: str) -> ort.InferenceSession:
    """A CPU ONNX Runtime session with the same settings as tests/test_examples.py."""
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = 1
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def check_and_score(model: nn.Module, path: str, data: DigitsData) -> dict[str, object]:
    """Compare ORT with PyTorch on the test split and score the ONNX model.

    Returns:
        The model's ``accuracy.json`` entry (accuracy from ONNX Runtime, not PyTorch).

    Raises:
        RuntimeError: If ORT's logits differ from PyTorch's by 1e-4 or more.
    """
    with torch.no_grad():
        ref = model(torch.from_numpy(data.test_x)).numpy()
    logits = ort_session(path).run(["logits"], {"input": data.test_x})[0]
    diff = float(np.abs(logits - ref).max())
    if diff >= 1e-4:
        raise RuntimeError(f"{path}: ORT differs from PyTorch by {diff:.3g}")
    pred = logits.argmax(axis=1)
    top2 = np.sort(logits, axis=1)[:, -2:]
    proto = onnx.load(path)
    ops: dict[str, int] = {}
    for node in proto.graph.node:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
    with open(path, "rb") as f:
        sha = hashlib.sha256(f.read()).hexdigest()
    return {
        "test_accuracy": round(float((pred == data.test_y).mean()), 6),
        "correct": int((pred == data.test_y).sum()),
        "n_test": len(data.test_y),
        "predictions": "".join(str(int(p)) for p in pred),
        "min_top2_margin": round(float((top2[:, 1] - top2[:, 0]).min()), 6),
        "max_abs_diff_vs_torch": diff,
        "params": sum(p.numel() for p in model.parameters()),
        "initializer_elements": sum(int(np.prod(t.dims)) for t in proto.graph.initializer),
        "file_bytes": os.path.getsize(path),
        "sha256": sha,
        "ops": dict(sorted(ops.items())),
    }


# --------------------------------------------------------------------------- outputs


def save_data(data: DigitsData, out: str) -> None:
    """Write ``digits_16x16.npz`` and ``calib.npz`` (float32, compressed)."""
    np.savez_compressed(os.path.join(out, "digits_16x16.npz"),
                        calib_x=data.calib_x, calib_y=data.calib_y,
                        test_x=data.test_x, test_y=data.test_y)
    np.savez_compressed(os.path.join(out, "calib.npz"), input=data.calib_x)


def environment(data: DigitsData) -> dict[str, object]:
    """The settings and package versions recorded in ``accuracy.json``."""
    import sklearn

    return {
        "mean": MEAN, "std": STD, "seed": SEED, "opset": OPSET,
        "n_train": len(data.train_y), "n_calib": N_CALIB, "n_test": N_TEST,
        "torch": torch.__version__, "onnx": onnx.__version__,
        "onnxruntime": ort.__version__, "scikit-learn": sklearn.__version__,
        "numpy": np.__version__,
    }


README_HEAD = """\
# Example models: scikit-learn digits at 16x16

Four small classifiers trained on scikit-learn's bundled `load_digits` data set (1797 grey
8x8 images of the digits 0-9), used by edgeopt's README, examples and accuracy tests.
Everything in this folder is written by one command (PyTorch CPU build and scikit-learn
needed; nothing else in edgeopt uses PyTorch):

    python tools/train_digits.py --out examples/digits

## Data

- Pixels (0..16) scaled to [0, 1], upsampled 8x8 -> 16x16 with bilinear interpolation
  (half-pixel centres, edge clamp: `torch.nn.functional.interpolate(mode="bilinear",
  align_corners=False)`), then normalized as `(x - {mean}) / {std}`.
- Split with `numpy.random.default_rng({seed}).permutation`: the first {n_test} images are the
  test set, the other {n_train} the training set; the calibration set is the first {n_calib}
  training images (seen in training, never in test).
- `digits_16x16.npz`: `calib_x` ({n_calib},1,16,16) float32, `calib_y` ({n_calib},) int64,
  `test_x` ({n_test},1,16,16) float32, `test_y` ({n_test},) int64.
- `calib.npz`: `input` = `calib_x` (the `--calib` format: one key per model input name,
  axis 0 = samples).

## Models

All are ONNX opset {opset}, input `input` float32 `[N,1,16,16]`, output `logits` float32
`[N,10]` (batch dimension symbolic `N`). BatchNormalization stays in the graphs (not folded
into the convolutions), weights are initializers, no external data. Test accuracy is measured
with ONNX Runtime {ort} on the {n_test} test images (`accuracy.json` also stores every
prediction, which `tests/test_examples.py` checks).

| model | architecture | parameters | file size | test accuracy |
| --- | --- | ---: | ---: | ---: |
"""

README_TAIL = """
Parameters are PyTorch's trainable parameters (BatchNorm running statistics excluded;
`accuracy.json` also gives `initializer_elements`, everything stored in the file).

## How they were made

- Training: 40 epochs of AdamW (weight decay 1e-4), one-cycle learning rate (max 3e-3), batch
  64, cross-entropy, no augmentation, seed {seed}, {threads} CPU threads with deterministic
  algorithms; well under a minute per model. A rerun rewrites every file in this folder byte
  for byte on the same package versions: torch {torch} (install the CPU build with
  `pip install torch==2.13.0`), scikit-learn {sklearn}, onnx {onnx}, numpy {numpy}.
- Export: the TorchScript exporter, `torch.onnx.export(..., dynamo=False,
  training=TrainingMode.PRESERVE)` on the eval-mode module. With `TrainingMode.EVAL` the
  exporter folds BatchNormalization into the preceding Conv; the fixtures leave that to
  edgeopt. BatchNormalization nodes carry `training_mode=0`.
- Exporter quirks kept: ReLU6 is `Clip` whose min/max come from `Constant` nodes (24 in
  `mobilenetv2.onnx`); node and value names are the exporter's (`/blocks/blocks.1/Add`).
- Exporter quirk removed: it deduplicates bit-identical initializers through `Identity` nodes
  (in `resnet` the two BatchNormalization biases summed by the downsampling block's Add train
  to the same values); the script replaces each `Identity(initializer)` by a copy of the
  initializer, so every weight is an initializer.
- Check: ONNX Runtime reproduces the PyTorch logits on the test images to within 1e-4
  (`max_abs_diff_vs_torch` in `accuracy.json`), and `min_top2_margin` there is the smallest
  gap between the two largest logits over the test set.
"""


def write_readme(out: str, results: dict[str, dict[str, object]], env: dict[str, object]) -> None:
    """Write ``README.md`` from the recorded results."""
    fmt = {"mean": MEAN, "std": STD, "seed": SEED, "n_test": N_TEST, "n_calib": N_CALIB,
           "n_train": env["n_train"], "opset": OPSET, "ort": env["onnxruntime"],
           "threads": THREADS, "torch": env["torch"], "sklearn": env["scikit-learn"],
           "onnx": env["onnx"], "numpy": env["numpy"]}
    lines = [README_HEAD.format(**fmt)]
    for name, r in results.items():
        lines.append(
            f"| `{name}.onnx` | {RECIPES[name].summary} | {r['params']:,} | "
            f"{int(r['file_bytes']) / 1024:.0f} KiB | {100 * float(r['test_accuracy']):.2f}% "
            f"({r['correct']}/{r['n_test']}) |\n")
    lines.append(README_TAIL.format(**fmt))
    with open(os.path.join(out, "README.md"), "w") as f:
        f.write("".join(lines))


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point (see the module docstring)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="examples/digits", help="output folder")
    ap.add_argument("--models", default=",".join(MODEL_NAMES),
                    help="comma-separated subset of " + ",".join(MODEL_NAMES))
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    names = [n for n in args.models.split(",") if n]
    unknown = sorted(set(names) - set(MODEL_NAMES))
    if unknown:
        ap.error(f"unknown models {unknown}; valid: {', '.join(MODEL_NAMES)}")
    os.makedirs(args.out, exist_ok=True)
    seed_everything()
    data = load_data()
    save_data(data, args.out)
    env = environment(data)
    results: dict[str, dict[str, object]] = {}
    for name in names:
        start = time.perf_counter()
        model = train(RECIPES[name], data)
        seconds = time.perf_counter() - start
        path = os.path.join(args.out, f"{name}.onnx")
        export(model, path)
        # No timings in accuracy.json: a rerun must rewrite every file byte for byte.
        results[name] = check_and_score(model, path, data)
        log.info("%-12s params=%-7d acc=%.4f bytes=%d train=%.1fs diff=%.2g", name,
                 results[name]["params"], results[name]["test_accuracy"],
                 results[name]["file_bytes"], seconds, results[name]["max_abs_diff_vs_torch"])
    with open(os.path.join(args.out, "accuracy.json"), "w") as f:
        json.dump({"environment": env, "models": results}, f, indent=2)
        f.write("\n")
    write_readme(args.out, results, env)
    return 0


if __name__ == "__main__":
    sys.exit(main())
