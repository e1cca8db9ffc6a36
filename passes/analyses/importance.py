"""``ChannelImportance``: one score per channel of every channel group (higher = keep).

A *criterion* scores the channels of one :class:`~edgeopt.passes.analyses.channel_groups.
ChannelGroup`. Criteria live in a registry (``CRITERIA``) and are added with
:func:`register_criterion`; a duplicate name is an error::

    from edgeopt.passes.analyses.importance import (aggregate, channel_matrix, filters,
                                                    register_criterion)

    @register_criterion("acme.linf")
    def linf(group, ctx, opts):
        \"\"\"Largest |weight| of each channel's slices.\"\"\"
        rows = [np.nanmax(np.abs(channel_matrix(m, group.size)), axis=1)
                for m in filters(group, opts, partial=False)]
        return aggregate(rows, opts.aggregate)

A criterion is ``fn(group, ctx, opts: CriterionOptions) -> np.ndarray`` of shape
``[group.size]``. Built-ins:

* ``l1`` / ``l2``: norm of each channel's slice of every producer filter (via the member's
  ``positions``, so grouped and Flatten blocks are whole slices); with ``consumers=True``
  the consumers' input-channel slices count too. Biases (rank-1 producer members) are left
  out, as in Torch-Pruning's default. Partial members (``group.partial_members``: a
  producer that holds only some of the group's channels, e.g. a Concat branch added to a
  wider residual) count for the channels they hold.
* ``fpgm``: filter pruning via geometric median, with the usual approximation: a filter's
  score is the sum of its Euclidean distances to all other filters of the same layer, so
  filters near the geometric median (the most replaceable ones) score lowest.
* ``bn``: mean |gamma| of the group's BatchNormalization scales (partial ones too: a
  DenseNet BatchNormalization after a Concat scores every branch). A group without
  BatchNormalization (an SE block's reduce Conv, an MLP layer) **falls back to ``l1``**: a
  global ranking must score every group, and raising would make ``bn`` unusable on most real
  models. The fallback is logged (debug level, one line per group).
* ``act`` (in :mod:`.activity`): per-channel mean |activation| or ``1 - APoZ`` from the
  calibration data.
* ``random``: uniform in [0, 1), seeded by ``(seed, group.id)``: a baseline.
* ``recon`` (in :mod:`.reconstruction`): the output error the consumers cannot refit away,
  by greedy backward elimination on calibration activations (``prune``'s default with
  calibration data).

Member scores (one row per member) become a group score with ``aggregate`` (``sum``, ``mean``,
``max``, ``prod``), then :class:`ChannelImportance` normalizes each group (divides by its
``mean``, ``max`` or ``sum``, or ``none``) so that a global ranking can compare groups.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Literal, NamedTuple, get_args

import numpy as np

from edgeopt.ir import EdgeoptError, Model

from .._base import OptionError
from .._named import NamedRegistry

if TYPE_CHECKING:
    from .channel_groups import ChannelGroup, Member

__all__ = ["CRITERIA", "ChannelImportance", "Criterion", "CriterionOptions", "ImportanceError",
           "RankedChannel", "aggregate", "channel_matrix", "evaluate", "filters",
           "get_criterion", "list_criteria", "members", "normalize", "per_channel",
           "prepare", "register_criterion", "unregister_criterion"]

log = logging.getLogger(__name__)

Aggregate = Literal["sum", "mean", "max", "prod"]
Normalize = Literal["mean", "max", "sum", "none"]
ActivationStat = Literal["mean_abs", "apoz"]


class ImportanceError(EdgeoptError):
    """A criterion cannot score a group (nothing to measure, or inconsistent members)."""


@dataclass(frozen=True)
class CriterionOptions:
    """Settings every criterion receives (each reads the ones it understands).

    Attributes:
        aggregate: how member scores become one score per channel.
        consumers: ``l1``/``l2``/``fpgm`` also measure the consumers' input-channel slices.
        activation: ``act`` measures ``mean_abs`` or ``apoz`` (scored as ``1 - APoZ``).
        seed: seed of ``random`` (and of any custom criterion that draws numbers).
        prepared: what the criterion's ``prepare`` hook returned for the groups being scored
            (None when it has no hook or is called on its own); see :func:`register_criterion`.
    """

    aggregate: Aggregate = "mean"
    consumers: bool = False
    activation: ActivationStat = "mean_abs"
    seed: int = 0
    prepared: Any = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        _check_choice("aggregate", self.aggregate, Aggregate)
        _check_choice("activation", self.activation, ActivationStat)


def _check_choice(name: str, value: Any, choices: Any) -> None:
    valid = get_args(choices)
    if value not in valid:
        raise OptionError(f"importance: {name} must be one of {', '.join(valid)}, not {value!r}")


Criterion = Callable[["ChannelGroup", Any, CriterionOptions], np.ndarray]
Prepare = Callable[[Sequence["ChannelGroup"], Any, CriterionOptions], Any]

#: Registered criteria by name; add with :func:`register_criterion`.
CRITERIA: NamedRegistry[Criterion] = NamedRegistry("importance criterion", "criterion",
                                                   "criteria", unknown=OptionError)
_PREPARE: dict[str, Prepare] = {}


def register_criterion(name: str, prepare: Prepare | None = None
                       ) -> Callable[[Criterion], Criterion]:
    """Register an importance criterion under ``name``.

    Args:
        name: lowercase word(s); third-party criteria use a dotted prefix (``acme.linf``).
        prepare: optional ``prepare(groups, ctx, opts) -> state``, called once by
            :class:`ChannelImportance` before it scores ``groups``; the criterion then finds
            ``state`` in ``opts.prepared``. Data-driven criteria use it to measure every
            group in one sweep (``act`` runs the model once, not once per group).

    Returns:
        A decorator that registers the function and returns it unchanged.

    Raises:
        ValueError: the name is malformed or already registered.
    """
    add = CRITERIA.register(name)

    def decorate(fn: Criterion) -> Criterion:
        add(fn)
        if prepare is not None:
            _PREPARE[name] = prepare
        return fn

    return decorate


def unregister_criterion(name: str) -> None:
    """Remove a criterion (tests and interactive sessions)."""
    CRITERIA.pop(name, None)
    _PREPARE.pop(name, None)


def prepare(criterion: str, groups: Sequence[ChannelGroup], ctx: Any,
            opts: CriterionOptions) -> CriterionOptions:
    """``opts`` with ``prepared`` set by the criterion's ``prepare`` hook (if it has one)."""
    hook = _PREPARE.get(criterion)
    return opts if hook is None else replace(opts, prepared=hook(groups, ctx, opts))


