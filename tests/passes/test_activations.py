"""The Activations analysis: statistics checked against direct numpy computations."""

from __future__ import annotations

import logging
import math
import re

import numpy as np
import onnx
import pytest
from conftest import parse_model, run_ort
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from edgeopt import ir
from edgeopt.ir import EdgeoptError
from edgeopt.passes import Context, PassManager, PassResult, register_pass, unregister_pass
from edgeopt.passes.analyses import Activations, ValueStats
from edgeopt.passes.analyses.activation_cache import ActivationCache
from edgeopt.passes.analyses.calibrators import calibrate
from edgeopt.passes.analyses.value_stats import Window, _GrowingHistogram, _stride, tap_sums
from edgeopt.passes.calib import CalibrationData, CalibrationError, load_calibration

SAMPLES = 10
#: Bytes per sample of the Conv, Relu and Flatten outputs (4 x 8 x 8 float32).
BIG = 4 * 8 * 8 * 4


def conv_relu_gemm() -> onnx.ModelProto:
    """x[N,3,8,8] -> Conv(4, 3x3, pad 1) -> Relu -> Flatten -> Gemm(5); no value_info."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "W"),
             numpy_helper.from_array(rng.standard_normal(4).astype(np.float32), "B"),
             numpy_helper.from_array(rng.standard_normal((256, 5)).astype(np.float32) / 8, "G")]
    nodes = [helper.make_node("Conv", ["x", "W", "B"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("Flatten", ["r"], ["f"]),
             helper.make_node("Gemm", ["f", "G"], ["y"])]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def calib_x(n: int = SAMPLES) -> np.ndarray:
    return np.random.default_rng(1).standard_normal((n, 3, 8, 8)).astype(np.float32)


def reference(proto: onnx.ModelProto, x: np.ndarray, names) -> dict[str, np.ndarray]:
    """Intermediate values from onnx's reference evaluator."""
    return dict(zip(names, ReferenceEvaluator(proto).run(list(names), {"x": x}), strict=True))


def ort_values(proto: onnx.ModelProto, x: np.ndarray, names, batch: int,
               level: str = "basic") -> dict:
    """The same values from ONNX Runtime, batch by batch (what Activations itself sees):
    basic optimizations as full statistics run it, ``all`` as light statistics do."""
    import onnxruntime as ort

    proto = onnx.ModelProto.FromString(proto.SerializeToString())
    proto.graph.output.extend(onnx.ValueInfoProto(name=n) for n in names if n != "y")
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC \
        if level == "basic" else ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    sess = ort.InferenceSession(proto.SerializeToString(), so,
                                providers=["CPUExecutionProvider"])
    runs = [sess.run(list(names), {"x": x[i:i + batch]}) for i in range(0, len(x), batch)]
    return {n: [r[k] for r in runs] for k, n in enumerate(names)}


def analyse(model: ir.Model, calib, **params) -> Activations:
    ctx = Context(calib=calib)
    ctx.bind(model)
    return ctx.analysis(Activations, **params)


@pytest.fixture
def setup():
    proto = conv_relu_gemm()
    model = ir.from_proto(proto)
    calib = CalibrationData.for_model({"x": calib_x()}, model, "test")
    return proto, model, calib


def assert_histogram(counts: np.ndarray, data: np.ndarray, edges: np.ndarray) -> None:
    """``counts`` equals np.histogram over ``edges``, except that a value within rounding
    distance of an inner edge may sit on either side of it (after the range grew downward)."""
    expected, _ = np.histogram(data, bins=edges)
    assert counts.sum() == expected.sum() == data.size
    near = np.abs(data[:, None] - edges[None, 1:-1]) <= 1e-12 * (edges[-1] - edges[0])
    assert np.abs(counts - expected).sum() <= 2 * np.count_nonzero(near)


def expected_stats(arr: np.ndarray) -> dict:
    x = arr.astype(np.float64)
    axes = (0, *range(2, x.ndim))
    return {"min": x.min(), "max": x.max(), "mean": x.mean(), "mean_abs": np.abs(x).mean(),
            "zero_fraction": np.mean(x == 0), "channel_mean": x.mean(axis=axes),
            "channel_mean_abs": np.abs(x).mean(axis=axes),
            "channel_zero_fraction": (x == 0).mean(axis=axes)}


# -- numbers ----------------------------------------------------------------------------------
def test_stats_match_the_reference_evaluator(setup):
    proto, model, calib = setup
    acts = analyse(model, calib, batch_size=4)
    assert acts.values == ("x", "c", "r", "f", "y")
    ref = reference(proto, calib.arrays["x"], ["c", "r", "f", "y"])
    ref["x"] = calib.arrays["x"]
    for name, arr in ref.items():
        s = acts.stats[name]
        exp = expected_stats(arr)
        assert s.name == name and s.count == arr.size and s.nonfinite == 0
        assert s.shape == (4, *arr.shape[1:])  # the first run's shape
        for key in ("min", "max", "mean", "mean_abs"):
            assert getattr(s, key) == pytest.approx(exp[key], rel=1e-5, abs=1e-5), (name, key)
        for key in ("channel_mean", "channel_mean_abs"):
            np.testing.assert_allclose(getattr(s, key), exp[key], rtol=1e-5, atol=1e-5)
        assert abs(s.zero_fraction - exp["zero_fraction"]) <= 1 / arr.size
        np.testing.assert_allclose(s.channel_zero_fraction, exp["channel_zero_fraction"],
                                   atol=1 / (arr.size / arr.shape[1]))
        assert s.hist.dtype == np.int64 and len(s.hist) == 2048
        assert s.hist.sum() == arr.size
        assert s.hist_range[0] <= s.min and s.max <= s.hist_range[1]
    # After the ReLU, about half the elements are exactly zero (APoZ).
    assert 0.3 < acts.stats["r"].zero_fraction < 0.7
    assert acts.stats["c"].zero_fraction == 0
    assert acts.stats["y"].channel_mean.shape == (5,)


