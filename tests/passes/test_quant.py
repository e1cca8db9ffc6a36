"""quant:int8 (static): QDQ numerics against a numpy reference, integer kernels in ONNX
Runtime, weights, fused activations, shared scales, real models, errors."""

from __future__ import annotations

import collections
import re

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import build_model, run_ort
from models import cnn, concat_net, mlp, mobilenetv2, resnet, se_net

from edgeopt import ir
from edgeopt.ir.quant import dequantize, quantize
from edgeopt.passes import Context, OptionError, PassError, PassManager
from edgeopt.passes._quant_bias import BIAS_SAMPLES
from edgeopt.passes.calib import CalibrationData

RNG = np.random.default_rng(0)
HEADER = '<ir_version: 8, opset_import: ["" : 17]>\n'


def calib_for(model: ir.Model, n: int = 32, seed: int = 1, positive: bool = False
              ) -> CalibrationData:
    rng = np.random.default_rng(seed)
    arrays = {}
    for v in model.graph.inputs:
        if v.is_initializer():
            continue
        batch = v.shape[0] if v.shape and isinstance(v.shape[0], int) else 1
        shape = [n * batch, *[d if isinstance(d, int) else 1 for d in v.shape[1:]]]
        x = rng.standard_normal(shape).astype(np.float32)
        arrays[v.name] = np.abs(x) if positive else x
    return CalibrationData.for_model(arrays, model)


def quantize_model(model: ir.Model, spec: str = "quant:int8", calib=None):
    ctx = Context(calib=calib if calib is not None else calib_for(model))
    return PassManager(spec, verify="each").run(model, ctx).steps[-1]


def optimized_ops(model: ir.Model, tmp_path) -> collections.Counter:
    """Operator counts of the graph ONNX Runtime actually runs (after its QDQ fusions)."""
    so = ort.SessionOptions()
    so.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    so.log_severity_level = 3
    ort.InferenceSession(ir.to_proto(model).SerializeToString(), so,
                         providers=["CPUExecutionProvider"])
    return collections.Counter(n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node)


# -- one operator at a time, against a numpy reference ----------------------------------------
def _pattern(body: str, inputs: str, weights: dict[str, np.ndarray]) -> tuple[str, dict]:
    """A model ``inputs -> body -> t -> Identity -> y``: ``t`` is quantized, ``y`` float."""
    text = HEADER + f"g ({inputs}) => (float y) {{\n{body}\n  y = Identity(t)\n}}"
    return text, weights


def _w(*shape: int, scale: float = 0.3) -> np.ndarray:
    return (RNG.standard_normal(shape) * scale).astype(np.float32)


PATTERNS = {
    "conv_relu": _pattern("c = Conv <pads = [1, 1, 1, 1]> (x, w, b)\n  t = Relu(c)",
                          "float[1,4,8,8] x, float[8,4,3,3] w, float[8] b",
                          {"w": _w(8, 4, 3, 3), "b": _w(8)}),
    "conv_relu6": _pattern("c = Conv <pads = [1, 1, 1, 1]> (x, w, b)\n  t = Clip(c, lo, hi)",
                           "float[1,4,8,8] x, float[8,4,3,3] w, float[8] b, float lo, float hi",
                           {"w": _w(8, 4, 3, 3), "b": _w(8), "lo": np.float32(0),
                            "hi": np.float32(6)}),
    "depthwise": _pattern("t = Conv <group = 4, pads = [1, 1, 1, 1]> (x, w, b)",
                          "float[1,4,8,8] x, float[4,1,3,3] w, float[4] b",
                          {"w": _w(4, 1, 3, 3), "b": _w(4)}),
    "convtranspose": _pattern(
        "t = ConvTranspose <strides = [2, 2], kernel_shape = [2, 2]> (x, w, b)",
        "float[1,4,4,4] x, float[4,6,2,2] w, float[6] b", {"w": _w(4, 6, 2, 2), "b": _w(6)}),
    "gemm": _pattern("t = Gemm <transB = 1> (x, w, b)", "float[2,16] x, float[8,16] w, float[8] b",
                     {"w": _w(8, 16), "b": _w(8)}),
    "matmul": _pattern("t = MatMul(x, w)", "float[2,16] x, float[16,8] w", {"w": _w(16, 8)}),
    "matmul_acts": _pattern("t = MatMul(x, z)", "float[2,3,4] x, float[2,4,5] z", {}),
    "add": _pattern("t = Add(x, z)", "float[1,4,4,4] x, float[1,4,4,4] z", {}),
    "mul": _pattern("t = Mul(x, z)", "float[1,4,4,4] x, float[1,4,4,4] z", {}),
    "concat": _pattern("t = Concat <axis = 1> (x, z)", "float[1,4,4,4] x, float[1,2,4,4] z", {}),
    "gap": _pattern("t = GlobalAveragePool(x)", "float[1,4,4,4] x", {}),
    "avgpool": _pattern("t = AveragePool <kernel_shape = [2, 2], strides = [2, 2]> (x)",
                        "float[1,4,4,4] x", {}),
    "maxpool": _pattern("r = Relu(x)\n  t = MaxPool <kernel_shape = [2, 2], strides = [2, 2]> (r)",
                        "float[1,4,4,4] x", {}),
    "sigmoid": _pattern("t = Sigmoid(x)", "float[1,4,4,4] x", {}),
}

