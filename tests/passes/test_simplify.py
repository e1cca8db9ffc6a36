"""simplify: the fixpoint of fold-constants, fold-bn, fold-affine and dce; the light models."""

from __future__ import annotations

import json
import os

import numpy as np
import onnx
import pytest
from conftest import ONNX_TEST_DATA, parse_model, run_ort

import edgeopt.passes.simplify  # noqa: F401  (registers the pass and the ones it runs)
from edgeopt import ir
from edgeopt.passes import OptionError, PassManager


def run(model: ir.Model, spec: str = "simplify"):
    return PassManager(spec, verify="each").run(model).steps[0]


def ops(graph: ir.Graph) -> list[str]:
    return [n.op_type for n in graph]


def ort_plain(model: ir.Model | str, feeds: dict) -> list[np.ndarray]:
    """ONNX Runtime without its own graph optimizations (the oracle for opset-9 BN)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 3
    src = model if isinstance(model, str) else ir.to_proto(model).SerializeToString()
    return ort.InferenceSession(src, so, providers=["CPUExecutionProvider"]).run(None, feeds)


def assert_close(got: np.ndarray, want: np.ndarray) -> None:
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(np.abs(want).max()))


# An IR 3 model built like the onnx light models: weights from ConstantOfShape of
# initializer-input shapes, BatchNormalization parameters as initializer-inputs, a BN that
# follows a Relu (decomposed, then merged with the Mul + Add after it), an inference Dropout,
# and a constant behind a Dropout (folded only in the second round, once dce has bypassed
# that Dropout).
LIGHT_LIKE = """<ir_version: 3, opset_import: ["" : 9]>
g (float[1,3,6,6] x, int64[4] w_shape, float[4] s, float[4] bb, float[4] m, float[4] v,
   float[4] s2, float[4] b2, float[4] m2, float[4] v2, int64[1] p_shape, float[1] k)
  => (float[1,4,6,6] y)
<int64[4] w_shape = {4, 3, 3, 3}, int64[1] p_shape = {4},
 float[4] s = {1.0, 0.5, 2.0, 1.5}, float[4] bb = {0.1, -0.2, 0.3, 0.0},
 float[4] m = {0.2, 0.1, -0.3, 0.05}, float[4] v = {1.0, 0.25, 4.0, 0.5},
 float[4] s2 = {0.7, 1.2, 0.9, 1.1}, float[4] b2 = {0.0, 0.5, -0.5, 1.0},
 float[4] m2 = {0.3, 0.3, 0.3, 0.3}, float[4] v2 = {2.0, 1.0, 0.5, 1.0}, float[1] k = {3.0}>
{
  w = ConstantOfShape <value = float[1] {0.02}> (w_shape)
  c = Conv <pads = [1, 1, 1, 1], kernel_shape = [3, 3]> (x, w)
  n = BatchNormalization <epsilon = 0.00001> (c, s, bb, m, v)
  r = Relu (n)
  n2 = BatchNormalization (r, s2, b2, m2, v2)
  d = Dropout (n2)
  p = ConstantOfShape <value = float[1] {0.5}> (p_shape)
  pu = Unsqueeze <axes = [1, 2]> (p)
  kd = Dropout (k)
  kn = Neg (kd)
  t = Mul (d, pu)
  y = Add (t, kn)
}"""

FEEDS = {"x": np.random.default_rng(0).standard_normal((1, 3, 6, 6)).astype(np.float32)}


def test_light_like_model():
    model = parse_model(LIGHT_LIKE)
    expected = ort_plain(model, FEEDS)
    step = run(model)
    assert step.stats == {
        "rounds": 3, "nodes_folded": 4, "too_large": 0, "eval_failed": 0,
        "bn_folded": 1, "bn_folded_forward": 0, "bn_decomposed": 1, "bn_kept": 0,
        # the second BN's Mul + Add and the Mul + Add after the Dropout became one Mul + Add
        "affine_folded": 0, "affine_folded_forward": 0, "affine_merged": 2,
        "constants_merged": 0, "nodes_merged": 0,
        "nodes_removed": 2, "identity_removed": 0, "dropout_removed": 2,
        # w_shape, p_shape, the 8 BN parameters, p (read only by the folded Unsqueeze),
        # then k (read only by the folded Neg); at the end the 4 constants of the merged
        # Mul/Add nodes
        "initializers_removed": 16}
    assert ops(model.graph) == ["Conv", "Relu", "Mul", "Add"]
    assert [v.name for v in model.graph.inputs] == ["x"]
    assert [v.name for v in model.graph.outputs] == ["y"]
    for got in (ort_plain(model, FEEDS), run_ort(ir.to_proto(model), FEEDS)):
        assert_close(got[0], expected[0])
    again = run(model)
    assert not again.modified and again.stats["rounds"] == 1


def test_options_reach_the_inner_passes():
    model = parse_model(LIGHT_LIKE)
    step = run(model, "simplify,decompose=false,max_lazy_bytes=100")
    # w (432 bytes) is over the lazy cap, so the Conv weight is not constant and the first
    # BN cannot fold into the Conv; with decompose off, both BNs stay. too_large and bn_kept
    # describe what is left at the end (not summed over the 3 rounds).
    assert step.stats == {
        "rounds": 3, "nodes_folded": 3, "too_large": 1, "eval_failed": 0,
        "bn_folded": 0, "bn_folded_forward": 0, "bn_decomposed": 0, "bn_kept": 2,
        "affine_folded": 0, "affine_folded_forward": 0, "affine_merged": 0,
        "constants_merged": 0, "nodes_merged": 0,
        "nodes_removed": 2, "identity_removed": 0, "dropout_removed": 2,
        "initializers_removed": 3}
    assert ops(model.graph) == ["ConstantOfShape", "Conv", "BatchNormalization", "Relu",
                                "BatchNormalization", "Mul", "Add"]


# The light models' Caffe2 pattern: every BatchNormalization is followed by a "Scale" (Mul +
# Add by unsqueezed constants). After a Conv, both fold into the Conv; after a Concat, the
# split BN and the scale merge into one Mul + Add.
SCALED_BN = """<ir_version: 3, opset_import: ["" : 9]>
g (float[1,2,5,5] x, float[3] s, float[3] bb, float[3] m, float[3] v, float[3] sw,
   float[3] sb, float[5] s2, float[5] b2, float[5] m2, float[5] v2, float[5] sw2, float[5] sb2)
  => (float[1,4,5,5] y)
