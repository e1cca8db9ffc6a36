"""Activation-range calibrators: the clipping range ``(lo, hi)`` of one tensor.

A calibrator reads only the tensor's :class:`~edgeopt.passes.analyses.activations.ValueStats`
(min, max, zero fraction, histogram), so trying methods never reruns the model.
:func:`calibrate` returns a finite range with ``lo <= 0 <= hi`` (0 stays exact), symmetric
when asked, and ``(0.0, 0.0)`` for an empty or all-zero tensor. Exact zeros quantize without
error, so ``entropy`` and ``mse`` leave them out. Built-ins:

* ``minmax``: the data's ``(min, max)``.
* ``percentile``: clips ``100 - percentile`` % of the elements, as ONNX Runtime's
  ``PercentileCalibrater``: the ``percentile``-th percentile of ``|x|`` when symmetric, else
  half the clipped mass on each side. Unlike ORT it interpolates within the bin (ORT takes
  the bin's lower edge) and keeps a symmetric range symmetric (ORT clamps it to [min, max]).
* ``entropy``: TensorRT's KL search (ORT's ``EntropyCalibrater``). Unlike ORT: no zero spike
  (on ReLU outputs it drives ORT's search to its narrowest window), no window narrower than
  ``num_quantized_bins`` histogram bins (the histogram cannot see inside it, so it looks
  lossless), none clipping more than ``1 - min_kept`` of the non-zero elements, and
  asymmetric windows ``[max(min, -t), min(max, t)]`` get ``qmax - qmin + 1`` levels.
* ``mse``: the step and zero point minimizing the expected quantize-dequantize error
  (rounding plus clipping, exact for a density uniform within each bin).

Add methods with :func:`register_calibrator`: ``fn(stats, *, qmin, qmax, symmetric,
**params) -> (lo, hi)``. A duplicate name is an error.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable

import numpy as np

from .._named import NamedRegistry
from .value_stats import ValueStats

__all__ = ["calibrate", "get_calibrator", "list_calibrators", "register_calibrator",
           "unregister_calibrator"]

Calibrator = Callable[..., tuple[float, float]]
_COMMON = ("stats", "qmin", "qmax", "symmetric")
_CALIBRATORS: NamedRegistry[Calibrator] = NamedRegistry("calibrator", "calibrator", "calibrators")


def register_calibrator(name: str) -> Callable[[Calibrator], Calibrator]:
    """A decorator registering a calibrator as ``name`` (lowercase; dotted for plugins).

    Raises:
        ValueError: the name is malformed or already registered.
    """
    return _CALIBRATORS.register(name)


def unregister_calibrator(name: str) -> None:
    """Remove a calibrator (tests and interactive sessions)."""
    _CALIBRATORS.pop(name, None)


def list_calibrators() -> list[str]:
    """Every registered calibrator name, sorted."""
    return _CALIBRATORS.names()


def get_calibrator(name: str) -> Calibrator:
    """The calibrator registered as ``name``.

    Raises:
        ValueError: unknown name; the message lists the registered ones.
    """
    return _CALIBRATORS.lookup(name)


def calibrate(stats: ValueStats, method: str, *, qmin: int, qmax: int, symmetric: bool = False,
              **params: float) -> tuple[float, float]:
    """The clipping range of one activation tensor.

    Args:
        stats: the tensor's statistics.
        method: a registered calibrator (:func:`list_calibrators`).
        qmin: smallest integer of the target range, as ``params_from_range`` will use it
            (``type_range(dtype, symmetric)``); ``mse`` and ``entropy`` model its rounding.
        qmax: largest integer of the target range.
        symmetric: return ``(-t, t)``.
        **params: the method's own parameters (``percentile=99.999``, ``min_kept=0.999``...).

    Returns:
        ``(lo, hi)``, finite, with ``lo <= 0 <= hi``.

    Raises:
        ValueError: unknown method or parameter, or ``qmin >= qmax``.
    """
    fn = get_calibrator(method)
    accepted = [p for p in inspect.signature(fn).parameters if p not in _COMMON]
    for key in params:
        if key not in accepted:
            raise ValueError(f"calibrator {method!r} has no parameter {key!r}; its parameters: "
                             f"{', '.join(accepted) or 'none'}")
    if qmin >= qmax:
        raise ValueError(f"qmin ({qmin}) must be below qmax ({qmax})")
    if stats.count == 0 or stats.min == stats.max == 0:
        return 0.0, 0.0
    lo, hi = fn(stats, qmin=qmin, qmax=qmax, symmetric=symmetric, **params)
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    if symmetric:
        lo, hi = -max(-lo, hi), max(-lo, hi)
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError(f"calibrator {method!r} returned a non-finite range ({lo}, {hi}) "
                         f"for {stats.name!r}")
    return lo, hi


# -- histogram helpers ------------------------------------------------------------------------
def _histogram(stats: ValueStats, drop_zeros: bool) -> tuple[np.ndarray, np.ndarray]:
    """``(edges, counts)`` in float64, the outer data-holding bins trimmed to ``[min, max]``.

    ``drop_zeros`` takes the exact zeros out of the bin holding 0: they quantize exactly.
    """
    edges, counts = stats.hist_edges.astype(np.float64), stats.hist.astype(np.float64)
    held = np.flatnonzero(counts)
    edges[held[0]] = max(edges[held[0]], stats.min)  # that bin holds min: stays non-empty
    if stats.max > edges[held[-1]]:  # (a maximum on an edge is left a bin of its own)
        edges[held[-1] + 1] = min(edges[held[-1] + 1], stats.max)
    if drop_zeros and edges[0] <= 0 <= edges[-1]:
        i = min(int(np.searchsorted(edges, 0.0, side="right")) - 1, len(counts) - 1)
        counts[i] = max(counts[i] - stats.hist_zeros, 0.0)  # zeros the histogram holds
    return edges, counts


def _cdf(edges: np.ndarray, counts: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Elements below ``x``, the density uniform within each bin."""
    return np.interp(x, edges, np.concatenate([[0.0], np.cumsum(counts)]))