def test_stats_are_exact_against_the_same_runtime(setup):
    proto, model, calib = setup
    acts = analyse(model, calib, batch_size=4, bins=64)
    runs = ort_values(proto, calib.arrays["x"], ["c", "r", "y"], batch=4)
    for name, parts in runs.items():
        s = acts.stats[name]
        flat = np.concatenate([p.ravel() for p in parts]).astype(np.float64)
        assert (s.min, s.max) == (flat.min(), flat.max())
        assert s.zero_fraction == np.count_nonzero(flat == 0) / flat.size
        assert_histogram(s.hist, flat, s.hist_edges)


def test_histogram_of_one_batch_spans_min_to_max(setup):
    _, model, calib = setup
    acts = analyse(model, calib, batch_size=SAMPLES, values=("c",))
    s = acts.stats["c"]
    assert s.hist_range[0] == s.min and s.hist_range[1] == pytest.approx(s.max, rel=1e-15)
    flat = ort_values(conv_relu_gemm(), calib.arrays["x"], ["c"], SAMPLES)["c"][0]
    np.testing.assert_array_equal(
        s.hist, np.histogram(flat.astype(np.float64), bins=s.hist_edges)[0])
    np.testing.assert_allclose(s.hist_edges[[0, -1]], [s.min, s.max])
    assert s.hist[0] >= 1 and s.hist[-1] >= 1
    assert s.percentile(0) == s.min and s.percentile(100) == s.max
    ref = reference(conv_relu_gemm(), calib.arrays["x"], ["c"])["c"]
    width = (s.max - s.min) / len(s.hist)
    assert abs(s.percentile(50) - np.median(ref)) <= width


def test_growing_histogram_merges_exactly():
    rng = np.random.default_rng(5)
    batches = [rng.uniform(0, 1, 1000), rng.uniform(-3, 0.5, 1000), rng.uniform(0, 9, 1000),
               np.full(10, 2.0)]
    hist = _GrowingHistogram(16)
    for b in batches:
        hist.add(b)
    data = np.concatenate(batches)
    assert hist.lo <= data.min() and data.max() <= hist.hi
    assert hist.hi - hist.lo < 4 * (data.max() - data.min())
    assert_histogram(hist.counts, data, hist.edges())
    # Growing upward only keeps the edges exact: the counts are np.histogram's.
    up = _GrowingHistogram(16)
    for b in (batches[0], batches[2], batches[3]):
        up.add(b)
    expected, _ = np.histogram(np.concatenate([batches[0], batches[2], batches[3]]),
                               bins=up.edges())
    np.testing.assert_array_equal(up.counts, expected)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_binning_equals_searchsorted_at_and_next_to_the_edges(dtype):
    rng = np.random.default_rng(6)
    for bins in (2, 16, 2048):
        for scale, shift in ((1e-5, 0.0), (1.0, 1e3), (1e5, -7.0)):
            data = (rng.normal(size=500) * scale + shift).astype(dtype)
            hist = _GrowingHistogram(bins)
            hist.add(data)
            edges = hist.edges()
            probe = np.concatenate([data, edges, np.nextafter(edges, np.inf),
                                    np.nextafter(edges, -np.inf)])
            probe = probe[(probe >= hist.lo) & (probe <= hist.hi)]
            want = np.clip(np.searchsorted(edges, probe, side="right") - 1, 0, bins - 1)
            np.testing.assert_array_equal(hist._bin(probe), want)
            np.testing.assert_array_equal(
                hist.counts, np.histogram(data.astype(np.float64), bins=edges)[0])


def test_float32_values_give_the_float64_statistics():
    x = np.maximum(np.random.default_rng(7).normal(size=(4, 3, 5, 5)), 0).astype(np.float32)
    x[1, 2, 3, 4] = np.inf
    data = {dt: CalibrationData({"x": x.astype(dt)}) for dt in (np.float32, np.float64)}
    model = parse_model("""<ir_version: 8, opset_import: ["" : 17]>
        g (float[N,3,5,5] x) => (float[N,3,5,5] y) { y = Identity(x) }""")
    a, b = (analyse(model, data[dt], values=("x",)).stats["x"] for dt in data)
    assert (a.count, a.nonfinite, a.min, a.max, a.zero_fraction) == \
        (b.count, b.nonfinite, b.min, b.max, b.zero_fraction)
    assert a.mean == pytest.approx(b.mean, rel=1e-12)
    np.testing.assert_array_equal(a.hist, b.hist)
    np.testing.assert_allclose(a.channel_mean_abs, b.channel_mean_abs, rtol=1e-12)


