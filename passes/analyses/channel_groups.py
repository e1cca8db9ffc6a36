"""``ChannelGroups``: which tensor axes must shrink together when channels are pruned.

A *channel group* is a set of tensor axes (weights, biases, BN parameters, per-channel
constants, activations) that shrink together, with an index map per member (see
``docs/design/pruning.md``). The analysis works on *atoms*: every channel producer (a Conv or
ConvTranspose output channel, a Gemm/MatMul output feature with a constant weight) creates one
atom per channel, and per-op *channel rules* (:data:`CHANNEL_RULES`, filled with
:func:`channel_rule`; the built-ins live in :mod:`edgeopt.passes._prune_rules`) propagate the
atoms through the graph in topological order:

- a value that carries channels has :class:`Labels` (the axis, and the atom at each position:
  a Flatten output repeats each atom ``H*W`` times, a Concat output chains its inputs' atoms);
- an elementwise op (residual Add, SE gating Mul, ...) unions the atoms it lines up, position by
  position (union-find), and a grouped Conv unions the input channels of each conv group;
- the equivalence classes of atoms are the *channels* that are removed as a whole; a *group* is
  a connected set of producers whose channels were coupled, so that a residual stage is one
  group and every branch of a Concat keeps its own group.

Anything not understood freezes the channels it touches, with the reason: a graph output, a
value read inside a subgraph, an op without a rule, a rule that raises :class:`Unsupported`
(channel shuffle, Gather on channels, non-static sizes, ...). The result is never a wrong
model: a value whose channels are not tracked never changes shape, because every group that
could change it is frozen.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from edgeopt.ir import Graph, Model, Node, Tensor, Value

from .._util import NameGen, ShapeOracle, constant_tensor, is_default_domain

if TYPE_CHECKING:
    from edgeopt.ir import Shape

__all__ = ["CHANNEL_RULES", "ChannelGroup", "ChannelGroups", "Effects", "Fixup", "Labels",
           "Member", "Record", "RuleEnv", "Unsupported", "channel_rule", "node_name"]

log = logging.getLogger(__name__)

Keep = Callable[[np.ndarray], np.ndarray]  # atoms -> boolean mask of the positions kept


# -- what rules see and return --------------------------------------------------------------------
class Unsupported(Exception):
    """A rule does not understand a node; the message is the frozen reason."""


@dataclass(frozen=True, eq=False)
class Labels:
    """The channels a value carries: ``atoms[p]`` is the atom at position ``p`` of ``axis``."""

    axis: int
    rank: int
    atoms: np.ndarray

    def __len__(self) -> int:
        return len(self.atoms)

    def moved(self, axis: int, rank: int | None = None) -> Labels:
        """The same atoms on another axis (Transpose, Squeeze, ...)."""
        return Labels(axis, self.rank if rank is None else rank, self.atoms)


@dataclass(eq=False)
class Record:
    """A tensor axis that shrinks with its atoms.

    Attributes:
        value: the tensor (a constant read by ``node`` at input ``index``, or an activation).
        axis: the axis that shrinks.
        atoms: the atom at each position of ``axis``.
        role: ``"out"`` (producer weight/bias), ``"in"`` (consumer weight), ``"param"``
            (BN and per-channel constants), ``"act"`` (activation).
        node: the node reading a constant (None for activations).
        index: the input index of a constant in ``node``.
    """

    value: Value
    axis: int
    atoms: np.ndarray
    role: str
    node: Node | None = None
    index: int | None = None


@dataclass(eq=False)
class Fixup:
    """A rewrite beyond slicing, applied by the prune pass as ``apply(self, keep, names)``."""

    node: Node
    apply: Callable[[Fixup, Keep, NameGen], None]
    data: dict[str, Any] = field(default_factory=dict)


@dataclass
class Effects:
    """What a rule found: output labels, records, unions, freezes, fix-ups, handled inputs."""

    outputs: dict[int, Labels] = field(default_factory=dict)
    records: list[Record] = field(default_factory=list)
    unions: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list)
    freezes: list[tuple[np.ndarray, str]] = field(default_factory=list)
    fixups: list[Fixup] = field(default_factory=list)
    handled: set[int] = field(default_factory=set)

    def const(self, node: Node, index: int, axis: int, atoms: np.ndarray, role: str) -> None:
        """Record that input ``index`` of ``node`` (a constant) shrinks along ``axis``."""
        value = node.inputs[index]
        assert value is not None
        self.records.append(Record(value, axis, atoms, role, node, index))


class RuleEnv(Protocol):
    """What a rule may ask the analysis."""

    model: Model

    def labels(self, value: Value | None) -> Labels | None:
        """The labels of ``value`` (None: it carries no tracked channels)."""

    def tensor(self, value: Value | None) -> Tensor | None:
        """The constant data of ``value`` (None when it is computed)."""

    def shape(self, value: Value | None) -> Shape | None:
        """The shape of ``value`` from the IR or from shape inference."""

    def new_atoms(self, n: int, origin: str) -> np.ndarray:
        """Fresh atoms for the ``n`` output channels of the producer ``origin``."""

    def source(self, value: Value, n: int, reason: str) -> np.ndarray:
        """Fresh frozen atoms for ``n`` channels of an untracked value."""


Rule = Callable[[Node, RuleEnv], Effects]
#: op_type -> rule, for ops of the default domain; anything else freezes what it reads.
CHANNEL_RULES: dict[str, Rule] = {}
#: Ops whose rule runs even when no input carries channels (they create atoms).
PRODUCER_OPS: set[str] = set()


def channel_rule(*op_types: str, producer: bool = False) -> Callable[[Rule], Rule]:
    """Register a channel rule for ``op_types``.

    Args:
        op_types: ONNX op types of the default domain.
        producer: the rule creates channels (it also runs on nodes without labeled inputs).

    Raises:
        ValueError: an op type already has a rule.
    """

    def decorate(fn: Rule) -> Rule:
        for op in op_types:
            if op in CHANNEL_RULES:
                raise ValueError(f"channel rule for {op!r} is already registered")
            CHANNEL_RULES[op] = fn
            if producer:
                PRODUCER_OPS.add(op)
        return fn

    return decorate


# -- the public result ----------------------------------------------------------------------------
@dataclass(eq=False)
class Member:
    """One tensor axis of a group.

    Attributes:
        value: a weight/bias/BN parameter (constant) or an activation.
        axis: the axis that shrinks.
        positions: ``positions[c]`` are the indices along ``axis`` owned by group channel
            ``c``; shape ``[group.size, k]`` (``k > 1`` when a channel owns a block: Flatten
            into Gemm, a grouped Conv's input channels). In ``ChannelGroup.partial_members``
            (a member that holds only some of the group's channels, e.g. a Split output) a
            channel it does not hold has ``-1`` entries.
        role: ``"out"``, ``"in"``, ``"param"`` or ``"act"`` (see :class:`Record`).
        node: the node that reads a constant member (None for activations).
        index: the input index of a constant member in ``node``.
    """

    value: Value
    axis: int
    positions: np.ndarray
    role: str
    node: Node | None = None
    index: int | None = None


@dataclass(eq=False)
class ChannelGroup:
    """Channels that are removed together.

    Attributes:
        id: index in ``ChannelGroups.groups``.
        size: number of channels.
        members: the tensor axes holding every channel of the group.
        frozen: why the group must not be pruned (None when it is prunable).
        partial_members: tensor axes holding only some of its channels (see :class:`Member`).
        producers: names of the nodes that create its channels.
    """

    id: int
    size: int
    members: list[Member]
    frozen: str | None
    partial_members: list[Member] = field(default_factory=list)
    producers: list[str] = field(default_factory=list)

    def _select(self, role: str, constant: bool) -> list[Member]:
        return [m for m in self.members
                if m.role == role and (not constant or m.value.const_value is not None)]

    def producer_weights(self) -> list[Member]:
        """Role ``"out"`` members that are constants (producer weights and biases)."""
        return self._select("out", True)

    def consumer_weights(self) -> list[Member]:
        """Role ``"in"`` members that are constants (consumer weights' input axes)."""
        return self._select("in", True)

    def bn_scales(self) -> list[Member]:
        """BatchNormalization scale (gamma) members."""
        return [m for m in self.members if m.role == "param" and m.node is not None
                and m.node.op_type == "BatchNormalization" and m.index == 1]

    def activations(self) -> list[Member]:
        """Role ``"act"`` members (the values that carry the channels)."""
        return self._select("act", False)


class ChannelGroups:
    """The channel groups of a model's main graph (request with ``ctx.analysis``).

    Args:
        model: the model (not modified).
        ctx: the pass context (unused; analyses are built as ``cls(model, ctx)``).

    Attributes:
        groups: every group, frozen or not, in the order their first producer appears.
        records: every shrinking tensor axis (per use of a constant), for the prune pass.
        fixups: attribute/constant rewrites the prune pass applies after slicing.
    """

    def __init__(self, model: Model, ctx: Any = None) -> None:
        from edgeopt.passes import (  # noqa: F401  (they register the built-in rules)
            _prune_rules,
            _prune_rules_layout,
        )

        env = _Env(model)
        env.run(model.graph)
        self.model = model
        self.records = env.records
        self.fixups = env.fixups
        self._finish(env)

    def prunable(self) -> list[ChannelGroup]:
        """Groups that are not frozen and have at least two channels."""
        return [g for g in self.groups if g.frozen is None and g.size > 1]

    def keep_fn(self, removed: Mapping[int, Sequence[int]]) -> Keep:
        """A function atoms -> kept mask, for removing channels ``removed[group_id]``."""
        gone = np.zeros(len(self._class_group), dtype=bool)
        for gid, channels in removed.items():
            gone[self._group_classes[gid][np.asarray(channels, dtype=np.int64)]] = True
        class_of = self._class_of
        return lambda atoms: ~gone[class_of[np.asarray(atoms, dtype=np.int64)]]

    def locate(self, atoms: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(group ids, channel indices)`` of the channels at each position of ``atoms``."""
        cls = self._class_of[np.asarray(atoms, dtype=np.int64)]
        return self._class_gid[cls], self._class_local[cls]

    def describe(self) -> list[dict[str, Any]]:
        """One dict per group, for ``edgeopt info --groups``.

        Keys: ``id``, ``size`` (channels), ``prunable``, ``frozen`` (the reason or None),
        ``producers`` (node names), ``members`` and ``partial_members`` (counts), and
        ``params`` (constant elements that its channels own, over all its members).
        """
        return [{"id": g.id, "size": g.size, "prunable": g.frozen is None and g.size > 1,
                 "frozen": g.frozen, "producers": list(g.producers),
                 "members": len(g.members), "partial_members": len(g.partial_members),
                 "params": sum(g.size * m.positions.shape[1] * _inner(m) for m in g.members
                               if m.role != "act")}
                for g in self.groups]

    def table(self) -> str:
        """:meth:`describe` as a text table (one line per group)."""
        lines = [f"{'group':>5}  {'channels':>8}  {'params':>10}  status / producers"]
        for row in self.describe():
            status = "prunable" if row["prunable"] else f"frozen: {row['frozen'] or 'size 1'}"
            producers = ", ".join(row["producers"][:4]) + (" ..." if len(row["producers"]) > 4
                                                           else "")
            lines.append(f"{row['id']:>5}  {row['size']:>8}  {row['params']:>10,}  {status}  "
                         f"[{producers}]")
        return "\n".join(lines)

    def _finish(self, env: _Env) -> None:
        roots = np.array([env.find(a) for a in range(len(env.parent))], dtype=np.int64)
        classes, self._class_of = np.unique(roots, return_inverse=True)
        self._class_of = self._class_of.astype(np.int64).reshape(-1)
        comp = _components(env.origin, roots)  # origin -> component root origin
        class_comp = comp[np.asarray(env.origin, dtype=np.int64)[classes]] if len(classes) \
            else np.zeros(0, np.int64)
        comps, self._class_group = np.unique(class_comp, return_inverse=True)
        self._class_group = self._class_group.astype(np.int64).reshape(-1)
        self._group_classes = [np.flatnonzero(self._class_group == g) for g in range(len(comps))]
        local = np.zeros(len(classes), dtype=np.int64)
        for members in self._group_classes:
            local[members] = np.arange(len(members))
        frozen: dict[int, str] = {}
        for atom in sorted(env.frozen):
            frozen.setdefault(int(self._class_group[self._class_of[atom]]), env.frozen[atom])
        producers: list[list[str]] = [[] for _ in comps]
        origin_group = np.searchsorted(comps, comp)
        for o, name in enumerate(env.origins):
            if not name.startswith("<") and o < len(origin_group):
                producers[origin_group[o]].append(name)
        groups = [ChannelGroup(g, len(cl), [], frozen.get(g), producers=producers[g])
                  for g, cl in enumerate(self._group_classes)]
        for rec in env.records:
            for member, full, gid in self._members(rec, local):
                (groups[gid].members if full else groups[gid].partial_members).append(member)
        # Atoms made by a rule that then gave up belong to no tensor: drop their groups.
        used = [g for g in groups if g.members or g.partial_members]
        self._group_classes = [self._group_classes[g.id] for g in used]
        renumber = np.full(len(groups), -1, dtype=np.int64)
        for i, g in enumerate(used):
            renumber[g.id], g.id = i, i
        self._class_gid, self._class_local = renumber[self._class_group], local
        self.groups = used

    def _members(self, rec: Record, local: np.ndarray) -> Iterator[tuple[Member, bool, int]]:
        cls = self._class_of[rec.atoms]
        groups = self._class_group[cls]
        for gid in np.unique(groups):
            size = len(self._group_classes[gid])
            pos = np.flatnonzero(groups == gid)
            loc = local[cls[pos]]
            counts = np.bincount(loc, minlength=size)
            k = int(counts.max())
            positions = np.full((size, k), -1, dtype=np.int64)
            order = np.argsort(loc, kind="stable")
            starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
            slot = np.arange(len(pos)) - starts[loc[order]]
            positions[loc[order], slot] = pos[order]
            full = bool((counts == k).all())
            yield Member(rec.value, rec.axis, positions, rec.role, rec.node, rec.index), full, \
                int(gid)

    def __repr__(self) -> str:
        return (f"ChannelGroups({len(self.groups)} groups, {len(self.prunable())} prunable, "
                f"{sum(g.size for g in self.prunable())} prunable channels)")


def _inner(member: Member) -> int:
    """Elements per position of a constant member (the product of its other axes)."""
    shape = member.value.shape or ()
    other = [d for i, d in enumerate(shape) if i != member.axis]
    return int(np.prod(other, dtype=np.int64)) if all(isinstance(d, int) for d in other) else 0


def _components(origin: list[int], roots: np.ndarray) -> np.ndarray:
    """Union the origins (producers) of atoms that ended up in one class."""
    n = max(origin) + 1 if origin else 0
    parent = list(range(n))

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for atom, root in enumerate(roots):
        a, b = find(origin[atom]), find(origin[int(root)])
        if a != b:
            parent[max(a, b)] = min(a, b)
    return np.array([find(i) for i in range(n)], dtype=np.int64)


# -- the propagation ------------------------------------------------------------------------------
class _Env:
    """Propagation state: atoms (union-find), labels per value, records, fix-ups, freezes."""

    def __init__(self, model: Model) -> None:
        self.model = model
        self.oracle = ShapeOracle(model)
        self.parent: list[int] = []
        self.origin: list[int] = []
        self.origins: list[str] = []
        self.frozen: dict[int, str] = {}
        self.records: list[Record] = []
        self.fixups: list[Fixup] = []
        self._labels: dict[Value, Labels] = {}

    # RuleEnv
    def labels(self, value: Value | None) -> Labels | None:
        return None if value is None else self._labels.get(value)

    def tensor(self, value: Value | None) -> Tensor | None:
        return constant_tensor(value, self.model)

    def shape(self, value: Value | None) -> Shape | None:
        if value is None:
            return None
        if value.const_value is not None:
            return tuple(value.const_value.shape)
        return self.oracle.shape(value)

    def new_atoms(self, n: int, origin: str) -> np.ndarray:
        start = len(self.parent)
        self.origins.append(origin)
        self.parent.extend(range(start, start + n))
        self.origin.extend([len(self.origins) - 1] * n)
        return np.arange(start, start + n, dtype=np.int64)

    def source(self, value: Value, n: int, reason: str) -> np.ndarray:
        atoms = self.new_atoms(n, f"<{value.name}>")
        self.freeze(atoms, reason)
        return atoms

    # union-find (the smaller atom is the root, so a class's root is its first atom)
    def find(self, a: int) -> int:
        parent = self.parent
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    def union(self, xs: np.ndarray, ys: np.ndarray) -> None:
        for x, y in zip(xs.tolist(), ys.tolist(), strict=True):
            a, b = self.find(x), self.find(y)
            if a != b:
                self.parent[max(a, b)] = min(a, b)

    def freeze(self, atoms: np.ndarray, reason: str) -> None:
        for a in atoms.tolist():
            self.frozen.setdefault(a, reason)

    # the walk
    def run(self, graph: Graph) -> None:
        for node in _topological(graph):
            labeled = [i for i, v in enumerate(node.inputs) if self.labels(v) is not None]
            if not labeled and node.op_type not in PRODUCER_OPS:
                continue
            self._visit(node, labeled, graph)

    def _visit(self, node: Node, labeled: list[int], graph: Graph) -> None:
        where = f"{node.op_type} '{node_name(node)}'"
        rule = CHANNEL_RULES.get(node.op_type) if is_default_domain(node) else None
        if rule is None:
            op = f"{node.domain}::{node.op_type}" if node.domain else node.op_type
            return self._freeze_inputs(node, labeled, f"no channel rule for {op} "
                                                      f"('{node_name(node)}')")
        try:
            effects = rule(node, self)
        except Unsupported as e:
            return self._freeze_inputs(node, labeled, f"{where}: {e}")
        self._freeze_inputs(node, [i for i in labeled if i not in effects.handled],
                            f"{where} does not follow the channels of this input")
        for xs, ys in effects.unions:
            self.union(xs, ys)
        for atoms, reason in effects.freezes:
            self.freeze(atoms, reason)
        self.records.extend(effects.records)
        self.fixups.extend(effects.fixups)
        for i, labels in effects.outputs.items():
            self._label(node.outputs[i], labels, graph)

    def _label(self, value: Value, labels: Labels, graph: Graph) -> None:
        self._labels[value] = labels
        self.records.append(Record(value, labels.axis, labels.atoms, "act"))
        if value.is_graph_output():
            self.freeze(labels.atoms, f"graph output '{value.name}'")
        for use in value.uses():
            if use.node.graph is not graph:
                holder = _holder(use.node, graph)
                self.freeze(labels.atoms, f"'{value.name}' is read inside a subgraph of "
                                          f"{holder.op_type} '{node_name(holder)}'")

    def _freeze_inputs(self, node: Node, indices: list[int], reason: str) -> None:
        for i in indices:
            labels = self.labels(node.inputs[i])
            if labels is not None:
                self.freeze(labels.atoms, reason)


def node_name(node: Node) -> str:
    """A node's name, or its first output's name for unnamed nodes."""
    return node.name or (node.outputs[0].name if node.outputs else "")


def _holder(node: Node, graph: Graph) -> Node:
    """The node of ``graph`` whose subgraph (transitively) holds ``node``."""
    inner = node.graph
    while inner is not None and inner.parent is not None and inner.parent.graph is not graph:
        inner = inner.parent.graph
    return inner.parent if inner is not None and inner.parent is not None else node


def _topological(graph: Graph) -> list[Node]:
    """The graph's nodes in a topological order (the stored order when it is one)."""
    nodes = graph.nodes
    seen: set[int] = set()
    for node in nodes:
        if any(p.graph is graph and id(p) not in seen for p in node.predecessors()):
            break
        seen.add(id(node))
    else:
        return nodes
    order: list[Node] = []
    done: set[int] = set()
    for start in nodes:
        stack = [(start, False)]
        while stack:
            node, expanded = stack.pop()
            if id(node) in done:
                continue
            if expanded:
                done.add(id(node))
                order.append(node)
                continue
            stack.append((node, True))
            stack.extend((p, False) for p in node.predecessors()
                         if p.graph is graph and id(p) not in done)
    return order
