"""Activation-range calibrators, checked against the data they summarize and ONNX Runtime.

Statistics come from the real ``Activations`` accumulator (several batches, so the histogram
grows as it does on a model); quantization errors are measured by quantizing the data with
``params_from_range`` and reading it back.
"""

from __future__ import annotations

import contextlib
import io
import re

import numpy as np
import pytest

from edgeopt.ir import DataType
from edgeopt.ir.quant import dequantize, params_from_range, quantize, type_range
from edgeopt.passes.analyses.calibrators import (
    calibrate,
    list_calibrators,
    register_calibrator,
    unregister_calibrator,
)
from edgeopt.passes.analyses.value_stats import _Accumulator

METHODS = ["entropy", "minmax", "mse", "percentile"]
INT8 = DataType.INT8


def stats_of(x: np.ndarray, batches: int = 4):
    """ValueStats of ``x`` (float32) fed in ``batches`` runs, 2048 bins."""
    acc = _Accumulator("t", 2048)
    for part in np.array_split(np.asarray(x, np.float32), batches):
        acc.update(part)
    return acc.result()


def bin_width(stats) -> float:
    return float(stats.hist_edges[1] - stats.hist_edges[0])


def run(stats, method, dtype=INT8, symmetric=False, **params):
    qmin, qmax = type_range(dtype, symmetric)
    return calibrate(stats, method, qmin=qmin, qmax=qmax, symmetric=symmetric, **params)


def quant_mse(x, lo, hi, dtype=INT8, symmetric=False) -> float:
    """Mean squared error of quantize-dequantize through ``params_from_range(lo, hi)``."""
    x = np.asarray(x, np.float32)
    qp = params_from_range(lo, hi, dtype, symmetric=symmetric)
    return float(np.mean((dequantize(quantize(x, qp), qp).astype(np.float64) - x) ** 2))


def kept(x, lo, hi) -> float:
    """Fraction of the non-zero elements inside ``[lo, hi]``."""
    x = np.asarray(x, np.float32)
    x = x[x != 0]
    return float(np.mean((x >= np.float32(lo)) & (x <= np.float32(hi))))


def ort_range(x, method, symmetric, num_bins=2048):
    """ONNX Runtime's HistogramCollector result (its own histogram of the same data)."""
    from onnxruntime.quantization.calibrate import HistogramCollector

    collector = HistogramCollector(method, symmetric, num_bins, 128, 99.999, "same")
    with contextlib.redirect_stdout(io.StringIO()):  # it prints progress
        collector.collect({"t": np.asarray(x, np.float32)})
        result = collector.compute_collection_result()["t"]
    return float(result[0]), float(result[1])


RNG = np.random.default_rng(0)
GAUSS = RNG.standard_normal(200_000)
LAPLACE = RNG.laplace(size=200_000)
RELU = np.maximum(RNG.standard_normal(200_000), 0)  # half exact zeros
#: ReLU of a negative-mean pre-activation: a 93 % spike at 0 and a thin tail.
DEAD_RELU = np.maximum(RNG.normal(-1.5, 1.0, 200_000), 0)
SILU = (lambda g: g / (1 + np.exp(-g)))(RNG.normal(0, 2, 200_000))
SKEWED = RNG.gamma(2.0, 1.0, 200_000) - 1.0
#: One huge outlier on each side of a million Gaussian elements (1e-6 of the mass each).
OUTLIERS = np.concatenate([RNG.standard_normal(1_000_000), [50.0, -50.0]])


# -- registry ---------------------------------------------------------------------------------
def test_builtins_are_listed():
    assert list_calibrators() == METHODS


def test_unknown_method_lists_the_valid_ones():
    msg = "unknown calibrator 'kl'; available: entropy, minmax, mse, percentile"
    with pytest.raises(ValueError, match=f"^{re.escape(msg)}$"):
        run(stats_of(GAUSS[:100]), "kl")


