"""Least-squares correction of sparsified layers (``sparsify``'s ``refit`` option).

After ``sparsify`` zeroed weights, each layer that lost some is refit, per output row ``o``
with support ``S`` (its non-zero weights): ``w_S`` solves the ridge-regularized normal
equations ``(X_S^T X_S + ridge * diag) w_S = X_S^T y_o`` with an unpenalized intercept (the
bias; a MatMul, which has none, is fit without one). The targets ``y`` are the layer's output
in the original model; the inputs ``X`` are the layer's input in the sparsified model, whose
earlier levels are already refit (level by level, as ``prune``'s recovery does), so errors
made upstream are corrected downstream. A Conv's rows are im2col patches, a grouped
(depthwise) Conv is solved group by group on its group's input channels. The zero pattern
is kept exactly: only the support is solved for, and a weight whose input is 0 on every
calibration sample (which the solve sets to 0) keeps its value.

Per layer, the candidates are scored on held-out calibration samples (fitted without them):
*drop* (the sparse weights as they are), *bias* (least-squares bias only) and *refit* (with
the ridge strength that does best on up to :data:`RIDGE_ROWS` outputs). The best one is
kept and refit on all rows, so a layer is never worse than not refitting on the held-out
data. Supports are solved exactly (one Cholesky factor per output) when that is cheap, else
by batched conjugate gradients (:func:`_cg_rows`; ResNet-50's 3x3 layers of 4608 inputs).
The regression machinery (moments, row sources, the sample split) is
:mod:`edgeopt.passes.recovery`'s.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from edgeopt.ir import Model, Node

from ._base import Context
from ._layer_ops import LayerSpec
from ._prune_recover import _chunks, _set_bias
from ._util import NameGen, as_tensor, levels, replace_constant_input
from .analyses.activation_cache import ActivationCache
from .analyses.activations import Activations
from .recovery import RIDGES, _Design, _Moments, _one_blas_thread, _row_source, _split

__all__ = ["LayerInputs", "RefitLayer", "refit_layer", "refit_layers", "refit_sequential"]

log = logging.getLogger("edgeopt.passes.sparsify")


class LayerInputs:
    """Raw activations of one model on the calibration data, in requests that fit memory.

    Args:
        model: the model (read at every request, never modified).
        ctx: the pass context (``ctx.calib``).
        samples: calibration samples used (at most).
        share: how many such objects share the activation memory budget.
    """

    def __init__(self, model: Model, ctx: Context, samples: int, share: int = 1) -> None:
        self.sizes = Activations(model, ctx, values=())  # size estimates only
        self.cache = ActivationCache(model, ctx, samples, max_bytes=self.sizes.max_bytes // share)
        self.samples = samples
        self.share = share

    def chunks(self, names: list[str]) -> list[list[str]]:
        """``names`` split into requests that fit the budget."""
        return _chunks(self.sizes, names, self.samples, factor=self.share)

    def get(self, names: Sequence[str]) -> dict[str, np.ndarray]:
        """The activations of ``names`` (read-only arrays)."""
        return self.cache.get(names)


@dataclass(eq=False)
class RefitLayer:
    """A sparsified layer to refit.

    Attributes:
        node: the Conv, Gemm or MatMul node.
        spec: what it computes (group 1: a grouped Conv is refit group by group).
        group: its Conv groups (1 otherwise).
        w0: its weight before ``sparsify``.
        b0: its bias ``[out]`` before (None: none).
        intercept: whether the refit may set a bias (not for MatMul, which has none).
    """

    node: Node
    spec: LayerSpec
    group: int
    w0: np.ndarray
    b0: np.ndarray | None
    intercept: bool

    @property
    def input(self) -> str:
        return self.node.inputs[0].name  # type: ignore[union-attr]


def _layer(node: Node, w0: np.ndarray, model: Model) -> RefitLayer | str:
    """The refit description of ``node`` (weight ``w0`` before the pass), or why not."""
    x = node.inputs[0]
    if node.graph is not model.graph:
        return "it is inside a subgraph"
    if x is None or not x.name or x.const_value is not None:
        return "its input is a constant"
    try:
        spec = LayerSpec.from_onnx(node.op_type, {k: v for k, v in node.attrs.items()
                                                  if k != "group"})
    except ValueError as e:
        return str(e)
    bias = node.inputs[2] if len(node.inputs) > 2 else None
    b0 = None
    if bias is not None:
        if bias.const_value is None:
            return "its bias is not a constant"
        b0 = np.asarray(bias.const_value.numpy(), np.float64).ravel()
        if b0.size != _outputs_of(w0, spec):
            return "its bias is not one value per output"
    group = int(node.attr("group", 1)) if node.op_type == "Conv" else 1
    return RefitLayer(node, spec, group, w0, b0, node.op_type != "MatMul")


def refit_layers(model: Model, weights: list[tuple[list[Node], np.ndarray]]
                 ) -> list[RefitLayer]:
    """The layers among ``(readers, weight before)`` that can be refit; skips are logged."""
    layers = []
    for readers, w0 in weights:
        got = "the weight is shared by several layers" if len(readers) > 1 else \
            _layer(readers[0], w0, model)
        if isinstance(got, str):
            node = readers[0]
            log.info("sparsify: no refit for %s: %s", node.name or node.outputs[0].name, got)
        else:
            layers.append(got)
    return layers


def _outputs_of(w: np.ndarray, spec: LayerSpec) -> int:
    """How many outputs the layer of weight ``w`` has."""
    return w.shape[0] if spec.kind == "conv" or spec.layout == "out_in" else w.shape[1]


# -- the regression --------------------------------------------------------------------------------
#: Output rows (at most; a seeded subset of each block's) the ridge strength is chosen on.
RIDGE_ROWS = 64
#: Iterations of the batched conjugate-gradient solver, used instead of one factorization per
#: output row when those would cost more than this many products with the Gram matrix.
CG_ITERATIONS = 10
#: Relative residual norm at which the conjugate-gradient solver stops.
CG_TOLERANCE = 1e-4


def _to_rows(w: np.ndarray, spec: LayerSpec) -> np.ndarray:
    """The weight as ``[in terms, out]`` (float64): im2col columns or features by outputs."""
    w = np.asarray(w, np.float64)
    if spec.kind == "conv":
        return w.reshape(w.shape[0], -1).T
    return w if spec.layout == "in_out" else w.T


def _from_rows(w2: np.ndarray, spec: LayerSpec, shape: tuple[int, ...]) -> np.ndarray:
    if spec.kind == "conv":
        return w2.T.reshape(shape)
    return w2 if spec.layout == "in_out" else w2.T


def _uncentered(m: _Moments) -> _Moments:
    """The same sums about 0: a fit without intercept (its ``bias_for`` is 0)."""
    return _Moments(m.n, np.zeros_like(m.mx), np.zeros_like(m.my),
                    m.axx + m.n * np.outer(m.mx, m.mx), m.axy + m.n * np.outer(m.mx, m.my),
                    m.yy + m.n * float(m.my @ m.my), m.y_norm2)


def _excess(m: _Moments, w: np.ndarray, b: np.ndarray, outputs: np.ndarray) -> float:
    """``||X w + b - Y||^2`` over ``outputs`` (columns of ``w``), minus a constant of them."""
    shift = m.mx @ w + b - m.my[outputs]
    return float(np.sum(w * (m.axx @ w)) - 2 * np.sum(w * m.axy[:, outputs])
                 + m.n * shift @ shift)


def _cholesky_rows(a: np.ndarray, b: np.ndarray, support: np.ndarray) -> np.ndarray | None:
    """Exact solutions over each output's support: one Cholesky factor per output."""
    import scipy.linalg  # 0.1 s to import: only when used

    w = np.zeros(support.shape)
    for o in range(support.shape[1]):
        s = np.flatnonzero(support[:, o])
        if not s.size:
            continue
        try:
            factor = scipy.linalg.cho_factor(a[np.ix_(s, s)], overwrite_a=True,
                                             check_finite=False)
            w[s, o] = scipy.linalg.cho_solve(factor, b[s, o], check_finite=False)
        except (np.linalg.LinAlgError, ValueError):
            return None
    return w


