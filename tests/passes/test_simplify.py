"""simplify: the fixpoint of fold-constants, fold-bn and dce; the onnx light models."""

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
# follows a Relu (decomposed), an inference Dropout, and a constant behind a Dropout (folded
# only in the second round, once dce has bypassed that Dropout).
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
        "nodes_removed": 2, "identity_removed": 0, "dropout_removed": 2,
        # w_shape, p_shape, the 8 BN parameters, p (read only by the folded Unsqueeze),
        # then k (read only by the folded Neg)
        "initializers_removed": 12}
    assert ops(model.graph) == ["Conv", "Relu", "Mul", "Add", "Mul", "Add"]
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
        "nodes_removed": 2, "identity_removed": 0, "dropout_removed": 2,
        "initializers_removed": 3}
    assert ops(model.graph) == ["ConstantOfShape", "Conv", "BatchNormalization", "Relu",
                                "BatchNormalization", "Mul", "Add"]


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
    ir.verify(model)
    out = tmp_path / f"{name}.onnx"
    ir.save(model, out)
    del model
    got = run_ort(str(out), feeds)
    assert len(got) == 1
    np.testing.assert_allclose(got[0], ref, rtol=tol["rtol"], atol=tol["atol"])
