"""The ``recon`` importance criterion: keep the channels the next layers cannot do without.

Norm criteria (``l1``, ``bn``) score a channel by its own weights; what matters after a
least-squares refit (``prune``'s ``recover=lsq``) is whether the *consumers* (the Conv, Gemm
and MatMul layers that read the group's channels) can reproduce their output from the
channels that stay. ``recon`` answers that on the calibration data, as in channel-pruning by
reconstruction (He et al., 2017; ThiNet): for every consumer it forms the ridge regression of
the layer's unpruned output on its input columns (im2col taps of each input channel for a
Conv, features for a Gemm/MatMul, Flatten blocks included), then removes the group's channels
by **greedy backward elimination**: at each step the channels whose removal raises the refit
error least go next. Removing a block ``b`` of columns from the least-squares solution
``W = P H`` (``P`` the inverse regularized Gram matrix) raises the residual by
``tr(W_b^T P_bb^-1 W_b)``, and ``P`` and ``W`` are downdated in closed form, so no step
re-solves anything.

A channel's score is the relative output error (summed over the group's consumers, each
normalized by its output energy) at the step it was removed, made non-decreasing: channels
removed first score lowest, scores are comparable across groups (a global ranking ranks by
"output error caused"), and dead channels score 0. A group without a consumer to measure
(its channels only reach a graph output, a depthwise-only path, ...) falls back to ``l1``.

Cost, per consumer with ``d`` input columns (at most :data:`MAX_COLUMNS`; wider consumers are
solved at channel level: one column per input channel, the channel's contribution to the
output seen through a random projection of the outputs) and ``r`` design rows (at most
:data:`MAX_ROWS`): a float32 Gram matrix (``r d^2``, on centered data), one float64 ``d x d``
inverse, and about ``STEPS`` rank-``d/STEPS`` downdates done in place by BLAS (the matrices
are compacted once a quarter of their columns is gone); each step scores every remaining
channel with one batched solve per block size. The consumers' inputs are fetched when their
group is scored, one at a time, from an
:class:`~edgeopt.passes.analyses.activation_cache.ActivationCache` that keeps what fits
:data:`MAX_BYTES` and runs only the nodes between the values it keeps and the one asked for:
about one pass over the model in all (plus what it recomputes after dropping values).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .._layer_ops import LayerSpec, im2col
from .importance import (
    CriterionOptions,
    ImportanceError,
    get_criterion,
    members,
    register_criterion,
)

log = logging.getLogger(__name__)

__all__ = ["MAX_COLUMNS", "recon"]

#: Widest consumer (input columns) solved tap by tap; wider ones are solved per channel.
MAX_COLUMNS = 1152
#: Outputs kept by the random projection of the channel-level problem.
PROJECTION = 16
#: Most design rows (samples x output positions) per consumer, both levels.
MAX_ROWS = 8192
#: Calibration samples used (at most).
SAMPLES = 256
#: Most bytes of activations fetched at once (one consumer input, every sample) and kept.
MAX_BYTES = 512 << 20
#: Ridge strength relative to the mean column variance.
RIDGE = 1e-3
#: Target number of elimination steps per group (more = closer to one-at-a-time greedy).
STEPS = 64
#: A consumer's matrices are compacted when fewer than this share of their columns is left.
COMPACT = 0.75


@dataclass(frozen=True)
class _Blocks:
    """The group channels whose blocks of columns in one consumer have the same size."""

    channels: np.ndarray  # [n] group channels
    cols: np.ndarray      # [n, t] their columns in the full design


class _Consumer:
    """One consumer's regression state over the columns still present.

    ``p`` (inverse regularized Gram) and ``w`` (least-squares weights ``[rows of p, out]``)
    are downdated in place over all their rows; the rows (and columns) of removed columns
    are left stale, never read, until a compaction drops them. ``where`` maps a full design
    column to its row (-1: removed).
    """

    def __init__(self, cols: list[np.ndarray], p: np.ndarray, w: np.ndarray,
                 energy: float) -> None:
        self.cols = cols  # group channel -> its columns in the full design
        self.blocks = _blocks(cols)
        self.p = np.ascontiguousarray(p)
        self.w = np.ascontiguousarray(w)
        self.energy = energy
        self.full = np.arange(len(p))  # row -> full design column
        self.live = np.ones(len(p), bool)
        self.where = np.arange(len(p))

    def costs(self, alive: np.ndarray) -> np.ndarray:
        """Relative error increase of removing each channel alone, for the ``alive`` ones.

        Args:
            alive: ``[group size]`` mask of the channels still present.

        Returns:
            ``[group size]``; 0 for channels removed, or that this consumer does not read.
        """
        out = np.zeros(len(alive))
        for blk in self.blocks:
            sel = alive[blk.channels]
            if not sel.any():
                continue
            b = self.where[blk.cols[sel]]  # [n, t]
            wb = self.w[b]  # [n, t, out]
            if b.shape[1] == 1:  # tr(W_b^T P_bb^-1 W_b) = ||W_b||^2 / P_bb
                pbb = self.p[b[:, 0], b[:, 0]]
                wsq = np.einsum("no,no->n", wb[:, 0], wb[:, 0])
                out[blk.channels[sel]] = np.divide(wsq, pbb, out=np.zeros_like(wsq),
                                                   where=pbb != 0)
            else:  # tr(P_bb^-1 W_b W_b^T): t x t right-hand sides instead of out
                pb = self.p[b[:, :, None], b[:, None, :]]  # [n, t, t]
                m = np.matmul(wb, wb.transpose(0, 2, 1))
                out[blk.channels[sel]] = np.einsum("nii->n", _solve(pb, m))
        return np.maximum(out, 0.0) / self.energy

    def remove(self, channels: np.ndarray) -> None:
        """Drop ``channels``' columns and downdate ``p`` and ``w`` (``P -= P_:b P_bb^-1 P_b:``)."""
        b = self.where[np.concatenate([self.cols[c] for c in channels]
                                      + [np.zeros(0, np.int64)])]
        if not len(b):
            return
        ut = self.p[b]  # P_b: = (P_:b)^T: [k, rows]
        tt = _solve(ut[:, b], ut)  # P_bb^-1 P_b:
        # p and w are C-ordered, so their transposes are the Fortran arrays BLAS updates in
        # place: P^T -= P_:b (P_bb^-1 P_b:) and W^T -= W_b^T (P_bb^-1 P_b:).
        from scipy.linalg import blas  # scipy takes 0.1 s to import: only when used

        self.p = blas.dgemm(-1.0, ut, tt, beta=1.0, c=self.p.T, trans_a=1, overwrite_c=1).T
        self.w = blas.dgemm(-1.0, self.w[b], tt, beta=1.0, c=self.w.T, trans_a=1,
                            overwrite_c=1).T
        self.live[b] = False
        self.where[self.full[b]] = -1
        if self.live.sum() < COMPACT * len(self.live):
            self._compact()

    def _compact(self) -> None:
        keep = np.flatnonzero(self.live)
        self.p = self.p.take(keep, axis=0).take(keep, axis=1)
        self.w = self.w.take(keep, axis=0)
        self.full = self.full[keep]
        self.live = np.ones(len(keep), bool)
        self.where[self.full] = np.arange(len(keep))


