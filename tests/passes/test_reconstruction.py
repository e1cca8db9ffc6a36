"""The ``recon`` importance criterion and the saturation-aware refit of ``recover=lsq``."""

from __future__ import annotations

import os

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgeopt import ir
from edgeopt.passes import Context, PassManager
from edgeopt.passes.analyses import reconstruction
from edgeopt.passes.analyses.importance import ChannelImportance, ImportanceError
from edgeopt.passes.calib import CalibrationData, load_calibration
from edgeopt.passes.recovery import Clamp, LayerSpec, least_squares_refit, saturation_offset

DIGITS = os.path.join(os.path.dirname(__file__), "..", "..", "examples", "digits")


def mlp_with_duplicate(conv: bool = False) -> onnx.ModelProto:
    """x -> Gemm(8->6) -> Relu -> Gemm(6->4): hidden channel 5 copies channel 2, and
    channel 0 has the smallest filter (l1 drops it first) but a large outgoing weight.

    With ``conv`` the same network is written as 1x1 Convs on a 1x1 image.
    """
    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((8, 6)).astype(np.float32)
    w1[:, 5] = w1[:, 2]
    w1[:, 0] *= 0.05
    b1 = np.full(6, 0.1, np.float32)
    w2 = rng.standard_normal((6, 4)).astype(np.float32)
    w2[0] *= 40.0
    if conv:
        inits = [numpy_helper.from_array(w1.T.reshape(6, 8, 1, 1), "w1"),
                 numpy_helper.from_array(b1, "b1"),
                 numpy_helper.from_array(w2.T.reshape(4, 6, 1, 1), "w2")]
        nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["h"], name="fc1"),
                 helper.make_node("Relu", ["h"], ["r"], name="relu"),
                 helper.make_node("Conv", ["r", "w2"], ["y"], name="fc2")]
        shape_x, shape_y = ["N", 8, 1, 1], ["N", 4, 1, 1]
    else:
        inits = [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(b1, "b1"),
                 numpy_helper.from_array(w2, "w2")]
        nodes = [helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], name="fc1"),
                 helper.make_node("Relu", ["h"], ["r"], name="relu"),
                 helper.make_node("Gemm", ["r", "w2"], ["y"], name="fc2")]
        shape_x, shape_y = ["N", 8], ["N", 4]
    graph = helper.make_graph(
        nodes, "dup", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape_x)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape_y)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def calib(model: ir.Model, n: int = 512, conv: bool = False) -> CalibrationData:
    x = np.random.default_rng(1).standard_normal((n, 8)).astype(np.float32)
    return CalibrationData({"x": x.reshape(n, 8, 1, 1) if conv else x})


def hidden_scores(model: ir.Model, ctx: Context, criterion: str) -> np.ndarray:
    ctx.bind(model)
    imp = ChannelImportance(model, ctx, criterion=criterion, normalize="none")
    (group,) = [g for g in imp.groups.prunable() if "fc1" in g.producers]
    return imp.raw[group.id]


@pytest.mark.parametrize("conv", [False, True])
def test_recon_ranks_a_duplicate_channel_lowest_where_l1_picks_a_needed_one(conv):
    model = ir.from_proto(mlp_with_duplicate(conv))
    ctx = Context(calib=calib(model, conv=conv))
    assert np.argmin(hidden_scores(model, ctx, "l1")) == 0
    scores = hidden_scores(model, ctx, "recon")
    # Removing one copy of a duplicated channel costs nothing after a refit.
    assert np.argmin(scores) in (2, 5)
    assert scores.min() < 1e-3 < np.sort(scores)[1]  # only the ridge keeps it above 0
    # The small filter with a large outgoing weight is the last to go.
    assert np.argmax(scores) == 0
    assert np.all(np.diff(np.sort(scores)) >= 0)


