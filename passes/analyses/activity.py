"""The ``act`` importance criterion: how active each channel is on the calibration data.

Per-channel mean |activation| (``activation="mean_abs"``) or ``1 - APoZ`` (average percentage
of zeros, ``activation="apoz"``) from the :class:`~edgeopt.passes.analyses.activations.
Activations` analysis over ``ctx.calib``. It reads the activations the group's consumers read
(what the next layers see, e.g. after the ReLU), or every activation of the group when no
consumer weight reads one; only those values are measured, in one sweep for all groups (its
``prepare`` hook). Raises :class:`~edgeopt.passes.CalibrationError` without calibration data.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from .._base import CalibrationError
from .importance import (
    ActivationStat,
    CriterionOptions,
    ImportanceError,
    _positions,
    aggregate,
    members,
    per_channel,
    register_criterion,
)

if TYPE_CHECKING:
    from .channel_groups import ChannelGroup, Member

__all__ = ["act"]


def _require_calib(ctx: Any) -> None:
    if getattr(ctx, "calib", None) is None:
        raise CalibrationError("importance criterion 'act' needs calibration data (--calib); "
                               "use a weight criterion (l1, l2, fpgm, bn) without it")


def _act_values(groups: Iterable[ChannelGroup]) -> tuple[str, ...]:
    """Names of the activations ``act`` reads for ``groups``, in order, without repeats."""
    return tuple(dict.fromkeys(m.value.name for g in groups for m in _float_activations(g)))


def _float_activations(group: ChannelGroup) -> list[Member]:
    """The consumed activations, without values known not to be float (never measured)."""
    from .activations import FLOAT_TYPES

    return [m for m in _consumed_activations(group)
            if m.value.dtype is None or m.value.dtype in FLOAT_TYPES]


def _prepare_act(groups: Sequence[ChannelGroup], ctx: Any, opts: CriterionOptions) -> Any:
    """Measure the activations of every group in one sweep over the calibration data."""
    from .activations import Activations

    _require_calib(ctx)
    names = _act_values(groups)
    return ctx.analysis(Activations, values=names) if names else None


@register_criterion("act", prepare=_prepare_act)
def act(group: ChannelGroup, ctx: Any, opts: CriterionOptions) -> np.ndarray:
    """Mean |activation| (or 1 - APoZ) of each channel over the calibration data."""
    from .activations import Activations

    _require_calib(ctx)
    chosen = _float_activations(group)
    if not chosen:
        raise ImportanceError(f"group {group.id} has no float activation to measure")
    acts = opts.prepared
    if acts is None or not {m.value.name for m in chosen} <= set(acts.values):
        acts = ctx.analysis(Activations, values=_act_values([group]))
    samples = _num_samples(ctx.calib)
    rows = [_activation_row(acts, m, group.size, opts.activation, samples) for m in chosen]
    return aggregate(rows, opts.aggregate)


def _readers(member: Member) -> list[Any]:
    """The nodes that read a constant member (its ``node`` when the member names it)."""
    node = getattr(member, "node", None)
    return [node] if node is not None else [use.node for use in member.value.uses()]


def _consumed_activations(group: ChannelGroup) -> list[Member]:
    """The group's activations that its consumer weights' nodes read (else all of them)."""
    acts = members(group, "act", constant=False)
    readers = {id(n) for m in members(group, "in") for n in _readers(m)}
    chosen = [m for m in acts if any(id(use.node) in readers for use in m.value.uses())]
    return chosen or acts


def _num_samples(calib: Any) -> int:
    """Samples in ``ctx.calib`` (a CalibrationData, or a mapping of input arrays)."""
    if hasattr(calib, "num_samples"):
        return int(calib.num_samples)
    return max((len(a) for a in calib.values()), default=1)


def _activation_row(acts: Any, member: Member, size: int, stat: ActivationStat,
                    samples: int) -> np.ndarray:
    """Per-channel statistic of one activation member, read at its positions."""
    name = member.value.name
    stats = acts.stats.get(name)
    per_index = None
    if stats is not None and member.axis == 1:
        per_index = stats.channel_mean_abs if stat == "mean_abs" else \
            stats.channel_zero_fraction
    if per_index is None:  # another axis (MatMul features), or not measured: raw samples
        per_index = _reduce_samples(acts.sample(name, samples), member.axis, stat, name)
    per_index = np.asarray(per_index, dtype=np.float64)
    pos = _positions(member, size, per_index.shape[0])
    gathered = np.where(pos >= 0, per_index[np.maximum(pos, 0)], np.nan)
    # k > 1 is a Flatten block: every index holds as many elements, so the plain mean is right.
    row = per_channel(gathered, lambda m: np.nanmean(m, axis=1))
    return row if stat == "mean_abs" else 1.0 - row


def _reduce_samples(x: np.ndarray, axis: int, stat: ActivationStat, name: str) -> np.ndarray:
    if not -x.ndim <= axis < x.ndim:
        raise ImportanceError(f"activation {name!r}: axis {axis} is out of range for shape "
                              f"{x.shape}")
    others = tuple(i for i in range(x.ndim) if i != axis % x.ndim)
    x = x.astype(np.float64)
    return np.abs(x).mean(axis=others) if stat == "mean_abs" else (x == 0).mean(axis=others)
