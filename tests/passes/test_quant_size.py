"""What quantized files spend bytes on: no zero-valued weight zero points, shared scalars,
short names, with the numerics and ONNX Runtime's integer fusions unchanged.

"Unchanged" is checked by putting the omitted zero points back (explicit zeros, which is
what the rewrite wrote before) and comparing ONNX Runtime's outputs and fused operators.
"""

from __future__ import annotations

import collections
import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import run_ort
from models import cnn, mlp, resnet
from onnx import numpy_helper

from edgeopt import ir
from edgeopt.passes import Context, PassManager
from edgeopt.passes.calib import CalibrationData

LIGHT = os.path.join(os.path.dirname(onnx.__file__), "backend", "test", "data", "light")


def quantized(proto: onnx.ModelProto, spec: str = "quant:int8", simplify: bool = False
              ) -> onnx.ModelProto:
    """``proto`` through ``spec``, calibrated on seeded positive samples (8 per input)."""
    model = ir.from_proto(proto)
    if simplify:
        PassManager("simplify").run(model)
    rng = np.random.default_rng(0)
    arrays = {v.name: np.abs(rng.standard_normal(
        [8, *[d if isinstance(d, int) else 1 for d in v.shape[1:]]])).astype(np.float32)
        for v in model.graph.inputs if not v.is_initializer()}
    PassManager(spec, verify="each").run(model, Context(
        calib=CalibrationData.for_model(arrays, model)))
    return ir.to_proto(model)


