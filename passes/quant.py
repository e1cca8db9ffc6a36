"""``quant``: int8 quantization (static, dynamic, weight-only) and float16 conversion.

``quant:int8`` with calibration data is static post-training quantization: weights symmetric
int8 per output channel, activations int8 (or uint8) per tensor with ranges from the
calibration data, int32 biases, written as QDQ (QuantizeLinear/DequantizeLinear around float
operators, which ONNX Runtime fuses into its integer kernels and the C backend lowers) or, with
``format=qop``, as QLinear operators. What is quantized is planned by
:mod:`._quant_plan`, rewritten by :mod:`._quant_qdq`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np

from edgeopt import ir
from edgeopt.ir import DataType, Model, Node, QuantParams
from edgeopt.ir.quant import params_from_range, type_range

from ._base import Context, OptionError, PassError, PassResult
from ._quant_bias import (
    BIAS_SAMPLES,
    LAYERS,
    bias_targets,
    correct_biases,
    float_output_means,
    mean_requests,
)
from ._quant_plan import QuantPlan, excluded, node_label, plan_static
from ._quant_qdq import apply_qdq
from ._quant_tune import OutputRunner, meet_target, parse_target, sensitivities
from ._registry import register_pass
from ._util import (
    NameGen,
    add_constant,
    as_tensor,
    computed_weights_hint,
    constant_tensor,
    default_opset,
)
from .analyses.activations import Activations, ValueStats, _require_calib
from .analyses.calibrators import calibrate, list_calibrators
from .dce import remove_unused_initializers
from .fold_bn import FoldBnOptions, fold_bn

__all__ = ["QuantOptions", "quant"]

log = logging.getLogger(__name__)

#: The opset QDQ with per-channel parameters needs (QuantizeLinear/DequantizeLinear ``axis``).
MIN_OPSET = 13

#: ``Node.meta`` key of per-layer results (sensitivity, why a layer stayed float).
META_KEY = "edgeopt.quant"

#: Elements of one activation per calibration sample that its histogram counts (an even
#: stride through each run; min and max still see all): with runs of 8 samples, on the
#: digits examples every calibrator's output error stays within 3 % of that with whole
#: histograms (at half this, percentile and entropy lose 4-5 %); ``calibrator=minmax``
#: measures no histogram at all.
HIST_PER_SAMPLE = 1 << 12

#: Samples per calibration run of the statistics (``Activations``' default batch), unless
#: the model's batch dim is static.
STATS_BATCH = 8

#: What ``calibrator=auto`` picks.
DEFAULT_CALIBRATOR = "mse"


@dataclass(frozen=True)
class QuantOptions:
    """Options of ``quant``.

    Attributes:
        dtype: ``int8`` (integer quantization) or ``fp16`` (float16 weights, float32 I/O).
        mode: ``static`` (activation ranges from calibration data), ``dynamic`` (activations
            quantized at run time), ``weights`` (weight-only int8, for size); ``auto`` is
            ``static`` (which needs ``--calib``).
        calibrator: how an activation's range is chosen from its calibration histogram:
            ``minmax``, ``percentile``, ``entropy``, ``mse`` or a registered one; ``auto``
            is the robust default (``mse``).
        percentile: the percentile of ``calibrator=percentile``.
        activations: integer type of activations, ``int8`` or ``uint8``.
        per_channel: weights per output channel (else per tensor).
        format: ``qdq`` (QuantizeLinear/DequantizeLinear pairs) or ``qop`` (QLinear
            operators, integer tensors between them).
        exclude: ``|``-separated fnmatch patterns of node names left in float.
        bias_correction: add each Conv's and Gemm's measured per-channel output shift (float
            minus quantized, on the first 16 calibration samples) to its int32 bias, level by
            level (see :mod:`._quant_tune`).
        sensitivity: measure each layer's sensitivity (model output error with only that
            layer quantized) and report it.
        target: keep the most sensitive layers float until the outputs meet this, versus the
            float model on the calibration data: ``cos:X`` (mean cosine similarity >= X),
            ``relerr:X`` (relative L2 error <= X) or ``maxerr:X`` (max abs error <= X).
        eval_samples: calibration samples used by ``sensitivity`` and ``target``.
        conv: (``mode=dynamic``) ``float`` leaves Convs float (ONNX Runtime's ConvInteger is
            slower than its float Conv on most shapes), ``integer`` makes them ConvInteger.
        form: (``mode=weights``) ``qdq`` reads each int8 weight through a DequantizeLinear
            (what other runtimes and the C backend read as an int8 weight), ``cast`` through
            Cast + Mul, which ONNX Runtime folds at load time (it never folds
            DequantizeLinear, and dequantizes on every run).
    """

    dtype: Literal["int8", "fp16"] = "int8"
    mode: Literal["auto", "static", "dynamic", "weights"] = "auto"
    calibrator: str = "auto"
    percentile: float = 99.999
    activations: Literal["int8", "uint8"] = "uint8"
    per_channel: bool = True
    format: Literal["qdq", "qop"] = "qdq"
    exclude: tuple[str, ...] = ()
    bias_correction: bool = True
    sensitivity: bool = False
    target: str | None = None
    eval_samples: int = 32
    conv: Literal["float", "integer"] = "float"
    form: Literal["qdq", "cast"] = "qdq"

    def validate(self) -> None:
        """Raise ValueError for out-of-range values."""
        if not 0.0 < self.percentile <= 100.0:
            raise ValueError(f"percentile must be in (0, 100], got {self.percentile}")
        if self.eval_samples < 1:
            raise ValueError("eval_samples must be >= 1")
        if self.target is not None:
            parse_target(self.target)
        if self.calibrator != "auto" and self.calibrator not in list_calibrators():
            raise ValueError(f"unknown calibrator {self.calibrator!r}; available: auto, "
                             + ", ".join(list_calibrators()))


def _ensure_opset(model: Model) -> int:
    """Raise the default-domain opset to :data:`MIN_OPSET` (ONNX's version converter)."""
    old = default_opset(model)
    if old >= MIN_OPSET:
        return old
    from onnx import version_converter

    # The converter reads no weight: it gets them as data-less stubs and they are put back
    # (a 100 MB model otherwise costs it 0.15 s of copying). Opset 13 comes with IR 7, and
    # from IR 4 on weights are written as initializers, which to_proto stubs without a copy.
    old_ir, model.ir_version = model.ir_version, max(model.ir_version, 7)
    try:
        src, stripped = ir.proto_skeleton(ir.to_proto(model, value_info="file", deferred={}))
        proto = version_converter.convert_version(src, MIN_OPSET)
    except Exception as e:  # the converter raises bare RuntimeErrors
        model.ir_version = old_ir
        raise PassError(f"quant: the model's opset {old} is below {MIN_OPSET}, which "
                        f"per-channel quantization needs, and converting it failed: "
                        f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from e
    # The converter's own shape inference annotates every value; keep the file's entries only
    # (the rest would be written to the output as if the file had them).
    had = {vi.name for vi in src.graph.value_info}
    kept = [vi for vi in proto.graph.value_info if vi.name in had]
    del proto.graph.value_info[:]
    proto.graph.value_info.extend(kept)
    weights = {name: model.graph.initializers[name].const_value for name in stripped}
    new = ir.from_proto(proto, tensors=weights)  # type: ignore[arg-type]
    model.graph, model.opset_imports = new.graph, new.opset_imports
    model.ir_version = old_ir  # the new graph still lists IR 3 initializers as inputs
    model.upgrade_ir_version(max(old_ir, new.ir_version))
    log.info("quant: opset %d -> %d", old, MIN_OPSET)
    return old


def _range(stats: ValueStats, method: str, opts: QuantOptions, dtype: DataType
           ) -> tuple[float, float]:
    qmin, qmax = type_range(dtype)
    params = {"percentile": opts.percentile} if method == "percentile" else {}
    return calibrate(stats, method, qmin=qmin, qmax=qmax, **params)


def _params(plan: QuantPlan, act: Activations, opts: QuantOptions, method: str
            ) -> dict[str, QuantParams]:
    """Quantization parameters of every planned tensor (one per sharing class)."""
    dtype = DataType.UINT8 if opts.activations == "uint8" else DataType.INT8
    out: dict[str, QuantParams] = {}
    for members in plan.classes().values():
        lo, hi = np.inf, -np.inf
        for name in members:
            if name in plan.fixed:
                a, b = plan.fixed[name]
            else:
                a, b = _range(act.stats[name], method, opts, dtype)
                if name in plan.clamp:
                    a, b = max(a, plan.clamp[name][0]), min(b, plan.clamp[name][1])
            lo, hi = min(lo, a), max(hi, b)
        qp = params_from_range(lo, hi, dtype)
        out.update((name, qp) for name in members)
    return out


def _static(model: Model, ctx: Context, opts: QuantOptions) -> dict[str, int | float]:
    if ctx.calib is None:
        raise OptionError("quant:int8 (static) needs calibration data: give --calib FILE, or "
                          "use quant:int8,mode=dynamic or quant:int8,mode=weights")
    old = _ensure_opset(model)
    folded = fold_bn(model, ctx, FoldBnOptions()).stats.get("bn_folded", 0)
    divisions = _divisions_to_products(model)
    if old < MIN_OPSET or folded or divisions:
        ctx.invalidate()
    typed = ir.infer_shapes(model)  # the plan needs every activation's dtype
    plan = plan_static(model, opts.exclude)
    if not plan.tensors:
        return {"tensors_quantized": 0, "values_typed": typed, "bn_folded": folded,
                "nodes_quantized": 0, "nodes_float": len(plan.skipped)}
    method = DEFAULT_CALIBRATOR if opts.calibrator == "auto" else opts.calibrator
    # Bias correction's float means: from the layers' input means over its samples.
    channels, taps = mean_requests([n for n in bias_targets(plan)
                                    if n.inputs[0].name in plan.tensors]) \
        if opts.bias_correction else ((), ())
    hist_limit = 0 if method == "minmax" else _hist_limit(model, ctx)
    act = ctx.analysis(Activations, values=tuple(plan.tensors), channels=channels or False,
                       moments=False, hist_limit=hist_limit, taps=taps,
                       channel_samples=BIAS_SAMPLES if opts.bias_correction else None)
    params = _params(plan, act, opts, method)
    stats: dict[str, int | float] = {}
    tuning = opts.sensitivity or opts.target is not None
    float_model = model.clone() if tuning else None
    if tuning:
        plan, tuned = _tune(model, float_model, ctx, opts, plan, params)  # type: ignore[arg-type]
        stats.update(tuned)
    want = float_output_means(model, bias_targets(plan), act) if opts.bias_correction else {}
    stats.update(apply_qdq(model, plan, params, opts.per_channel))
    if opts.bias_correction:
        stats["biases_corrected"] = correct_biases(model, ctx, want, act.channel_samples)
    stats.update(bn_folded=folded, divisions_to_products=divisions,
                 nodes_quantized=len(plan.nodes), nodes_float=len(plan.skipped),
                 initializers_removed=remove_unused_initializers(model.graph, model))
    if opts.format == "qop":
        from ._quant_qop import lower_to_qoperator

        stats.update(lower_to_qoperator(model))
    return stats


def _hist_limit(model: Model, ctx: Context) -> int:
    """Histogram elements per statistics run: :data:`HIST_PER_SAMPLE` per sample in it."""
    return HIST_PER_SAMPLE * _require_calib(ctx, model).samples_per_run(STATS_BATCH)


def _tune(model: Model, float_model: Model, ctx: Context, opts: QuantOptions, plan: QuantPlan,
          params: dict[str, QuantParams]) -> tuple[QuantPlan, dict[str, int | float]]:
    """Sensitivity per layer, and the layers kept float to meet ``opts.target``.

    ``float_model`` is a copy of ``model`` as it is before quantization (never modified).
    """
    runner = OutputRunner(ctx, float_model, opts.eval_samples)
    reference = runner.outputs(float_model)

    def variant(quantized: set[str]) -> Model:
        clone = float_model.clone()
        sub = plan_static(clone, opts.exclude,
                          lambda n: "" if node_label(n) in quantized else "not selected")
        apply_qdq(clone, sub, params, opts.per_channel)
        return clone

    names = [node_label(n) for n in plan.nodes if n.op_type in LAYERS]
    sens = sensitivities(names, variant, runner, reference, ctx.progress)
    by_label = {node_label(n): n for n in plan.nodes}
    for name, err in sens.items():
        by_label[name].meta[META_KEY] = {"sensitivity": err}
        log.info("quant: sensitivity of %s: relative output error %.4g", name, err)
    stats: dict[str, int | float] = {"layers_measured": len(sens)}
    if opts.target is None:
        return plan, stats
    metric = parse_target(opts.target)
    order = sorted(sens, key=lambda k: -sens[k])
    k, score = meet_target(order, metric, variant, runner, reference, set(names))
    kept = set(order[:k])
    for name in order[:k]:
        by_label[name].meta.setdefault(META_KEY, {})["float"] = f"target {metric}"
        log.info("quant: %s stays float (target %s; sensitivity %.4g)", name, metric,
                 sens[name])
    if k == len(order) and not metric.met(score):
        log.warning("quant: target %s not met even with every measured layer float (%s = "
                    "%.6g); the remaining error comes from other operators", metric,
                    metric.kind, score)
    new = plan_static(model, opts.exclude,
                      lambda n: f"target {metric}" if node_label(n) in kept else "")
    stats.update(layers_float=k, target_score=score)
    return new, stats


def _divisions_to_products(model: Model) -> int:
    """``Div(x, c)`` by a float constant becomes ``Mul(x, 1/c)`` in the main graph.

    There is no integer Div kernel: a division stays float between a DequantizeLinear and a
    QuantizeLinear, while a Mul is quantized (hard-swish's ``/ 6`` in MobileNetV3-style
    models). ``x * (1/c)`` may differ from ``x / c`` in the last float bit.
    """
    names = NameGen(model)
    done = 0
    for node in model.graph:
        c = node.inputs[1] if node.op_type == "Div" and len(node.inputs) == 2 else None
        t = constant_tensor(c, model)
        if t is None or t.dtype not in (DataType.FLOAT, DataType.FLOAT16, DataType.DOUBLE):
            continue
        arr = np.asarray(t.numpy())
        if not np.all(np.isfinite(arr)) or np.any(arr == 0):
            continue
        inv = add_constant(model.graph, names, f"{c.name}_reciprocal",  # type: ignore[union-attr]
                           as_tensor((1.0 / arr.astype(np.float64)).astype(arr.dtype)))
        node.op_type = "Mul"
        node.set_input(1, inv)
        done += 1
    return done


def _skip(opts: QuantOptions) -> Callable[[Node], bool]:
    return lambda node: excluded(node, opts.exclude)


@register_pass("quant", options=QuantOptions, primary="dtype")
def quant(model: Model, ctx: Context, opts: QuantOptions) -> PassResult:
    """Quantize the main graph to int8 (or convert it to float16); see :class:`QuantOptions`.

    Static mode (the default) plans which operators run in int8 (:mod:`._quant_plan`),
    measures the planned activations on the calibration data, picks each range with the
    calibrator, and writes QuantizeLinear/DequantizeLinear pairs (:mod:`._quant_qdq`). A model
    whose opset is below 13 is converted to opset 13 first. Subgraph bodies stay float.

    Static stats: ``tensors_quantized``, ``weights_quantized``, ``biases_quantized``,
    ``biases_corrected``, ``activations_fused``, ``nodes_quantized``, ``nodes_float``,
    ``bn_folded``, ``divisions_to_products``, ``weight_bytes_before``/``_after``; with
    ``sensitivity``/``target`` also ``layers_measured``, ``layers_float``, ``target_score``.
    The other modes report ``nodes_*``, ``weights_*`` and the weight bytes.
    """
    graph, version = model.graph, model.version
    packed = _csr_packed(graph)
    computed = computed_weights_hint(
        graph, "they stay float; fold them into constants first: -p simplify,quant:...")
    if computed:
        log.warning("quant: %s", computed)
    if opts.dtype == "fp16":
        from ._quant_modes import convert_fp16

        stats = convert_fp16(model, skip=_skip(opts))
    elif opts.mode == "dynamic":
        from ._quant_modes import quantize_dynamic

        stats = quantize_dynamic(model, per_channel=opts.per_channel, skip=_skip(opts),
                                 conv=opts.conv)
        convs = 0 if stats.get("nodes_quantized") or opts.conv != "float" or computed else \
            sum(1 for n in graph if n.op_type == "Conv" and len(n.inputs) > 1
                and constant_tensor(n.inputs[1], model) is not None)
        if convs:
            log.warning("quant: mode=dynamic changed nothing: it runs MatMul/Gemm by constant "
                        "weights in int8, and the model's %d Convs stay float (conv=integer "
                        "makes them ConvInteger, slower than float Conv in ONNX Runtime on most "
                        "shapes; mode=weights shrinks the file; static quant:int8 with --calib "
                        "runs int8 kernels)", convs)
    elif opts.mode == "weights":
        from ._quant_modes import quantize_weights

        stats = quantize_weights(model, per_channel=opts.per_channel, skip=_skip(opts),
                                 form=opts.form)
    else:
        stats = _static(model, ctx, opts)
    unpacked = packed - _csr_packed(model.graph)
    if unpacked:
        log.warning("quant: %d CSR-packed weights (e.g. %r) are dense after quantization: "
                    "csr ran before quant; run it after (-p ...,quant:int8,csr) to pack the "
                    "quantized weights", len(unpacked), sorted(unpacked)[0])
    # The opset conversion replaces the graph; every other change bumps its version.
    return PassResult(modified=model.graph is not graph or model.version != version,
                      stats=stats)


def _csr_packed(graph: ir.Graph) -> set[str]:
    """Names of the main graph's CSR-packed initializers (the ``csr`` pass)."""
    return {name for name, v in graph.initializers.items()
            if isinstance(v.const_value, ir.CSRTensor)}