def _blocks(cols: Sequence[np.ndarray]) -> list[_Blocks]:
    """Channels grouped by how many columns they own (channels owning none left out)."""
    sizes = np.array([len(c) for c in cols])
    return [_Blocks(np.flatnonzero(sizes == t), np.stack([cols[c] for c in
                                                          np.flatnonzero(sizes == t)]))
            for t in np.unique(sizes) if t > 0]


def _solve(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``a^-1 b`` (stacked too); the pseudo-inverse where ``a`` is singular."""
    try:
        return np.linalg.solve(a, b)
    except np.linalg.LinAlgError:
        return np.linalg.pinv(a) @ b


def _readable(m: Any) -> bool:
    """A consumer member ``recon`` can measure: a group-1 Conv, Gemm or MatMul weight."""
    node = m.node
    if node is None or m.index != 1 or node.op_type not in ("Conv", "Gemm", "MatMul"):
        return False
    x = node.inputs[0]
    return x is not None and bool(x.name) and x.const_value is None and \
        node.attr("group", 1) == 1


def _consumers(group: Any) -> list[Any]:
    return [m for m in members(group, "in") if _readable(m)]


def _prepare(groups: Any, ctx: Any, opts: CriterionOptions) -> Any:
    """An :class:`ActivationCache` of the model (None without calibration or consumers).

    Each group's consumer inputs are fetched from it when the group is scored, one at a time:
    a request runs only the nodes between the values the cache keeps (within its byte
    budget) and the one asked for.
    """
    from .activation_cache import ActivationCache
    from .channel_groups import ChannelGroups

    if getattr(ctx, "calib", None) is None or not any(_consumers(g) for g in groups):
        return None
    return ActivationCache(ctx.analysis(ChannelGroups).model, ctx, SAMPLES,
                           max_bytes=MAX_BYTES)


def _input(cache: Any, m: Any) -> np.ndarray:
    """The activation the consumer member ``m`` reads, for the calibration samples."""
    name = m.node.inputs[0].name
    return cache.get([name])[name]


def _out_positions(spatial: Sequence[int], kernel: Sequence[int], spec: LayerSpec) -> int:
    """Output positions of one sample of a Conv."""
    strides, dil, begin, end = spec.conv_geometry(spatial, kernel)
    return math.prod((s + b + e - (k - 1) * d - 1) // st + 1 for s, k, st, d, b, e
                     in zip(spatial, kernel, strides, dil, begin, end, strict=True))


def _design(m: Any, x: np.ndarray, rng: np.random.Generator
            ) -> tuple[np.ndarray, np.ndarray, int]:
    """``(X rows [r, d] (float32), weight [d, out], taps per input channel)`` of a consumer."""
    node = m.node
    spec = LayerSpec.from_onnx(node.op_type, node.attrs)
    w = np.asarray(m.value.const_value.numpy(), np.float64)
    if spec.kind == "conv":
        taps = math.prod(w.shape[2:])
        w2 = w.reshape(w.shape[0], -1).T
        n = len(x)
        per = _out_positions(x.shape[2:], w.shape[2:], spec)
        keep = n if n * per <= MAX_ROWS else max(1, MAX_ROWS // per)
        picked = np.sort(rng.choice(n, keep, replace=False)) if keep < n else np.arange(n)
        rows = im2col(x[picked], w.shape[2:], spec)
    else:
        taps = 1
        w2 = w if spec.layout == "in_out" else w.T
        rows = x.reshape(-1, x.shape[-1])
    if len(rows) > MAX_ROWS:
        rows = rows[np.sort(rng.choice(len(rows), MAX_ROWS, replace=False))]
    return rows.astype(np.float32, copy=False), w2, taps


def _state(m: Any, x: np.ndarray, rng: np.random.Generator) -> _Consumer | None:
    """The regression state of one consumer member, or None when it measures nothing.

    The consumer's output is linear in its design rows, ``Y = X W2``, so the centered
    moments need no outputs: ``X^T Y = G W2`` and ``||Y||^2 = tr(W2^T G W2)`` with ``G`` the
    centered Gram matrix (float32 products, float64 from there on).
    """
    rows, w2, taps = _design(m, x, rng)
    if rows.shape[1] > MAX_COLUMNS and taps > 1:
        rows, w2 = _channel_level(rows, w2, taps, rng)
        taps = 1
    x_c = rows - rows.mean(axis=0)
    n, d = x_c.shape
    try:  # fewer rows than columns (a wide Gemm on few samples): work on X itself
        found = _low_rank(x_c.astype(np.float64), w2) if n < d else _dense(_gram(x_c), w2)
    except np.linalg.LinAlgError:
        return None
    if found is None:
        log.debug("recon: %s measures nothing (no output energy, or non-finite inputs)",
                  m.value.name)
        return None
    p, ph, energy = found
    cols = [np.concatenate([np.arange(q * taps, (q + 1) * taps) for q in row if q >= 0]
                           + [np.zeros(0, np.int64)]).astype(np.int64)
            for row in np.asarray(m.positions)]
    return _Consumer(cols, p, ph, energy)


def _gram(x: np.ndarray) -> np.ndarray:
    """``X^T X`` in float64 from float32 products, without overflow.

    float32 products overflow past |x| ~ 1e17 over MAX_ROWS rows (it happens: the onnx
    light models' constant weights grow activations layer by layer): the product is taken on
    data scaled by a power of two (exact), the scale restored in float64. Non-finite data
    gives a non-finite result.
    """
    peak = float(np.max(np.abs(x))) if x.size else 0.0
    if not math.isfinite(peak):
        return np.full((x.shape[1], x.shape[1]), np.nan)
    scale = 2.0 ** math.ceil(math.log2(peak)) if peak > 0 else 1.0
    xs = x * np.float32(1 / scale)
    return np.asarray(xs.T @ xs, np.float64) * (scale * scale)


def _dense(g: np.ndarray, w2: np.ndarray) -> tuple[np.ndarray, np.ndarray, float] | None:
    """``(P, P H, energy)`` from the centered Gram matrix ``G`` (``d x d``), ``H = G W2``."""
    if not np.all(np.isfinite(g)):
        return None
    h = g @ w2
    energy = float(np.sum(w2 * h))
    if energy <= 0:
        return None
    g[np.diag_indices_from(g)] += RIDGE * max(float(np.trace(g)) / len(g), 1e-12)
    p = np.linalg.inv(g)
    return p, p @ h, energy


def _low_rank(x: np.ndarray, w2: np.ndarray) -> tuple[np.ndarray, np.ndarray, float] | None:
    """:func:`_dense` for centered rows ``X`` (``n x d``, ``n < d``) without a ``d x d`` inverse.

    ``P = (X^T X + r I)^-1 = (I - X^T (r I + X X^T)^-1 X) / r`` (Woodbury): ``n x n`` solves
    and ``d x d x n`` products instead of ``d^3``, and ``H``, ``P H`` through ``X``.
    """
    if not np.all(np.isfinite(x)):
        return None
    xw = x @ w2  # [n, out]: the centered outputs
    energy = float(np.sum(xw * xw))
    if energy <= 0 or not math.isfinite(energy):
        return None
    r = RIDGE * max(float(np.sum(x * x)) / x.shape[1], 1e-12)
    inner = x @ x.T
    inner[np.diag_indices_from(inner)] += r
    mx = np.linalg.solve(inner, x)  # (r I + X X^T)^-1 X: [n, d]
    p = x.T @ mx
    p *= -1.0 / r
    p[np.diag_indices_from(p)] += 1.0 / r
    h = x.T @ xw
    ph = (h - x.T @ (mx @ h)) / r
    return p, ph, energy


def _channel_level(rows: np.ndarray, w2: np.ndarray, taps: int, rng: np.random.Generator
                   ) -> tuple[np.ndarray, np.ndarray]:
    """The channel-level problem of a wide Conv: ``(design rows, weight)``.

    Column ``c`` is input channel ``c``'s contribution to the output, seen through a random
    projection of the outputs (keeps the Gram small): rows are (position, projected output),
    at most :data:`MAX_ROWS` of them, and the output is the sum of the columns.
    """
    chan = w2.shape[0] // taps
    s = rng.standard_normal((w2.shape[1], PROJECTION)) / math.sqrt(PROJECTION)
    ws = (w2 @ s).reshape(chan, taps, PROJECTION).astype(rows.dtype)
    limit = max(1, MAX_ROWS // PROJECTION)  # positions
    if len(rows) > limit:
        rows = rows[np.sort(rng.choice(len(rows), limit, replace=False))]
    z = np.matmul(rows.reshape(len(rows), chan, taps).transpose(1, 0, 2), ws)
    return z.reshape(chan, -1).T, np.ones((chan, 1))


def _eliminate(states: list[_Consumer], size: int) -> np.ndarray:
    """Scores from greedy backward elimination over all of the group's channels."""
    alive = np.ones(size, bool)
    scores = np.zeros(size)
    done = 0.0
    while len(left := np.flatnonzero(alive)):
        costs = sum(s.costs(alive) for s in states)[left]
        chunk = max(1, len(left) // STEPS) if len(left) > STEPS else 1
        order = np.argsort(costs, kind="stable")[:chunk]
        gone = left[order]
        done = max(done, done + float(costs[order].sum()))
        scores[gone] = done
        alive[gone] = False
        for s in states:
            s.remove(gone)
    return scores


@register_criterion("recon", prepare=_prepare)
def recon(group: Any, ctx: Any, opts: CriterionOptions) -> np.ndarray:
    """Output error the consumers cannot refit away when each channel goes (see module)."""
    data = opts.prepared
    readable = _consumers(group)
    if data is None and readable and getattr(ctx, "calib", None) is not None:
        data = _prepare([group], ctx, opts)
    if not readable or data is None:
        if getattr(ctx, "calib", None) is None:
            raise ImportanceError("importance criterion 'recon' needs calibration data "
                                  "(--calib); use l1, l2, fpgm or bn without it")
        log.debug("importance: group %d has no consumer to measure: recon falls back to l1",
                  group.id)
        return get_criterion("l1")(group, ctx, opts)
    rng = np.random.default_rng(opts.seed)
    states = [s for m in readable if (s := _state(m, _input(data, m), rng))]
    if not states:
        return get_criterion("l1")(group, ctx, opts)
    return _eliminate(states, group.size)
