"""Bias correction: one instrumented run and level by level give the same int32 biases."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from conftest import run_ort
from models import cnn, mlp, mobilenetv2, resnet

from edgeopt import ir
from edgeopt.passes import Context, PassManager
from edgeopt.passes import _quant_bias as bias
from edgeopt.passes.calib import CalibrationData, load_calibration

DIGITS = "examples/digits"
ONE_RUN = f"quant: bias correction of {{}} layers in one run of {bias.BIAS_SAMPLES} samples"
FALLBACK = "quant: bias correction goes level by level: "


def _calib(model: ir.Model, n: int = 32) -> CalibrationData:
    x = model.graph.inputs[0]
    shape = [n * x.shape[0], *x.shape[1:]]
    arr = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    return CalibrationData.for_model({x.name: arr}, model)


def _quantize(make, calib_of, level_by_level=False, spec="quant:int8"):
    model = make()
    calib = calib_of(model)
    with pytest.MonkeyPatch.context() as mp:
        if level_by_level:
            mp.setattr(bias, "_one_run", lambda *a: None)
        step = PassManager(spec).run(model, Context(calib=calib)).steps[-1]
    biases = {n.name: bias._bias_dq(n).inputs[0].const_value.numpy().copy()
              for n in model.graph if bias._bias_dq(n) is not None}
    return step.stats.get("biases_corrected", 0), biases, model


def _outputs(model: ir.Model, x: np.ndarray) -> np.ndarray:
    """The model's output for each sample of ``x``, run one sample at a time."""
    proto = ir.to_proto(model)
    name = model.graph.inputs[0].name
    return np.concatenate([run_ort(proto, {name: x[i:i + 1]})[0] for i in range(len(x))])


def _opset(proto, version: int):
    """The same model declared at another opset (its operators mean the same there)."""
    proto.opset_import[0].version = version
    return proto


MODELS = {
    # static batch 1: the one run goes through unfix_batch
    "resnet": (lambda: ir.from_proto(resnet()), _calib),
    # opset 18 on: ReduceMean takes its axes as an input
    "resnet opset 19": (lambda: ir.from_proto(_opset(resnet(), 19)), _calib),
    "mobilenetv2": (lambda: ir.from_proto(mobilenetv2()), _calib),
    "cnn": (lambda: ir.from_proto(cnn()), _calib),
    # a dynamic batch: fed as it is
    "digits mobilenetv2": (lambda: ir.load(f"{DIGITS}/mobilenetv2.onnx"),
                           lambda m: load_calibration(f"{DIGITS}/calib.npz", m)),
}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_one_run_gives_the_biases_of_level_by_level(name, caplog):
    make, calib_of = MODELS[name]
    with caplog.at_level(logging.INFO, logger="edgeopt.passes._quant_bias"):
        n, one, one_model = _quantize(make, calib_of)
    assert ONE_RUN.format(n) in caplog.messages
    assert not [m for m in caplog.messages if m.startswith(FALLBACK)]
    m, levels, level_model = _quantize(make, calib_of, level_by_level=True)
    assert n == m == len(one) > 3
    # The same int32 biases, but for float rounding on the edge of a step (the one run
    # averages in float32 inside ONNX Runtime): a step of difference in one layer moves the
    # means, and so the corrections, of the layers after it by a little.
    steps = np.concatenate([np.abs(one[k] - levels[k]) for k in one])
    assert np.mean(steps == 0) > 0.9, np.bincount(steps)
    first = next(iter(one))
    np.testing.assert_array_equal(one[first], levels[first])
    # ... which is noise next to what the correction does to the model's output.
    _, _, uncorrected = _quantize(make, calib_of, spec="quant:int8,bias_correction=false")
    x = next(iter(calib_of(make()).arrays.values()))[:8]
    got, want, before = (_outputs(mod, x) for mod in (one_model, level_model, uncorrected))
    assert np.linalg.norm(got - want) < 0.1 * np.linalg.norm(want - before)


