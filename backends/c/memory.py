"""Static memory planning: offsets of activation buffers inside one aligned arena.

The planner knows nothing about the IR. A schedule is a sequence of integer steps; a
:class:`Buffer` is live over the *closed* interval ``[first, last]`` of steps (the step that
writes it through the last step that reads it). Two buffers live at a common step need disjoint
byte ranges, so an op's inputs and outputs never share bytes, except through an in-place alias:
``inplace_of=P`` lets a buffer reuse the exact storage of ``P`` when ``P`` dies at the step that
writes the buffer (``P.last == first``) and the buffer is not larger than ``P``; a buffer gives
its storage to one child. Aliases chain (``A <- Relu <- Add``); a chain is placed as one unit at
one offset. :attr:`Plan.aliases` lists the reuses a plan relies on: the emitter must write those
outputs in place, and the rest to their own offsets.

:func:`plan` runs a few cheap heuristics (greedy first-fit in four orders, best-fit on a
skyline with the same four priorities), then a short seeded local search over the best greedy
order, and returns the smallest plan. Its candidates include :func:`greedy_by_size` (TFLite
Micro's ``GreedyMemoryPlanner``) with and without the in-place aliases, so it is never worse than
either; when the plan without aliases wins, :attr:`Plan.aliases` is empty. Every step is
deterministic: effort is bounded by a count of evaluations, never by wall time, and no order
depends on string hashing.
"""

from __future__ import annotations

import random
from bisect import bisect_right
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import accumulate

__all__ = [
    "STRATEGIES", "Buffer", "LiveBuffer", "Peak", "Plan", "PlanError", "align_up",
    "greedy_by_size", "liveness", "peak", "plan",
]


class PlanError(ValueError):
    """Invalid buffers, or a plan that places two simultaneously live buffers on common bytes."""


@dataclass(frozen=True)
class Buffer:
    """A tensor to place in the arena.

    Attributes:
        name: unique name.
        size: bytes (0 is allowed: such a buffer occupies nothing).
        first: the step that writes it (inputs written before the schedule: 0).
        last: the last step that reads it (graph outputs: the last step), ``>= first``.
        inplace_of: a buffer whose storage this one may share (see the module docstring).
    """

    name: str
    size: int
    first: int
    last: int
    inplace_of: str | None = None


@dataclass(frozen=True)
class LiveBuffer:
    """A buffer live at some step: its aligned bytes, and whose storage it shares, if any."""

    name: str
    size: int
    shares: str | None = None


@dataclass(frozen=True)
class Peak:
    """The step with the most live bytes and what is live there (for ``--budget`` messages).

    Attributes:
        step: the earliest step reaching ``total`` (None without buffers).
        total: aligned bytes live at ``step``, storage shared in place counted once.
        live: the live buffers, largest first.
    """

    step: int | None
    total: int
    live: tuple[LiveBuffer, ...] = ()

    def describe(self, limit: int = 8) -> str:
        """One line: ``peak 4,096 B at step 3: a 2,048 B, b 2,048 B`` (at most ``limit``)."""
        parts = [f"{b.name} {b.size:,} B" + (f" (in place of {b.shares})" if b.shares else "")
                 for b in self.live[:limit]]
        if len(self.live) > limit:
            parts.append(f"{len(self.live) - limit} more")
        return f"peak {self.total:,} B at step {self.step}: " + ", ".join(parts)


