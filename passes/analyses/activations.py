"""``Activations``: per-value statistics from running the model on the calibration data.

Later passes (importance, recovery, quantization) read these instead of rerunning the model:
request them with ``ctx.analysis(Activations)``; the pass manager caches the object until a
pass modifies the model.

How it runs. The model is exported with :func:`edgeopt.ir.to_proto` (in memory; models whose
weights pass ``Activations.INLINE_LIMIT`` bytes go to a temporary folder with external data),
the chosen values are added as extra graph outputs of that copy, and ONNX Runtime (CPU) runs it
over ``ctx.calib`` in batches. The IR model itself is never touched.

Memory bound. Output sizes per sample are taken from shape inference on a clone whose inputs
are fixed to the calibration shapes (a value whose size cannot be inferred is assumed as large
as the largest one that can). The batch is shrunk until the largest single value fits in
``max_bytes``, then the values are split, in graph order, into groups whose outputs for one run
fit in ``max_bytes``; each group is one pass over the data. ``runs``, ``groups`` and
``peak_bytes`` (largest bytes fetched by one run) report what happened.

Histograms use a growing range, in one pass: the first batch fixes ``[min, max]``; when later
data falls outside, the range doubles (toward the side that overflowed) and neighbouring bins
are merged pairwise, which is exact because the new bin edges are a subset of the old ones
(growing downward moves the lowest edge, and its rounding may move a value lying exactly on an
old edge by one bin). The final range contains ``[min, max]`` and is less than 4 times as wide
(less than twice when it grew in one direction only), so more than ``bins/4`` bins span the
data. After a single batch it is ``[min, max]`` (the top edge rounded up if need be). Counts
then equal ``np.histogram(x, bins=stats.hist_edges)``. The range depends on the batch order.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from edgeopt import ir
from edgeopt.ir import DataType, EdgeoptError, Model

from ..calib import CalibrationData, CalibrationError

__all__ = ["Activations", "ValueStats", "run_session"]

log = logging.getLogger(__name__)

FLOAT_TYPES = frozenset({DataType.FLOAT, DataType.FLOAT16, DataType.DOUBLE})


@dataclass(frozen=True, eq=False)
class ValueStats:
    """Statistics of one value over every calibration sample.

    Non-finite elements are counted in ``nonfinite`` and left out of everything else.
    Per-channel statistics run along axis 1 of the value as the model computes it (None for
    values of rank < 2, or whose axis 1 changed size between runs).

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
        hist: element counts per bin (int64, sums to ``count``); bin ``i`` holds
            ``hist_edges[i] <= x < hist_edges[i + 1]``, the last bin also ``x == hi``.
        hist_edges: the ``len(hist) + 1`` bin edges, equally spaced; they span ``[min, max]``.
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
    hist: np.ndarray
    hist_edges: np.ndarray

    @property
    def hist_range(self) -> tuple[float, float]:
        """``(lo, hi)``: the first and last histogram edges."""
        return float(self.hist_edges[0]), float(self.hist_edges[-1])

    def percentile(self, q: float) -> float:
        """The ``q``-th percentile (0..100), interpolated within a histogram bin."""
        if not 0 <= q <= 100:
            raise ValueError(f"percentile must be in [0, 100], not {q}")
        if self.count == 0:
            return math.nan
        cum = np.cumsum(self.hist)
        target = q / 100 * cum[-1]
        i = int(np.searchsorted(cum, target, side="left"))
        i = min(i, len(self.hist) - 1)
        before = cum[i - 1] if i else 0
        frac = (target - before) / self.hist[i] if self.hist[i] else 0.0
        edges = self.hist_edges
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
        # np.float64: a float32 array must not round the bound to float32 to compare.
        self.at_hi += int(np.count_nonzero(vals == np.float64(self.hi)))

    def _bin(self, vals: np.ndarray) -> np.ndarray:
        """Bin of each value: ``edges[i] <= v < edges[i + 1]``, the last bin also ``v == hi``.

        The same as ``searchsorted(edges, vals, side="right") - 1`` (clipped), several times
        faster: the quotient ``(v - lo) / step`` (>= 0, so truncation is floor) is off by at
        most one bin near an edge through rounding, and comparisons with the edges fix that.
        """
        edges = self.edges()
        below, above = edges[:-1], np.append(edges[1:-1], np.inf)  # the last bin is closed
        q = np.subtract(vals, self.lo, dtype=np.float64)
        q /= self.step
        idx = q.astype(np.intp)
        np.minimum(idx, self.bins - 1, out=idx)
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
    """Running sums for one value."""

    def __init__(self, name: str, bins: int, channels: bool = True,
                 hist_limit: int | None = None) -> None:
        self.name = name
        self.hist_limit = hist_limit
        self.shape: tuple[int, ...] | None = None
        self.count = self.nonfinite = self.zeros = 0
        self.total = self.abs_total = 0.0
        self.min, self.max = math.inf, -math.inf
        self.hist = _GrowingHistogram(bins)
        self.channels: list[np.ndarray] | None = None  # sum, |sum|, zeros, count per channel
        self.channels_ok = channels

    def update(self, arr: np.ndarray) -> None:
        """Add one run's array (float32 stays float32; sums accumulate in float64)."""
        x = np.asarray(arr)
        if x.dtype.kind != "f":
            x = x.astype(np.float64)
        if self.shape is None:
            self.shape = tuple(x.shape)
        finite = np.isfinite(x)
        mask = None if finite.all() else finite
        vals = x.ravel() if mask is None else x[mask]
        self.nonfinite += x.size - vals.size
        sums = self._update_channels(x, mask)
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
        if self.hist_limit is not None and vals.size > self.hist_limit:
            vals = vals[::-(-vals.size // self.hist_limit)]  # an even stride through the run
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
                          self.hist.counts.copy(), self.hist.edges())


class _OrtModel:
    """The model exported once for ONNX Runtime; builds sessions that expose chosen values."""

    def __init__(self, model: Model, inline_limit: int) -> None:
        import onnx

        self._tmp: tempfile.TemporaryDirectory | None = None
        if _weight_bytes(model) > inline_limit:
            self._tmp = tempfile.TemporaryDirectory(prefix="edgeopt-activations-")
            path = os.path.join(self._tmp.name, "model.onnx")
            ir.save(model, path, external_data=True)
            self.proto = onnx.load(path, load_external_data=False)
        else:
            self.proto = ir.to_proto(model)
        self._outputs = list(self.proto.graph.output)

    def session(self, names: Sequence[str], dtypes: Mapping[str, DataType | None]) -> Any:
        """An ONNX Runtime session whose outputs include ``names``."""
        import onnx
        import onnxruntime as ort

        graph = self.proto.graph
        del graph.output[:]
        graph.output.extend(self._outputs)
        listed = {o.name for o in self._outputs}
        for name in names:
            if name not in listed:
                vi = graph.output.add(name=name)
                if dtypes.get(name) is not None:
                    vi.type.tensor_type.elem_type = int(dtypes[name])  # type: ignore[arg-type]
        so = ort.SessionOptions()
        so.log_severity_level = 3
        # Basic optimizations only: the values are measured as the graph defines them.
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        src: Any = self.proto.SerializeToString() if self._tmp is None else None
        if self._tmp is not None:
            src = os.path.join(self._tmp.name, "exposed.onnx")
            onnx.save(self.proto, src)
        try:
            return ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])
        except Exception as e:  # ORT raises its own exception types
            raise EdgeoptError(f"Activations: ONNX Runtime cannot load the model: "
                               f"{_first_line(e)}") from None

    def close(self) -> None:
        """Delete the temporary folder, if any."""
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> _OrtModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def run_session(session: Any, names: Sequence[str], feeds: Mapping[str, np.ndarray],
                who: str, source: str) -> list[np.ndarray]:
    """``session.run(names, feeds)``; an ORT failure becomes one EdgeoptError line."""
    try:
        return session.run(list(names), dict(feeds))
    except Exception as e:  # ORT raises its own exception types
        raise EdgeoptError(f"{who}: ONNX Runtime failed on the calibration data from "
                           f"{source}: {_first_line(e)}") from None


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _weight_bytes(model: Model) -> int:
    return sum(v.const_value.nbytes for g in [model.graph, *model.graph.subgraphs()]
               for v in g.initializers.values() if v.const_value is not None)