def _bounds(stats: ValueStats) -> tuple[float, float]:
    """``(min, max)`` widened to hold 0."""
    return min(stats.min, 0.0), max(stats.max, 0.0)


# -- minmax and percentile --------------------------------------------------------------------
@register_calibrator("minmax")
def minmax(stats: ValueStats, *, qmin: int, qmax: int, symmetric: bool) -> tuple[float, float]:
    """The data's ``(min, max)`` (``calibrate`` widens it to 0 and makes it symmetric)."""
    return _bounds(stats)


@register_calibrator("percentile")
def percentile(stats: ValueStats, *, qmin: int, qmax: int, symmetric: bool,
               percentile: float = 99.999) -> tuple[float, float]:
    """Clip ``100 - percentile`` % of the elements (ORT's convention, see the module docs)."""
    if not 0 < percentile <= 100:
        raise ValueError(f"percentile must be in (0, 100], not {percentile}")
    if not symmetric:
        cut = (100 - percentile) / 2
        return stats.percentile(cut), stats.percentile(100 - cut)
    edges, counts = _histogram(stats, drop_zeros=False)
    ts = np.unique(np.abs(np.append(edges, 0.0)))  # |x|'s CDF is linear between these
    inside = _cdf(edges, counts, ts) - _cdf(edges, counts, -ts)
    target = percentile / 100 * inside[-1]
    i = min(int(np.searchsorted(inside, target)), len(ts) - 1)  # the smallest t reaching it
    t = ts[i - 1] + (ts[i] - ts[i - 1]) * (target - inside[i - 1]) / (inside[i] - inside[i - 1])
    t = min(t, max(-stats.min, stats.max))
    return -t, t


# -- entropy ----------------------------------------------------------------------------------
@register_calibrator("entropy")
def entropy(stats: ValueStats, *, qmin: int, qmax: int, symmetric: bool,
            num_quantized_bins: int | None = None, min_kept: float = 0.999
            ) -> tuple[float, float]:
    """The threshold whose window loses the least information (TensorRT, see module docs).

    ``num_quantized_bins``: levels per window; default ``(qmax - qmin + 1) // 2`` over
    ``[0, t]`` when symmetric (128 for int8, as ORT and TensorRT), else ``qmax - qmin + 1``.
    ``min_kept``: fraction of the non-zero elements every candidate keeps (KL spreads a
    spike over its level, which pulls the search towards the narrowest windows).
    """
    levels = (qmax - qmin + 1) // (2 if symmetric else 1) if num_quantized_bins is None \
        else int(num_quantized_bins)
    if levels < 2:
        raise ValueError(f"num_quantized_bins must be >= 2, not {levels}")
    if not 0 <= min_kept <= 1:
        raise ValueError(f"min_kept must be in [0, 1], not {min_kept}")
    hist, zero, step = _zero_aligned(stats, symmetric)
    kneg, kpos, cum = zero, len(hist) - zero, np.concatenate([[0.0], np.cumsum(hist)])
    ks = np.unique(np.linspace(1, max(kneg, kpos), 128).round().astype(int))
    for _ in range(2):  # every 128th threshold, then each one near the best
        a, b = zero - np.minimum(ks, kneg), zero + np.minimum(ks, kpos)
        ok = (b - a >= min(levels, len(hist))) & (cum[b] - cum[a] >= min_kept * cum[-1])
        ks, a, b = ks[ok], a[ok], b[ok]  # the widest window always passes
        kl = _kl(hist, a, b, levels)
        i = len(kl) - 1 - int(np.argmin(kl[::-1]))  # the last minimum, as TensorRT
        found = (a[i] - zero) * step, (b[i] - zero) * step
        ks = np.arange(max(ks[i] - 8, 1), ks[i] + 9)
    return found


