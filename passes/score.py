"""``score``: compute channel importance and attach it to the producers' outputs.

``score:l2`` runs the :class:`~edgeopt.passes.analyses.importance.ChannelImportance` analysis
and writes each producer's per-channel scores into ``Value.meta["edgeopt.importance"]`` of its
output (a dict criterion -> float64 array over the output's channels), for inspection and for
tools that read the IR. ``prune`` requests the same analysis itself, so running ``score`` first
is optional; when it ran with the same options, ``prune`` reuses the cached analysis.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import numpy as np

from edgeopt.ir import Model, Value

from ._base import Context, OptionError, PassResult
from ._registry import register_pass
from .analyses.importance import (
    ActivationStat,
    Aggregate,
    ChannelImportance,
    Normalize,
    get_criterion,
    members,
)

__all__ = ["META_KEY", "ScoreOptions", "analysis_params", "score"]

#: The ``Value.meta`` key the scores are written under.
META_KEY = "edgeopt.importance"


@dataclass(frozen=True)
class ScoreOptions:
    """Options of the ``score`` pass (see :class:`ChannelImportance` for their meaning).

    Attributes:
        criterion: a registered importance criterion (``l1``, ``l2``, ``fpgm``, ``bn``,
            ``act``, ``random`` or a custom one).
        aggregate: how member scores combine into one score per channel.
        normalize: per-group scaling of the written scores.
        seed: seed of the ``random`` criterion.
        consumers: ``l1``/``l2``/``fpgm`` also measure the consumers' input slices.
        activation: ``mean_abs`` or ``apoz`` for ``act``.
    """

    criterion: str = "l1"
    aggregate: Aggregate = "mean"
    normalize: Normalize = "mean"
    seed: int = 0
    consumers: bool = False
    activation: ActivationStat = "mean_abs"

    def validate(self) -> None:
        """Reject an unknown criterion (the message lists the registered ones).

        Raises:
            ValueError: unknown criterion.
        """
        try:
            get_criterion(self.criterion)
        except OptionError as e:
            raise ValueError(str(e)) from None


def analysis_params(opts: ScoreOptions) -> dict[str, Any]:
    """``ChannelImportance`` parameters for ``opts``: the criterion and non-default options.

    Defaults are left out so that ``ctx.analysis(ChannelImportance, criterion=...)`` from
    another pass hits the same cache entry.
    """
    params: dict[str, Any] = {"criterion": opts.criterion}
    for f in fields(opts):
        if f.name != "criterion" and getattr(opts, f.name) != f.default:
            params[f.name] = getattr(opts, f.name)
    return params


def _producer_outputs(group: Any) -> list[tuple[Value, Any]]:
    """(output value of a producer node, its weight member) for every producer filter.

    Partial members count (they annotate the channels they hold); biases (rank-1 members)
    are skipped, their node is reached through the filter.
    """
    found = []
    for member in members(group, "out"):
        if len(member.value.const_value.shape) < 2:
            continue
        node = getattr(member, "node", None)
        nodes = [node] if node is not None else [u.node for u in member.value.uses()]
        found += [(n.outputs[0], member) for n in nodes if n.outputs]
    return found


def _write(arrays: dict[int, tuple[Value, np.ndarray]], value: Value, member: Any,
           scores: np.ndarray) -> None:
    """Scatter group scores onto the output channels the member's positions name."""
    channels = member.value.const_value.shape[member.axis]
    if id(value) not in arrays:
        arrays[id(value)] = (value, np.full(channels, np.nan))
    out = arrays[id(value)][1]
    positions = np.asarray(member.positions, dtype=np.int64).reshape(len(scores), -1)
    held = positions >= 0  # -1: a partial member does not hold that channel
    out[positions[held]] = np.broadcast_to(scores[:, None], positions.shape)[held]


@register_pass("score", options=ScoreOptions, primary="criterion")
def score(model: Model, ctx: Context, opts: ScoreOptions) -> PassResult:
    """Score channel importance and write it to Value.meta (never modifies the model).

    Requests ``ChannelImportance`` (and through it ``ChannelGroups``; ``Activations`` for
    ``act``). For every scored group and every producer filter in it, the producer node's
    first output gets ``meta["edgeopt.importance"][criterion]``: the group's normalized
    scores at the producer's output channels (NaN for channels no group scored).
    Preconditions: none (``act`` needs ``ctx.calib``). Preserves: everything; ``Value.meta``
    is analysis scratch, never serialized, and does not change ``model.version``.

    Stats: ``groups`` scored and their ``channels``.
    """
    importance = ctx.analysis(ChannelImportance, **analysis_params(opts))
    arrays: dict[int, tuple[Value, np.ndarray]] = {}
    for group in importance.groups.groups:
        if group.id not in importance.scores:
            continue
        for value, member in _producer_outputs(group):
            _write(arrays, value, member, importance.scores[group.id])
    for value, out in arrays.values():
        value.meta.setdefault(META_KEY, {})[opts.criterion] = out
    channels = sum(s.size for s in importance.scores.values())
    ctx.log.info("score %s: %d groups, %d channels, %d producer outputs annotated",
                 opts.criterion, len(importance.scores), channels, len(arrays))
    return PassResult(modified=False, preserved="all",
                      stats={"groups": len(importance.scores), "channels": channels})