def list_criteria() -> list[str]:
    """Every registered criterion name, sorted."""
    return CRITERIA.names()


def get_criterion(name: str) -> Criterion:
    """The criterion registered as ``name``.

    Raises:
        OptionError: unknown name; the message lists the registered ones.
    """
    return CRITERIA.lookup(name)


# -- aggregation and normalization ------------------------------------------------------------
# Member rows may hold NaN where a partial member lacks a channel: aggregate what is present.
_AGGREGATES: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "sum": lambda rows: np.nansum(rows, axis=0),
    "mean": lambda rows: np.nanmean(rows, axis=0),
    "max": lambda rows: np.nanmax(rows, axis=0),
    "prod": lambda rows: np.nanprod(rows, axis=0),
}


def aggregate(rows: Sequence[np.ndarray] | np.ndarray, how: Aggregate = "mean") -> np.ndarray:
    """Combine member scores (one row of ``[size]`` per member) into one score per channel.

    NaN entries (a member that does not hold that channel) are skipped; a channel that no
    member scores stays NaN.

    Raises:
        ImportanceError: no rows, or rows of different lengths.
        OptionError: an unknown ``how``.
    """
    _check_choice("aggregate", how, Aggregate)
    if len(rows) == 0:
        raise ImportanceError("no member scores to aggregate")
    if len({np.shape(r) for r in rows}) != 1:
        raise ImportanceError(f"member scores have different shapes: "
                              f"{sorted({np.shape(r) for r in rows})}")
    stacked = np.asarray(rows, dtype=np.float64).reshape(len(rows), -1)
    missing = np.isnan(stacked).all(axis=0)
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns: handled below
        out = _AGGREGATES[how](stacked)
    out[missing] = np.nan
    return out


_NORMALIZERS: dict[str, Callable[[np.ndarray], float]] = {
    "mean": lambda s: float(s.mean()),
    "max": lambda s: float(s.max()),
    "sum": lambda s: float(s.sum()),
    "none": lambda s: 1.0,
}


