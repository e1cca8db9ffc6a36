"""recovery: bias compensation, least-squares refit and BN re-estimation (numerics only)."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.reference
import pytest
from conftest import parse_model
from onnx import TensorProto, helper

from edgeopt.passes import recovery
from edgeopt.passes.recovery import (
    Clamp,
    LayerSpec,
    bias_compensation,
    im2col,
    least_squares_refit,
    match_batchnorm,
    reestimate_batchnorm,
)

CONV_ATTRS = ("strides", "pads", "dilations", "auto_pad")


def conv_ref(x: np.ndarray, w: np.ndarray, b: np.ndarray | None = None, **attrs) -> np.ndarray:
    """Conv through onnx.reference (float64 in, float64 out)."""
    names = ["x", "w"] + (["b"] if b is not None else [])
    node = helper.make_node("Conv", names, ["y"], **{k: v for k, v in attrs.items() if v})
    dt = helper.np_dtype_to_tensor_dtype(x.dtype)
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info(n, dt, None) for n in names],
        [helper.make_tensor_value_info("y", dt, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    feeds = {"x": x, "w": w} | ({"b": b} if b is not None else {})
    return onnx.reference.ReferenceEvaluator(model).run(None, feeds)[0]


def rel(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def spec_of(attrs: dict) -> LayerSpec:
    return LayerSpec.from_onnx("Conv", {k: attrs[k] for k in CONV_ATTRS if k in attrs})


# -- LayerSpec ---------------------------------------------------------------------------------
def test_from_onnx_reads_ir_attrs():
    model = parse_model("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[1,4,8,8] x, float[6,4,3,3] w, float[2,4] a, float[3,4] m) => (float y, float z) {
            y = Conv <strides = [2, 2], pads = [1, 1, 1, 1], dilations = [1, 2]> (x, w)
            z = Gemm <transB = 1> (a, m)
        }""")
    conv, gemm = model.graph.nodes
    assert LayerSpec.from_onnx("Conv", conv.attrs) == LayerSpec(
        "conv", strides=(2, 2), pads=(1, 1, 1, 1), dilations=(1, 2))
    assert LayerSpec.from_onnx("Gemm", gemm.attrs) == LayerSpec("gemm", "out_in")
    assert LayerSpec.from_onnx("MatMul", {}) == LayerSpec("gemm", "in_out")


@pytest.mark.parametrize(("op", "attrs", "match"), [
    ("Gemm", {"transA": 1}, "transA=0 and alpha=beta=1"),
    ("Gemm", {"alpha": 2.0}, "transA=0 and alpha=beta=1"),
    ("Conv", {"group": 4}, "group=1 only, not group=4"),
    ("Conv", {"auto_pad": "SAME"}, "unknown auto_pad 'SAME'"),
    ("Relu", {}, "Gemm, MatMul and Conv consumers, not Relu"),
])
def test_from_onnx_rejects(op, attrs, match):
    with pytest.raises(ValueError, match=match):
        LayerSpec.from_onnx(op, attrs)


def test_conv_spec_has_one_layout():
    with pytest.raises(ValueError, match=r"Conv weight is \[out, in, \*kernel\]"):
        bias_compensation(np.zeros((2, 2, 1, 1)), None, [0], np.zeros(2),
                          LayerSpec("conv", "out_in"))