#: ONNX Runtime's integer kernels that must replace the float op.
#: (ConvTranspose has none in ONNX Runtime's CPU QDQ fusions: it runs float on dequantized
#: values there; its weights are still stored in int8, and the C backend runs it in int8.)
INT_KERNELS = {"conv_relu": "QLinearConv", "conv_relu6": "QLinearConv", "depthwise": "QLinearConv",
               "gemm": "QGemm", "matmul": "QLinearMatMul", "matmul_acts": "QLinearMatMul",
               "add": "QLinearAdd", "mul": "QLinearMul", "concat": "QLinearConcat",
               "gap": "QLinearGlobalAveragePool", "avgpool": "QLinearAveragePool",
               "sigmoid": "QLinearSigmoid"}


def _dequantized_weights(q: ir.Model, names: list[str]) -> dict[str, np.ndarray]:
    """The float weights the quantized model computes with, by original initializer name."""
    out = {}
    for node in q.graph:
        if node.op_type != "DequantizeLinear" or node.inputs[0].const_value is None:
            continue
        base = node.inputs[0].name.removesuffix("_q")
        if base in names:
            out[base] = dequantize(node.inputs[0].const_value.numpy(),
                                   ir.quant_params(node.outputs[0]))
    return out


@pytest.mark.parametrize("act", ["uint8", "int8"])
@pytest.mark.parametrize("name", sorted(PATTERNS))
def test_pattern_matches_numpy_reference_within_one_lsb(name, act, tmp_path):
    text, weights = PATTERNS[name]
    model = build_model(text, weights)
    feeds = dict(calib_for(model, n=1, seed=7).arrays)
    q = build_model(text, weights)
    quantize_model(q, f"quant:int8,activations={act}")
    t = q.graph.outputs[0].producer().inputs[0]  # Identity reads DQ(t)
    t_params = ir.quant_params(t.producer().inputs[0].producer().inputs[0])
    assert t_params is not None and t_params.dtype.name == act.upper()
    # Reference: the float operator on fake-quantized inputs and dequantized weights (numpy
    # quantize/dequantize, ONNX Runtime only for the float operator), then quantized.
    ref_model = build_model(text, {**weights, **_dequantized_weights(q, list(weights))})
    fq = {}
    for k, v in feeds.items():
        qp = ir.quant_params(next(x for x in q.graph.inputs if x.name == k))
        fq[k] = dequantize(quantize(v, qp), qp)
    want = quantize(run_ort(ir.to_proto(ref_model), fq)[0], t_params).astype(np.int64)
    got = quantize(run_ort(ir.to_proto(q), feeds)[0], t_params).astype(np.int64)
    assert np.abs(got - want).max() <= 1
    assert (got == want).mean() > 0.9
    if name in INT_KERNELS and act == "uint8":
        ops = optimized_ops(q, tmp_path)
        assert ops[INT_KERNELS[name]] == 1, ops