def _cg_rows(a: np.ndarray, b: np.ndarray, support: np.ndarray, start: np.ndarray
             ) -> np.ndarray:
    """Jacobi-preconditioned conjugate gradients over each output's support, all at once.

    Every iteration is one product ``a @ p`` for all outputs; it starts from ``start`` (the
    sparse weights) and stops after :data:`CG_ITERATIONS`, or once every output's
    (preconditioned) residual norm fell by :data:`CG_TOLERANCE`. Stopping early regularizes
    too, like the ridge: on rank-deficient problems (fewer rows than inputs) 10-20
    iterations score as well on held-out rows as the exact solution, or better.
    """
    mask = support.astype(np.float64)
    diag = np.diagonal(a)[:, None]
    # A column without variance (a dead input) keeps its start value.
    inv = np.divide(1.0, diag, out=np.zeros_like(diag), where=diag > 1e-200)
    w = start * mask
    r = (b - a @ w) * mask
    z = r * inv
    p, rz = z, np.sum(r * z, axis=0)
    stop = CG_TOLERANCE ** 2 * rz
    for _ in range(CG_ITERATIONS):
        if not np.any(rz > stop):
            break
        ap = (a @ p) * mask
        curv = np.sum(p * ap, axis=0)
        alpha = np.divide(rz, curv, out=np.zeros_like(rz), where=curv > 0)
        w += alpha * p
        r -= alpha * ap
        z = r * inv
        rz_next = np.sum(r * z, axis=0)
        p = z + np.divide(rz_next, rz, out=np.zeros_like(rz), where=rz > 0) * p
        rz = rz_next
    return w