# -- im2col ------------------------------------------------------------------------------------
@pytest.mark.parametrize("attrs", [
    {},
    {"strides": [2, 2], "pads": [1, 1, 1, 1]},
    {"strides": [1, 2], "pads": [0, 2, 1, 0], "dilations": [2, 1]},
    {"strides": [3, 1], "dilations": [2, 3], "pads": [2, 1, 0, 3]},
    {"auto_pad": "SAME_UPPER", "strides": [2, 2]},
    {"auto_pad": "SAME_LOWER", "strides": [2, 3], "dilations": [1, 2]},
    {"auto_pad": "VALID", "strides": [2, 1]},
])
def test_im2col_matches_reference_conv(attrs):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(2, 3, 8, 11))  # SAME: odd total padding, so UPPER != LOWER
    w = rng.normal(size=(5, 3, 3, 2))
    b = rng.normal(size=5)
    want = conv_ref(x, w, b, **attrs)
    cols = im2col(x, w.shape[2:], spec_of(attrs))
    got = (cols @ w.reshape(5, -1).T + b).reshape(2, *want.shape[2:], 5)
    np.testing.assert_allclose(np.moveaxis(got, -1, 1), want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kernel", [(3,), (2, 2, 3)])
def test_im2col_1d_and_3d(kernel):
    rng = np.random.default_rng(2)
    d = len(kernel)
    x = rng.normal(size=(2, 2, *[7] * d))
    w = rng.normal(size=(4, 2, *kernel))
    attrs = {"strides": [2] * d, "pads": [1] * (2 * d)}
    want = conv_ref(x, w, **attrs)
    got = im2col(x, kernel, spec_of(attrs)) @ w.reshape(4, -1).T
    np.testing.assert_allclose(np.moveaxis(got.reshape(2, *want.shape[2:], 4), -1, 1), want,
                               atol=1e-12)


def test_im2col_kernel_larger_than_input():
    with pytest.raises(ValueError, match="smaller than the kernel"):
        im2col(np.zeros((1, 1, 2, 2)), (3, 3), LayerSpec("conv"))


# -- bias compensation -------------------------------------------------------------------------
def constant_removed(x: np.ndarray, removed: np.ndarray, values: np.ndarray) -> np.ndarray:
    x = x.copy()
    x[:, removed] = values.reshape(-1, *[1] * (x.ndim - 2))
    return x


@pytest.mark.parametrize("layout", ["in_out", "out_in"])
def test_bias_compensation_gemm_exact_for_constant_channels(layout):
    rng = np.random.default_rng(3)
    x = rng.normal(size=(16, 10))
    removed, keep = np.array([1, 4, 7]), np.array([0, 2, 3, 5, 6, 8, 9])
    x = constant_removed(x, removed, rng.normal(size=3))
    w, b = rng.normal(size=(10, 6)), rng.normal(size=6)
    weight = w if layout == "in_out" else w.T.copy()
    new_b = bias_compensation(weight, b, removed, x.mean(axis=0), LayerSpec("gemm", layout))
    np.testing.assert_allclose(x[:, keep] @ w[keep] + new_b, x @ w + b, atol=1e-12)
    # A Gemm C of shape [1, out] gives the same [out] bias.
    np.testing.assert_allclose(bias_compensation(weight, b[None], removed, x.mean(axis=0),
                                                 LayerSpec("gemm", layout)), new_b)
    # Without a bias the compensation is the removed channels' contribution alone.
    np.testing.assert_allclose(bias_compensation(weight, None, removed, x.mean(axis=0),
                                                 LayerSpec("gemm", layout)), new_b - b)


def test_bias_compensation_conv_exact_without_padding():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(3, 6, 8, 8)).astype(np.float32)
    removed, keep = np.array([0, 3, 5]), np.array([1, 2, 4])
    x = constant_removed(x, removed, rng.normal(size=3).astype(np.float32))
    w = rng.normal(size=(4, 6, 3, 3)).astype(np.float32)
    b = rng.normal(size=4).astype(np.float32)
    spec = LayerSpec("conv", strides=(2, 1))
    new_b = bias_compensation(w, b, removed, x.mean(axis=(0, 2, 3)), spec)
    assert new_b.dtype == np.float32 and new_b.shape == (4,)
    x64, w64 = x.astype(np.float64), w.astype(np.float64)
    want = conv_ref(x64, w64, b.astype(np.float64), strides=[2, 1])
    got = conv_ref(x64[:, keep], w64[:, keep], new_b.astype(np.float64), strides=[2, 1])
    assert rel(got, want) < 1e-6