def _require_calib(ctx: Any, model: Model) -> CalibrationData:
    calib = getattr(ctx, "calib", None)
    if calib is None:
        raise CalibrationError("Activations needs calibration data (--calib)")
    if isinstance(calib, Mapping):
        return CalibrationData.for_model(calib, model)
    if not isinstance(calib, CalibrationData):
        raise CalibrationError(f"Activations: ctx.calib must be CalibrationData, not "
                               f"{type(calib).__name__}")
    return calib


def _infer(model: Model, calib: CalibrationData) -> dict[str, tuple[Any, Any]]:
    """Map each main-graph activation to (dtype, shape), with inputs fixed to one run."""
    feeds = next(calib.batches(1))
    required = {v.name for v in model.graph.inputs if not v.is_initializer()}
    clone = model.clone()
    try:
        ir.static_shapes(clone, {k: a.shape for k, a in feeds.items() if k in required})
    except Exception as e:  # estimates only: fall back to what the IR knows
        log.debug("Activations: shape inference for size estimates failed: %s", e)
    info = {v.name: (v.dtype, v.shape) for v in clone.graph.inputs}
    for node in clone.graph:
        info.update((o.name, (o.dtype, o.shape)) for o in node.outputs if o.name)
    return info


def _plan(names: Sequence[str], per_sample: Mapping[str, float], max_bytes: int,
          batch_size: int, fixed: int | None) -> tuple[int, list[list[str]]]:
    """(samples per run, groups of values whose outputs for one run fit in ``max_bytes``)."""
    biggest = max((per_sample[n] for n in names), default=0.0)
    if fixed:
        batch = fixed
    else:
        batch = batch_size if biggest <= 0 else max(1, min(batch_size, int(max_bytes // biggest)))
    groups: list[list[str]] = []
    current: list[str] = []
    used = 0.0
    for name in names:
        size = per_sample[name] * batch
        if size > max_bytes:
            log.warning("Activations: value %r needs about %d bytes per run, more than "
                        "max_bytes=%d", name, size, max_bytes)
        if current and used + size > max_bytes:
            groups.append(current)
            current, used = [], 0.0
        current.append(name)
        used += size
    if current:
        groups.append(current)
    return batch, groups


class Activations:
    """Per-value activation statistics over the calibration data (see the module docs).

    Args:
        model: the model (never modified).
        ctx: the pass context; ``ctx.calib`` holds the calibration data.
        values: names of the values to measure (a tuple, so the analysis can be cached);
            default: every float graph input and node output of the main graph.
        batch_size: samples per run (a static batch dim in the model overrides it).
        max_bytes: bound on the bytes of exposed outputs fetched by one run.
        bins: histogram bins (even).
        channels: compute the per-channel statistics (``channel_*``; None when False).
        hist_limit: histogram at most this many elements of a value per run, an even stride
            through it (min, max, mean and counts still see every element); None: all.

    Attributes:
        stats: value name -> :class:`ValueStats`.
        values: the measured values, in graph order.
        groups: the value groups, one pass over the data each.
        runs: ONNX Runtime runs made so far (including those of :meth:`samples`).
        peak_bytes: most output bytes fetched by one run.

    Raises:
        CalibrationError: ``ctx.calib`` is missing or does not fit the model.
        EdgeoptError: an unknown or non-float value, or ONNX Runtime failed.
    """

    #: Models with more weight bytes than this are exported to a temporary file.
    INLINE_LIMIT = 256 << 20

    def __init__(self, model: Model, ctx: Any, values: Iterable[str] | None = None,
                 batch_size: int = 8, max_bytes: int = 512 << 20, bins: int = 2048,
                 channels: bool = True, hist_limit: int | None = None) -> None:
        if bins < 2 or bins % 2:
            raise ValueError(f"bins must be an even number >= 2, not {bins}")
        if batch_size < 1 or max_bytes < 1:
            raise ValueError("batch_size and max_bytes must be positive")
        self._model, self._version = model, model.version
        self._calib = _require_calib(ctx, model)
        self._progress = getattr(ctx, "progress", lambda *a: None)
        self.batch_size, self.max_bytes, self.bins = batch_size, max_bytes, bins
        self.channels, self.hist_limit = channels, hist_limit
        info = _infer(model, self._calib)
        self._dtypes = self._candidates(model, info)
        self._per_sample = self._sizes(info)
        self.values = self._select(values)
        self.runs = self.peak_bytes = 0
        self.groups: list[list[str]] = []
        self.stats: dict[str, ValueStats] = self._collect()

    # -- setup --------------------------------------------------------------------------------
    @staticmethod
    def _candidates(model: Model, info: Mapping[str, tuple[Any, Any]]) -> dict[str, Any]:
        """Map every main-graph activation to its dtype: data inputs, then node outputs."""
        out: dict[str, Any] = {}
        values = [v for v in model.graph.inputs if not v.is_initializer()]
        values += [o for node in model.graph for o in node.outputs if o.name]
        for v in values:
            out[v.name] = v.dtype if v.dtype is not None else info.get(v.name, (None,))[0]
        return out

    def _sizes(self, info: Mapping[str, tuple[Any, Any]]) -> dict[str, float]:
        """Estimated bytes per sample of every candidate."""
        per_run = self._calib.fixed_batch or 1
        sizes: dict[str, float | None] = {}
        for name, dtype in self._dtypes.items():
            shape = info.get(name, (None, None))[1]
            known = dtype is not None and dtype.bitwidth and ir.shape_is_static(shape)
            sizes[name] = math.prod(shape) * dtype.itemsize / per_run if known else None
        for name, arr in self._calib.arrays.items():
            sizes[name] = arr.nbytes / self._calib.num_samples
        fallback = max((s for s in sizes.values() if s is not None), default=0.0)
        return {n: fallback if s is None else s for n, s in sizes.items()}

    def _select(self, values: Iterable[str] | None) -> tuple[str, ...]:
        if values is None:
            return tuple(n for n, t in self._dtypes.items() if t in FLOAT_TYPES)
        chosen = tuple(dict.fromkeys([values] if isinstance(values, str) else values))
        for name in chosen:
            self._check_known(name)
            if self._dtypes[name] not in FLOAT_TYPES:
                kind = "of unknown type" if self._dtypes[name] is None else \
                    self._dtypes[name].name.lower()
                raise EdgeoptError(f"Activations: value {name!r} is {kind}, not a float tensor")
        return chosen

    def _check_known(self, name: str) -> None:
        if name not in self._dtypes:
            raise EdgeoptError(f"Activations: no activation named {name!r} in the main graph")

    # -- running ------------------------------------------------------------------------------
    def _collect(self) -> dict[str, ValueStats]:
        calib = self._calib
        accs = {n: _Accumulator(n, self.bins, self.channels, self.hist_limit)
                for n in self.values}
        fed = [n for n in self.values if n in calib.arrays]  # graph inputs: no run needed
        exposed = [n for n in self.values if n not in calib.arrays]
        batch, self.groups = _plan(exposed, self._per_sample, self.max_bytes, self.batch_size,
                                   calib.fixed_batch)
        for feeds in calib.batches(batch):
            for name in fed:
                accs[name].update(feeds[name])
        runs_per_group = math.ceil(calib.num_samples / calib.samples_per_run(batch))
        total, done = len(self.groups) * runs_per_group, 0
        with contextlib.ExitStack() as stack:
            exported = stack.enter_context(_OrtModel(self._model, self.INLINE_LIMIT)) \
                if self.groups else None  # graph inputs alone need no export
            for group in self.groups:
                session = exported.session(group, self._dtypes)  # type: ignore[union-attr]
                for feeds in calib.batches(batch):
                    for name, arr in zip(group, self._run(session, group, feeds), strict=True):
                        accs[name].update(arr)
                    done += 1
                    self._progress("activations", done, total)
        log.info("Activations: %d values over %d samples in %d group(s), %d runs",
                 len(self.values), calib.num_samples, len(self.groups), self.runs)
        return {n: accs[n].result() for n in self.values}

    def _run(self, session: Any, names: Sequence[str],
             feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        outs = run_session(session, names, feeds, "Activations", self._calib.source)
        self.runs += 1
        self.peak_bytes = max(self.peak_bytes, sum(o.nbytes for o in outs))
        return outs

    # -- raw activations ----------------------------------------------------------------------
    def bytes_per_sample(self, name: str) -> float:
        """Bytes one calibration sample of value ``name`` takes (0 when unknown)."""
        return float(self._per_sample.get(name, 0.0))

    def samples(self, names: Iterable[str], n: int) -> dict[str, np.ndarray]:
        """Raw activations of ``names`` for the first ``n`` calibration samples.

        Whole runs are gathered while the result stays within ``max_bytes``, so fewer than
        ``n`` samples may come back (a warning says so). Runs are concatenated along axis 0,
        or stacked on a new axis 0 when each run feeds one unbatched sample.

        Raises:
            EdgeoptError: the model changed since the statistics were computed, a name is
                unknown, or a single run needs more than ``max_bytes``.
        """
        if self._model.version != self._version:
            raise EdgeoptError("Activations: the model changed since these activations were "
                               "computed; request the analysis again")
        names = list(dict.fromkeys([names] if isinstance(names, str) else names))
        for name in names:
            self._check_known(name)
        data = self._calib.subset(n)
        exposed = [x for x in names if x not in data.arrays]
        per_sample = sum(self._per_sample[x] for x in names)
        batch = _plan(["all"], {"all": per_sample}, self.max_bytes, self.batch_size,
                      data.fixed_batch)[0]
        chunks: dict[str, list[np.ndarray]] = {x: [] for x in names}
        used = 0
        with _OrtModel(self._model, self.INLINE_LIMIT) as exported:
            session = exported.session(exposed, self._dtypes) if exposed else None
            for feeds in data.batches(batch):
                outs = dict(zip(exposed, self._run(session, exposed, feeds), strict=True)) \
                    if exposed else {}
                got = {x: outs[x] if x in outs else feeds[x] for x in names}
                size = sum(a.nbytes for a in got.values())
                if used + size > self.max_bytes:
                    if not used:
                        raise EdgeoptError(f"Activations: one run of {names} needs {size} "
                                           f"bytes, more than max_bytes={self.max_bytes}")
                    log.warning("Activations: returning fewer than %d samples to stay within "
                                "max_bytes=%d", n, self.max_bytes)
                    break
                used += size
                for x in names:
                    chunks[x].append(got[x])
        join = np.stack if data.unbatched else np.concatenate
        return {x: join(parts, axis=0) for x, parts in chunks.items()}

    def sample(self, name: str, n: int) -> np.ndarray:
        """Raw activations of one value for the first ``n`` samples (see :meth:`samples`)."""
        return self.samples([name], n)[name]

    def __repr__(self) -> str:
        return (f"Activations({len(self.values)} values, {self._calib.num_samples} samples, "
                f"{self.runs} runs)")
