"""QDQ -> QOperator lowering, on models ONNX Runtime's own quantizer writes.

The fixtures are float models (``tests/models.py`` builders, small ``onnx.helper`` graphs and
the digits examples) quantized by ``onnxruntime.quantization.quantize_static`` in QDQ
format. Each test lowers the QDQ model, exports it and checks, in ONNX Runtime:

* exactness against the QDQ model as ONNX Runtime runs it, where its graph optimizer fuses
  every island into the same integer kernels (uint8 activations);
* at most one step of the output quantization against the QDQ model run unoptimized
  (float operators between Q and DQ): float accumulation and integer requantization may
  round a value that lies on a rounding boundary to different neighbours. This is also
  the bound where ONNX Runtime leaves islands in float itself (with int8 activations it
  does not fuse depthwise Convs or Adds, which the lowering does);
* the structure: which operators are left, and how many Q/DQ nodes remain.
"""

from __future__ import annotations

import os
from collections import Counter

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import edgeopt
from edgeopt import ir
from edgeopt.passes._quant_qop import lower_to_qoperator

ort = pytest.importorskip("onnxruntime")
quantization = pytest.importorskip("onnxruntime.quantization")
import models  # noqa: E402  (tests/models.py, on the path through conftest)

DIGITS = os.path.join(os.path.dirname(__file__), "..", "..", "examples", "digits")
QU8, QI8 = quantization.QuantType.QUInt8, quantization.QuantType.QInt8
ZERO = {"qlinear_nodes": 0, "integer_nodes": 0, "activations_absorbed": 0, "qdq_removed": 0,
        "float_ops_kept": 0, "activations_to_uint8": 0}


# -- fixtures ----------------------------------------------------------------------------
class _Reader(quantization.CalibrationDataReader):
    def __init__(self, name: str, batches: np.ndarray) -> None:
        self.items = iter([{name: b} for b in batches])

    def get_next(self) -> dict | None:
        return next(self.items, None)


def quantize_qdq(proto: onnx.ModelProto, batches: np.ndarray, tmp_path, per_channel=True,
                 activation=QU8, **kw) -> onnx.ModelProto:
    """``proto`` quantized by ONNX Runtime (QDQ, int8 weights), calibrated on ``batches``."""
    src, dst = str(tmp_path / "float.onnx"), str(tmp_path / "qdq.onnx")
    onnx.save(proto, src)
    quantization.quantize_static(src, dst, _Reader(proto.graph.input[0].name, batches),
                                 quant_format=quantization.QuantFormat.QDQ,
                                 per_channel=per_channel, activation_type=activation,
                                 weight_type=QI8, **kw)
    return onnx.load(dst)


def simplified(proto: onnx.ModelProto) -> onnx.ModelProto:
    """``proto`` after edgeopt's ``simplify`` (BatchNormalization folded, as before quant)."""
    model = ir.from_proto(proto)
    edgeopt.optimize(model, "simplify")
    return ir.to_proto(model)


def lowered(qdq: onnx.ModelProto, **options) -> tuple[onnx.ModelProto, dict[str, int]]:
    """The lowered model (verified, and holding no initializer that nothing reads)."""
    model = ir.from_proto(qdq)
    stats = lower_to_qoperator(model, **options)
    ir.verify(model, level="onnx")
    proto = ir.to_proto(model)
    read = {name for n in proto.graph.node for name in n.input}
    assert [t.name for t in proto.graph.initializer if t.name not in read] == []
    return proto, stats