def test_bias_compensation_conv_padding_needs_the_map():
    """With zero padding the per-channel form is off at the borders; the [C, H, W] form is exact."""
    rng = np.random.default_rng(5)
    removed, keep = np.array([1, 2]), np.array([0, 3])
    x = rng.normal(size=(2, 4, 6, 7))
    pattern = rng.normal(size=(2, 6, 7))  # removed channels: the same map in every sample
    x[:, removed] = pattern
    w, b = rng.normal(size=(3, 4, 3, 3)), rng.normal(size=3)
    attrs = {"pads": [1, 1, 1, 1], "strides": [2, 2]}
    want = conv_ref(x, w, b, **attrs)
    kept = conv_ref(x[:, keep], w[:, keep], **attrs)
    flat_b = bias_compensation(w, b, removed, x.mean(axis=(0, 2, 3)), spec_of(attrs))
    assert rel(kept + flat_b[:, None, None], want) > 0.05
    bias_map = bias_compensation(w, b, removed, x.mean(axis=0), spec_of(attrs))
    assert bias_map.shape == (3, 3, 4)
    np.testing.assert_allclose(kept + bias_map, want, atol=1e-12)


def test_bias_compensation_checks_channel_count():
    with pytest.raises(ValueError, match="channel_means has 5 channels, the weight reads 6"):
        bias_compensation(np.zeros((4, 6, 1, 1)), None, [0], np.zeros(5), LayerSpec("conv"))


# -- least-squares refit -----------------------------------------------------------------------
def gemm_case(rng: np.random.Generator, n: int = 64):
    """Inputs whose removed features are linear combinations of the kept ones."""
    keep, removed = np.array([0, 2, 3, 5, 7, 8]), np.array([1, 4, 6, 9])
    x = np.empty((n, 10))
    x[:, keep] = rng.normal(size=(n, 6)) + 1.0
    x[:, removed] = x[:, keep] @ rng.normal(size=(6, 4))
    return x, keep, rng.normal(size=(10, 5)), rng.normal(size=5)


@pytest.mark.parametrize("layout", ["in_out", "out_in"])
def test_refit_gemm_exact_for_linearly_dependent_channels(layout):
    x, keep, w, b = gemm_case(np.random.default_rng(6))
    weight = w if layout == "in_out" else w.T.copy()
    new_w, new_b, rep = least_squares_refit(weight, b, x, keep, LayerSpec("gemm", layout),
                                            ridge=1e-12)
    assert new_w.shape == ((6, 5) if layout == "in_out" else (5, 6))
    new_w = new_w if layout == "in_out" else new_w.T
    assert rel(x[:, keep] @ new_w + new_b, x @ w + b) < 1e-9
    assert rep["method"] == "refit" and rep["rows"] == 64
    assert rep["rel_err_refit"] < 1e-6 < 0.1 < rep["rel_err_bias"] < rep["rel_err_drop"]


def test_refit_gemm_default_ridge_and_batched_matmul_input():
    """Rank-3 MatMul inputs: features last, one sample (24 rows) held out; the default
    ridges cost < 1e-3 (the smallest wins on exact data)."""
    x, keep, w, _ = gemm_case(np.random.default_rng(7), n=96)
    x3 = x.reshape(4, 24, 10)
    new_w, new_b, rep = least_squares_refit(w, None, x3, keep, LayerSpec("gemm"))
    assert rel(x3[..., keep] @ new_w + new_b, x3 @ w) < 1e-3
    assert rep["rows"] == 96 and rep["rows_held_out"] == 24
    assert rep["method"] == "refit" and rep["ridge"] == 1e-4


CONV_S2P1 = {"strides": [2, 2], "pads": [1, 1, 1, 1]}


def conv_case(rng: np.random.Generator, n: int = 4, hw: int = 10):
    """Conv inputs whose removed channels are linear combinations of the kept channels
    (no offset: zero padding then stays consistent)."""
    keep, removed = np.array([0, 1, 3, 4, 6]), np.array([2, 5, 7])
    x = np.empty((n, 8, hw, hw))
    x[:, keep] = rng.normal(size=(n, 5, hw, hw))
    x[:, removed] = np.einsum("nkhw,kr->nrhw", x[:, keep], rng.normal(size=(5, 3)))
    return x, keep, rng.normal(size=(6, 8, 3, 3)), rng.normal(size=6)