@dataclass(frozen=True)
class Plan:
    """Offsets of every buffer in one arena.

    Attributes:
        offsets: buffer name -> byte offset (a multiple of ``alignment``).
        arena_size: bytes the arena needs (a multiple of ``alignment``).
        lower_bound: the most aligned bytes live at any one step; no plan can be smaller.
        naive_size: the sum of all aligned sizes (every buffer at its own offset).
        alignment: the alignment of offsets and sizes.
        aliases: the honoured in-place aliases, buffer -> the buffer whose storage it shares.
        strategy: the heuristic that produced the plan.
    """

    offsets: dict[str, int]
    arena_size: int
    lower_bound: int
    naive_size: int
    alignment: int
    aliases: dict[str, str] = field(default_factory=dict)
    strategy: str = ""

    def check(self, buffers: Sequence[Buffer]) -> None:
        """Verify the plan for ``buffers``.

        Raises:
            PlanError: a buffer is missing, misaligned or outside the arena, an alias is not
                a legal in-place reuse, or two simultaneously live buffers share bytes.
        """
        _validate(buffers, self.alignment)
        if set(self.offsets) != {b.name for b in buffers}:
            raise PlanError("plan and buffers name different tensors")
        by_name = {b.name: b for b in buffers}
        for child, parent in self.aliases.items():
            c, p = by_name.get(child), by_name.get(parent)
            if c is None or p is None or c.inplace_of != parent or p.last != c.first \
                    or c.size > p.size or self.offsets[child] != self.offsets[parent]:
                raise PlanError(f"alias {child} -> {parent} is not a legal in-place reuse")
        size = {b.name: align_up(b.size, self.alignment) for b in buffers}
        for b in buffers:
            off = self.offsets[b.name]
            if off < 0 or off % self.alignment or off + size[b.name] > self.arena_size:
                raise PlanError(f"{b.name} at {off} (+{size[b.name]}) is misaligned or outside "
                                f"the {self.arena_size}-byte arena")
        active: list[Buffer] = []
        for b in sorted(buffers, key=lambda b: b.first):
            active = [a for a in active if a.last >= b.first]
            for a in active:
                if self.aliases.get(a.name) == b.name or self.aliases.get(b.name) == a.name:
                    continue
                lo, hi = self.offsets[a.name], self.offsets[b.name]
                if size[a.name] and size[b.name] and lo < hi + size[b.name] \
                        and hi < lo + size[a.name]:
                    raise PlanError(
                        f"{a.name} [{lo}, {lo + size[a.name]}) steps {a.first}..{a.last} "
                        f"overlaps {b.name} [{hi}, {hi + size[b.name]}) steps {b.first}..{b.last}")
            active.append(b)