def run(proto: onnx.ModelProto, feeds: dict, optimize: bool = True) -> list[np.ndarray]:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = 1
    if not optimize:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(proto.SerializeToString(), so,
                                providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def output_scales(proto: onnx.ModelProto) -> list[float]:
    """The scale of the DequantizeLinear behind each graph output (through Identity);
    0 for an output computed in float (which must then match to float rounding)."""
    inits = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    producers = {o: n for n in proto.graph.node for o in n.output}
    scales = []
    for out in proto.graph.output:
        node = producers[out.name]
        while node.op_type == "Identity":
            node = producers[node.input[0]]
        dequantized = node.op_type == "DequantizeLinear"
        scales.append(float(inits[node.input[1]]) if dequantized else 0.0)
    return scales


def ops(proto: onnx.ModelProto) -> Counter:
    return Counter(n.op_type for n in proto.graph.node)


def float_islands(proto: onnx.ModelProto) -> Counter:
    """Operators reading a DequantizeLinear output (computing in float on quantized data)."""
    dq_outs = {n.output[0] for n in proto.graph.node if n.op_type == "DequantizeLinear"}
    return Counter(n.op_type for n in proto.graph.node
                   if n.op_type != "DequantizeLinear" and set(n.input) & dq_outs)


def check_numerics(qdq: onnx.ModelProto, low: onnx.ModelProto, feeds: dict,
                   exact: bool = True) -> None:
    """Equal to the QDQ model as ORT runs it (bit-exact unless ``exact`` is off), and
    within one output quantization step of the QDQ model computed in float."""
    got = run(low, feeds)
    scales = output_scales(low)
    for g, want, scale in zip(got, run(qdq, feeds), scales, strict=True):
        if exact:
            np.testing.assert_array_equal(g, want)
        else:
            assert np.abs(g - want).max() <= scale * 1.0001 + 1e-6
    for g, want, scale in zip(got, run(qdq, feeds, optimize=False), scales, strict=True):
        assert np.abs(g - want).max() <= scale * 1.0001 + 1e-6


def check_interface(before: onnx.ModelProto, after: onnx.ModelProto) -> None:
    """Same input and output names, element types and shapes."""
    for old, new in ((before.graph.input, after.graph.input),
                     (before.graph.output, after.graph.output)):
        assert [(v.name, v.type) for v in old] == [(v.name, v.type) for v in new]


def digits(name: str) -> onnx.ModelProto:
    return simplified(onnx.load(os.path.join(DIGITS, f"{name}.onnx")))


def digits_batches(n: int = 32) -> np.ndarray:
    """The first ``n`` calibration images, one per batch."""
    return np.load(os.path.join(DIGITS, "calib.npz"))["input"][:n, None]


def random_batches(proto: onnx.ModelProto, n: int = 16, seed: int = 0) -> np.ndarray:
    """Seeded standard-normal batches of the model's static input shape."""
    shape = [d.dim_value or 1 for d in proto.graph.input[0].type.tensor_type.shape.dim]
    return np.random.default_rng(seed).standard_normal((n, *shape)).astype(np.float32)


def data_movement_net(seed: int = 0) -> onnx.ModelProto:
    """Conv, AveragePool, Pad, Resize (nearest), Slice, Split, two Convs, Concat,
    Unsqueeze/Squeeze, Sigmoid gating (Mul), GlobalAveragePool, Flatten, Gemm."""
    n = models.Net(seed)
    h = n.act(n.conv(models.T("x", 3, 8), 8))
    h = n.node("AveragePool", [h.name], 8, 4, kernel_shape=[2, 2], strides=[2, 2])
    pads = n.const("pads", np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64))
    h = n.node("Pad", [h.name, pads], 8, 6)
    scales = n.const("scales", np.array([1, 1, 2, 2], np.float32))
    h = n.node("Resize", [h.name, "", scales], 8, 12, mode="nearest")
    i64 = lambda *v: np.array(v, np.int64)  # noqa: E731
    h = n.node("Slice", [h.name, n.const("st", i64(1, 1)), n.const("en", i64(11, 11)),
                         n.const("ax", i64(2, 3))], 8, 10)
    s = n.node("Split", [h.name, n.const("sp", i64(4, 4))], 4, 10, n_out=2, axis=1)
    a, b = n.conv(models.T(s.name, 4, 10), 8), n.conv(models.T(f"{s.name}_1", 4, 10), 8)
    c = n.node("Concat", [a.name, b.name], 16, 10, axis=1)
    u = n.node("Unsqueeze", [c.name, n.const("u0", i64(0))], 16, 10)
    q = n.node("Squeeze", [u.name, n.const("s0", i64(0))], 16, 10)
    g = n.binary("Mul", n.act(q, "Sigmoid"), c)
    return n.model([1, 3, 8, 8], n.gemm(n.flatten(n.gap(g)), 10), "moves")


