"""fold-affine: Mul/Add/Sub/Div by constants folded into Conv/Gemm/MatMul, or merged."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import build_model as build
from conftest import parse_model, run_ort

import edgeopt.passes.fold_affine  # noqa: F401  (registers the pass)
from edgeopt import ir
from edgeopt.passes import PassManager

HEADER = '<ir_version: 8, opset_import: ["" : 17]>\n'


def stats(folded=0, forward=0, merged=0) -> dict[str, int]:
    return {"affine_folded": folded, "affine_folded_forward": forward, "affine_merged": merged}


def run(model: ir.Model, spec: str = "fold-affine"):
    return PassManager(spec, verify="each").run(model).steps[0]


def ops(graph: ir.Graph) -> list[str]:
    return [n.op_type for n in graph]


def ort_plain(model: ir.Model, feeds: dict) -> list[np.ndarray]:
    """ONNX Runtime without graph optimizations (which would fold Mul/Add into Convs itself)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 3
    sess = ort.InferenceSession(ir.to_proto(model).SerializeToString(), so,
                                providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def assert_close(got: np.ndarray, want: np.ndarray) -> None:
    """Equal within 1e-5 relative to the output's scale (and of the same shape)."""
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(np.abs(want).max()))




def check(model: ir.Model, feeds: dict, spec: str = "fold-affine") -> dict:
    """Run the pass, compare ORT before and after, check idempotence; the stats."""
    expected = ort_plain(model, feeds)
    step = run(model, spec)
    assert step.modified
    for got in (ort_plain(model, feeds), run_ort(ir.to_proto(model), feeds)):
        for g, e in zip(got, expected, strict=True):
            assert_close(g, e)
    again = run(model, spec)
    assert not again.modified and again.stats == stats()
    return step.stats


def unchanged(model: ir.Model, spec: str = "fold-affine") -> None:
    version = model.version
    step = run(model, spec)
    assert not step.modified and step.stats == stats()
    assert model.version == version


def rand(rng: np.random.Generator, *shape: int, low: float | None = None) -> np.ndarray:
    if low is not None:  # factors away from zero (a tiny factor hides a wrong weight)
        return (rng.uniform(low, 2, shape) * rng.choice([-1, 1], shape)).astype(np.float32)
    return rng.standard_normal(shape).astype(np.float32)


def dims(shape: tuple[int, ...]) -> str:
    return ",".join(map(str, shape))


# -- backward into Conv ----------------------------------------------------------------------
CONV = HEADER + """
g (float[1,4,6,6] x, float[6,4,3,3] w CONST_INPUTS) => (float[a,b,c,d] y)
{
  conv_out = Conv <pads = [1, 1, 1, 1]> (x, w BIAS)
  BODY
}"""


@pytest.mark.parametrize(("body", "consts", "bias", "n"), [
    ("y = Mul (conv_out, s)", {"s": (6, 1, 1)}, False, 1),
    ("y = Add (t, conv_out)", {"t": (1, 6, 1, 1)}, False, 1),
    ("m = Mul (s, conv_out)\n  y = Add (m, t)", {"s": (6, 1, 1), "t": (6, 1, 1)}, True, 2),
    ("m = Mul (conv_out, s)\n  y = Add (m, t)", {"s": (), "t": (1,)}, False, 2),
    ("m = Div (conv_out, s)\n  y = Sub (m, t)", {"s": (1, 6, 1, 1), "t": (6, 1, 1)}, True, 2),
    ("y = Sub (t, conv_out)", {"t": (6, 1, 1)}, True, 1),
    ("a1 = Add (conv_out, t)\n  m = Mul (a1, s)\n  y = Sub (m, u)",
     {"t": (6, 1, 1), "s": (1, 6, 1, 1), "u": (1, 1, 1)}, False, 3),
])
def test_into_conv(body, consts, bias, n):
    rng = np.random.default_rng(0)
    inputs = "".join(f", float[{dims(s)}] {k}" for k, s in consts.items())
    text = (CONV.replace("CONST_INPUTS", inputs + (", float[6] cb" if bias else ""))
            .replace("BIAS", ", cb" if bias else "").replace("BODY", body))
    weights = {"w": rand(rng, 6, 4, 3, 3),
               **{k: rand(rng, *s, low=0.5) for k, s in consts.items()}}
    if bias:
        weights["cb"] = rand(rng, 6)
    model = build(text, weights)
    feeds = {"x": rand(rng, 1, 4, 6, 6)}
    assert check(model, feeds) == stats(folded=n)
    assert ops(model.graph) == ["Conv"]
    conv = model.graph.nodes[0]
    assert conv.outputs[0].name == "y" and model.graph.outputs[0] is conv.outputs[0]
    assert conv.inputs[1].name == "w"  # the sole reader's weight is rewritten in place
    if "Mul" in body or "Div" in body or "Sub (t" in body:
        assert isinstance(conv.inputs[1].const_value, ir.LazyTensor)
    else:  # a pure shift leaves the weight alone and only creates the bias
        assert isinstance(conv.inputs[1].const_value, ir.ArrayTensor)
    shift = bias or "Add" in body or "Sub" in body
    assert len(conv.inputs) == (3 if shift else 2)
    if shift:
        assert conv.inputs[2].shape == (6,)