def test_refit_conv_exact_for_linearly_dependent_channels():
    x, keep, w, b = conv_case(np.random.default_rng(8))
    new_w, new_b, rep = least_squares_refit(w, b, x, keep, spec_of(CONV_S2P1), ridge=1e-12)
    assert new_w.shape == (6, 5, 3, 3) and new_b.shape == (6,)
    want = conv_ref(x, w, b, **CONV_S2P1)
    assert rel(conv_ref(x[:, keep], new_w, new_b, **CONV_S2P1), want) < 1e-9
    assert rep["rows"] == 4 * 5 * 5 and rep["rows_held_out"] == 25  # one sample held out
    assert rep["method"] == "refit"
    assert rep["rel_err_refit"] < 1e-6 and rep["rel_err_drop"] > 0.3


def test_refit_conv_random_data_improves_and_report_is_the_real_error():
    rng = np.random.default_rng(9)
    x = np.maximum(rng.normal(size=(6, 8, 9, 9)), 0)  # post-ReLU: far from zero mean
    x[:, 4:] += 0.5 * x[:, :4]  # correlated channels, so the refit has something to use
    w, b = rng.normal(size=(5, 8, 3, 3)), rng.normal(size=5)
    keep = np.array([0, 1, 2, 3, 6])
    new_w, new_b, rep = least_squares_refit(w, b, x, keep, spec_of(CONV_S2P1), holdout=0)
    want = conv_ref(x, w, b, **CONV_S2P1)
    drop = conv_ref(x[:, keep], w[:, keep], b, **CONV_S2P1)
    got = conv_ref(x[:, keep], new_w, new_b, **CONV_S2P1)
    # Every row is used (6*5*5 < max_rows) and scored in-sample: the report is the real error.
    assert rep["rel_err_drop"] == pytest.approx(rel(drop, want), rel=1e-9)
    assert rep["rel_err_refit"] == pytest.approx(rel(got, want), rel=1e-9)
    assert rep["method"] == "refit"
    assert rep["rel_err_refit"] < 0.8 * rep["rel_err_bias"] < rep["rel_err_drop"]


