"""``ActivationCache``: raw activations of a model that changes, computed incrementally.

Level-by-level recovery (``prune``'s ``recover=lsq``) refits the consumers of one level, then
needs the inputs of the next level in the model as it is now, and in the unpruned model.
:meth:`Activations.samples <edgeopt.passes.analyses.activations.Activations.samples>` runs
the whole model for every such request: one full pass per level (49 for ResNet-50). This
cache keeps the values it computed; a value stays valid while every node upstream of it is
unchanged (the same node objects reading the same values, constants and attributes), so a
request runs only the nodes between valid cached values (fed as inputs) and the requested
ones, in a sub-model exported for ONNX Runtime. Over a whole sweep that is about one pass of
each model.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from edgeopt import ir
from edgeopt.ir import DataType, EdgeoptError, Model
from edgeopt.ir._clone import _clone_node, _copy_value

from .activations import Activations, _require_calib
from .ort_model import OrtModel, run_session

__all__ = ["ActivationCache"]

log = logging.getLogger(__name__)


#: What computed a cached value: objects compared by identity, plain data by equality.
_State = tuple[tuple[object, ...], tuple[Any, ...]]


def _same(a: _State, b: _State) -> bool:
    return len(a[0]) == len(b[0]) and all(x is y for x, y in zip(a[0], b[0], strict=True)) \
        and a[1] == b[1]


def _reads(node: ir.Node, graph: ir.Graph) -> list[ir.Value]:
    """The values of ``graph`` that ``node`` reads: its inputs and its subgraphs' captures."""
    reads = [v for v in node.inputs if v is not None]
    for sub in node.subgraphs():
        for inner in sub.walk():
            reads += [v for v in inner.inputs if v is not None and v.graph is graph]
        reads += [v for v in sub.outputs if v.graph is graph]
    return reads


def _node_state(node: ir.Node, reads: Sequence[ir.Value]) -> _State:
    """What the node computes from: itself, the values it reads, constants and attributes."""
    objs: list[object] = [node, *reads]
    objs += [v.const_value for v in reads if v.const_value is not None]
    plain: list[Any] = [node.op_type, node.domain, len(reads)]
    for name, attr in node.attrs.items():
        if attr.graphs():  # the subgraph's version counts its own edits
            objs += attr.graphs()
            plain += [(name, g.version) for g in attr.graphs()]
        elif attr.type in (ir.AttrType.TENSOR, ir.AttrType.TENSORS):
            objs += attr.value if isinstance(attr.value, list) else [attr.value]
            plain.append(name)
        else:
            plain.append((name, int(attr.type), repr(attr.value)))
    return tuple(objs), tuple(plain)


class _Cones:
    """The states of the main graph's values in the model as it is now (one request)."""

    def __init__(self, model: Model) -> None:
        self.graph = model.graph
        self.position = {id(n): i for i, n in enumerate(self.graph)}
        self.values: dict[str, ir.Value] = {
            v.name: v for v in self.graph.inputs if not v.is_initializer()}
        self.values.update((o.name, o) for n in self.graph for o in n.outputs if o.name)
        self._nodes: dict[int, _State] = {}
        self._values: dict[int, _State] = {}

    def reads(self, node: ir.Node) -> list[ir.Value]:
        return _reads(node, self.graph)

    def state(self, value: ir.Value) -> _State:
        """The states of every node upstream of ``value``, in graph order, and ``value``."""
        if id(value) in self._values:
            return self._values[id(value)]
        cone: dict[int, ir.Node] = {}
        stack = [value]
        while stack:
            node = stack.pop().producer()
            if node is None or id(node) in cone or node.graph is not self.graph:
                continue
            cone[id(node)] = node
            stack += self.reads(node)
        objs: list[object] = [value]
        plain: list[Any] = []
        for node in sorted(cone.values(), key=lambda n: self.position[id(n)]):
            if id(node) not in self._nodes:
                self._nodes[id(node)] = _node_state(node, self.reads(node))
            o, p = self._nodes[id(node)]
            objs += o
            plain += p
        self._values[id(value)] = (tuple(objs), tuple(plain))
        return self._values[id(value)]


@dataclass(eq=False)
class _Entry:
    """A cached value: its runs joined along axis 0 (``ends`` of each run) or stacked."""

    array: np.ndarray
    ends: tuple[int, ...] | None  # None: one sample per run, stacked on a new axis 0
    state: _State

    @property
    def runs(self) -> int:
        return len(self.array) if self.ends is None else len(self.ends)

    def run(self, i: int) -> np.ndarray:
        """The output of run ``i``."""
        if self.ends is None:
            return self.array[i]
        return self.array[(self.ends[i - 1] if i else 0):self.ends[i]]

    def head(self, k: int) -> np.ndarray:
        """The first ``k`` runs, joined (a view)."""
        return self.array[:k] if self.ends is None else self.array[:self.ends[k - 1]]


