"""Importance criteria, the ChannelImportance analysis and the ``score`` pass.

Criteria are checked on hand-built channel groups against direct numpy computations; the
``score`` pass runs end to end on small models with the real ``ChannelGroups`` analysis.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator
from scipy.spatial.distance import cdist

import edgeopt.passes.score  # noqa: F401  (registers the pass until passes/__init__ does)
from edgeopt import ir
from edgeopt.passes import (
    Context,
    OptionError,
    PassError,
    PassManager,
    PassResult,
    register_pass,
    unregister_pass,
)
from edgeopt.passes._base import CalibrationError
from edgeopt.passes.analyses import Activations
from edgeopt.passes.analyses.channel_groups import ChannelGroup, ChannelGroups, Member
from edgeopt.passes.analyses.importance import (
    CRITERIA,
    ChannelImportance,
    CriterionOptions,
    ImportanceError,
    RankedChannel,
    aggregate,
    channel_matrix,
    evaluate,
    get_criterion,
    list_criteria,
    normalize,
    register_criterion,
    unregister_criterion,
)
from edgeopt.passes.calib import CalibrationData, random_calibration
from edgeopt.passes.score import META_KEY, ScoreOptions, analysis_params

RNG = np.random.default_rng(0)


# -- hand-built groups --------------------------------------------------------------------------
def const(name: str, arr: np.ndarray) -> ir.Value:
    return ir.Value(name, const_value=ir.ArrayTensor(np.asarray(arr, dtype=np.float32)))


def rand(*shape: int) -> np.ndarray:
    return RNG.standard_normal(shape).astype(np.float32)


def col(n: int) -> np.ndarray:
    """Identity positions ``[[0], [1], ...]``."""
    return np.arange(n)[:, None]


class Groups:
    """A stand-in for the ChannelGroups analysis over hand-built groups."""

    def __init__(self, *groups: ChannelGroup) -> None:
        self.groups = list(groups)

    def prunable(self) -> list[ChannelGroup]:
        return [g for g in self.groups if g.frozen is None and g.size > 1]


def group(size: int, *members: Member, gid: int = 0, frozen: str | None = None,
          partial: tuple[Member, ...] = ()) -> ChannelGroup:
    return ChannelGroup(gid, size, list(members), frozen, partial_members=list(partial))


def bn_member(gamma: np.ndarray, positions: np.ndarray) -> Member:
    """A BatchNormalization scale member (bn_scales() needs the reading node)."""
    g = const("gamma", gamma)
    node = ir.Node("BatchNormalization", [ir.Value("x"), g, const("b", gamma), const("m", gamma),
                                          const("v", np.abs(gamma))])
    return Member(g, 0, positions, "param", node, 1)


def score(criterion: str, grp: ChannelGroup, ctx=None, **opts) -> np.ndarray:
    return evaluate(criterion, grp, ctx or Context(), CriterionOptions(**opts))


# -- l1 / l2 --------------------------------------------------------------------------------
def test_l1_l2_of_one_conv_producer_ignore_its_bias():
    w, b = rand(4, 3, 3, 3), rand(4) * 100
    grp = group(4, Member(const("W", w), 0, col(4), "out"), Member(const("B", b), 0, col(4), "out"))
    np.testing.assert_allclose(score("l1", grp), np.abs(w).sum(axis=(1, 2, 3)), rtol=1e-6)
    np.testing.assert_allclose(score("l2", grp), np.sqrt((w.astype(np.float64) ** 2)
                                                        .sum(axis=(1, 2, 3))), rtol=1e-6)


def test_l1_reads_each_channel_at_its_positions_with_blocks():
    # A Gemm weight [in=6, out=3] with transB=0: channels on axis 1, permuted; and a weight
    # whose channels own blocks of k=2 rows (a Flatten into Gemm, 2 spatial positions each).
    w_out = rand(6, 3)
    w_blk = rand(6, 5)
    perm = np.array([[2], [0], [1]])
    blocks = np.array([[0, 1], [2, 3], [4, 5]])
    grp = group(3, Member(const("Wo", w_out), 1, perm, "out"),
                Member(const("Wb", w_blk), 0, blocks, "out"))
    expect_out = np.abs(w_out).sum(axis=0)[perm[:, 0]]
    expect_blk = np.array([np.abs(w_blk[r]).sum() for r in blocks])
    np.testing.assert_allclose(score("l1", grp), (expect_out + expect_blk) / 2, rtol=1e-6)
    l2_blk = np.array([np.sqrt((w_blk[r].astype(np.float64) ** 2).sum()) for r in blocks])
    l2_out = np.sqrt((w_out.astype(np.float64) ** 2).sum(axis=0))[perm[:, 0]]
    np.testing.assert_allclose(score("l2", grp), (l2_out + l2_blk) / 2, rtol=1e-6)


@pytest.mark.parametrize("how,fn", [("sum", np.sum), ("mean", np.mean), ("max", np.max),
                                    ("prod", np.prod)])
def test_residual_producers_aggregate(how, fn):
    w1, w2 = rand(4, 3, 3, 3), rand(4, 4, 1, 1)
    grp = group(4, Member(const("W1", w1), 0, col(4), "out"),
                Member(const("W2", w2), 0, col(4), "out"))
    rows = np.stack([np.abs(w1).sum(axis=(1, 2, 3)), np.abs(w2).sum(axis=(1, 2, 3))])
    np.testing.assert_allclose(score("l1", grp, aggregate=how), fn(rows, axis=0), rtol=1e-6)


def test_consumers_option_adds_consumer_input_slices():
    w, wc = rand(4, 3, 3, 3), rand(5, 4, 3, 3)
    # A grouped consumer (2 groups of 2 input channels): channel c owns wc[:, c] as well.
    grp = group(4, Member(const("W", w), 0, col(4), "out"),
                Member(const("Wc", wc), 1, col(4), "in"))
    producer = np.abs(w).sum(axis=(1, 2, 3))
    consumer = np.abs(wc).sum(axis=(0, 2, 3))
    np.testing.assert_allclose(score("l1", grp), producer, rtol=1e-6)
    np.testing.assert_allclose(score("l1", grp, consumers=True), (producer + consumer) / 2,
                               rtol=1e-6)


def test_partial_producer_counts_for_the_channels_it_holds():
    # Group of 4 channels: W_full holds all 4; W_half (a Concat branch) holds channels 0, 1.
    w_full, w_half = rand(4, 2), rand(2, 2)
    half_pos = np.array([[0], [1], [-1], [-1]])
    grp = group(4, Member(const("F", w_full), 0, col(4), "out"),
                partial=(Member(const("H", w_half), 0, half_pos, "out"),))
    full, half = np.abs(w_full).sum(axis=1), np.abs(w_half).sum(axis=1)
    expect = np.array([(full[0] + half[0]) / 2, (full[1] + half[1]) / 2, full[2], full[3]])
    np.testing.assert_allclose(score("l1", grp), expect, rtol=1e-6)
    np.testing.assert_allclose(score("l1", grp, aggregate="sum"),
                               [full[0] + half[0], full[1] + half[1], full[2], full[3]],
                               rtol=1e-6)


def test_channel_matrix_marks_missing_positions_nan_and_checks_ranges():
    w = np.arange(6, dtype=np.float32).reshape(3, 2)
    m = channel_matrix(Member(const("W", w), 0, np.array([[2, -1], [0, 1]]), "out"), 2)
    np.testing.assert_array_equal(m, [[4, 5, np.nan, np.nan], [0, 1, 2, 3]])
    with pytest.raises(ImportanceError, match=r"positions exceed the 3 indices of axis 0"):
        channel_matrix(Member(const("W", w), 0, np.array([[3]]), "out"))
    with pytest.raises(ImportanceError, match=r"axis 2 is out of range for shape \(3, 2\)"):
        channel_matrix(Member(const("W", w), 2, col(3), "out"))
    with pytest.raises(ImportanceError, match=r"do not cover the group's 4 channels"):
        channel_matrix(Member(const("W", w), 0, col(3), "out"), 4)
    with pytest.raises(ImportanceError, match=r"member 'x' is not a constant"):
        channel_matrix(Member(ir.Value("x"), 0, col(3), "act"))


def test_group_without_producer_filter_raises():
    grp = group(4, Member(const("B", rand(4)), 0, col(4), "out"))
    with pytest.raises(ImportanceError, match=r"group 0 has no constant producer filter"):
        score("l1", grp)


# -- fpgm ------------------------------------------------------------------------------------
def test_fpgm_is_the_sum_of_distances_to_the_other_filters():
    w1, w2 = rand(6, 3, 3, 3), rand(8, 6)
    grp = group(6, Member(const("W1", w1), 0, col(6), "out"),
                Member(const("W2", w2), 1, col(6)[::-1], "out"))
    f1 = w1.reshape(6, -1).astype(np.float64)
    f2 = w2.T[::-1].astype(np.float64)
    expect = (cdist(f1, f1).sum(axis=1) + cdist(f2, f2).sum(axis=1)) / 2
    np.testing.assert_allclose(score("fpgm", grp), expect, rtol=1e-6)


def test_fpgm_scores_the_filter_at_the_median_lowest():
    # Four filters on a line; the two inner ones are nearest to the geometric median.
    w = np.array([[0.0, 0], [1, 0], [2, 0], [10, 0]], dtype=np.float32)
    scores = score("fpgm", group(4, Member(const("W", w), 0, col(4), "out")))
    np.testing.assert_allclose(scores, [13, 11, 11, 27], rtol=1e-6)


# -- bn ----------------------------------------------------------------------------------------
def test_bn_is_abs_gamma_and_falls_back_to_l1_without_batchnorm():
    w, gamma = rand(4, 3, 1, 1), rand(4)
    perm = np.array([[1], [0], [3], [2]])
    with_bn = group(4, Member(const("W", w), 0, col(4), "out"), bn_member(gamma, perm))
    np.testing.assert_allclose(score("bn", with_bn), np.abs(gamma)[perm[:, 0]], rtol=1e-6)
    without = group(4, Member(const("W", w), 0, col(4), "out"))
    np.testing.assert_allclose(score("bn", without), score("l1", without))


def test_bn_includes_partial_scales_after_a_concat():
    gamma_own, gamma_cat = rand(4), rand(6)
    cat_pos = np.array([[2], [3], [4], [5]])  # this branch sits at 2..5 of the Concat
    grp = group(4, Member(const("W", rand(4, 2)), 0, col(4), "out"), bn_member(gamma_own, col(4)),
                partial=(bn_member(gamma_cat, np.array([[2], [3], [-1], [-1]])),))
    expect = np.abs(gamma_own)
    expect[:2] = (expect[:2] + np.abs(gamma_cat[2:4])) / 2
    np.testing.assert_allclose(score("bn", grp), expect, rtol=1e-6)
    full = group(4, Member(const("W", rand(4, 2)), 0, col(4), "out"), bn_member(gamma_cat, cat_pos))
    np.testing.assert_allclose(score("bn", full), np.abs(gamma_cat[2:]), rtol=1e-6)


# -- random ------------------------------------------------------------------------------------
def test_random_is_seeded_per_group():
    grp = group(8, Member(const("W", rand(8, 2)), 0, col(8), "out"), gid=3)
    other = group(8, Member(const("W", rand(8, 2)), 0, col(8), "out"), gid=4)
    a, b = score("random", grp, seed=1), score("random", grp, seed=1)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, np.random.default_rng([1, 3]).random(8))
    assert not np.array_equal(a, score("random", grp, seed=2))
    assert not np.array_equal(a, score("random", other, seed=1))
    assert ((a >= 0) & (a < 1)).all()


# -- aggregation, normalization, evaluate ------------------------------------------------------
def test_aggregate_skips_missing_members_and_keeps_unscored_channels_nan():
    rows = [np.array([1.0, 2.0, np.nan]), np.array([3.0, np.nan, np.nan])]
    np.testing.assert_array_equal(aggregate(rows, "mean"), [2.0, 2.0, np.nan])
    np.testing.assert_array_equal(aggregate(rows, "sum"), [4.0, 2.0, np.nan])
    np.testing.assert_array_equal(aggregate(rows, "max"), [3.0, 2.0, np.nan])
    np.testing.assert_array_equal(aggregate(rows, "prod"), [3.0, 2.0, np.nan])
    with pytest.raises(OptionError, match=r"aggregate must be one of sum, mean, max, prod, "
                                          r"not 'median'"):
        aggregate(rows, "median")
    with pytest.raises(ImportanceError, match="no member scores"):
        aggregate([], "mean")
    with pytest.raises(ImportanceError, match="different shapes"):
        aggregate([np.ones(2), np.ones(3)])


def test_normalize():
    s = np.array([1.0, 2.0, 5.0])
    np.testing.assert_allclose(normalize(s, "mean"), s / (8 / 3))
    np.testing.assert_allclose(normalize(s, "max"), s / 5)
    np.testing.assert_allclose(normalize(s, "sum"), s / 8)
    np.testing.assert_array_equal(normalize(s, "none"), s)
    np.testing.assert_array_equal(normalize(np.zeros(3), "mean"), np.zeros(3))
    with pytest.raises(OptionError, match=r"normalize must be one of mean, max, sum, none"):
        normalize(s, "l2")


def test_evaluate_checks_what_a_criterion_returns():
    grp = group(3, Member(const("W", rand(3, 2)), 0, col(3), "out"), gid=7)

    @register_criterion("test.bad-shape")
    def bad_shape(g, ctx, opts):
        return np.ones(g.size + 1)

    @register_criterion("test.nan")
    def nan(g, ctx, opts):
        return np.array([1.0, np.nan, np.inf])

    try:
        with pytest.raises(ImportanceError, match=r"'test.bad-shape' returned shape \(4,\) for "
                                                  r"group 7 of 3 channels"):
            evaluate("test.bad-shape", grp, Context())
        with pytest.raises(ImportanceError, match=r"'test.nan' left 2 of the 3 channels of "
                                                  r"group 7 without a finite score"):
            evaluate("test.nan", grp, Context())
    finally:
        unregister_criterion("test.bad-shape")
        unregister_criterion("test.nan")


# -- registry ------------------------------------------------------------------------------------
def test_builtin_criteria_are_registered():
    assert {"l1", "l2", "fpgm", "bn", "act", "random"} <= set(list_criteria())


def test_custom_criterion_is_used_by_name_and_duplicates_raise():
    @register_criterion("test.channel-index")
    def channel_index(g, ctx, opts):
        """Channel c scores c + 1."""
        return np.arange(1, g.size + 1, dtype=np.float64)

    try:
        assert get_criterion("test.channel-index") is channel_index
        grp = group(4, Member(const("W", rand(4, 2)), 0, col(4), "out"))
        imp = ChannelImportance.from_groups(Groups(grp), Context(), "test.channel-index",
                                            normalize="max")
        np.testing.assert_array_equal(imp.raw[0], [1, 2, 3, 4])
        np.testing.assert_array_equal(imp.scores[0], [0.25, 0.5, 0.75, 1])
        with pytest.raises(ValueError, match=r"criterion 'test.channel-index' is already "
                                             r"registered \(by test_importance\)"):
            register_criterion("test.channel-index")(channel_index)
        with pytest.raises(ValueError, match=r"criterion 'l1' is already registered"):
            register_criterion("l1")(channel_index)
    finally:
        unregister_criterion("test.channel-index")
    assert "test.channel-index" not in CRITERIA


def test_bad_and_unknown_criterion_names():
    with pytest.raises(ValueError, match=r"criterion name 'Bad Name' must be lowercase"):
        register_criterion("Bad Name")
    with pytest.raises(OptionError, match=r"unknown importance criterion 'nope'; available: "
                                          r"act, bn, fpgm, l1, l2, random"):
        get_criterion("nope")


# -- ChannelImportance over hand-built groups ------------------------------------------------
def test_importance_normalizes_ranks_and_skips_unscorable_frozen_groups():
    a = group(2, Member(const("A", np.array([[1, 1], [3, 3]])), 0, col(2), "out"), gid=0)
    b = group(3, Member(const("B", np.array([[1.0], [2], [6]])), 0, col(3), "out"), gid=1)
    frozen = group(2, Member(const("F", np.array([[9.0], [0.5]])), 0, col(2), "out"), gid=2,
                   frozen="graph output 'y'")
    unscorable = group(2, Member(const("C", np.ones(2)), 0, col(2), "out"), gid=3, frozen="x")
    imp = ChannelImportance.from_groups(Groups(a, b, frozen, unscorable), Context(), "l1")
    np.testing.assert_array_equal(imp.raw[0], [2, 6])
    np.testing.assert_array_equal(imp[0], [0.5, 1.5])
    np.testing.assert_array_equal(imp[b], [1 / 3, 2 / 3, 2])
    assert 3 not in imp and 2 in imp
    assert imp.ranking() == [RankedChannel(1, 0, 1 / 3), RankedChannel(0, 0, 0.5),
                             RankedChannel(1, 1, 2 / 3), RankedChannel(0, 1, 1.5),
                             RankedChannel(1, 2, 2.0)]
    assert [(r.group, r.channel) for r in imp.ranking(include_frozen=True)][:2] == \
        [(2, 1), (1, 0)]
    assert repr(imp) == "ChannelImportance('l1', 3 groups, 7 channels)"
    prunable = group(2, Member(const("C", np.ones(2)), 0, col(2), "out"), gid=4)
    with pytest.raises(ImportanceError, match="group 4 has no constant producer filter"):
        ChannelImportance.from_groups(Groups(a, prunable), Context(), "l1")


def test_importance_rejects_bad_options_before_any_work():
    with pytest.raises(OptionError, match="unknown importance criterion 'l3'"):
        ChannelImportance.from_groups(Groups(), Context(), "l3")
    with pytest.raises(OptionError, match="normalize must be one of"):
        ChannelImportance.from_groups(Groups(), Context(), "l1", normalize="z")
    with pytest.raises(OptionError, match="activation must be one of mean_abs, apoz"):
        CriterionOptions(activation="zeros")


# -- act ---------------------------------------------------------------------------------------
def conv_relu_model() -> tuple[ir.Model, onnx.ModelProto]:
    """x[N,2,4,4] -> Conv(4, 1x1) -> Relu -> Conv(3, 1x1) and Flatten -> Gemm(2)."""
    rng = np.random.default_rng(3)
    inits = [numpy_helper.from_array(rng.standard_normal((4, 2, 1, 1)).astype(np.float32), "W1"),
             numpy_helper.from_array(rng.standard_normal((3, 4, 1, 1)).astype(np.float32), "W2"),
             numpy_helper.from_array(rng.standard_normal((64, 2)).astype(np.float32), "G")]
    nodes = [helper.make_node("Conv", ["x", "W1"], ["c"]),
             helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("Conv", ["r", "W2"], ["y"]),
             helper.make_node("Flatten", ["r"], ["f"]),
             helper.make_node("Gemm", ["f", "G"], ["z"])]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None),
         helper.make_tensor_value_info("z", TensorProto.FLOAT, None)], inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    return ir.from_proto(proto), proto


def values(model: ir.Model) -> dict[str, ir.Value]:
    out = {v.name: v for v in model.graph.initializers.values()}
    out.update({o.name: o for n in model.graph for o in n.outputs})
    return out


def calibrated(model: ir.Model, n: int = 12) -> tuple[Context, np.ndarray]:
    x = np.random.default_rng(5).standard_normal((n, 2, 4, 4)).astype(np.float32)
    ctx = Context(calib=CalibrationData.for_model({"x": x}, model))
    ctx.bind(model)
    return ctx, x


def act_group(v: dict[str, ir.Value], consumers: bool = True) -> ChannelGroup:
    w2, g = v["W2"], v["G"]
    members = [Member(v["W1"], 0, col(4), "out"), Member(v["c"], 1, col(4), "act"),
               Member(v["r"], 1, col(4), "act"),
               Member(v["f"], 1, np.arange(64).reshape(4, 16), "act")]
    if consumers:
        members += [Member(w2, 1, col(4), "in", w2.uses()[0].node, 1),
                    Member(g, 0, np.arange(64).reshape(4, 16), "in", g.uses()[0].node, 1)]
    return group(4, *members)


def test_act_reads_the_activations_the_consumers_read():
    model, proto = conv_relu_model()
    ctx, x = calibrated(model)
    r, f = ReferenceEvaluator(proto).run(["r", "f"], {"x": x})
    grp = act_group(values(model))
    mean_abs = np.abs(r).mean(axis=(0, 2, 3))
    # Conv y reads r and Gemm z reads f: both give the channel mean (f in blocks of 16).
    f_blocks = np.abs(f).mean(axis=0).reshape(4, 16).mean(axis=1)
    np.testing.assert_allclose(score("act", grp, ctx), (mean_abs + f_blocks) / 2, rtol=1e-5)
    np.testing.assert_allclose(f_blocks, mean_abs, rtol=1e-5)
    apoz = (r == 0).mean(axis=(0, 2, 3))
    np.testing.assert_allclose(score("act", grp, ctx, activation="apoz"), 1 - apoz, rtol=1e-6)


def test_act_measures_every_group_in_one_sweep():
    model, proto = conv_relu_model()
    ctx, x = calibrated(model)
    v = values(model)
    with_consumers = act_group(v)
    second = group(4, Member(v["c"], 1, col(4)[::-1], "act"), gid=1)
    imp = ChannelImportance.from_groups(Groups(with_consumers, second), ctx, "act",
                                        normalize="none")
    assert ctx.cached() == [Activations]
    (acts,) = [ctx.analysis(Activations, values=("r", "f", "c"))]
    assert acts.values == ("r", "f", "c") and acts.groups == [["r", "f", "c"]]
    c = ReferenceEvaluator(proto).run(["c"], {"x": x})[0]
    np.testing.assert_allclose(imp.scores[1], np.abs(c).mean(axis=(0, 2, 3))[::-1], rtol=1e-5)
    # On its own, the criterion measures only its group's activations.
    ctx2, _ = calibrated(model)
    score("act", second, ctx2)
    assert ctx2.analysis(Activations, values=("c",)).values == ("c",)
    assert ctx2.cached() == [Activations]


def test_a_prepare_hook_runs_once_and_its_state_reaches_the_criterion():
    seen = []

    def prep(groups, ctx, opts):
        seen.append([g.id for g in groups])
        return {g.id: float(g.id) for g in groups}

    @register_criterion("test.prepared", prepare=prep)
    def prepared(g, ctx, opts):
        return np.full(g.size, opts.prepared[g.id] if opts.prepared else -1.0)

    try:
        a = group(2, Member(const("A", rand(2, 2)), 0, col(2), "out"), gid=3)
        b = group(2, Member(const("B", rand(2, 2)), 0, col(2), "out"), gid=5)
        imp = ChannelImportance.from_groups(Groups(a, b), Context(), "test.prepared",
                                            normalize="none")
        assert seen == [[3, 5]]
        np.testing.assert_array_equal(imp.raw[5], [5.0, 5.0])
        np.testing.assert_array_equal(evaluate("test.prepared", a, Context()), [-1.0, -1.0])
    finally:
        unregister_criterion("test.prepared")
    assert get_criterion("l1") is CRITERIA["l1"]


def test_act_without_consumers_uses_every_activation():
    model, proto = conv_relu_model()
    ctx, x = calibrated(model)
    c, r = ReferenceEvaluator(proto).run(["c", "r"], {"x": x})
    grp = act_group(values(model), consumers=False)
    expect = (np.abs(c).mean(axis=(0, 2, 3)) + 2 * np.abs(r).mean(axis=(0, 2, 3))) / 3
    np.testing.assert_allclose(score("act", grp, ctx), expect, rtol=1e-5)


def test_act_on_a_feature_axis_other_than_1_reads_raw_samples():
    # x[N,3,5] @ W[5,4]: features on axis 2, where Activations keeps no per-channel stats.
    w = rand(5, 4)
    text_graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["h"]), helper.make_node("Relu", ["h"], ["y"])],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(w, "W")])
    proto = helper.make_model(text_graph, opset_imports=[helper.make_opsetid("", 17)])
    model = ir.from_proto(proto)
    x = np.random.default_rng(2).standard_normal((6, 3, 5)).astype(np.float32)
    ctx = Context(calib=CalibrationData.for_model({"x": x}, model))
    ctx.bind(model)
    v = values(model)
    grp = group(4, Member(v["W"], 1, col(4), "out"), Member(v["y"], 2, col(4)[::-1], "act"))
    y = ReferenceEvaluator(proto).run(["y"], {"x": x})[0]
    np.testing.assert_allclose(score("act", grp, ctx), np.abs(y).mean(axis=(0, 1))[::-1],
                               rtol=1e-5)
    np.testing.assert_allclose(score("act", grp, ctx, activation="apoz"),
                               1 - (y == 0).mean(axis=(0, 1))[::-1], rtol=1e-6)


def test_act_skips_integer_activations_and_unprunable_groups_it_cannot_score():
    ints = ir.Value("i", dtype=ir.DataType.INT64)
    calib = CalibrationData({"x": np.zeros((2, 3), np.float32)})
    frozen = group(3, Member(ints, 1, col(3), "act"), gid=0, frozen="graph output 'i'")
    single = group(1, Member(ints, 1, col(1), "act"), gid=1)
    imp = ChannelImportance.from_groups(Groups(frozen, single), Context(calib=calib), "act")
    assert imp.scores == {}
    prunable = group(3, Member(ints, 1, col(3), "act"), gid=2)
    with pytest.raises(ImportanceError, match="group 2 has no float activation to measure"):
        ChannelImportance.from_groups(Groups(frozen, prunable), Context(calib=calib), "act")


def test_act_needs_calibration_data():
    model, _ = conv_relu_model()
    ctx = Context()
    ctx.bind(model)
    with pytest.raises(CalibrationError, match=r"criterion 'act' needs calibration data "
                                               r"\(--calib\)"):
        score("act", act_group(values(model)), ctx)


# -- the score pass, end to end ----------------------------------------------------------------
def resnet_block() -> onnx.ModelProto:
    """Conv-BN-Relu, a residual 1x1 Conv + Add, then Conv -> Relu -> Flatten -> Gemm."""
    rng = np.random.default_rng(7)

    def t(name, *shape, positive=False):
        a = rng.standard_normal(shape).astype(np.float32)
        return numpy_helper.from_array(np.abs(a) + 0.5 if positive else a, name)

    inits = [t("W1", 4, 3, 3, 3), t("B1", 4), t("g", 4), t("b", 4), t("m", 4),
             t("v", 4, positive=True), t("W2", 4, 4, 1, 1), t("W3", 6, 4, 3, 3),
             t("G", 6 * 4 * 4, 5)]
    nodes = [helper.make_node("Conv", ["x", "W1", "B1"], ["c1"], pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["c1", "g", "b", "m", "v"], ["bn"]),
             helper.make_node("Relu", ["bn"], ["r1"]),
             helper.make_node("Conv", ["r1", "W2"], ["c2"]),
             helper.make_node("Add", ["c2", "r1"], ["a"]),
             helper.make_node("Conv", ["a", "W3"], ["c3"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c3"], ["r3"]),
             helper.make_node("Flatten", ["r3"], ["f"]),
             helper.make_node("Gemm", ["f", "G"], ["y"])]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def l2_rows(w: np.ndarray) -> np.ndarray:
    return np.sqrt((w.astype(np.float64) ** 2).reshape(len(w), -1).sum(axis=1))


def test_score_pass_writes_meta_and_does_not_modify_the_model():
    proto = resnet_block()
    model = ir.from_proto(proto)
    before, version = ir.to_proto(model).SerializeToString(), model.version
    ctx = Context()
    report = PassManager("score:l2", verify="each").run(model, ctx)
    step = report.steps[0]
    # Groups: {c1, c2} (residual, 4), {c3} (6), {y} (5, frozen: graph output).
    assert (step.modified, step.stats) == (False, {"groups": 3, "channels": 15})
    assert model.version == version
    assert ir.to_proto(model).SerializeToString() == before  # meta is never serialized
    v = values(model)
    w = {k: numpy_helper.to_array(t) for t in proto.graph.initializer for k in [t.name]}
    residual = (l2_rows(w["W1"]) + l2_rows(w["W2"])) / 2
    np.testing.assert_allclose(v["c1"].meta[META_KEY]["l2"], residual / residual.mean(),
                               rtol=1e-6)
    np.testing.assert_array_equal(v["c2"].meta[META_KEY]["l2"], v["c1"].meta[META_KEY]["l2"])
    c3 = l2_rows(w["W3"])
    np.testing.assert_allclose(v["c3"].meta[META_KEY]["l2"], c3 / c3.mean(), rtol=1e-6)
    gemm = np.sqrt((w["G"].astype(np.float64) ** 2).sum(axis=0))
    np.testing.assert_allclose(v["y"].meta[META_KEY]["l2"], gemm / gemm.mean(), rtol=1e-6)
    assert set(v["c1"].meta[META_KEY]) == {"l2"}
    # The analysis stays cached, under the key another pass would use.
    imp = ctx.analysis(ChannelImportance, criterion="l2")
    assert ctx.cached().count(ChannelImportance) == 1
    assert {r.group for r in imp.ranking()} == {0, 1}


def test_score_pass_accumulates_criteria_and_is_repeatable():
    model = ir.from_proto(resnet_block())
    ctx = Context()
    PassManager("score,score:bn,score:fpgm,aggregate=max,normalize=none", verify="each") \
        .run(model, ctx)
    meta = values(model)["c1"].meta[META_KEY]
    assert set(meta) == {"l1", "bn", "fpgm"}
    groups = ctx.analysis(ChannelGroups)
    bn_expected = np.abs(numpy_helper.to_array(resnet_block().graph.initializer[2]))
    np.testing.assert_allclose(meta["bn"], bn_expected / bn_expected.mean(), rtol=1e-6)
    fpgm = ChannelImportance.from_groups(groups, Context(), "fpgm",
                                         CriterionOptions(aggregate="max"), normalize="none")
    np.testing.assert_array_equal(meta["fpgm"], fpgm.scores[0])
    first = meta["l1"].copy()
    report = PassManager("score:l1", verify="each").run(model, Context())
    assert not report.modified
    np.testing.assert_array_equal(values(model)["c1"].meta[META_KEY]["l1"], first)


def test_score_pass_act_with_random_calibration():
    proto = resnet_block()
    model = ir.from_proto(proto)
    calib = random_calibration(model, num_samples=8, seed=1)
    ctx = Context(calib=calib)
    report = PassManager("score:act,activation=apoz", verify="each").run(model, ctx)
    assert report.steps[0].stats == {"groups": 3, "channels": 15}
    # Only the activations that consumers read were measured, in one sweep.
    # Readers: c2 reads r1, c3 reads a, the Gemm reads f; group {y} has no consumer.
    assert ctx.cached().count(Activations) == 1
    ctx.analysis(Activations, values=("r1", "a", "f", "y"))
    assert ctx.cached().count(Activations) == 1
    r3 = ReferenceEvaluator(proto).run(["r3"], {"x": calib.arrays["x"]})[0]
    # Group {c3} is read by the Gemm through Flatten: 1 - APoZ of r3, per channel.
    expect = 1 - (r3 == 0).mean(axis=(0, 2, 3))
    np.testing.assert_allclose(values(model)["c3"].meta[META_KEY]["act"],
                               expect / expect.mean(), rtol=1e-6)


def test_score_pass_without_calibration_fails_for_act():
    model = ir.from_proto(resnet_block())
    with pytest.raises(PassError, match=r"pass 'score' failed \(first pass\): importance "
                                        r"criterion 'act' needs calibration data"):
        PassManager("score:act").run(model, Context())


def test_score_pass_options_are_checked():
    with pytest.raises(OptionError, match=r"pass 'score': unknown importance criterion 'l3'; "
                                          r"available: act, bn"):
        PassManager("score:l3")
    with pytest.raises(OptionError, match=r"pass 'score' option 'aggregate': 'median' is not "
                                          r"one of sum, mean, max, prod"):
        PassManager("score,aggregate=median")
    assert analysis_params(ScoreOptions()) == {"criterion": "l1"}
    assert analysis_params(ScoreOptions("bn", seed=3, consumers=True)) == \
        {"criterion": "bn", "seed": 3, "consumers": True}


def test_score_pass_uses_a_custom_criterion():
    @register_criterion("test.ones")
    def ones(g, ctx, opts):
        return np.ones(g.size)

    try:
        model = ir.from_proto(resnet_block())
        PassManager("score:test.ones").run(model, Context())
        np.testing.assert_array_equal(values(model)["c3"].meta[META_KEY]["test.ones"], np.ones(6))
    finally:
        unregister_criterion("test.ones")


def test_meta_writes_do_not_bump_the_version_but_graph_edits_do():
    model = ir.from_proto(resnet_block())
    v = values(model)["c1"]
    version = model.version
    v.meta["edgeopt.test"] = 1
    assert model.version == version

    @register_pass("test.meta-then-edit")
    def edit(m, ctx):
        values(m)["c1"].meta["edgeopt.test"] = 2
        m.graph.initializers["B1"].name = "B1_renamed"
        return PassResult(modified=False)

    try:
        with pytest.raises(PassError, match="reported modified=False but changed the model"):
            PassManager("test.meta-then-edit").run(model, Context())
    finally:
        unregister_pass("test.meta-then-edit")


SUBGRAPH = """<ir_version: 9, opset_import: ["" : 17]>
g (float[1,2,4,4] x, bool cond, float[4,2,1,1] W, float[3,4,1,1] W2) => (float[1,3,4,4] z) {
  c = Conv(x, W)
  r = Relu(c)
  y = Conv(r, W2)
  z = If(cond) <then_branch = t () => (float[1,3,4,4] o) { o = Identity(y) },
                else_branch = e () => (float[1,3,4,4] o2) { o2 = Neg(y) }>
}"""


def test_score_pass_scores_groups_frozen_by_a_subgraph():
    from conftest import build_model

    model = build_model(SUBGRAPH, {"W": rand(4, 2, 1, 1), "W2": rand(3, 4, 1, 1)})
    ctx = Context()
    report = PassManager("score:l1", verify="each").run(model, ctx)
    assert report.steps[0].stats == {"groups": 2, "channels": 7}
    groups = ctx.analysis(ChannelGroups)
    frozen = [g for g in groups.groups if g.frozen]
    assert len(frozen) == 1
    assert "'y' is read inside a subgraph of If" in frozen[0].frozen
    v = values(model)
    assert v["y"].meta[META_KEY]["l1"].shape == (3,)
    imp = ctx.analysis(ChannelImportance, criterion="l1")
    assert {r.group for r in imp.ranking()} == {g.id for g in groups.prunable()}