<float[3] s = {1.0, 0.5, 2.0}, float[3] bb = {0.1, -0.2, 0.3}, float[3] m = {0.2, 0.1, -0.3},
 float[3] v = {1.0, 0.25, 4.0}, float[3] sw = {1.5, 0.7, -1.2}, float[3] sb = {0.3, 0.0, -0.4},
 float[5] s2 = {0.7, 1.2, 0.9, 1.1, 1.0}, float[5] b2 = {0.0, 0.5, -0.5, 1.0, 0.2},
 float[5] m2 = {0.3, 0.3, 0.3, 0.3, 0.1}, float[5] v2 = {2.0, 1.0, 0.5, 1.0, 0.3},
 float[5] sw2 = {0.9, 1.1, 1.3, -0.8, 0.6}, float[5] sb2 = {0.1, 0.2, 0.3, 0.4, 0.5}>
{
  w = ConstantOfShape <value = float[1] {0.02}> (w_shape)
  c = Conv <pads = [1, 1, 1, 1], kernel_shape = [3, 3]> (x, w)
  n = BatchNormalization (c, s, bb, m, v)
  swu = Unsqueeze <axes = [1, 2]> (sw)
  sc = Mul (n, swu)
  sbu = Unsqueeze <axes = [1, 2]> (sb)
  sh = Add (sc, sbu)
  r = Relu (sh)
  cat = Concat <axis = 1> (x, r)
  n2 = BatchNormalization (cat, s2, b2, m2, v2)
  swu2 = Unsqueeze <axes = [1, 2]> (sw2)
  sc2 = Mul (n2, swu2)
  sbu2 = Unsqueeze <axes = [1, 2]> (sb2)
  sh2 = Add (sc2, sbu2)
  r2 = Relu (sh2)
  y = Conv <kernel_shape = [1, 1]> (r2, w2)
}"""


def scaled_bn_model() -> ir.Model:
    text = SCALED_BN.replace("float[1,2,5,5] x,", "float[1,2,5,5] x, int64[4] w_shape, "
                             "float[4,5,1,1] w2,").replace(
        "<float[3] s =", "<int64[4] w_shape = {3, 2, 3, 3}, float[4,5,1,1] w2 = {"
        + ", ".join(f"{(i % 7 - 3) / 5}" for i in range(20)) + "}, float[3] s =")
    return parse_model(text)


def test_bn_with_a_scale_after_a_conv_and_after_a_concat():
    model = scaled_bn_model()
    feeds = {"x": np.random.default_rng(2).standard_normal((1, 2, 5, 5)).astype(np.float32)}
    expected = ort_plain(model, feeds)
    step = run(model)
    assert step.stats == {
        "rounds": 2, "nodes_folded": 5, "too_large": 0, "eval_failed": 0,
        "bn_folded": 1, "bn_folded_forward": 0, "bn_decomposed": 1, "bn_kept": 0,
        "affine_folded": 2, "affine_folded_forward": 0, "affine_merged": 2,
        "constants_merged": 0, "nodes_merged": 0,
        "nodes_removed": 0, "identity_removed": 0, "dropout_removed": 0,
        "initializers_removed": 19}
    assert ops(model.graph) == ["Conv", "Relu", "Concat", "Mul", "Add", "Relu", "Conv"]
    for got in (ort_plain(model, feeds), run_ort(ir.to_proto(model), feeds)):
        assert_close(got[0], expected[0])
    assert not run(model).modified


def test_affine_can_be_left_out():
    model = scaled_bn_model()
    step = run(model, "simplify,affine=false")
    assert "affine_merged" not in step.stats
    assert ops(model.graph) == ["Conv", "Mul", "Add", "Relu", "Concat", "Mul", "Add", "Mul",
                                "Add", "Relu", "Conv"]


def test_invalid_options():
    with pytest.raises(OptionError, match="max_iterations must be >= 1"):
        PassManager("simplify,max_iterations=0")
    with pytest.raises(OptionError, match="has no option 'bogus'"):
        PassManager("simplify,bogus=1")


def test_inside_an_if_branch():
    model = parse_model('<ir_version: 8, opset_import: ["" : 17]>\n' + """
