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
from typing import Any, Literal

import numpy as np

from edgeopt.ir import LazyTensor, Model, Node, Tensor, format_shape

from ._base import Context, OptionError, PassResult
from ._manager import model_stats
from ._options import parse_overrides
from ._prune_recover import (
    META_KEY as RECOVERY_META_KEY,
)
from ._prune_recover import (
    Consumer,
    Deferred,
    Origins,
    dead_channels,
    find_consumers,
    find_depthwise,
    recover_install,
    recover_prepare,
    recover_sequential,
    upstream,
)
from ._registry import register_pass
from ._util import NameGen, computed_weights_hint, replace_constant_input
from .analyses.activations import Activations
from .analyses.channel_groups import ChannelGroup, ChannelGroups, Keep, Record, node_name
from .analyses.costs import MAC_RULES, bind_batch, layer_costs, unbound_inputs
from .dce import dce

__all__ = ["RECOVERY_META_KEY", "PruneOptions", "apply", "keep_count", "keep_nonempty", "plan",
           "prune"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PruneOptions:
    """Options of ``prune``.

    Attributes:
        ratio: fraction of channels removed from every prunable group (``target=channels``),
            or the fraction of parameters / MACs to remove (``target=params|macs``).
        importance: the importance criterion: ``auto`` (``recon`` with calibration data,
            else ``l1``), ``recon``, ``l1``, ``l2``, ``bn``, ``fpgm``, ``act``,
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
        steps: (``recover=lsq`` only) reach the final channel counts in this many rounds of
            rank, remove and refit (kept counts shrink geometrically); each round ranks
            channels on the model the previous one refit, and every round's refit fits
            the unpruned model's outputs (not the previous round's fit of them).
        sequential: (``recover=lsq`` only, instead of ``steps``) prune the groups one at a
            time in graph order, each to its final count: a group's channels are ranked on
            the model whose earlier groups are already pruned and refit, so the choice sees
            the error they left (channel pruning by layer-wise reconstruction, He et al.
            2017; ThiNet). Every refit fits the unpruned model's outputs, as with ``steps``.
            A round refits what the next ranking reads; the rest waits for the last round.
            Costs a ranking per group and about 2.5x the refits of one shot (light
            ResNet-50 at 0.5: 334 s instead of 52).
    """

    ratio: float = 0.5
    importance: str = "auto"
    scope: Literal["local", "global"] = "local"
    thresh: float | None = None
    min_channels: int = 1
    round_to: int | None = None
    exclude: tuple[str, ...] = ()
    target: Literal["channels", "params", "macs"] = "channels"
    overrides: tuple[str, ...] = ()
    recover: Literal["auto", "off", "bias", "lsq"] = "auto"
    recover_samples: int = 256
    steps: int = 1
    sequential: bool = False

    def override_ratios(self) -> list[tuple[str, float]]:
        """``overrides`` parsed into ``(pattern, ratio)`` pairs (see :func:`parse_overrides`)."""
        return parse_overrides(self.overrides)

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
        if self.steps < 1:
            raise ValueError("steps must be >= 1")
        if self.sequential and self.steps > 1:
            raise ValueError(f"sequential prunes one group per round; it cannot be combined "
                             f"with steps={self.steps}")
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


def _scores(ctx: Context, cg: ChannelGroups, groups: list[ChannelGroup], criterion: str
            ) -> dict[int, np.ndarray]:
    """Normalized importance of each group's channels.

    Every group is scored (the cached analysis) unless ``groups`` are only some of the
    prunable ones (a ``sequential`` round): then only those.
    """
    try:
        from .analyses.importance import ChannelImportance
    except ImportError:  # the importance analysis is optional: plain L1 of the filters
        if criterion != "l1":
            raise OptionError(f"importance={criterion} needs the importance analysis "
                              "(edgeopt.passes.analyses.importance), which is unavailable; "
                              "only l1 works without it") from None
        return {g.id: _l1(g) for g in groups}
    if len(groups) < len(cg.prunable()):
        importance = ChannelImportance.from_groups(_Some(groups), ctx, criterion)
    else:
        importance = ctx.analysis(ChannelImportance, criterion=criterion)
    return {g.id: np.asarray(importance[g], dtype=np.float64) for g in groups}


@dataclass(frozen=True)
class _Some:
    """Some groups, as :meth:`ChannelImportance.from_groups` takes them."""

    groups: list[ChannelGroup]

    def prunable(self) -> list[ChannelGroup]:
        return self.groups


def _l1(group: ChannelGroup) -> np.ndarray:
    total = np.zeros(group.size)
    for m in group.producer_weights():
        w = np.moveaxis(np.abs(np.asarray(m.value.const_value.numpy(), np.float64)), m.axis, 0)
        total += w[m.positions].reshape(group.size, -1).mean(axis=1)
    return total / total.mean() if total.mean() > 0 else total


# -- cost estimates (for target=params|macs) -------------------------------------------
class _Estimator:
    """Parameters and MACs after removing channels, without touching the model."""

    def __init__(self, model: Model, groups: ChannelGroups, macs: dict[str, int]) -> None:
        self.uses: dict[tuple[int, int], list[Record]] = defaultdict(list)
        for rec in groups.records:
            if rec.node is not None:
                self.uses[(id(rec.node), rec.index)].append(rec)
        self.params = model_stats(model).params
        self.macs = macs
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


def _layer_macs(model: Model, shapes: dict[str, tuple[int, ...]] | None
                ) -> dict[str, int] | None:
    """MACs per layer at batch 1 (by output name; layers of unknown shape count 0).

    None while an input has symbolic dims besides the batch that ``shapes`` does not give
    (MACs would depend on sizes nobody stated); {} when costs cannot be computed at all.
    """
    if unbound_inputs(model, shapes):
        return None
    try:
        costs = layer_costs(bind_batch(model, 1, shapes))
    except Exception as e:  # costs are a report, never a reason to fail
        log.debug("prune: MACs unavailable: %s", e)
        return {}
    outputs = {n.name or n.outputs[0].name: n.outputs[0].name for n in model.walk()}
    return {outputs.get(c.node, c.node): c.macs or 0 for c in costs}


def _total(macs: dict[str, int] | None) -> int | None:
    return None if macs is None else sum(macs.values())


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
    model; inputs: the pruned model's, with upstream consumers already refit), and also every
    consumer downstream of one (its inputs drifted although it lost nothing), ``bias``
    folds the removed channels' means into its bias; a MatMul gets an ``Add`` for the bias.
    A refit layer whose output (through its BatchNormalization) feeds a residual ``Add`` is
    fitted to the unpruned sum minus the pruned shortcut. A BatchNormalization that follows
    a bias-compensated layer has its statistics matched
    (:func:`~edgeopt.passes.recovery.match_batchnorm`); one after a refit layer keeps them
    (the refit aims at its unpruned input already). Each layer's relative output error
    (channels just dropped, and after recovery) is logged at INFO.

    Stats: ``groups``, ``groups_prunable``, ``groups_pruned``, ``channels``,
    ``channels_removed``, ``params_before``/``params_after``, ``macs_before``/``macs_after``
    (at batch 1 and ``ctx.input_shapes()``; left out when unknown),
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
    if (opts.steps > 1 or opts.sequential) and mode != "lsq":
        what = "sequential" if opts.sequential else f"steps={opts.steps}"
        raise OptionError(f"{what} refits between rounds: it needs recover=lsq "
                          f"(and --calib), not recover={mode}")
    if not candidates:
        log.warning("prune: %s", nothing_to_prune(cg, bool(opts.exclude)))
    shapes = ctx.input_shapes()
    layer_macs = _layer_macs(model, shapes)
    params_before, macs_before = model_stats(model).params, _total(layer_macs)
    removed: dict[int, np.ndarray] = {}
    if candidates and (opts.ratio > 0 or opts.thresh is not None or opts.overrides):
        scores, consumers, act = _rank(model, ctx, cg, candidates, opts)
        if opts.target == "channels":
            removed = plan(candidates, scores, opts)
        else:
            if opts.target == "macs" and layer_macs is None:
                free = unbound_inputs(model, shapes)[0]
                raise OptionError(f"target=macs: MACs depend on the sizes of input "
                                  f"{free.name!r} {format_shape(free.shape)}, which has symbolic "
                                  "dims besides the batch; give calibration data (--calib) or "
                                  "--input-shape NAME:DxD..")
            macs = layer_macs or {}
            removed = _search_ratio(candidates, scores, opts, cg, _Estimator(model, cg, macs))
        removed = keep_nonempty(cg, removed, scores)
    stats: dict[str, int | float] = {
        "groups": len(cg.groups), "groups_prunable": len(candidates),
        "groups_pruned": len(removed), "channels": sum(g.size for g in candidates),
        "channels_removed": sum(len(r) for r in removed.values()),
        "params_before": params_before}
    if macs_before is not None:
        stats["macs_before"] = macs_before
    if not removed:
        stats.update(params_after=params_before, theta=0.0)
        if macs_before is not None:
            stats["macs_after"] = macs_before
        if mode != "off":
            stats["recovered_layers"] = 0
        return PassResult(modified=False, stats=stats)
    for gid, channels in removed.items():
        log.info("prune: group %d (%s): %d -> %d channels", gid,
                 ", ".join(cg.groups[gid].producers[:3]), cg.groups[gid].size,
                 cg.groups[gid].size - len(channels))
    final = {_key(cg.groups[gid]): (cg.groups[gid].size, cg.groups[gid].size - len(ch))
             for gid, ch in removed.items()}
    sequence = _graph_order(model, final) if opts.sequential else None
    steps = len(sequence) if sequence is not None else opts.steps
    merged: dict[str, dict] = {}  # layer -> recovery report
    # sequential: a round refits only what the next round's ranking reads (see _due)
    deferred = Deferred() if sequence is not None else None
    origins = None
    if steps > 1 and mode == "lsq" and ctx.calib is not None:
        # Every step fits the unpruned model's outputs (see Origins).
        unpruned = model.clone()
        ucg = ChannelGroups(unpruned)
        origins = Origins(unpruned, find_consumers(unpruned, ucg) + find_depthwise(unpruned, ucg))
    progress = ctx.progress
    try:
        for step in range(1, steps + 1):
            if steps > 1:  # every round ranks and refits: the progress lines say which round
                ctx.progress = _in_round(progress, step, steps)
            if step > 1:
                ctx.invalidate()
                cg = ctx.analysis(ChannelGroups)
                ranked = cg.prunable() if sequence is None else \
                    [g for g in cg.prunable() if _key(g) == sequence[step - 1]]
                scores, consumers, act = _rank(model, ctx, cg, ranked, opts)
            if steps > 1:
                removed = keep_nonempty(
                    cg, _step_removal(cg, scores, final, step, steps, sequence), scores)
            if deferred is not None:
                deferred.due = _due(cg, sequence[step]) if step < steps else None
            for r in _remove(model, ctx, cg, removed, consumers, act, mode, opts, origins,
                             deferred):
                merged[r["layer"]] = r  # a layer refit in several rounds: its last refit
    finally:
        ctx.progress = progress
    reports = list(merged.values())
    if mode != "off":
        stats["recovered_layers"] = len(reports)
    if reports:
        stats["recon_err_drop_mean"] = float(np.mean([r["drop"] for r in reports]))
        stats["recon_err_after_mean"] = float(np.mean([r["after"] for r in reports]))
    params_after = model_stats(model).params
    macs_after = _total(_layer_macs(model, shapes))
    if macs_after is not None:
        stats["macs_after"] = macs_after
    stats.update(params_after=params_after,
                 theta=(params_before - params_after) / params_before if params_before else 0.0)
    return PassResult(modified=True, stats=stats)


def nothing_to_prune(cg: ChannelGroups, excluded: bool = False) -> str:
    """Why there is no prunable channel group, and what to do about it."""
    computed = computed_weights_hint(
        cg.model.graph, "fold them into constants first: -p simplify,prune:...")
    if computed:
        return f"no prunable channel group: {computed}"
    if excluded and cg.prunable():
        return "no prunable channel group: exclude= matches every one"
    frozen = [g for g in cg.groups if g.frozen is not None]
    if frozen:
        return (f"no prunable channel group: all {len(cg.groups)} are frozen (first: "
                f"{frozen[0].frozen}); see edgeopt info --groups")
    return "no prunable channel group: no Conv, Gemm or MatMul with constant weights"


def _rank(model: Model, ctx: Context, cg: ChannelGroups, candidates: list[ChannelGroup],
          opts: PruneOptions) -> tuple[dict[int, np.ndarray], list[Consumer], Any]:
    """(scores per group id, recoverable consumers, Activations or None).

    Only ``candidates`` are scored; the Activations hold the consumer inputs that carry
    their channels (None without calibration data or such inputs).

    With calibration data, channels never active where a consumer reads them score -inf.
    """
    criterion = opts.importance if opts.importance != "auto" else \
        "recon" if ctx.calib is not None else "l1"
    scores = _scores(ctx, cg, candidates, criterion)
    consumers: list[Consumer] = []
    act = None
    if ctx.calib is not None:
        consumers = find_consumers(model, cg)
        read = {m.value.name for g in candidates for m in g.activations()}
        inputs = sorted({c.input for c in consumers} & read)
        if inputs:
            act = ctx.analysis(Activations, values=tuple(inputs))
            scores = _with_dead(scores, dead_channels(cg, candidates, act, set(inputs)))
    return scores, consumers, act


def _in_round(progress: Any, step: int, steps: int) -> Any:
    """``progress`` with ``round STEP/STEPS`` appended to every description."""
    return lambda desc, done, total: progress(f"{desc}, round {step}/{steps}", done, total)


def _key(group: ChannelGroup) -> tuple[str, ...]:
    """What identifies a group across pruning steps: its producer nodes."""
    return tuple(sorted(group.producers))


def _graph_order(model: Model, final: Mapping[tuple[str, ...], tuple[int, int]]
                 ) -> list[tuple[str, ...]]:
    """The groups of ``final`` (by key) in the graph order of their first producer."""
    position = {node_name(n): i for i, n in enumerate(model.graph)}
    return sorted(final, key=lambda key: min(position.get(p, len(position)) for p in key))


def _due(cg: ChannelGroups, key: tuple[str, ...]) -> set[str] | None:
    """The layers to refit before the group ``key`` is ranked (``sequential``).

    Its ranking reads its consumers' inputs and compares with their outputs: those
    consumers and everything upstream of them must be refit; layers further down can wait
    (a layer refit later still fits the unpruned outputs). None (all) when the group is gone.
    """
    group = next((g for g in cg.groups if _key(g) == key), None)
    if group is None:
        return None
    readers = [m.node for m in (*group.members, *group.partial_members)
               if m.role == "in" and m.node is not None]
    return upstream(readers)


def _step_removal(cg: ChannelGroups, scores: Mapping[int, np.ndarray],
                  final: Mapping[tuple[str, ...], tuple[int, int]], step: int, steps: int,
                  sequence: list[tuple[str, ...]] | None = None) -> dict[int, np.ndarray]:
    """The channels step ``step`` of ``steps`` removes.

    Kept counts shrink geometrically from each group's original size to its final count,
    which the last step reaches; with a ``sequence`` (``sequential``) step ``i`` takes the
    ``i``-th group of it straight to its final count and leaves the later ones alone.
    """
    removed = {}
    for g in cg.groups:
        if (sizes := final.get(_key(g))) is None or g.id not in scores:
            continue
        size0, last = sizes
        if sequence is not None:
            want = last if sequence.index(_key(g)) < step else g.size
        else:
            want = last if step == steps else \
                max(last, round(size0 * (last / size0) ** (step / steps)))
        if want < g.size:
            removed[g.id] = _lowest(scores[g.id], g.size - want)
    return removed


def _remove(model: Model, ctx: Context, cg: ChannelGroups, removed: dict[int, np.ndarray],
            consumers: list[Consumer], act: Any, mode: str, opts: PruneOptions,
            origins: Origins | None = None, deferred: Deferred | None = None) -> list[dict]:
    """Remove ``removed`` channels, recover the consumers (``mode``), run ``dce``."""
    keep = cg.keep_fn(removed)
    reports = recover_prepare(model, ctx, consumers, keep, act, mode, opts.recover_samples) \
        if mode == "bias" and act is not None else []
    original = None
    if mode == "lsq" and consumers and ctx.calib is not None:  # targets: before any step
        original = model.clone() if origins is None else origins.model
    depthwise = find_depthwise(model, cg) if original is not None else []
    apply(model, cg, keep)
    if reports:
        recover_install(model, consumers)
    elif original is not None:
        reports = recover_sequential(model, ctx, original, consumers, keep,
                                     opts.recover_samples, depthwise, origins, deferred)
        if origins is not None:
            origins.update(consumers + depthwise, keep)
    dce(model, ctx)
    return reports


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