def normalize(scores: np.ndarray, how: Normalize = "mean") -> np.ndarray:
    """Scale one group's scores so that groups compare (``scores / mean`` etc.).

    A group whose denominator is 0 or not finite (all scores zero) is left unscaled.
    """
    _check_choice("normalize", how, Normalize)
    scores = np.asarray(scores, dtype=np.float64)
    if scores.size == 0:
        return scores.copy()
    denom = _NORMALIZERS[how](scores)
    return scores / denom if denom != 0 and math.isfinite(denom) else scores.copy()


# -- helpers for criteria ---------------------------------------------------------------------
def _positions(member: Member, size: int | None, length: int) -> np.ndarray:
    """The member's positions as ``[size, k]`` int64, checked against an axis ``length``."""
    pos = np.asarray(member.positions, dtype=np.int64)
    pos = pos[:, None] if pos.ndim == 1 else pos
    if pos.ndim != 2 or (size is not None and pos.shape[0] != size):
        raise ImportanceError(f"member {member.value.name!r}: positions of shape {pos.shape} "
                              f"do not cover the group's {size} channels")
    if pos.size and (pos.min() < -1 or pos.max() >= length):
        raise ImportanceError(f"member {member.value.name!r}: positions exceed the {length} "
                              f"indices of axis {member.axis}")
    return pos


def channel_matrix(member: Member, size: int | None = None) -> np.ndarray:
    """The constant member's slices as rows: ``[size, k * (other elements)]`` in float64.

    Row ``c`` holds every element of ``member.value`` whose index along ``member.axis`` is in
    ``member.positions[c]``; the entries of a position ``-1`` (a partial member that does not
    hold channel ``c``) are NaN.

    Raises:
        ImportanceError: the member is not a constant, or its axis or positions do not fit.
    """
    tensor = member.value.const_value
    if tensor is None:
        raise ImportanceError(f"member {member.value.name!r} is not a constant")
    w = np.asarray(tensor.numpy())
    if w.ndim == 0 or not -w.ndim <= member.axis < w.ndim:
        raise ImportanceError(f"member {member.value.name!r}: axis {member.axis} is out of "
                              f"range for shape {w.shape}")
    pos = _positions(member, size, w.shape[member.axis])
    rows = np.moveaxis(w, member.axis, 0)[np.maximum(pos, 0)].astype(np.float64)
    rows[pos < 0] = np.nan
    return rows.reshape(pos.shape[0], -1)


