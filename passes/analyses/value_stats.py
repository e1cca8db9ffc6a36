"""Per-value statistics and their accumulators (what :mod:`.activations` collects).

:class:`ValueStats` is the result for one value; ``_Accumulator`` folds full arrays into it
(full mode), ``_Extremes`` folds in-graph reductions and samples (light mode);
``_GrowingHistogram`` is the one-pass histogram both use. See :mod:`.activations` for the
modes and their guarantees.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["ValueStats", "Window"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, eq=False)
class ValueStats:
    """Statistics of one value over every calibration sample.

    Non-finite elements are counted in ``nonfinite`` and left out of everything else.
    Per-channel statistics run along axis 1 of the value as the model computes it (None for
    values of rank < 2, or whose axis 1 changed size between runs). Light statistics
    (``Activations(moments=False)``, see the module docs) have exact ``count``, ``min``,
    ``max`` and ``shape`` and a histogram of a sample; ``mean``, ``mean_abs`` and
    ``zero_fraction`` are NaN, the ``channel_*`` fields None, ``nonfinite`` 0.

    Attributes:
        name: the value's name.
        shape: its shape in the first run.
        count: finite elements seen.
        nonfinite: NaN and infinite elements seen.
        min: smallest element.
        max: largest element.
        mean: mean element.
        mean_abs: mean absolute element.
        zero_fraction: fraction of elements exactly 0 (APoZ after a ReLU).
        channel_mean: per-channel mean, shape ``(C,)``.
        channel_mean_abs: per-channel mean absolute value.
        channel_zero_fraction: per-channel fraction of zeros.
        histogram: ``(counts, edges)``, read as :attr:`hist` and :attr:`hist_edges`; None
            when measured with ``hist_limit=0``.
        hist_zeros: elements exactly 0 among those the histogram counts.
    """

    name: str
    shape: tuple[int, ...]
    count: int
    nonfinite: int
    min: float
    max: float
    mean: float
    mean_abs: float
    zero_fraction: float
    channel_mean: np.ndarray | None
    channel_mean_abs: np.ndarray | None
    channel_zero_fraction: np.ndarray | None
    histogram: tuple[np.ndarray, np.ndarray] | None
    hist_zeros: int

    @property
    def hist(self) -> np.ndarray:
        """Element counts per bin (int64).

        Bin ``i`` holds ``hist_edges[i] <= x < hist_edges[i + 1]``, the last bin also
        ``x == hi``. They sum to ``count`` unless ``hist_limit`` sampled the runs.

        Raises:
            ValueError: measured without a histogram (``hist_limit=0``).
        """
        return self._histogram()[0]

    @property
    def hist_edges(self) -> np.ndarray:
        """The ``len(hist) + 1`` bin edges, equally spaced; they span ``[min, max]``.

        Raises:
            ValueError: measured without a histogram (``hist_limit=0``).
        """
        return self._histogram()[1]

    @property
    def hist_range(self) -> tuple[float, float]:
        """``(lo, hi)``: the first and last histogram edges."""
        return float(self.hist_edges[0]), float(self.hist_edges[-1])

    def _histogram(self) -> tuple[np.ndarray, np.ndarray]:
        if self.histogram is None:
            raise ValueError(f"value {self.name!r} was measured without a histogram "
                             "(hist_limit=0): only its min and max are known")
        return self.histogram

    def percentile(self, q: float) -> float:
        """The ``q``-th percentile (0..100), interpolated within a histogram bin.

        Raises:
            ValueError: ``q`` outside [0, 100], or no histogram.
        """
        if not 0 <= q <= 100:
            raise ValueError(f"percentile must be in [0, 100], not {q}")
        hist, edges = self._histogram()
        if self.count == 0:
            return math.nan
        cum = np.cumsum(hist)
        target = q / 100 * cum[-1]
        i = int(np.searchsorted(cum, target, side="left"))
        i = min(i, len(hist) - 1)
        before = cum[i - 1] if i else 0
        frac = (target - before) / hist[i] if hist[i] else 0.0
        return float(np.clip(edges[i] + frac * (edges[i + 1] - edges[i]), self.min, self.max))


class _GrowingHistogram:
    """Fixed bin count over a range that doubles when data falls outside it.

    Edges are ``lo + k * step``. Doubling ``step`` is exact in binary floating point, so after
    the range grows upward every new edge is one of the old edges and merging bin pairs is
    exact; growing downward moves ``lo``, whose rounding may shift values lying exactly on an
    old inner edge by one bin.
    """

    #: Values binned at once.
    BLOCK = 1 << 16

    def __init__(self, bins: int) -> None:
        self.bins = bins
        self.counts = np.zeros(bins, np.int64)
        self.lo = self.step = 0.0
        self.started = False
        # Values exactly at ``hi`` sit in the last bin, which is closed; once the range grows
        # upward, ``hi`` becomes an inner edge and they belong to the bin above it.
        self.at_hi = 0

    @property
    def hi(self) -> float:
        """The upper end of the range (the last edge)."""
        return self.lo + self.bins * self.step

    def edges(self) -> np.ndarray:
        """The ``bins + 1`` edges."""
        return self.lo + np.arange(self.bins + 1) * self.step

    def add(self, vals: np.ndarray, bounds: tuple[float, float] | None = None) -> None:
        """Count finite values (float32 ones are compared with the edges in float64).

        ``bounds``: their ``(min, max)``, when the caller knows it already.
        """
        if not vals.size:
            return
        mn, mx = bounds if bounds is not None else (float(vals.min()), float(vals.max()))
        if not self.started:
            # A constant first batch still needs a non-empty range.
            span = mx - mn if mx > mn else max(abs(mn), 1.0) * 1e-6
            self.lo, self.step, self.started = mn, span / self.bins, True
            while self.hi < mx:  # rounding: the range must reach the maximum
                self.step = float(np.nextafter(self.step, math.inf))
        while mn < self.lo:
            self._double(down=True)
        while mx > self.hi:
            self._double(down=False)
        for i in range(0, vals.size, self.BLOCK):  # blocks: the temporaries stay in cache
            self.counts += np.bincount(self._bin(vals[i:i + self.BLOCK]), minlength=self.bins)
        if mx >= self.hi:  # np.float64: a float32 array must not round the bound to compare
            self.at_hi += int(np.count_nonzero(vals == np.float64(self.hi)))

    def _bin(self, vals: np.ndarray) -> np.ndarray:
        """Bin of each value: ``edges[i] <= v < edges[i + 1]``, the last bin also ``v == hi``.

        The same as ``searchsorted(edges, vals, side="right") - 1`` (clipped), several times
        faster: the quotient ``(v - lo) / step``, lowered by ``tol`` (a bound on its rounding
        and on that of the edges, in bins), truncated (floor, or 0 just below 0), is never
        above the right bin and is below it only for a fraction within ``2 tol`` of 1; those
        few values are compared with the edges.
        """
        tol = 2.0 ** -50 * (abs(self.lo) / self.step + self.bins + 1)
        q = np.subtract(vals, self.lo, dtype=np.float64)
        q /= self.step
        q -= tol
        idx = q.astype(np.intp)
        np.minimum(idx, self.bins - 1, out=idx)
        q -= idx
        near = np.flatnonzero(q > 1 - 2 * tol)
        if near.size:
            idx[near] = self._fix(vals[near], idx[near])
        return idx

    def _fix(self, vals: np.ndarray, idx: np.ndarray) -> np.ndarray:
        """Move each ``idx`` to the bin of its value by comparing with the edges."""
        edges = self.edges()
        below, above = edges[:-1], np.append(edges[1:-1], np.inf)  # the last bin is closed
        while True:
            down, up = vals < below[idx], vals >= above[idx]
            if not (down.any() or up.any()):
                return idx
            idx -= down
            idx += up

    def _double(self, down: bool) -> None:
        merged = self.counts.reshape(-1, 2).sum(axis=1)
        empty = np.zeros_like(merged)
        half = self.bins // 2
        if down:
            self.counts, self.lo = np.concatenate([empty, merged]), self.lo - self.bins * self.step
        else:
            self.counts = np.concatenate([merged, empty])
            self.counts[half - 1] -= self.at_hi
            self.counts[half] += self.at_hi
            self.at_hi = 0
        self.step *= 2


class _Accumulator:
    """Running sums for one value (full statistics)."""

    def __init__(self, name: str, bins: int, channels: bool = True,
                 hist_limit: int | None = None) -> None:
        self.name = name
        self.hist_limit = hist_limit
        self.shape: tuple[int, ...] | None = None
        self.count = self.nonfinite = self.zeros = self.hist_zeros = 0
        self.total = self.abs_total = 0.0
        self.min, self.max = math.inf, -math.inf
        self.hist = _GrowingHistogram(bins) if hist_limit != 0 else None
        self.channels: list[np.ndarray] | None = None  # sum, |sum|, zeros, count per channel
        self.channels_ok = channels

    def update(self, arr: np.ndarray, channels: bool = True) -> None:
        """Add one run's array (float32 stays float32; sums accumulate in float64).

        ``channels``: count the run in the per-channel statistics too.
        """
        x = np.asarray(arr)
        if x.dtype.kind != "f":
            x = x.astype(np.float64)
        if self.shape is None:
            self.shape = tuple(x.shape)
        finite = np.isfinite(x)
        mask = None if finite.all() else finite
        vals = x.ravel() if mask is None else x[mask]
        self.nonfinite += x.size - vals.size
        sums = self._update_channels(x, mask) if channels else None
        if not vals.size:
            return
        if sums is None:  # no channel axis to sum along first
            sums = (vals.sum(dtype=np.float64), np.abs(vals).sum(dtype=np.float64),
                    np.count_nonzero(vals == 0))
        mn, mx = float(vals.min()), float(vals.max())
        self.count += vals.size
        self.min, self.max = min(self.min, mn), max(self.max, mx)
        self.total += float(sums[0])
        self.abs_total += float(sums[1])
        self.zeros += int(sums[2])
        if self.hist is None:
            return
        if self.hist_limit is not None and vals.size > self.hist_limit:
            vals = vals[::_stride(vals.size, self.hist_limit)]  # an even stride through the run
            self.hist_zeros += int(np.count_nonzero(vals == 0))
        else:
            self.hist_zeros += int(sums[2])
        self.hist.add(vals, (mn, mx))

    def _update_channels(self, x: np.ndarray, mask: np.ndarray | None
                         ) -> tuple[float, float, int] | None:
        """Add the per-channel sums; return their totals (None: no channel axis)."""
        if x.ndim < 2 or not self.channels_ok:
            return None
        if self.channels is not None and len(self.channels[0]) != x.shape[1]:
            self.channels_ok = False  # axis 1 is not a channel axis after all
            return None
        axes = (0, *range(2, x.ndim))
        if mask is None:
            count = np.full(x.shape[1], x.size // max(x.shape[1], 1), np.int64)
            zeros = np.count_nonzero(x == 0, axis=axes)
        else:
            x = np.where(mask, x, 0.0)
            count = mask.sum(axis=axes)
            zeros = np.count_nonzero((x == 0) & mask, axis=axes)
        new = [x.sum(axis=axes, dtype=np.float64), np.abs(x).sum(axis=axes, dtype=np.float64),
               zeros, count]
        self.channels = new if self.channels is None else \
            [a + b for a, b in zip(self.channels, new, strict=True)]
        return float(new[0].sum()), float(new[1].sum()), int(new[2].sum())

    def result(self) -> ValueStats:
        """The finished statistics."""
        n = self.count
        ch = self.channels if self.channels_ok and self.channels is not None else None
        if ch is not None:
            denom = np.maximum(ch[3], 1).astype(np.float64)
            ch_mean, ch_abs, ch_zero = ch[0] / denom, ch[1] / denom, ch[2] / denom
        else:
            ch_mean = ch_abs = ch_zero = None
        return ValueStats(self.name, self.shape or (), n, self.nonfinite,
                          self.min if n else math.nan, self.max if n else math.nan,
                          self.total / n if n else math.nan, self.abs_total / n if n else math.nan,
                          self.zeros / n if n else math.nan, ch_mean, ch_abs, ch_zero,
                          _histogram(self.hist), self.hist_zeros)


class _Extremes:
    """Light statistics of one value: exact min, max and count, a sampled histogram.

    Per-channel means too, if asked (computed in the graph, summed here in float64).
    """

    def __init__(self, name: str, bins: int, hist_limit: int | None, channels: bool) -> None:
        self.name = name
        self.hist_limit = hist_limit
        self.shape: tuple[int, ...] | None = None
        self.count = self.hist_zeros = 0
        self.min, self.max = math.inf, -math.inf
        self.hist = _GrowingHistogram(bins) if hist_limit != 0 else None
        self.channels_ok = channels
        self.channel_sum: np.ndarray | None = None
        self.channel_count = 0.0

    def update(self, shape: Sequence[int], lo: np.ndarray, hi: np.ndarray,
               sample: np.ndarray | None = None, channel_mean: np.ndarray | None = None,
               channels: bool = True) -> bool:
        """Add one run: its shape, min and max, histogram sample and per-channel means.

        A sample with more than ``hist_limit`` elements (the whole value) is strided here as
        the graph strides. ``channels``: the run counts in the per-channel means (False: it
        has none, which then says nothing about the value's channel axis). Returns False,
        adding nothing, if the run has non-finite elements.
        """
        if self.shape is None:
            self.shape = tuple(int(d) for d in shape)
        n = math.prod(int(d) for d in shape)
        if not n:  # the reductions of an empty tensor return +-inf
            return True
        mn, mx = float(np.asarray(lo).reshape(-1)[0]), float(np.asarray(hi).reshape(-1)[0])
        if not (math.isfinite(mn) and math.isfinite(mx)):
            return False
        vals = cm = None
        if self.hist is not None:
            vals = np.asarray(sample).reshape(-1)
            if self.hist_limit is not None and vals.size > self.hist_limit:
                vals = vals[::_stride(vals.size, self.hist_limit)]
            if vals.dtype.kind != "f":
                vals = vals.astype(np.float64)
            if math.isnan(float(vals.min())):  # numpy's min passes NaN on
                return False
        if channels and self.channels_ok and channel_mean is not None:
            cm = np.asarray(channel_mean, np.float64).reshape(-1)
            if not np.isfinite(cm).all():  # a NaN the reductions skipped
                return False
        if vals is not None:
            self.hist.add(vals, (mn, mx))  # type: ignore[union-attr]
            self.hist_zeros += int(np.count_nonzero(vals == 0))
        if channels:
            self._add_channels(cm, shape, n)
        self.count += n
        self.min, self.max = min(self.min, mn), max(self.max, mx)
        return True

    def _add_channels(self, cm: np.ndarray | None, shape: Sequence[int], n: int) -> None:
        if not self.channels_ok:
            return
        if cm is None or len(shape) < 2 or cm.size != int(shape[1]) or \
                (self.channel_sum is not None and cm.size != self.channel_sum.size):
            self.channels_ok = False  # no channel axis 1 (or it changed size)
            return
        per = n / cm.size  # elements of each channel in this run
        self.channel_sum = cm * per if self.channel_sum is None else self.channel_sum + cm * per
        self.channel_count += per

    def update_array(self, arr: np.ndarray, channels: bool = True) -> bool:
        """Add one run's whole array (a graph input); False: it has non-finite elements.

        ``channels``: as in :meth:`update`.
        """
        x = np.asarray(arr)
        if not x.size:
            return self.update(x.shape, np.inf, -np.inf, channels=channels)
        cm = x.mean(axis=(0, *range(2, x.ndim)), dtype=np.float64) \
            if channels and self.channels_ok and x.ndim >= 2 else None
        return self.update(x.shape, x.min(), x.max(), x, cm, channels)

    def result(self) -> ValueStats:
        """The finished statistics (moments NaN; of the per-channel ones, the means)."""
        n, nan = self.count, math.nan
        ch = self.channel_sum / self.channel_count \
            if self.channels_ok and self.channel_sum is not None else None
        return ValueStats(self.name, self.shape or (), n, 0, self.min if n else nan,
                          self.max if n else nan, nan, nan, nan, ch, None, None,
                          _histogram(self.hist), self.hist_zeros)


@dataclass(frozen=True)
class Window:
    """Where a convolution's kernel taps read its input, along the spatial axes.

    With :meth:`tap_means` this gives a Conv's per-channel mean output exactly from its
    input: ``sum(W[o, c, k] * tap_mean[c, k]) + b[o]``, padding and strides included.

    Attributes:
        kernel: the kernel size per spatial axis.
        strides: the strides.
        dilations: the dilations.
        pads: ``(begin..., end...)`` as ONNX's ``pads``; ignored unless ``auto_pad`` is
            ``NOTSET``.
        auto_pad: ONNX's ``auto_pad``.
    """

    kernel: tuple[int, ...]
    strides: tuple[int, ...]
    dilations: tuple[int, ...]
    pads: tuple[int, ...]
    auto_pad: str = "NOTSET"

    @classmethod
    def of_conv(cls, node: object, rank: int) -> Window:
        """The window of a Conv node whose weight has ``rank`` dims.

        Without ``kernel_shape``, the kernel comes from the weight input's shape.
        """
        attr = node.attr  # type: ignore[attr-defined]
        n = rank - 2
        kernel = attr("kernel_shape", None) or node.inputs[1].shape[2:]  # type: ignore[attr-defined]
        return cls(tuple(int(k) for k in kernel), tuple(attr("strides", None) or [1] * n),
                   tuple(attr("dilations", None) or [1] * n),
                   tuple(attr("pads", None) or [0] * 2 * n), str(attr("auto_pad", "NOTSET")))

    @property
    def trivial(self) -> bool:
        """Every tap reads every input position once: 1 x 1, stride 1, no padding."""
        return all(k == 1 for k in self.kernel) and all(s == 1 for s in self.strides) and \
            (self.auto_pad not in ("NOTSET", "") or not any(self.pads))

    def matrices(self, sizes: Sequence[int]) -> tuple[list[np.ndarray], int]:
        """Per spatial axis, the 0/1 matrix ``[k, size]`` of the positions tap ``k`` reads.

        Returns them and the number of output positions.
        """
        mats, outputs = [], 1
        for i, size in enumerate(sizes):
            k, s, d = self.kernel[i], self.strides[i], self.dilations[i]
            begin, end = self._pads(i, size)
            out = (size + begin + end - d * (k - 1) - 1) // s + 1
            m = np.zeros((k, size))
            for j in range(k):
                pos = np.arange(max(out, 0)) * s + j * d - begin
                m[j, pos[(pos >= 0) & (pos < size)]] = 1.0
            mats.append(m)
            outputs *= max(out, 0)
        return mats, outputs

    def _pads(self, i: int, size: int) -> tuple[int, int]:
        n = len(self.kernel)
        if self.auto_pad in ("NOTSET", ""):
            return self.pads[i], self.pads[n + i]
        if self.auto_pad == "VALID":
            return 0, 0
        s, k, d = self.strides[i], self.kernel[i], self.dilations[i]
        total = max((-(-size // s) - 1) * s + (k - 1) * d + 1 - size, 0)
        low = total - total // 2 if self.auto_pad == "SAME_LOWER" else total // 2
        return low, total - low


def tap_sums(x: np.ndarray, mats: Sequence[np.ndarray]) -> np.ndarray:
    """Per channel and kernel tap, the sum of the input elements the tap reads: ``[C, *k]``.

    Summed over axis 0 and the output positions (``mats``: :meth:`Window.matrices`); what
    :class:`~.activations.Activations` computes in the graph with ``MatMul`` nodes.
    """
    t = np.asarray(x, np.float64)
    for m in reversed(mats):  # the last spatial axis first: [..., k_last]
        t = t @ m.T
        t = np.moveaxis(t, -1, 2)  # move the new tap axis in front of the spatial axes
    return t.sum(axis=0)


def _histogram(hist: _GrowingHistogram | None) -> tuple[np.ndarray, np.ndarray] | None:
    return None if hist is None else (hist.counts.copy(), hist.edges())


def _stride(size: int, limit: int) -> int:
    """The step of an even sample of at most ``limit`` of ``size`` elements.

    The smallest step >= ``size / limit`` that is coprime with ``size``: a step sharing a
    factor with the inner dims would sample the same rows, columns or channels every time
    (a stride of 4 through 4 x 4 maps picks column 0 only).
    """
    step = max(-(-size // limit), 1)
    while step > 1 and math.gcd(step, size) != 1:
        step += 1
    return step