def test_weights_within_half_a_step_and_zeros_stay_zero():
    text, weights = PATTERNS["conv_relu"]
    w = weights["w"].copy()
    w[::2] = 0.0
    w[1, :, 1, 1] = 0.0
    q = build_model(text, {**weights, "w": w})
    quantize_model(q)
    dq = next(n for n in q.graph if n.op_type == "DequantizeLinear"
              and n.inputs[0].name.startswith("w_"))
    qp = ir.quant_params(dq.outputs[0])
    assert qp.axis == 0 and qp.scale.shape == (8,) and not qp.zero_point.any()
    ints = dq.inputs[0].const_value.numpy()
    assert ints.dtype == np.int8 and ints.min() >= -127
    back = dequantize(ints, qp)
    assert np.all(np.abs(back - w) <= qp.scale.reshape(-1, 1, 1, 1) / 2 * (1 + 1e-6))
    assert not ints[w == 0].any()


def test_bias_is_int32_with_input_times_weight_scale():
    text, weights = PATTERNS["gemm"]
    q = build_model(text, weights)
    quantize_model(q)
    gemm = next(n for n in q.graph if n.op_type == "Gemm")
    x_qp = ir.quant_params(gemm.inputs[0])
    w_qp = ir.quant_params(gemm.inputs[1])
    b_qp = ir.quant_params(gemm.inputs[2])
    assert b_qp.dtype == ir.DataType.INT32 and not b_qp.zero_point.any()
    np.testing.assert_array_equal(b_qp.scale, (x_qp.scale * w_qp.scale).astype(np.float32))


