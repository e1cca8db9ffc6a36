"""``Activations``: per-value statistics from running the model on the calibration data.

Later passes (importance, recovery, quantization) read these instead of rerunning the model:
request them with ``ctx.analysis(Activations)``; the pass manager caches the object until a
pass modifies the model.

How it runs. The model is exported once (:class:`~.ort_model.OrtModel`: in memory, weights
handed to ONNX Runtime without a copy; models whose weights pass ``Activations.INLINE_LIMIT``
bytes go to a temporary folder with external data), the chosen values are added as extra graph
outputs of that copy, and ONNX Runtime (CPU) runs it over ``ctx.calib`` in batches. The IR
model itself is never touched.

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

Light statistics (``moments=False``; what quantization calibrates from). Instead of exposing
each value as a graph output, the exported copy computes small reductions in the graph, per
value: ``Shape`` (the element count), ``ReduceMin`` and ``ReduceMax`` over all axes (no
``axes``, which means every axis in every opset), with ``channels`` a ``ReduceMean`` over
every axis but 1 (``axes`` an attribute before opset 18, an input from 18), and for the
histogram a strided sample of the flattened value: ``Reshape`` to ``[-1]``, then ``Slice``
with a step from the value's static size in a run, the smallest one that keeps at most
``hist_limit`` elements and is coprime with the size (a step sharing a factor with the inner
dims would sample the same columns every time). Only these small outputs leave ONNX Runtime,
so one pass over the data covers every value, and the session gets ONNX Runtime's full graph
optimizations (faster kernels: the values are the graph's up to float rounding, which deep
networks compound, to about 1e-4 of the range at the end of ResNet-50). ``count``, ``min``
and ``max`` are exact; the histogram counts the samples, over edges spanning the exact
``[min, max]``; ``channel_mean`` sums each run's means (in the value's type) in float64;
``mean``, ``mean_abs`` and ``zero_fraction`` are NaN, ``channel_mean_abs`` and
``channel_zero_fraction`` None, ``nonfinite`` 0. When the size is unknown, the opset is below
10 (no ``Slice`` steps) or ``hist_limit`` is None, the whole value is fetched for the
histogram (and strided in numpy the same way). Non-finite elements: ONNX Runtime's
``ReduceMin``/``ReduceMax`` pass infinities on but skip NaN except in the first element. A
value whose min, max, channel means or sample is not finite in some run is measured again in
full mode (its non-finite elements are then counted and left out, and its moments filled
in); a NaN that all of these miss is left out of min and max, as in full mode, but counted
in ``count`` rather than ``nonfinite``.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from edgeopt import ir
from edgeopt.ir import DataType, EdgeoptError, Model

from ..calib import CalibrationData, CalibrationError
from .ort_model import OrtModel, _Taps, run_session
from .value_stats import ValueStats, Window, _Accumulator, _Extremes, _stride, tap_sums

__all__ = ["Activations", "ValueStats", "Window", "run_session"]


log = logging.getLogger(__name__)

FLOAT_TYPES = frozenset({DataType.FLOAT, DataType.FLOAT16, DataType.DOUBLE})


def _opset(model: Model) -> int:
    """The model's default-domain opset (0 without one)."""
    return model.opset_imports.get("", model.opset_imports.get("ai.onnx", 0))


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