def test_duplicate_registration_is_an_error():
    msg = ("calibrator 'minmax' is already registered (by "
           "edgeopt.passes.analyses.calibrators)")
    with pytest.raises(ValueError, match=f"^{re.escape(msg)}$"):
        register_calibrator("minmax")(lambda stats, **kw: (0.0, 1.0))
    assert list_calibrators() == METHODS


def test_malformed_name_is_an_error():
    with pytest.raises(ValueError, match=r"^calibrator name 'Bad Name' must be lowercase"):
        register_calibrator("Bad Name")


def test_custom_calibrator_is_called_and_its_range_widened():
    seen = {}

    @register_calibrator("test.half")
    def half(stats, *, qmin, qmax, symmetric, factor=0.5):
        seen.update(qmin=qmin, qmax=qmax, symmetric=symmetric, factor=factor)
        return stats.min * factor, stats.max * factor

    try:
        x = np.linspace(2.0, 8.0, 1000)  # all positive: lo widens to 0
        assert "test.half" in list_calibrators()
        assert run(stats_of(x), "test.half", DataType.UINT8, factor=0.25) == (0.0, 2.0)
        assert seen == {"qmin": 0, "qmax": 255, "symmetric": False, "factor": 0.25}
        assert run(stats_of(x), "test.half", symmetric=True) == (-4.0, 4.0)
    finally:
        unregister_calibrator("test.half")
    assert "test.half" not in list_calibrators()


def test_parameter_errors():
    stats = stats_of(GAUSS[:1000])
    with pytest.raises(ValueError, match=re.escape(
            "calibrator 'minmax' has no parameter 'percentile'; its parameters: none")):
        run(stats, "minmax", percentile=99.0)
    with pytest.raises(ValueError, match=re.escape(
            "calibrator 'percentile' has no parameter 'pct'; its parameters: percentile")):
        run(stats, "percentile", pct=99.0)
    with pytest.raises(ValueError, match=re.escape("percentile must be in (0, 100], not 0")):
        run(stats, "percentile", percentile=0)
    with pytest.raises(ValueError, match=re.escape("num_quantized_bins must be >= 2, not 1")):
        run(stats, "entropy", num_quantized_bins=1)
    with pytest.raises(ValueError, match=re.escape("min_kept must be in [0, 1], not 2")):
        run(stats, "entropy", min_kept=2)
    with pytest.raises(ValueError, match=re.escape("qmin (5) must be below qmax (5)")):
        calibrate(stats, "minmax", qmin=5, qmax=5)


# -- minmax and percentile --------------------------------------------------------------------
@pytest.mark.parametrize("x", [GAUSS, np.linspace(2.0, 8.0, 999), -RELU[RELU > 0]],
                         ids=["both-signs", "positive", "negative"])
def test_minmax_is_the_data_range_widened_to_zero(x):
    x32 = x.astype(np.float32)
    lo, hi = min(float(x32.min()), 0.0), max(float(x32.max()), 0.0)
    assert run(stats_of(x), "minmax") == (lo, hi)
    t = max(-lo, hi)
    assert run(stats_of(x), "minmax", symmetric=True) == (-t, t)


@pytest.mark.parametrize("p", [99.999, 99.0])
@pytest.mark.parametrize("x", [GAUSS, LAPLACE, SKEWED], ids=["gauss", "laplace", "skewed"])
def test_percentile_matches_numpy_within_a_bin(x, p):
    stats = stats_of(x)
    w = bin_width(stats)
    x = x.astype(np.float32)
    cut = (100 - p) / 2  # ORT's convention: the clipped mass is split between the sides
    lo, hi = run(stats, "percentile", percentile=p)
    assert abs(lo - min(np.percentile(x, cut), 0)) <= w
    assert abs(hi - np.percentile(x, 100 - cut)) <= w
    lo, hi = run(stats, "percentile", symmetric=True, percentile=p)
    assert lo == -hi and abs(hi - np.percentile(np.abs(x), p)) <= w


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("x", [GAUSS, LAPLACE, SKEWED, RELU],
                         ids=["gauss", "laplace", "skewed", "relu"])