def per_channel(matrix: np.ndarray, reduce: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """``reduce`` (row-wise, NaN-aware) over the rows of a channel matrix that hold data.

    Rows that are entirely NaN (channels the member does not hold) score NaN.
    """
    out = np.full(matrix.shape[0], np.nan)
    present = ~np.isnan(matrix).all(axis=1) if matrix.shape[1] else np.zeros(len(out), bool)
    out[present] = reduce(matrix[present])
    return out


def members(group: ChannelGroup, role: str, constant: bool = True,
            partial: bool = True) -> list[Member]:
    """The group's members of ``role``, constants only when ``constant``.

    Args:
        group: the group.
        role: ``"out"``, ``"in"``, ``"param"`` or ``"act"``.
        constant: keep only members whose value is a constant.
        partial: include ``group.partial_members`` (members holding only some channels).
    """
    pool = list(group.members) + (list(getattr(group, "partial_members", ())) if partial else [])
    return [m for m in pool if m.role == role
            and (not constant or m.value.const_value is not None)]


def filters(group: ChannelGroup, opts: CriterionOptions, partial: bool = True) -> list[Member]:
    """The weight members that norm-based criteria measure.

    Producer weights of rank >= 2 (biases are left out), plus the consumers' weights of rank
    >= 2 when ``opts.consumers``; partial members too unless ``partial=False``.

    Raises:
        ImportanceError: the group has no such constant.
    """
    chosen = members(group, "out", partial=partial)
    if opts.consumers:
        chosen += members(group, "in", partial=partial)
    chosen = [m for m in chosen if len(m.value.const_value.shape) >= 2]
    if not chosen:
        raise ImportanceError(f"group {group.id} has no constant producer filter to measure")
    return chosen


def _rows(group: ChannelGroup, opts: CriterionOptions, chosen: Sequence[Member],
          reduce: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """``reduce`` each member's channel matrix row-wise, then aggregate the members."""
    rows = [per_channel(channel_matrix(m, group.size), reduce) for m in chosen]
    return aggregate(rows, opts.aggregate)


# -- built-in criteria ------------------------------------------------------------------------
@register_criterion("l1")
def l1(group: ChannelGroup, ctx: Any, opts: CriterionOptions) -> np.ndarray:
    """Sum of |w| over each channel's slice of every producer filter."""
    return _rows(group, opts, filters(group, opts),
                 lambda m: np.nansum(np.abs(m), axis=1))


@register_criterion("l2")
def l2(group: ChannelGroup, ctx: Any, opts: CriterionOptions) -> np.ndarray:
    """Euclidean norm of each channel's slice of every producer filter."""
    return _rows(group, opts, filters(group, opts),
                 lambda m: np.sqrt(np.nansum(np.square(m), axis=1)))


def _distance_sums(m: np.ndarray) -> np.ndarray:
    """``sum_j ||m[c] - m[j]||`` for every row ``c`` (via the Gram matrix: no 3-D array)."""
    sq = np.square(m).sum(axis=1)
    d2 = np.maximum(sq[:, None] + sq[None, :] - 2.0 * (m @ m.T), 0.0)
    np.fill_diagonal(d2, 0.0)
    return np.sqrt(d2).sum(axis=1)


@register_criterion("fpgm")
def fpgm(group: ChannelGroup, ctx: Any, opts: CriterionOptions) -> np.ndarray:
    """Sum of distances from each filter to the other filters of its layer (FPGM).

    Only members holding every channel of the group count: the distance between filters
    is defined over a whole layer.
    """
    return _rows(group, opts, filters(group, opts, partial=False), _distance_sums)


def _bn_scales(group: ChannelGroup) -> list[Member]:
    """BatchNormalization scales, including those of partial members (after a Concat)."""
    partial = [m for m in getattr(group, "partial_members", ())
               if m.role == "param" and getattr(m, "node", None) is not None
               and m.node.op_type == "BatchNormalization" and m.index == 1]
    return list(group.bn_scales()) + partial


@register_criterion("bn")
def bn(group: ChannelGroup, ctx: Any, opts: CriterionOptions) -> np.ndarray:
    """Mean |gamma| of the group's BatchNormalization scales (``l1`` when it has none)."""
    scales = _bn_scales(group)
    if not scales:
        log.debug("importance 'bn': group %d has no BatchNormalization; using 'l1'", group.id)
        return l1(group, ctx, opts)
    return _rows(group, opts, scales, lambda m: np.nanmean(np.abs(m), axis=1))


@register_criterion("random")
def random_scores(group: ChannelGroup, ctx: Any, opts: CriterionOptions) -> np.ndarray:
    """Uniform scores in [0, 1), seeded by ``(opts.seed, group.id)``: a baseline."""
    return np.random.default_rng([opts.seed, group.id]).random(group.size)


# -- evaluation and the analysis --------------------------------------------------------------
def _check_args(criterion: str, normalize: str) -> None:
    get_criterion(criterion)
    _check_choice("normalize", normalize, Normalize)


def evaluate(criterion: str, group: ChannelGroup, ctx: Any,
             opts: CriterionOptions | None = None) -> np.ndarray:
    """Run a criterion on one group and check what it returned.

    Returns:
        float64 scores of shape ``[group.size]``.

    Raises:
        OptionError: unknown criterion.
        ImportanceError: the criterion cannot score the group, or returned a wrong shape or
            non-finite scores.
    """
    fn = get_criterion(criterion)
    scores = np.asarray(fn(group, ctx, opts or CriterionOptions()), dtype=np.float64)
    if scores.shape != (group.size,):
        raise ImportanceError(f"criterion {criterion!r} returned shape {scores.shape} for "
                              f"group {group.id} of {group.size} channels")
    bad = int((~np.isfinite(scores)).sum())
    if bad:
        raise ImportanceError(f"criterion {criterion!r} left {bad} of the {group.size} "
                              f"channels of group {group.id} without a finite score")
    return scores


class RankedChannel(NamedTuple):
    """One channel in a global ranking."""

    group: int
    channel: int
    score: float


class ChannelImportance:
    """Importance of every channel of every channel group (an analysis).

    Requests ``ctx.analysis(ChannelGroups)`` and scores each group with ``criterion``.
    Groups that are not prunable (frozen, or a single channel) are scored too, for
    inspection, when the criterion can; one it cannot score is left out, while a prunable
    group that cannot be scored raises.

    Args:
        model: the model (never modified).
        ctx: the pass context (``ctx.calib`` for ``act``).
        criterion: a registered criterion name.
        aggregate: ``sum|mean|max|prod`` of member scores.
        normalize: ``mean|max|sum|none``: per-group scaling of :attr:`scores`.
        seed: seed of ``random``.
        consumers: ``l1``/``l2``/``fpgm`` also measure consumer input slices.
        activation: ``mean_abs`` or ``apoz`` for ``act``.

    Attributes:
        criterion: the criterion name.
        groups: the :class:`ChannelGroups` analysis scored.
        raw: group id -> aggregated scores before normalization.
        scores: group id -> normalized scores (what pruning compares), ``[group.size]``.

    Raises:
        OptionError: unknown criterion, aggregate or normalize.
        CalibrationError: ``act`` without calibration data.
        ImportanceError: a prunable group cannot be scored.
    """

    def __init__(self, model: Model, ctx: Any, criterion: str = "l1",
                 aggregate: Aggregate = "mean", normalize: Normalize = "mean", seed: int = 0,
                 consumers: bool = False, activation: ActivationStat = "mean_abs") -> None:
        from .channel_groups import ChannelGroups

        options = CriterionOptions(aggregate, consumers, activation, seed)
        _check_args(criterion, normalize)
        self._setup(ctx.analysis(ChannelGroups), ctx, criterion, options, normalize)

    @classmethod
    def from_groups(cls, groups: Any, ctx: Any, criterion: str = "l1",
                    options: CriterionOptions | None = None,
                    normalize: Normalize = "mean") -> ChannelImportance:
        """Score given groups instead of requesting the ``ChannelGroups`` analysis.

        Args:
            groups: anything with ``groups`` (a list of ChannelGroup) and ``prunable()``.
            ctx: the pass context.
            criterion: a registered criterion name.
            options: the criterion options (default: :class:`CriterionOptions`).
            normalize: per-group scaling of :attr:`scores`.
        """
        _check_args(criterion, normalize)
        self = cls.__new__(cls)
        self._setup(groups, ctx, criterion, options or CriterionOptions(), normalize)
        return self

    def _setup(self, groups: Any, ctx: Any, criterion: str, options: CriterionOptions,
               normalization: Normalize) -> None:
        self.criterion = criterion
        self.options = options
        self.normalization = normalization
        self.groups = groups
        self.raw: dict[int, np.ndarray] = {}
        self.scores: dict[int, np.ndarray] = {}
        self._prunable = {g.id for g in groups.prunable()}
        options = prepare(criterion, groups.groups, ctx, options)
        progress = getattr(ctx, "progress", None)
        for i, group in enumerate(groups.groups):
            if progress is not None:
                progress(f"importance ({criterion})", i, len(groups.groups))
            try:
                raw = evaluate(criterion, group, ctx, options)
            except ImportanceError as e:
                if group.id in self._prunable:
                    raise
                log.debug("importance: unprunable group %d not scored: %s", group.id, e)
                continue
            self.raw[group.id] = raw
            self.scores[group.id] = normalize(raw, normalization)
        if progress is not None:
            progress(f"importance ({criterion})", len(groups.groups), len(groups.groups))

    def __getitem__(self, group: ChannelGroup | int) -> np.ndarray:
        """Normalized scores of a group (or group id)."""
        return self.scores[group if isinstance(group, int) else group.id]

    def __contains__(self, group: ChannelGroup | int) -> bool:
        return (group if isinstance(group, int) else group.id) in self.scores

    def ranking(self, include_frozen: bool = False) -> list[RankedChannel]:
        """Every scored channel, least important first (ties: group id, then channel).

        Args:
            include_frozen: also list the channels of groups that are not prunable (frozen,
                or a single channel).
        """
        ranked = [RankedChannel(gid, c, float(s))
                  for gid, scores in self.scores.items()
                  if include_frozen or gid in self._prunable
                  for c, s in enumerate(scores)]
        return sorted(ranked, key=lambda r: (r.score, r.group, r.channel))

    def __repr__(self) -> str:
        channels = sum(s.size for s in self.scores.values())
        return (f"ChannelImportance({self.criterion!r}, {len(self.scores)} groups, "
                f"{channels} channels)")