def hand_qdq(tail: str | None = None, out_scale: float = 0.02, out_zp: int = 0,
             bias_factor: float = 1.0, float_reader: bool = False,
             zero_points: bool = True) -> onnx.ModelProto:
    """``x -> Q -> DQ -> Conv(DQ w per channel, DQ int32 bias) [-> tail] -> Q -> DQ -> y``.

    Args:
        tail: None, ``"relu"`` or ``"clip"`` (Clip to [0, 6]) between the Conv and its Q.
        out_scale, out_zp: the output quantization (uint8).
        bias_factor: the bias DQ's scale relative to ``x_scale * w_scale`` (its integers are
            divided by it, so the bias means about the same).
        float_reader: the dequantized input is also read by a float Tanh (output ``z``).
        zero_points: False omits every zero point that is 0 (the output's and the bias's).
    """
    rng = np.random.default_rng(0)
    x_s, x_z = np.float32(0.02), np.uint8(128)
    w_s = (np.arange(1, 5) * 0.004).astype(np.float32)
    bias = rng.integers(-3000, 3000, 4)
    consts = {"x_s": x_s, "x_z": x_z, "w": rng.integers(-127, 128, (4, 3, 3, 3)).astype(np.int8),
              "w_s": w_s, "w_z": np.zeros(4, np.int8),
              "b": np.rint(bias / bias_factor).astype(np.int32),
              "b_s": (x_s * w_s * np.float32(bias_factor)).astype(np.float32),
              "b_z": np.zeros(4, np.int32), "y_s": np.float32(out_scale),
              "y_z": np.uint8(out_zp)}
    nodes = [helper.make_node("QuantizeLinear", ["x", "x_s", "x_z"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "x_s", "x_z"], ["xd"]),
             helper.make_node("DequantizeLinear", ["w", "w_s", "w_z"], ["wd"], axis=0),
             helper.make_node("DequantizeLinear", ["b", "b_s", "b_z"], ["bd"], axis=0),
             helper.make_node("Conv", ["xd", "wd", "bd"], ["c"], pads=[1] * 4)]
    if tail == "relu":
        nodes.append(helper.make_node("Relu", ["c"], ["t"]))
    elif tail == "clip":
        consts.update(lo=np.float32(0), hi=np.float32(6))
        nodes.append(helper.make_node("Clip", ["c", "lo", "hi"], ["t"]))
    nodes += [helper.make_node("QuantizeLinear", ["t" if tail else "c", "y_s", "y_z"], ["yq"]),
              helper.make_node("DequantizeLinear", ["yq", "y_s", "y_z"], ["y"])]
    if not zero_points:  # drop the zero-point inputs that are 0 (ONNX's default)
        for node in nodes:
            if node.input[2] in ("b_z", "y_z") and not consts[node.input[2]].any():
                del node.input[2]
        consts = {k: v for k, v in consts.items() if k not in ("b_z", "y_z")}
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 6, 6])]
    if float_reader:
        nodes.append(helper.make_node("Tanh", ["xd"], ["z"]))
        outputs.append(helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, 3, 6, 6]))
    graph = helper.make_graph(
        nodes, "hand", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 6, 6])],
        outputs, [numpy_helper.from_array(np.asarray(v), k) for k, v in consts.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def hand_feeds() -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(1).uniform(-2.5, 2.5, (1, 3, 6, 6)).astype(np.float32)}


def stats_of(**nonzero: int) -> dict[str, int]:
    return {**ZERO, **nonzero}