def test_recon_scores_do_not_overflow_on_huge_activations():
    """Activations near 1e18 (the onnx light models' constant weights grow them layer by
    layer) overflowed the float32 Gram product into inf and NaN scores. Without a bias the
    network is positively homogeneous and the criterion a relative error: scaling every
    input by 2**60 must leave the scores as they are (sorted: the duplicate pair's order is
    a tie)."""
    def model_without_bias() -> ir.Model:
        proto = mlp_with_duplicate()
        b1 = next(t for t in proto.graph.initializer if t.name == "b1")
        b1.CopyFrom(numpy_helper.from_array(np.zeros(6, np.float32), "b1"))
        return ir.from_proto(proto)

    base = calib(model_without_bias())
    want = hidden_scores(model_without_bias(), Context(calib=base), "recon")
    huge = CalibrationData({"x": base.arrays["x"] * np.float32(2.0 ** 60)})
    with np.errstate(over="raise", invalid="raise"):
        got = hidden_scores(model_without_bias(), Context(calib=huge), "recon")
    np.testing.assert_allclose(np.sort(got), np.sort(want), rtol=1e-4, atol=1e-7)


def test_recon_prune_keeps_the_output_when_removing_a_duplicate():
    model = ir.from_proto(mlp_with_duplicate())
    ctx = Context(calib=calib(model))
    x = calib(model).arrays["x"][:64]
    import onnxruntime as ort

    def run(m: ir.Model) -> np.ndarray:
        s = ort.InferenceSession(ir.to_proto(m).SerializeToString(),
                                 providers=["CPUExecutionProvider"])
        return s.run(None, {"x": x})[0]

    want = run(model)
    stats = PassManager("prune:0.0,overrides=fc1:0.17,round_to=1,importance=recon",
                        verify="each").run(model, ctx).steps[0].stats
    assert stats["channels_removed"] == 1
    got = run(model)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-3 * float(np.abs(want).max()))


def test_recon_without_calibration_names_the_fix():
    model = ir.from_proto(mlp_with_duplicate())
    ctx = Context()
    ctx.bind(model)
    with pytest.raises(ImportanceError, match=r"importance criterion 'recon' needs "
                                              r"calibration data \(--calib\); use l1, l2, "
                                              r"fpgm or bn without it"):
        ChannelImportance(model, ctx, criterion="recon")


def test_recon_channel_level_path_agrees_on_the_duplicate(monkeypatch):
    # Wide consumers are solved per channel (one column per input channel).
    monkeypatch.setattr(reconstruction, "MAX_COLUMNS", 1)
    model = ir.from_proto(mlp_with_duplicate(conv=True))
    # Give the 1x1 Conv consumer several taps so the channel-level path is taken.
    proto = ir.to_proto(model)
    w2 = numpy_helper.to_array(proto.graph.initializer[2])
    proto.graph.initializer[2].CopyFrom(numpy_helper.from_array(
        np.repeat(np.repeat(w2, 3, axis=2), 3, axis=3) / 9, "w2"))
    proto.graph.node[2].attribute.append(helper.make_attribute("pads", [1, 1, 1, 1]))
    model = ir.from_proto(proto)
    ctx = Context(calib=calib(model, conv=True))
    scores = hidden_scores(model, ctx, "recon")
    assert np.argmin(scores) in (2, 5)
    assert np.argmax(scores) == 0


def test_auto_importance_is_recon_with_calibration_and_l1_without():
    for ctx, criterion in ((Context(), "l1"), (None, "recon")):
        model = ir.from_proto(mlp_with_duplicate())
        ctx = ctx or Context(calib=calib(model))
        ref = ir.from_proto(mlp_with_duplicate())
        spec = "prune:0.0,overrides=fc1:0.17,round_to=1,recover=off"
        PassManager(spec, verify="none").run(model, ctx)
        PassManager(f"{spec},importance={criterion}", verify="none").run(
            ref, Context(calib=ctx.calib))
        assert ir.to_proto(model).SerializeToString() == ir.to_proto(ref).SerializeToString()


