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

Cost: one ``d x d`` inverse per consumer (``d`` = its input columns), at most
:data:`MAX_COLUMNS` (wider consumers are solved at channel level: one column per input
channel, the channel's contribution to the output), and about ``STEPS`` rank-``d/STEPS``
downdates.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..recovery import LayerSpec, im2col
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
MAX_COLUMNS = 2304
#: Outputs kept by the random projection of the channel-level problem.
PROJECTION = 16
#: Most design rows (samples x output positions) per consumer.
MAX_ROWS = 8192
#: Calibration samples used (at most).
SAMPLES = 256
#: Ridge strength relative to the mean column variance.
RIDGE = 1e-3
#: Target number of elimination steps per group (more = closer to one-at-a-time greedy).
STEPS = 64


@dataclass(eq=False)
class _Consumer:
    """One consumer's regression state over the columns still present."""

    cols: list[np.ndarray]  # group channel -> its columns in the full design
    active: np.ndarray      # full column index of each row/col of p
    p: np.ndarray           # inverse regularized Gram over the active columns
    w: np.ndarray           # least-squares weights over the active columns [active, out]
    energy: float           # ||Y - mean||^2 of the unpruned output

    def costs(self, channels: np.ndarray) -> np.ndarray:
        """Relative error increase of removing each of ``channels`` alone."""
        where = _positions(self.active)
        out = np.zeros(len(channels))
        for i, c in enumerate(channels):
            b = where(self.cols[c])
            if not len(b):
                continue
            wb = self.w[b]
            try:
                out[i] = np.sum(wb * np.linalg.solve(self.p[np.ix_(b, b)], wb))
            except np.linalg.LinAlgError:
                out[i] = 0.0
        return np.maximum(out, 0.0) / self.energy

    def remove(self, channels: np.ndarray) -> None:
        """Drop ``channels``' columns and downdate ``p`` and ``w``."""
        where = _positions(self.active)
        b = np.concatenate([where(self.cols[c]) for c in channels] + [np.zeros(0, np.int64)])
        if not len(b):
            return
        rest = np.setdiff1d(np.arange(len(self.active)), b)
        pbb = self.p[np.ix_(b, b)]
        prb = self.p[np.ix_(rest, b)]
        try:
            t = np.linalg.solve(pbb, prb.T).T  # P_rb P_bb^-1
        except np.linalg.LinAlgError:
            t = prb @ np.linalg.pinv(pbb)
        self.w = self.w[rest] - t @ self.w[b]
        self.p = self.p[np.ix_(rest, rest)] - t @ prb.T
        self.active = self.active[rest]


def _positions(active: np.ndarray):
    """fn(full column indices) -> their positions among ``active`` (absent ones dropped)."""
    lookup = {int(c): i for i, c in enumerate(active)}
    return lambda cols: np.array([lookup[int(c)] for c in cols if int(c) in lookup], np.int64)


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
    """Fetch every measured consumer input in one request (the Activations analysis)."""
    from .activations import Activations

    if getattr(ctx, "calib", None) is None:
        return None
    names = tuple(dict.fromkeys(m.node.inputs[0].name for g in groups for m in _consumers(g)))
    if not names:
        return None
    acts = ctx.analysis(Activations, values=names)
    n = min(SAMPLES, _num_samples(ctx.calib))
    return acts.samples(names, n)


def _num_samples(calib: Any) -> int:
    if hasattr(calib, "num_samples"):
        return int(calib.num_samples)
    return max((len(a) for a in calib.values()), default=1)


def _design(m: Any, x: np.ndarray, rng: np.random.Generator
            ) -> tuple[np.ndarray, np.ndarray, int, LayerSpec]:
    """``(X rows [r, d], weight [d, out], taps per input channel, spec)`` of a consumer."""
    node = m.node
    spec = LayerSpec.from_onnx(node.op_type, node.attrs)
    w = np.asarray(m.value.const_value.numpy(), np.float64)
    if spec.kind == "conv":
        taps = math.prod(w.shape[2:])
        w2 = w.reshape(w.shape[0], -1).T
        n = len(x)
        per = im2col(x[:1], w.shape[2:], spec).shape[0]
        keep = n if n * per <= MAX_ROWS else max(1, MAX_ROWS // per)
        picked = np.sort(rng.choice(n, keep, replace=False)) if keep < n else np.arange(n)
        rows = im2col(x[picked], w.shape[2:], spec)
    else:
        taps = 1
        w2 = w if spec.layout == "in_out" else w.T
        rows = x.reshape(-1, x.shape[-1])
    if len(rows) > MAX_ROWS:
        rows = rows[np.sort(rng.choice(len(rows), MAX_ROWS, replace=False))]
    return np.asarray(rows, np.float64), w2, taps, spec


def _state(m: Any, x: np.ndarray, size: int, rng: np.random.Generator) -> _Consumer | None:
    """The regression state of one consumer member, or None when it measures nothing."""
    rows, w2, taps, _ = _design(m, x, rng)
    y = rows @ w2
    pos = np.asarray(m.positions)
    if rows.shape[1] > MAX_COLUMNS and taps > 1:
        # Channel level: column c is input channel c's contribution to the output, seen
        # through a random projection of the outputs (keeps the Gram small).
        chan = w2.shape[0] // taps
        s = rng.standard_normal((w2.shape[1], PROJECTION)) / math.sqrt(PROJECTION)
        ws = (w2 @ s).reshape(chan, taps, PROJECTION)
        z = np.einsum("rct,ctk->rkc", rows.reshape(len(rows), chan, taps), ws)
        x_c, y_c = z.reshape(-1, chan), z.sum(axis=2).reshape(-1, 1)
        taps = 1
    else:
        x_c, y_c = rows, y
    x_c = x_c - x_c.mean(axis=0)
    y_c = y_c - y_c.mean(axis=0)
    energy = float(np.sum(y_c * y_c))
    if energy <= 0:
        return None
    g = x_c.T @ x_c
    g[np.diag_indices_from(g)] += RIDGE * max(float(np.trace(g)) / len(g), 1e-12)
    try:
        p = np.linalg.inv(g)
    except np.linalg.LinAlgError:
        return None
    cols = [np.concatenate([np.arange(q * taps, (q + 1) * taps) for q in row if q >= 0]
                           + [np.zeros(0, np.int64)]).astype(np.int64) for row in pos]
    return _Consumer(cols, np.arange(len(g)), p, p @ (x_c.T @ y_c), energy)


def _eliminate(states: list[_Consumer], size: int) -> np.ndarray:
    """Scores from greedy backward elimination over all of the group's channels."""
    left = np.arange(size)
    scores = np.zeros(size)
    done = 0.0
    while len(left):
        costs = sum(s.costs(left) for s in states)
        chunk = max(1, len(left) // STEPS) if len(left) > STEPS else 1
        order = np.argsort(costs, kind="stable")[:chunk]
        gone = left[order]
        done = max(done, done + float(costs[order].sum()))
        scores[gone] = done
        for s in states:
            s.remove(gone)
        left = np.delete(left, order)
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
    states = [s for m in readable
              if (s := _state(m, np.asarray(data[m.node.inputs[0].name]), group.size, rng))]
    if not states:
        return get_criterion("l1")(group, ctx, opts)
    return _eliminate(states, group.size)