# -- the digits examples: fully integer -------------------------------------------------
DIGITS_OPS = {
    "cnn": {"QLinearConv": 4, "MaxPool": 3, "Flatten": 1, "QGemm": 2},
    "resnet": {"QLinearConv": 8, "QLinearAdd": 3, "QLinearGlobalAveragePool": 1, "Flatten": 1,
               "QGemm": 1},
    "mobilenetv2": {"QLinearConv": 17, "QLinearAdd": 3, "QLinearGlobalAveragePool": 1,
                    "Flatten": 1, "QGemm": 1},
    "mlp": {"Flatten": 1, "QGemm": 3},  # the Flatten reads the float input, before its Q
}


@pytest.mark.parametrize("activation", [QU8, QI8], ids=["uint8", "int8"])
@pytest.mark.parametrize("name", sorted(DIGITS_OPS))
def test_digits_models_become_fully_integer(name, activation, tmp_path):
    qdq = quantize_qdq(digits(name), digits_batches(), tmp_path, activation=activation)
    low, stats = lowered(qdq)
    # One Q at the input, one DQ at the output; nothing else converts between int and float.
    assert ops(low) == Counter({**DIGITS_OPS[name], "QuantizeLinear": 1,
                                "DequantizeLinear": 1})
    assert stats["float_ops_kept"] == 0 and stats["activations_absorbed"] == 0
    assert stats["qdq_removed"] == ops(qdq)["QuantizeLinear"] + ops(qdq)["DequantizeLinear"] - 2
    check_interface(qdq, low)
    check_numerics(qdq, low, {"input": digits_batches(64)[:, 0]}, exact=activation == QU8)
    opsets = {o.domain: o.version for o in low.opset_import}
    assert opsets == {"": 17, "com.microsoft": 1}


def test_per_tensor_weights_stay_correct(tmp_path):
    qdq = quantize_qdq(digits("resnet"), digits_batches(), tmp_path, per_channel=False)
    low, stats = lowered(qdq)
    check_numerics(qdq, low, {"input": digits_batches(16)[:, 0]})
    check_interface(qdq, low)
    assert ops(low)["QLinearAdd"] == 3 and stats["qlinear_nodes"] >= 4


def test_per_tensor_weights_become_fully_integer(tmp_path):
    qdq = quantize_qdq(digits("resnet"), digits_batches(), tmp_path, per_channel=False)
    low, _ = lowered(qdq)
    assert ops(low) == Counter({**DIGITS_OPS["resnet"], "QuantizeLinear": 1,
                                "DequantizeLinear": 1})


# -- the test-model builders: every supported op, and islands left alone -----------------
BUILDER_CASES = {
    # name: (ops that must appear in the lowered model, float islands left as QDQ)
    "cnn": ({"QLinearConv": 3, "MaxPool": 1, "QLinearLeakyRelu": 1, "QGemm": 2}, {}),
    "resnet": ({"QLinearConv": 8, "QLinearAdd": 3, "QLinearGlobalAveragePool": 1}, {}),
    "mobilenetv2": ({"QLinearConv": 11, "QLinearAdd": 2}, {}),
    "se": ({"QLinearSigmoid": 1, "QLinearMul": 1, "QLinearGlobalAveragePool": 2},
           {"HardSwish": 1}),
    "concat": ({"QLinearConcat": 3, "MaxPool": 1}, {}),
    "mlp": ({"QLinearMatMul": 2, "QLinearAdd": 2, "QGemm": 1}, {"Tanh": 1}),
    "shuffle": ({"Reshape": 2, "Transpose": 1, "QLinearConv": 4}, {}),
    "moves": ({"QLinearAveragePool": 1, "Pad": 1, "Resize": 1, "Slice": 1, "Split": 1,
               "Concat": 0, "QLinearConcat": 1, "Unsqueeze": 1, "Squeeze": 1,
               "QLinearSigmoid": 1, "QLinearMul": 1}, {}),
}


