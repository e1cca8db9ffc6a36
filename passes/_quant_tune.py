"""Accuracy tools of static quantization: per-layer sensitivity and output targets.

* **Sensitivity**: the model's output error with one layer quantized and everything else
  float, on the calibration data.
* **Target**: the most sensitive layers stay float until the quantized model's output meets
  a metric (``cos:0.999``, ``relerr:0.05`` or ``maxerr:0.1``), by bisection over how many.

Bias correction, the third accuracy tool, is :mod:`._quant_bias`.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from edgeopt import ir
from edgeopt.ir import Model

from ._base import Context
from .analyses.ort_model import run_session

__all__ = ["Metric", "OutputRunner", "measure", "meet_target", "parse_target", "sensitivities"]


# -- output metrics ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Metric:
    """A target on the quantized model's outputs versus the float model's.

    Attributes:
        kind: ``cos`` (mean per-sample cosine similarity, at least ``value``), ``relerr``
            (relative L2 error, at most) or ``maxerr`` (largest absolute error, at most).
        value: the bound.
    """

    kind: str
    value: float

    def measure(self, want: list[np.ndarray], got: list[np.ndarray]) -> float:
        """The metric of ``got`` against ``want`` (lists of outputs, samples on axis 0)."""
        return measure(self.kind, want, got)

    def met(self, score: float) -> bool:
        """Whether ``score`` satisfies the target."""
        return score >= self.value if self.kind == "cos" else score <= self.value

    def __str__(self) -> str:
        return f"{self.kind}:{self.value:g}"


def measure(kind: str, want: list[np.ndarray], got: list[np.ndarray]) -> float:
    """``cos``, ``relerr`` or ``maxerr`` of ``got`` against ``want`` (see :class:`Metric`)."""
    w = np.concatenate([np.asarray(a, np.float64).reshape(len(a), -1) for a in want], axis=1)
    g = np.concatenate([np.asarray(a, np.float64).reshape(len(a), -1) for a in got], axis=1)
    if kind == "maxerr":
        return float(np.abs(g - w).max(initial=0.0))
    if kind == "relerr":
        return float(np.linalg.norm(g - w) / max(np.linalg.norm(w), 1e-30))
    num = (w * g).sum(axis=1)
    den = np.linalg.norm(w, axis=1) * np.linalg.norm(g, axis=1)
    cos = np.where(den > 0, num / np.maximum(den, 1e-30), (np.abs(g - w).max(axis=1) == 0) * 1.0)
    return float(cos.mean())


_TARGET = re.compile(r"^(cos|relerr|maxerr):([0-9.eE+-]+)$")


def parse_target(text: str) -> Metric:
    """``cos:0.999``, ``relerr:0.05`` or ``maxerr:0.1`` as a :class:`Metric`.

    Raises:
        ValueError: anything else.
    """
    m = _TARGET.match(text.strip())
    value = None
    if m:
        try:
            value = float(m.group(2))
        except ValueError:
            value = None
    if m is None or value is None or not np.isfinite(value) or value < 0 \
            or (m.group(1) == "cos" and value > 1):
        raise ValueError(f"target {text!r} must be cos:X (0..1), relerr:X or maxerr:X, "
                         "e.g. target=cos:0.999")
    return Metric(m.group(1), value)


class OutputRunner:
    """Runs models on the first calibration samples and returns their outputs."""

    def __init__(self, ctx: Context, model: Model, samples: int) -> None:
        self.calib = ctx.calib.subset(min(samples, ctx.calib.num_samples))  # type: ignore[union-attr]
        self.names = [v.name for v in model.graph.outputs]

    def outputs(self, model: Model) -> list[np.ndarray]:
        """Every graph output of ``model``, over the samples (joined on axis 0)."""
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.log_severity_level = 3
        session = ort.InferenceSession(ir.to_proto(model).SerializeToString(), so,
                                       providers=["CPUExecutionProvider"])
        runs: list[list[np.ndarray]] = []
        batch = self.calib.fixed_batch or 16
        for feeds in self.calib.batches(batch):
            runs.append(run_session(session, self.names, feeds, "quant", self.calib.source))
        return [np.concatenate([r[i] for r in runs], axis=0) for i in range(len(self.names))]


Variant = Callable[[set[str]], Model]


def sensitivities(layers: list[str], variant: Variant, runner: OutputRunner,
                  reference: list[np.ndarray], progress: Callable[[str, int, int], None]
                  ) -> dict[str, float]:
    """Relative output error of the model with only each layer quantized."""
    out = {}
    for i, name in enumerate(layers):
        out[name] = measure("relerr", reference, runner.outputs(variant({name})))
        progress("sensitivity", i + 1, len(layers))
    return out


def meet_target(order: list[str], metric: Metric, variant: Variant, runner: OutputRunner,
                reference: list[np.ndarray], all_layers: set[str]) -> tuple[int, float]:
    """How many of the most sensitive layers (``order``) must stay float: ``(k, score)``.

    Bisection over k, assuming keeping more layers float never makes the output worse;
    ``k == len(order)`` when even that misses the target.
    """
    def score(k: int) -> float:
        return metric.measure(reference, runner.outputs(variant(all_layers - set(order[:k]))))

    s0 = score(0)
    if metric.met(s0):
        return 0, s0
    lo, hi, best = 0, len(order), None
    while hi - lo > 1:
        mid = (lo + hi) // 2
        s = score(mid)
        if metric.met(s):
            hi, best = mid, s
        else:
            lo = mid
    return hi, best if best is not None else score(hi)
