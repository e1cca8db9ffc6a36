"""sparsify: exact zero counts, N:M patterns, exactness in ORT, wanda, refit, options."""

from __future__ import annotations

import logging
import math

import numpy as np
import onnx
import pytest
from conftest import build_model, run_ort
from hypothesis import given, settings
from hypothesis import strategies as st
from models import cnn, mlp, mobilenetv2, resnet

import edgeopt.passes.sparsify  # noqa: F401  (registers the pass)
from edgeopt import ir
from edgeopt.passes import Context, OptionError, PassError, PassManager
from edgeopt.passes.calib import CalibrationData, load_calibration
from edgeopt.passes.sparsify import META_KEY, find_weights, nm_keep

HEADER = '<ir_version: 8, opset_import: ["" : 17]>\n'
DIGITS = "examples/digits"


def run(model: ir.Model, spec: str, calib: CalibrationData | None = None):
    return PassManager(spec, verify="each").run(model, Context(calib=calib)).steps[0]


def weights_of(model: ir.Model) -> dict[str, np.ndarray]:
    """Every prunable weight by its first reader's name (what the pass sees)."""
    return {w.readers[0].name or w.value.name: w.array.copy() for w in find_weights(model)}


def random_calib(model: ir.Model, n: int = 64, seed: int = 1) -> CalibrationData:
    rng = np.random.default_rng(seed)
    x = model.graph.inputs[0]
    shape = [n * x.shape[0], *x.shape[1:]]
    return CalibrationData.for_model({x.name: rng.standard_normal(shape).astype(np.float32)},
                                     model)


def feeds(proto: onnx.ModelProto, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = proto.graph.input[0]
    shape = [d.dim_value or 1 for d in x.type.tensor_type.shape.dim]
    return {x.name: rng.standard_normal(shape).astype(np.float32)}


def rel_err(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


# -- ratio, scope, thresh ---------------------------------------------------------------------
def test_local_ratio_zeroes_exactly_the_smallest_of_every_weight():
    model = ir.from_proto(cnn())
    before = weights_of(model)
    step = run(model, "sparsify:0.6")
    after = weights_of(model)
    wanted = {k: math.floor(0.6 * w.size) for k, w in before.items()}
    assert {k: int((w == 0).sum()) for k, w in after.items()} == wanted
    for k, w in before.items():
        gone = after[k] == 0
        assert np.abs(w[gone]).max() <= np.abs(w[~gone]).min()
        np.testing.assert_array_equal(after[k][~gone], w[~gone])  # the rest untouched
    total = sum(w.size for w in before.values())
    assert step.modified
    assert step.stats == {"layers": len(before), "weights": total, "zeros_before": 0,
                          "zeros_after": sum(wanted.values()),
                          "sparsity": sum(wanted.values()) / total}
    conv = next(n for n in model.graph if n.op_type == "Conv")
    assert conv.meta[META_KEY] == {"sparsity": wanted[conv.name] / before[conv.name].size,
                                   "before": 0.0, "criterion": "magnitude"}


def test_global_ratio_is_exact_overall_and_ranks_across_layers():
    model = ir.from_proto(resnet())
    before = weights_of(model)
    step = run(model, "sparsify:0.7,scope=global")
    after = weights_of(model)
    total = sum(w.size for w in before.values())
    assert step.stats["zeros_after"] == math.floor(0.7 * total)
    every = np.concatenate([np.abs(w).ravel() for w in before.values()])
    gone = np.concatenate([(w == 0).ravel() for w in after.values()])
    assert every[gone].max() <= every[~gone].min()
    per_layer = {k: float((w == 0).mean()) for k, w in after.items()}
    assert len(set(per_layer.values())) > 3  # not the same ratio everywhere


def test_thresh_zeroes_every_weight_below_it():
    model = ir.from_proto(mlp())
    before = weights_of(model)
    step = run(model, "sparsify,thresh=0.1")
    for k, w in weights_of(model).items():
        np.testing.assert_array_equal(w, np.where(np.abs(before[k]) < 0.1, 0, before[k]))
    assert step.stats["zeros_after"] == sum(int((np.abs(w) < 0.1).sum())
                                            for w in before.values())


def test_exclude_and_overrides_by_node_or_weight_name():
    model = ir.from_proto(cnn())
    before = weights_of(model)
    step = run(model, "sparsify:0.5,exclude=conv1|fc13.w,overrides=conv4*:0.25|conv*:0.75")
    zeros = {k: int((w == 0).sum()) for k, w in weights_of(model).items()}
    sizes = {k: w.size for k, w in before.items()}
    assert zeros["conv1"] == zeros["fc13"] == 0  # by node name, by weight name
    assert zeros["conv4"] == math.floor(0.25 * sizes["conv4"])  # the first match wins
    assert zeros["conv8"] == math.floor(0.75 * sizes["conv8"])
    assert zeros["fc11"] == math.floor(0.5 * sizes["fc11"])
    assert step.stats["layers"] == 3
    assert META_KEY not in next(n for n in model.graph if n.name == "conv1").meta


# -- N:M ------------------------------------------------------------------------------------
def assert_n_of_m(w: np.ndarray, axis: int, n: int, m: int) -> None:
    """Every M consecutive entries along ``axis`` hold at most N non-zeros (exactly N when
    none was zero before), a trailing partial group at most min(N, its size)."""
    moved = np.moveaxis(w, axis, -1)
    size = moved.shape[-1]
    for start in range(0, size, m):
        block = moved[..., start:start + m]
        nonzero = (block != 0).sum(axis=-1)
        assert (nonzero == min(n, block.shape[-1])).all(), (start, nonzero)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 7), st.integers(1, 4), st.integers(1, 19), st.integers(1, 5),
       st.integers(0, 2 ** 31))