# -- saturation-aware refit --------------------------------------------------------------------
def test_saturation_offset_moves_targets_only_where_both_outputs_clip_alike():
    y = np.array([[-2.0, -1.0, 0.5, 7.0, 8.0]], np.float32)
    y_hat = np.array([[-1.0, 0.5, 0.4, 6.5, 5.0]], np.float32)
    clamp = Clamp(np.ones(5), np.zeros(5), 0.0, 6.0)
    got = saturation_offset(y, y_hat, clamp, axis=1)
    # -2/-1: both below 0 -> aim at y_hat; -1/0.5: one passes -> keep; 0.5/0.4: inside;
    # 7/6.5: both above 6 -> aim at y_hat; 8/5: one passes -> keep.
    np.testing.assert_array_equal(got, [[1.0, 0.0, 0.0, -0.5, 0.0]])


def test_saturation_offset_applies_the_batchnorm_affine_per_channel():
    y = np.array([[1.0], [1.0]], np.float32).reshape(1, 2, 1)
    y_hat = np.array([[2.0], [2.0]], np.float32).reshape(1, 2, 1)
    # Channel 0: -y clips at 0 for both; channel 1: y passes.
    clamp = Clamp(np.array([-1.0, 1.0]), np.zeros(2), 0.0, np.inf)
    np.testing.assert_array_equal(saturation_offset(y, y_hat, clamp, axis=1).ravel(), [1, 0])


def test_saturation_aware_refit_lowers_the_error_after_the_activation():
    # Correlated inputs: the dropped features are partly predictable from the kept ones.
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4000, 8)) @ rng.standard_normal((8, 12)) \
        + 0.3 * rng.standard_normal((4000, 12))
    w = rng.standard_normal((12, 6))
    keep = np.arange(6)
    spec = LayerSpec("gemm")
    clamp = Clamp(np.ones(6), np.full(6, -1.0), 0.0, np.inf)  # Relu(y - 1)

    def post_err(wk: np.ndarray, bk: np.ndarray) -> float:
        ref = np.maximum(x @ w - 1, 0)
        return float(np.linalg.norm(np.maximum(x[:, keep] @ wk + bk - 1, 0) - ref))

    wk, bk, _ = least_squares_refit(w, None, x, keep, spec)
    plain = post_err(wk, bk)
    for _ in range(2):
        offset = saturation_offset(x @ w, x[:, keep] @ wk + bk, clamp, axis=-1)
        wk, bk, _ = least_squares_refit(w, None, x, keep, spec, y_offset=offset)
    assert post_err(wk, bk) < 0.995 * plain


def test_y_offset_must_match_the_output_rows():
    x = np.ones((10, 4))
    with pytest.raises(ValueError, match=r"y_offset has 3 rows, the layer's output 10"):
        least_squares_refit(np.ones((4, 2)), None, x, [0, 1], LayerSpec("gemm"),
                            y_offset=np.zeros((3, 2)))


def test_recon_prunes_the_digits_mobilenetv2_better_than_l1():
    # The headline reason for the criterion: at prune:0.5 (lsq recovery) the recon
    # selection keeps the pruned network closer to the unpruned one than l1 does.
    import onnxruntime as ort

    with np.load(os.path.join(DIGITS, "digits_16x16.npz")) as data:
        x = data["test_x"][:200].astype(np.float32)
    outs = {}
    for criterion in ("none", "l1", "recon"):
        model = ir.load(os.path.join(DIGITS, "mobilenetv2.onnx"))
        if criterion != "none":
            ctx = Context(calib=load_calibration(os.path.join(DIGITS, "calib.npz"), model))
            PassManager(f"prune:0.5,importance={criterion}", verify="none").run(model, ctx)
        s = ort.InferenceSession(ir.to_proto(model).SerializeToString(),
                                 providers=["CPUExecutionProvider"])
        outs[criterion] = s.run(None, {s.get_inputs()[0].name: x})[0]
    err = {c: np.linalg.norm(outs[c] - outs["none"]) / np.linalg.norm(outs["none"])
           for c in ("l1", "recon")}
    assert err["recon"] < 0.9 * err["l1"], err