def with_explicit_zero_points(proto: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """A copy whose DequantizeLinear nodes all spell out their (zero) zero point."""
    out = onnx.ModelProto.FromString(proto.SerializeToString())
    inits = {t.name: t for t in out.graph.initializer}
    added = 0
    for node in out.graph.node:
        if node.op_type != "DequantizeLinear" or len(node.input) > 2:
            continue
        x, scale = (numpy_helper.to_array(inits[n]) for n in node.input[:2])
        zp = numpy_helper.from_array(np.zeros(scale.shape, x.dtype), f"{node.output[0]}_zero")
        out.graph.initializer.append(zp)
        node.input.append(zp.name)
        added += 1
    return out, added


def fused_ops(proto: onnx.ModelProto, tmp_path) -> collections.Counter:
    """Operator counts of the graph ONNX Runtime runs after its QDQ fusions."""
    so = ort.SessionOptions()
    so.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    so.log_severity_level = 3
    ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return collections.Counter(n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node)


def feeds_for(proto: onnx.ModelProto, seed: int = 3) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {i.name: rng.standard_normal([d.dim_value or 1 for d in i.type.tensor_type.shape.dim]
                                        ).astype(np.float32) for i in proto.graph.input}


def initializers(proto: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}


def one_element_duplicates(proto: onnx.ModelProto) -> list[str]:
    """Names of one-element initializers equal (type, shape, bytes) to an earlier one."""
    seen, dups = set(), []
    for name, a in initializers(proto).items():
        key = (a.dtype.str, a.shape, a.tobytes())
        if a.size == 1 and key in seen:
            dups.append(name)
        seen.add(key)
    return dups


# -- QDQ ------------------------------------------------------------------------------------
@pytest.mark.parametrize("acts", ["uint8", "int8"])
@pytest.mark.parametrize("build", [cnn, resnet, mlp], ids=["cnn", "resnet", "mlp"])
def test_qdq_zero_points_left_out_change_nothing_in_ort(build, acts, tmp_path):
    proto = quantized(build(), f"quant:int8,activations={acts}")
    explicit, added = with_explicit_zero_points(proto)
    n_conv = sum(n.op_type == "Conv" for n in build().graph.node)
    assert added >= n_conv  # every Conv weight (and every int32 bias) had none
    feeds = feeds_for(proto)
    for got, want in zip(run_ort(proto, feeds), run_ort(explicit, feeds), strict=True):
        np.testing.assert_array_equal(got, want)
    ops = fused_ops(proto, tmp_path)
    assert ops == fused_ops(explicit, tmp_path)
    if acts == "uint8":  # ONNX Runtime fuses every Conv (and every Gemm) into integer kernels
        assert ops["QLinearConv"] == n_conv and ops["Conv"] == 0
        assert ops["Gemm"] == 0


def test_qdq_stores_no_zero_valued_weight_zero_points_except_for_gemm():
    proto = quantized(cnn())  # 4 Convs, 2 Gemms
    inits = initializers(proto)
    readers = collections.defaultdict(list)
    for n in proto.graph.node:
        for i in n.input:
            readers[i].append(n.op_type)
    for node in proto.graph.node:
        if node.op_type != "DequantizeLinear" or node.input[0] not in inits:
            continue
        reader = readers[node.output[0]]
        has_zp = len(node.input) > 2
        if inits[node.input[0]].dtype == np.int8 and inits[node.input[1]].size > 1:
            # per-channel weights: the zero point only where ORT's QGemm fusion reads it
            assert has_zp == (reader == ["Gemm"]), (node.input, reader)
        if inits[node.input[0]].dtype == np.int32:
            assert not has_zp  # biases


def test_qdq_scalars_are_shared_and_names_are_short():
    proto = quantized(resnet())
    assert one_element_duplicates(proto) == []
    inits = initializers(proto)
    zero_points = {n.input[2] for n in proto.graph.node
                   if n.op_type == "QuantizeLinear" and len(n.input) > 2}
    assert zero_points and all(z.startswith("zp_u8_") for z in zero_points)
    assert len(zero_points) == len({inits[z].item() for z in zero_points})
    for node in proto.graph.node:  # t_q = Q(t) (t: before a fused Relu), t_dq = DQ(t_q)
        if node.op_type == "QuantizeLinear":
            assert node.output[0].endswith("_q")
        elif node.op_type == "DequantizeLinear":
            assert node.output[0] == f"{node.input[0].removesuffix('_q')}_dq"
    assert not [n for n in inits if n.endswith(("_quantized", "_scale", "_zero_point"))]


def test_shared_scalars_survive_the_qoperator_lowering():
    proto = quantized(resnet(), "quant:int8,format=qop")
    assert one_element_duplicates(proto) == []
    inits = initializers(proto)
    # Per-channel weights read through QLinearConv take one scalar zero point (QGemm wants
    # one per channel).
    convs = [n for n in proto.graph.node if n.op_type == "QLinearConv"]
    assert convs and all(inits[n.input[5]].size == 1 < inits[n.input[4]].size for n in convs)


@pytest.mark.skipif(not os.path.exists(os.path.join(LIGHT, "light_squeezenet.onnx")),
                    reason="onnx's light models are not installed")
@pytest.mark.parametrize(("spec", "bound"), [("quant:int8", 0.266),
                                             ("quant:int8,format=qop", 0.261)])
def test_squeezenet_file_ratio(spec, bound, tmp_path):
    """onnx's light SqueezeNet after simplify (3.7 MB): the sizes before these changes
    were 0.267 (QDQ) and 0.262 (QOperator)."""
    model = ir.load(os.path.join(LIGHT, "light_squeezenet.onnx"))
    PassManager("simplify").run(model)
    ir.save(model, str(tmp_path / "f32.onnx"))
    proto = quantized(ir.to_proto(model), spec)
    onnx.save(proto, str(tmp_path / "q.onnx"))
    ratio = os.path.getsize(tmp_path / "q.onnx") / os.path.getsize(tmp_path / "f32.onnx")
    assert ratio <= bound


# -- weight-only ----------------------------------------------------------------------------
@pytest.mark.parametrize("build", [cnn, mlp], ids=["cnn", "mlp"])
def test_weight_only_zero_points_left_out_change_nothing_in_ort(build, tmp_path):
    proto = quantized(build(), "quant:int8,mode=weights")
    explicit, added = with_explicit_zero_points(proto)
    dqs = [n for n in proto.graph.node if n.op_type == "DequantizeLinear"]
    assert dqs and added == len(dqs)
    assert all(n.name == "" for n in dqs)
    feeds = feeds_for(proto)
    for got, want in zip(run_ort(proto, feeds), run_ort(explicit, feeds), strict=True):
        np.testing.assert_array_equal(got, want)
    assert fused_ops(proto, tmp_path) == fused_ops(explicit, tmp_path)
