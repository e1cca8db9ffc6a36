"""Bias correction of static quantization (empirical, per output channel).

Quantizing weights and inputs shifts the mean of a layer's output; the shift, the float
model's per-channel mean output minus the quantized model's on the calibration data, is
added to the int32 bias (Nagel et al., "Data-Free Quantization", section 4.2, with measured
instead of analytic means). Each layer's shift is measured with every layer upstream of it
already corrected, so no shift is corrected twice.

* **Float means** come from the calibration statistics, without running the float model
  again: a Conv or Gemm is linear, so its per-channel mean output is exactly its weights
  times its input's per-channel, per-kernel-tap means (:attr:`Activations.tap_means`,
  reduced inside ONNX Runtime in the run that measures the ranges), plus its bias.
* **Quantized means, in one run** (:func:`correct_biases`): an exported copy of the quantized
  model gets, after each corrected layer's output ``y``, ``q = Round((want - ReduceMean(y)) /
  step)`` (the mean over every axis but the channels; ``step`` what one int32 bias step adds)
  and ``y + q * step`` in place of ``y`` for its readers, and runs once on all the samples in
  one batch. Every layer's mean is then taken with the layers upstream corrected and rounded
  as their int32 biases will be, as level-by-level correction does, in one pass. A model
  whose batch is fixed to 1 runs as a batch-polymorphic copy (:func:`._batch.unfix_batch`).
* **Level by level**, when the batch cannot be unfixed, the samples are fed one per run, one
  batch of them would not fit in :data:`GRAPH_BYTES`, or ONNX Runtime fails on the one run:
  the layers are corrected level by level through an incremental activation cache
  (:class:`~edgeopt.passes.analyses.activation_cache.ActivationCache`), one sub-model run per
  level and batch.
"""

from __future__ import annotations

import logging
import math

import numpy as np

from edgeopt import ir
from edgeopt.ir import DataType, EdgeoptError, Model, Node
from edgeopt.ir.quant import dequantize, quantize

from ._base import Context
from ._batch import unfix_batch
from ._quant_plan import QuantPlan
from ._util import NameGen, as_tensor, constant_tensor, levels, replace_constant_input
from .analyses.activation_cache import ActivationCache
from .analyses.activations import Activations, Window, _infer, _require_calib
from .analyses.ort_model import OrtModel, run_session
from .calib import CalibrationData

__all__ = ["BIAS_SAMPLES", "LAYERS", "bias_targets", "correct_biases", "float_output_means",
           "mean_requests"]

log = logging.getLogger(__name__)

#: Layers whose bias is corrected and whose sensitivity is measured.
LAYERS = ("Conv", "Gemm", "MatMul")

#: Bytes the values of one-run correction may take at once (an estimate from the shapes, all
#: samples in one batch); above it, correction goes level by level.
GRAPH_BYTES = 1 << 30

#: Bytes each activation cache of bias correction may hold and return.
CACHE_BYTES = 256 << 20

#: Calibration samples bias correction measures on (the first ones); the one run (or the
#: level sub-models) costs about as many forward passes. Held-out output error with / without
#: correction on the digits models (cnn, resnet, mobilenetv2, mlp): 8 samples 0.85 0.82 1.01
#: 0.95, 16: 0.87 0.81 0.96 0.90, 32: 0.85 0.80 0.93 0.89, 64: 0.84 0.80 0.91 0.89. PP-OCRv4 rec
#: (time steps / lines matching fp32) was best with 8 (0.966 / 0.750; 16: 0.950 / 0.625; 32:
#: 0.946 / 0.672), within the noise of its 64 evaluation lines; det's IoU 0.963 / 0.965.
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

    A layer's shift is measured with the layers upstream of it already corrected, in one
    run of the quantized model when it can be batched, else level by level (see the module
    docs). Layers without a quantized bias are left alone.

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
    data = calib.subset(min(samples, calib.num_samples))
    shifts = _one_run(model, todo, want, data)
    if shifts is None:
        return _level_by_level(model, ctx, todo, want, data.num_samples)
    names = NameGen(model)
    return sum(_shift_bias(node, shift, names) for node, shift in shifts.items())