@pytest.mark.parametrize("name", sorted(BUILDER_CASES))
def test_builder_models(name, tmp_path):
    builder = data_movement_net if name == "moves" else models.BUILDERS[name]
    proto = simplified(builder(0))
    qdq = quantize_qdq(proto, random_batches(proto), tmp_path)
    low, stats = lowered(qdq)
    wanted, kept = BUILDER_CASES[name]
    counts = ops(low)
    assert {op: counts[op] for op in wanted} == wanted
    # The builders name their output with a final Identity, which reads the output's DQ.
    assert float_islands(low) == Counter({**kept, "Identity": 1})
    assert stats["float_ops_kept"] == sum(kept.values()) + 1
    # Q and DQ remain only at the float boundaries: the input, the output, the kept islands.
    boundaries = 1 + sum(kept.values())
    assert counts["QuantizeLinear"] == boundaries and counts["DequantizeLinear"] == boundaries
    check_interface(qdq, low)
    check_numerics(qdq, low, {"x": random_batches(proto, 1, seed=5)[0]})


# -- Relu/Clip: absorbed, requantized or left alone --------------------------------------
def test_relu_the_quantizer_keeps_becomes_a_lookup(tmp_path):
    """Excluded from quantization, a Relu sits between its own Q/DQ pairs (DQ -> Relu -> Q
    with different scales): it becomes QLinearLeakyRelu with alpha 0."""
    proto = simplified(models.resnet(0))
    types = ["Conv", "Add", "GlobalAveragePool", "Flatten", "Gemm"]
    qdq = quantize_qdq(proto, random_batches(proto), tmp_path, op_types_to_quantize=types)
    assert float_islands(qdq)["Relu"] == 7
    low, _ = lowered(qdq)
    assert ops(low)["QLinearLeakyRelu"] == 7
    assert float_islands(low) == Counter({"Identity": 1})  # the builder's output name
    check_numerics(qdq, low, {"x": random_batches(proto, 1, seed=5)[0]}, exact=False)


def test_symmetric_activations_keep_relu_as_integer_clip(tmp_path):
    """With symmetric int8 activations the quantizer keeps each Relu between Q/DQ pairs;
    where input and output share a scale it becomes an integer Clip at zero."""
    proto = simplified(models.resnet(0))
    qdq = quantize_qdq(proto, random_batches(proto), tmp_path, activation=QI8,
                       extra_options={"ActivationSymmetric": True})
    relus = float_islands(qdq)["Relu"]
    low, _ = lowered(qdq)
    counts = ops(low)
    assert relus > 0 and counts["Clip"] + counts["QLinearLeakyRelu"] == relus
    assert float_islands(low) == Counter({"Identity": 1}) and counts["Relu"] == 0
    check_numerics(qdq, low, {"x": random_batches(proto, 1, seed=5)[0]}, exact=False)


@pytest.mark.parametrize(("tail", "out_scale", "out_zp", "absorbed"), [
    ("relu", 0.02, 0, True),     # uint8 from 0: quantization already clamps at 0
    ("relu", 0.02, 10, False),   # zero point 10: Relu would clamp above qmin
    ("clip", 0.02, 0, True),     # range [0, 5.1]: within Clip's [0, 6]
    ("clip", 0.05, 0, False),    # range [0, 12.75]: Clip's 6 would be lost
])
def test_activation_between_op_and_quantize(tail, out_scale, out_zp, absorbed):
    qdq = hand_qdq(tail, out_scale, out_zp)
    low, stats = lowered(qdq)
    if absorbed:
        assert ops(low) == Counter({"QuantizeLinear": 1, "QLinearConv": 1,
                                    "DequantizeLinear": 1})
        assert stats == stats_of(qlinear_nodes=1, activations_absorbed=1, qdq_removed=4)
    else:
        assert ops(low) == ops(qdq) and stats == stats_of(float_ops_kept=1)
    check_interface(qdq, low)
    check_numerics(qdq, low, hand_feeds())