def align_up(n: int, alignment: int) -> int:
    """``n`` rounded up to a multiple of ``alignment``."""
    return -(-n // alignment) * alignment


def liveness(steps: Sequence[tuple[Iterable[str], Iterable[str]]], sizes: Mapping[str, int],
             outputs: Iterable[str] = (), inplace: Mapping[str, str] | None = None,
             views: Mapping[str, str] | None = None) -> list[Buffer]:
    """Buffers of a schedule: step ``i`` is ``(written names, read names)``.

    Only names in ``sizes`` get buffers (constants and caller-owned tensors are left out). A
    name never written is written before step 0. ``outputs`` live to the last step. ``inplace``
    maps an output to the input it may overwrite. ``views`` maps a name to the name whose
    storage it *is* (a reshape emitted as no code): its uses extend that buffer's lifetime.

    Returns:
        One :class:`Buffer` per name in ``sizes`` that the schedule or ``outputs`` mention,
        in order of first mention.
    """
    views = views or {}
    first: dict[str, int] = {}
    last: dict[str, int] = {}

    def touch(name: str, step: int, writes: bool) -> None:
        name = views.get(name, name)
        if name in sizes:
            first.setdefault(name, step if writes else 0)
            last[name] = max(last.get(name, step), step)

    for i, (written, read) in enumerate(steps):
        for name in read:
            touch(name, i, False)
        for name in written:
            touch(name, i, True)
    for name in outputs:
        touch(name, max(len(steps) - 1, 0), False)
    inplace = inplace or {}
    return [Buffer(n, sizes[n], first[n], last[n], inplace.get(n)) for n in first]


# --- groups: the units the heuristics place ---------------------------------------------------

@dataclass(frozen=True)
class _Group:
    """Buffers sharing one offset: ``segs`` are their ``(first, last, aligned size)``."""

    index: int
    members: tuple[int, ...]
    segs: tuple[tuple[int, int, int], ...]
    first: int
    last: int
    size: int


def _validate(buffers: Sequence[Buffer], alignment: int) -> None:
    """Raise :class:`PlanError` on inputs no plan can be built for."""
    if not isinstance(alignment, int) or alignment < 1:
        raise PlanError(f"alignment must be a positive integer, got {alignment!r}")
    names: set[str] = set()
    for b in buffers:
        if b.name in names:
            raise PlanError(f"duplicate buffer name {b.name!r}")
        names.add(b.name)
        if b.size < 0 or b.first > b.last:
            raise PlanError(f"{b.name}: size {b.size}, steps {b.first}..{b.last} are invalid")
    for b in buffers:
        if b.inplace_of is not None and (b.inplace_of not in names or b.inplace_of == b.name):
            raise PlanError(f"{b.name}: in-place target {b.inplace_of!r} is not another buffer")


def _resolve_aliases(buffers: Sequence[Buffer]) -> dict[str, str]:
    """The in-place aliases to honour, child -> parent, chosen identically by every strategy.

    A parent gives its storage to one child (the first by step, then by position). A chain
    only continues through a buffer that outlives the step that writes it, so the members of a
    chain overlap pairwise only at their shared boundary steps.
    """
    by_name = {b.name: b for b in buffers}
    honoured: dict[str, str] = {}
    taken: set[str] = set()
    order = sorted(range(len(buffers)), key=lambda i: (buffers[i].first, i))
    for b in (buffers[i] for i in order):
        parent = by_name.get(b.inplace_of) if b.inplace_of else None
        if parent is None or parent.name in taken or parent.last != b.first \
                or b.size > parent.size:
            continue
        if (parent.name in honoured and parent.first == parent.last) \
                or (b.name in taken and b.first == b.last):
            continue  # a zero-length link would let its neighbours meet in the same bytes
        honoured[b.name] = parent.name
        taken.add(parent.name)
    return honoured


def _groups(buffers: Sequence[Buffer], alignment: int, aliases: Mapping[str, str]) -> list[_Group]:
    """Group buffers by the root of their alias chain, in order of the roots' positions."""
    index = {b.name: i for i, b in enumerate(buffers)}
    members: dict[int, list[int]] = {}
    for i, b in enumerate(buffers):
        root = b.name
        while root in aliases:
            root = aliases[root]
        members.setdefault(index[root], []).append(i)
    groups = []
    for _, ms in sorted(members.items()):
        segs = tuple((buffers[i].first, buffers[i].last, align_up(buffers[i].size, alignment))
                     for i in ms if buffers[i].size)  # empty: the group is never placed
        groups.append(_Group(len(groups), tuple(ms), segs, min((s[0] for s in segs), default=0),
                             max((s[1] for s in segs), default=0),
                             max((s[2] for s in segs), default=0)))
    return groups


# --- placement ---------------------------------------------------------------------------------

def _first_fit(forbidden: list[tuple[int, int]]) -> int:
    """The lowest offset ``p >= 0`` in no forbidden open interval ``(lo, hi)``."""
    p = 0
    for lo, hi in sorted(forbidden):
        if lo >= p:
            break
        p = max(p, hi)
    return p


def _place(groups: Sequence[_Group], order: Iterable[int]) -> tuple[list[int], int]:
    """Greedy first-fit: returns (offsets, arena top).

    Each group in turn goes to the lowest offset clear of every placed group it meets in time
    (compared member by member, so a chain narrower at one end packs tightly).
    """
    offsets = [0] * len(groups)
    placed: list[_Group] = []
    top = 0
    for g in (groups[i] for i in order):
        if not g.segs:
            continue
        forbidden = []
        for h in placed:
            if h.first > g.last or g.first > h.last:
                continue
            o = offsets[h.index]
            for f1, l1, m in h.segs:
                for f2, l2, n in g.segs:
                    if f1 <= l2 and f2 <= l1:
                        forbidden.append((o - n, o + m))
        offsets[g.index] = _first_fit(forbidden)
        top = max(top, offsets[g.index] + g.size)
        placed.append(g)
    return offsets, top


def _skyline(groups: Sequence[_Group], key: Callable[[_Group], tuple]) -> tuple[list[int], int]:
    """Best-fit on a skyline (Burke et al. 2004; Sekiyama et al. 2018 for DNN arenas).

    Take the lowest run of steps of the skyline (the top of everything placed so far); place
    there the first group by ``key`` whose lifetime lies inside the run, or, when none does,
    raise the run to its lower neighbour. Holes under the skyline are never filled.
    """
    times = sorted({t for g in groups for f, last, _ in g.segs for t in (f, last)})
    at = {t: i for i, t in enumerate(times)}
    height, offsets, top = [0] * len(times), [0] * len(groups), 0
    todo = sorted((g for g in groups if g.segs), key=lambda g: (*key(g), g.index))
    while todo:
        low = min(height)
        a = b = height.index(low)
        while b + 1 < len(height) and height[b + 1] == low:
            b += 1
        g = next((g for g in todo if a <= at[g.first] and at[g.last] <= b), None)
        if g is None:
            sides = [height[i] for i in (a - 1, b + 1) if 0 <= i < len(height)]
            height[a:b + 1] = [min(sides)] * (b + 1 - a)
            continue
        todo.remove(g)
        offsets[g.index], top = low, max(top, low + g.size)
        for f, last, size in g.segs:
            for i in range(at[f], at[last] + 1):
                height[i] = max(height[i], low + size)
    return offsets, top


_KEYS: dict[str, Callable[[_Group], tuple]] = {
    "size": lambda g: (-g.size,),
    "area": lambda g: (-g.size * (g.last - g.first + 1), -g.size),
    "lifetime": lambda g: (g.first - g.last, -g.size),
    "first-use": lambda g: (g.first, -g.size),
}

#: Strategy names accepted by :func:`plan`: ``"greedy/<key>"`` (groups in order of ``key``,
#: each at its lowest free offset; ``greedy/size`` is TFLite Micro's) and ``"skyline/<key>"``.
STRATEGIES: tuple[str, ...] = tuple(f"{kind}/{key}" for kind in ("greedy", "skyline")
                                    for key in _KEYS)

#: Local-search work of :func:`plan`: evaluations x groups**2 (about a second of Python).
SEARCH_WORK = 2_000_000


def _run(groups: Sequence[_Group], name: str) -> tuple[list[int], int, list[int] | None]:
    """One strategy: (offsets, arena top, the order for greedy placements or None)."""
    kind, key = name.split("/")
    if kind == "skyline":
        return (*_skyline(groups, _KEYS[key]), None)
    order = [g.index for g in sorted(groups, key=lambda g: (*_KEYS[key](g), g.index))]
    return (*_place(groups, order), order)


def _improve(groups: Sequence[_Group], order: list[int], top: int, floor: int,
             evaluations: int) -> tuple[list[int], int]:
    """Seeded local search over a greedy placement's order.

    Swap two random groups and keep the swap when the arena does not grow (plateau moves let
    the search drift); stop at ``floor`` or after ``evaluations``. Returns (offsets, top).
    """
    rng = random.Random(0)
    offsets, _ = _place(groups, order)
    for _ in range(evaluations if len(order) > 1 else 0):
        if top <= floor:
            break
        i, j = rng.sample(range(len(order)), 2)
        trial = order[:]
        trial[i], trial[j] = trial[j], trial[i]
        trial_offsets, trial_top = _place(groups, trial)
        if trial_top <= top:
            order, offsets, top = trial, trial_offsets, trial_top
    return offsets, top


# --- public entry points ----------------------------------------------------------------------

def peak(buffers: Sequence[Buffer], alignment: int = 16) -> Peak:
    """The step where the most aligned bytes are live, and the buffers live there.

    A buffer sharing storage in place with another live one is listed with ``shares`` set and
    its bytes are not counted again. ``peak(...).total`` is :attr:`Plan.lower_bound`.
    """
    _validate(buffers, alignment)
    aliases = _resolve_aliases(buffers)
    live = [b for b in buffers if b.size]
    steps = sorted({b.first for b in live})
    if not steps:
        return Peak(None, 0)
    where = {t: i for i, t in enumerate(steps)}
    delta = [0] * (len(steps) + 1)
    for b in live:
        size, i = align_up(b.size, alignment), where[b.first]
        delta[i] += size
        delta[bisect_right(steps, b.last)] -= size
        if b.name in aliases:  # parent and child meet at this step in the same bytes
            delta[i] -= size
            delta[i + 1] += size
    totals = list(accumulate(delta[:-1]))
    step = steps[totals.index(max(totals))]
    here = [b for b in live if b.first <= step <= b.last]
    shared = {b.name: aliases[b.name] for b in here if aliases.get(b.name) in
              {h.name for h in here}}
    entries = [LiveBuffer(b.name, align_up(b.size, alignment), shared.get(b.name)) for b in here]
    entries.sort(key=lambda e: (e.shares is not None, -e.size))
    return Peak(step, max(totals), tuple(entries))


def _best_of(buffers: Sequence[Buffer], alignment: int, aliases: Mapping[str, str],
             names: Sequence[str], floor: int, evaluations: int | None
             ) -> tuple[int, str, dict[str, int]]:
    """The smallest plan among ``names`` and a local search from the best greedy order.

    The search is skipped when ``evaluations == 0``.

    Returns:
        (arena top, strategy, buffer name -> offset).
    """
    groups = _groups(buffers, alignment, aliases)
    runs = [(name, *_run(groups, name)) for name in names]
    name, offsets, top, _ = min(runs, key=lambda r: r[2])
    if top > floor and evaluations != 0:
        start = min((r for r in runs if r[3] is not None), key=lambda r: r[2])
        budget = evaluations or min(1000, SEARCH_WORK // len(groups) ** 2)
        found, improved = _improve(groups, start[3], start[2], floor, budget)
        if improved < top:
            name, offsets, top = start[0] + "+search", found, improved
    by_group = {i: offsets[g.index] for g in groups for i in g.members}
    return top, name, {b.name: by_group[i] for i, b in enumerate(buffers)}


def plan(buffers: Sequence[Buffer], alignment: int = 16, strategy: str = "best",
         evaluations: int | None = None) -> Plan:
    """Assign arena offsets to ``buffers``.

    Args:
        buffers: the buffers with lifetimes and in-place aliases.
        alignment: alignment of offsets and sizes, in bytes.
        strategy: ``"best"`` or one name from :data:`STRATEGIES`. ``"best"`` runs them all,
            then a local search from the best greedy order, and also TFLite Micro's plan
            without in-place reuse; the smallest arena wins (ties: the earlier candidate).
        evaluations: local-search budget in placements (``"best"`` only); the default scales
            down with the square of the number of buffers, keeping planning well under a second.

    Returns:
        A checked :class:`Plan`. Its ``aliases`` are the in-place reuses it relies on.

    Raises:
        PlanError: invalid buffers or an unknown strategy.
    """
    _validate(buffers, alignment)
    if strategy != "best" and strategy not in STRATEGIES:
        raise PlanError(f"unknown strategy {strategy!r}; expected best or one of "
                        + ", ".join(STRATEGIES))
    aliases = _resolve_aliases(buffers)
    floor = peak(buffers, alignment).total
    best = strategy == "best"
    top, name, offsets = _best_of(buffers, alignment, aliases, STRATEGIES if best else (strategy,),
                                  floor, evaluations if best else 0)
    if best and aliases:  # forced in-place chains can cost more than they save
        plain = _best_of(buffers, alignment, {}, ("greedy/size",), floor, 0)
        if plain[0] < top:
            (top, name, offsets), aliases = plain, {}
            name += ", no in-place"
    result = Plan(offsets, top, floor, sum(align_up(b.size, alignment) for b in buffers),
                  alignment, aliases, name)
    result.check(buffers)
    return result


def greedy_by_size(buffers: Sequence[Buffer], alignment: int = 16) -> Plan:
    """TFLite Micro's ``GreedyMemoryPlanner`` (strategy ``greedy/size``).

    Largest buffer first (stable on ties), each at the lowest offset clear of every placed
    buffer whose lifetime overlaps its own.
    """
    return plan(buffers, alignment, "greedy/size")