def _solve_rows(m: _Moments, support: np.ndarray, ridge: float, start: np.ndarray
                ) -> np.ndarray | None:
    """Ridge weights ``[in, out]`` over each output's support (zeros elsewhere), or None.

    The penalty of a column is ``ridge`` times its own variance (floored, as
    :func:`edgeopt.passes.recovery._solve`). Small supports are solved exactly; when the
    factorizations would cost more than :data:`CG_ITERATIONS` products with the Gram matrix,
    conjugate gradients from ``start`` are used instead.
    """
    diag = np.diagonal(m.axx)
    floor = max(1e-6 * float(diag.mean()) if diag.size else 0.0, np.finfo(float).tiny)
    a = m.axx.copy()
    a[np.diag_indices(diag.size)] += ridge * np.maximum(diag, floor)
    exact = float(np.sum(support.sum(axis=0).astype(np.float64) ** 3)) / 3
    batched = 2.0 * CG_ITERATIONS * diag.size ** 2 * support.shape[1]
    w = _cholesky_rows(a, m.axy, support) if exact <= batched else \
        _cg_rows(a, m.axy, support, start)
    return w if w is not None and np.all(np.isfinite(w)) else None


@dataclass
class _Piece:
    """One independent block of a layer: all of it, or one group of a grouped Conv."""

    fit: _Moments
    val: _Moments
    sparse: np.ndarray  # the sparse weight [in, out]
    b0: np.ndarray      # the bias before [out]

    @property
    def every(self) -> _Moments:
        """The moments of all rows (fit and held-out)."""
        return self.fit if self.val is self.fit else self.fit.merge(self.val)


def _piece(w0: np.ndarray, ws: np.ndarray, b0: np.ndarray, x_ref: np.ndarray,
           x_now: np.ndarray, spec: LayerSpec, intercept: bool, rows: tuple[int, float, int]
           ) -> _Piece:
    """Fit and held-out moments of one block; ``rows`` = (max rows, holdout, seed)."""
    w2, kernel = _to_rows(w0, spec), w0.shape[2:]
    channels = w0.shape[1] if spec.kind == "conv" else w2.shape[0]
    full, total, per_sample = _row_source(np.asarray(x_ref), kernel, spec, channels)
    now = _row_source(np.asarray(x_now), kernel, spec, channels)[0]
    design = _Design(full, now, np.arange(w2.shape[0]), w2, b0, total, per_sample)
    fit_rows, val_rows = _split(design, *rows)
    fit = design.moments(fit_rows)
    val = design.moments(val_rows) if len(val_rows) else fit
    if not intercept:
        same = val is fit
        fit = _uncentered(fit)
        val = fit if same else _uncentered(val)
    return _Piece(fit, val, _to_rows(ws, spec), b0)