def test_nm_keep_keeps_the_n_largest_of_every_m(n, extra, size, rows, seed):
    m = n + extra
    scores = np.random.default_rng(seed).standard_normal((rows, size, 2))
    keep = nm_keep(scores, 1, n, m)
    assert_n_of_m(np.where(keep, scores, 0), 1, n, m)
    for start in range(0, size, m):  # the kept ones are the largest of their group
        block, kept = scores[:, start:start + m], keep[:, start:start + m]
        low = np.where(kept, block, np.inf).min(axis=1)
        high = np.where(kept, -np.inf, block).max(axis=1)
        assert (low >= high).all()


NM_MODEL = HEADER + """g (float[2,10,5,5] x, float[2,10] v, float[6,10,3,3] wc, float[6,5,3,3] wg,
   float[11,10] wt, float[11,9] wn, float[9,7] wm) => (float[2,6,5,5] y, float[2,7] z) {
  a = Conv <pads = [1,1,1,1]> (x, wc)
  b = Conv <group = 2, pads = [1,1,1,1]> (x, wg)
  y = Add(a, b)
  h = Gemm <transB = 1> (v, wt)
  k = Gemm (h, wn)
  z = MatMul(k, wm)
}"""


def nm_weights(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    shapes = {"wc": (6, 10, 3, 3), "wg": (6, 5, 3, 3), "wt": (11, 10), "wn": (11, 9),
              "wm": (9, 7)}
    return {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}


@pytest.mark.parametrize("pattern", ["2:4", "1:3", "3:4", "4:8"])
def test_pattern_n_of_m_along_the_input_axis_of_every_layer(pattern):
    n, m = map(int, pattern.split(":"))
    model = build_model(NM_MODEL, nm_weights())
    step = run(model, f"sparsify:0.9,pattern={pattern}")  # ratio is ignored
    got = {w.value.name: w.array for w in find_weights(model)}
    # Conv [O, C/g, k, k] and Gemm transB=1 [N, K]: axis 1; Gemm transB=0, MatMul [K, N]: 0
    for name, axis in {"wc": 1, "wg": 1, "wt": 1, "wn": 0, "wm": 0}.items():
        assert_n_of_m(got[name], axis, n, m)
    assert step.stats["layers"] == 5
    assert not run(model, f"sparsify,pattern={pattern}").modified  # idempotent


def test_pattern_keeps_the_largest_weights_of_each_group():
    model = build_model(NM_MODEL, nm_weights(1))
    before = nm_weights(1)
    run(model, "sparsify,pattern=2:4")
    wm = next(w.array for w in find_weights(model) if w.value.name == "wm")
    for start in range(0, 9, 4):
        block, got = np.abs(before["wm"][start:start + 4]), wm[start:start + 4]
        expect = np.sort(block, axis=0)[-min(2, len(block)):]
        np.testing.assert_array_equal(np.sort(np.abs(got), axis=0)[-len(expect):], expect)


# -- exactness --------------------------------------------------------------------------------
@pytest.mark.parametrize("builder, spec", [(resnet, "sparsify:0.6"),
                                           (mobilenetv2, "sparsify,pattern=2:4"),
                                           (mlp, "sparsify:0.8,scope=global")])
def test_outputs_equal_the_original_with_the_same_weights_zeroed_by_hand(builder, spec):
    model = ir.from_proto(builder())
    run(model, spec)
    zero = {w.value.name: w.array == 0 for w in find_weights(model)}
    by_hand = builder()
    for init in by_hand.graph.initializer:
        if init.name in zero:
            arr = onnx.numpy_helper.to_array(init).copy()
            arr[zero[init.name]] = 0
            init.CopyFrom(onnx.numpy_helper.from_array(arr, init.name))
    proto = ir.to_proto(model)
    for seed in range(3):
        x = feeds(by_hand, seed)
        for got, want in zip(run_ort(proto, x), run_ort(by_hand, x), strict=True):
            np.testing.assert_array_equal(got, want)


# -- idempotence, no-op ----------------------------------------------------------------------
@pytest.mark.parametrize("spec", ["sparsify:0.5", "sparsify:0.5,scope=global",
                                  "sparsify,thresh=0.2", "sparsify:0.5,criterion=wanda",
                                  "sparsify:0.4,overrides=conv4:0.8"])
def test_a_second_run_zeroes_nothing_more(spec):
    model = ir.from_proto(cnn())
    calib = random_calib(model)
    first = run(model, spec, calib)
    assert first.modified and first.stats["zeros_after"] > 0
    second = run(model, spec, calib)
    assert not second.modified
    assert second.stats["zeros_before"] == second.stats["zeros_after"] == \
        first.stats["zeros_after"]


def test_ratio_zero_is_a_no_op():
    model = ir.from_proto(cnn())
    step = run(model, "sparsify:0")
    assert not step.modified and step.stats["layers"] == 0
    assert step.stats["zeros_after"] == step.stats["zeros_before"] == 0


def test_zeros_already_there_count_toward_the_ratio():
    model = ir.from_proto(mlp())
    run(model, "sparsify:0.3")
    step = run(model, "sparsify:0.5")
    assert step.stats["zeros_before"] == sum(math.floor(0.3 * w.array.size)
                                             for w in find_weights(model))
    assert all((w.array == 0).sum() == math.floor(0.5 * w.array.size)
               for w in find_weights(model))


# -- weights the pass reads -------------------------------------------------------------------
SHARED = HEADER + """g (float[2,4] x, float[4,4] w, float[4,4] u)
   => (float[2,4] y, float[2,4] z, float[4,4] s) {
  a = MatMul(x, w)
  y = MatMul(a, w)
  z = MatMul(x, u)
  s = Add(u, u)
}"""


def test_shared_weights_are_sparsified_once_and_other_readers_keep_theirs():
    rng = np.random.default_rng(0)
    w, u = (rng.standard_normal((4, 4)).astype(np.float32) for _ in range(2))
    model = build_model(SHARED, {"w": w, "u": u})
    step = run(model, "sparsify:0.5")
    assert step.stats["layers"] == 2 and step.stats["zeros_after"] == 16
    a, y, z, add = list(model.graph)
    assert a.inputs[1] is y.inputs[1] and a.inputs[1].name == "w"  # one weight, same name
    assert (a.inputs[1].const_value.numpy() == 0).sum() == 8
    assert z.inputs[1].name != "u" and (z.inputs[1].const_value.numpy() == 0).sum() == 8
    np.testing.assert_array_equal(add.inputs[0].const_value.numpy(), u)  # Add reads u as is


def test_quantized_weights_are_skipped_with_a_reason(caplog):
    model = ir.from_proto(mlp())
    PassManager("quant:int8,mode=weights").run(model)
    with caplog.at_level(logging.INFO, logger="edgeopt.passes.sparsify"):
        step = run(model, "sparsify:0.5")
    assert not step.modified and step.stats["weights"] == 0
    assert "read through DequantizeLinear (already quantized)" in caplog.text


IF_MODEL = HEADER + """g (float[2,4] x, float[4,4] w1, float[4,4] w2) => (float[2,4] y) {
  h = Gemm <transB = 1> (x, w1)
  s = ReduceSum <keepdims = 0> (x)
  zero = Constant <value = float {0}> ()
  c = Greater(s, zero)
  y = If(c) <then_branch = t () => (float[2,4] o) { o = MatMul(h, w2) },
             else_branch = e () => (float[2,4] o) {
               k = Constant <value = float[4,4] {1,-2,3,-4,5,-6,7,-8,9,-10,11,-12,13,-14,15,-16}> ()
               o = MatMul(h, k) }>
}"""


def test_weights_inside_if_branches_are_sparsified(caplog):
    rng = np.random.default_rng(0)
    weights = {"w1": rng.standard_normal((4, 4)).astype(np.float32),
               "w2": rng.standard_normal((4, 4)).astype(np.float32)}
    model = build_model(IF_MODEL, weights)
    calib = CalibrationData.for_model({"x": rng.standard_normal((16, 2, 4)).astype(
        np.float32).reshape(32, 4)}, model)
    with caplog.at_level(logging.INFO, logger="edgeopt.passes.sparsify"):
        step = run(model, "sparsify:0.5,criterion=wanda", calib)
    assert step.stats == {"layers": 3, "weights": 48, "zeros_before": 0, "zeros_after": 24,
                          "sparsity": 0.5}
    (else_k,) = [n for g in model.graph.subgraphs() for n in g if n.inputs[1].name == "k"]
    np.testing.assert_array_equal(else_k.inputs[1].const_value.numpy(), np.array(
        [[0, 0, 0, 0], [0, 0, 0, 0], [9, -10, 11, -12], [13, -14, 15, -16]], np.float32))
    assert else_k.meta[META_KEY]["criterion"] == "magnitude"  # no activations in branches
    assert "ranked by magnitude: it is read inside a subgraph" in caplog.text
    gemm = next(n for n in model.graph if n.op_type == "Gemm")
    assert gemm.meta[META_KEY]["criterion"] == "wanda"
    by_hand = build_model(IF_MODEL, weights)
    by_hand.graph.initializers["w1"].const_value = gemm.inputs[1].const_value
    for sub, done in zip(by_hand.graph.subgraphs(), model.graph.subgraphs(), strict=True):
        for a, b in zip(sub, done, strict=True):
            a.inputs[1].const_value = b.inputs[1].const_value
    for sign in (1, -1):  # both branches
        x = {"x": sign * np.abs(rng.standard_normal((2, 4))).astype(np.float32)}
        np.testing.assert_array_equal(run_ort(ir.to_proto(model), x)[0],
                                      run_ort(ir.to_proto(by_hand), x)[0])


# -- wanda ------------------------------------------------------------------------------------
@pytest.mark.parametrize("layer, w_shape", [("Gemm <transB = 1> (x, w)", "32,64"),
                                            ("Gemm (x, w)", "64,32"), ("MatMul(x, w)", "64,32")])
def test_wanda_ranks_each_output_row_by_weight_times_input_norm(layer, w_shape):
    rng = np.random.default_rng(0)
    scale = np.exp(rng.uniform(-3, 3, 64)).astype(np.float32)  # features of very unequal size
    text = HEADER + f"g (float[N,64] x, float[{w_shape}] w) => (float[N,32] y) {{\n" \
        f"  y = {layer}\n}}"
    w = rng.standard_normal((32, 64)).astype(np.float32)  # [out, in]
    x_cal, x_test = (rng.standard_normal((n, 64)).astype(np.float32) * scale
                     for n in (128, 512))  # the pass uses 128 samples by default
    errs = {}
    for crit in ("magnitude", "wanda"):
        model = build_model(text, {"w": w if w_shape == "32,64" else w.T.copy()})
        run(model, f"sparsify:0.75,criterion={crit}",
            CalibrationData.for_model({"x": x_cal}, model))
        ws = model.graph.initializers["w"].const_value.numpy()
        ws = ws if w_shape == "32,64" else ws.T
        errs[crit] = rel_err(x_test @ ws.T, x_test @ w.T)
        if crit == "wanda":  # per output row, the lowest |w| * ||x_j||
            assert ((ws == 0).sum(axis=1) == 48).all()
            score = np.abs(w) * np.linalg.norm(x_cal, axis=0)
            kept = np.where(ws != 0, score, np.inf).min(axis=1)
            assert (kept >= np.where(ws == 0, score, -np.inf).max(axis=1)).all()
    assert errs["wanda"] < 0.5 * errs["magnitude"], errs


def test_wanda_reads_each_group_of_a_grouped_conv_its_own_input_channels():
    text = HEADER + """g (float[N,4,6,6] x, float[4,2,3,3] w) => (float[N,4,6,6] y) {
      y = Conv <group = 2, pads = [1,1,1,1]> (x, w)
    }"""
    rng = np.random.default_rng(0)
    w = (rng.uniform(0.5, 1.0, (4, 2, 3, 3)) * rng.choice([-1, 1], (4, 2, 3, 3)))
    model = build_model(text, {"w": w.astype(np.float32)})
    scale = np.array([1e-3, 1, 1, 1e-3], np.float32).reshape(1, 4, 1, 1)  # channels 0 and 3
    x = rng.standard_normal((32, 4, 6, 6)).astype(np.float32) * scale
    run(model, "sparsify:0.5,criterion=wanda", CalibrationData.for_model({"x": x}, model))
    got = model.graph.initializers["w"].const_value.numpy()
    # group 0 (outputs 0, 1) reads channels 0, 1; group 1 (outputs 2, 3) channels 2, 3
    np.testing.assert_array_equal(got[:2, 0], 0)
    np.testing.assert_array_equal(got[2:, 1], 0)
    assert (got[:2, 1] != 0).all() and (got[2:, 0] != 0).all()


def test_wanda_on_the_digits_cnn_picks_another_mask_per_output_row():
    masks = {}
    for crit in ("magnitude", "wanda"):
        model = ir.load(f"{DIGITS}/cnn.onnx")
        run(model, f"sparsify:0.5,criterion={crit}",
            load_calibration(f"{DIGITS}/calib.npz", model))
        masks[crit] = {w.value.name: w.array == 0 for w in find_weights(model)}
    changed = [k for k in masks["wanda"] if (masks["wanda"][k] != masks["magnitude"][k]).any()]
    assert len(changed) == len(masks["wanda"])
    for mask in masks["wanda"].values():
        rows = mask.reshape(mask.shape[0], -1)
        assert (rows.sum(axis=1) == math.floor(0.5 * rows.shape[1])).all()


# -- refit ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def digits():
    with np.load(f"{DIGITS}/digits_16x16.npz") as d:
        return d["test_x"].astype(np.float32), d["test_y"]


@pytest.mark.parametrize("name, ratio", [("cnn", 0.8), ("mobilenetv2", 0.5), ("mlp", 0.9)])
def test_refit_keeps_the_zeros_and_lowers_the_held_out_error(name, ratio, digits):
    x, y = digits
    want = run_ort(ir.to_proto(ir.load(f"{DIGITS}/{name}.onnx")), {"input": x})[0]
    got, zeros, models = {}, {}, {}
    for refit in (False, True):
        model = models[refit] = ir.load(f"{DIGITS}/{name}.onnx")
        step = run(model, f"sparsify:{ratio},refit={refit}",
                   load_calibration(f"{DIGITS}/calib.npz", model))
        zeros[refit] = {w.value.name: w.array == 0 for w in find_weights(model)}
        got[refit] = run_ort(ir.to_proto(model), {"input": x})[0]
    for k, mask in zeros[False].items():  # exactly the same zero pattern
        np.testing.assert_array_equal(zeros[True][k], mask)
    assert step.stats["layers_refit"] > 0
    assert rel_err(got[True], want) < 0.5 * rel_err(got[False], want)
    assert (got[True].argmax(1) == y).mean() > (got[False].argmax(1) == y).mean()
    layers = [n for n in models[True].graph if META_KEY in n.meta]
    reports = [n.meta[META_KEY] for n in layers]
    assert all(r["rel_err"] <= r["rel_err_drop"] for r in reports)
    assert sum(r["method"] != "drop" for r in reports) == step.stats["layers_refit"]
    if name == "mobilenetv2":  # depthwise layers are refit group by group
        depthwise = [n for n in layers if n.attr("group", 1) > 1]
        assert depthwise and all(n.meta[META_KEY]["method"] == "refit" for n in depthwise)


def test_refit_of_matmul_layers_adds_no_bias_and_no_node():
    model = ir.from_proto(mlp())
    ops = [n.op_type for n in model.graph]
    original = ir.to_proto(model)
    step = run(model, "sparsify:0.7,refit=true", random_calib(model, n=128))
    assert [n.op_type for n in model.graph] == ops
    first, second = [n for n in model.graph if n.op_type == "MatMul"]
    assert len(second.inputs) == 2 and second.meta[META_KEY]["method"] == "refit"
    # Its inputs are independent features: the sparse weights are already the best fit.
    assert first.meta[META_KEY]["method"] == "drop"
    assert step.stats["layers_refit"] == 2
    plain = ir.from_proto(original)
    run(plain, "sparsify:0.7")
    xs = [feeds(original, seed) for seed in range(100, 164)]  # held-out inputs

    def outputs(proto: onnx.ModelProto) -> np.ndarray:
        return np.concatenate([run_ort(proto, x)[0] for x in xs])

    want = outputs(original)
    refit, dropped = (rel_err(outputs(ir.to_proto(m)), want) for m in (model, plain))
    assert refit < 0.9 * dropped, (refit, dropped)


# -- options ----------------------------------------------------------------------------------
@pytest.mark.parametrize("spec, message", [
    ("sparsify,pattern=4:2", "pattern must be N:M with integers 0 < N < M (e.g. 2:4), not "
                             "'4:2'"),
    ("sparsify,pattern=2:0", "pattern must be N:M with integers 0 < N < M (e.g. 2:4), not "
                             "'2:0'"),
    ("sparsify,pattern=2", "pattern must be N:M with integers 0 < N < M (e.g. 2:4), not '2'"),
    ("sparsify:1.0", "ratio must be in [0, 1), got 1.0"),
    ("sparsify,thresh=-1", "thresh must be >= 0, got -1.0"),
    ("sparsify,pattern=2:4,thresh=0.1", "pattern=2:4 keeps N of every M weights; it cannot be "
                                        "combined with thresh"),
    ("sparsify,pattern=2:4,scope=global", "pattern=2:4 keeps N of every M weights; it cannot "
                                          "be combined with scope=global"),
    ("sparsify,pattern=2:4,overrides=a:0.5", "pattern=2:4 keeps N of every M weights; it "
                                             "cannot be combined with overrides"),
    ("sparsify,thresh=0.1,criterion=wanda", "thresh compares |w| with a threshold; it cannot "
                                            "be combined with criterion=wanda"),
    ("sparsify,overrides=conv1", "override 'conv1' must be pattern:ratio with a ratio in "
                                 "[0, 1)"),
])
def test_option_errors(spec, message):
    with pytest.raises(OptionError) as info:
        PassManager(spec)
    assert str(info.value) == f"pass 'sparsify': {message}"


@pytest.mark.parametrize("spec, message", [
    ("sparsify:0.5,criterion=wanda", "criterion=wanda needs calibration data (--calib)"),
    ("sparsify:0.5,refit=true", "refit=true needs calibration data (--calib)"),
])
def test_calibration_is_required_by_wanda_and_refit(spec, message):
    with pytest.raises(PassError) as info:
        PassManager(spec).run(ir.from_proto(cnn()), Context())
    assert str(info.value) == f"pass 'sparsify' failed (first pass): {message}"


def test_weights_computed_from_constants_are_named(caplog):
    # The onnx light models compute their weights (ConstantOfShape): sparsify cannot see
    # them and says so, with the fix (simplify folds them into constants).
    import os

    from conftest import ONNX_TEST_DATA

    model = ir.load(os.path.join(ONNX_TEST_DATA, "light", "light_squeezenet.onnx"))
    with caplog.at_level(logging.WARNING, logger="edgeopt.passes.sparsify"):
        assert not PassManager("sparsify:0.5", verify="none").run(model).steps[0].modified
    assert caplog.messages == [
        "sparsify: 26 Conv/Gemm/MatMul layer(s) compute their weights instead of holding "
        "them (e.g. 'n0', from ConstantOfShape); they keep their weights; fold them into "
        "constants first: -p simplify,sparsify:..."]