def test_scale_without_shift_creates_no_bias():
    rng = np.random.default_rng(1)
    text = CONV.replace("CONST_INPUTS", ", float[6,1,1] s").replace("BIAS", "") \
        .replace("BODY", "y = Mul (conv_out, s)")
    model = build(text, {"w": rand(rng, 6, 4, 3, 3), "s": rand(rng, 6, 1, 1, low=0.5)})
    assert check(model, {"x": rand(rng, 1, 4, 6, 6)}) == stats(folded=1)
    assert len(model.graph.nodes[0].inputs) == 2


@pytest.mark.parametrize(("body", "const_shape"), [
    # spatial: one number per position, not per channel
    ("y = Add (conv_out, t)", (1, 6, 6, 6)),
    # [6] broadcasts along the last (width) axis, which happens to be 6 wide too
    ("y = Mul (conv_out, t)", (6,)),
    # rank 5 would raise the output's rank
    ("y = Mul (conv_out, t)", (1, 1, 6, 1, 1)),
])
def test_broadcast_that_is_not_per_channel_is_left_alone(body, const_shape):
    rng = np.random.default_rng(2)
    text = CONV.replace("CONST_INPUTS", f", float[{dims(const_shape)}] t").replace("BIAS", "") \
        .replace("BODY", body)
    model = build(text, {"w": rand(rng, 6, 4, 3, 3), "t": rand(rng, *const_shape)})
    unchanged(model)
    assert ops(model.graph) == ["Conv", body.split()[2]]


def test_per_channel_head_folds_and_the_rest_stays():
    rng = np.random.default_rng(3)
    text = CONV.replace("CONST_INPUTS", ", float[6,1,1] s, float[1,6,6,6] t") \
        .replace("BIAS", "").replace("BODY", "m = Mul (conv_out, s)\n  y = Add (m, t)")
    model = build(text, {"w": rand(rng, 6, 4, 3, 3), "s": rand(rng, 6, 1, 1, low=0.5),
                         "t": rand(rng, 1, 6, 6, 6)})
    assert check(model, {"x": rand(rng, 1, 4, 6, 6)}) == stats(folded=1)
    assert ops(model.graph) == ["Conv", "Add"]


def test_conv_1d():
    rng = np.random.default_rng(4)
    text = HEADER + """
g (float[2,4,7] x, float[5,4,3] w, float[5,1] s, float[1,5,1] t) => (float[a,b,c] y)
{
  c = Conv (x, w)
  m = Mul (c, s)
  y = Add (m, t)
}"""
    model = build(text, {"w": rand(rng, 5, 4, 3), "s": rand(rng, 5, 1, low=0.5),
                         "t": rand(rng, 1, 5, 1)})
    assert check(model, {"x": rand(rng, 2, 4, 7)}) == stats(folded=2)
    assert ops(model.graph) == ["Conv"]


