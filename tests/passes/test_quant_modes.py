"""quant without calibration data: weight-only int8, dynamic int8 and float16 weights."""

from __future__ import annotations

import logging
import os

import numpy as np
import onnx
import pytest
from conftest import build_model as build
from conftest import run_ort

from edgeopt import ir
from edgeopt.ir.quant import dequantize, params_from_range
from edgeopt.passes._quant_modes import convert_fp16, quantize_dynamic, quantize_weights

DIGITS = os.path.join(os.path.dirname(__file__), "..", "..", "examples", "digits")


def header(opset: int = 17) -> str:
    return f'<ir_version: 8, opset_import: ["" : {opset}]>\n'


def ops(model: ir.Model) -> list[str]:
    return [n.op_type for n in model.graph]


#: ORT runs a weight-only int8 MatMul as ``MatMulNBits`` with int8 activations unless told
#: otherwise (accuracy level 4); level 1 keeps float32 activations, the arithmetic checked here.
FLOAT_MATMULNBITS = {"session.qdq_matmulnbits_accuracy_level": "1"}


def ort(model: ir.Model, feeds: dict, config: dict[str, str] | None = None
        ) -> list[np.ndarray]:
    """Run in ONNX Runtime (CPU, one thread) with optional session config entries."""
    import onnxruntime

    so = onnxruntime.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = 1
    for key, value in (config or {}).items():
        so.add_session_config_entry(key, value)
    sess = onnxruntime.InferenceSession(ir.to_proto(model).SerializeToString(), so,
                                        providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def ort_optimized_ops(model: ir.Model, tmp_path) -> list[str]:
    """The operators of the graph ONNX Runtime actually runs (after its fusions)."""
    import onnxruntime

    so = onnxruntime.SessionOptions()
    so.log_severity_level = 3
    so.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    onnxruntime.InferenceSession(ir.to_proto(model).SerializeToString(), so,
                                 providers=["CPUExecutionProvider"])
    return [n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node]


def symmetric_int8(w: np.ndarray, axis: int | None) -> np.ndarray:
    """Reference weight-only quantization: symmetric int8, dequantized back to float32."""
    if axis is None:
        m = np.abs(w).max()
    else:
        m = np.abs(np.moveaxis(w, axis, 0)).reshape(w.shape[axis], -1).max(axis=1)
    qp = params_from_range(-m, m, ir.DataType.INT8, symmetric=True, axis=axis)
    scale = qp.broadcast(w.ndim)[0]
    return dequantize(np.clip(np.rint(w / scale), -127, 127).astype(np.int8), qp)


def dequantized_weight(model: ir.Model, name: str) -> tuple[np.ndarray, ir.QuantParams]:
    """The float weight a DequantizeLinear named by its output recomputes, and its params."""
    value = next(n.outputs[0] for n in model.graph if n.outputs[0].name == name)
    qp = ir.quant_params(value)
    assert qp is not None
    q = value.producer().inputs[0].const_value.numpy()
    return dequantize(q, qp), qp


def assert_close(got: np.ndarray, want: np.ndarray, rel: float = 1e-5) -> None:
    np.testing.assert_allclose(got, want, rtol=0, atol=rel * float(np.abs(want).max()))


CONV = header() + """g (float[1,3,8,8] x, float[4,3,3,3] w, float[4] b) => (float[1,4,8,8] y) {
  y = Conv<pads = [1, 1, 1, 1]>(x, w, b)
}"""


def conv_weight(rng: np.random.Generator) -> np.ndarray:
    """Channels whose ranges differ by 1e4, one all-zero channel, zeros inside the others."""
    w = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    w *= np.array([1e-3, 1.0, 10.0, 0.0], np.float32).reshape(4, 1, 1, 1)
    w[1, 0, 0, :] = 0.0
    return w


# -- weight-only int8 -----------------------------------------------------------------------
def test_weights_conv_per_channel():
    rng = np.random.default_rng(0)
    w, b = conv_weight(rng), rng.standard_normal(4).astype(np.float32)
    model = build(CONV, {"w": w, "b": b})
    feeds = {"x": rng.standard_normal((1, 3, 8, 8)).astype(np.float32)}

    stats = quantize_weights(model)
    ir.verify(model)
    assert stats == {"nodes_quantized": 1, "weights_quantized": 1,
                     "weight_bytes_before": 4 * 108, "weight_bytes_after": 108 + 4 * 4}
    assert ops(model) == ["DequantizeLinear", "Conv"]
    assert model.graph.initializers["w_q"].dtype == ir.DataType.INT8
    assert "w" not in model.graph.initializers and model.graph.initializers["b"].dtype == \
        ir.DataType.FLOAT  # the bias stays float
    deq, qp = dequantized_weight(model, "w")
    assert qp.axis == 0 and qp.dtype == ir.DataType.INT8 and not qp.zero_point.any()
    assert np.all(np.abs(deq - w) <= qp.broadcast(4)[0] / 2)
    assert np.all(deq[w == 0] == 0)  # zeros stay exactly zero, a zero channel too
    assert np.allclose(deq[0], w[0], atol=1e-5)  # the tiny channel kept its own scale
    np.testing.assert_array_equal(deq, symmetric_int8(w, 0))
    assert_close(ort(model, feeds)[0],
                 run_ort(ir.to_proto(build(CONV, {"w": deq, "b": b})), feeds)[0])
    assert quantize_weights(model)["nodes_quantized"] == 0  # idempotent


@pytest.mark.parametrize(("text", "x_shape", "shape", "axis"), [
    ("y = ConvTranspose<group = 2>(x, w)", (1, 4, 5, 5), (4, 3, 3, 3), 1),
    ("y = Gemm<transB = 1>(x, w)", (3, 4), (5, 4), 0),
    ("y = Gemm(x, w)", (3, 4), (4, 5), 1),
    ("y = MatMul(x, w)", (3, 4), (4, 5), 1),
    ("y = MatMul(x, w)", (2, 3, 4), (2, 4, 5), 2),
])
def test_weights_channel_axis(text, x_shape, shape, axis):
    rng = np.random.default_rng(1)
    w = rng.standard_normal(shape).astype(np.float32)
    source = header() + f"g (float{list(x_shape)} x, float{list(shape)} w) => (float y) " \
        f"{{ {text} }}"
    model = build(source, {"w": w})
    feeds = {"x": rng.standard_normal(x_shape).astype(np.float32)}
    assert quantize_weights(model)["nodes_quantized"] == 1
    ir.verify(model)
    deq, qp = dequantized_weight(model, "w")
    assert qp.axis == axis
    np.testing.assert_array_equal(deq, symmetric_int8(w, axis))
    want = run_ort(ir.to_proto(build(source, {"w": deq})), feeds)[0]
    assert_close(ort(model, feeds, FLOAT_MATMULNBITS)[0], want)
    assert_close(ort(model, feeds)[0], want, rel=0.02)  # ORT's default: int8 activations too


def test_weights_per_tensor():
    rng = np.random.default_rng(2)
    w, b = conv_weight(rng), np.zeros(4, np.float32)
    model = build(CONV, {"w": w, "b": b})
    quantize_weights(model, per_channel=False)
    deq, qp = dequantized_weight(model, "w")
    assert qp.axis is None and qp.scale.shape == ()
    np.testing.assert_array_equal(deq, symmetric_int8(w, None))
    assert not deq[0].any()  # per tensor, the 1e-3 channel is below half a step: why per channel


SHARED = header() + """g (float[2,4] x, float[4,4] w, float[4,4] v)
    => (float[2,4] y, float[2,4] z) {
  h = MatMul(x, w)
  y = MatMul(h, w)
  a = MatMul(x, v)
  z = Add(a, v0)
}"""


def test_weights_shared_skipped_and_mixed_readers():
    rng = np.random.default_rng(3)
    weights = {k: rng.standard_normal((4, 4)).astype(np.float32) for k in "wv"}
    model = build(SHARED.replace("v0", "v"), weights)
    stats = quantize_weights(model)
    ir.verify(model)
    # w (two readers) is quantized once; v is also read by Add, so it stays float.
    assert stats["nodes_quantized"] == 2 and stats["weights_quantized"] == 1
    assert ops(model).count("DequantizeLinear") == 1
    assert model.graph.initializers["v"].dtype == ir.DataType.FLOAT

    model = build(SHARED.replace("v0", "x"), weights)
    stats = quantize_weights(model, skip=lambda n: n.outputs[0].name == "y")
    assert stats["nodes_quantized"] == 1  # v; w has a skipped reader
    assert model.graph.initializers["w"].dtype == ir.DataType.FLOAT


def test_subgraphs_stay_float():
    rng = np.random.default_rng(4)
    w, v = (rng.standard_normal((4, 4)).astype(np.float32) for _ in range(2))
    text = header() + """g (bool c, float[2,4] x, float[4,4] w, float[4,4] v) => (float[2,4] y) {
      y = If(c) <then_branch = t () => (float[2,4] a) { a = MatMul(x, w) },
                 else_branch = e () => (float[2,4] b) { b = MatMul(x, v) }>
    }"""
    for fn in (quantize_weights, quantize_dynamic, convert_fp16):
        model = build(text, {"w": w, "v": v})
        stats = fn(model)
        assert not any(stats.values()) and ops(model) == ["If"]
        assert all(n.op_type == "MatMul" for sub in model.graph.subgraphs() for n in sub)


def test_weights_below_opset_13_use_cast_and_mul():
    """Per-axis DequantizeLinear needs opset 13: below it the same arithmetic is Cast + Mul."""
    rng = np.random.default_rng(5)
    w, b = conv_weight(rng), rng.standard_normal(4).astype(np.float32)
    text = CONV.replace('"" : 17', '"" : 12')
    model = build(text, {"w": w, "b": b})
    feeds = {"x": rng.standard_normal((1, 3, 8, 8)).astype(np.float32)}
    assert quantize_weights(model)["nodes_quantized"] == 1
    ir.verify(model)
    assert ops(model) == ["Cast", "Mul", "Conv"]
    assert_close(ort(model, feeds)[0],
                 run_ort(ir.to_proto(build(text, {"w": symmetric_int8(w, 0), "b": b})),
                         feeds)[0])


def test_weights_cast_form_folds_in_ort(tmp_path):
    """``form="cast"``: Cast + Mul, which ONNX Runtime folds at load (float speed)."""
    rng = np.random.default_rng(11)
    w, b = conv_weight(rng), rng.standard_normal(4).astype(np.float32)
    model = build(CONV, {"w": w, "b": b})
    feeds = {"x": rng.standard_normal((1, 3, 8, 8)).astype(np.float32)}
    assert quantize_weights(model, form="cast")["weight_bytes_after"] == 108 + 4 * 4
    assert ops(model) == ["Cast", "Mul", "Conv"]
    assert not {"Cast", "Mul"} & set(ort_optimized_ops(model, tmp_path))
    assert_close(ort(model, feeds)[0],
                 run_ort(ir.to_proto(build(CONV, {"w": symmetric_int8(w, 0), "b": b})),
                         feeds)[0])


# -- dynamic int8 ---------------------------------------------------------------------------
def dynamic_reference(x: np.ndarray, w_kn: np.ndarray, per_channel: bool = True) -> np.ndarray:
    """DynamicQuantizeLinear (uint8, ONNX formula) times symmetric int8 ``[K, N]`` weights."""
    lo, hi = min(0.0, float(x.min())), max(0.0, float(x.max()))
    xs = np.float32((hi - lo) / 255)
    xz = np.clip(np.rint(-lo / xs), 0, 255)
    xq = np.clip(np.rint(x / xs) + xz, 0, 255)
    m = np.abs(w_kn).max(axis=0) if per_channel else np.abs(w_kn).max()
    ws = params_from_range(-m, m, ir.DataType.INT8, True, 1 if per_channel else None).scale
    wq = np.clip(np.rint(w_kn / ws), -127, 127)
    return ((xq - xz) @ wq).astype(np.float32) * (xs * ws)


def test_dynamic_matmul(tmp_path):
    rng = np.random.default_rng(6)
    w = rng.standard_normal((16, 8)).astype(np.float32)
    text = header() + """g (float[2,5,16] x, float[16,8] w) => (float[2,5,8] y, float[2,5,5] s) {
      y = MatMul(x, w)
      t = Transpose<perm = [0, 2, 1]>(y)
      s = MatMul(y, t)
    }"""
    model = build(text, {"w": w})
    feeds = {"x": rng.standard_normal((2, 5, 16)).astype(np.float32)}
    float_y = ort(model, feeds)[0]

    stats = quantize_dynamic(model)
    ir.verify(model)
    assert stats == {"nodes_quantized": 1, "weights_quantized": 1,
                     "weight_bytes_before": 512, "weight_bytes_after": 128 + 8 + 32}
    assert ops(model) == ["DynamicQuantizeLinear", "MatMulInteger", "Cast", "Mul", "Mul",
                          "Transpose", "MatMul"]  # the MatMul of two activations stays float
    assert [v.name for v in model.graph.outputs] == ["y", "s"]
    y = ort(model, feeds)[0]
    assert_close(y, dynamic_reference(feeds["x"], w))
    assert_close(y, float_y, rel=0.02)  # int8 weights and activations: within 2% of float
    assert "DynamicQuantizeMatMul" in ort_optimized_ops(model, tmp_path)
    assert quantize_dynamic(model)["nodes_quantized"] == 0  # idempotent


@pytest.mark.parametrize("c_const", [True, False])
def test_dynamic_gemm(tmp_path, c_const):
    rng = np.random.default_rng(7)
    w = rng.standard_normal((8, 16)).astype(np.float32)  # [N, K]: transB
    c = rng.standard_normal(8).astype(np.float32)
    text = header() + """g (float[4,16] x, float[8,16] w, float[8] c) => (float[4,8] y) {
      y = Gemm<transB = 1, alpha = 0.5, beta = 2.0>(x, w, c)
    }"""
    model = build(text, {"w": w, **({"c": c} if c_const else {})})
    feeds = {"x": rng.standard_normal((4, 16)).astype(np.float32),
             **({} if c_const else {"c": c})}
    quantize_dynamic(model)
    ir.verify(model)
    scaled = ["DynamicQuantizeLinear", "MatMulInteger", "Cast", "Mul", "Mul"]
    assert ops(model) == scaled + (["Add"] if c_const else ["Mul", "Add"])  # beta * C
    want = 0.5 * dynamic_reference(feeds["x"], w.T) + 2.0 * c
    assert_close(ort(model, feeds)[0], want)
    assert "DynamicQuantizeMatMul" in ort_optimized_ops(model, tmp_path)


def test_dynamic_per_tensor_and_skip():
    rng = np.random.default_rng(8)
    w = rng.standard_normal((16, 8)).astype(np.float32)
    text = header() + "g (float[3,16] x, float[16,8] w) => (float[3,8] y) { y = MatMul(x, w) }"
    feeds = {"x": rng.standard_normal((3, 16)).astype(np.float32)}
    model = build(text, {"w": w})
    quantize_dynamic(model, per_channel=False)
    assert_close(ort(model, feeds)[0], dynamic_reference(feeds["x"], w, per_channel=False))
    model = build(text, {"w": w})
    assert quantize_dynamic(model, skip=lambda n: True)["nodes_quantized"] == 0
    assert ops(model) == ["MatMul"]


def test_dynamic_conv_integer():
    """``conv="integer"``: ConvInteger by uint8 weights (zero point 128), scales per channel."""
    rng = np.random.default_rng(9)
    w, b = conv_weight(rng), rng.standard_normal(4).astype(np.float32)
    model = build(CONV, {"w": w, "b": b})
    feeds = {"x": rng.standard_normal((1, 3, 8, 8)).astype(np.float32)}
    assert quantize_dynamic(model)["nodes_quantized"] == 0  # Conv stays float by default

    stats = quantize_dynamic(model, conv="integer")
    ir.verify(model)
    assert stats["nodes_quantized"] == 1
    assert ops(model) == ["DynamicQuantizeLinear", "ConvInteger", "Cast", "Mul", "Mul", "Add"]
    wq = model.graph.initializers["w_q"].const_value.numpy()
    assert wq.dtype == np.uint8 and np.all(wq[w == 0] == 128)
    # Reference: the same integers through a float Conv (exact: small integer sums).
    x = feeds["x"]
    xs = np.float32((max(0.0, x.max()) - min(0.0, x.min())) / 255)
    xz = np.clip(np.rint(-min(0.0, x.min()) / xs), 0, 255)
    xq = np.clip(np.rint(x / xs) + xz, 0, 255) - xz
    m = np.abs(w).reshape(4, -1).max(axis=1)
    ws = params_from_range(-m, m, ir.DataType.UINT8, True, 0).scale
    acc = run_ort(ir.to_proto(build(CONV, {"w": wq.astype(np.float32) - 128,
                                           "b": np.zeros(4, np.float32)})),
                  {"x": xq.astype(np.float32)})[0]
    assert_close(ort(model, feeds)[0], acc * (xs * ws).reshape(4, 1, 1) + b.reshape(4, 1, 1))


def test_dynamic_on_a_conv_model_says_why_nothing_changed(caplog):
    """PP-OCRv4 det is all Convs: mode=dynamic (MatMul/Gemm only) used to change nothing
    silently."""
    from edgeopt.passes import PassManager

    rng = np.random.default_rng(2)
    model = build(CONV, {"w": conv_weight(rng), "b": rng.standard_normal(4).astype(np.float32)})
    with caplog.at_level(logging.WARNING):
        report = PassManager("quant:int8,mode=dynamic").run(model)
    assert not report.modified
    assert caplog.messages == [
        "quant: mode=dynamic changed nothing: it runs MatMul/Gemm by constant weights in int8, "
        "and the model's 1 Convs stay float (conv=integer makes them ConvInteger, slower than "
        "float Conv in ONNX Runtime on most shapes; mode=weights shrinks the file; static "
        "quant:int8 with --calib runs int8 kernels)"]
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert PassManager("quant:int8,mode=dynamic,conv=integer").run(model).modified
    assert caplog.messages == []


def test_dynamic_needs_opset_11(caplog):
    text = header(10) + "g (float[3,4] x, float[4,2] w) => (float[3,2] y) { y = MatMul(x, w) }"
    model = build(text, {"w": np.ones((4, 2), np.float32)})
    with caplog.at_level(logging.WARNING):
        assert quantize_dynamic(model)["nodes_quantized"] == 0
    assert "dynamic int8 needs opset >= 11 (the model has 10)" in caplog.text


# -- float16 --------------------------------------------------------------------------------
FP16 = header() + """g (float[2,32] x, float[32,32] w, float[32] b, float[32] big)
    => (float[2,32] y) {
  h = MatMul(x, w)
  g = Add(h, b)
  k = Mul(g, big)
  y = Add(k, k)
}"""


def test_fp16_weights(tmp_path, caplog):
    rng = np.random.default_rng(10)
    weights = {"w": rng.standard_normal((32, 32)).astype(np.float32),
               "b": rng.standard_normal(32).astype(np.float32),
               "big": np.full(32, 1e-6, np.float32)}
    weights["big"][3] = 1e9  # beyond float16: the tensor stays float32
    model = build(FP16, weights)
    feeds = {"x": rng.standard_normal((2, 32)).astype(np.float32)}
    want = ort(model, feeds)[0]
    with caplog.at_level(logging.WARNING):
        stats = convert_fp16(model)
    ir.verify(model)
    assert "'big' has values beyond the float16 range; it stays float32" in caplog.text
    assert stats == {"tensors_converted": 2, "tensors_out_of_range": 1,
                     "weight_bytes_before": 4 * (32 * 32 + 32),
                     "weight_bytes_after": 2 * (32 * 32 + 32)}
    inits = model.graph.initializers
    assert inits["w_fp16"].dtype == inits["b_fp16"].dtype == ir.DataType.FLOAT16
    assert inits["big"].dtype == ir.DataType.FLOAT
    assert ops(model) == ["Cast", "MatMul", "Cast", "Add", "Mul", "Add"]
    proto = ir.to_proto(model)  # the model's I/O keep their float32 types and names
    assert [(v.name, v.type.tensor_type.elem_type) for v in proto.graph.input] == \
        [("x", onnx.TensorProto.FLOAT)]
    assert [(v.name, v.type.tensor_type.elem_type) for v in proto.graph.output] == \
        [("y", onnx.TensorProto.FLOAT)]
    rounded = {k: v.astype(np.float16).astype(np.float32) if k != "big" else v
               for k, v in weights.items()}
    assert_close(ort(model, feeds)[0], run_ort(ir.to_proto(build(FP16, rounded)), feeds)[0])
    assert_close(ort(model, feeds)[0], want, rel=1e-2)
    assert "Cast" not in ort_optimized_ops(model, tmp_path)  # ORT folds the Casts at load
    assert convert_fp16(model)["tensors_converted"] == 0  # idempotent


def test_fp16_keeps_small_tensors():
    """Scalars and short vectors (epsilons) stay float32: a 1e-12 would flush to zero."""
    text = header() + "g (float[2,4] x, float[4] eps) => (float[2,4] y) { y = Add(x, eps) }"
    model = build(text, {"eps": np.full(4, 1e-12, np.float32)})
    assert convert_fp16(model)["tensors_converted"] == 0 and ops(model) == ["Add"]


# -- the digits examples --------------------------------------------------------------------
@pytest.fixture(scope="module")
def digits():
    data = np.load(os.path.join(DIGITS, "digits_16x16.npz"))
    return data["test_x"].astype(np.float32), data["test_y"]


def logits(path_or_model, x: np.ndarray) -> np.ndarray:
    proto = onnx.load(path_or_model) if isinstance(path_or_model, str) \
        else ir.to_proto(path_or_model)
    return run_ort(proto, {proto.graph.input[0].name: x})[0]


MODES = {"weights": quantize_weights, "fp16": convert_fp16, "dynamic": quantize_dynamic,
         "dynamic-conv": lambda m: quantize_dynamic(m, conv="integer")}


@pytest.mark.parametrize("name", ["cnn", "resnet", "mobilenetv2", "mlp"])
@pytest.mark.parametrize("mode", list(MODES))
def test_digits(digits, tmp_path, name, mode):
    x, labels = digits
    src = os.path.join(DIGITS, f"{name}.onnx")
    want = logits(src, x)
    model = ir.load(src)
    ir.save(model, tmp_path / "float.onnx")  # the baseline: the same export, unquantized
    nodes = len(model.graph)
    stats = MODES[mode](model)
    ir.verify(model)
    ir.save(model, tmp_path / "q.onnx")
    got = logits(str(tmp_path / "q.onnx"), x)
    accuracy = lambda y: float(np.mean(y.argmax(axis=1) == labels))  # noqa: E731
    assert accuracy(got) >= accuracy(want) - 0.01
    # Logits within 3% (fp16: 0.2%, integer Convs: 6%) of their largest magnitude.
    tolerance = {"fp16": 0.002, "dynamic-conv": 0.06}.get(mode, 0.03)
    assert np.abs(got - want).max() <= tolerance * np.abs(want).max()
    before, after = stats["weight_bytes_before"], stats["weight_bytes_after"]
    # int8: a quarter, plus 5 bytes (scale, zero point) per channel: 9-element depthwise
    # channels make it 0.3 on mobilenetv2.
    assert before > 0 and after <= (0.5 if mode == "fp16" else 0.3) * before
    # The file shrinks by the weight bytes saved, less at most 400 bytes per node added (the
    # names and value infos of the new values and initializers: about 320 measured).
    size = os.path.getsize(tmp_path / "q.onnx")
    assert size <= os.path.getsize(tmp_path / "float.onnx") - (before - after) \
        + 400 * (len(model.graph) - nodes)
    kernels = {"dynamic": "DynamicQuantizeMatMul", "dynamic-conv": "ConvInteger"}
    if mode in kernels and (mode == "dynamic" or name != "mlp"):
        assert kernels[mode] in ort_optimized_ops(model, tmp_path)


def test_dynamic_then_weights(tmp_path):
    """Integer MatMuls plus int8-stored Convs: the two modes compose."""
    model = ir.load(os.path.join(DIGITS, "cnn.onnx"))
    assert quantize_dynamic(model)["nodes_quantized"] == 2  # the two Gemms
    assert quantize_weights(model)["nodes_quantized"] == 4  # the four Convs
    ir.verify(model)
    optimized = ort_optimized_ops(model, tmp_path)
    assert optimized.count("DynamicQuantizeMatMul") == 2 and "DequantizeLinear" in optimized


@pytest.mark.parametrize(("name", "ratio"), [("mlp", 0.27), ("cnn", 0.28)])
def test_digits_file_shrinks_to_a_quarter(tmp_path, name, ratio):
    """Models made of Conv/Gemm weights: weight-only int8 files are about 1/4 the size."""
    src = os.path.join(DIGITS, f"{name}.onnx")
    model = ir.load(src)
    quantize_weights(model)
    ir.save(model, tmp_path / "q.onnx")
    assert os.path.getsize(tmp_path / "q.onnx") <= ratio * os.path.getsize(src)


def test_weights_computed_from_constants_are_named(caplog):
    # The onnx light models compute their weights (ConstantOfShape): quant cannot quantize
    # them and says so, with the fix; after simplify they are constants and get quantized.
    from conftest import ONNX_TEST_DATA

    from edgeopt.passes import PassManager

    model = ir.load(os.path.join(ONNX_TEST_DATA, "light", "light_squeezenet.onnx"))
    with caplog.at_level(logging.WARNING, logger="edgeopt.passes.quant"):
        step = PassManager("quant:int8,mode=weights", verify="none").run(model).steps[0]
    assert not step.modified
    assert caplog.messages == [
        "quant: 26 Conv/Gemm/MatMul layer(s) compute their weights instead of holding them "
        "(e.g. 'n0', from ConstantOfShape); they stay float; fold them into constants first: "
        "-p simplify,quant:..."]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="edgeopt.passes.quant"):
        report = PassManager("simplify,quant:int8,mode=weights", verify="none").run(model)
    assert caplog.messages == []
    assert report.steps[-1].stats["weights_quantized"] > 0  # 18: simplify merges equal fills
    convs = [n for n in model.graph if n.op_type == "Conv"]
    assert len(convs) == 26
    assert all(n.inputs[1].const_value is None for n in convs)  # computed from int8 now
    with caplog.at_level(logging.WARNING, logger="edgeopt.passes.quant"):  # not "computed"
        PassManager("quant:int8,mode=weights", verify="none").run(model)
    assert caplog.messages == []
