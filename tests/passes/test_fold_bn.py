"""fold-bn: BatchNormalization folded into its producer, its consumers, or Mul + Add."""

from __future__ import annotations

import numpy as np
import onnx.reference
import pytest
from conftest import build_model as build
from conftest import parse_model, run_ort

import edgeopt.passes.fold_bn  # noqa: F401  (registers the pass)
from edgeopt import ir
from edgeopt.passes import PassManager

HEADER = '<ir_version: 8, opset_import: ["" : 17]>\n'
KEPT = {"bn_folded": 0, "bn_folded_forward": 0, "bn_decomposed": 0, "bn_kept": 1}
NONE = {"bn_folded": 0, "bn_folded_forward": 0, "bn_decomposed": 0, "bn_kept": 0}


def stats(folded=0, forward=0, decomposed=0, kept=0) -> dict[str, int]:
    return {"bn_folded": folded, "bn_folded_forward": forward, "bn_decomposed": decomposed,
            "bn_kept": kept}


def run(model: ir.Model, spec: str = "fold-bn"):
    return PassManager(spec, verify="each").run(model).steps[0]


def ops(graph: ir.Graph) -> list[str]:
    return [n.op_type for n in graph]


def reference(model: ir.Model, feeds: dict) -> list[np.ndarray]:
    return onnx.reference.ReferenceEvaluator(ir.to_proto(model)).run(None, feeds)


def assert_close(got: np.ndarray, want: np.ndarray) -> None:
    """Equal within 1e-5 relative to the output's scale."""
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(np.abs(want).max()))




def bn_params(rng: np.random.Generator, c: int, prefix: str = "") -> dict[str, np.ndarray]:
    return {f"{prefix}s": rng.normal(1, 0.5, c).astype(np.float32),
            f"{prefix}bb": rng.normal(0, 1, c).astype(np.float32),
            f"{prefix}m": rng.normal(0, 1, c).astype(np.float32),
            f"{prefix}v": rng.uniform(0.5, 2, c).astype(np.float32)}


def bn_inputs(c: int, prefix: str = "") -> str:
    return ", ".join(f"float[{c}] {prefix}{n}" for n in ("s", "bb", "m", "v"))