@pytest.mark.parametrize(("group", "bias"), [(1, True), (2, False), (3, True)])
def test_into_conv_transpose(group, bias):
    rng = np.random.default_rng(5)
    c_in, per_group = 6, 2
    c_out = per_group * group
    b_in, b_arg = (f", float[{c_out}] cb", ", cb") if bias else ("", "")
    text = HEADER + f"""
g (float[1,{c_in},4,4] x, float[{c_in},{per_group},3,3] w{b_in}, float[1,{c_out},1,1] s,
   float[{c_out},1,1] t) => (float[a,b,c,d] y)
{{
  k = ConvTranspose <group = {group}, strides = [2, 2], output_padding = [1, 1]> (x, w{b_arg})
  m = Mul (k, s)
  y = Add (m, t)
}}"""
    weights = {"w": rand(rng, c_in, per_group, 3, 3), "s": rand(rng, 1, c_out, 1, 1, low=0.5),
               "t": rand(rng, c_out, 1, 1)}
    if bias:
        weights["cb"] = rand(rng, c_out)
    model = build(text, weights)
    assert check(model, {"x": rand(rng, 1, c_in, 4, 4)}) == stats(folded=2)
    assert ops(model.graph) == ["ConvTranspose"]


# -- backward into Gemm and MatMul -------------------------------------------------------------
@pytest.mark.parametrize(("trans_b", "alpha", "beta", "c_shape"), [
    (0, 1.0, 1.0, None), (1, 1.0, 1.0, (4,)), (0, 0.5, 2.0, (3, 4)), (1, 2.0, 0.25, (1, 4)),
    (0, 1.0, 3.0, (3, 1)), (1, 1.5, 0.0, ()),
])
def test_into_gemm(trans_b, alpha, beta, c_shape):
    rng = np.random.default_rng(6)
    w_shape = (4, 5) if trans_b else (5, 4)
    c_in = f", float[{dims(c_shape)}] cc" if c_shape is not None else ""
    text = HEADER + f"""
g (float[3,5] x, float[{dims(w_shape)}] w{c_in}, float[4] s, float[1,4] t) => (float[3,4] y)
{{
  h = Gemm <transB = {trans_b}, alpha = {alpha}, beta = {beta}>
      (x, w{", cc" if c_shape is not None else ""})
  m = Mul (h, s)
  y = Sub (m, t)
}}"""
    weights = {"w": rand(rng, *w_shape), "s": rand(rng, 4, low=0.5), "t": rand(rng, 1, 4)}
    if c_shape is not None:
        weights["cc"] = rand(rng, *c_shape)
    model = build(text, weights)
    assert check(model, {"x": rand(rng, 3, 5)}) == stats(folded=2)
    assert ops(model.graph) == ["Gemm"]
    gemm = model.graph.nodes[0]
    assert gemm.attr("beta") == 1.0 and gemm.attr("alpha", 1.0) == alpha


def test_gemm_output_row_constant_is_not_per_channel():
    rng = np.random.default_rng(7)
    text = HEADER + """
g (float[3,5] x, float[5,4] w, float[3,1] s) => (float[3,4] y)
{
  h = Gemm (x, w)
  y = Mul (h, s)
}"""
    model = build(text, {"w": rand(rng, 5, 4), "s": rand(rng, 3, 1)})
    unchanged(model)


def test_into_matmul_of_a_rank_3_activation():
    rng = np.random.default_rng(8)
    text = HEADER + """
g (float[2,5,6] x, float[6,4] w, float[4] s, float[1,1,4] t, float[4] u) => (float[2,5,4] y)
{
  h = MatMul (x, w)
  m = Mul (h, s)
  a = Add (m, t)
  y = Div (a, u)
}"""
    model = build(text, {"w": rand(rng, 6, 4), "s": rand(rng, 4, low=0.5),
                         "t": rand(rng, 1, 1, 4), "u": rand(rng, 4, low=0.5)})
    assert check(model, {"x": rand(rng, 2, 5, 6)}) == stats(folded=2)
    assert ops(model.graph) == ["MatMul", "Add"]  # three nodes became one bias Add
    add = model.graph.nodes[1]
    assert add.inputs[1].shape == (4,) and add.outputs[0].name == "y"


def test_matmul_scale_only_leaves_no_add():
    rng = np.random.default_rng(9)
    text = HEADER + """
g (float[5,6] x, float[6,4] w, float[1,4] s) => (float[5,4] y)
{
  h = MatMul (x, w)
  y = Mul (h, s)
}"""
    model = build(text, {"w": rand(rng, 6, 4), "s": rand(rng, 1, 4, low=0.5)})
    assert check(model, {"x": rand(rng, 5, 6)}) == stats(folded=1)
    assert ops(model.graph) == ["MatMul"]