def _one_run(model: Model, todo: list[Node], want: dict[Node, np.ndarray],
             data: CalibrationData) -> dict[Node, np.ndarray] | None:
    """Every layer's bias shift from one run of an instrumented copy (module docs).

    None when the copy cannot run all the samples in one batch, or ONNX Runtime fails on it
    (the reason is logged).
    """
    why = _one_run_blocker(model, todo, want, data)
    if why:  # before exporting: nothing to undo
        log.info("quant: bias correction goes level by level: %s", why)
        return None
    with OrtModel(model, Activations.INLINE_LIMIT) as exported:
        why = unfix_batch(exported.proto, data.input_names) if data.fixed_batch == 1 else ""
        if why:
            log.info("quant: bias correction goes level by level: %s", why)
            return None
        steps = {node: _bias_step(node, len(want[node])) for node in todo}
        outputs = _instrument(exported, todo, want, steps)
        try:
            session = exported.load(full=False)  # the graph as defined, as level by level
            got = run_session(session, outputs, data.arrays, "quant: bias correction",
                              data.source)
        except EdgeoptError as e:  # e.g. memory: the level sub-models need less at once
            log.warning("quant: bias correction goes level by level: the one run failed: %s",
                        e)
            return None
    log.info("quant: bias correction of %d layers in one run of %d samples", len(todo),
             data.num_samples)
    return {node: np.asarray(q, np.float64).reshape(-1) * steps[node] / _bias_gain(node)
            for node, q in zip(todo, got, strict=True)}


def _bias_step(node: Node, channels: int) -> np.ndarray:
    """Per output channel, what one int32 step of ``node``'s bias adds to its output."""
    qp = ir.quant_params(_bias_dq(node).outputs[0])  # type: ignore[union-attr]
    scale = np.float64(1.0) if qp is None else np.asarray(qp.scale, np.float64)
    return np.broadcast_to(scale * _bias_gain(node), (channels,))


def _one_run_blocker(model: Model, todo: list[Node], want: dict[Node, np.ndarray],
                     data: CalibrationData) -> str:
    """Why the samples cannot run in one batch of an instrumented copy ('' if they can)."""
    if data.unbatched:
        return "the calibration inputs have no batch axis"
    if data.fixed_batch not in (None, 1):
        return f"the model's batch is fixed to {data.fixed_batch}"
    for node in todo:
        out = node.outputs[0]
        if out.shape is None or len(out.shape) < 2 or out.shape[1] != len(want[node]) or \
                out.dtype not in (DataType.FLOAT, DataType.FLOAT16):
            return f"the output of {node.op_type} {node.name or out.name!r} has no known " \
                   f"float type and shape with {len(want[node])} channels"
    per_sample, fixed = _peak_bytes(model, data)
    peak = per_sample * data.num_samples + fixed
    if peak > GRAPH_BYTES:
        return f"{data.num_samples} samples at once would take about {peak / 2**20:.1f} MiB " \
               f"(more than {GRAPH_BYTES / 2**20:.1f} MiB)"
    return ""


def _instrument(exported: OrtModel, todo: list[Node], want: dict[Node, np.ndarray],
                steps: dict[Node, np.ndarray]) -> list[str]:
    """After each layer's output ``y``, its bias shift in int32 steps, and ``y`` shifted.

    ``q = Round((want - ReduceMean(y)) / step)``, and ``y + q * step`` replaces ``y`` for its
    readers: the shift the int32 bias will get, rounded as it will be (the rounding of one
    layer's bias moves the means of the layers after it, which are measured with it).
    ``exported``'s proto is edited. Returns the names of the ``q`` values, in the order of
    ``todo``, added as graph outputs.
    """
    from onnx import helper, numpy_helper

    graph, opset = exported.proto.graph, exported.opset
    prefix = exported.free_prefix("edgeopt_bias")
    index = {node.outputs[0].name: i for i, node in enumerate(todo)}
    nodes = list(graph.node)
    del graph.node[:]
    renamed: dict[str, str] = {}
    for proto_node in nodes:
        for i, name in enumerate(proto_node.input):
            proto_node.input[i] = renamed.get(name, name)
        graph.node.append(proto_node)
        for y in proto_node.output:
            if y not in index:
                continue
            node, p = todo[index[y]], f"{prefix}.{index[y]}."
            rank = len(node.outputs[0].shape)  # type: ignore[arg-type]
            dtype = node.outputs[0].dtype.numpy()  # type: ignore[union-attr]
            shape = (1, -1, *[1] * (rank - 2))
            graph.initializer.extend([
                numpy_helper.from_array(want[node].reshape(shape).astype(dtype), p + "want"),
                numpy_helper.from_array(steps[node].reshape(shape).astype(dtype), p + "step")])
            axes = [0, *range(2, rank)]
            if opset >= 18:
                graph.initializer.append(numpy_helper.from_array(np.array(axes, np.int64),
                                                                 p + "axes"))
                mean = helper.make_node("ReduceMean", [y, p + "axes"], [p + "mean"])
            else:
                mean = helper.make_node("ReduceMean", [y], [p + "mean"], axes=axes)
            graph.node.extend([
                mean, helper.make_node("Sub", [p + "want", p + "mean"], [p + "d"]),
                helper.make_node("Div", [p + "d", p + "step"], [p + "r"]),
                helper.make_node("Round", [p + "r"], [p + "q"]),
                helper.make_node("Mul", [p + "q", p + "step"], [p + "dy"]),
                helper.make_node("Add", [y, p + "dy"], [p + "y"])])
            renamed[y] = p + "y"
    outputs = [f"{prefix}.{i}.q" for i in range(len(todo))]
    graph.output.extend(helper.make_empty_tensor_value_info(d) for d in outputs)
    return outputs