def _zero_aligned(stats: ValueStats, absolute: bool) -> tuple[np.ndarray, int, float]:
    """``(counts, index of the bin at 0, step)``: the non-zero elements on edges ``k * step``.

    ``absolute``: the histogram of ``|x|``. The step is the histogram's bin width, or coarser
    to stay within ``2 * len(hist)`` bins.
    """
    edges, counts = _histogram(stats, drop_zeros=True)
    lo, hi = _bounds(stats)
    step = max(float(stats.hist_edges[1] - stats.hist_edges[0]), max(-lo, hi) / len(counts))
    kneg, kpos = (0, math.ceil(max(-lo, hi) / step)) if absolute else \
        (math.ceil(-lo / step), math.ceil(hi / step))
    grid = step * np.arange(-kneg, kpos + 1)
    cum = _cdf(edges, counts, grid) - (_cdf(edges, counts, -grid) if absolute else 0.0)
    cum[0], cum[-1] = 0.0, counts.sum()
    return np.diff(cum), kneg, step


def _kl(hist: np.ndarray, a: np.ndarray, b: np.ndarray, levels: int) -> np.ndarray:
    """KL divergence of every window ``hist[a:b]`` (one per row), vectorized.

    Reference ``p``: the window with the mass outside added to its end bins. Candidate ``q``:
    the window merged into ``levels`` equal levels, each level's mass spread evenly over its
    non-empty bins (TensorRT's formulation).
    """
    total, cum = hist.sum(), np.concatenate([[0.0], np.cumsum(hist)])
    if total <= 0:
        return np.zeros(len(a))
    rows, width = np.arange(len(a)), b - a
    j = np.arange(width.max())
    valid = j < width[:, None]
    win = np.where(valid, hist[np.minimum(a[:, None] + j, len(hist) - 1)], 0.0)
    p = win.copy()
    p[:, 0] += cum[a]
    p[rows, width - 1] += total - cum[b]
    level = rows[:, None] * levels + (j * levels) // width[:, None]
    used = valid & (win > 0)
    mass = np.bincount(level[used], win[used], minlength=len(a) * levels)
    nonzero = np.bincount(level[used], minlength=len(a) * levels)
    q = np.where(used, mass[level] / np.maximum(nonzero[level], 1), 0.0)
    q /= np.maximum(cum[b] - cum[a], 1e-300)[:, None]
    p /= total
    ratio = np.where(p > 0, p / np.maximum(q, 1e-12), 1.0)
    return (p * np.log(ratio)).sum(axis=1)


# -- mse --------------------------------------------------------------------------------------
@register_calibrator("mse")
def mse(stats: ValueStats, *, qmin: int, qmax: int, symmetric: bool) -> tuple[float, float]:
    """The range with the least expected quantization error (see :class:`_ErrorModel`).

    A realizable range is a step ``s`` and an integer zero point ``z``: ``[(qmin - z) s,
    (qmax - z) s]``. The search zooms in on ``s`` (up to the min-max step) and tries every
    ``z`` for each (only the symmetric one when ``symmetric``).
    """
    model = _ErrorModel(stats)
    lo, hi = _bounds(stats)
    span = 2 * max(-lo, hi) if symmetric else hi - lo
    zps = _zero_points(stats, qmin, qmax, symmetric)

    def best(steps: np.ndarray) -> tuple[int, int]:
        """(step index, zero-point index) of the cheapest pair."""
        costs = model.cost(steps, (qmin - zps) * steps[:, None], (qmax - zps) * steps[:, None])
        i, j = np.unravel_index(int(np.argmin(costs)), costs.shape)
        return int(i), int(j)

    # Geometric first (outliers may put the best step far below the min-max one), then zoom
    # in between the best step's neighbours.
    steps = span / (qmax - qmin) * np.geomspace(2.0 ** -16, 1.0, 33)
    for _ in range(4):
        i, j = best(steps)
        half = (qmax - qmin) / 2 * steps[i]  # symmetric: what params_from_range maps to s
        found = (-half, half) if symmetric else ((qmin - zps[j]) * steps[i],
                                                 (qmax - zps[j]) * steps[i])
        steps = np.linspace(steps[max(i - 1, 0)], steps[min(i + 1, len(steps) - 1)], 16)
    return found