def test_refit_with_a_clamp_runs_the_saturation_rounds_itself():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4000, 8)) @ rng.standard_normal((8, 12)) \
        + 0.3 * rng.standard_normal((4000, 12))
    w = rng.standard_normal((12, 6))
    keep, spec = np.arange(6), LayerSpec("gemm")
    clamp = Clamp(np.ones(6), np.full(6, -1.0), 0.0, np.inf)
    ref = np.maximum(x @ w - 1, 0)

    def post_err(wk: np.ndarray, bk: np.ndarray) -> float:
        return float(np.linalg.norm(np.maximum(x[:, keep] @ wk + bk - 1, 0) - ref))

    plain = post_err(*least_squares_refit(w, None, x, keep, spec)[:2])
    wk, bk, report = least_squares_refit(w, None, x, keep, spec, clamp=clamp, rounds=2)
    assert report["saturation_rounds"] == 2
    two = post_err(wk, bk)
    assert two < 0.995 * plain
    # More rounds keep lowering the error until one moves the weights by less than
    # ROUND_TOL: measured 388.1 plain, 383.8 after 2 rounds, 382.2 after 7 (then it stops).
    wk, bk, report = least_squares_refit(w, None, x, keep, spec, clamp=clamp, rounds=64)
    assert report["saturation_rounds"] == 7
    assert post_err(wk, bk) < two - 1.0
    # No clamp, no rounds: the plain refit, bit for bit.
    w0, _, r0 = least_squares_refit(w, None, x, keep, spec, clamp=None, rounds=2)
    np.testing.assert_array_equal(w0, least_squares_refit(w, None, x, keep, spec)[0])
    assert "saturation_rounds" not in r0


# -- the elimination and the fetching of recon ---------------------------------------------
def _consumer_and_moments(x: np.ndarray, w2: np.ndarray, cols: list[np.ndarray]):
    """A recon consumer state built as ``recon`` does, and its regularized Gram ``G`` and
    ``H = X^T Y`` (centered) for a from-scratch reference."""
    xc = x - x.mean(axis=0)
    g = xc.T @ xc
    h = g @ w2
    energy = float(np.sum(w2 * h))
    g = g + reconstruction.RIDGE * np.trace(g) / len(g) * np.eye(len(g))
    p = np.linalg.inv(g)
    return reconstruction._Consumer(cols, p, p @ h, energy), (g, h, energy)


def _refit_loss(g: np.ndarray, h: np.ndarray, present: np.ndarray) -> float:
    """Ridge objective of the best refit on the ``present`` columns, up to a constant."""
    gs, hs = g[np.ix_(present, present)], h[present]
    return -float(np.sum(hs * np.linalg.solve(gs, hs))) if len(present) else 0.0