# -- bias, sharing, interface, idempotence -----------------------------------------------
def test_bias_on_another_scale_is_rescaled():
    qdq = hand_qdq(bias_factor=2.0)
    low, stats = lowered(qdq)
    assert stats == stats_of(qlinear_nodes=1, qdq_removed=4)
    conv = next(n for n in low.graph.node if n.op_type == "QLinearConv")
    bias = numpy_helper.to_array(next(t for t in low.graph.initializer
                                      if t.name == conv.input[8]))
    want = numpy_helper.to_array(next(t for t in qdq.graph.initializer if t.name == "b")) * 2
    np.testing.assert_array_equal(bias, want)  # on x_scale * w_scale again, exactly
    check_numerics(qdq, low, hand_feeds(), exact=False)


def test_dequantize_shared_with_a_float_reader_is_kept():
    qdq = hand_qdq(float_reader=True)
    low, stats = lowered(qdq)
    assert ops(low) == Counter({"QuantizeLinear": 1, "DequantizeLinear": 2, "QLinearConv": 1,
                                "Tanh": 1})
    assert float_islands(low) == Counter({"Tanh": 1})
    assert stats == stats_of(qlinear_nodes=1, qdq_removed=3, float_ops_kept=1)
    check_interface(qdq, low)
    check_numerics(qdq, low, hand_feeds())


def test_plain_conv_imports_no_contrib_domain():
    low, _ = lowered(hand_qdq())
    assert {o.domain: o.version for o in low.opset_import} == {"": 17}


def test_second_run_and_float_model_change_nothing():
    model = ir.from_proto(hand_qdq(float_reader=True))
    lower_to_qoperator(model)
    version = model.version
    assert lower_to_qoperator(model) == stats_of(float_ops_kept=1)
    assert model.version == version
    plain = ir.from_proto(simplified(models.resnet(0)))
    version = plain.version
    assert lower_to_qoperator(plain) == ZERO and plain.version == version


def test_int8_activations_move_to_uint8_exactly(tmp_path):
    qdq = quantize_qdq(digits("resnet"), digits_batches(), tmp_path, activation=QI8)
    signed, _ = lowered(qdq)
    low, stats = lowered(qdq, uint8_activations=True)
    assert stats["activations_to_uint8"] == ops(qdq)["QuantizeLinear"]
    assert ops(low) == ops(signed)
    zero_points = {n.input[2] for n in low.graph.node if n.op_type == "QLinearConv"}
    inits = {t.name: t.data_type for t in low.graph.initializer}
    assert {inits[z] for z in zero_points} == {TensorProto.UINT8}
    check_interface(qdq, low)
    feeds = {"input": digits_batches(64)[:, 0]}
    for a, b in zip(run(low, feeds), run(signed, feeds), strict=True):
        np.testing.assert_array_equal(a, b)  # the same integers, shifted by 128
    check_numerics(qdq, low, feeds, exact=False)