def test_matmul_bias_add_then_scale_keeps_one_add():
    rng = np.random.default_rng(25)
    text = HEADER + """
g (float[5,6] x, float[6,4] w, float[4] b, float[4] s) => (float[5,4] y)
{
  h = MatMul (x, w)
  a = Add (h, b)
  y = Mul (a, s)
}"""
    model = build(text, {"w": rand(rng, 6, 4), "b": rand(rng, 4), "s": rand(rng, 4, low=0.5)})
    assert check(model, {"x": rand(rng, 5, 6)}) == stats(folded=1)
    assert ops(model.graph) == ["MatMul", "Add"]


def test_conv_with_a_bias_that_is_not_constant_is_not_folded():
    rng = np.random.default_rng(26)
    text = HEADER + """
g (float[1,2,3,3] x, float[2,2,1,1] w, float[2] cb, float[2,1,1] s) => (float[a,b,c,d] y)
{
  k = Conv (x, w, cb)
  y = Mul (k, s)
}"""
    unchanged(build(text, {"w": rand(rng, 2, 2, 1, 1), "s": rand(rng, 2, 1, 1)}))


def test_matmul_with_its_bias_add_is_a_no_op():
    rng = np.random.default_rng(10)
    text = HEADER + """
g (float[5,6] x, float[6,4] w, float[4] b) => (float[5,4] y)
{
  h = MatMul (x, w)
  y = Add (h, b)
}"""
    model = build(text, {"w": rand(rng, 6, 4), "b": rand(rng, 4)})
    unchanged(model)


def test_matmul_of_a_1d_activation_refuses_a_rank_2_constant():
    rng = np.random.default_rng(11)
    text = HEADER + """
g (float[6] x, float[6,4] w, float[1,4] s) => (float[1,4] y)
{
  h = MatMul (x, w)
  y = Mul (h, s)
}"""
    model = build(text, {"w": rand(rng, 6, 4), "s": rand(rng, 1, 4)})
    unchanged(model)  # [1, 4] would turn the [4] output into [1, 4]


def test_integer_matmul_is_left_alone():
    text = HEADER + """
g (int32[2,3] x) => (int32[2,2] y)
<int32[3,2] w = {1, 2, 3, 4, 5, 6}, int32[2] s = {3, 5}>
{
  h = MatMul (x, w)
  y = Mul (h, s)
}"""
    unchanged(parse_model(text))


# -- forward into Convs ------------------------------------------------------------------------
FORWARD = HEADER + """
g (float[1,4,6,6] x, float[8,1,3,3] dw, float[8] db, float[3,4,1,1] w1, float[4,1,1] s,
   float[1,4,1,1] t) => (float[a,b,c,d] y1, float[e,f,g,h] y2)
{
  r = Relu (x)
  m = Mul (r, s)
  n = Add (m, t)
  y1 = Conv <group = 4, PADS> (n, dw, db)
  y2 = Conv (n, w1)
}"""


def forward_model(pads: str, seed: int = 12) -> ir.Model:
    rng = np.random.default_rng(seed)
    return build(FORWARD.replace("PADS", pads), {
        "dw": rand(rng, 8, 1, 3, 3), "db": rand(rng, 8), "w1": rand(rng, 3, 4, 1, 1),
        "s": rand(rng, 4, 1, 1, low=0.5), "t": rand(rng, 1, 4, 1, 1)})


FEEDS_4x6x6 = {"x": np.random.default_rng(13).standard_normal((1, 4, 6, 6)).astype(np.float32)}


@pytest.mark.parametrize("pads", ["pads = [0, 0, 0, 0]", "auto_pad = \"VALID\""])
def test_forward_into_depthwise_and_pointwise_convs(pads):
    model = forward_model(pads)
    assert check(model, FEEDS_4x6x6) == stats(forward=2)
    assert ops(model.graph) == ["Relu", "Conv", "Conv"]
    assert all(n.inputs[0].name == "r" for n in model.graph.nodes[1:])
    assert len(model.graph.nodes[2].inputs) == 3  # the shift created a bias