def test_refit_accumulates_in_chunks(monkeypatch):
    """Moments summed over many small chunks give the single-chunk answer."""
    rng = np.random.default_rng(20)
    x = np.maximum(rng.normal(size=(6, 8, 9, 9)), 0) + 3.0
    w, b = rng.normal(size=(5, 8, 3, 3)), rng.normal(size=5)
    keep = np.array([0, 2, 3, 5, 6])
    whole = least_squares_refit(w, b, x, keep, spec_of(CONV_S2P1))
    monkeypatch.setattr(recovery, "CHUNK_ELEMS", 1000)  # 13 rows per chunk, 12 chunks
    chunked = least_squares_refit(w, b, x, keep, spec_of(CONV_S2P1))
    np.testing.assert_allclose(chunked[0], whole[0], rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(chunked[1], whole[1], rtol=1e-9, atol=1e-9)
    for key in ("rel_err_drop", "rel_err_bias", "rel_err_refit"):
        assert chunked[2][key] == pytest.approx(whole[2][key], rel=1e-9)


def test_refit_gemm_bias_candidate_is_bias_compensation():
    """With a refit ruled out (huge ridge), the fallback is exactly bias_compensation."""
    rng = np.random.default_rng(10)
    x = rng.normal(size=(40, 7)) + 2.0
    w, b = rng.normal(size=(7, 3)), rng.normal(size=3)
    keep, removed = np.array([0, 1, 4, 6]), np.array([2, 3, 5])
    new_w, new_b, rep = least_squares_refit(w, b, x, keep, LayerSpec("gemm"), ridge=1e6)
    assert rep["method"] == "bias" and rep["rel_err_refit"] == rep["rel_err_bias"]
    assert rep["rel_err_bias"] < rep["rel_err_drop"]
    np.testing.assert_array_equal(new_w, w[keep])
    want_b = bias_compensation(w, b, removed, x.mean(axis=0), LayerSpec("gemm"))
    np.testing.assert_allclose(new_b, want_b, atol=1e-12)


def test_refit_holdout_rejects_an_overfit():
    """40 samples, 30 kept features, 20 unpredictable removed ones: an in-sample refit looks
    good on its rows and is worse than dropping on new data; held-out scoring keeps the bias."""
    rng = np.random.default_rng(0)
    x, fresh = rng.normal(size=(40, 50)) + 1, rng.normal(size=(2000, 50)) + 1
    w, b = rng.normal(size=(50, 5)), rng.normal(size=5)
    keep = np.arange(30)
    bias_only = bias_compensation(w, b, np.arange(30, 50), x.mean(axis=0), LayerSpec("gemm"))
    want = fresh @ w + b
    err_bias = rel(fresh[:, keep] @ w[keep] + bias_only, want)
    new_w, new_b, rep = least_squares_refit(w, b, x, keep, LayerSpec("gemm"), ridge=1e-4,
                                            holdout=0)
    assert rep["method"] == "refit" and rep["rel_err_refit"] < 0.25
    assert rel(fresh[:, keep] @ new_w + new_b, want) > 1.3 > 0.45 > err_bias
    new_w, new_b, rep = least_squares_refit(w, b, x, keep, LayerSpec("gemm"))
    assert rep["method"] == "bias" and rep["rows_held_out"] == 10 and rep["rows"] == 40
    assert rep["rel_err_bias"] < rep["rel_err_drop"]
    np.testing.assert_allclose(new_b, bias_only, atol=1e-12)
    assert rel(fresh[:, keep] @ new_w + new_b, want) == pytest.approx(err_bias, rel=1e-12)


def test_refit_falls_back_when_the_system_is_singular():
    rng = np.random.default_rng(11)
    x = rng.normal(size=(30, 6))
    x[:, 1] = x[:, 0]  # duplicate kept columns and no ridge: singular normal equations
    w, b = rng.normal(size=(6, 2)), np.zeros(2)
    keep = np.array([0, 1, 2])
    new_w, _, rep = least_squares_refit(w, b, x, keep, LayerSpec("gemm"), ridge=0.0)
    assert rep["method"] in ("bias", "drop")
    np.testing.assert_array_equal(new_w, w[keep])
    assert rep["rel_err_refit"] <= rep["rel_err_drop"]


def test_refit_never_worse_than_drop_on_many_random_problems():
    rng = np.random.default_rng(12)
    for ridge in (0.0, 1e-4, 1.0, 1e3):
        x = rng.normal(size=(20, 9)) * rng.uniform(0, 3, size=9)
        w, b = rng.normal(size=(9, 4)), rng.normal(size=4)
        keep = np.sort(rng.choice(9, 4, replace=False))
        new_w, new_b, rep = least_squares_refit(w, b, x, keep, LayerSpec("gemm"), ridge=ridge)
        y = x @ w + b
        assert rel(x[:, keep] @ new_w + new_b, y) <= rel(x[:, keep] @ w[keep] + b, y) + 1e-12
        assert rep["rel_err_refit"] <= rep["rel_err_drop"]


def test_refit_respects_max_rows_deterministically():
    x, keep, w, b = conv_case(np.random.default_rng(13), n=6, hw=16)
    spec = spec_of(CONV_S2P1)  # 6 * 8 * 8 = 384 rows
    a = least_squares_refit(w, b, x, keep, spec, max_rows=100, seed=3)
    again = least_squares_refit(w, b, x, keep, spec, max_rows=100, seed=3)
    other = least_squares_refit(w, b, x, keep, spec, max_rows=100, seed=4)
    assert a[2]["rows"] == 100
    np.testing.assert_array_equal(a[0], again[0])
    assert a[2] == again[2] and a[2] != other[2]
    assert least_squares_refit(w, b, x, keep, spec, max_rows=384)[2]["rows"] == 384


def test_refit_float32_inputs_float32_targets_solved_in_float64():
    x, keep, w, b = conv_case(np.random.default_rng(14))
    x32, w32, b32 = x.astype(np.float32), w.astype(np.float32), b.astype(np.float32)
    new_w, new_b, rep = least_squares_refit(w32, b32, x32, keep, spec_of(CONV_S2P1),
                                            ridge=1e-12)
    assert new_w.dtype == np.float32 and new_b.dtype == np.float32
    # The targets are the float32 Conv (as the model computes it), the normal equations are
    # float64: the exact solution is still found, to the precision of the targets.
    w64, b64, rep64 = least_squares_refit(w32.astype(np.float64), b32.astype(np.float64),
                                          x32.astype(np.float64), keep, spec_of(CONV_S2P1),
                                          ridge=1e-12)
    assert rep["method"] == rep64["method"] == "refit" and rep["rel_err_refit"] < 1e-6
    assert rep["rel_err_drop"] == pytest.approx(rep64["rel_err_drop"], rel=1e-6)
    np.testing.assert_allclose(new_w, w64, rtol=1e-3, atol=1e-5)
    want = conv_ref(x32.astype(np.float64), w32.astype(np.float64), b64, **CONV_S2P1)
    got = conv_ref(x32[:, keep].astype(np.float64), new_w.astype(np.float64),
                   new_b.astype(np.float64), **CONV_S2P1)
    assert rel(got, want) < 1e-6


def test_refit_on_pruned_model_inputs():
    """x_inputs: the kept channels as the pruned model computes them (here: rescaled)."""
    x, keep, w, b = conv_case(np.random.default_rng(15))
    x_pruned = 0.5 * x[:, keep] + 0.1 * np.roll(x[:, keep], 1, axis=1)  # invertible mix
    new_w, new_b, rep = least_squares_refit(w, b, x, keep, spec_of(CONV_S2P1), ridge=1e-12,
                                            x_inputs=x_pruned)
    want = conv_ref(x, w, b, **CONV_S2P1)
    assert rel(conv_ref(x_pruned, new_w, new_b, **CONV_S2P1), want) < 1e-9
    assert rep["rel_err_drop"] > 0.3
    with pytest.raises(ValueError, match=r"do not have 5 channels on the second axis"):
        least_squares_refit(w, b, x, keep, spec_of(CONV_S2P1), x_inputs=x[:, :4])


def test_refit_keeps_the_original_bias_when_the_mean_does_not_generalize():
    """Removed feature +1, +1, -1, -1: the mean of any 3 rows is -+1/3, which makes the
    held-out row worse than leaving the bias alone."""
    x = np.array([[1.0], [1.0], [-1.0], [-1.0]])
    new_w, new_b, rep = least_squares_refit(np.ones((1, 1)), np.zeros(1), x, [],
                                            LayerSpec("gemm"))
    assert rep["method"] == "drop" and rep["rows_held_out"] == 1 and rep["ridge"] is None
    assert rep["rel_err_drop"] == pytest.approx(1.0)
    assert rep["rel_err_bias"] == pytest.approx(4 / 3)
    assert new_w.shape == (0, 1) and new_b.tolist() == [0.0]


def test_moments_merge_equals_moments_of_all_rows():
    rng = np.random.default_rng(21)
    x = rng.normal(size=(30, 6)) * 3 + 5
    w2 = rng.normal(size=(6, 4))
    design = recovery._Design(lambda r: x[r], None, np.array([0, 2, 5]), w2, rng.normal(size=4),
                              total=30, per_sample=1)
    rows = np.arange(30)
    merged = design.moments(rows[:11]).merge(design.moments(rows[11:]))
    whole = design.moments(rows)
    assert merged.n == whole.n == 30
    for name in ("mx", "my", "axx", "axy", "yy", "y_norm2"):
        np.testing.assert_allclose(getattr(merged, name), getattr(whole, name), rtol=1e-10,
                                   atol=1e-9)


def test_refit_keeping_nothing_leaves_the_mean_output():
    rng = np.random.default_rng(16)
    x, w, b = rng.normal(size=(50, 4)) + 1, rng.normal(size=(4, 3)), rng.normal(size=3)
    new_w, new_b, rep = least_squares_refit(w, b, x, [], LayerSpec("gemm"))
    assert new_w.shape == (0, 3)
    np.testing.assert_allclose(new_b, (x @ w + b).mean(axis=0), atol=1e-12)
    assert rep["rel_err_refit"] <= rep["rel_err_drop"]


# -- BatchNormalization ------------------------------------------------------------------------
def test_reestimate_batchnorm_matches_numpy():
    rng = np.random.default_rng(17)
    x = (rng.normal(size=(10, 4, 5, 6)) * [[[[1]], [[2]], [[0.1]], [[5]]]] + 3).astype(np.float32)
    mean, var = reestimate_batchnorm(x)
    assert mean.dtype == np.float32 and mean.shape == (4,)
    x64 = x.astype(np.float64)
    np.testing.assert_allclose(mean, x64.mean(axis=(0, 2, 3)), rtol=1e-6)
    np.testing.assert_allclose(var, x64.var(axis=(0, 2, 3)), rtol=1e-6)
    # Batches merged one by one give the same statistics.
    m2, v2 = reestimate_batchnorm(iter([x[:3], x[3:4], x[4:]]))
    np.testing.assert_allclose(m2, mean, rtol=1e-6)
    np.testing.assert_allclose(v2, var, rtol=1e-6)
    # Channels last.
    m3, v3 = reestimate_batchnorm(np.moveaxis(x, 1, -1), channel_axis=-1)
    np.testing.assert_allclose(m3, mean, rtol=1e-6)
    np.testing.assert_allclose(v3, var, rtol=1e-6)
    with pytest.raises(ValueError, match="at least one sample"):
        reestimate_batchnorm([])


def bn_model(c: int, eps: float) -> onnx.ModelProto:
    inputs = [helper.make_tensor_value_info("x", TensorProto.DOUBLE, None)] + [
        helper.make_tensor_value_info(n, TensorProto.DOUBLE, [c]) for n in "sbmv"]
    node = helper.make_node("BatchNormalization", ["x", "s", "b", "m", "v"], ["y"], epsilon=eps)
    graph = helper.make_graph([node], "g", inputs,
                              [helper.make_tensor_value_info("y", TensorProto.DOUBLE, None)])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)])