def hand_gemm(c_scale_factor: float) -> onnx.ModelProto:
    """``Gemm(alpha=0.5, beta=2, transB=1)`` between Q/DQ, per-row int8 weights, an int32
    bias on ``c_scale_factor * x_scale * w_scale``."""
    rng = np.random.default_rng(3)
    x_s, w_s = np.float32(0.05), (np.arange(1, 6) * 0.01).astype(np.float32)
    consts = {"x_s": x_s, "x_z": np.uint8(120),
              "w": rng.integers(-127, 128, (5, 4)).astype(np.int8), "w_s": w_s,
              "w_z": np.zeros(5, np.int8), "c": rng.integers(-400, 400, 5).astype(np.int32),
              "c_s": (x_s * w_s * np.float32(c_scale_factor)).astype(np.float32),
              "c_z": np.zeros(5, np.int32), "y_s": np.float32(0.03), "y_z": np.uint8(128)}
    nodes = [helper.make_node("QuantizeLinear", ["x", "x_s", "x_z"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "x_s", "x_z"], ["xd"]),
             helper.make_node("DequantizeLinear", ["w", "w_s", "w_z"], ["wd"], axis=0),
             helper.make_node("DequantizeLinear", ["c", "c_s", "c_z"], ["cd"], axis=0),
             helper.make_node("Gemm", ["xd", "wd", "cd"], ["g"], alpha=0.5, beta=2.0, transB=1),
             helper.make_node("QuantizeLinear", ["g", "y_s", "y_z"], ["yq"]),
             helper.make_node("DequantizeLinear", ["yq", "y_s", "y_z"], ["y"])]
    graph = helper.make_graph(
        nodes, "gemm", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 5])],
        [numpy_helper.from_array(np.asarray(v), k) for k, v in consts.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


@pytest.mark.parametrize(("factor", "multiplier"), [(0.25, 1), (1.0, 4)],
                         ids=["bias-reused", "bias-rescaled"])
def test_gemm_alpha_beta_become_qgemm(factor, multiplier):
    """QGemm adds its int32 bias at ``alpha * x_scale * w_scale``; the Gemm adds
    ``beta * c_scale * c``: the bias is reused when those agree, else rescaled."""
    qdq = hand_gemm(factor)
    low, stats = lowered(qdq)
    assert ops(low) == Counter({"QuantizeLinear": 1, "QGemm": 1, "DequantizeLinear": 1})
    assert stats == stats_of(qlinear_nodes=1, qdq_removed=4)
    qgemm = next(n for n in low.graph.node if n.op_type == "QGemm")
    assert {a.name for a in qgemm.attribute} == {"alpha", "transB"}
    inits = {t.name: numpy_helper.to_array(t) for t in low.graph.initializer}
    c = numpy_helper.to_array(next(t for t in qdq.graph.initializer if t.name == "c"))
    np.testing.assert_array_equal(inits[qgemm.input[6]], c * multiplier)
    feeds = {"x": np.random.default_rng(4).uniform(-6, 6, (3, 4)).astype(np.float32)}
    check_numerics(qdq, low, feeds, exact=False)


def test_dequantized_value_captured_by_a_subgraph_is_kept():
    """Only the main graph is lowered; a DQ output an If branch reads stays float."""
    qdq = hand_qdq()
    branch = {name: helper.make_graph(
        [helper.make_node(op, ["xd"], [f"{name}_out"])], name, [],
        [helper.make_tensor_value_info(f"{name}_out", TensorProto.FLOAT, [1, 3, 6, 6])])
        for name, op in (("then", "Tanh"), ("else", "Sigmoid"))}
    qdq.graph.initializer.append(numpy_helper.from_array(np.array(True), "cond"))
    qdq.graph.node.append(helper.make_node("If", ["cond"], ["z"], then_branch=branch["then"],
                                           else_branch=branch["else"]))
    qdq.graph.output.append(helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, 3, 6, 6]))
    low, stats = lowered(qdq)
    assert ops(low) == Counter({"QuantizeLinear": 1, "DequantizeLinear": 2, "QLinearConv": 1,
                                "If": 1})
    assert stats == stats_of(qlinear_nodes=1, qdq_removed=3)
    check_interface(qdq, low)
    check_numerics(qdq, low, hand_feeds())


def test_omitted_zero_points():
    """A bias DQ needs no zero point; an output Q without one gets an explicit uint8 0."""
    qdq = hand_qdq(zero_points=False)
    assert [len(n.input) for n in qdq.graph.node].count(2) == 3
    low, stats = lowered(qdq)
    assert ops(low) == Counter({"QuantizeLinear": 1, "QLinearConv": 1, "DequantizeLinear": 1})
    assert stats == stats_of(qlinear_nodes=1, qdq_removed=4)
    conv = next(n for n in low.graph.node if n.op_type == "QLinearConv")
    inits = {t.name: numpy_helper.to_array(t) for t in low.graph.initializer}
    y_zp = inits[conv.input[7]]
    assert y_zp.dtype == np.uint8 and y_zp.shape == () and y_zp == 0
    check_interface(qdq, low)
    check_numerics(qdq, low, hand_feeds())