def test_ir3_weights_listed_as_inputs_stay_constants(tmp_path):
    """IR 3 files (the onnx light models, old Caffe2 exports) list every initializer as a graph
    input. quant converts them to opset 13 (IR 7), where a listed initializer would be an
    overridable input: the upgrade unlists them, so the bias is still quantized to int32 and
    ONNX Runtime still fuses the Conv (it used to stay float, with ORT warning that the
    initializer 'will not be treated as constant')."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(3)
    w = numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "w")
    b = numpy_helper.from_array(rng.standard_normal(4).astype(np.float32), "b")
    ins = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8]),
           helper.make_tensor_value_info("w", TensorProto.FLOAT, [4, 3, 3, 3]),
           helper.make_tensor_value_info("b", TensorProto.FLOAT, [4])]
    graph = helper.make_graph([helper.make_node("Conv", ["x", "w", "b"], ["c"]),
                               helper.make_node("Relu", ["c"], ["y"])], "g", ins,
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [w, b])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 9)], ir_version=3)
    model = ir.from_proto(proto)
    assert quantize_model(model).stats["biases_quantized"] == 1
    assert model.ir_version >= 7
    assert [v.name for v in model.graph.inputs] == ["x"]
    conv = next(n for n in model.graph if n.op_type == "Conv")
    assert conv.inputs[2].producer().op_type == "DequantizeLinear"
    assert conv.inputs[2].producer().inputs[0].const_value.dtype == ir.DataType.INT32
    assert optimized_ops(model, tmp_path)["QLinearConv"] == 1


def test_relu_and_relu6_are_fused_into_the_quantization():
    for name in ("conv_relu", "conv_relu6"):
        text, weights = PATTERNS[name]
        q = build_model(text, weights)
        stats = quantize_model(q).stats
        ops = [n.op_type for n in q.graph]
        assert "Relu" not in ops and "Clip" not in ops
        assert stats["activations_fused"] == 1
        conv = next(n for n in q.graph if n.op_type == "Conv")
        qp = ir.quant_params(conv.outputs[0])
        assert int(qp.zero_point) == qp.qmin  # the bottom of the range is 0
        if name == "conv_relu6":
            assert qp.range()[1] <= 6.0 + 1e-6


def test_concat_inputs_share_one_scale():
    text, weights = PATTERNS["concat"]
    q = build_model(text, weights)
    quantize_model(q)
    concat = next(n for n in q.graph if n.op_type == "Concat")
    params = [ir.quant_params(v) for v in concat.inputs] + [ir.quant_params(concat.outputs[0])]
    assert len({(float(p.scale), int(p.zero_point)) for p in params}) == 1


def test_sigmoid_output_has_the_fixed_zero_to_one_range():
    text, weights = PATTERNS["sigmoid"]
    q = build_model(text, weights)
    quantize_model(q, "quant:int8,activations=int8")
    sig = next(n for n in q.graph if n.op_type == "Sigmoid")
    lo, hi = ir.quant_params(sig.outputs[0]).range()
    assert float(lo) == 0.0 and float(hi) == pytest.approx(1.0)


@pytest.mark.parametrize("spec, hist_limit", [
    ("quant:int8,calibrator=minmax,bias_correction=false", 0),
    ("quant:int8,bias_correction=false", 4096 * 2),  # per sample, static batch 2
])
def test_calibration_statistics_are_light_and_minmax_ranges_exact(spec, hist_limit,
                                                                  monkeypatch):
    from edgeopt.ir.quant import params_from_range
    from edgeopt.passes.analyses.activations import Activations

    requested = []
    init = Activations.__init__

    def spy(self, model, ctx, **params):
        requested.append(params)
        init(self, model, ctx, **params)

    monkeypatch.setattr(Activations, "__init__", spy)
    text, weights = PATTERNS["gemm"]
    model = build_model(text, weights)
    calib = calib_for(model)
    t = np.concatenate([run_ort(ir.to_proto(model), {"x": x})[0]  # y = Identity(t)
                        for x in calib.arrays["x"].reshape(-1, 2, 16)])  # static batch 2
    quantize_model(model, spec, calib)
    assert [(p["moments"], p["hist_limit"], p["channels"]) for p in requested] == \
        [(False, hist_limit, False)]
    if hist_limit == 0:
        dq = model.graph.outputs[0].producer().inputs[0]  # Identity reads DQ(t)
        got = ir.quant_params(dq.producer().inputs[0].producer().inputs[0])
        want = params_from_range(t.min(), t.max(), ir.DataType.UINT8)
        assert (float(got.scale), int(got.zero_point)) == \
            (pytest.approx(float(want.scale), rel=1e-6), int(want.zero_point))


# -- whole networks ----------------------------------------------------------------------------
NETS = {"cnn": cnn, "resnet": resnet, "mobilenetv2": mobilenetv2, "se": se_net,
        "concat": concat_net, "mlp": mlp}


@pytest.mark.parametrize("name", sorted(NETS))
def test_networks_stay_close_to_float_and_run_integer_kernels(name, tmp_path):
    proto = NETS[name]()
    model = ir.from_proto(proto)
    calib = calib_for(model, n=64)
    quantize_model(model, calib=calib)
    x = dict(calib_for(model, n=1, seed=5).arrays)
    want = run_ort(proto, x)[0]
    got = run_ort(ir.to_proto(model), x)[0]
    rel = np.linalg.norm(got - want) / np.linalg.norm(want)
    assert rel < 0.08, rel
    ops = optimized_ops(model, tmp_path)
    n_conv = sum(1 for n in proto.graph.node if n.op_type == "Conv")
    assert ops["QLinearConv"] == n_conv
    assert ops["Conv"] == 0


DIGITS = "examples/digits"


@pytest.fixture(scope="module")
def digits():
    with np.load(f"{DIGITS}/digits_16x16.npz") as d:
        return d["test_x"].astype(np.float32), d["test_y"]


@pytest.mark.parametrize("name", ["cnn", "resnet", "mobilenetv2", "mlp"])
def test_digits_accuracy_within_half_a_point_of_float(name, digits, tmp_path):
    from edgeopt.passes.calib import load_calibration

    x, y = digits
    model = ir.load(f"{DIGITS}/{name}.onnx")
    base = (run_ort(ir.to_proto(model), {"input": x})[0].argmax(1) == y).mean()
    step = quantize_model(model, calib=load_calibration(f"{DIGITS}/calib.npz", model))
    acc = (run_ort(ir.to_proto(model), {"input": x})[0].argmax(1) == y).mean()
    assert acc >= base - 0.005, (acc, base)
    assert step.stats["weight_bytes_after"] * 4 == step.stats["weight_bytes_before"]


def test_after_prune_the_pipeline_quantizes_the_pruned_model(digits):
    from edgeopt.passes.calib import load_calibration

    x, y = digits
    model = ir.load(f"{DIGITS}/resnet.onnx")
    calib = load_calibration(f"{DIGITS}/calib.npz", model)
    report = PassManager("prune:0.3,quant:int8").run(model, Context(calib=calib))
    assert report.steps[1].stats["nodes_quantized"] > 0
    acc = (run_ort(ir.to_proto(model), {"input": x})[0].argmax(1) == y).mean()
    assert acc > 0.95


def test_exclude_keeps_matching_nodes_float():
    text, weights = PATTERNS["conv_relu"]
    q = build_model(text, weights)
    next(iter(q.graph)).name = "stem_conv"
    stats = quantize_model(q, "quant:int8,exclude=stem*").stats
    conv = next(n for n in q.graph if n.op_type == "Conv")
    assert conv.inputs[1].const_value is not None  # the float weight, no DequantizeLinear
    assert stats["nodes_float"] == 2  # the conv and its Relu, which stays with it
    assert [n.op_type for n in q.graph] == ["Conv", "Relu", "Identity"]


def test_squeezenet_opset9_is_upgraded_runs_integer_kernels_and_shrinks(tmp_path, caplog):
    """onnx's light SqueezeNet (opset 9, real architecture) after simplify."""
    import logging
    import os

    src = os.path.join(os.path.dirname(onnx.__file__), "backend/test/data/light/"
                       "light_squeezenet.onnx")
    model = ir.load(src)
    PassManager("simplify").run(model)
    ir.save(model, str(tmp_path / "f32.onnx"))
    float_proto = ir.to_proto(model)
    with caplog.at_level(logging.INFO, logger="edgeopt.passes._quant_bias"):
        quantize_model(model, calib=calib_for(model, n=8, positive=True))
    # Its batch is fixed to 1; its Concats and the opset-13 Softmax (Flatten, Softmax,
    # Reshape to Shape(x)) keep samples apart. All 26 Convs have an int32 bias to correct:
    # the 13 biases still listed as graph inputs (IR 3) are unlisted by the upgrade to IR 7,
    # not left float as overridable inputs.
    assert "quant: bias correction of 26 layers in one run of 8 samples" in caplog.messages
    assert model.opset_imports[""] == 13 and [v.name for v in model.graph.inputs] == ["data_0"]
    ir.save(model, str(tmp_path / "q.onnx"))
    assert os.path.getsize(tmp_path / "q.onnx") <= 0.27 * os.path.getsize(tmp_path / "f32.onnx")
    ops = optimized_ops(model, tmp_path)
    assert ops["QLinearConv"] == sum(1 for n in float_proto.graph.node if n.op_type == "Conv")
    x = calib_for(model, n=1, seed=3, positive=True).arrays
    want, got = run_ort(float_proto, x)[0].ravel(), run_ort(ir.to_proto(model), x)[0].ravel()
    np.testing.assert_allclose(got, want, atol=1e-4)  # light models' weights are constant