def test_percentile_matches_onnxruntime(x, symmetric):
    stats = stats_of(x)
    lo, hi = run(stats, "percentile", symmetric=symmetric)
    ort_lo, ort_hi = ort_range(x, "percentile", symmetric)
    assert abs(hi - ort_hi) <= 2 * bin_width(stats)
    if symmetric:  # ORT clamps its symmetric range to [min, max]; ours stays symmetric
        assert lo == -hi and ort_lo == pytest.approx(max(-ort_hi, float(stats.min)))
    else:
        assert abs(lo - ort_lo) <= 2 * bin_width(stats)


# -- every method -----------------------------------------------------------------------------
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("method", ["percentile", "entropy", "mse"])
def test_huge_outliers_are_clipped(method, symmetric):
    stats = stats_of(OUTLIERS)
    lo, hi = run(stats, method, symmetric=symmetric)
    # The outliers sit at +-50, the Gaussian's extremes near +-5. MSE weighs the clipping
    # error of the outliers against rounding (its optimum is about +-14), so no tighter bound.
    assert max(-lo, hi) < 20
    assert kept(OUTLIERS, lo, hi) > 0.999
    minmax = run(stats, "minmax", symmetric=symmetric)
    assert quant_mse(OUTLIERS, lo, hi, symmetric=symmetric) < \
        0.5 * quant_mse(OUTLIERS, *minmax, symmetric=symmetric)


@pytest.mark.parametrize("method", METHODS)
def test_relu_output_starts_at_zero(method):
    lo, hi = run(stats_of(RELU), method, DataType.UINT8)
    assert lo == 0.0 and 2.5 < hi <= RELU.max() + 1e-6
    assert kept(RELU, lo, hi) > 0.999


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("method", METHODS)
def test_constant_and_zero_tensors(method, symmetric):
    for value in (3.0, -2.5):
        lo, hi = run(stats_of(np.full(1000, value)), method, symmetric=symmetric)
        assert np.isfinite([lo, hi]).all() and lo <= 0 <= hi
        assert (hi if value > 0 else -lo) == pytest.approx(abs(value), rel=1e-3)
        assert quant_mse(np.full(10, value), lo, hi, symmetric=symmetric) < 1e-4
    assert run(stats_of(np.zeros(1000)), method, symmetric=symmetric) == (0.0, 0.0)
    empty = _Accumulator("empty", 2048)
    empty.update(np.full(10, np.nan, np.float32))  # only non-finite elements: count 0
    assert run(empty.result(), method, symmetric=symmetric) == (0.0, 0.0)


@pytest.mark.parametrize("method", METHODS)
def test_symmetric_ranges_are_symmetric(method):
    lo, hi = run(stats_of(SKEWED), method, symmetric=True)
    assert lo == -hi and hi > 3


# -- entropy ----------------------------------------------------------------------------------
@pytest.mark.parametrize("symmetric", [False, True])
def test_entropy_keeps_the_mass_where_onnxruntime_collapses(symmetric):
    # ORT's search, 2048 bins: the zero spike makes its narrowest window win.
    ort_lo, ort_hi = ort_range(DEAD_RELU, "entropy", symmetric)
    assert kept(DEAD_RELU, ort_lo, ort_hi) < 0.5
    stats = stats_of(DEAD_RELU)
    lo, hi = run(stats, "entropy", symmetric=symmetric)
    assert kept(DEAD_RELU, lo, hi) > 0.999
    # Leaving the exact zeros out is what fixes it (not the min_kept bound).
    lo, hi = run(stats, "entropy", symmetric=symmetric, min_kept=0.0)
    assert kept(DEAD_RELU, lo, hi) > 0.999


def spiky(seed: int) -> np.ndarray:
    """80 % of the elements at 0.37, the rest standard normal."""
    rng = np.random.default_rng(seed)
    return np.where(rng.random(200_000) < 0.8, 0.37, rng.standard_normal(200_000))