def ort_plain(model: ir.Model, feeds: dict) -> list[np.ndarray]:
    """ONNX Runtime without graph optimizations (which would fuse BatchNormalization itself).

    The oracle where ``onnx.reference`` is wrong: its BatchNormalization-9 runs in training
    mode whenever ``momentum`` is set (and the schema default sets it), and its grouped
    ConvTranspose fails.
    """
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 3
    sess = ort.InferenceSession(ir.to_proto(model).SerializeToString(), so,
                                providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def check(model: ir.Model, feeds: dict, spec: str = "fold-bn", oracle=reference) -> dict:
    """Run the pass, compare with ``oracle`` before it, check idempotence; the stats."""
    expected = oracle(model, feeds)
    step = run(model, spec)
    assert step.modified
    for got in (oracle(model, feeds), run_ort(ir.to_proto(model), feeds)):
        for g, e in zip(got, expected, strict=True):
            assert_close(g, e)
    again = run(model, spec)
    assert not again.modified
    return step.stats


# -- backward -------------------------------------------------------------------------------
@pytest.mark.parametrize(("x_shape", "w_shape", "group", "bias"), [
    ((1, 4, 6, 6), (6, 4, 3, 3), 1, True),
    ((1, 4, 6, 6), (6, 2, 3, 3), 2, False),
    ((1, 4, 6, 6), (4, 1, 3, 3), 4, True),
    ((2, 4, 7), (5, 4, 3), 1, False),
])
def test_into_conv(x_shape, w_shape, group, bias):
    rng = np.random.default_rng(0)
    c = w_shape[0]
    rank = len(x_shape)
    dims = ",".join("abcdef"[:rank])
    pads = ", ".join(["1"] * (2 * (rank - 2)))
    b_in, b_arg = (f", float[{c}] cb", ", cb") if bias else ("", "")
    text = HEADER + f"""
g (float[{",".join(map(str, x_shape))}] x, float[{",".join(map(str, w_shape))}] w{b_in},
   {bn_inputs(c)}) => (float[{dims}] y)
{{
  conv_out = Conv <group = {group}, pads = [{pads}]> (x, w{b_arg})
  y = BatchNormalization <epsilon = 0.001> (conv_out, s, bb, m, v)
}}"""
    weights = {"w": rng.standard_normal(w_shape).astype(np.float32), **bn_params(rng, c)}
    if bias:
        weights["cb"] = rng.standard_normal(c).astype(np.float32)
    model = build(text, weights)
    feeds = {"x": rng.standard_normal(x_shape).astype(np.float32)}
    assert check(model, feeds) == stats(folded=1)
    assert ops(model.graph) == ["Conv"]
    conv = model.graph.nodes[0]
    assert len(conv.inputs) == 3 and conv.inputs[2].is_initializer()
    assert conv.outputs[0].name == "y" and model.graph.outputs[0] is conv.outputs[0]
    assert conv.inputs[1].name == "w"  # the sole reader's weight is rewritten in place
    assert isinstance(conv.inputs[1].const_value, ir.LazyTensor)


@pytest.mark.parametrize(("group", "bias"), [(1, True), (2, False)])
def test_into_conv_transpose(group, bias):
    rng = np.random.default_rng(1)
    c_in, per_group = 4, 3
    c_out = per_group * group
    b_in, b_arg = (f", float[{c_out}] cb", ", cb") if bias else ("", "")
    text = HEADER + f"""
g (float[1,{c_in},5,5] x, float[{c_in},{per_group},3,3] w{b_in}, {bn_inputs(c_out)})
  => (float[a,b,c,d] y)
{{
  t = ConvTranspose <group = {group}, strides = [2, 2], output_padding = [1, 1]> (x, w{b_arg})
  y = BatchNormalization (t, s, bb, m, v)
}}"""
    weights = {"w": rng.standard_normal((c_in, per_group, 3, 3)).astype(np.float32),
               **bn_params(rng, c_out)}
    if bias:
        weights["cb"] = rng.standard_normal(c_out).astype(np.float32)
    model = build(text, weights)
    feeds = {"x": rng.standard_normal((1, c_in, 5, 5)).astype(np.float32)}
    assert check(model, feeds, oracle=ort_plain) == stats(folded=1)
    assert ops(model.graph) == ["ConvTranspose"]


@pytest.mark.parametrize(("trans_b", "alpha", "beta", "c_shape"), [
    (0, 1.0, 1.0, None), (1, 1.0, 1.0, (4,)), (0, 0.5, 2.0, (3, 4)), (1, 2.0, 0.25, (1, 4)),
    (0, 1.0, 3.0, (3, 1)), (1, 1.5, 0.0, (4,)),
])
def test_into_gemm(trans_b, alpha, beta, c_shape):
    rng = np.random.default_rng(2)
    w_shape = (4, 5) if trans_b else (5, 4)
    c_in = f", float[{','.join(map(str, c_shape))}] cc" if c_shape else ""
    text = HEADER + f"""
g (float[3,5] x, float[{w_shape[0]},{w_shape[1]}] w{c_in}, {bn_inputs(4)}) => (float[3,4] y)
{{
  h = Gemm <transB = {trans_b}, alpha = {alpha}, beta = {beta}> (x, w{", cc" if c_shape else ""})
  y = BatchNormalization (h, s, bb, m, v)
}}"""
    weights = {"w": rng.standard_normal(w_shape).astype(np.float32), **bn_params(rng, 4)}
    if c_shape:
        weights["cc"] = rng.standard_normal(c_shape).astype(np.float32)
    model = build(text, weights)
    feeds = {"x": rng.standard_normal((3, 5)).astype(np.float32)}
    assert check(model, feeds) == stats(folded=1)
    assert ops(model.graph) == ["Gemm"]
    gemm = model.graph.nodes[0]
    assert gemm.attr("beta") == 1.0 and gemm.attr("alpha", 1.0) == alpha


def test_into_matmul_of_a_rank_2_activation_becomes_gemm():
    rng = np.random.default_rng(3)
    text = HEADER + f"""
g (float[3,6] x, float[6,5] w, {bn_inputs(5)}) => (float[3,5] y)
{{
  h = MatMul (x, w)
  y = BatchNormalization (h, s, bb, m, v)
}}"""
    model = build(text, {"w": rng.standard_normal((6, 5)).astype(np.float32),
                         **bn_params(rng, 5)})
    feeds = {"x": rng.standard_normal((3, 6)).astype(np.float32)}
    assert check(model, feeds) == stats(folded=1)
    assert ops(model.graph) == ["Gemm"]
    assert model.graph.nodes[0].outputs[0].name == "y"


def test_matmul_of_a_rank_3_activation_is_decomposed_instead():
    rng = np.random.default_rng(4)
    text = HEADER + f"""
g (float[2,5,6] x, float[6,5] w, {bn_inputs(5)}) => (float[2,5,5] y)
{{
  h = MatMul (x, w)
  y = BatchNormalization (h, s, bb, m, v)
}}"""
    model = build(text, {"w": rng.standard_normal((6, 5)).astype(np.float32),
                         **bn_params(rng, 5)})
    feeds = {"x": rng.standard_normal((2, 5, 6)).astype(np.float32)}
    assert check(model, feeds) == stats(decomposed=1)
    assert ops(model.graph) == ["MatMul", "Mul", "Add"]
    assert model.graph.nodes[1].inputs[1].shape == (5, 1)  # rank 3 -> [C, 1]


# -- forward ---------------------------------------------------------------------------------
FORWARD = HEADER + f"""
g (float[1,4,6,6] x, float[6,4,1,1] w1, float[6] b1, float[4,2,3,3] w2, {bn_inputs(4)})
  => (float[a,b,c,d] y1, float[e,f,g,h] y2)
{{
  r = Relu (x)
  n = BatchNormalization (r, s, bb, m, v)
  y1 = Conv (n, w1, b1)
  y2 = Conv <group = 2, PADS> (n, w2)
}}"""


def forward_model(pads: str) -> ir.Model:
    rng = np.random.default_rng(5)
    return build(FORWARD.replace("PADS", pads), {
        "w1": rng.standard_normal((6, 4, 1, 1)).astype(np.float32),
        "b1": rng.standard_normal(6).astype(np.float32),
        "w2": rng.standard_normal((4, 2, 3, 3)).astype(np.float32), **bn_params(rng, 4)})


FEEDS_4x6x6 = {"x": np.random.default_rng(6).standard_normal((1, 4, 6, 6)).astype(np.float32)}


def test_forward_into_unpadded_convs():
    model = forward_model("pads = [0, 0, 0, 0]")
    assert check(model, FEEDS_4x6x6) == stats(forward=1)
    assert ops(model.graph) == ["Relu", "Conv", "Conv"]
    assert all(n.inputs[0].name == "r" for n in model.graph.nodes[1:])
    assert len(model.graph.nodes[2].inputs) == 3  # a bias was created


def test_forward_refuses_padded_convs_and_decomposes():
    model = forward_model("pads = [1, 1, 1, 1]")
    assert check(model, FEEDS_4x6x6) == stats(decomposed=1)
    assert ops(model.graph) == ["Relu", "Mul", "Add", "Conv", "Conv"]


def test_forward_can_be_disabled():
    model = forward_model("pads = [0, 0, 0, 0]")
    assert check(model, FEEDS_4x6x6, "fold-bn,forward=false") == stats(decomposed=1)


# -- decompose / keep -------------------------------------------------------------------------
DECOMPOSE = HEADER + f"""
g (float[2,4,3,3] x, {bn_inputs(4)}) => (float[a,b,c,d] y)
{{
  r = Relu (x)
  y = BatchNormalization (r, s, bb, m, v)
}}"""


def decompose_model() -> ir.Model:
    return build(DECOMPOSE, bn_params(np.random.default_rng(7), 4))


def test_decompose_uses_shape_inference_for_the_rank():
    model = decompose_model()
    assert model.graph.nodes[0].outputs[0].shape is None  # rank known only by inference
    feeds = {"x": np.random.default_rng(8).standard_normal((2, 4, 3, 3)).astype(np.float32)}
    assert check(model, feeds) == stats(decomposed=1)
    assert ops(model.graph) == ["Relu", "Mul", "Add"]
    mul, add = model.graph.nodes[1:]
    assert mul.inputs[1].shape == (4, 1, 1) and add.inputs[1].shape == (4, 1, 1)
    assert add.outputs[0].name == "y" and model.graph.outputs[0] is add.outputs[0]
    assert model.graph.nodes[0].outputs[0].shape is None  # the pass did not infer in place


def test_decompose_can_be_disabled():
    model = decompose_model()
    version = model.version
    step = run(model, "fold-bn,decompose=false")
    assert not step.modified and step.stats == KEPT
    assert model.version == version


def test_training_mode_is_kept():
    text = DECOMPOSE.replace("y = BatchNormalization", "y = BatchNormalization "
                             "<training_mode = 1>")
    model = build(text, bn_params(np.random.default_rng(9), 4))
    step = run(model)
    assert not step.modified and step.stats == KEPT


def test_non_constant_parameters_are_kept():
    model = build(DECOMPOSE, {k: v for k, v in bn_params(np.random.default_rng(9), 4).items()
                              if k != "s"})
    step = run(model)
    assert not step.modified and step.stats == KEPT
    assert ops(model.graph) == ["Relu", "BatchNormalization"]


def test_no_batchnorm_is_a_no_op():
    model = parse_model(HEADER + "g (float[2] x) => (float[2] y) { y = Relu (x) }")
    step = run(model)
    assert not step.modified and step.stats == NONE


# -- sharing, IR 3, subgraphs -----------------------------------------------------------------
def test_shared_weight_is_copied_not_changed_in_place():
    rng = np.random.default_rng(10)
    text = HEADER + f"""
g (float[1,4,5,5] x, float[4,4,1,1] w, {bn_inputs(4, "p")}, {bn_inputs(4, "q")})
  => (float[a,b,c,d] y1, float[e,f,g,h] y2)
{{
  c1 = Conv (x, w)
  y1 = BatchNormalization (c1, ps, pbb, pm, pv)
  c2 = Conv (x, w)
  y2 = BatchNormalization (c2, qs, qbb, qm, qv)
}}"""
    model = build(text, {"w": rng.standard_normal((4, 4, 1, 1)).astype(np.float32),
                         **bn_params(rng, 4, "p"), **bn_params(rng, 4, "q")})
    feeds = {"x": rng.standard_normal((1, 4, 5, 5)).astype(np.float32)}
    assert check(model, feeds) == stats(folded=2)
    w1, w2 = (n.inputs[1] for n in model.graph)
    assert {w1.name, w2.name} == {"w", "w_1"}
    assert not np.array_equal(w1.const_value.numpy(), w2.const_value.numpy())


def test_ir3_initializer_inputs_are_constant_parameters():
    rng = np.random.default_rng(11)
    text = '<ir_version: 3, opset_import: ["" : 9]>\n' + f"""
g (float[1,3,4,4] x, float[5,3,1,1] w, {bn_inputs(5)}) => (float[1,5,4,4] y)
{{
  c = Conv (x, w)
  y = BatchNormalization (c, s, bb, m, v)
}}"""
    model = build(text, {"w": rng.standard_normal((5, 3, 1, 1)).astype(np.float32),
                         **bn_params(rng, 5)}, keep_inputs=True)
    feeds = {"x": rng.standard_normal((1, 3, 4, 4)).astype(np.float32)}
    assert check(model, feeds, oracle=ort_plain) == stats(folded=1)
    assert ops(model.graph) == ["Conv"]


def test_inside_an_if_branch():
    rng = np.random.default_rng(12)
    text = HEADER + f"""
g (bool c, float[1,2,4,4] x, float[3,2,1,1] w, {bn_inputs(3)}) => (float[a,b,e,d] y)
{{
  y = If (c) <
    then_branch = t () => (float[a,b,e,d] ty) {{
      k = Conv (x, w)
      ty = BatchNormalization (k, s, bb, m, v)
    }},
    else_branch = f () => (float[a,b,e,d] fy) {{
      fy = Conv (x, w)
    }}
  >
}}"""
    model = build(text, {"w": rng.standard_normal((3, 2, 1, 1)).astype(np.float32),
                         **bn_params(rng, 3)})
    x = rng.standard_normal((1, 2, 4, 4)).astype(np.float32)
    for flag in (False, True):
        feeds = {"c": np.array(flag), "x": x}
        expected = reference(model, feeds)
        if flag:
            assert check(model, feeds) == stats(folded=1)
        assert_close(reference(model, feeds)[0], expected[0])
    then_g = model.graph.nodes[0].attrs["then_branch"].value
    assert ops(then_g) == ["Conv"]
    conv = then_g.nodes[0]
    assert conv.inputs[1].graph is then_g  # the shared outer weight was copied into the branch
    assert then_g.outputs[0] is conv.outputs[0]


@pytest.mark.parametrize("body", [
    # the Conv output has a second reader
    """c = Conv (x, w)
  y = BatchNormalization (c, s, bb, m, v)
  z = Relu (c)""",
    # the Conv weight is not constant (a graph input)
    """c = Conv (x, wx)
  y = BatchNormalization (c, s, bb, m, v)
  z = Relu (c2)""",
])
def test_backward_refused_falls_back_to_decompose(body):
    rng = np.random.default_rng(13)
    text = HEADER + f"""
g (float[1,2,3,3] x, float[2,2,1,1] w, float[2,2,1,1] wx, float[1,2,3,3] c2, {bn_inputs(2)})
  => (float[a,b,e,d] y, float[1,2,3,3] z)
{{
  {body}
}}"""
    model = build(text, {"w": rng.standard_normal((2, 2, 1, 1)).astype(np.float32),
                         **bn_params(rng, 2)})
    feeds = {"x": rng.standard_normal((1, 2, 3, 3)).astype(np.float32),
             "wx": rng.standard_normal((2, 2, 1, 1)).astype(np.float32),
             "c2": rng.standard_normal((1, 2, 3, 3)).astype(np.float32)}
    assert check(model, feeds) == stats(decomposed=1)
    assert "BatchNormalization" not in ops(model.graph)