def test_subgraph_bodies_stay_float():
    text = HEADER + """g (float[1,4] x, float[4,4] w, float[4] b, float zero) => (float[1,4] y) {
      h = Gemm <transB = 1> (x, w, b)
      s = ReduceSum <keepdims = 0> (x)
      c = Greater(s, zero)
      y = If(c) <then_branch = t () => (float[1,4] o) { o = MatMul(h, w) },
                else_branch = e () => (float[1,4] o) { o = Relu(h) }>
    }"""
    weights = {"w": _w(4, 4), "b": _w(4), "zero": np.float32(0)}
    model = build_model(text, weights)
    quantize_model(model)
    body = [n.op_type for sub in model.graph.subgraphs() for n in sub]
    assert body == ["MatMul", "Relu"]
    assert ir.quant_params(next(n for n in model.graph if n.op_type == "Gemm").inputs[1])
    for seed in range(4):
        x = {"x": np.random.default_rng(seed).standard_normal((1, 4)).astype(np.float32)}
        want = run_ort(ir.to_proto(build_model(text, weights)), x)[0]
        got = run_ort(ir.to_proto(model), x)[0]
        np.testing.assert_allclose(got, want, atol=0.2 * np.abs(want).max())


def test_static_without_calibration_data_is_a_clear_error():
    text, weights = PATTERNS["conv_relu"]
    model = build_model(text, weights)
    with pytest.raises(PassError, match=re.escape(
            "quant:int8 (static) needs calibration data: give --calib FILE, or use "
            "quant:int8,mode=dynamic or quant:int8,mode=weights")):
        PassManager("quant:int8").run(model, Context())


