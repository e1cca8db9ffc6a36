"""Recovery without retraining: the numerics the ``prune`` pass calls (issue 4, point 4).

Pure numpy/scipy functions (nothing here touches the IR) for a *consumer*: a Gemm, MatMul or
Conv whose input lost channels (only the input channels ``keep`` survive, ``removed`` go).
:func:`bias_compensation` folds the removed channels' mean contribution into its bias;
:func:`least_squares_refit` re-solves its weights over the kept channels to match the unpruned
output on calibration data; :func:`reestimate_batchnorm` / :func:`match_batchnorm` give the
statistics of a BatchNormalization after a pruned or refit layer (those two, :class:`LayerSpec`,
:func:`im2col` and :func:`layer_output` live in :mod:`._layer_ops` and are re-exported here).

Layouts: a Gemm/MatMul weight is ``[in, out]`` (``layout="in_out"``: MatMul, Gemm transB=0) or
``[out, in]`` (``"out_in"``: Gemm transB=1); a Conv weight is ``[out, in, *kernel]`` (group 1).
Describe the consumer with :class:`LayerSpec`, usually ``LayerSpec.from_onnx(op_type, attrs)``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
from threadpoolctl import threadpool_limits

from ._layer_ops import (
    LayerSpec,
    _float_dtype,
    _gather_patches,
    _patch_view,
    im2col,
    layer_output,
    match_batchnorm,
    reestimate_batchnorm,
)

__all__ = ["Clamp", "LayerSpec", "bias_compensation", "depthwise_refit", "im2col", "layer_output",
           "least_squares_refit", "match_batchnorm", "reconstruction_error",
           "reestimate_batchnorm", "saturation_offset"]

Rows = Callable[[np.ndarray], np.ndarray]  # row indices -> design rows
#: Elements of float64 design-matrix data built at once (bounds memory; ~64 MB).
CHUNK_ELEMS = 1 << 23
#: Most bytes of design rows kept between saturation rounds of one refit.
ROUND_CACHE_BYTES = 512 << 20


# -- bias compensation -------------------------------------------------------------------------
def bias_compensation(weight: np.ndarray, bias: np.ndarray | None, removed: Sequence[int],
                      channel_means: np.ndarray, spec: LayerSpec) -> np.ndarray:
    """The consumer bias that absorbs the mean contribution of its removed input channels.

    Gemm/MatMul: ``bias + W[removed]^T @ mean[removed]`` (``[in, out]`` layout). Conv with
    per-channel means ``[C]``: ``bias + sum_{kernel} W[:, removed] * mean[removed]``; this is
    exact for removed channels constant over space only when the Conv has no zero padding
    (at the borders, padded taps see 0, not the mean). Conv with per-position means
    ``[C, *spatial]`` (e.g. ``x.mean(axis=0)``): the removed means are convolved with
    ``W[:, removed]`` including the padding, giving an exact *bias map* ``[out, *out_spatial]``
    to add after the Conv (its mean over positions is the best constant bias).

    Args:
        weight: the consumer's full weight (before slicing).
        bias: its bias (any shape broadcastable to ``[out]``), or None for zeros.
        removed: input channel (feature) indices being removed.
        channel_means: mean of every input channel, ``[C]``, or ``[C, *spatial]`` for Conv.
        spec: the consumer (see :class:`LayerSpec`).

    Returns:
        ``[out]`` (or ``[out, *out_spatial]``) in the weight's float dtype.
    """
    spec.check()
    w = np.asarray(weight, np.float64)
    means = np.asarray(channel_means, np.float64)
    removed = np.asarray(removed, np.int64)
    w = w.T if spec.layout == "out_in" else w
    n_in = w.shape[1] if spec.kind == "conv" else w.shape[0]
    if means.shape[0] != n_in:
        raise ValueError(f"channel_means has {means.shape[0]} channels, the weight reads {n_in}")
    if spec.kind == "gemm":
        delta = w[removed].T @ means[removed]
        n_out = w.shape[1]
    else:
        n_out = w.shape[0]
        wr = w[:, removed]
        if means.ndim == 1:
            delta = wr.reshape(n_out, len(removed), -1).sum(axis=2) @ means[removed]
        else:
            view = _patch_view(means[removed][None], w.shape[2:], spec)
            cols = _gather_patches(view, np.arange(math.prod(view.shape[2:2 + w.ndim - 2])))
            delta = (cols @ wr.reshape(n_out, -1).T).T.reshape(n_out, *view.shape[2:w.ndim])
    b = np.zeros(n_out) if bias is None else \
        np.broadcast_to(np.asarray(bias, np.float64).ravel(), n_out)  # Gemm C may be [1, out]
    b = b.reshape(n_out, *[1] * (delta.ndim - 1))
    return (b + delta).astype(_float_dtype(weight))




# -- least-squares refit -----------------------------------------------------------------------
#: Default ridge strengths tried (relative to the mean variance of the input columns); the one
#: with the smallest error on the held-out samples wins.
RIDGES = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)


@dataclass
class _Moments:
    """Centered sums over some design rows: enough to solve and score any ``(W, b)``.

    With fewer rows than inputs (a wide Gemm on few samples) the centered rows themselves
    are kept too (``xc``, ``yc``): solving and scoring through them costs ``n d out`` instead
    of ``d^2 out`` (see :func:`_solve`).
    """

    n: int
    mx: np.ndarray   # mean of the regression inputs [d]
    my: np.ndarray   # mean of the targets [out]
    axx: np.ndarray  # centered X^T X [d, d]
    axy: np.ndarray  # centered X^T Y [d, out]
    yy: float        # centered ||Y||^2
    y_norm2: float   # ||Y||^2
    xc: np.ndarray | None = None  # centered inputs [n, d] (only when n < d)
    yc: np.ndarray | None = None  # centered targets [n, out]

    def err2(self, w: np.ndarray, b: np.ndarray) -> float:
        """``||X w + b - Y||_F^2`` over the rows."""
        shift = self.mx @ w + b - self.my
        if self.xc is not None:
            r = self.xc @ w - self.yc
            e = float(np.sum(r * r))
        else:
            e = np.sum(w * (self.axx @ w)) - 2 * np.sum(w * self.axy) + self.yy
        return max(float(e + self.n * shift @ shift), 0.0)

    def rel_err(self, w: np.ndarray, b: np.ndarray) -> float:
        """``||X w + b - Y||_F / ||Y||_F`` (0 when both are 0)."""
        return math.sqrt(self.err2(w, b)) / max(math.sqrt(self.y_norm2), 1e-300)

    def bias_for(self, w: np.ndarray) -> np.ndarray:
        """The least-squares bias for weights ``w``."""
        return self.my - self.mx @ w

    def merge(self, o: _Moments) -> _Moments:
        """The moments of both row sets (Chan's parallel update)."""
        n = self.n + o.n
        dx, dy, f = o.mx - self.mx, o.my - self.my, self.n * o.n / n
        mx, my = self.mx + dx * o.n / n, self.my + dy * o.n / n
        xc = yc = None
        if self.xc is not None and o.xc is not None and n < len(mx):
            xc = np.concatenate([self.xc + (self.mx - mx), o.xc + (o.mx - mx)])
            yc = np.concatenate([self.yc + (self.my - my), o.yc + (o.my - my)])
        return _Moments(n, mx, my, self.axx + o.axx + f * np.outer(dx, dx),
                        self.axy + o.axy + f * np.outer(dx, dy),
                        self.yy + o.yy + f * float(dy @ dy), self.y_norm2 + o.y_norm2,
                        xc, yc)


@dataclass
class _Design:
    """Row access to the regression problem: full inputs, regression inputs, targets."""

    full: Rows              # row indices -> full-input design rows (float32 or float64)
    pruned: Rows | None     # rows of the pruned model's inputs, None = kept columns of full
    cols: np.ndarray        # kept columns of the full design
    w2: np.ndarray          # full weight as [C * K, out]
    b0: np.ndarray          # full bias [out]
    total: int              # rows in all
    per_sample: int         # consecutive rows per calibration sample
    offset: Rows | None = None  # row indices -> what to add to the targets (None = 0)

    def moments(self, rows: np.ndarray, adjust: Callable[[np.ndarray, np.ndarray], np.ndarray]
                | None = None, gram: np.ndarray | None = None,
                cache: list[tuple[np.ndarray, np.ndarray]] | None = None) -> _Moments:
        """Accumulate the moments of ``rows`` chunk by chunk.

        Sums are taken around the first chunk's means, which avoids the cancellation of
        ``X^T X - n m m^T`` for inputs far from zero (post-ReLU activations). The targets
        (the unpruned layer's output) are computed in the precision of the inputs, as the
        model itself computes them: float32 activations give float32 targets, at half the
        cost of the largest product; the moments and everything after are float64.

        ``adjust(y, x)`` (optional) replaces each chunk's targets (float64, offset applied)
        given its regression inputs; ``gram`` (optional) is the centered ``X^T X`` of these
        same rows from an earlier call, which is then not accumulated again. ``cache``
        (optional, a list): when empty it is filled with each chunk's ``(targets, inputs)``
        (before ``adjust``); when filled, those are used instead of recomputing the rows.
        """
        step = max(1, CHUNK_ELEMS // max(self.w2.shape[0] + self.w2.shape[1], 1))
        sx = sy = None
        n, axx, axy, sum_x, sum_y, yy, y_norm2 = 0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0
        cached = bool(cache)
        keep_rows = len(rows) < len(self.cols)  # few rows: keep them (see _Moments)
        xs: list[np.ndarray] = []
        ys: list[np.ndarray] = []
        for k, i in enumerate(range(0, len(rows), step)):
            r = rows[i:i + step]
            if cached:
                y, xk = cache[k]  # type: ignore[index]
            else:
                y, xk = self._rows(r)
                if cache is not None:
                    cache.append((y, xk))
            if adjust is not None:
                y = adjust(y, xk)
            if sx is None:
                sx, sy = xk.mean(axis=0), y.mean(axis=0)
            y_norm2 += float(np.sum(y * y))
            xk, y = xk - sx, y - sy
            if keep_rows:
                xs.append(xk)
                ys.append(y)
            n += len(r)
            axx = axx + xk.T @ xk if gram is None else axx
            axy = axy + xk.T @ y
            sum_x, sum_y = sum_x + xk.sum(axis=0), sum_y + y.sum(axis=0)
            yy += float(np.sum(y * y))
        mx, my = sum_x / n, sum_y / n
        xc = np.concatenate(xs) - mx if keep_rows else None
        yc = np.concatenate(ys) - my if keep_rows else None
        return _Moments(n, mx + sx, my + sy,
                        axx - n * np.outer(mx, mx) if gram is None else gram,
                        axy - n * np.outer(mx, my), yy - n * float(my @ my), y_norm2,
                        xc, yc)


    def _rows(self, r: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(targets, regression inputs)`` of design rows ``r``, float64."""
        xf = self.full(r)
        # The targets in the rows' precision, as the model computes them.
        y = (xf @ self.w2.astype(xf.dtype, copy=False)).astype(np.float64) + self.b0
        if self.offset is not None:
            y = y + self.offset(r)
        xk = (xf[:, self.cols] if self.pruned is None else self.pruned(r)).astype(np.float64)
        return y, xk


def _row_source(x: np.ndarray, kernel: Sequence[int], spec: LayerSpec, channels: int
                ) -> tuple[Rows, int, int]:
    """(fn(row indices) -> design rows, total rows, rows per sample) of ``x``.

    Rows are float32 for float32 ``x``, float64 otherwise.
    """
    dt = np.float32 if x.dtype == np.float32 else np.float64
    got = x.shape[-1] if spec.kind == "gemm" else x.shape[1] if x.ndim > 1 else -1
    if got != channels:
        raise ValueError(f"inputs of shape {x.shape} do not have {channels} channels on the "
                         f"{'last' if spec.kind == 'gemm' else 'second'} axis")
    if spec.kind == "gemm":
        flat = x.reshape(-1, x.shape[-1])
        per = math.prod(x.shape[1:-1]) if x.ndim > 2 else 1
        return (lambda r: flat[r].astype(dt)), flat.shape[0], per
    view = _patch_view(x, kernel, spec)
    per = math.prod(view.shape[2:2 + len(kernel)])
    return (lambda r: _gather_patches(view, r).astype(dt, copy=False)), view.shape[0] * per, per


def _split(d: _Design, max_rows: int, holdout: float, seed: int
           ) -> tuple[np.ndarray, np.ndarray]:
    """(fit rows, held-out rows) of a seeded subset of at most ``max_rows`` rows.

    Split by calibration sample (the positions of one image are correlated), or by row when
    there is a single sample.
    """
    rng = np.random.default_rng(seed)
    rows = np.arange(d.total) if d.total <= max_rows else \
        np.sort(rng.choice(d.total, max_rows, replace=False))
    groups = d.total // d.per_sample
    if groups < 2:
        groups, owner = len(rows), np.arange(len(rows))
    else:
        owner = rows // d.per_sample
    k = min(groups - 1, round(holdout * groups))
    if holdout <= 0 or k < 1:
        return rows, rows[:0]
    held = np.isin(owner, rng.choice(groups, k, replace=False))
    if held.all() or not held.any():  # the subset missed a side: score in-sample
        return rows, rows[:0]
    return rows[~held], rows[held]


def _solve(m: _Moments, ridge: float) -> np.ndarray | None:
    """Ridge weights for the centered problem, or None if the system is unusable.

    The penalty of each column is ``ridge`` times its own variance (the ridge of the
    standardized problem), so a channel of small amplitude but large weight is not shrunk
    more than a loud one; columns with (almost) no variance get the floor
    ``ridge * 1e-6 * mean variance``.
    """
    import scipy.linalg  # 0.1 s to import: only when used

    d = m.axx.shape[0]
    diag = np.diagonal(m.axx)
    floor = max(1e-6 * float(diag.mean()) if d else 0.0, np.finfo(float).tiny)
    pen = ridge * np.maximum(diag, floor)
    if m.xc is not None and m.n < d and ridge > 0:
        # (X^T X + A)^-1 X^T Y = A^-1 X^T (I + X A^-1 X^T)^-1 Y: n x n instead of d x d
        xa = m.xc / pen
        inner = xa @ m.xc.T
        inner[np.diag_indices(m.n)] += 1.0
        try:
            w = xa.T @ scipy.linalg.solve(inner, m.yc, assume_a="pos", check_finite=False)
        except (np.linalg.LinAlgError, ValueError):
            return None
        return w if np.all(np.isfinite(w)) else None
    a = m.axx.copy()  # one d x d copy: the factor overwrites it
    a[np.diag_indices(d)] += pen
    try:
        # a is symmetric: its transpose is the Fortran-ordered array LAPACK factors in place
        # (a C-ordered one is first copied); the result is checked for finiteness below.
        factor = scipy.linalg.cho_factor(a.T, overwrite_a=True, check_finite=False)
        w = scipy.linalg.cho_solve(factor, m.axy, check_finite=False)
    except (np.linalg.LinAlgError, ValueError):
        return None
    return w if np.all(np.isfinite(w)) else None


def _choose(d: _Design, fit: _Moments, val: _Moments, ridges: Sequence[float]
            ) -> tuple[dict[str, Any], np.ndarray, np.ndarray]:
    """Score drop, bias and one refit per ridge on ``val``; return (report, w, b).

    The winner is refit on all rows (``fit`` merged with ``val``) before it is returned.
    """
    w_drop = d.w2[d.cols]
    errs = {"drop": val.rel_err(w_drop, d.b0), "bias": val.rel_err(w_drop, fit.bias_for(w_drop))}
    best_ridge, refit_err = None, math.inf
    for ridge in ridges:
        w = _solve(fit, ridge)
        err = math.inf if w is None else val.rel_err(w, fit.bias_for(w))
        if err < refit_err:
            best_ridge, refit_err = ridge, err
    method = "refit" if refit_err <= min(errs.values()) else min(errs, key=errs.__getitem__)
    every = fit.merge(val) if val.n and val is not fit else fit
    w_new = _solve(every, best_ridge) if method == "refit" else w_drop  # type: ignore[arg-type]
    if w_new is None:  # cannot happen for a system that was solvable on fewer rows; be safe
        method, w_new = "bias", w_drop
    b_new = d.b0 if method == "drop" else every.bias_for(w_new)
    report = {"rel_err_drop": errs["drop"], "rel_err_bias": errs["bias"],
              "rel_err_refit": refit_err if method == "refit" else errs[method],
              "method": method, "ridge": best_ridge if method == "refit" else None}
    return report, w_new, b_new


#: A saturation round that moves the weights by less than this (relative Frobenius norm) is
#: the last. The rounds converge geometrically (each moves the weights about half as far as
#: the one before on the digits models); the light ResNet-50 stops after one everywhere.
ROUND_TOL = 0.01


def _saturation_rounds(d: _Design, rows: np.ndarray, w: np.ndarray, b: np.ndarray,
                       clamp: Clamp, ridge: float, rounds: int
                       ) -> tuple[np.ndarray, np.ndarray, int]:
    """Re-solve up to ``rounds`` times with targets moved where the activation clips alike.

    Stops early once a round moves the weights by less than :data:`ROUND_TOL`. The rows'
    targets and inputs are kept between rounds when they fit in :data:`ROUND_CACHE_BYTES`
    (then a round costs two products instead of rebuilding them). Returns the weights, the
    bias and the rounds run.
    """
    gram = None
    width = len(d.cols) + d.w2.shape[1]
    cache: list[tuple[np.ndarray, np.ndarray]] | None = \
        [] if len(rows) * width * 8 <= ROUND_CACHE_BYTES else None
    done = 0
    for _ in range(rounds):
        def adjust(y: np.ndarray, x: np.ndarray, w: np.ndarray = w, b: np.ndarray = b
                   ) -> np.ndarray:
            return y + saturation_offset(y, x @ w + b, clamp, axis=-1)

        m = d.moments(rows, adjust, gram, cache)
        gram = m.axx
        w_next = _solve(m, ridge)
        if w_next is None:
            break
        moved = float(np.linalg.norm(w_next - w)) / max(float(np.linalg.norm(w)), 1e-30)
        w, b, done = w_next, m.bias_for(w_next), done + 1
        if moved < ROUND_TOL:
            break
    return w, b, done


_F = TypeVar("_F", bound=Callable[..., Any])


def _one_blas_thread(fn: _F) -> _F:
    """Run ``fn`` with BLAS/LAPACK limited to one thread.

    A refit is a chain of mid-sized BLAS and LAPACK calls (design products, one Cholesky
    factor per ridge). OpenBLAS's threads synchronize at every step of those and spin while
    they wait, which goes badly as soon as another process holds a core. The 53 refits of
    ResNet-50's ``prune:0.5`` on the 2-core machine (docs/BENCHMARKS.md, "pipeline time"):
    two threads 28.1-28.7 s idle, 68-133 s under a load of 3-6; one thread 26.3 s idle,
    30-32 s under load.
    """
    @functools.wraps(fn)
    def limited(*args: Any, **kwargs: Any) -> Any:
        with threadpool_limits(1, user_api="blas"):
            return fn(*args, **kwargs)

    return limited  # type: ignore[return-value]


@_one_blas_thread
def least_squares_refit(weight: np.ndarray, bias: np.ndarray | None, x_samples: np.ndarray,
                        keep: Sequence[int], spec: LayerSpec,
                        ridge: float | Sequence[float] = RIDGES, max_rows: int = 16384,
                        seed: int = 0, x_inputs: np.ndarray | None = None,
                        holdout: float = 0.25, y_offset: np.ndarray | None = None,
                        clamp: Clamp | None = None, rounds: int = 8
                        ) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Refit the consumer's weights over its kept input channels to match its unpruned output.

    Targets: the original layer's output on ``x_samples``. Inputs: ``x_samples[:, keep]``, or
    ``x_inputs`` (the kept channels as the *pruned* model computes them, so upstream errors
    get corrected too). One ridge regression with an unpenalized intercept for all outputs,
    in float64 on the normal equations; a Conv's rows are im2col patches (every output
    position of every sample), at most ``max_rows`` of them (a seeded subset).

    Model selection: candidates fitted without a ``holdout`` fraction of the samples are
    scored on it: *drop* (sliced weights, same bias), *bias* (sliced weights, least-squares
    bias = :func:`bias_compensation` for Gemm and unpadded Conv) and a *refit* per ridge. The
    winner is refit on all rows, so a refit that overfits (few samples, many kept channels)
    or fails is not used: never worse than dropping on held-out data.

    Args:
        weight: full consumer weight (layouts: see the module docs).
        bias: its bias (broadcastable to ``[out]``) or None.
        x_samples: full inputs: ``[..., C]`` for gemm (features last), ``[N, C, *spatial]``
            for Conv; float32 is fine (the targets are then computed in float32, as the
            model does; the normal equations are built and solved in float64).
        keep: sorted input channel indices that survive.
        spec: the consumer (see :class:`LayerSpec`).
        ridge: ridge strength(s), relative to the mean variance of the input columns.
        max_rows: most design rows used (samples x output positions).
        seed: seed of the row subset and of the held-out samples.
        x_inputs: optional pruned-model inputs with ``len(keep)`` channels, same rows.
        holdout: fraction of samples (rows, if there is one sample) held out; 0 scores
            in-sample.
        y_offset: optional correction added to the targets, shaped like the layer's full
            output (``[N, out, *out_spatial]`` for Conv, ``[..., out]`` for gemm), e.g. from
            :func:`saturation_offset`.
        clamp: the activation after the layer (see :class:`Clamp`), or None. With it, a
            refit is followed by up to ``rounds`` saturation rounds (fewer when they have
            converged, see :data:`ROUND_TOL`): on the same rows, wherever the
            target and the current fit land on the same clipped side, the target becomes the
            fit (:func:`saturation_offset`), and the weights are solved again with the same
            ridge. Only ``X^T Y`` is recomputed; the Gram matrix is reused.
        rounds: most saturation rounds (with ``clamp``).

    Returns:
        ``(weight_kept, bias, report)``: the weight over the kept channels in the original
        layout and dtype, the ``[out]`` bias, and ``{"rel_err_drop", "rel_err_bias",
        "rel_err_refit" (the returned method's), "method" ("refit" | "bias" | "drop"),
        "ridge", "rows", "rows_held_out"}`` (and "saturation_rounds", the rounds run, after
        a refit with ``clamp``); errors are ``||Y' - Y||_F / ||Y||_F`` on the held-out rows
        (all rows with ``holdout=0``) of the candidates fitted without them.
    """
    spec.check()
    keep = np.asarray(keep, np.int64)
    w = np.asarray(weight, np.float64)
    w2 = (w if spec.layout == "in_out" else w.T) if spec.kind == "gemm" else \
        w.reshape(w.shape[0], -1).T  # [C * K, out]
    kernel, per = w.shape[2:], math.prod(w.shape[2:])
    b0 = np.zeros(w2.shape[1]) if bias is None else \
        np.broadcast_to(np.asarray(bias, np.float64).ravel(), w2.shape[1])
    full, total, per_sample = _row_source(np.asarray(x_samples), kernel, spec, w2.shape[0] // per)
    pruned = None if x_inputs is None else \
        _row_source(np.asarray(x_inputs), kernel, spec, len(keep))[0]
    cols = (keep[:, None] * per + np.arange(per)).ravel()
    offset = None
    if y_offset is not None:
        off = np.asarray(y_offset)
        off = np.moveaxis(off, 1, -1) if spec.kind == "conv" else off
        off = off.reshape(-1, w2.shape[1])
        if len(off) != total:
            raise ValueError(f"y_offset has {len(off)} rows, the layer's output {total}")
        def offset(r: np.ndarray) -> np.ndarray:
            return off[r].astype(np.float64)

    design = _Design(full, pruned, cols, w2, b0, total, per_sample, offset)
    fit_rows, val_rows = _split(design, max_rows, holdout, seed)
    fit = design.moments(fit_rows)
    val = design.moments(val_rows) if len(val_rows) else fit
    ridges = (ridge,) if isinstance(ridge, (int, float)) else tuple(ridge)
    report, w_new, b_new = _choose(design, fit, val, ridges)
    if clamp is not None and rounds > 0 and report["method"] == "refit":
        w_new, b_new, report["saturation_rounds"] = _saturation_rounds(
            design, np.sort(np.concatenate([fit_rows, val_rows])), w_new, b_new, clamp,
            report["ridge"], rounds)
    report |= {"rows": len(fit_rows) + len(val_rows), "rows_held_out": len(val_rows)}
    dt = _float_dtype(weight)
    if spec.kind == "conv":
        w_out = w_new.T.reshape(w.shape[0], len(keep), *kernel)
    else:
        w_out = w_new if spec.layout == "in_out" else w_new.T
    return np.ascontiguousarray(w_out, dt), np.asarray(b_new, dt), report


#: :func:`least_squares_refit` without its own thread limit (for callers that hold one:
#: entering the limit costs about 1 ms, once per channel of a depthwise Conv otherwise).
_refit_1thread = least_squares_refit.__wrapped__  # type: ignore[attr-defined]


@_one_blas_thread
def depthwise_refit(weight: np.ndarray, bias: np.ndarray | None, x_samples: np.ndarray,
                    keep: Sequence[int], spec: LayerSpec, x_inputs: np.ndarray,
                    clamp: Clamp | None = None, rounds: int = 8
                    ) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Refit a depthwise Conv channel by channel to match its unpruned output.

    A depthwise Conv (``group`` = channels, one input channel per output) is pruned with its
    input's channel group, so it never loses an input it reads; but the kept channels it
    reads drift when the layers before it were pruned and refit. Each kept output channel
    ``keep[j]`` is a one-channel Conv: it is refit by :func:`least_squares_refit` (same model
    selection and saturation rounds) from ``x_inputs[:, j]`` (the pruned model's input) to
    the unpruned output, which reads ``x_samples[:, keep[j]]``.

    Args:
        weight: the unpruned weight ``[C, 1, *kernel]``.
        bias: its bias ``[C]`` or None.
        x_samples: the unpruned input ``[N, C, *spatial]``.
        keep: the kept channels (sorted indices into ``C``).
        spec: the Conv's geometry (``group`` left at 1: each channel is solved alone).
        x_inputs: the pruned model's input ``[N, len(keep), *spatial]``, same samples.
        clamp: the activation after the Conv over all ``C`` channels, or None.
        rounds: most saturation rounds (with ``clamp``).

    Returns:
        ``(weight [len(keep), 1, *kernel], bias [len(keep)], report)``; the report's
        ``rel_err_drop`` and ``rel_err_refit`` are means over the channels of each channel's
        held-out relative error, ``method`` is ``refit`` if any channel was refit.
    """
    w = np.asarray(weight)
    if w.ndim < 3 or w.shape[1] != 1:
        raise ValueError(f"a depthwise weight is [C, 1, *kernel], got {w.shape}")
    b = np.zeros(w.shape[0], _float_dtype(w)) if bias is None else np.asarray(bias).ravel()
    x_samples, x_inputs = np.asarray(x_samples), np.asarray(x_inputs)
    if x_inputs.shape[1] != len(keep):
        raise ValueError(f"x_inputs has {x_inputs.shape[1]} channels, keep {len(keep)}")
    ws, bs, drops, afters, methods = [], [], [], [], set()
    for j, c in enumerate(keep):
        cl = None if clamp is None else Clamp(clamp.scale[c:c + 1], clamp.shift[c:c + 1],
                                              clamp.lo, clamp.hi)
        wj, bj, rep = _refit_1thread(w[c:c + 1], b[c:c + 1], x_samples[:, c:c + 1], [0],
                                     spec, x_inputs=x_inputs[:, j:j + 1], clamp=cl,
                                     rounds=rounds)
        ws.append(wj)
        bs.append(bj)
        drops.append(rep["rel_err_drop"])
        afters.append(rep["rel_err_refit"])
        methods.add(rep["method"])
    n = max(len(keep), 1)
    report = {"rel_err_drop": float(sum(drops) / n), "rel_err_refit": float(sum(afters) / n),
              "method": "refit" if "refit" in methods else "bias" if "bias" in methods
              else "drop"}
    dt = _float_dtype(weight)
    return (np.concatenate(ws).astype(dt) if ws else w[:0].astype(dt),
            np.concatenate(bs).astype(dt) if bs else b[:0].astype(dt), report)


@_one_blas_thread
def reconstruction_error(weight: np.ndarray, bias: np.ndarray | None, x_samples: np.ndarray,
                         keep: Sequence[int], new_weight: np.ndarray, new_bias: np.ndarray,
                         spec: LayerSpec, max_rows: int = 16384, seed: int = 0
                         ) -> tuple[float, float]:
    """Relative output errors ``(drop, new)`` of a consumer whose inputs lost channels.

    ``drop`` is the error of the sliced weights with the old bias, ``new`` that of
    ``(new_weight, new_bias)`` (over the kept channels, original layout), both as
    ``||Y' - Y||_F / ||Y||_F`` against the unpruned output on (a seeded subset of at most
    ``max_rows`` rows of) ``x_samples``.
    """
    spec.check()
    keep = np.asarray(keep, np.int64)
    w = np.asarray(weight, np.float64)
    w2 = (w if spec.layout == "in_out" else w.T) if spec.kind == "gemm" else \
        w.reshape(w.shape[0], -1).T
    nw = np.asarray(new_weight, np.float64)
    nw2 = (nw if spec.layout == "in_out" else nw.T) if spec.kind == "gemm" else \
        nw.reshape(nw.shape[0], -1).T
    per = math.prod(w.shape[2:]) if spec.kind == "conv" else 1
    b0 = np.zeros(w2.shape[1]) if bias is None else \
        np.broadcast_to(np.asarray(bias, np.float64).ravel(), w2.shape[1])
    full, total, per_sample = _row_source(np.asarray(x_samples), w.shape[2:], spec,
                                          w2.shape[0] // per)
    cols = (keep[:, None] * per + np.arange(per)).ravel()
    design = _Design(full, None, cols, w2, b0, total, per_sample)
    rows, _ = _split(design, max_rows, 0.0, seed)
    m = design.moments(rows)
    return m.rel_err(w2[cols], b0), m.rel_err(nw2, np.asarray(new_bias, np.float64).ravel())


# -- saturating activations ----------------------------------------------------------------------
@dataclass(frozen=True)
class Clamp:
    """The activation after a layer: ``clip(scale * y + shift, lo, hi)``.

    A per-channel affine map (a BatchNormalization, or the identity) then a clamp (Relu:
    ``lo=0, hi=inf``; Relu6: ``lo=0, hi=6``).
    """

    scale: np.ndarray
    shift: np.ndarray
    lo: float
    hi: float


def saturation_offset(y: np.ndarray, y_hat: np.ndarray, clamp: Clamp, axis: int = 1
                      ) -> np.ndarray:
    """Target corrections that stop a refit from chasing values the activation clips anyway.

    Where the unpruned output ``y`` and the refit output ``y_hat`` land on the same side of
    a clamp bound after ``clamp``'s affine map (both at or below ``lo``, or both at or above
    ``hi``), the network's output is already right: the correction ``y_hat - y`` makes the
    next least-squares fit (``least_squares_refit(..., y_offset=...)``) aim at ``y_hat``
    there, freeing its weights for the values that pass through. Elsewhere it is 0.
    Iterating refit and correction is a projected least-squares heuristic: each round is
    an exact fit to targets that the activation cannot tell from the original ones.

    Args:
        y: the unpruned layer's output, channels on ``axis``.
        y_hat: the refit layer's output on the pruned model's inputs, same shape.
        clamp: the activation after the layer (its channel count is ``y.shape[axis]``).
        axis: the channel axis.

    Returns:
        ``y_hat - y`` where both saturate the same way, else 0 (in the inputs' dtype).
    """
    shape = [1] * y.ndim
    shape[axis] = -1
    dtype = np.result_type(y, y_hat)
    a = np.asarray(clamp.scale, dtype).reshape(shape)
    b = np.asarray(clamp.shift, dtype).reshape(shape)
    u, u_hat = a * y + b, a * y_hat + b
    same = ((u <= clamp.lo) & (u_hat <= clamp.lo)) | ((u >= clamp.hi) & (u_hat >= clamp.hi))
    return np.where(same, y_hat - y, 0).astype(dtype)