def test_too_many_bytes_at_once_go_level_by_level(monkeypatch, caplog):
    make, calib_of = MODELS["resnet"]
    _, one, _ = _quantize(make, calib_of)
    monkeypatch.setattr(bias, "GRAPH_BYTES", 1000)
    with caplog.at_level(logging.INFO, logger="edgeopt.passes._quant_bias"):
        n, levels, _ = _quantize(make, calib_of)
    why = [m for m in caplog.messages if m.startswith(FALLBACK)]
    assert len(why) == 1 and why[0].endswith("MiB (more than 0.0 MiB)"), why
    assert why[0].startswith(FALLBACK + f"{bias.BIAS_SAMPLES} samples at once would take about ")
    assert n == len(one) and all(np.abs(one[k] - levels[k]).max() <= 1 for k in one)


def test_a_static_batch_above_one_goes_level_by_level(caplog):
    with caplog.at_level(logging.INFO, logger="edgeopt.passes._quant_bias"):
        n, _, _ = _quantize(lambda: ir.from_proto(mlp()), _calib)  # input [2, 1, 8, 8]
    assert FALLBACK + "the model's batch is fixed to 2" in caplog.messages
    assert n == 1  # the Gemm (its MatMul layers have no int32 bias)


@pytest.mark.parametrize("name", ["resnet", "digits mobilenetv2"])
def test_the_memory_estimate_from_ir_shapes_equals_shape_inference(name, monkeypatch):
    make, calib_of = MODELS[name]
    _, _, model = _quantize(make, calib_of)
    data = calib_of(model).subset(bias.BIAS_SAMPLES)
    ir.infer_shapes(model)  # the float values have shapes in the pass; Q/DQ outputs do not
    assert bias._ir_sizes(model) is not None
    fast = bias._peak_bytes(model, data)
    monkeypatch.setattr(bias, "_ir_sizes", lambda m: None)
    assert fast == bias._peak_bytes(model, data) and min(fast) > 0


def test_dequantized_weights_count_once_not_per_sample():
    # AlexNet-like: a 16 MiB weight and 8 KiB activations. Counted per sample, 16 samples
    # would pass the one-run budget; the weight is dequantized once whatever the batch.
    from onnx import TensorProto, helper, numpy_helper

    w = np.random.default_rng(0).standard_normal((2048, 2048)).astype(np.float32) * 0.02
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "w", "b"], ["h"], transB=1),
         helper.make_node("Relu", ["h"], ["y"])], "fc",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2048])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2048])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.zeros(2048, np.float32), "b")])
    make = lambda: ir.from_proto(helper.make_model(  # noqa: E731
        graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8))
    n, _, model = _quantize(make, _calib)
    assert n == 1
    per_sample, fixed = bias._peak_bytes(model, _calib(model).subset(bias.BIAS_SAMPLES))
    assert per_sample < 64 << 10 and fixed >= 2048 * 2048 * 4


def test_a_failed_run_goes_level_by_level(monkeypatch, caplog):
    make, calib_of = MODELS["resnet"]
    _, want, _ = _quantize(make, calib_of)
    real = bias.run_session

    def failing(session, names, feeds, who, source):
        if who == "quant: bias correction":
            raise ir.EdgeoptError(f"{who}: ONNX Runtime failed on the calibration data from "
                                  f"{source}: out of memory")
        return real(session, names, feeds, who, source)

    monkeypatch.setattr(bias, "run_session", failing)
    with caplog.at_level(logging.INFO, logger="edgeopt.passes._quant_bias"):
        n, got, _ = _quantize(make, calib_of)
    assert FALLBACK + "the one run failed: quant: bias correction: ONNX Runtime failed on " \
        "the calibration data from <arrays>: out of memory" in caplog.messages
    assert n == len(want) and all(np.abs(got[k] - want[k]).max() <= 1 for k in want)