def test_constant_first_batch_and_nonfinite_values():
    model = parse_model("""<ir_version: 8, opset_import: ["" : 17]>
        g (float[N,2] x) => (float[N,2] y) { y = Log(x) }""")
    x = np.array([[1, 1], [1, 1], [0, -1], [np.e, 1]], np.float32)  # log: 0, -inf, nan
    acts = analyse(model, CalibrationData.for_model({"x": x}, model), batch_size=2)
    s = acts.stats["y"]
    assert (s.count, s.nonfinite) == (6, 2)
    assert s.min == 0 and s.max == pytest.approx(1, rel=1e-6)
    assert s.hist.sum() == 6 and s.zero_fraction == 5 / 6
    np.testing.assert_allclose(s.channel_mean, [1 / 3, 0.0], atol=1e-7)


# -- values, memory bound, runs ---------------------------------------------------------------
def test_value_selection(setup):
    _, model, calib = setup
    assert analyse(model, calib, values=("r", "x")).values == ("r", "x")
    inputs_only = analyse(model, calib, values=("x",))
    assert inputs_only.runs == 0 and inputs_only.groups == []
    assert inputs_only.stats["x"].max == calib.arrays["x"].max()
    with pytest.raises(EdgeoptError, match=re.escape(
            "Activations: no activation named 'W' in the main graph")):
        analyse(model, calib, values=("W",))
    with pytest.raises(EdgeoptError, match=re.escape(
            "Activations: no activation named 'nope' in the main graph")):
        analyse(model, calib, values=("nope",))
    shaped = parse_model("""<ir_version: 8, opset_import: ["" : 17]>
        g (float[N,2] x) => (int64[2] s, float[N,2] y) { s = Shape(x)  y = Relu(x) }""")
    data = CalibrationData.for_model({"x": np.ones((2, 2), np.float32)}, shaped)
    assert analyse(shaped, data).values == ("x", "y")
    with pytest.raises(EdgeoptError, match=re.escape(
            "Activations: value 's' is int64, not a float tensor")):
        analyse(shaped, data, values=("s",))