class ActivationCache:
    """Raw activations of a model that changes between requests, computed incrementally.

    See the module docs. Sub-models run with ONNX Runtime's basic optimizations, as in
    :class:`~edgeopt.passes.analyses.activations.Activations`. Changes the cache cannot see:
    data of a tensor mutated in place (tensors are immutable by convention) and model-level
    fields such as opset imports.

    Args:
        model: the model; read at every request (never modified).
        ctx: the pass context; ``ctx.calib`` holds the calibration data.
        samples: calibration samples used (the first ones; a static batch rounds down).
        batch_size: samples per run (a static batch dim in the model overrides it).
        max_bytes: bound on the bytes one request returns: whole runs are returned while they
            fit, so fewer than ``samples`` samples may come back (a warning says so).
        cache_bytes: bound on the bytes kept between requests (default ``max_bytes``); the
            least recently used values go first. Values returned by a request are the cached
            arrays themselves (read-only), so the two bounds overlap.

    Attributes:
        runs: ONNX Runtime runs made so far.
        nodes_run: nodes of the sub-models run so far, summed over requests.
        hits: requested values served from the cache.

    Raises:
        CalibrationError: ``ctx.calib`` is missing or does not fit the model.
    """

    def __init__(self, model: Model, ctx: Any, samples: int, batch_size: int = 8,
                 max_bytes: int = 512 << 20, cache_bytes: int | None = None) -> None:
        if batch_size < 1 or max_bytes < 1 or samples < 1:
            raise ValueError("samples, batch_size and max_bytes must be positive")
        self._model = model
        self._data = _require_calib(ctx, model).subset(samples)
        self._feeds = list(self._data.batches(batch_size))
        self.max_bytes = max_bytes
        self.cache_bytes = max_bytes if cache_bytes is None else cache_bytes
        self._entries: dict[str, _Entry] = {}  # least recently used first
        self.runs = self.nodes_run = self.hits = 0

    @property
    def num_samples(self) -> int:
        """Samples a request returns when nothing limits it."""
        return self._data.num_samples

    @property
    def cached_bytes(self) -> int:
        """Bytes held between requests."""
        return sum(e.array.nbytes for e in self._entries.values())

    def get(self, names: Iterable[str]) -> dict[str, np.ndarray]:
        """Activations of ``names`` in the model as it is now, for the calibration samples.

        Runs are joined along axis 0, or stacked on a new axis 0 when each run feeds one
        unbatched sample (as :meth:`Activations.samples`). Arrays are read-only.

        Raises:
            EdgeoptError: an unknown name, a value without producer or data, one run needing
                more than ``max_bytes``, or ONNX Runtime failed.
        """
        names = list(dict.fromkeys([names] if isinstance(names, str) else names))
        cones = _Cones(self._model)
        for name in names:
            if name not in cones.values:
                raise EdgeoptError(f"ActivationCache: no activation named {name!r} in the main "
                                   "graph")
        fed = [n for n in names if n in self._data.arrays]
        served = [n for n in names if n not in fed and self._valid(n, cones)]
        todo = [n for n in names if n not in fed and n not in served]
        self.hits += len(served)
        entries = {n: self._entries[n] for n in served}  # computing may evict them
        # Bytes of one run of what is at hand; the first run of the rest adds its own.
        at_hand = sum(entries[n].run(0).nbytes for n in served) + \
            sum(self._feeds[0][n].nbytes for n in fed)
        computed = self._compute(todo, at_hand, names, cones) if todo else {}
        entries.update(computed)
        k = min(e.runs for e in computed.values()) if todo else \
            self._affordable(at_hand, names)
        out: dict[str, np.ndarray] = {}
        for name in names:
            if name in fed:
                out[name] = self._fed(name, k)
            else:
                out[name] = entries[name].head(k)
        return out

    def _valid(self, name: str, cones: _Cones) -> bool:
        """True if ``name`` is cached for every run and nothing upstream of it changed."""
        entry = self._entries.get(name)
        if entry is None:
            return False
        if entry.runs < len(self._feeds) or not _same(entry.state, cones.state(
                cones.values[name])):
            del self._entries[name]  # stale: free it now
            return False
        self._entries[name] = self._entries.pop(name)  # most recently used
        return True

    def _fed(self, name: str, k: int) -> np.ndarray:
        parts = [f[name] for f in self._feeds[:k]]
        arr = np.stack(parts) if self._data.unbatched else np.concatenate(parts)
        arr.flags.writeable = False
        return arr

    def _affordable(self, per_run: int, names: Sequence[str]) -> int:
        """Whole runs of ``per_run`` bytes that fit ``max_bytes`` (all runs, when they do)."""
        if per_run > self.max_bytes:
            raise EdgeoptError(f"ActivationCache: one run of {list(names)} needs {per_run} "
                               f"bytes, more than max_bytes={self.max_bytes}")
        k = min(len(self._feeds), self.max_bytes // max(per_run, 1))
        if k < len(self._feeds):
            log.warning("ActivationCache: returning %d of %d runs to stay within "
                        "max_bytes=%d", k, len(self._feeds), self.max_bytes)
        return k

    # -- running the part of the graph that is needed ---------------------------------------
    def _slice(self, todo: Sequence[str], cones: _Cones
               ) -> tuple[list[ir.Node], list[str], list[str]]:
        """(nodes to run in graph order, cached values to feed, graph inputs to feed)."""
        nodes: dict[int, ir.Node] = {}
        cuts: list[str] = []
        inputs: list[str] = []
        seen: set[int] = set()
        stack = [cones.values[n] for n in todo]
        wanted = set(todo)
        while stack:
            v = stack.pop()
            if id(v) in seen or v.const_value is not None:
                continue
            seen.add(id(v))
            node = v.producer()
            if node is None or node.graph is not cones.graph:
                if v.name not in self._data.arrays:
                    raise EdgeoptError(f"ActivationCache: value {v.name!r} has no producer in "
                                       "the main graph and no calibration data")
                inputs.append(v.name)
            elif v.name not in wanted and self._valid(v.name, cones):
                cuts.append(v.name)
            elif id(node) not in nodes:
                nodes[id(node)] = node
                stack += cones.reads(node)
        order = sorted(nodes.values(), key=lambda n: cones.position[id(n)])
        return order, cuts, inputs

    def _submodel(self, nodes: Sequence[ir.Node], cuts: Sequence[str], inputs: Sequence[str],
                  outputs: Sequence[str], cones: _Cones) -> tuple[Model, list[str]]:
        """A model of copies of ``nodes`` alone; ``inputs`` and the cut values are its inputs.

        Only ``nodes`` are copied (tensors are shared), so a request costs what it runs.
        Returns the model and the cut values it reads (a cut value whose producer is among
        ``nodes``, beside an output that is not cached, is computed instead).
        """
        kept = {id(n) for n in nodes}
        values = cones.values
        graph = ir.Graph(name=self._model.graph.name)
        vmap: dict[int, ir.Value] = {id(values[n]): _copy_value(values[n]) for n in inputs}
        fed = [c for c in cuts if id(values[c].producer()) not in kept]
        for name in fed:
            dtype = DataType.from_numpy(self._entries[name].array.dtype)
            vmap[id(values[name])] = ir.Value(name, dtype)
        for node in nodes:
            for v in cones.reads(node):
                if v.is_initializer() and id(v) not in vmap:
                    vmap[id(v)] = graph.initializers.add(_copy_value(v))
            vmap.update((id(o), _copy_value(o)) for o in node.outputs)
        for node in nodes:
            graph.append(_clone_node(node, vmap))
        graph.inputs.extend(vmap[id(values[n])] for n in [*inputs, *fed])
        graph.outputs.extend(vmap[id(values[n])] for n in outputs)
        sub = Model(graph, dict(self._model.opset_imports), self._model.ir_version)
        sub.functions = list(self._model.functions)  # exported as they are, never modified
        return sub, fed

    def _compute(self, todo: Sequence[str], at_hand: int, names: Sequence[str],
                 cones: _Cones) -> dict[str, _Entry]:
        """Run the sub-model that computes ``todo``; cache and return the new entries.

        ``at_hand``: bytes per run of the request's other values, ``names`` (all of them),
        which count for ``max_bytes`` too.
        """
        nodes, cuts, inputs = self._slice(todo, cones)
        sub, fed = self._submodel(nodes, cuts, inputs, todo, cones)
        self.nodes_run += len(nodes)
        chunks: dict[str, list[np.ndarray]] = {n: [] for n in todo}
        k = len(self._feeds)
        with OrtModel(sub, Activations.INLINE_LIMIT) as exported:
            session = exported.session([], {})
            for i in range(len(self._feeds)):
                if i == k:
                    break
                feeds = {n: self._feeds[i][n] for n in inputs}
                feeds.update((c, self._entries[c].run(i)) for c in fed)
                outs = self._run(session, todo, feeds)
                for name, arr in zip(todo, outs, strict=True):
                    chunks[name].append(arr)
                if i == 0:
                    k = self._affordable(at_hand + sum(a.nbytes for a in outs), names)
        result = {}
        for name in todo:
            result[name] = self._store(name, chunks[name], cones)
        return result

    def _run(self, session: Any, names: Sequence[str], feeds: Mapping[str, np.ndarray]
             ) -> list[np.ndarray]:
        outs = run_session(session, names, feeds, "ActivationCache", self._data.source)
        self.runs += 1
        return outs

    def _store(self, name: str, parts: list[np.ndarray], cones: _Cones) -> _Entry:
        """Join the runs of ``name``, cache them (within ``cache_bytes``), return the entry."""
        if self._data.unbatched:
            arr, ends = np.stack(parts), None
        else:
            arr = np.concatenate(parts)
            ends = tuple(int(e) for e in np.cumsum([len(p) for p in parts]))
        arr.flags.writeable = False
        entry = _Entry(arr, ends, cones.state(cones.values[name]))
        self._entries.pop(name, None)
        self._entries[name] = entry
        while self._entries and self.cached_bytes > self.cache_bytes:
            del self._entries[next(iter(self._entries))]
        return entry

    def __repr__(self) -> str:
        return (f"ActivationCache({len(self._entries)} values cached, {self.cached_bytes} bytes, "
                f"{self.runs} runs)")