def _zero_points(stats: ValueStats, qmin: int, qmax: int, symmetric: bool) -> np.ndarray:
    """The zero points :func:`mse` tries.

    Symmetric: the middle one. Data that is never negative (a Relu's output): ``qmin`` alone,
    and never positive: ``qmax``; for any step, another zero point only moves range from
    where data is to where there is none (the grid, multiples of the step, is the same), so
    it cannot cost less. Otherwise every one.
    """
    if symmetric:
        return np.array([0 if qmin < 0 else (qmin + qmax + 1) // 2])
    if stats.min >= 0:
        return np.array([qmin])
    if stats.max <= 0:
        return np.array([qmax])
    return np.arange(qmin, qmax + 1)


class _ErrorModel:
    """Total squared quantize-dequantize error of a histogram's non-zero elements.

    The density is taken uniform within each bin. For a step ``s`` and range ``[low, high]``
    (multiples of ``s``: 0 is on the grid) elements inside round to the nearest multiple of
    ``s``, which costs the integral of the sawtooth ``(x - s round(x / s))**2``, and elements
    outside clip to the end, which costs ``sum (x - high)**2`` from the bins' moments. Both are
    exact under that density, including steps wider than the bins (where ``s**2 / 12`` per
    element overestimates the error of data concentrated near 0). Empty bins are dropped.
    """

    def __init__(self, stats: ValueStats) -> None:
        edges, counts = _histogram(stats, drop_zeros=True)
        used = counts > 0
        self.a, self.b, self.n = edges[:-1][used], edges[1:][used], counts[used]
        # Bin ends, each once (neighbouring bins share one): ``a = ends[ia]``, ``b = ends[ib]``.
        self.ends, inverse = np.unique(np.concatenate([self.a, self.b]), return_inverse=True)
        self.ia, self.ib = inverse[:len(self.a)], inverse[len(self.a):]
        self.density = self.n / (self.b - self.a)
        mid, width = (self.a + self.b) / 2, self.b - self.a
        moments = [self.n, self.n * mid, self.n * (mid ** 2 + width ** 2 / 12)]
        # Suffix sums: count, sum x and sum x**2 of the bins from i on.
        self.suffix = [np.append(np.cumsum(m[::-1])[::-1], 0.0) for m in moments]

    def cost(self, steps: np.ndarray, low: np.ndarray, high: np.ndarray) -> np.ndarray:
        """Error for every ``steps[k]`` with the ranges ``low[k, :]``, ``high[k, :]``."""
        s = steps[:, None]
        saw = _sawtooth(self.ends, s)  # [step, end]
        whole = (saw[:, self.ib] - saw[:, self.ia]) * self.density
        below = np.concatenate([np.zeros((len(steps), 1)), np.cumsum(whole, axis=1)], axis=1)
        r_hi, (n_hi, s_hi, q_hi) = self._split(high, below, saw, s)
        r_lo, above_lo = self._split(low, below, saw, s)
        n_lo, s_lo, q_lo = (t[0] - x for t, x in zip(self.suffix, above_lo, strict=True))
        return r_hi - r_lo + (q_hi - 2 * high * s_hi + high ** 2 * n_hi) \
            + (q_lo - 2 * low * s_lo + low ** 2 * n_lo)

    def _split(self, x: np.ndarray, below: np.ndarray, saw: np.ndarray, s: np.ndarray
               ) -> tuple[np.ndarray, list[np.ndarray]]:
        """Rounding error below ``x`` (rows: steps); count, sum x, sum x**2 above ``x``.

        ``below``: the rounding error of the bins before each bin; ``saw``: the sawtooth at
        :attr:`ends`.
        """
        i = np.clip(np.searchsorted(self.a, x, side="right") - 1, 0, len(self.a) - 1)
        x, b, d = np.clip(x, self.a[i], self.b[i]), self.b[i], self.density[i]
        rows = np.arange(len(s))[:, None]
        rounding = below[rows, i] + d * (_sawtooth(x, s) - saw[rows, self.ia[i]])
        part = d * (b - x)  # the elements of x's bin above x
        return rounding, [self.suffix[0][i + 1] + part, self.suffix[1][i + 1] + part * (x + b) / 2,
                          self.suffix[2][i + 1] + part * (x * x + x * b + b * b) / 3]


def _sawtooth(x: np.ndarray, s: np.ndarray) -> np.ndarray:
    """An antiderivative of ``(x - s * round(x / s))**2``."""
    m = np.rint(x / s)
    v = x - m * s
    return m * (s * s * s / 12) + v * v * v / 3