def test_forward_refused_when_a_conv_is_padded():
    model = forward_model("pads = [1, 1, 1, 1]")
    unchanged(model)  # Mul + Add is already the merged form
    assert ops(model.graph) == ["Relu", "Mul", "Add", "Conv", "Conv"]


def test_forward_refused_when_a_constant_broadcasts_the_channels():
    rng = np.random.default_rng(14)
    text = HEADER + """
g (float[1,1,5,5] x, float[2,3,1,1] w, float[3,1,1] s) => (float[a,b,c,d] y)
{
  r = Relu (x)
  m = Mul (r, s)
  y = Conv (m, w)
}"""
    model = build(text, {"w": rand(rng, 2, 3, 1, 1), "s": rand(rng, 3, 1, 1)})
    unchanged(model)  # r has one channel; the Conv reads three


def test_forward_refused_when_a_constant_raises_the_rank():
    rng = np.random.default_rng(15)
    text = HEADER + """
g (float[3,5,5] x, float[2,3,1,1] w, float[1,3,1,1] s) => (float[a,b,c,d] y)
{
  r = Relu (x)
  m = Mul (r, s)
  y = Conv (m, w)
}"""
    model = build(text, {"w": rand(rng, 2, 3, 1, 1), "s": rand(rng, 1, 3, 1, 1)})
    unchanged(model)


def test_forward_can_be_disabled():
    model = forward_model("pads = [0, 0, 0, 0]")
    unchanged(model, "fold-affine,forward=false")


# -- merging chains ----------------------------------------------------------------------------
def test_chain_after_a_relu_merges_into_mul_and_add():
    rng = np.random.default_rng(16)
    text = HEADER + """
g (float[2,3,4,4] x, float[3,1,1] a1, float[3,1,1] b1, float[1,3,1,1] a2, float[3,1,1] b2,
   float[3,1,1] d) => (float[a,b,c,d] y)
{
  r = Relu (x)
  m1 = Mul (r, a1)
  s1 = Add (m1, b1)
  m2 = Mul (a2, s1)
  s2 = Sub (m2, b2)
  y = Div (s2, d)
}"""
    model = build(text, {k: rand(rng, *s, low=0.5) for k, s in [
        ("a1", (3, 1, 1)), ("b1", (3, 1, 1)), ("a2", (1, 3, 1, 1)), ("b2", (3, 1, 1)),
        ("d", (3, 1, 1))]})
    assert check(model, {"x": rand(rng, 2, 3, 4, 4)}) == stats(merged=3)
    assert ops(model.graph) == ["Relu", "Mul", "Add"]
    mul, add = model.graph.nodes[1:]
    assert mul.inputs[1].shape == (1, 3, 1, 1) and add.outputs[0].name == "y"
    assert model.graph.outputs[0] is add.outputs[0]


def test_reversed_subtraction_and_a_shift_only_chain():
    rng = np.random.default_rng(17)
    text = HEADER + """
g (float[2,3] x, float[3] t, float[1,3] u, float[1,3] v) => (float[2,3] y)
{
  r = Relu (x)
  a = Sub (t, r)
  b = Add (a, u)
  y = Sub (v, b)
}"""
    model = build(text, {"t": rand(rng, 3), "u": rand(rng, 1, 3), "v": rand(rng, 1, 3)})
    assert check(model, {"x": rand(rng, 2, 3)}) == stats(merged=2)
    assert ops(model.graph) == ["Relu", "Add"]  # -(-r) is r: no Mul is needed


def test_neutral_constants_keep_the_broadcast_shape():
    text = HEADER + """
g (float[2,3] x) => (float[a,b,c] y)
<float[1,1,1] one = {1.0}, float[3] zero = {0.0, 0.0, 0.0}>
{
  r = Relu (x)
  m = Mul (r, one)
  y = Add (m, zero)
}"""
    model = parse_model(text.replace("y = Add (m, zero)", "n = Add (m, zero)\n  y = Mul (n, one)"))
    feeds = {"x": np.random.default_rng(18).standard_normal((2, 3)).astype(np.float32)}
    assert check(model, feeds) == stats(merged=2)
    assert ops(model.graph) == ["Relu", "Add"]
    assert model.graph.nodes[1].inputs[1].shape == (1, 1, 3)  # the output stays [1, 2, 3]
    assert ort_plain(model, feeds)[0].shape == (1, 2, 3)