g (bool c, float[1,2,3,3] x) => (float[a,b,e,d] y)
<int64[4] w_shape = {2, 2, 1, 1}, float[2] s = {2.0, 0.5}, float[2] bb = {1.0, -1.0},
 float[2] m = {0.0, 0.5}, float[2] v = {1.0, 4.0}>
{
  y = If (c) <
    then_branch = t () => (float[a,b,e,d] ty) {
      w = ConstantOfShape <value = float[1] {0.3}> (w_shape)
      k = Conv (x, w)
      i = Identity (k)
      ty = BatchNormalization (i, s, bb, m, v)
    },
    else_branch = f () => (float[a,b,e,d] fy) {
      fy = Relu (x)
    }
  >
}""")
    x = np.random.default_rng(1).standard_normal((1, 2, 3, 3)).astype(np.float32)
    cases = [{"c": np.array(flag), "x": x} for flag in (True, False)]
    expected = [ort_plain(model, f)[0] for f in cases]
    step = run(model)
    assert step.stats == {
        "rounds": 3, "nodes_folded": 1, "too_large": 0, "eval_failed": 0,
        "bn_folded": 1, "bn_folded_forward": 0, "bn_decomposed": 0, "bn_kept": 0,
        "affine_folded": 0, "affine_folded_forward": 0, "affine_merged": 0,
        "constants_merged": 0, "nodes_merged": 0,
        "nodes_removed": 1, "identity_removed": 1, "dropout_removed": 0,
        "initializers_removed": 5}
    then_g = model.graph.nodes[0].attrs["then_branch"].value
    assert ops(then_g) == ["Conv"]
    for feeds, want in zip(cases, expected, strict=True):
        assert_close(ort_plain(model, feeds)[0], want)


def test_already_simple_model_is_a_no_op():
    model = parse_model('<ir_version: 8, opset_import: ["" : 17]>\n'
                        "g (float[2] x) => (float[2] y) { y = Relu (x) }")
    version = model.version
    step = run(model)
    assert not step.modified and model.version == version
    assert step.stats["rounds"] == 1
    assert all(v == 0 for k, v in step.stats.items() if k != "rounds")


# -- the onnx package's light models -------------------------------------------------------
LIGHT = ["bvlc_alexnet", "densenet121", "inception_v1", "inception_v2", "resnet50",
         "shufflenet", "squeezenet", "vgg19", "zfnet512"]
#: Nodes left by simplify (onnxsim 0.8.1 leaves 24, 550, 139, 226, 123, 154, 66, 46, 22; see
#: docs/BENCHMARKS.md). cse merges the light models' byte-identical dummy-weight Convs.
LIGHT_NODES = {"bvlc_alexnet": 22, "densenet121": 429, "inception_v1": 138, "inception_v2": 154,
               "resnet50": 123, "shufflenet": 154, "squeezenet": 65, "vgg19": 44, "zfnet512": 22}


def light_feeds(proto: onnx.ModelProto, name: str) -> dict[str, np.ndarray]:
    """The inputs onnx's backend test runner feeds a light model."""
    from onnx.backend.test.runner import Runner

    inits = {t.name for t in proto.graph.initializer}
    return {x.name: Runner.generate_dummy_data(x, seed=0, name=name, random=False)
            for x in proto.graph.input if x.name not in inits}


@pytest.mark.slow
@pytest.mark.parametrize("name", LIGHT)
def test_light_model(name, tmp_path):
    path = os.path.join(ONNX_TEST_DATA, "light", f"light_{name}.onnx")
    with open(os.path.join(ONNX_TEST_DATA, "real", f"test_{name}", "data.json")) as f:
        tol = json.load(f)
    ref = onnx.numpy_helper.to_array(onnx.load_tensor(
        os.path.join(ONNX_TEST_DATA, "light", f"light_{name}_output_0.pb")))
    model = ir.load(path)
    feeds = light_feeds(onnx.load(path), name)
    report = PassManager("simplify", verify="each").run(model)
    assert report.modified
    kinds = set(ops(model.graph))
    assert "ConstantOfShape" not in kinds and "BatchNormalization" not in kinds
    assert len(model.graph.nodes) == LIGHT_NODES[name]
    ir.verify(model)
    out = tmp_path / f"{name}.onnx"
    ir.save(model, out)
    del model
    got = run_ort(str(out), feeds)
    assert len(got) == 1
    np.testing.assert_allclose(got[0], ref, rtol=tol["rtol"], atol=tol["atol"])