def _pick_ridge(pieces: list[_Piece], ridges: Sequence[float], seed: int) -> float | None:
    """The ridge whose refit does best on the held-out rows, on up to RIDGE_ROWS outputs."""
    if len(ridges) == 1:
        return ridges[0]
    rng = np.random.default_rng(seed)
    subsets = [np.arange(n) if (n := p.sparse.shape[1]) <= RIDGE_ROWS else
               np.sort(rng.choice(n, RIDGE_ROWS, replace=False)) for p in pieces]
    best, best_err = None, math.inf
    for ridge in ridges:
        err = 0.0
        for p, idx in zip(pieces, subsets, strict=True):
            fit = _Moments(p.fit.n, p.fit.mx, p.fit.my[idx], p.fit.axx, p.fit.axy[:, idx],
                           0.0, 0.0)
            w = _solve_rows(fit, p.sparse[:, idx] != 0, ridge, p.sparse[:, idx])
            err = math.inf if w is None else err + _excess(p.val, w, fit.bias_for(w), idx)
            if w is None:
                break
        if err < best_err:
            best, best_err = ridge, err
    return best


def _candidates(pieces: list[_Piece], ridge: float | None, intercept: bool
                ) -> dict[str, list[tuple[np.ndarray, np.ndarray]]]:
    """Per candidate (``drop``, ``bias``, ``refit``), its ``(w, b)`` fitted per piece."""
    out = {"drop": [(p.sparse, p.b0) for p in pieces]}
    if intercept:
        out["bias"] = [(p.sparse, p.fit.bias_for(p.sparse)) for p in pieces]
    solved = [None if ridge is None else _solve_rows(p.fit, p.sparse != 0, ridge, p.sparse)
              for p in pieces]
    if all(w is not None for w in solved):
        out["refit"] = [(w, p.fit.bias_for(w)) for w, p in zip(solved, pieces, strict=True)]
    return out


def _final(pieces: list[_Piece], choice: str, fitted: list[tuple[np.ndarray, np.ndarray]],
           ridge: float | None) -> list[tuple[np.ndarray, np.ndarray]]:
    """The chosen candidate refit on all rows of every piece (``fitted``: on the fit rows)."""
    out = []
    for p, (w_fit, _) in zip(pieces, fitted, strict=True):
        every = p.every
        w = p.sparse if choice == "bias" else \
            _solve_rows(every, p.sparse != 0, ridge, w_fit)  # type: ignore[arg-type]
        w = w_fit if w is None else w  # solvable on fewer rows: should not happen
        out.append((w, every.bias_for(w)))
    return out


def _blocks(w0: np.ndarray, ws: np.ndarray, b0: np.ndarray, x_ref: np.ndarray,
            x_now: np.ndarray, group: int) -> list[tuple[np.ndarray, ...]]:
    """``(w0, ws, b0, x_ref, x_now)`` of each Conv group (the whole layer for group 1)."""
    if group == 1:
        return [(w0, ws, b0, x_ref, x_now)]
    outs, chans = w0.shape[0] // group, w0.shape[1]
    return [(w0[g * outs:(g + 1) * outs], ws[g * outs:(g + 1) * outs],
             b0[g * outs:(g + 1) * outs], x_ref[:, g * chans:(g + 1) * chans],
             x_now[:, g * chans:(g + 1) * chans]) for g in range(group)]