def _peak_bytes(model: Model, data: CalibrationData) -> tuple[int, int]:
    """(Most bytes of main-graph values alive at once for one sample, constant bytes).

    The constant bytes are those of the values computed from constants alone (dequantized
    weights: one copy for any batch). Sizes come from the IR's shapes (a symbolic first dim
    counts as one sample; a value without a shape, such as a QuantizeLinear output, as
    large as its first input), else from shape inference on a copy with the inputs fixed to
    one sample. An estimate.
    """
    sizes = _ir_sizes(model)
    if sizes is None:
        info = _infer(model, data.subset(1))
        known = {n: math.prod(s) * t.itemsize for n, (t, s) in info.items()
                 if t is not None and t.bitwidth and ir.shape_is_static(s)}
        largest = max(known.values(), default=0)
        sizes = {n: known.get(n, largest) for n in info}
    fixed: set[str] = set()  # computed from constants alone
    for node in model.graph:
        if all(v is None or v.const_value is not None or v.name in fixed for v in node.inputs):
            fixed.update(o.name for o in node.outputs if o.name)
    last: dict[str, int] = {}
    for i, node in enumerate(model.graph):
        last.update((v.name, i) for v in node.inputs if v is not None)
    live = peak = 0
    for i, node in enumerate(model.graph):
        live += sum(sizes.get(o.name, 0) for o in node.outputs if o.name and o.name not in fixed)
        peak = max(peak, live)
        live -= sum(sizes.get(v.name, 0) for v in set(node.inputs)
                    if v is not None and last.get(v.name) == i and v.producer() is not None
                    and v.name not in fixed)
    return peak, sum(sizes.get(name, 0) for name in fixed)


def _ir_sizes(model: Model) -> dict[str, int] | None:
    """Bytes per sample of each main-graph value from the IR's shapes, or None if unknown.

    See :func:`_peak_bytes`.
    """
    elements: dict[str, int] = {}
    for v in model.graph.inputs:
        n = _elements(v)
        if n is not None:
            elements[v.name] = n
    sizes: dict[str, int] = {}
    for node in model.graph:
        first = node.inputs[0] if node.inputs else None
        for out in node.outputs:
            n = _elements(out)
            if n is None and first is not None:
                n = elements.get(first.name, _elements(first))
            if n is None or out.dtype is None or not out.dtype.bitwidth:
                return None
            elements[out.name] = n
            sizes[out.name] = n * out.dtype.itemsize
    return sizes


def _elements(value: ir.Value) -> int | None:
    """Elements per sample of a value of known shape (a symbolic first dim counts as 1)."""
    shape = value.shape
    if shape is None or not all(isinstance(d, int) for d in shape[1:]):
        return None
    return math.prod(shape[1:]) * (shape[0] if shape and isinstance(shape[0], int) else 1)


def _level_by_level(model: Model, ctx: Context, todo: list[Node], want: dict[Node, np.ndarray],
                    samples: int) -> int:
    """Shift the biases level by level, measured through an activation cache.

    The biases of each level are shifted before the next level is measured. Returns the
    number of corrected layers.
    """
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