def run_bn(x: np.ndarray, mean: np.ndarray, var: np.ndarray, eps: float) -> np.ndarray:
    c = x.shape[1]
    feeds = {"x": x, "s": np.ones(c), "b": np.zeros(c), "m": mean, "v": var}
    return onnx.reference.ReferenceEvaluator(bn_model(c, eps)).run(None, feeds)[0]


def test_reestimated_statistics_normalize_under_onnx_bn():
    rng = np.random.default_rng(18)
    x = rng.normal(size=(8, 3, 4, 4)) * [[[[0.5]], [[4]], [[2]]]] - 1
    y = run_bn(x, *reestimate_batchnorm(x), eps=1e-12)
    np.testing.assert_allclose(y.mean(axis=(0, 2, 3)), 0, atol=1e-12)
    np.testing.assert_allclose(y.var(axis=(0, 2, 3)), 1, rtol=1e-9)


def test_match_batchnorm_restores_output_moments():
    rng = np.random.default_rng(19)
    eps = 1e-3
    x_o = rng.normal(size=(8, 3, 5, 5)) * [[[[1]], [[2]], [[3]]]] + 1
    x_p = 0.7 * x_o + rng.normal(size=x_o.shape) * 0.2 - 0.4  # what pruning did to the input
    mean, var = rng.normal(size=3), rng.uniform(0.5, 2, size=3)  # trained statistics
    ref, new = reestimate_batchnorm(x_o), reestimate_batchnorm(x_p)
    m2, v2 = match_batchnorm(mean, var, eps, ref, new)
    y_o, y_p = run_bn(x_o, mean, var, eps), run_bn(x_p, m2, v2, eps)
    np.testing.assert_allclose(y_p.mean(axis=(0, 2, 3)), y_o.mean(axis=(0, 2, 3)), atol=1e-9)
    np.testing.assert_allclose(y_p.var(axis=(0, 2, 3)), y_o.var(axis=(0, 2, 3)), rtol=1e-9)
    # Unchanged inputs leave the trained statistics alone.
    same = match_batchnorm(mean, var, eps, ref, ref)
    np.testing.assert_allclose(same[0], mean, atol=1e-12)
    np.testing.assert_allclose(same[1], var, atol=1e-12)


