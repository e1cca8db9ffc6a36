"""``prune``: structured channel pruning on the ONNX graph.

For every prunable channel group (the :class:`ChannelGroups` analysis) the pass chooses the
channels to keep from their importance (the :class:`ChannelImportance` analysis), then slices
every tensor of the group along its axis: producer weights and biases, consumer weights,
BatchNormalization parameters, per-channel constants, and the shapes of the activations.
Attribute and constant fix-ups recorded by the channel rules follow (a depthwise Conv's
``group``, Reshape targets, Split sizes, Slice bounds, Resize sizes), and ``dce`` clears what
is left over. Constants become lazy slices: nothing is copied before export.

How many channels a group keeps (``size`` channels, removal ``ratio``)::

    keep = size - floor(size * ratio)           # scope=local, target=channels
    keep = round_to * ceil(keep / round_to)     # rounded up to a multiple of round_to
    keep = min(size, max(keep, min_channels))

``round_to`` defaults to 8 for groups of at least 16 channels, 4 for groups of 8 to 15 and 1
below: channel counts that are multiples of the CPU vector width keep ONNX Runtime on its
blocked (NCHWc) kernels, which a pruned model must not lose to stay faster than the
original. Rounding up means a group never loses more than ``ratio`` of its channels.
"""

from __future__ import annotations

import fnmatch
import logging
import math
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import numpy as np

from edgeopt.ir import ArrayTensor, LazyTensor, Model, Node, Tensor, Value

from ._base import Context, OptionError, PassResult
from ._manager import model_stats
from ._registry import register_pass
from ._util import NameGen, replace_constant_input
from .analyses.activations import Activations
from .analyses.channel_groups import ChannelGroup, ChannelGroups, Keep, Record, node_name
from .analyses.costs import MAC_RULES, bind_batch, layer_costs
from .dce import dce
from .recovery import (
    LayerSpec,
    bias_compensation,
    layer_output,
    least_squares_refit,
    match_batchnorm,
    reconstruction_error,
    reestimate_batchnorm,
)