# -- accuracy tools ----------------------------------------------------------------------------
def _digits_error(name: str, spec: str, x: np.ndarray) -> tuple[float, object]:
    from edgeopt.passes.calib import load_calibration

    model = ir.load(f"{DIGITS}/{name}.onnx")
    want = run_ort(ir.to_proto(model), {"input": x})[0]
    step = quantize_model(model, spec, load_calibration(f"{DIGITS}/calib.npz", model))
    got = run_ort(ir.to_proto(model), {"input": x})[0]
    return float(np.linalg.norm(got - want) / np.linalg.norm(want)), (model, step)


@pytest.mark.parametrize("name", ["cnn", "resnet", "mobilenetv2", "mlp"])
def test_bias_correction_lowers_the_error_on_held_out_digits(name, digits):
    x, _ = digits
    on, (_, step) = _digits_error(name, "quant:int8", x)
    off, _ = _digits_error(name, "quant:int8,bias_correction=false", x)
    assert step.stats["biases_corrected"] > 0
    assert on < off * 0.97, (on, off)


def _layer_means(model: ir.Model, x: np.ndarray) -> dict[str, np.ndarray]:
    """Per-channel mean output of every Conv and Gemm, run in ONNX Runtime sample by sample
    (as the static batch-1 test models run), over the samples of ``x``."""
    names = [n.outputs[0].name for n in model.graph if n.op_type in ("Conv", "Gemm")]
    proto = ir.to_proto(model)
    proto.graph.output.extend(onnx.ValueInfoProto(name=n) for n in names)
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"])
    runs = [sess.run(names, {"x": x[i:i + 1]}) for i in range(len(x))]
    return {n: np.mean([r[k].mean(axis=(0, *range(2, r[k].ndim))) for r in runs], axis=0)
            for k, n in enumerate(names)}


@pytest.mark.parametrize("name", ["resnet", "mobilenetv2", "cnn"])
def test_bias_correction_gives_every_layer_the_float_channel_means(name):
    # Padded and strided 3x3 convs, depthwise ones, a strided 1x1 shortcut, Gemms: the float
    # means come from tap means (no float rerun) and must be exact for every window.
    float_model = ir.from_proto(NETS[name]())
    calib = calib_for(float_model, n=32)
    PassManager("fold-bn").run(float_model, Context())  # as quant does first
    head = calib.arrays["x"][:BIAS_SAMPLES]
    want = _layer_means(float_model, head)
    errors = {}
    for spec in ("quant:int8", "quant:int8,bias_correction=false"):
        model = ir.from_proto(NETS[name]())
        step = quantize_model(model, spec, calib)
        got = _layer_means(model, head)
        assert got.keys() == want.keys()
        errors[spec] = max(float(np.abs(got[k] - want[k]).max() / np.abs(want[k]).max())
                           for k in want)
    assert step.stats.get("biases_corrected") is None
    layers = sum(n.op_type in ("Conv", "Gemm") for n in model.graph)
    assert quantize_model(ir.from_proto(NETS[name]()), "quant:int8",
                          calib).stats["biases_corrected"] == layers
    # what is left is the int32 rounding of the corrected bias and float rounding
    assert errors["quant:int8"] < 1e-3 < errors["quant:int8,bias_correction=false"], errors


def test_sensitivity_is_measured_per_layer_and_reported(digits):
    x, _ = digits
    _, (model, step) = _digits_error("resnet", "quant:int8,sensitivity=true", x)
    layers = [n for n in model.graph if n.op_type in ("Conv", "Gemm")]
    assert step.stats["layers_measured"] == len(layers)
    sens = [n.meta["edgeopt.quant"]["sensitivity"] for n in layers]
    assert all(0 < s < 0.05 for s in sens) and len(set(sens)) == len(sens)


def test_target_keeps_the_most_sensitive_layers_float_until_met(digits):
    x, _ = digits
    _, (model, step) = _digits_error("mobilenetv2", "quant:int8,target=cos:0.99995", x)
    assert step.stats["target_score"] >= 0.99995 and step.stats["layers_float"] > 0
    layers = [n for n in model.graph if n.op_type in ("Conv", "Gemm")]
    kept = [n for n in layers if "float" in n.meta["edgeopt.quant"]]
    assert len(kept) == step.stats["layers_float"]
    for n in layers:  # float layers read their float weight; the others a DequantizeLinear
        assert (n.inputs[1].const_value is not None) == (n in kept)
    # the kept ones are the most sensitive
    sens = sorted((n.meta["edgeopt.quant"]["sensitivity"], n in kept) for n in layers)
    assert all(k for _, k in sens[-len(kept):])
    _, (_, loose) = _digits_error("mobilenetv2", "quant:int8,target=cos:0.9", x)
    assert loose.stats["layers_float"] == 0