# -- depthwise refit ---------------------------------------------------------------------------
def test_depthwise_refit_undoes_a_per_channel_drift_of_its_input():
    """Each kept channel's input drifted by its own gain (what a refit layer upstream can
    leave): the channel-by-channel refit restores the unpruned outputs of the kept channels,
    with a padded, strided 3x3 depthwise Conv, and the result runs as a depthwise Conv."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((24, 5, 7, 7))
    w, b = rng.standard_normal((5, 1, 3, 3)), rng.standard_normal(5)
    attrs = {"strides": [2, 2], "pads": [1, 1, 1, 1]}
    keep = np.array([0, 2, 3])
    x_pruned = x[:, keep] * np.array([0.5, 2.0, -1.5])[None, :, None, None]
    new_w, new_b, rep = recovery.depthwise_refit(w, b, x, keep, spec_of(attrs), x_pruned)
    assert new_w.shape == (3, 1, 3, 3) and new_b.shape == (3,)
    want = conv_ref(x, w, b, group=5, **attrs)[:, keep]
    assert rel(conv_ref(x_pruned, w[keep], b[keep], group=3, **attrs), want) > 0.5  # drifted
    assert rel(conv_ref(x_pruned, new_w, new_b, group=3, **attrs), want) < 1e-3
    assert rep["method"] == "refit" and rep["rel_err_refit"] < 1e-3 < 0.5 < rep["rel_err_drop"]


def test_depthwise_refit_rejects_other_shapes():
    x = np.zeros((2, 4, 5, 5))
    with pytest.raises(ValueError, match=r"depthwise weight is \[C, 1, \*kernel\], got \(4, 2, 3"):
        recovery.depthwise_refit(np.zeros((4, 2, 3, 3)), None, x, [0, 1], LayerSpec("conv"),
                                 x[:, :2])
    with pytest.raises(ValueError, match="x_inputs has 3 channels, keep 2"):
        recovery.depthwise_refit(np.zeros((4, 1, 3, 3)), None, x, [0, 1], LayerSpec("conv"),
                                 x[:, :3])


@pytest.mark.parametrize("clamp", [False, True])
def test_refit_with_fewer_rows_than_inputs_solves_through_the_rows(monkeypatch, clamp):
    """A wide Gemm refit on few samples (AlexNet's 4096-wide layers on 8-64 samples) solves
    and scores through its rows (Woodbury, n x n) instead of the d x d normal equations: the
    same weights, bias, errors and saturation rounds as the dense path."""
    rng = np.random.default_rng(21)
    # 8 latent factors: the removed inputs are predictable from the kept ones
    x = rng.normal(size=(24, 8)) @ rng.normal(size=(8, 60)) + 0.01 * rng.normal(size=(24, 60))
    w, b = rng.normal(size=(60, 9)), rng.normal(size=9)
    keep = np.sort(rng.choice(60, 45, replace=False))
    relu = Clamp(np.ones(9), np.zeros(9), 0.0, np.inf) if clamp else None

    def refit():
        return least_squares_refit(w, b, x, keep, LayerSpec("gemm"), clamp=relu)

    rows = refit()
    calls = []
    real = recovery._Design.moments

    def dense_moments(self, rows, *args, **kwargs):
        m = real(self, rows, *args, **kwargs)
        calls.append(m.xc is not None)
        m.xc = m.yc = None  # force the d x d path
        return m

    monkeypatch.setattr(recovery._Design, "moments", dense_moments)
    dense = refit()
    assert any(calls)  # the row form was there to be dropped
    assert rows[2]["method"] == dense[2]["method"] == "refit"
    assert rows[2]["ridge"] == dense[2]["ridge"]
    assert rows[2].get("saturation_rounds") == dense[2].get("saturation_rounds")
    np.testing.assert_allclose(rows[0], dense[0], rtol=1e-7, atol=1e-9)
    np.testing.assert_allclose(rows[1], dense[1], rtol=1e-7, atol=1e-9)
    for key in ("rel_err_drop", "rel_err_bias", "rel_err_refit"):
        assert rows[2][key] == pytest.approx(dense[2][key], rel=1e-7)