def test_merge_refuses_to_build_a_larger_constant():
    rng = np.random.default_rng(19)
    text = HEADER + """
g (float[1,3,4,5] x, float[5] w, float[3,1,1] s, float[3,1,1] t) => (float[1,3,4,5] y)
{
  r = Relu (x)
  a = Add (r, w)
  m = Mul (a, s)
  y = Add (m, t)
}"""
    model = build(text, {"w": rand(rng, 5), "s": rand(rng, 3, 1, 1), "t": rand(rng, 3, 1, 1)})
    unchanged(model)  # the merged shift would be [3, 1, 5]


@pytest.mark.parametrize(("op", "c"), [
    ("Div", [2.0, 0.0]),  # division by zero
    ("Div", [2.0, 1e-39]),  # 1 / c overflows float32
    ("Mul", [2.0, float("inf")]),  # inf * 0 would become nan inside the weights
])
def test_constants_that_cannot_move_end_the_chain(op, c):
    text = HEADER + f"""
g (float[1,2,3] x) => (float[1,2,3] y)
<float[2,1] s = {{3.0, 4.0}}, float[2,1] c = {{{", ".join(map(str, c))}}},
 float[2,1] t = {{1.0, 2.0}}>
{{
  r = Relu (x)
  a = Mul (r, s)
  b = {op} (a, c)
  y = Add (b, t)
}}"""
    unchanged(parse_model(text))


@pytest.mark.parametrize(("op", "c"), [
    ("Div", [2.0, 0.0]), ("Div", [2.0, 1e-39]), ("Mul", [2.0, float("inf")]),
    ("Add", [float("nan"), 1.0]),
])
def test_constants_that_cannot_move_are_not_folded_into_a_conv(op, c):
    text = HEADER + f"""
g (float[1,2,3] x) => (float[1,2,3] y)
<float[2,2,1] w = {{1.0, 2.0, 3.0, 4.0}}, float[2,1] c = {{{", ".join(map(str, c))}}}>
{{
  k = Conv (x, w)
  y = {op} (k, c)
}}"""
    unchanged(parse_model(text))


def test_division_of_a_constant_by_x_is_not_affine():
    text = HEADER + """
g (float[2] x) => (float[2] y)
<float[2] s = {3.0, 4.0}, float[2] c = {2.0, 5.0}, float[2] t = {1.0, 2.0}>
{
  a = Mul (x, s)
  b = Div (c, a)
  y = Add (b, t)
}"""
    unchanged(parse_model(text))


def test_float16_product_that_overflows_is_not_merged():
    text = HEADER + """
g (float16[2] x, float16[1] s, float16[1] t, float16[1] u) => (float16[2] y)
{
  r = Relu (x)
  a = Mul (r, s)
  b = Mul (a, t)
  y = Add (b, u)
}"""
    big, one = np.array([60000.0], np.float16), np.array([1.0], np.float16)
    unchanged(build(text, {"s": big, "t": big, "u": one}))


def test_merge_can_be_disabled():
    text = HEADER + """
g (float[2] x) => (float[2] y)
<float[2] s = {3.0, 4.0}, float[2] t = {1.0, 2.0}>
{
  r = Relu (x)
  a = Mul (r, s)
  y = Mul (a, t)
}"""
    unchanged(parse_model(text), "fold-affine,merge=false")


# -- what is not a constant, shared weights, opsets, subgraphs --------------------------------
def test_shared_weight_is_copied_not_changed_in_place():
    rng = np.random.default_rng(20)
    text = HEADER + """
g (float[1,4,5,5] x, float[4,4,1,1] w, float[4,1,1] p, float[4,1,1] q)
  => (float[a,b,c,d] y1, float[e,f,g,h] y2)
{
  c1 = Conv (x, w)
  y1 = Mul (c1, p)
  c2 = Conv (x, w)
  y2 = Mul (c2, q)
}"""
    model = build(text, {"w": rand(rng, 4, 4, 1, 1), "p": rand(rng, 4, 1, 1, low=0.5),
                         "q": rand(rng, 4, 1, 1, low=0.5)})
    assert check(model, {"x": rand(rng, 1, 4, 5, 5)}) == stats(folded=2)
    w1, w2 = (n.inputs[1] for n in model.graph)
    assert {w1.name, w2.name} == {"w", "w_1"}
    assert not np.array_equal(w1.const_value.numpy(), w2.const_value.numpy())


