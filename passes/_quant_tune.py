"""Accuracy tools of static quantization: bias correction, per-layer sensitivity, targets.

* **Bias correction** (empirical, per output channel): quantizing weights and inputs shifts
  the mean of a layer's output; the shift, the float model's per-channel mean output minus
  the quantized model's on the calibration data, is added to the int32 bias (Nagel et al.,
  "Data-Free Quantization", section 4.2, with measured instead of analytic means). Layers
  are corrected level by level, each with the levels upstream already corrected. The float
  means come from the calibration statistics, without running the float model again: a
  Conv or Gemm is linear, so its per-channel mean output is exactly its weights times its
  input's per-channel, per-kernel-tap means (:attr:`Activations.tap_means`, reduced inside
  ONNX Runtime in the run that measures the ranges), plus its bias.
* **Sensitivity**: the model's output error with one layer quantized and everything else
  float, on the calibration data.
* **Target**: the most sensitive layers stay float until the quantized model's output meets
  a metric (``cos:0.999``, ``relerr:0.05`` or ``maxerr:0.1``), by bisection over how many.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from edgeopt import ir
from edgeopt.ir import DataType, Model, Node
from edgeopt.ir.quant import dequantize, quantize

from ._base import Context
from ._quant_plan import QuantPlan
from ._util import NameGen, as_tensor, constant_tensor, levels, replace_constant_input
from .analyses.activation_cache import ActivationCache
from .analyses.activations import Activations, Window, _require_calib, run_session

__all__ = ["Metric", "bias_targets", "correct_biases", "float_output_means", "mean_requests",
           "parse_target"]

log = logging.getLogger(__name__)

#: Layers whose bias is corrected and whose sensitivity is measured.
LAYERS = ("Conv", "Gemm", "MatMul")

#: Bytes each activation cache of bias correction may hold and return.
CACHE_BYTES = 256 << 20

#: Calibration samples bias correction measures on (the first ones).
BIAS_SAMPLES = 16


def bias_targets(plan: QuantPlan) -> list[Node]:
    """Quantized layers with a channel axis 1 on their output (Conv, Gemm, 2-D MatMul)."""
    out = []
    for node in plan.nodes:
        if node.op_type not in LAYERS:
            continue
        shape = node.outputs[0].shape
        if node.op_type == "MatMul" and (shape is None or len(shape) != 2):
            continue
        out.append(node)
    return out


def correct_biases(model: Model, ctx: Context, want: dict[Node, np.ndarray],
                   samples: int = BIAS_SAMPLES) -> int:
    """Add each layer's per-channel output shift (float minus quantized) to its int32 bias.

    Layers are corrected level by level, in graph order: a layer's shift is measured with
    the layers upstream of it already corrected, so no shift is corrected twice. The
    quantized model runs through an incremental cache
    (:class:`~edgeopt.passes.analyses.activation_cache.ActivationCache`), about one pass in
    all. Layers without a quantized bias are left alone.

    Args:
        model: the quantized model; the int32 biases of ``want``'s layers change in place.
        ctx: the pass context (``ctx.calib``).
        want: each layer's per-channel mean output in the float model
            (:func:`float_output_means`), over the first ``samples`` calibration samples.
        samples: the samples ``want`` was measured on; the quantized model runs on them.

    Returns:
        The number of corrected layers.
    """
    todo = [n for n in want if _bias_dq(n) is not None]
    if not todo:
        return 0
    calib = _require_calib(ctx, model)
    samples = min(samples, calib.num_samples)
    now = ActivationCache(model, ctx, samples, max_bytes=CACHE_BYTES)
    names = NameGen(model)
    done = 0
    for level in levels(model.graph, todo):
        outs = [n.outputs[0].name for n in level]
        # The level's inputs are cached too: after this level's biases change, the next
        # request starts from them instead of from the graph inputs.
        ins = [v.name for n in level for v in n.inputs[:1] if v is not None and v.name
               and v.const_value is None]
        got = now.get([*ins, *outs])
        for node in level:
            have = _channel_means(got[node.outputs[0].name])
            if want[node].shape == have.shape:
                done += _shift_bias(node, (want[node] - have) / _bias_gain(node), names)
    return done


def mean_requests(layers: list[Node]) -> tuple[tuple[str, ...], tuple[tuple[str, Window], ...]]:
    """What :class:`Activations` measures for these layers' mean outputs, from their inputs.

    Returns the values whose per-channel means are enough (Gemm, 1 x 1 Convs without
    padding or strides) and the ``(value, window)`` pairs whose tap means are needed.
    """
    channels: dict[str, None] = {}
    taps: dict[tuple[str, Window], None] = {}
    for node in layers:
        win = _window(node)
        if win is None:
            channels[node.inputs[0].name] = None
        else:
            taps[(node.inputs[0].name, win)] = None
    return tuple(channels), tuple(taps)


def float_output_means(model: Model, layers: list[Node], act: Activations
                       ) -> dict[Node, np.ndarray]:
    """Per-channel mean output of each float layer, from its input's means in ``act``.

    ``act`` measured what :func:`mean_requests` asks for; the layers read float constant
    weights. Layers whose output mean cannot be computed are left out.
    """
    out = {}
    for node in layers:
        mean = _output_mean(node, model, act)
        if mean is not None:
            out[node] = mean
    return out


def _window(node: Node) -> Window | None:
    """A Conv's window, unless trivial (then its input's channel means are enough)."""
    w = node.inputs[1] if node.op_type == "Conv" else None
    if w is not None and w.shape is None and w.producer() is not None:
        w = w.producer().inputs[0]  # type: ignore[union-attr]  # DequantizeLinear's int8
    if w is None or w.shape is None:
        return None
    win = Window.of_conv(node, len(w.shape))
    return None if win.trivial else win


def _output_mean(node: Node, model: Model, act: Activations) -> np.ndarray | None:
    """Per-channel mean of a Conv's or Gemm's output, bias included, from its input's.

    The input's tap means (or channel means) in ``act`` times the weights (see the module
    docs); weights and bias are constants or dequantized int8/int32 constants. None when
    ``act`` lacks the means, for a Gemm with ``transA``, or shapes that do not fit.
    """
    w = _constant(node.inputs[1], model)
    name, win = node.inputs[0].name, _window(node)
    stats = act.stats.get(name)
    x = act.tap_means.get((name, win)) if win is not None else \
        None if stats is None else stats.channel_mean
    if w is None or x is None:
        return None
    if node.op_type == "Conv" and w.ndim >= 3:
        groups = int(node.attr("group", 1))
        oc, icg = w.shape[:2]
        taps = x.reshape(len(x), -1) if win is not None else x.reshape(-1, 1)
        if oc % groups or len(taps) != icg * groups or \
                (win is not None and taps.shape[1] * icg != w[0].size):
            return None
        if win is None:
            w = w.reshape(oc, icg, -1).sum(axis=2, keepdims=True)  # 1 x 1: the one tap
        y = np.einsum("gok,gk->go", w.reshape(groups, oc // groups, -1),
                      taps.reshape(groups, -1)).reshape(oc)
    elif node.op_type == "Gemm" and not node.attr("transA", 0) and w.ndim == 2:
        b = w.T if node.attr("transB", 0) else w
        if x.shape != (b.shape[0],):
            return None
        y = float(node.attr("alpha", 1.0)) * (x @ b)
    else:
        return None
    bias = _constant(node.inputs[2], model) if len(node.inputs) > 2 else None
    if bias is not None:
        if bias.size != y.size:
            return None
        y = y + _bias_gain(node) * bias.reshape(-1)
    return y


def _bias_gain(node: Node) -> float:
    """What a bias is multiplied by in the output: Gemm's ``beta``, else 1."""
    return float(node.attr("beta", 1.0)) if node.op_type == "Gemm" else 1.0