@pytest.mark.parametrize("symmetric", [False, True])
def test_entropy_without_min_kept_follows_a_spike(symmetric):
    # Spreading the spike over its level costs KL, less in narrow windows: the search clips
    # the Gaussian (how much depends on how the spike's bin lines up with the levels).
    x = spiky(1)
    assert kept(x, *run(stats_of(x), "entropy", symmetric=symmetric, min_kept=0.0)) < 0.97


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("seed", range(5))
def test_entropy_min_kept_bounds_the_clipped_mass(seed, symmetric):
    x = spiky(seed)
    assert kept(x, *run(stats_of(x), "entropy", symmetric=symmetric)) >= 0.999


def test_entropy_on_a_gaussian_is_close_to_onnxruntime():
    lo, hi = run(stats_of(GAUSS), "entropy", symmetric=True)
    ort_lo, ort_hi = ort_range(GAUSS, "entropy", True)
    assert hi == pytest.approx(ort_hi, rel=0.1) and lo == pytest.approx(ort_lo, rel=0.1)


# -- mse --------------------------------------------------------------------------------------
def brute_force_mse(x, dtype, symmetric, points=20):
    """The least actual quantization MSE over a two-stage grid of ranges."""
    lo0, hi0 = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
    if symmetric:
        lo0, hi0 = 0.0, max(-lo0, hi0)
    los = np.linspace(lo0, 0, points) if lo0 < 0 else np.zeros(1)
    his = np.linspace(hi0 / points, hi0, points)
    best = (np.inf, 0.0, 0.0)
    for _ in range(2):
        for lo in los:
            for hi in his:
                err = quant_mse(x, -hi if symmetric else lo, hi, dtype, symmetric)
                best = min(best, (err, lo, hi))
        dl, dh = (los[-1] - los[0]) / max(len(los) - 1, 1), his[1] - his[0]
        los = np.linspace(max(best[1] - dl, lo0), min(best[1] + dl, 0), len(los))
        his = np.linspace(max(best[2] - dh, 1e-9), min(best[2] + dh, hi0), points)
    return best[0]


@pytest.mark.parametrize(("dtype", "symmetric"), [(INT8, False), (INT8, True),
                                                  (DataType.UINT8, False), (DataType.UINT8, True)])
@pytest.mark.parametrize("x", [GAUSS, RELU, SILU, SKEWED,
                               np.concatenate([LAPLACE[:50_000], [40.0, -30.0]])],
                         ids=["gauss", "relu", "silu", "skewed", "laplace-outliers"])
def test_mse_beats_minmax_and_matches_a_brute_force_search(x, dtype, symmetric):
    x = x[:50_000]
    stats = stats_of(x)
    ours = quant_mse(x, *run(stats, "mse", dtype, symmetric), dtype, symmetric)
    assert ours <= quant_mse(x, *run(stats, "minmax", dtype, symmetric), dtype, symmetric)
    assert ours <= 1.02 * brute_force_mse(x, dtype, symmetric)


@pytest.mark.parametrize("dtype", [INT8, DataType.UINT8])
@pytest.mark.parametrize("x", [RELU, DEAD_RELU, -RELU], ids=["relu", "dead-relu", "negative"])
def test_mse_on_one_signed_data_tries_one_zero_point_and_finds_the_full_searchs_range(
        x, dtype, monkeypatch):
    from edgeopt.passes.analyses import calibrators

    stats = stats_of(x[:50_000])
    qmin, qmax = type_range(dtype)
    assert calibrators._zero_points(stats, qmin, qmax, False).tolist() == \
        [qmin if x.min() >= 0 else qmax]
    fast = run(stats, "mse", dtype)
    monkeypatch.setattr(calibrators, "_zero_points",
                        lambda s, lo, hi, sym: np.arange(lo, hi + 1))
    assert fast == run(stats, "mse", dtype)