def test_conv_output_with_another_reader_is_not_folded():
    rng = np.random.default_rng(21)
    text = HEADER + """
g (float[1,2,3,3] x, float[2,2,1,1] w, float[2,1,1] s) => (float[a,b,c,d] y, float[e,f,g,h] z)
{
  c = Conv (x, w)
  y = Mul (c, s)
  z = Relu (c)
}"""
    model = build(text, {"w": rand(rng, 2, 2, 1, 1), "s": rand(rng, 2, 1, 1)})
    unchanged(model)


def test_graph_input_with_a_default_is_not_a_constant():
    rng = np.random.default_rng(22)
    text = HEADER + """
g (float[1,2,3,3] x, float[2,2,1,1] w, float[2,1,1] s) => (float[a,b,c,d] y)
{
  c = Conv (x, w)
  y = Mul (c, s)
}"""
    model = build(text, {"w": rand(rng, 2, 2, 1, 1)})
    s = model.graph.inputs[1]
    s.const_value = ir.ArrayTensor(rand(rng, 2, 1, 1))
    model.graph.initializers.add(s)  # s stays a graph input: the caller may override it
    unchanged(model)


def test_ir3_initializer_inputs_are_constants():
    rng = np.random.default_rng(23)
    text = '<ir_version: 3, opset_import: ["" : 9]>\n' + """
g (float[1,3,4,4] x, float[5,3,1,1] w, float[5,1,1] s, float[5,1,1] t) => (float[1,5,4,4] y)
{
  c = Conv (x, w)
  m = Mul (c, s)
  y = Add (m, t)
}"""
    model = build(text, {"w": rand(rng, 5, 3, 1, 1), "s": rand(rng, 5, 1, 1, low=0.5),
                         "t": rand(rng, 5, 1, 1)}, keep_inputs=True)
    assert check(model, {"x": rand(rng, 1, 3, 4, 4)}) == stats(folded=2)
    assert ops(model.graph) == ["Conv"]


def test_opset_6_legacy_broadcasting_is_left_alone():
    text = '<ir_version: 3, opset_import: ["" : 6]>\n' + """
g (float[1,2,3,3] x) => (float[1,2,3,3] y)
<float[2,2,1,1] w = {1.0, 2.0, 3.0, 4.0}, float[2] s = {2.0, 3.0}>
{
  c = Conv (x, w)
  y = Mul <broadcast = 1, axis = 1> (c, s)
}"""
    unchanged(parse_model(text))


def test_inside_an_if_branch():
    rng = np.random.default_rng(24)
    text = HEADER + """
g (bool cond, float[1,2,4,4] x, float[3,2,1,1] w, float[3,1,1] s, float[3,1,1] t)
  => (float[a,b,e,d] y)
{
  y = If (cond) <
    then_branch = tb () => (float[a,b,e,d] ty) {
      k = Conv (x, w)
      m = Mul (k, s)
      ty = Add (m, t)
    },
    else_branch = eb () => (float[a,b,e,d] ey) {
      ey = Conv (x, w)
    }
  >
}"""
    model = build(text, {"w": rand(rng, 3, 2, 1, 1), "s": rand(rng, 3, 1, 1, low=0.5),
                         "t": rand(rng, 3, 1, 1)})
    x = rand(rng, 1, 2, 4, 4)
    cases = [{"cond": np.array(flag), "x": x} for flag in (True, False)]
    expected = [ort_plain(model, feeds)[0] for feeds in cases]
    assert check(model, cases[0]) == stats(folded=2)
    for feeds, want in zip(cases, expected, strict=True):
        assert_close(ort_plain(model, feeds)[0], want)
    then_g = model.graph.nodes[0].attrs["then_branch"].value
    assert ops(then_g) == ["Conv"]
    conv = then_g.nodes[0]
    assert conv.inputs[1].graph is then_g  # the shared outer weight was copied into the branch
    assert then_g.outputs[0] is conv.outputs[0] and conv.outputs[0].name == "ty"


def test_no_affine_node_is_a_no_op():
    unchanged(parse_model(HEADER + "g (float[2] x) => (float[2] y) { y = Relu (x) }"))