@pytest.mark.parametrize("max_bytes, batch, groups", [
    (1 << 30, 4, [["c", "r", "f", "y"]]),
    (8 * BIG, 4, [["c", "r"], ["f", "y"]]),
    (2 * BIG, 2, [["c"], ["r"], ["f"], ["y"]]),
])
def test_memory_bound_splits_values_into_groups(setup, max_bytes, batch, groups):
    _, model, calib = setup
    acts = analyse(model, calib, batch_size=4, max_bytes=max_bytes)
    assert acts.groups == groups
    assert acts.runs == len(groups) * -(-SAMPLES // batch)
    assert acts.peak_bytes <= max_bytes
    assert acts.peak_bytes == max(sum(BIG if n != "y" else 20 for n in g) for g in groups) * batch
    full = analyse(model, calib, batch_size=SAMPLES)
    for name in acts.values:
        assert acts.stats[name].min == full.stats[name].min
        assert acts.stats[name].max == full.stats[name].max
        assert acts.stats[name].mean == pytest.approx(full.stats[name].mean, rel=1e-9, abs=1e-12)


def test_static_batch_model_runs_one_batch_at_a_time():
    model = parse_model("""<ir_version: 8, opset_import: ["" : 17]>
        g (float[1,3] x) => (float[1,3] y) { y = Relu(x) }""")
    x = np.arange(-6, 6, dtype=np.float32).reshape(4, 3)
    acts = analyse(model, CalibrationData.for_model({"x": x}, model), batch_size=8)
    assert acts.runs == 4
    assert acts.stats["y"].max == 5 and acts.stats["y"].zero_fraction == 7 / 12
    np.testing.assert_array_equal(acts.stats["y"].channel_mean, [0.75, 1.25, 1.75])


def test_unbatched_inputs_and_samples_stacking():
    model = parse_model("""<ir_version: 8, opset_import: ["" : 17]>
        g (float[3] v) => (float[3] y) { y = Relu(v) }""")
    v = np.arange(-6, 6, dtype=np.float32).reshape(4, 3)
    acts = analyse(model, CalibrationData.for_model({"v": v}, model))
    assert acts.runs == 4 and acts.stats["y"].channel_mean is None  # rank-1 values
    assert acts.stats["y"].shape == (3,)
    np.testing.assert_array_equal(acts.sample("y", 3), np.maximum(v[:3], 0))


def test_sample_returns_raw_activations(setup):
    proto, model, calib = setup
    acts = analyse(model, calib, batch_size=4)
    ref = reference(proto, calib.arrays["x"][:6], ["c", "y"])
    got = acts.samples(("c", "y", "x"), 6)
    assert got["c"].shape == (6, 4, 8, 8) and got["y"].shape == (6, 5)
    np.testing.assert_allclose(got["c"], ref["c"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got["y"], ref["y"], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(got["x"], calib.arrays["x"][:6])
    np.testing.assert_array_equal(acts.sample("c", 6), got["c"])


def test_sample_honours_max_bytes(setup, caplog):
    _, model, calib = setup
    acts = analyse(model, calib, batch_size=2, max_bytes=4 * BIG + 1)
    with caplog.at_level(logging.WARNING, logger="edgeopt.passes.analyses.activations"):
        got = acts.sample("r", 10)  # runs of 2 samples; 4 samples fit
    assert got.shape == (4, 4, 8, 8)
    assert "returning fewer than 10 samples" in caplog.text
    tiny = analyse(model, calib, values=("y",), max_bytes=BIG // 2)
    with pytest.raises(EdgeoptError, match=re.escape(
            f"Activations: one run of ['r'] needs {BIG} bytes, more than "
            f"max_bytes={BIG // 2}")):
        tiny.sample("r", 1)


def test_stale_analysis_refuses_to_sample(setup):
    _, model, calib = setup
    acts = analyse(model, calib)
    model.graph.outputs.append(model.graph.initializers["B"])
    with pytest.raises(EdgeoptError, match=re.escape(
            "Activations: the model changed since these activations were computed; request "
            "the analysis again")):
        acts.sample("c", 1)


def test_large_models_go_through_a_temporary_file(setup, monkeypatch):
    _, model, calib = setup
    inline = analyse(model, calib, batch_size=4)
    monkeypatch.setattr(Activations, "INLINE_LIMIT", 0)
    external = analyse(model, calib, batch_size=4)
    for name in inline.values:
        a, b = inline.stats[name], external.stats[name]
        assert (a.min, a.max, a.mean, a.count) == (b.min, b.max, b.mean, b.count)
        np.testing.assert_array_equal(a.hist, b.hist)
    np.testing.assert_array_equal(external.sample("y", 2), inline.sample("y", 2))


def test_the_model_is_not_modified(setup):
    _, model, calib = setup
    before, version = ir.to_proto(model).SerializeToString(), model.version
    acts = analyse(model, calib)
    acts.samples(("c", "f"), 3)
    assert model.version == version
    assert ir.to_proto(model).SerializeToString() == before
    # Types came from inference on a clone: the IR still does not know them.
    assert model.graph.nodes[0].outputs[0].dtype is None


def test_progress_is_reported(setup):
    _, model, calib = setup
    seen = []
    ctx = Context(calib=calib, progress=lambda desc, done, total: seen.append((desc, done,
                                                                               total)))
    ctx.bind(model)
    ctx.analysis(Activations, batch_size=5, max_bytes=10 * BIG)
    assert seen == [("activations", i, 4) for i in range(1, 5)]  # 2 groups x 2 batches


def test_subgraph_values_are_not_activations():
    model = parse_model("""<ir_version: 8, opset_import: ["" : 17]>
        g (float[N,2] x, bool c) => (float[N,2] y) {
            y = If(c) <then_branch = t () => (float[N,2] a) { a = Relu(x) },
                       else_branch = e () => (float[N,2] b) { b = Neg(x) }>
        }""")
    # 'c' is a scalar input: its samples are fed one per run, without the sample axis.
    data = CalibrationData.for_model({"x": -np.ones((1, 2), np.float32),
                                      "c": np.array([True])}, model)
    acts = analyse(model, data)
    assert acts.values == ("x", "y")
    assert acts.stats["y"].max == 0 and acts.stats["y"].min == 0
    with pytest.raises(EdgeoptError, match=re.escape(
            "Activations: no activation named 'a' in the main graph")):
        analyse(model, data, values=("a",))


# -- calibration and caching ------------------------------------------------------------------
def test_needs_calibration_data(setup):
    _, model, _ = setup
    with pytest.raises(CalibrationError, match=re.escape(
            "Activations needs calibration data (--calib)")):
        analyse(model, None)


def test_plain_dict_and_random_calibration(setup, caplog):
    proto, model, _ = setup
    x = calib_x(3)
    acts = analyse(model, {"x": x}, values=("y",))
    ref = reference(proto, x, ["y"])["y"]
    assert acts.stats["y"].max == pytest.approx(ref.max(), rel=1e-5)
    with caplog.at_level(logging.WARNING):
        rand = analyse(model, load_calibration("random", model, num_samples=3))
    assert rand.stats["c"].count == 3 * 4 * 8 * 8
    assert "RANDOM" in caplog.text


def test_runtime_failures_name_the_data(setup):
    _, model, _ = setup
    unchecked = CalibrationData({"x": np.zeros((2, 3, 8, 8))}, source="mine.npz")  # float64
    with pytest.raises(EdgeoptError, match=re.escape(
            "Activations: ONNX Runtime failed on the calibration data from mine.npz: "
            "[ONNXRuntimeError] : 2 : INVALID_ARGUMENT : Unexpected input data type.")):
        analyse(model, unchecked)


def test_bad_parameters(setup):
    _, model, calib = setup
    with pytest.raises(ValueError, match="bins must be an even number >= 2, not 7"):
        analyse(model, calib, bins=7)


def test_cached_until_a_pass_modifies_the_model(setup):
    _, model, calib = setup

    @register_pass("test-activations-touch")
    def touch(model: ir.Model, ctx: Context) -> PassResult:
        """Add an unused Identity node (a real, if harmless, change)."""
        first = ctx.analysis(Activations, batch_size=4)
        assert ctx.analysis(Activations, batch_size=4) is first
        node = model.graph.append(ir.Node("Identity", [model.graph.outputs[0]]))
        node.outputs[0].name = "touched"
        return PassResult(modified=True)

    @register_pass("test-activations-look")
    def look(model: ir.Model, ctx: Context) -> PassResult:
        """Read the analysis without changing anything."""
        seen.append(ctx.analysis(Activations, batch_size=4))
        return PassResult(modified=False)

    seen: list[Activations] = []
    try:
        ctx = Context(calib=calib)
        PassManager("test-activations-look,test-activations-look", verify="none").run(model,
                                                                                     ctx)
        assert seen[0] is seen[1] and ctx.cached() == [Activations]
        PassManager("test-activations-touch,test-activations-look", verify="none").run(model,
                                                                                      ctx)
        assert seen[2] is not seen[0]
        assert isinstance(seen[2].stats["y"], ValueStats)
        # Different parameters are a different analysis.
        assert ctx.analysis(Activations, batch_size=4) is seen[2]
        assert ctx.analysis(Activations, batch_size=2) is not seen[2]
    finally:
        unregister_pass("test-activations-touch")
        unregister_pass("test-activations-look")


# -- light statistics (moments=False) ---------------------------------------------------------
def with_opset(proto: onnx.ModelProto, opset: int) -> ir.Model:
    """``conv_relu_gemm`` at another opset (a zero Gemm bias before 11, where it is needed)."""
    proto = onnx.ModelProto.FromString(proto.SerializeToString())
    proto.opset_import[0].version = opset
    if opset < 11:
        proto.graph.node[3].input.append("C")
        proto.graph.initializer.append(numpy_helper.from_array(np.zeros(5, np.float32), "C"))
    return ir.from_proto(proto)


def assert_light(s: ValueStats) -> None:
    """What light statistics leave out."""
    assert s.nonfinite == 0
    assert math.isnan(s.mean) and math.isnan(s.mean_abs) and math.isnan(s.zero_fraction)
    assert s.channel_mean_abs is None and s.channel_zero_fraction is None


@pytest.mark.parametrize("opset", [9, 17])
def test_light_min_max_and_count_are_exact_and_nothing_big_is_fetched(setup, opset):
    proto, _, calib = setup
    model = with_opset(proto, opset)  # opset 9 has no Slice steps: whole values, strided here
    acts = analyse(model, calib, batch_size=5, channels=False, moments=False, hist_limit=50)
    runs = ort_values(proto, calib.arrays["x"], ["c", "r", "f", "y"], batch=5, level="all")
    runs["x"] = [calib.arrays["x"][i:i + 5] for i in range(0, SAMPLES, 5)]
    for name, parts in runs.items():
        s = acts.stats[name]
        flat = np.concatenate([p.ravel() for p in parts]).astype(np.float64)
        assert (s.count, s.min, s.max, s.shape) == (flat.size, flat.min(), flat.max(),
                                                    parts[0].shape)
        assert_light(s)
        assert s.channel_mean is None
        # The histogram counts an even stride through each run, coprime with its size.
        step = _stride(parts[0].size, 50)
        assert step >= parts[0].size / 50 and math.gcd(step, parts[0].size) == 1
        sample = np.concatenate([p.ravel()[::step] for p in parts]).astype(np.float64)
        assert s.hist.sum() <= 50 * len(parts)
        assert_histogram(s.hist, sample, s.hist_edges)
        assert s.hist_zeros == np.count_nonzero(sample == 0)
        assert s.hist_range[0] <= s.min and s.max <= s.hist_range[1]
    assert 0.3 < acts.stats["r"].hist_zeros / acts.stats["r"].hist.sum() < 0.7
    assert acts.runs == 2 and acts.groups == [["c", "r", "f", "y"]]
    if opset == 17:  # min, max, shape and 50 samples per value
        assert acts.peak_bytes <= 4 * (50 * 4 + 8 + 4 * 8)
    else:
        assert acts.peak_bytes >= 3 * 5 * BIG


@pytest.mark.parametrize("opset", [13, 18])  # ReduceMean's axes: attribute, then input
def test_light_channel_means_and_no_histogram(setup, opset):
    proto, _, calib = setup
    acts = analyse(with_opset(proto, opset), calib, batch_size=4, moments=False, hist_limit=0)
    ref = reference(proto, calib.arrays["x"], ["c", "r", "f", "y"])
    for name, arr in ref.items():
        s = acts.stats[name]
        assert_light(s)
        assert (s.count, s.histogram, s.hist_zeros) == (arr.size, None, 0)
        assert s.min == pytest.approx(arr.min(), rel=1e-5, abs=1e-5)
        np.testing.assert_allclose(s.channel_mean, expected_stats(arr)["channel_mean"],
                                   rtol=1e-5, atol=1e-5)
    s = acts.stats["r"]
    message = re.escape("value 'r' was measured without a histogram (hist_limit=0): only its "
                        "min and max are known")
    for read in (lambda: s.hist, lambda: s.hist_edges, lambda: s.percentile(50)):
        with pytest.raises(ValueError, match=message):
            read()
    for method in ("mse", "entropy", "percentile"):
        with pytest.raises(ValueError, match=message):
            calibrate(s, method, qmin=0, qmax=255)
    assert calibrate(s, "minmax", qmin=0, qmax=255) == (0.0, s.max)


def one_hot_tap_means(x: np.ndarray, win: Window) -> np.ndarray:
    """Per channel and tap, ONNX Runtime's mean output of a depthwise Conv with ``win``'s
    geometry whose kernel is 1 at that tap only: the mean of what the tap reads."""
    c, k = x.shape[1], math.prod(win.kernel)
    w = np.zeros((c * k, 1, *win.kernel), np.float32)
    for i in range(c * k):
        w[i, 0].flat[i % k] = 1.0
    attrs = {"kernel_shape": list(win.kernel), "strides": list(win.strides),
             "dilations": list(win.dilations), "group": c}
    attrs.update({"pads": list(win.pads)} if win.auto_pad == "NOTSET" else
                 {"auto_pad": win.auto_pad})
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"], **attrs)], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(w, "w")])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    y = run_ort(proto, {"x": x})[0]
    return y.mean(axis=(0, *range(2, y.ndim)), dtype=np.float64).reshape(c, *win.kernel)


WINDOWS = [Window((3, 3), (1, 1), (1, 1), (1, 1, 1, 1)),
           Window((5, 5), (2, 1), (1, 1), (2, 2, 2, 2)),
           Window((3, 3), (2, 2), (2, 1), (0, 1, 2, 0)),
           Window((1, 1), (2, 2), (1, 1), (0, 0, 0, 0)),
           Window((3, 2), (2, 3), (1, 1), (0, 0, 0, 0), "SAME_UPPER")]


@pytest.mark.parametrize("opset", [12, 13])  # ReduceSum's axes: attribute, then input
def test_light_tap_means_equal_a_one_hot_convolution_over_the_first_samples(setup, opset):
    proto, _, calib = setup
    taps = tuple((name, win) for name in ("x", "r") for win in WINDOWS)
    acts = analyse(with_opset(proto, opset), calib, batch_size=2, moments=False,
                   hist_limit=0, channels=("c",), channel_samples=5, taps=taps)
    assert acts.channel_samples == 4  # whole runs of 2
    head = calib.arrays["x"][:4]
    ref = reference(proto, head, ["c", "r"])
    for name, win in taps:
        x = head if name == "x" else ref["r"]
        np.testing.assert_allclose(acts.tap_means[(name, win)], one_hot_tap_means(x, win),
                                   rtol=1e-5, atol=1e-6)
    # channel means over the same head, and only for the values asked for
    np.testing.assert_allclose(acts.stats["c"].channel_mean,
                               expected_stats(ref["c"])["channel_mean"], rtol=1e-5, atol=1e-6)
    assert acts.stats["r"].channel_mean is None and acts.stats["c"].count == 10 * 4 * 64


def test_window_of_a_conv_and_tap_matrices():
    model = ir.from_proto(conv_relu_gemm())
    conv = next(n for n in model.graph if n.op_type == "Conv")
    win = Window.of_conv(conv, 4)
    assert win == Window((3, 3), (1, 1), (1, 1), (1, 1, 1, 1)) and not win.trivial
    assert Window((1, 1), (1, 1), (1, 1), (0, 0, 0, 0)).trivial
    (rows, cols), positions = win.matrices((2, 3))
    assert positions == 6
    np.testing.assert_array_equal(rows, [[1, 0], [1, 1], [0, 1]])  # tap 0 reads row -1: pad
    np.testing.assert_array_equal(cols, [[1, 1, 0], [1, 1, 1], [0, 1, 1]])
    x = np.random.default_rng(0).standard_normal((3, 2, 2, 3))
    np.testing.assert_allclose(tap_sums(x, [rows, cols]) / (3 * positions),
                               one_hot_tap_means(x.astype(np.float32), win), atol=1e-6)


def test_taps_need_light_statistics(setup):
    _, model, calib = setup
    with pytest.raises(ValueError, match=re.escape("taps need light statistics")):
        Activations(model, Context(calib=calib), taps=(("r", WINDOWS[0]),))
    with pytest.raises(ValueError, match=re.escape("channel_samples must be >= 1")):
        Activations(model, Context(calib=calib), channel_samples=0)


def test_light_statistics_without_histogram_limit_count_every_element(setup):
    _, model, calib = setup
    light = analyse(model, calib, batch_size=4, channels=False, moments=False)
    full = analyse(model, calib, batch_size=4, channels=False)
    for name in light.values:
        a, b = light.stats[name], full.stats[name]
        assert a.hist.sum() == a.count == b.count
        assert a.hist_zeros == round(b.zero_fraction * b.count)
        assert a.min == pytest.approx(b.min, rel=1e-6) and a.max == pytest.approx(b.max, rel=1e-6)


@pytest.mark.parametrize("x, hist_limit, channels", [
    ([[1, 1], [1, 1], [0, -1], [np.e, 1]], 0, False),  # -inf: ReduceMin passes it on
    ([[1, 1], [1, 2], [np.e, 1], [1, -1]], None, False),  # NaN last: only the sample sees it
    ([[1, 1], [1, 2], [np.e, 1], [1, -1]], 0, True),  # ... or the channel means
])
def test_light_values_with_nonfinite_elements_are_measured_in_full(x, hist_limit, channels,
                                                                   caplog):
    model = parse_model("""<ir_version: 8, opset_import: ["" : 17]>
        g (float[N,2] x) => (float[N,2] y) { y = Log(x) }""")
    data = CalibrationData.for_model({"x": np.array(x, np.float32)}, model)
    with caplog.at_level(logging.INFO, logger="edgeopt.passes.analyses.activations"):
        light = analyse(model, data, batch_size=2, moments=False, hist_limit=hist_limit,
                        channels=channels).stats["y"]
    assert "1 value(s) with non-finite elements measured in full: y" in caplog.text
    full = analyse(model, data, batch_size=2, hist_limit=hist_limit, channels=channels)
    s = full.stats["y"]
    assert (light.count, light.nonfinite, light.min, light.max, light.mean) == \
        (s.count, s.nonfinite, s.min, s.max, s.mean)  # measured in full: moments too
    assert s.nonfinite >= 1 and s.count + s.nonfinite == 8 and s.min == 0.0


def test_sample_stride_is_coprime_with_the_size():
    assert _stride(1000, 2000) == 1 and _stride(1000, 1000) == 1
    assert _stride(8 * 4 * 4, 32) == 5  # 4 would pick column 0 of every 4 x 4 map
    columns = np.arange(8 * 4 * 4)[::_stride(8 * 4 * 4, 32)] % 4
    assert set(columns.tolist()) == {0, 1, 2, 3}
    for size in (7, 64, 150528, 802816, 2 ** 20, 3 * 5 * 7 * 11 * 13):
        for limit in (1, 10, 1 << 14):
            step = _stride(size, limit)
            assert -(-size // step) <= limit and math.gcd(step, size) == 1


@pytest.mark.parametrize("lo, span", [(1e6, 1e-3), (-3e5, 1.0), (0.0, 1e-30), (7.0, 1e4)])
def test_binning_is_exact_far_from_zero(lo, span):
    hist = _GrowingHistogram(2048)
    hist.lo, hist.step, hist.started = lo, span / 2048, True
    edges = hist.edges()
    rng = np.random.default_rng(8)
    probe = np.concatenate([edges, np.nextafter(edges, np.inf), np.nextafter(edges, -np.inf),
                            rng.uniform(edges[0], edges[-1], 1000)])
    probe = probe[(probe >= edges[0]) & (probe <= edges[-1])]
    want = np.clip(np.searchsorted(edges, probe, side="right") - 1, 0, 2047)
    np.testing.assert_array_equal(hist._bin(probe), want)


def test_histogram_limit_must_not_be_negative(setup):
    _, model, calib = setup
    with pytest.raises(ValueError, match=re.escape("hist_limit must be >= 0 or None, not -1")):
        analyse(model, calib, hist_limit=-1)


# -- ActivationCache ------------------------------------------------------------------------
def cache(model: ir.Model, calib, samples: int = SAMPLES, **params) -> ActivationCache:
    return ActivationCache(model, Context(calib=calib), samples, **params)


def counters(c: ActivationCache) -> tuple[int, int, int]:
    return c.runs, c.nodes_run, c.hits


def test_cache_returns_the_activations_read_only(setup):
    proto, model, calib = setup
    c = cache(model, calib, 6, batch_size=4)
    got = c.get(["c", "y", "x"])
    ref = reference(proto, calib.arrays["x"][:6], ["c", "y"])
    assert got["c"].shape == (6, 4, 8, 8) and got["y"].shape == (6, 5)
    np.testing.assert_allclose(got["c"], ref["c"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got["y"], ref["y"], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(got["x"], calib.arrays["x"][:6])
    np.testing.assert_array_equal(got["y"], analyse(model, calib).samples(("y",), 6)["y"])
    assert not got["c"].flags.writeable and not got["x"].flags.writeable
    assert counters(c) == (2, 4, 0)  # runs of 4 and 2 samples through the 4 nodes
    assert c.num_samples == 6


def test_cache_runs_only_the_nodes_after_what_it_holds(setup):
    _, model, calib = setup
    x = calib.arrays["x"]
    c = cache(model, calib, batch_size=5)  # 2 runs per request
    c.get(["r"])
    assert counters(c) == (2, 2, 0)  # Conv, Relu
    c.get(["y"])
    assert counters(c) == (4, 4, 0)  # from the cached 'r': Flatten, Gemm
    c.get(["r", "y"])
    assert counters(c) == (4, 4, 2)  # both cached, nothing runs
    # A new Gemm weight: 'r' stays valid, 'y' is recomputed from it.
    g = model.graph.initializers["G"]
    g.const_value = ir.ArrayTensor(2 * g.const_value.numpy())
    got = c.get(["r", "y"])
    assert counters(c) == (6, 6, 3)
    np.testing.assert_allclose(got["y"], reference(ir.to_proto(model), x, ["y"])["y"],
                               rtol=1e-5, atol=1e-5)
    # A new Conv weight invalidates everything below the Conv.
    w = model.graph.initializers["W"]
    w.const_value = ir.ArrayTensor(-w.const_value.numpy())
    got = c.get(["r", "y"])
    assert counters(c) == (8, 10, 3)
    ref = reference(ir.to_proto(model), x, ["r", "y"])
    for name in ("r", "y"):
        np.testing.assert_allclose(got[name], ref[name], rtol=1e-5, atol=1e-5)


def test_cache_sees_nodes_inserted_upstream(setup):
    _, model, calib = setup
    c = cache(model, calib, batch_size=SAMPLES)
    before = c.get(["r", "y"])["y"]
    relu, flatten = (next(n for n in model.graph if n.op_type == op) for op in ("Relu",
                                                                                "Flatten"))
    neg = ir.Node("Neg", [relu.outputs[0]])
    neg.outputs[0].name = "neg"
    model.graph.insert_after(relu, [neg])
    flatten.set_input(0, neg.outputs[0])
    got = c.get(["y"])["y"]
    assert counters(c) == (2, 7, 0)  # 4 nodes, then Neg, Flatten, Gemm from the cached "r"
    np.testing.assert_allclose(got, reference(ir.to_proto(model), calib.arrays["x"],
                                              ["y"])["y"], rtol=1e-5, atol=1e-5)
    assert not np.allclose(got, before)


def test_cache_sees_changes_read_through_a_subgraph():
    model = parse_model("""<ir_version: 8, opset_import: ["" : 17]>
        g (float[N,2] x, bool c) => (float[N,2] y) <float[1] s = {2.0}> {
            h = Mul(x, s)
            y = If(c) <then_branch = t () => (float[N,2] a) { a = Neg(h) },
                       else_branch = e () => (float[N,2] b) { b = Identity(h) }>
        }""")
    x = np.array([[1, 2], [3, 4]], np.float32)
    data = CalibrationData.for_model({"x": x[:, None], "c": np.array([True, False])}, model)
    c = cache(model, data, 2)
    np.testing.assert_array_equal(c.get(["y"])["y"], [[[-2, -4]], [[6, 8]]])
    model.graph.initializers["s"].const_value = ir.ArrayTensor(np.array([3.0], np.float32))
    # The If reads 'h' only inside its branches: the Mul is still upstream of 'y'.
    np.testing.assert_array_equal(c.get(["y"])["y"], [[[-3, -6]], [[9, 12]]])
    assert counters(c) == (4, 4, 0)


def test_cache_honours_max_bytes(setup, caplog):
    _, model, calib = setup
    c = cache(model, calib, batch_size=2, max_bytes=4 * BIG + 1)
    with caplog.at_level(logging.WARNING, logger="edgeopt.passes.analyses.activation_cache"):
        got = c.get(["r"])["r"]  # runs of 2 samples: 2 of them fit
    assert got.shape == (4, 4, 8, 8)
    assert f"ActivationCache: returning 2 of 5 runs to stay within max_bytes={4 * BIG + 1}" \
        in caplog.text
    with pytest.raises(EdgeoptError, match=re.escape(
            f"ActivationCache: one run of ['r'] needs {2 * BIG} bytes, more than "
            f"max_bytes={BIG}")):
        cache(model, calib, batch_size=2, max_bytes=BIG).get(["r"])


def test_cache_keeps_within_cache_bytes(setup):
    _, model, calib = setup
    c = cache(model, calib, batch_size=SAMPLES, cache_bytes=SAMPLES * BIG)  # one value
    c.get(["c"])
    c.get(["r"])  # from the cached 'c'; keeping 'r' drops 'c'
    assert c.cached_bytes == SAMPLES * BIG
    c.get(["c"])  # from the input again
    assert counters(c) == (3, 3, 0)


def test_cache_unbatched_and_static_batch_inputs():
    model = parse_model("""<ir_version: 8, opset_import: ["" : 17]>
        g (float[3] v) => (float[3] y) { y = Relu(v) }""")
    v = np.arange(-6, 6, dtype=np.float32).reshape(4, 3)
    got = cache(model, CalibrationData.for_model({"v": v}, model), 3).get(["y"])["y"]
    np.testing.assert_array_equal(got, np.maximum(v[:3], 0))  # stacked, one run per sample
    model = parse_model("""<ir_version: 8, opset_import: ["" : 17]>
        g (float[1,3] x) => (float[1,3] y) { y = Relu(x) }""")
    c = cache(model, CalibrationData.for_model({"x": v}, model), batch_size=8)
    np.testing.assert_array_equal(c.get(["y"])["y"], np.maximum(v, 0))
    assert c.runs == 4


def test_cache_unknown_values_and_runtime_failures(setup):
    _, model, _ = setup
    unchecked = CalibrationData({"x": np.zeros((2, 3, 8, 8))}, source="mine.npz")  # float64
    c = cache(model, unchecked, 2)
    with pytest.raises(EdgeoptError, match=re.escape(
            "ActivationCache: no activation named 'W' in the main graph")):
        c.get(["W"])
    with pytest.raises(EdgeoptError, match=re.escape(
            "ActivationCache: ONNX Runtime failed on the calibration data from mine.npz: "
            "[ONNXRuntimeError] : 2 : INVALID_ARGUMENT : Unexpected input data type.")):
        c.get(["c"])


def test_cache_copies_only_the_nodes_a_request_runs(setup, monkeypatch):
    from edgeopt.passes.analyses import activation_cache

    _, model, calib = setup
    exported = []

    class Spy(activation_cache.OrtModel):
        def __init__(self, sub, limit):
            exported.append(([n.op_type for n in sub.graph], sorted(sub.graph.initializers),
                             [v.name for v in sub.graph.inputs]))
            super().__init__(sub, limit)

    monkeypatch.setattr(activation_cache, "OrtModel", Spy)
    c = cache(model, calib)
    c.get(["c"])
    got = c.get(["y"])["y"]
    assert exported == [(["Conv"], ["B", "W"], ["x"]),
                        (["Relu", "Flatten", "Gemm"], ["G"], ["c"])]
    ref = reference(conv_relu_gemm(), calib.arrays["x"], ["y"])["y"]
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)


def test_cache_computes_a_cached_value_whose_producer_runs_anyway():
    model = parse_model("""<ir_version: 8, opset_import: ["" : 17]>
        g (float[N,4] x) => (float[N,2] z) { a, b = Split <axis = 1> (x)
                                             s = Relu(a)
                                             z = Add(s, b) }""")
    x = np.random.default_rng(9).standard_normal((6, 4)).astype(np.float32)
    c = cache(model, CalibrationData.for_model({"x": x}, model), 6)
    np.testing.assert_array_equal(c.get(["a"])["a"], x[:, :2])
    got = c.get(["z"])["z"]  # 'a' is cached, but the Split runs for 'b'
    np.testing.assert_array_equal(got, np.maximum(x[:, :2], 0) + x[:, 2:])