def _infer(model: Model, calib: CalibrationData, batch: int = 1
           ) -> dict[str, tuple[Any, Any]]:
    """Map each main-graph activation to (dtype, shape), with inputs fixed to one run.

    The run is the first of ``calib.batches(batch)``. When the model's inputs already have
    that run's shapes and every activation a static shape, those are used as they are.
    """
    feeds = next(calib.batches(batch))
    inputs = [v for v in model.graph.inputs if not v.is_initializer()]
    fixed = {v.name: feeds[v.name].shape for v in inputs if v.name in feeds}
    outputs = [o for node in model.graph for o in node.outputs if o.name]
    if all(tuple(v.shape or ()) == fixed.get(v.name) for v in inputs) and \
            all(ir.shape_is_static(o.shape) and o.dtype is not None for o in outputs):
        clone = model  # nothing to infer
    else:
        clone = model.clone()
        try:
            ir.static_shapes(clone, fixed)
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
        channels: compute the per-channel statistics (``channel_*``; None when False): True
            for every value, or a tuple of the names of the values that need them.
        channel_samples: per-channel statistics over the first calibration samples only, in
            whole runs (at least one); None: all. :attr:`channel_samples` says how many.
        taps: ``(value, Window)`` pairs whose :attr:`tap_means` are wanted (light statistics
            only; over the ``channel_samples``; values of 1 or 2 spatial axes).
        hist_limit: histogram at most this many elements of a value per run, an even stride
            through it (min, max, mean and counts still see every element); None: all;
            0: no histogram at all (``hist`` and ``hist_edges`` raise ValueError).
        moments: full statistics (True), or light ones (False): exact min, max and count, a
            histogram of a sample and, with ``channels``, the per-channel means, computed
            inside the graph in one pass; no moments (see the module docs).

    Attributes:
        stats: value name -> :class:`ValueStats`.
        values: the measured values, in graph order.
        groups: the value groups, one pass over the data each.
        runs: ONNX Runtime runs made so far (including those of :meth:`samples`).
        peak_bytes: most output bytes fetched by one run.
        channel_samples: the calibration samples the per-channel statistics cover.
        tap_means: ``(value, Window)`` -> ``[C, *kernel]``: per channel and kernel tap, the
            mean over samples and output positions of the element the tap reads (0 where it
            reads padding; :meth:`Window.of_conv`), so a Conv's mean output is exactly
            ``sum(W * tap_means) + b``. Left out for values of unknown size or with
            non-finite elements.

    Raises:
        ValueError: bad parameters.
        CalibrationError: ``ctx.calib`` is missing or does not fit the model.
        EdgeoptError: an unknown or non-float value, or ONNX Runtime failed.
    """

    #: Models with more weight bytes than this are exported to a temporary file.
    INLINE_LIMIT = 256 << 20

    def __init__(self, model: Model, ctx: Any, values: Iterable[str] | None = None,
                 batch_size: int = 8, max_bytes: int = 512 << 20, bins: int = 2048,
                 channels: bool | tuple[str, ...] = True, hist_limit: int | None = None,
                 moments: bool = True, channel_samples: int | None = None,
                 taps: tuple[tuple[str, Window], ...] = ()) -> None:
        if bins < 2 or bins % 2:
            raise ValueError(f"bins must be an even number >= 2, not {bins}")
        if batch_size < 1 or max_bytes < 1:
            raise ValueError("batch_size and max_bytes must be positive")
        if hist_limit is not None and hist_limit < 0:
            raise ValueError(f"hist_limit must be >= 0 or None, not {hist_limit}")
        if channel_samples is not None and channel_samples < 1:
            raise ValueError(f"channel_samples must be >= 1 or None, not {channel_samples}")
        if taps and moments:
            raise ValueError("taps need light statistics (moments=False)")
        self.moments = moments
        self._model, self._version = model, model.version
        self._calib = _require_calib(ctx, model)
        self._progress = getattr(ctx, "progress", lambda *a: None)
        self.batch_size, self.max_bytes, self.bins = batch_size, max_bytes, bins
        self.channels, self.hist_limit = channels, hist_limit
        info = self._info = _infer(model, self._calib)
        self._dtypes = self._candidates(model, info)
        self._per_sample = self._sizes(info)
        self.values = self._select(values)
        if not isinstance(channels, bool):
            for name in channels:
                self._check_known(name)
        self._channel_limit = channel_samples
        self.channel_samples = 0
        for name, _ in taps:
            self._check_known(name)
        self._taps = tuple(dict.fromkeys(taps))
        self._tap_sums: dict[tuple[str, Window], list[Any]] = {}
        self.runs = self.peak_bytes = 0
        self.groups: list[list[str]] = []
        self.stats: dict[str, ValueStats] = self._collect()
        self.tap_means = {k: total / count for k, (total, count) in self._tap_sums.items()
                          if total is not None and count}

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

    def _wants_channels(self, name: str) -> bool:
        return self.channels if isinstance(self.channels, bool) else name in self.channels

    def _channel_runs(self, batch: int) -> int:
        """Leading runs of ``batch`` whose per-channel statistics count (``channel_samples``)."""
        total = self._calib.num_samples
        per_run = self._calib.samples_per_run(batch)
        if self._channel_limit is None or self._channel_limit >= total:
            self.channel_samples = total
            return math.ceil(total / per_run)  # every run, the last one maybe partial
        runs = max(1, self._channel_limit // per_run)
        self.channel_samples = min(total, runs * per_run)
        return runs

    # -- running ------------------------------------------------------------------------------
    def _collect(self) -> dict[str, ValueStats]:
        if self.moments:
            return self._collect_full(self.values)
        stats, redo = self._collect_light(self.values)
        if redo:
            log.info("Activations: %d value(s) with non-finite elements measured in full: %s",
                     len(redo), ", ".join(redo))
            stats.update(self._collect_full(redo))
        return {n: stats[n] for n in self.values}

    def _collect_full(self, names: Sequence[str]) -> dict[str, ValueStats]:
        calib = self._calib
        accs = {n: _Accumulator(n, self.bins, self._wants_channels(n), self.hist_limit)
                for n in names}
        fed = [n for n in names if n in calib.arrays]  # graph inputs: no run needed
        exposed = [n for n in names if n not in calib.arrays]
        batch, groups = _plan(exposed, self._per_sample, self.max_bytes, self.batch_size,
                              calib.fixed_batch)
        self.groups += groups
        head = self._channel_runs(batch)
        for i, feeds in enumerate(calib.batches(batch)):
            for name in fed:
                accs[name].update(feeds[name], channels=i < head)
        runs_per_group = math.ceil(calib.num_samples / calib.samples_per_run(batch))
        total, done = len(groups) * runs_per_group, 0
        with contextlib.ExitStack() as stack:
            exported = stack.enter_context(OrtModel(self._model, self.INLINE_LIMIT)) \
                if groups else None  # graph inputs alone need no export
            for group in groups:
                session = exported.session(group, self._dtypes)  # type: ignore[union-attr]
                for i, feeds in enumerate(calib.batches(batch)):
                    for name, arr in zip(group, self._run(session, group, feeds), strict=True):
                        accs[name].update(arr, channels=i < head)
                    done += 1
                    self._progress("activations", done, total)
        log.info("Activations: %d values over %d samples in %d group(s), %d runs",
                 len(names), calib.num_samples, len(groups), self.runs)
        return {n: accs[n].result() for n in names}

    def _collect_light(self, names: Sequence[str]) -> tuple[dict[str, ValueStats], list[str]]:
        """Light statistics of ``names``, and the values with non-finite elements."""
        calib = self._calib
        accs = {n: _Extremes(n, self.bins, self.hist_limit, self._wants_channels(n))
                for n in names}
        bad: set[str] = set()
        fed = [n for n in names if n in calib.arrays]
        exposed = [n for n in names if n not in calib.arrays]
        batch, groups = _plan(exposed, {n: self._light_bytes(n) for n in exposed},
                              self.max_bytes, self.batch_size, calib.fixed_batch)
        self.groups += groups
        strides, ranks = self._light_outputs(exposed, batch)
        taps = self._tap_outputs(names, batch)
        head = self._channel_runs(batch)
        for i, feeds in enumerate(calib.batches(batch)):
            for name in fed:
                if name not in bad and not accs[name].update_array(feeds[name], i < head):
                    bad.add(name)
                for j, (_, mats, _) in enumerate(taps.get(name, ()) if i < head else ()):
                    self._add_taps(name, taps, j, tap_sums(feeds[name], mats), feeds[name].shape)
        runs_per_group = math.ceil(calib.num_samples / calib.samples_per_run(batch))
        total, done = len(groups) * runs_per_group, 0
        with contextlib.ExitStack() as stack:
            exported = stack.enter_context(OrtModel(self._model, self.INLINE_LIMIT)) \
                if groups else None
            for group in groups:
                session, outputs = exported.light_session(  # type: ignore[union-attr]
                    group, strides, ranks, taps)
                for i, roles, out in self._light_runs(session, outputs, group, batch, head):
                    got = iter(out)
                    for name in group:
                        parts = {role: next(got) for role in roles[name]}
                        for j in range(len(taps.get(name, ())) if i < head else 0):
                            self._add_taps(name, taps, j, parts.pop(f"tap{j}"), parts["shape"])
                        if name not in bad and not accs[name].update(**parts,
                                                                      channels=i < head):
                            bad.add(name)
                    done += 1
                    self._progress("activations", done, total)
        log.info("Activations: light statistics of %d values over %d samples in %d group(s), "
                 "%d runs", len(names), calib.num_samples, len(groups), self.runs)
        return {n: accs[n].result() for n in names}, [n for n in names if n in bad]

    def _light_runs(self, session: Any, outputs: Mapping[str, Mapping[str, str]],
                    group: Sequence[str], batch: int, head: int
                    ) -> Iterator[tuple[int, dict[str, list[str]], list[np.ndarray]]]:
        """``(run, roles fetched per value, outputs)`` of each run of a light session.

        Past the ``head`` runs, the channel means and tap sums are not fetched. The next run
        computes in ONNX Runtime (which releases the GIL) while the caller counts this one.
        """
        def roles(i: int) -> dict[str, list[str]]:
            return {name: [r for r in outputs[name] if i < head or not (
                r == "channel_mean" or r.startswith("tap"))] for name in group}

        with ThreadPoolExecutor(1) as pool:
            ahead = None
            for i, feeds in enumerate(self._calib.batches(batch)):
                fetched = roles(i)
                job = pool.submit(self._run, session, [outputs[name][r] for name in group
                                                       for r in fetched[name]], feeds)
                if ahead is not None:
                    yield ahead[0], ahead[1], ahead[2].result()
                ahead = (i, fetched, job)
            if ahead is not None:
                yield ahead[0], ahead[1], ahead[2].result()

    def _light_outputs(self, names: Sequence[str], batch: int
                       ) -> tuple[dict[str, int], dict[str, int]]:
        """What :meth:`OrtModel.light_session` computes for ``names`` in runs of ``batch``.

        Strides: the histogram sample stride of each value, from its static size in such a
        run; 1 (the whole value) when that is unknown, ``hist_limit`` is None or the opset
        has no ``Slice`` steps; none without histogram. Ranks: those (>= 2) of the values
        whose per-channel means are computed, when ``channels``.
        """
        calib = self._calib
        info = self._info if calib.samples_per_run(batch) == calib.samples_per_run(1) else \
            _infer(self._model, calib, batch)
        shapes = {n: info.get(n, (None, None))[1] for n in names}
        ranks = {n: len(s) for n, s in shapes.items()
                 if s is not None and len(s) >= 2 and self._wants_channels(n)}
        if self.hist_limit == 0:
            return {}, ranks
        limit = self.hist_limit
        sliced = limit is not None and _opset(self._model) >= 10
        strides = {n: _stride(math.prod(s), limit)  # type: ignore[arg-type]
                   if sliced and ir.shape_is_static(s) else 1 for n, s in shapes.items()}
        return strides, ranks

    def _tap_outputs(self, names: Sequence[str], batch: int) -> _Taps:
        """The windows of :attr:`tap_means` among ``names``, with their tap matrices."""
        wanted = [(n, w) for n, w in self._taps if n in names]
        if not wanted:
            return {}
        calib = self._calib
        info = self._info if calib.samples_per_run(batch) == calib.samples_per_run(1) else \
            _infer(self._model, calib, batch)
        out: dict[str, list[tuple[Window, list[np.ndarray], int]]] = {}
        for name, win in wanted:
            shape, dtype = info.get(name, (None, None))[1], self._dtypes.get(name)
            if not ir.shape_is_static(shape) or len(shape) - 2 not in (1, 2) or \
                    len(win.kernel) != len(shape) - 2 or dtype not in FLOAT_TYPES:
                continue
            mats, positions = win.matrices(shape[2:])
            out.setdefault(name, []).append(
                (win, [m.astype(dtype.numpy()) for m in mats], positions))
        return out

    def _add_taps(self, name: str, taps: _Taps, j: int, sums: np.ndarray,
                  shape: Sequence[int]) -> None:
        """Add one run's tap sums of window ``j`` of ``name`` (NaN or inf: left out)."""
        win, _, positions = taps[name][j]
        entry = self._tap_sums.setdefault((name, win), [0.0, 0])
        sums = np.asarray(sums, np.float64)
        if entry[0] is None or not np.all(np.isfinite(sums)):
            entry[0] = None
            return
        entry[0] = entry[0] + sums
        entry[1] += int(shape[0]) * positions

    def _light_bytes(self, name: str) -> float:
        """Bytes per sample light statistics fetch of ``name`` (at most; for ``_plan``)."""
        full = self._per_sample[name]
        if self.hist_limit == 0:
            return min(full, 64.0)
        if self.hist_limit is None or _opset(self._model) < 10 or \
                not ir.shape_is_static(self._info.get(name, (None, None))[1]):
            return full  # the whole value is fetched
        dtype = self._dtypes.get(name)
        return min(full, 64 + self.hist_limit * (dtype.itemsize if dtype is not None else 8))

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
        with OrtModel(self._model, self.INLINE_LIMIT) as exported:
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