__all__ = ["PruneOptions", "apply", "keep_count", "keep_nonempty", "plan", "prune"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PruneOptions:
    """Options of ``prune``.

    Attributes:
        ratio: fraction of channels removed from every prunable group (``target=channels``),
            or the fraction of parameters / MACs to remove (``target=params|macs``).
        importance: the importance criterion (``l1``, ``l2``, ``bn``, ``fpgm``, ``act``,
            ``random`` or a registered one).
        scope: ``local`` removes ``ratio`` of each group; ``global`` ranks the normalized
            scores of all groups together and removes the lowest ``ratio`` of all channels.
        thresh: remove the channels whose normalized score is below this (instead of
            ``ratio``).
        min_channels: channels every group keeps at least.
        round_to: kept channel counts are rounded up to a multiple of this (None: 8 for
            groups of >= 16 channels, 4 for 8..15, 1 below).
        exclude: ``|``-separated fnmatch patterns; groups whose producer nodes or weights
            match one are left alone.
        overrides: per-layer ratios, ``|``-separated ``pattern:ratio`` entries
            (``overrides=conv1*:0.2|fc*:0.7``); a group whose producer nodes or weights match
            a pattern (the first that matches wins) loses that fraction of its channels,
            whatever ``scope``, ``thresh`` and ``target`` do with the other groups.
        target: what ``ratio`` measures: ``channels``, ``params`` or ``macs`` (the uniform
            channel ratio that removes that fraction is searched for).
        recover: recovery of the layers that read pruned channels (consumers), from the
            calibration data: ``lsq`` refits their weights and bias by least squares,
            ``bias`` folds the removed channels' mean contribution into their bias, ``off``
            does nothing; ``auto`` is ``lsq`` when calibration data is given, else ``off``.
        recover_samples: calibration samples used by recovery (at most).
    """

    ratio: float = 0.5
    importance: str = "l1"
    scope: Literal["local", "global"] = "local"
    thresh: float | None = None
    min_channels: int = 1
    round_to: int | None = None
    exclude: tuple[str, ...] = ()
    target: Literal["channels", "params", "macs"] = "channels"
    overrides: tuple[str, ...] = ()
    recover: Literal["auto", "off", "bias", "lsq"] = "auto"
    recover_samples: int = 256

    def override_ratios(self) -> list[tuple[str, float]]:
        """``overrides`` parsed into ``(pattern, ratio)`` pairs.

        Raises:
            ValueError: an entry is not ``pattern:ratio`` with a ratio in [0, 1).
        """
        pairs = []
        for entry in self.overrides:
            pattern, sep, value = entry.rpartition(":")
            try:
                ratio = float(value)
            except ValueError:
                ratio = -1.0
            if not sep or not pattern or not 0.0 <= ratio < 1.0:
                raise ValueError(f"override {entry!r} must be pattern:ratio with a ratio in "
                                 "[0, 1)")
            pairs.append((pattern, ratio))
        return pairs

    def validate(self) -> None:
        """Raise ValueError for out-of-range values."""
        if not 0.0 <= self.ratio < 1.0:
            raise ValueError(f"ratio must be in [0, 1), got {self.ratio}")
        if self.min_channels < 1:
            raise ValueError("min_channels must be >= 1")
        if self.round_to is not None and self.round_to < 1:
            raise ValueError("round_to must be >= 1")
        self.override_ratios()
        if self.recover_samples < 1:
            raise ValueError("recover_samples must be >= 1")
        if self.thresh is not None and self.target != "channels":
            raise ValueError("thresh removes channels by score; it cannot be combined with "
                             f"target={self.target}")


def auto_round_to(size: int) -> int:
    """The default ``round_to`` of a group of ``size`` channels."""
    return 8 if size >= 16 else 4 if size >= 8 else 1


def keep_count(size: int, removed: int, min_channels: int = 1, round_to: int | None = None
               ) -> int:
    """How many of ``size`` channels stay when ``removed`` are asked to go (see module doc)."""
    step = auto_round_to(size) if round_to is None else round_to
    keep = size - max(0, min(size, removed))
    keep = step * math.ceil(keep / step) if keep else 0
    return int(min(size, max(keep, min_channels, 0)))


# -- choosing channels ----------------------------------------------------------------------------
def _lowest(scores: np.ndarray, n: int) -> np.ndarray:
    """Indices of the ``n`` lowest scores (ties: the later channel goes first), sorted."""
    order = np.lexsort((-np.arange(len(scores)), scores))
    return np.sort(order[:n])


def plan(groups: list[ChannelGroup], scores: Mapping[int, np.ndarray], opts: PruneOptions,
         ratio: float | None = None) -> dict[int, np.ndarray]:
    """The channels to remove per group id (groups that lose nothing are left out).

    Args:
        groups: the candidate groups (prunable, not excluded).
        scores: normalized importance per group id, ``[group.size]``.
        opts: the options (scope, thresh, overrides, min_channels, round_to).
        ratio: the channel ratio (defaults to ``opts.ratio``).
    """
    ratio = opts.ratio if ratio is None else ratio
    fixed = {g.id: r for g in groups if (r := _override(g, opts.override_ratios())) is not None}
    wanted = {gid: math.floor(next(g.size for g in groups if g.id == gid) * r + 1e-9)
              for gid, r in fixed.items()}
    free = [g for g in groups if g.id not in fixed]
    if opts.thresh is not None:
        wanted.update({g.id: int((scores[g.id] < opts.thresh).sum()) for g in free})
    elif opts.scope == "global" and free:
        everything = np.concatenate([scores[g.id] for g in free])
        owner = np.concatenate([[g.id] * g.size for g in free])
        lowest = _lowest(everything, math.floor(len(everything) * ratio + 1e-9))
        counts = np.bincount(owner[lowest].astype(np.int64), minlength=1 + max(
            g.id for g in free))
        wanted.update({g.id: int(counts[g.id]) for g in free})
    else:
        wanted.update({g.id: math.floor(g.size * ratio + 1e-9) for g in free})
    removed = {}
    for g in groups:
        keep = keep_count(g.size, wanted[g.id], opts.min_channels, opts.round_to)
        if keep < g.size:
            removed[g.id] = _lowest(scores[g.id], g.size - keep)
    return removed


def _names(group: ChannelGroup) -> list[str]:
    return [*group.producers, *(m.value.name for m in group.producer_weights())]


def _override(group: ChannelGroup, overrides: list[tuple[str, float]]) -> float | None:
    """The ratio of the first override whose pattern matches one of the group's names."""
    names = _names(group)
    return next((r for p, r in overrides if any(fnmatch.fnmatchcase(n, p) for n in names)),
                None)


def _excluded(group: ChannelGroup, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(n, p) for p in patterns for n in _names(group))


def _scores(ctx: Context, groups: list[ChannelGroup], criterion: str
            ) -> dict[int, np.ndarray]:
    """Normalized importance of each group's channels."""
    try:
        from .analyses.importance import ChannelImportance
    except ImportError:  # the importance analysis is optional: plain L1 of the filters
        if criterion != "l1":
            raise OptionError(f"importance={criterion} needs the importance analysis "
                              "(edgeopt.passes.analyses.importance), which is unavailable; "
                              "only l1 works without it") from None
        return {g.id: _l1(g) for g in groups}
    importance = ctx.analysis(ChannelImportance, criterion=criterion)
    return {g.id: np.asarray(importance[g], dtype=np.float64) for g in groups}


def _l1(group: ChannelGroup) -> np.ndarray:
    total = np.zeros(group.size)
    for m in group.producer_weights():
        w = np.moveaxis(np.abs(np.asarray(m.value.const_value.numpy(), np.float64)), m.axis, 0)
        total += w[m.positions].reshape(group.size, -1).mean(axis=1)
    return total / total.mean() if total.mean() > 0 else total


# -- cost estimates (for target=params|macs) -------------------------------------------
class _Estimator:
    """Parameters and MACs after removing channels, without touching the model."""

    def __init__(self, model: Model, groups: ChannelGroups) -> None:
        self.uses: dict[tuple[int, int], list[Record]] = defaultdict(list)
        for rec in groups.records:
            if rec.node is not None:
                self.uses[(id(rec.node), rec.index)].append(rec)
        self.params = model_stats(model).params
        self.macs = _macs_by_output(model)
        self.weight_of = {node.outputs[0].name: (id(node), 1) for node in model.graph
                          if node.op_type in MAC_RULES and len(node.inputs) > 1}

    def fractions(self, keep: Keep) -> dict[tuple[int, int], float]:
        out = {}
        for use, recs in self.uses.items():
            frac = 1.0
            for rec in recs:
                frac *= float(keep(rec.atoms).mean()) if len(rec.atoms) else 1.0
            out[use] = frac
        return out

    def after(self, keep: Keep) -> tuple[float, float]:
        frac = self.fractions(keep)
        params = self.params - sum(float(np.prod(recs[0].value.const_value.shape))
                                   * (1 - frac[use]) for use, recs in self.uses.items()
                                   if recs[0].value.const_value is not None)
        macs = sum(m * frac.get(self.weight_of.get(name, (0, 0)), 1.0)
                   for name, m in self.macs.items())
        return params, macs


def _macs_by_output(model: Model) -> dict[str, int]:
    try:
        costs = layer_costs(bind_batch(model))
    except Exception as e:  # costs are a report, never a reason to fail
        log.debug("prune: MACs unavailable: %s", e)
        return {}
    outputs = {n.name or n.outputs[0].name: n.outputs[0].name for n in model.walk()}
    return {outputs.get(c.node, c.node): c.macs for c in costs}


def _search_ratio(groups: list[ChannelGroup], scores: Mapping[int, np.ndarray],
                  opts: PruneOptions, cg: ChannelGroups, est: _Estimator
                  ) -> dict[int, np.ndarray]:
    """The plan of the smallest channel ratio that removes ``opts.ratio`` of params/MACs."""
    base = est.params if opts.target == "params" else sum(est.macs.values())

    def reduction(r: float) -> tuple[float, dict[int, np.ndarray]]:
        p = plan(groups, scores, opts, r)
        params, macs = est.after(cg.keep_fn(p))
        left = params if opts.target == "params" else macs
        return (1.0 - left / base if base else 0.0), p

    lo, hi = 0.0, 0.999
    best = reduction(hi)[1]
    for _ in range(30):
        mid = (lo + hi) / 2
        got, p = reduction(mid)
        if got >= opts.ratio:
            hi, best = mid, p
        else:
            lo = mid
    return best


def keep_nonempty(cg: ChannelGroups, removed: dict[int, np.ndarray],
                  scores: Mapping[int, np.ndarray]) -> dict[int, np.ndarray]:
    """Give back channels so that no activation loses all of its channels.

    A Split or Slice output holds only some channels of its group; a plan that removes all
    of them would leave an empty tensor. The best-scored channel of such an output stays
    (which may break ``round_to`` for that group).
    """
    removed = {gid: np.asarray(ch) for gid, ch in removed.items()}
    for _ in range(len(cg.records)):
        keep = cg.keep_fn(removed)
        empty = [r for r in cg.records if r.node is None and len(r.atoms)
                 and not keep(r.atoms).any()]
        if not empty:
            break
        gids, channels = cg.locate(empty[0].atoms)
        gid, channel = max(zip(gids.tolist(), channels.tolist(), strict=True),
                           key=lambda gc: (gc[0] in removed, scores[gc[0]][gc[1]]
                                           if gc[0] in scores else 0.0))
        removed[gid] = removed[gid][removed[gid] != channel]
        if not len(removed[gid]):
            del removed[gid]
    return removed


# -- rewriting ------------------------------------------------------------------------------------
def _sliced(tensor: Tensor, cuts: list[tuple[int, np.ndarray]]) -> LazyTensor:
    shape = list(tensor.shape)
    for axis, idx in cuts:
        shape[axis] = len(idx)

    def compute() -> np.ndarray:
        arr = tensor.numpy()
        for axis, idx in cuts:
            arr = np.take(arr, idx, axis=axis)
        return arr

    return LazyTensor(compute, tensor.dtype, tuple(shape))


def apply(model: Model, groups: ChannelGroups, keep: Keep) -> int:
    """Slice every record and apply the fix-ups; returns how many tensors changed."""
    names = NameGen(model)
    uses: dict[tuple[int, int], tuple[Node, list[Record]]] = {}
    changed = 0
    for rec in groups.records:
        if rec.node is None:
            mask = keep(rec.atoms)
            if not mask.all() and rec.value.shape is not None:
                shape = list(rec.value.shape)
                shape[rec.axis] = int(mask.sum())
                rec.value.shape = tuple(shape)
            continue
        uses.setdefault((id(rec.node), rec.index), (rec.node, []))[1].append(rec)
    for node, recs in uses.values():
        cuts = [(r.axis, np.flatnonzero(keep(r.atoms))) for r in recs]
        if all(len(idx) == len(r.atoms) for (_, idx), r in zip(cuts, recs, strict=True)):
            continue
        value = node.inputs[recs[0].index]
        replace_constant_input(node, recs[0].index, _sliced(value.const_value, cuts), names)
        changed += 1
    for fix in groups.fixups:
        if not keep(fix.data["atoms"]).all():
            fix.apply(fix, keep, names)
    return changed


# -- recovery -------------------------------------------------------------------------------------
RECOVERABLE = ("Conv", "Gemm", "MatMul")


@dataclass(eq=False)
class _Consumer:
    """A layer whose constant weight reads a prunable group's channels (role ``in``)."""

    node: Node
    spec: LayerSpec
    rec: Record                       # the weight's input-channel record
    outs: list[Record]                # the weight's output-channel records (if also pruned)
    w0: Tensor | None = None          # the unpruned weight, bias and following BN mean/var
    b0: Tensor | None = None
    bn0: tuple[Tensor, Tensor] | None = None
    weight: np.ndarray | None = None  # refit results, full output axis
    bias: np.ndarray | None = None
    bn: tuple[np.ndarray, np.ndarray] | None = None  # matched BN mean/var, full channels

    @property
    def input(self) -> str:
        return self.node.inputs[0].name  # type: ignore[union-attr]


def _consumers(model: Model, cg: ChannelGroups) -> list[_Consumer]:
    """Conv (group 1), Gemm and MatMul nodes of the main graph with an ``in`` weight record."""
    by_node: dict[int, list[Record]] = defaultdict(list)
    for rec in cg.records:
        if rec.node is not None and rec.index == 1 and rec.node.op_type in RECOVERABLE:
            by_node[id(rec.node)].append(rec)
    found = []
    for recs in by_node.values():
        ins = [r for r in recs if r.role == "in"]
        node = recs[0].node
        assert node is not None
        x = node.inputs[0]
        if len(ins) != 1 or node.graph is not model.graph or x is None or not x.name \
                or x.const_value is not None or ins[0].value.const_value is None \
                or (node.op_type == "MatMul" and node.outputs[0].is_graph_output()):
            continue
        bias = node.inputs[2] if len(node.inputs) > 2 else None
        if bias is not None and bias.const_value is None:
            continue
        try:
            spec = LayerSpec.from_onnx(node.op_type, node.attrs)
        except ValueError as e:
            log.debug("prune: no recovery for %s: %s", node.name or node.outputs[0].name, e)
            continue
        bn = _following_bn(node)
        found.append(_Consumer(
            node, spec, ins[0], [r for r in recs if r.role == "out"],
            ins[0].value.const_value, None if bias is None else bias.const_value,
            None if bn is None else (bn.inputs[3].const_value, bn.inputs[4].const_value)))
    return found


def _dead_channels(cg: ChannelGroups, groups: list[ChannelGroup], act: Activations,
                   inputs: set[str]) -> dict[int, np.ndarray]:
    """Per group id, a mask of the channels that can go for free.

    A channel is free when it is 0 on every calibration sample in every activation of the
    group that a consumer reads.
    """
    dead = {}
    for g in groups:
        mask = None
        for m in g.activations():
            stats = act.stats.get(m.value.name)
            if m.value.name not in inputs or m.axis != 1 or stats is None \
                    or stats.channel_zero_fraction is None:
                continue
            zero = stats.channel_zero_fraction[m.positions] >= 1.0
            mask = zero.all(axis=1) if mask is None else mask & zero.all(axis=1)
        if mask is not None and mask.any():
            dead[g.id] = mask
    return dead


def _chunks(act: Activations, names: list[str], n: int, factor: float = 1.0
            ) -> list[list[str]]:
    """Split ``names`` into requests of ``n`` samples that fit ``act.max_bytes / factor``."""
    budget = act.max_bytes / factor
    sizes = {x: 4.0 * n * math.prod(act.stats[x].shape[1:]) * 1.1 if x in act.stats else
             n * act.bytes_per_sample(x) * 1.1 for x in names}
    chunks: list[list[str]] = []
    for name in names:
        if chunks and sum(sizes[x] for x in chunks[-1]) + sizes[name] <= budget:
            chunks[-1].append(name)
        else:
            chunks.append([name])
    return chunks


def _sample_chunks(act: Activations, names: list[str], n: int) -> list[tuple[list[str], int]]:
    """Split ``names`` into ``(names, samples)`` requests that fit ``act.max_bytes``."""
    def per_sample(name: str) -> float:
        shape = act.stats[name].shape
        return 4.0 * math.prod(shape[1:]) if len(shape) > 1 else 4.0

    chunks: list[tuple[list[str], int]] = []
    current: list[str] = []
    used = 0.0
    for name in names:
        size = per_sample(name) * n * 1.1  # a margin for the run granularity
        if size > act.max_bytes:
            chunks.append(([name], max(1, int(act.max_bytes / per_sample(name) / 1.1))))
            continue
        if current and used + size > act.max_bytes:
            chunks.append((current, n))
            current, used = [], 0.0
        current.append(name)
        used += size
    if current:
        chunks.append((current, n))
    return chunks


def _refit(c: _Consumer, x: np.ndarray, keep: np.ndarray, mode: str,
           x_pruned: np.ndarray | None = None) -> dict:
    """Compute the recovered weight/bias (and BN statistics) of one consumer.

    ``x`` is the consumer's input in the unpruned model; ``x_pruned`` (optional, ``lsq``)
    its kept channels as the pruned model computes them.
    """
    w = np.asarray(c.w0.numpy())  # type: ignore[union-attr]
    b = None if c.b0 is None else np.asarray(c.b0.numpy())
    axis = c.rec.axis
    if mode == "lsq":
        c.weight, c.bias, report = least_squares_refit(w, b, x, keep, c.spec,
                                                       x_inputs=x_pruned)
        drop, after = report["rel_err_drop"], report["rel_err_refit"]
    else:
        removed = np.setdiff1d(np.arange(w.shape[axis]), keep)
        means = x.mean(axis=tuple(i for i in range(x.ndim) if i != (
            x.ndim - 1 if c.spec.kind == "gemm" else 1)))
        c.bias = bias_compensation(w, b, removed, means, c.spec)
        c.weight = np.take(w, keep, axis=axis)
        drop, after = reconstruction_error(w, b, x, keep, c.weight, c.bias, c.spec)
        report = {"method": "bias"}
    bn = _following_bn(c.node)
    if bn is not None and c.bn0 is not None and report["method"] != "drop":
        xk = np.take(x, keep, axis=x.ndim - 1 if c.spec.kind == "gemm" else 1) \
            if x_pruned is None else x_pruned
        ref = reestimate_batchnorm(layer_output(x, w, b, c.spec))
        new = reestimate_batchnorm(layer_output(xk, c.weight, c.bias, c.spec))
        mean, var = (np.asarray(t.numpy()) for t in c.bn0)
        c.bn = match_batchnorm(mean, var, float(bn.attr("epsilon", 1e-5)), ref, new)
    return {"layer": node_name(c.node), "drop": drop, "after": after,
            "method": report["method"]}


def _following_bn(node: Node) -> Node | None:
    """The BatchNormalization that alone reads ``node``'s output (constant statistics)."""
    users = node.outputs[0].consumers()
    if len(users) != 1 or users[0].op_type != "BatchNormalization" \
            or node.outputs[0].is_graph_output() or users[0].inputs[0] is not node.outputs[0]:
        return None
    bn = users[0]
    if len(bn.inputs) < 5 or any(v is None or v.const_value is None for v in bn.inputs[3:5]):
        return None
    return bn


def recover_prepare(model: Model, ctx: Context, consumers: list[_Consumer], keep: Keep,
                    act: Activations, mode: str, samples: int) -> list[dict]:
    """Bias-compensate every consumer that loses input channels (``recover=bias``).

    The means come from the consumers' inputs in the unpruned model; the results are
    installed by :func:`recover_install`.

    Activations are requested in chunks that fit the analysis' byte budget.
    """
    lost = [(c, np.flatnonzero(keep(c.rec.atoms))) for c in consumers]
    lost = [(c, k) for c, k in lost if len(k) < len(c.rec.atoms)]
    by_input: dict[str, list[tuple[_Consumer, np.ndarray]]] = defaultdict(list)
    for c, k in lost:
        by_input[c.input].append((c, k))
    reports = []
    for names, n in _sample_chunks(act, list(by_input), samples):
        data = act.samples(tuple(names), n)
        for name in names:
            for c, k in by_input[name]:
                reports.append(_refit(c, data[name], k, mode))
                _log_report(reports[-1])
        del data
    return reports


def _levels(model: Model, consumers: list[_Consumer]) -> list[list[_Consumer]]:
    """Consumers grouped by how many other consumers lie upstream of their input.

    Those of one level can be refit together, once the levels before them are refit.
    """
    index = {id(c.node): c for c in consumers}
    depth: dict[str, int] = {}
    levels: dict[int, list[_Consumer]] = defaultdict(list)
    for node in model.graph:
        d = max((depth.get(v.name, 0) for v in node.inputs if v is not None), default=0)
        if id(node) in index:
            levels[d].append(index[id(node)])
            d += 1
        for out in node.outputs:
            depth[out.name] = d
    return [levels[k] for k in sorted(levels)]


def recover_sequential(model: Model, ctx: Context, original: Model, consumers: list[_Consumer],
                       keep: Keep, samples: int) -> list[dict]:
    """Least-squares refit of every consumer, level by level, on the pruned model's inputs.

    Each consumer's targets are its outputs in the ``original`` (unpruned) model; its inputs
    are its kept input channels as the pruned model, with the levels before already refit,
    computes them, so that errors made upstream are corrected downstream. Activations are
    fetched in chunks that fit the byte budget.
    """
    lost = [(c, np.flatnonzero(keep(c.rec.atoms))) for c in consumers]
    lost = [(c, k) for c, k in lost if len(k) < len(c.rec.atoms)]
    kept = {id(c): k for c, k in lost}
    ref = Activations(original, ctx, values=())
    reports = []
    for level in _levels(model, [c for c, _ in lost]):
        now = Activations(model, ctx, values=())
        names = list(dict.fromkeys(c.input for c in level))
        for chunk in _chunks(ref, names, samples, factor=2):
            xs = ref.samples(tuple(chunk), samples)
            xp = now.samples(tuple(chunk), samples)
            for c in level:
                if c.input in chunk:
                    reports.append(_refit(c, xs[c.input], kept[id(c)], "lsq", xp[c.input]))
                    _log_report(reports[-1])
            del xs, xp
        recover_install(model, level, keep)
    return reports


def _log_report(report: dict) -> None:
    log.info("prune: recover %s (%s): relative error %.4f dropped -> %.4f", report["layer"],
             report["method"], report["drop"], report["after"])


def recover_install(model: Model, consumers: list[_Consumer], keep: Keep) -> int:
    """Write the refit weights, biases and BN statistics into the pruned model."""
    names = NameGen(model)
    done = 0
    for c in consumers:
        if c.weight is None or c.bias is None:
            continue
        w, b = c.weight, c.bias.ravel()
        out_axis = 0 if c.rec.axis == 1 else 1
        for rec in c.outs:
            if rec.axis == out_axis:
                mask = np.flatnonzero(keep(rec.atoms))
                w, b = np.take(w, mask, axis=out_axis), b[mask]
                if c.bn is not None:
                    c.bn = (c.bn[0][mask], c.bn[1][mask])
        replace_constant_input(c.node, 1, ArrayTensor(np.ascontiguousarray(w)), names)
        _set_bias(model, c.node, b, names)
        bn = _following_bn(c.node)
        if c.bn is not None and bn is not None:
            for i, arr in zip((3, 4), c.bn, strict=True):
                replace_constant_input(bn, i, ArrayTensor(np.ascontiguousarray(arr)), names)
        done += 1
    return done


def _set_bias(model: Model, node: Node, bias: np.ndarray, names: NameGen) -> None:
    """Give ``node`` the bias ``bias``; a MatMul gets an ``Add`` after it."""
    if node.op_type != "MatMul":
        old = node.inputs[2] if len(node.inputs) > 2 else None
        if old is not None and old.const_value is not None and len(old.const_value.shape) == 2:
            bias = bias.reshape(1, -1)  # keep a Gemm C of shape [1, out]
        replace_constant_input(node, 2, ArrayTensor(bias), names)
        return
    out = node.outputs[0]
    graph = node.graph
    assert graph is not None
    const = graph.add_initializer(names.fresh(f"{out.name}_bias"), ArrayTensor(bias))
    result = Value(names.fresh(f"{out.name}_biased"), out.dtype, out.shape)
    uses = list(out.uses())
    add = Node("Add", (out, const), outputs=(result,),
               name=names.fresh(f"{node.name or out.name}_bias"))
    graph.insert_after(node, [add])
    for use in uses:
        use.node.set_input(use.index, result)


def _total_macs(model: Model) -> int:
    return sum(_macs_by_output(model).values())


@register_pass("prune", options=PruneOptions, primary="ratio")
def prune(model: Model, ctx: Context, opts: PruneOptions) -> PassResult:
    """Remove low-importance channels of every prunable channel group.

    ``prune:0.6`` removes 60% of the channels of each group (see :class:`PruneOptions` for
    ``scope``, ``thresh``, ``round_to``, ``min_channels``, ``exclude``, ``overrides`` and
    ``target``). No Split/Slice output is ever emptied (see :func:`keep_nonempty`). Frozen
    groups (graph outputs, channel shuffles, ops without a channel rule, ...) are never
    touched. Requires: a model whose main graph is topologically sorted. Preserves: nothing
    when it modifies; outputs are unchanged when the removed channels contribute nothing.

    With calibration data (``ctx.calib``), channels that are 0 on every sample wherever a
    consumer reads them (dead after a ReLU) rank lowest whatever the criterion: they go
    first, for free. ``recover`` (see :class:`PruneOptions`) then repairs every consumer
    (Conv with group 1, Gemm, MatMul with a constant weight) that lost input channels:
    ``lsq`` refits its weights and bias level by level (targets: its output in the unpruned
    model; inputs: the pruned model's, with upstream consumers already refit), ``bias``
    folds the removed channels' means into its bias; a MatMul gets an ``Add`` for the bias,
    and a BatchNormalization that follows a recovered layer has its statistics matched
    (:func:`~edgeopt.passes.recovery.match_batchnorm`). Each layer's relative output error
    (channels just dropped, and after recovery) is logged at INFO.

    Stats: ``groups``, ``groups_prunable``, ``groups_pruned``, ``channels``,
    ``channels_removed``, ``params_before``/``params_after``, ``macs_before``/``macs_after``,
    ``theta`` = (params_before - params_after) / params_before; with recovery on also
    ``recovered_layers`` and, when some were, ``recon_err_drop_mean`` and
    ``recon_err_after_mean`` (mean relative error of the recovered layers' outputs before and
    after recovery, on the calibration data).
    """
    cg = ctx.analysis(ChannelGroups)
    candidates = [g for g in cg.prunable() if not _excluded(g, opts.exclude)]
    mode = opts.recover if opts.recover != "auto" else "lsq" if ctx.calib is not None else "off"
    if mode != "off" and ctx.calib is None:
        raise OptionError(f"recover={mode} needs calibration data (--calib)")
    params_before, macs_before = model_stats(model).params, _total_macs(model)
    removed: dict[int, np.ndarray] = {}
    consumers: list[_Consumer] = []
    act = None
    if candidates and (opts.ratio > 0 or opts.thresh is not None or opts.overrides):
        scores = _scores(ctx, candidates, opts.importance)
        if ctx.calib is not None:
            consumers = _consumers(model, cg)
            inputs = sorted({c.input for c in consumers})
            if inputs:
                act = ctx.analysis(Activations, values=tuple(inputs))
                scores = _with_dead(scores, _dead_channels(cg, candidates, act, set(inputs)))
        if opts.target == "channels":
            removed = plan(candidates, scores, opts)
        else:
            removed = _search_ratio(candidates, scores, opts, cg, _Estimator(model, cg))
        removed = keep_nonempty(cg, removed, scores)
    stats: dict[str, int | float] = {
        "groups": len(cg.groups), "groups_prunable": len(candidates),
        "groups_pruned": len(removed), "channels": sum(g.size for g in candidates),
        "channels_removed": sum(len(r) for r in removed.values()),
        "params_before": params_before, "macs_before": macs_before}
    if not removed:
        stats.update(params_after=params_before, macs_after=macs_before, theta=0.0)
        if mode != "off":
            stats["recovered_layers"] = 0
        return PassResult(modified=False, stats=stats)
    for gid, channels in removed.items():
        log.info("prune: group %d (%s): %d -> %d channels", gid,
                 ", ".join(cg.groups[gid].producers[:3]), cg.groups[gid].size,
                 cg.groups[gid].size - len(channels))
    keep = cg.keep_fn(removed)
    reports = recover_prepare(model, ctx, consumers, keep, act, mode, opts.recover_samples) \
        if mode == "bias" and act is not None else []
    original = model.clone() if mode == "lsq" and act is not None else None
    apply(model, cg, keep)
    if reports:
        recover_install(model, consumers, keep)
    elif original is not None:
        reports = recover_sequential(model, ctx, original, consumers, keep,
                                     opts.recover_samples)
    if mode != "off":
        stats["recovered_layers"] = len(reports)
    if reports:
        stats["recon_err_drop_mean"] = float(np.mean([r["drop"] for r in reports]))
        stats["recon_err_after_mean"] = float(np.mean([r["after"] for r in reports]))
    dce(model, ctx)
    params_after = model_stats(model).params
    stats.update(params_after=params_after, macs_after=_total_macs(model),
                 theta=(params_before - params_after) / params_before if params_before else 0.0)
    return PassResult(modified=True, stats=stats)


def _with_dead(scores: Mapping[int, np.ndarray], dead: Mapping[int, np.ndarray]
               ) -> dict[int, np.ndarray]:
    """``scores`` with the channels in ``dead`` made the least important (-inf)."""
    out = {}
    for gid, s in scores.items():
        s = np.array(s, dtype=np.float64)  # a copy: the importance analysis is cached
        if gid in dead:
            s[dead[gid]] = -np.inf
            log.info("prune: group %d: %d channel(s) never active on the calibration data",
                     gid, int(dead[gid].sum()))
        out[gid] = s
    return out