@_one_blas_thread
def refit_layer(w0: np.ndarray, b0: np.ndarray | None, ws: np.ndarray, x_ref: np.ndarray,
                x_now: np.ndarray, spec: LayerSpec, group: int = 1, intercept: bool = True,
                ridges: Sequence[float] = RIDGES, max_rows: int = 16384, holdout: float = 0.25,
                seed: int = 0) -> tuple[np.ndarray, np.ndarray | None, dict[str, Any]]:
    """Refit a sparsified layer's non-zero weights (and bias) to its original output.

    Args:
        w0: the weight before sparsification (ONNX layout of ``spec``).
        b0: the bias before (``[out]``), or None.
        ws: the sparse weight (same shape); its zeros stay 0.
        x_ref: the layer's input in the original model (targets: ``w0``, ``b0`` on it).
        x_now: the layer's input in the sparsified model (same samples): the regression
            inputs.
        spec: the layer (group 1; a grouped Conv passes ``group``).
        group: Conv groups; each group is solved on its own input channels.
        intercept: fit a bias (False: no bias, as for MatMul).
        ridges: ridge strengths tried, relative to each column's variance.
        max_rows: design rows used at most (samples x output positions, a seeded subset).
        holdout: fraction of the samples held out to choose the candidate.
        seed: seed of the row subset and the held-out samples.

    Returns:
        ``(weight, bias, report)``: the new weight (``ws``'s shape and dtype), the new
        ``[out]`` bias (None when it is unchanged or ``intercept`` is False), and
        ``{"method": "drop" | "bias" | "refit", "ridge", "rel_err", "rel_err_drop"}``: the
        held-out relative output errors ``||Y' - Y||_F / ||Y||_F`` of the chosen candidate
        and of the sparse weights alone.
    """
    b0 = np.zeros(_outputs_of(w0, spec)) if b0 is None else np.asarray(b0, np.float64).ravel()
    pieces = [_piece(*block, spec, intercept, (max_rows, holdout, seed))
              for block in _blocks(w0, ws, b0, x_ref, x_now, group)]
    ridge = _pick_ridge(pieces, ridges, seed)
    candidates = _candidates(pieces, ridge, intercept)
    y_norm2 = max(sum(p.val.y_norm2 for p in pieces), 1e-300)
    errs = {k: math.sqrt(sum(p.val.err2(w, b) for p, (w, b) in zip(pieces, v, strict=True))
                         / y_norm2) for k, v in candidates.items()}
    choice = min(errs, key=lambda k: (errs[k], k != "drop"))  # ties: leave the layer as is
    report = {"method": choice, "ridge": ridge if choice == "refit" else None,
              "rel_err": errs[choice], "rel_err_drop": errs["drop"]}
    if choice == "drop":
        return ws, None, report
    final = _final(pieces, choice, candidates[choice], ridge)
    w2 = np.concatenate([w for w, _ in final], axis=1)
    w_new = _from_rows(w2, spec, ws.shape) if group == 1 else \
        np.concatenate([_from_rows(w, spec, (w.shape[1], *ws.shape[1:])) for w, _ in final])
    w_new = np.ascontiguousarray(w_new, ws.dtype)
    # The zero pattern stays the one sparsify chose: zeros stay 0, and a weight the solve
    # leaves at exactly 0 (its input is 0 on every sample: a dead channel) keeps its value.
    w_new = np.where(ws == 0, 0, np.where(w_new == 0, ws, w_new)).astype(ws.dtype)
    b_new = np.asarray(np.concatenate([b for _, b in final]), ws.dtype) if intercept else None
    return w_new, b_new, report


# -- the sweep -----------------------------------------------------------------------------------
def refit_sequential(model: Model, ctx: Context, original: LayerInputs,
                     layers: list[RefitLayer], samples: int) -> dict[int, dict[str, Any]]:
    """Refit ``layers`` level by level; returns each node's report by ``id(node)``.

    ``original`` serves the layers' inputs in the model before the pass; the sparsified
    model's are computed as the levels before are refit.
    """
    now = ActivationCache(model, ctx, samples, max_bytes=original.cache.max_bytes)
    names = NameGen(model)
    reports: dict[int, dict[str, Any]] = {}
    for level in levels(model.graph, layers, lambda layer: layer.node):
        inputs = list(dict.fromkeys(layer.input for layer in level))
        results = {}
        for chunk in original.chunks(inputs):
            xs, xp = original.get(chunk), now.get(chunk)
            for layer in level:
                if layer.input in chunk:
                    ws = np.asarray(layer.node.inputs[1].const_value.numpy())  # type: ignore[union-attr]
                    results[id(layer)] = refit_layer(layer.w0, layer.b0, ws, xs[layer.input],
                                                     xp[layer.input], layer.spec, layer.group,
                                                     layer.intercept)
            del xs, xp
        for layer in level:
            w, b, report = results[id(layer)]
            if report["method"] != "drop":
                replace_constant_input(layer.node, 1, as_tensor(w), names)
            if b is not None:
                _set_bias(model, layer.node, b, names)
            reports[id(layer.node)] = report
        ctx.progress("sparsify refit", len(reports), len(layers))
    return reports