def test_recon_elimination_matches_a_greedy_that_refits_from_scratch(monkeypatch):
    # The closed-form downdates (done in place, compacted as columns go, costs batched by
    # block size) remove the same channels, at the same error increases, as re-solving the
    # ridge regression from scratch at every step.
    monkeypatch.setattr(reconstruction, "STEPS", 1000)  # one channel per step
    rng = np.random.default_rng(0)
    size, n = 10, 400

    def correlated(d: int) -> np.ndarray:
        return rng.standard_normal((n, 6)) @ rng.standard_normal((6, d)) \
            + 0.5 * rng.standard_normal((n, d)) + 1.0

    # Consumer a: 3 columns per channel (taps) and 4 columns outside the group; channel 9
    # does not reach it. Consumer b: one column per channel.
    cols_a = [np.arange(3 * c, 3 * c + 3) for c in range(9)] + [np.zeros(0, np.int64)]
    cols_b = [np.array([c]) for c in range(size)]
    a, ref_a = _consumer_and_moments(correlated(31), rng.standard_normal((31, 5)), cols_a)
    b, ref_b = _consumer_and_moments(correlated(size), rng.standard_normal((size, 3)), cols_b)
    scores = reconstruction._eliminate([a, b], size)

    alive, done, want = list(range(size)), 0.0, np.zeros(size)
    refs = ((ref_a, cols_a, 31), (ref_b, cols_b, size))
    while alive:
        def cost(c: int) -> float:
            total = 0.0
            for (g, h, energy), cols, d in refs:
                present = np.setdiff1d(np.arange(d), np.concatenate(
                    [cols[k] for k in range(size) if k not in alive] + [np.zeros(0, int)]))
                without = np.setdiff1d(present, cols[c])
                total += (_refit_loss(g, h, without) - _refit_loss(g, h, present)) / energy
            return total

        costs = [cost(c) for c in alive]
        c = alive[int(np.argmin(costs))]
        done += min(costs)
        want[c] = done
        alive.remove(c)
    np.testing.assert_array_equal(np.argsort(scores), np.argsort(want))
    np.testing.assert_allclose(scores, want, rtol=1e-7, atol=1e-12)


def _resnet_with_calibration() -> tuple[ir.Model, Context]:
    from models import resnet

    model = ir.from_proto(resnet())
    x = np.random.default_rng(2).standard_normal((24, 3, 8, 8)).astype(np.float32)
    ctx = Context(calib=CalibrationData({"x": x}, fixed_batch=1))
    ctx.bind(model)
    return model, ctx


def test_recon_fetches_one_consumer_input_at_a_time(monkeypatch, caplog):
    # Each group's consumer inputs are fetched when the group is scored, one at a time: with
    # a byte budget that holds just the largest of them (for every sample), recon still
    # scores with all of the calibration samples, exactly as with a large budget.
    from edgeopt.passes.analyses.activation_cache import ActivationCache

    def scores() -> dict[int, np.ndarray]:
        model, ctx = _resnet_with_calibration()
        return ChannelImportance(model, ctx, criterion="recon", normalize="none").raw

    requests: list[list[str]] = []
    get = ActivationCache.get

    def spy(self: ActivationCache, names: list[str]) -> dict[str, np.ndarray]:
        requests.append(list(names))
        return get(self, names)

    monkeypatch.setattr(ActivationCache, "get", spy)
    want = scores()
    assert requests and all(len(r) == 1 for r in requests)
    model, ctx = _resnet_with_calibration()
    fetched = get(ActivationCache(model, ctx, 24), sorted({r[0] for r in requests}))
    sizes = [a.nbytes for a in fetched.values()]
    assert len(sizes) >= 3 and sum(sizes) > 2 * max(sizes)
    monkeypatch.setattr(reconstruction, "MAX_BYTES", max(sizes))
    with caplog.at_level("WARNING"):
        got = scores()
    assert not [r for r in caplog.records if "runs to stay within" in r.getMessage()]
    assert got.keys() == want.keys()
    for gid in want:
        np.testing.assert_array_equal(got[gid], want[gid])


def test_recon_state_with_fewer_rows_than_columns_equals_the_dense_one():
    """A wide Gemm scored on few samples (AlexNet's 4096-wide layers, 8-64 samples) takes the
    Woodbury path: the same P, P H and energy as the dense d x d inverse."""
    rng = np.random.default_rng(4)
    x = rng.standard_normal((12, 40)) * rng.uniform(0.1, 10, 40)
    x -= x.mean(axis=0)
    w2 = rng.standard_normal((40, 7))
    p, ph, energy = reconstruction._low_rank(x, w2)
    p0, ph0, energy0 = reconstruction._dense(x.T @ x, w2)
    np.testing.assert_allclose(p, p0, rtol=1e-7, atol=1e-9 * np.abs(p0).max())
    np.testing.assert_allclose(ph, ph0, rtol=1e-7, atol=1e-9 * np.abs(ph0).max())
    assert energy == pytest.approx(energy0, rel=1e-12)