def _constant(value: ir.Value | None, model: Model) -> np.ndarray | None:
    """The float64 data of a constant, or of a DequantizeLinear of one; else None."""
    if value is None:
        return None
    t = constant_tensor(value, model)
    if t is not None:
        return np.asarray(t.numpy(), np.float64)
    dq = value.producer()
    qp = ir.quant_params(value) if dq is not None and dq.op_type == "DequantizeLinear" else None
    ints = constant_tensor(dq.inputs[0], model) if qp is not None else None  # type: ignore[union-attr]
    return None if ints is None else dequantize(ints.numpy(), qp).astype(np.float64)  # type: ignore[arg-type]


def _channel_means(x: np.ndarray) -> np.ndarray:
    """Mean over every axis but 1, accumulated in float64 (without a float64 copy)."""
    return x.mean(axis=(0, *range(2, x.ndim)), dtype=np.float64)


def _shift_bias(node: Node, shift: np.ndarray, names: NameGen) -> int:
    dq = _bias_dq(node)
    assert dq is not None
    qp = ir.quant_params(dq.outputs[0])
    ints = np.asarray(dq.inputs[0].const_value.numpy())  # type: ignore[union-attr]
    if qp is None or ints.shape != shift.shape or not np.all(np.isfinite(shift)):
        return 0
    bias = dequantize(ints, qp).astype(np.float64) + shift
    replace_constant_input(dq, 0, as_tensor(quantize(bias, qp)), names)
    return 1


def _bias_dq(node: Node) -> Node | None:
    """The DequantizeLinear of ``node``'s int32 bias, if it has one."""
    b = node.inputs[2] if len(node.inputs) > 2 else None
    dq = None if b is None else b.producer()
    if dq is None or dq.op_type != "DequantizeLinear" or dq.inputs[0] is None \
            or dq.inputs[0].const_value is None or dq.inputs[0].dtype != DataType.INT32 \
            or len(b.uses()) != 1:  # type: ignore[union-attr]
        return None
    return dq


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