@pytest.mark.parametrize("spec, message", [
    ("quant:int8,calibrator=kl", "unknown calibrator 'kl'; available: auto, entropy, minmax, "
                                 "mse, percentile"),
    ("quant:int8,target=cos:2", "target 'cos:2' must be cos:X (0..1), relerr:X or maxerr:X"),
    ("quant:int8,target=snr:30", "target 'snr:30' must be cos:X"),
    ("quant:int8,percentile=0", "percentile must be in (0, 100]"),
])
def test_option_errors(spec, message):
    text, weights = PATTERNS["conv_relu"]
    with pytest.raises(OptionError, match=re.escape(message)):
        PassManager(spec).run(build_model(text, weights), Context())


def test_cli_layer_table_shows_int8_weights_and_what_stayed_float(tmp_path, capsys):
    from edgeopt.tools.cli import main

    code = main([f"{DIGITS}/mobilenetv2.onnx", "-p", "quant:int8,target=cos:0.99995",
                 "--calib", f"{DIGITS}/calib.npz", "-o", str(tmp_path / "q.onnx")])
    out = capsys.readouterr().out
    assert code == 0
    assert "quant sensitivity / kept float" in out
    assert re.search(r"/head/head.5/Gemm +Gemm .* float->int8 +\d", out)
    assert "float (target cos:0.99995)" in out


def test_division_by_a_constant_is_quantized_as_a_product(tmp_path):
    """Hard-swish's ``/ 6`` (MobileNetV3, PP-OCR cls): no integer Div exists, Mul has one."""
    text = HEADER + """g (float[1,4,8,8] x, float[8,4,3,3] w, float[8] b, float six) => (float y) {
      c = Conv <pads = [1, 1, 1, 1]> (x, w, b)
      d = Div(c, six)
      t = Mul(d, c)
      y = Identity(t)
    }"""
    weights = {"w": _w(8, 4, 3, 3), "b": _w(8), "six": np.float32(6)}
    q = build_model(text, weights)
    step = quantize_model(q)
    assert step.stats["divisions_to_products"] == 1
    assert "Div" not in [n.op_type for n in q.graph]
    assert optimized_ops(q, tmp_path)["QLinearMul"] == 2
    x = calib_for(q, n=1, seed=4).arrays
    want = run_ort(ir.to_proto(build_model(text, weights)), x)[0]
    got = run_ort(ir.to_proto(q), x)[0]
    assert np.abs(got - want).max() < 0.05 * np.abs(want).max()


def test_csr_before_quant_is_named(caplog):
    """csr packs float weights; quant after it leaves dense int8 weights. The README says to
    run csr after quant: the pipeline that does it the other way round says so too."""
    import logging
    import os

    digits = os.path.join(os.path.dirname(__file__), "..", "..", "examples", "digits")
    model = ir.load(os.path.join(digits, "cnn.onnx"))
    calib = CalibrationData.for_model(
        dict(np.load(os.path.join(digits, "calib.npz"))), model)
    with caplog.at_level(logging.WARNING, logger="edgeopt.passes.quant"):
        PassManager("sparsify:0.8,csr,quant:int8", verify="end").run(model, Context(calib=calib))
    assert caplog.messages == [
        "quant: 6 CSR-packed weights (e.g. 'classifier.1.weight') are dense after "
        "quantization: csr ran before quant; run it after (-p ...,quant:int8,csr) to pack the "
        "quantized weights"]
    caplog.clear()
    model = ir.load(os.path.join(digits, "cnn.onnx"))
    with caplog.at_level(logging.WARNING, logger="edgeopt.passes.quant"):
        PassManager("sparsify:0.8,quant:int8,csr", verify="end").run(model, Context(calib=calib))
    assert caplog.messages == []
    assert any(isinstance(v.const_value, ir.CSRTensor) for v in model.graph.initializers.values())
