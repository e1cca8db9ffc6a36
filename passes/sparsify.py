"""``sparsify``: unstructured weight pruning (magnitude, Wanda, N:M patterns).

The pass zeroes individual weights of every *prunable weight*: the float constant read as
input 1 of a Conv, Gemm or MatMul (2-D) node, in the main graph and in subgraph bodies
(:func:`~edgeopt.passes._weights.layer_weight`). A weight read through a DequantizeLinear
(already quantized) or of another type is left alone, with a logged reason; a MatMul of two
activations has no weight. A weight shared by several such nodes is sparsified once.

Which weights go, per weight of ``size`` elements (``ratio``, default scope ``local``)::

    zeros = floor(size * ratio)                        # criterion=magnitude
    zeros = floor(row_size * ratio) in every output row # criterion=wanda (as the paper)

The lowest scores go: ``|w|`` (magnitude) or ``|w| * ||x_j||_2`` (wanda: the L2 norm of the
weight's input feature over the calibration data; a Conv's input channel, over samples and
positions, is broadcast over the kernel taps). Weights that are already zero rank first and
count toward the target, so a second run of the same spec zeroes nothing more. ``scope=global``
ranks the raw scores of every weight together; ``thresh=T`` zeroes every ``|w| < T``;
``pattern=N:M`` keeps the N highest scores of every M consecutive weights along the input
axis (Conv ``[O, C/g, *k]``: axis 1; Gemm ``transB=1`` ``[N, K]``: axis 1; Gemm ``transB=0``
and MatMul ``[K, N]``: axis 0; a trailing group of fewer than M weights keeps at most N).

``refit=true`` then corrects the remaining weights of each layer by least squares on the
calibration data (:mod:`._sparsify_refit`), level by level.
"""

from __future__ import annotations

import fnmatch
import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

import numpy as np

from edgeopt.ir import DataType, Model, Node, Value

from ._base import CalibrationError, Context, PassResult
from ._options import parse_overrides
from ._registry import register_pass
from ._sparsify_refit import LayerInputs, refit_layers, refit_sequential
from ._util import NameGen, add_constant, as_tensor, computed_weights_hint
from ._weights import layer_weight

__all__ = ["META_KEY", "SparsifyOptions", "Weight", "find_weights", "nm_keep", "sparsify"]

log = logging.getLogger(__name__)

#: ``Node.meta`` key of a sparsified layer's ``{"sparsity", "before", "criterion"}`` (and,
#: with ``refit``, ``"rel_err"``, ``"rel_err_drop"`` and ``"method"``).
META_KEY = "edgeopt.sparsify"

FLOATS = (DataType.FLOAT, DataType.FLOAT16, DataType.DOUBLE)


@dataclass(frozen=True)
class SparsifyOptions:
    """Options of ``sparsify``.

    Attributes:
        ratio: fraction of each prunable weight zeroed (``scope=local``), or of all of them
            together (``scope=global``), in [0, 1). Ignored with ``pattern``.
        scope: ``local`` zeroes ``ratio`` of every weight (of every output row with
            ``criterion=wanda``); ``global`` ranks the raw scores of all weights together.
        thresh: zero every weight with ``|w| < thresh`` instead of using ``ratio``.
        pattern: ``N:M`` (integers, 0 < N < M): in every group of M consecutive weights along
            the input axis keep the N highest scores (2:4 is what sparse tensor cores run).
            Cannot be combined with ``thresh``, ``scope=global`` or ``overrides``.
        exclude: ``|``-separated fnmatch patterns; weights whose name or whose nodes' names
            match one are left alone.
        overrides: per-layer ratios, ``|``-separated ``pattern:ratio`` entries
            (``overrides=conv1*:0.2|fc*:0.9``); the first pattern matching the weight's or
            its nodes' names gives that weight's ratio (scope local), whatever ``scope`` and
            ``thresh`` do with the others.
        criterion: ``magnitude`` (``|w|``) or ``wanda`` (``|w|`` times the L2 norm of its
            input feature on the calibration data; needs ``--calib``). Weights whose layer
            input cannot be measured (inside a subgraph, a constant input) use magnitude.
        refit: least-squares correction of the remaining weights (and bias) of every layer
            that lost weights, per output row, on the calibration data; a layer keeps it
            only where it lowers the error on held-out samples. Needs ``--calib``.
        samples: calibration samples used (at most) by ``wanda`` and ``refit``.
    """

    ratio: float = 0.5
    scope: Literal["local", "global"] = "local"
    thresh: float | None = None
    pattern: str | None = None
    exclude: tuple[str, ...] = ()
    overrides: tuple[str, ...] = ()
    criterion: Literal["magnitude", "wanda"] = "magnitude"
    refit: bool = False
    samples: int = 128

    def override_ratios(self) -> list[tuple[str, float]]:
        """``overrides`` parsed into ``(pattern, ratio)`` pairs (see :func:`parse_overrides`)."""
        return parse_overrides(self.overrides)

    def nm(self) -> tuple[int, int] | None:
        """``pattern`` as ``(N, M)``, or None without a pattern.

        Raises:
            ValueError: not ``N:M`` with integers ``0 < N < M``.
        """
        if self.pattern is None:
            return None
        n, sep, m = self.pattern.partition(":")
        if sep and n.strip().isdigit() and m.strip().isdigit() and 0 < int(n) < int(m):
            return int(n), int(m)
        raise ValueError(f"pattern must be N:M with integers 0 < N < M (e.g. 2:4), not "
                         f"{self.pattern!r}")

    def validate(self) -> None:
        """Raise ValueError for out-of-range values and options that cannot go together."""
        if not 0.0 <= self.ratio < 1.0:
            raise ValueError(f"ratio must be in [0, 1), got {self.ratio}")
        if self.thresh is not None and not self.thresh >= 0:
            raise ValueError(f"thresh must be >= 0, got {self.thresh}")
        if self.samples < 1:
            raise ValueError("samples must be >= 1")
        self.override_ratios()
        if self.nm() is not None:
            clash = "thresh" if self.thresh is not None else "scope=global" \
                if self.scope == "global" else "overrides" if self.overrides else None
            if clash:
                raise ValueError(f"pattern={self.pattern} keeps N of every M weights; it "
                                 f"cannot be combined with {clash}")
        if self.thresh is not None and self.criterion == "wanda":
            raise ValueError("thresh compares |w| with a threshold; it cannot be combined "
                             "with criterion=wanda")

    def zeroes_anything(self) -> bool:
        """Whether these options can zero a weight at all (``sparsify:0`` cannot)."""
        return self.ratio > 0 or self.thresh is not None or self.pattern is not None or \
            any(r > 0 for _, r in self.override_ratios())


# -- the prunable weights -----------------------------------------------------------------------
@dataclass(eq=False)
class Weight:
    """A prunable weight: a float constant read as input 1 of Conv/Gemm/MatMul nodes.

    Attributes:
        value: the weight's value.
        readers: the nodes that read it as their weight (several when it is shared).
        in_axis: the axis of its input features (N:M groups run along it).
        out_axis: the axis of its outputs (wanda ranks within each output row).
        array: its data before the pass.
    """

    value: Value
    readers: list[Node]
    in_axis: int
    out_axis: int
    array: np.ndarray

    @property
    def names(self) -> list[str]:
        """The weight's name and its readers' names (what ``exclude``/``overrides`` match)."""
        return [self.value.name, *(label(n) for n in self.readers)]

    def matches(self, pattern: str) -> bool:
        """Whether ``pattern`` (fnmatch) matches one of :attr:`names`."""
        return any(fnmatch.fnmatchcase(name, pattern) for name in self.names)


def label(node: Node) -> str:
    """How logs and reports name a node: its name, else its first output's."""
    return node.name or node.outputs[0].name


def _prunable(node: Node, model: Model) -> str | tuple[int, int, np.ndarray] | None:
    """``(in_axis, out_axis, data)`` of ``node``'s weight, why it is skipped, or None.

    None: ``node`` is not a layer with a constant weight (a product of two activations).
    """
    lw = layer_weight(node, model)
    if lw is None:
        return None
    if lw.dequantize is not None:
        return "its weight is read through DequantizeLinear (already quantized)"
    tensor = lw.value.const_value
    assert tensor is not None
    if tensor.dtype not in FLOATS:
        return f"its weight is {tensor.dtype.name.lower()}, not float"
    return lw.in_axis, 0 if lw.layout == "rows" else 1, np.asarray(tensor.numpy())


def find_weights(model: Model) -> list[Weight]:
    """Every prunable weight of the model (all graphs), in node order; skips are logged."""
    found: dict[int, Weight] = {}
    conflicts: set[int] = set()
    for node in model.walk():
        got = _prunable(node, model)
        if got is None:
            continue
        if isinstance(got, str):
            log.info("sparsify: %s skipped: %s", label(node), got)
            continue
        value, (in_axis, out_axis, array) = node.inputs[1], got
        weight = found.get(id(value))
        if weight is None:
            found[id(value)] = Weight(value, [node], in_axis, out_axis, array)
        elif (weight.in_axis, weight.out_axis) == (in_axis, out_axis):
            weight.readers.append(node)
        else:
            conflicts.add(id(value))
    for key in conflicts:
        log.info("sparsify: %s skipped: shared by layers that read it along different axes",
                 found.pop(key).value.name)
    return list(found.values())


# -- scores and masks -----------------------------------------------------------------------------
def _scores(weights: Iterable[Weight], norms: dict[int, np.ndarray]) -> dict[int, np.ndarray]:
    """Score per weight: ``|w|`` (times the input norms where given); zeros score -inf."""
    out = {}
    for w in weights:
        s = np.abs(w.array.astype(np.float64))
        if id(w) in norms:
            s = s * norms[id(w)]
        s[w.array == 0] = -np.inf
        out[id(w)] = s
    return out


def _lowest(scores: np.ndarray, ratio: float, per_row_axis: int | None) -> np.ndarray:
    """Mask of the ``floor(ratio * n)`` lowest scores of the array (or of each row).

    Rows run along ``per_row_axis`` (None: the whole array is one row). Among equal scores
    at the cut, which go is arbitrary but deterministic.
    """
    rows = scores.reshape(1, -1) if per_row_axis is None else \
        np.moveaxis(scores, per_row_axis, 0).reshape(scores.shape[per_row_axis], -1)
    k = math.floor(rows.shape[1] * ratio + 1e-9)
    zero = np.zeros(rows.shape, bool)
    if 0 < k < rows.shape[1]:
        np.put_along_axis(zero, np.argpartition(rows, k - 1, axis=1)[:, :k], True, axis=1)
    elif k:
        zero[:] = True
    if per_row_axis is None:
        return zero.reshape(scores.shape)
    moved = np.moveaxis(scores, per_row_axis, 0).shape
    return np.moveaxis(zero.reshape(moved), 0, per_row_axis)


def nm_keep(scores: np.ndarray, axis: int, n: int, m: int) -> np.ndarray:
    """Mask of the ``n`` highest scores in every ``m`` consecutive entries along ``axis``.

    A trailing group of fewer than ``m`` entries keeps at most ``n`` of them. Ties go to
    the earlier entry.
    """
    s = np.moveaxis(scores, axis, -1)
    size = s.shape[-1]
    pad = -size % m
    if pad:
        s = np.concatenate([s, np.full((*s.shape[:-1], pad), -np.inf)], axis=-1)
    groups = s.reshape(*s.shape[:-1], -1, m)
    rank = np.argsort(np.argsort(-groups, axis=-1, kind="stable"), axis=-1, kind="stable")
    keep = (rank < n).reshape(s.shape)[..., :size]
    return np.moveaxis(keep, -1, axis)


def _masks(weights: list[Weight], scores: dict[int, np.ndarray], opts: SparsifyOptions,
           wanda: set[int]) -> dict[int, np.ndarray]:
    """The zero mask of every weight (True: zero after the pass)."""
    nm = opts.nm()
    if nm is not None:
        return {id(w): ~nm_keep(scores[id(w)], w.in_axis, *nm) for w in weights}

    def local(w: Weight, ratio: float) -> np.ndarray:
        return _lowest(scores[id(w)], ratio, w.out_axis if id(w) in wanda else None)

    masks, free = {}, []
    pairs = opts.override_ratios()
    for w in weights:
        ratio = next((r for p, r in pairs if w.matches(p)), None)
        if ratio is None:
            free.append(w)
        else:
            masks[id(w)] = local(w, ratio)
    if opts.thresh is not None:
        masks.update((id(w), np.abs(w.array) < opts.thresh) for w in free)
    elif opts.scope == "global" and free:
        zero = _lowest(np.concatenate([scores[id(w)].ravel() for w in free]), opts.ratio, None)
        ends = np.cumsum([w.array.size for w in free])
        for w, part in zip(free, np.split(zero, ends[:-1]), strict=True):
            masks[id(w)] = part.reshape(w.array.shape)
    else:
        masks.update((id(w), local(w, opts.ratio)) for w in free)
    return masks


# -- wanda: input feature norms -------------------------------------------------------------------
def _wanda_skip(w: Weight, model: Model) -> str | None:
    """Why wanda cannot score ``w`` (its layer input is not measurable), or None."""
    for node in w.readers:
        x = node.inputs[0]
        if node.graph is not model.graph:
            return "it is read inside a subgraph"
        if x is None or not x.name or x.const_value is not None:
            return "its layer's input is a constant"
    return None


def _feature_sumsq(node: Node, x: np.ndarray) -> np.ndarray:
    """Sum of squares of every input feature (Conv: channel) of ``node`` over ``x``."""
    if node.op_type == "Conv":
        feature = 1
    elif node.op_type == "Gemm" and node.attr("transA", 0):
        feature = 0
    else:
        feature = x.ndim - 1
    axes = tuple(i for i in range(x.ndim) if i != feature)
    return np.sum(np.square(x, dtype=np.float64), axis=axes)


def _broadcast(w: Weight, node: Node, per_feature: np.ndarray) -> np.ndarray:
    """``per_feature`` (one value per input feature of ``node``) laid out like ``w``."""
    shape = w.array.shape
    if node.op_type != "Conv":
        view = [1, 1]
        view[w.in_axis] = -1
        return per_feature.reshape(view)
    out, per_group = shape[0], shape[1]
    group = int(node.attr("group", 1))
    channel = (np.arange(out) // (out // group))[:, None] * per_group + np.arange(per_group)
    return per_feature[channel].reshape(out, per_group, *[1] * (len(shape) - 2))


def _wanda_norms(model: Model, weights: list[Weight], inputs: LayerInputs
                 ) -> dict[int, np.ndarray]:
    """Input-feature L2 norms laid out like each weight (weights wanda can score)."""
    readers: dict[str, list[tuple[Weight, Node]]] = {}
    for w in weights:
        reason = _wanda_skip(w, model)
        if reason is not None:
            log.info("sparsify: %s ranked by magnitude: %s", w.value.name, reason)
            continue
        for node in w.readers:
            readers.setdefault(node.inputs[0].name, []).append((w, node))  # type: ignore[union-attr]
    sumsq: dict[int, np.ndarray] = {}
    for chunk in inputs.chunks(list(readers)):
        xs = inputs.get(chunk)
        for name in chunk:
            for w, node in readers[name]:
                part = _broadcast(w, node, _feature_sumsq(node, xs[name]))
                sumsq[id(w)] = sumsq[id(w)] + part if id(w) in sumsq else part
        del xs
    return {k: np.sqrt(v) for k, v in sumsq.items()}


# -- writing --------------------------------------------------------------------------------------
def _install(model: Model, w: Weight, array: np.ndarray, names: NameGen) -> None:
    """Make every reader of ``w`` read ``array``.

    The weight keeps its name (its data is replaced) unless something else reads it too
    (or it is a graph output); then the readers get a new initializer and the old one stays
    for the others.
    """
    tensor = as_tensor(array)
    readers = {id(n) for n in w.readers}
    if not w.value.is_graph_output() and \
            all(u.index == 1 and id(u.node) in readers for u in w.value.uses()):
        w.value.const_value = tensor
        return
    graph = w.value.graph or model.graph
    new = add_constant(graph, names, w.value.name, tensor)
    for node in w.readers:
        node.set_input(1, new)


def _apply(model: Model, weights: list[Weight], masks: dict[int, np.ndarray]
           ) -> dict[int, np.ndarray]:
    """Zero the masked weights; returns the new arrays of the weights that gained zeros."""
    names = NameGen(model)
    changed = {}
    for w in weights:
        zero = masks[id(w)]
        if not (zero & (w.array != 0)).any():
            continue
        array = np.where(zero, np.zeros((), w.array.dtype), w.array)
        _install(model, w, array, names)
        changed[id(w)] = array
    return changed


def _current(w: Weight) -> np.ndarray:
    """The data ``w``'s readers read now."""
    return np.asarray(w.readers[0].inputs[1].const_value.numpy())  # type: ignore[union-attr]


def _report(w: Weight, after: np.ndarray, criterion: str, refit: dict | None) -> None:
    """Log one line for ``w`` and put its figures in its readers' ``meta[META_KEY]``."""
    before = float(np.mean(w.array == 0))
    sparsity = float(np.mean(after == 0))
    entry: dict = {"sparsity": sparsity, "before": before, "criterion": criterion}
    extra = ""
    if refit is not None:
        entry.update(rel_err=refit["rel_err"], rel_err_drop=refit["rel_err_drop"],
                     method=refit["method"])
        extra = (f"; {refit['method']}: held-out relative error {refit['rel_err_drop']:.4f} "
                 f"-> {refit['rel_err']:.4f}")
    for node in w.readers:
        node.meta[META_KEY] = dict(entry)
    log.info("sparsify: %s (%s): sparsity %.3f -> %.3f (%s)%s", w.value.name,
             ", ".join(label(n) for n in w.readers[:3]), before, sparsity, criterion, extra)


@register_pass("sparsify", options=SparsifyOptions, primary="ratio")
def sparsify(model: Model, ctx: Context, opts: SparsifyOptions) -> PassResult:
    """Zero the smallest weights of Conv/Gemm/MatMul layers (unstructured sparsity).

    ``sparsify:0.8`` zeroes 80% of every prunable weight (see the module docs and
    :class:`SparsifyOptions` for ``scope``, ``thresh``, ``pattern``, ``exclude``,
    ``overrides``, ``criterion`` and ``refit``). Works in place on every graph; shapes and
    nodes are unchanged (``refit`` may give a Conv or Gemm a bias input). Weights keep their
    names unless another operator reads them too. ``criterion=wanda`` and ``refit`` need
    calibration data (``ctx.calib``) and only use layers of the main graph. Preserves:
    nothing when it modifies; ``sparsify:0`` (and a repeated run) reports
    ``modified=False``.

    Each sparsified layer's figures go to ``node.meta[META_KEY]`` and one INFO log line.

    Stats: ``layers`` (weights that gained zeros), ``weights`` (elements of every prunable
    weight, excluded ones included), ``zeros_before``/``zeros_after`` (zeros among them),
    ``sparsity`` = zeros_after / weights; with ``refit`` also ``layers_refit`` (layers whose
    correction was kept).

    Raises:
        CalibrationError: ``criterion=wanda`` or ``refit`` without calibration data.
    """
    needs = [o for o, on in (("criterion=wanda", opts.criterion == "wanda"),
                             ("refit=true", opts.refit)) if on]
    if needs and ctx.calib is None:
        raise CalibrationError(f"{' and '.join(needs)} needs calibration data (--calib)")
    weights = find_weights(model)
    computed = computed_weights_hint(
        model.graph, "they keep their weights; fold them into constants first: "
        "-p simplify,sparsify:...")
    if computed:
        log.warning("sparsify: %s", computed)
    total = sum(w.array.size for w in weights)
    zeros_before = sum(int(np.count_nonzero(w.array == 0)) for w in weights)
    todo = [w for w in weights if not any(w.matches(p) for p in opts.exclude)]
    changed: dict[int, np.ndarray] = {}
    reports: dict[int, dict] = {}
    if todo and opts.zeroes_anything():
        # Wanda's norms and the refit targets come from the model as it is before the pass.
        original = model.clone() if opts.refit else model
        inputs = LayerInputs(original, ctx, opts.samples, share=2 if opts.refit else 1) \
            if needs else None
        norms = _wanda_norms(model, todo, inputs) \
            if opts.criterion == "wanda" and inputs is not None else {}
        changed = _apply(model, todo, _masks(todo, _scores(todo, norms), opts, set(norms)))
        if opts.refit and inputs is not None and changed:
            layers = refit_layers(model, [(w.readers, w.array) for w in todo if id(w) in changed])
            reports = refit_sequential(model, ctx, inputs, layers, opts.samples)
        for w in todo:
            _report(w, _current(w), "wanda" if id(w) in norms else "magnitude",
                    reports.get(id(w.readers[0])) if opts.refit else None)
    zeros_after = sum(int(np.count_nonzero(_current(w) == 0)) for w in weights) \
        if changed else zeros_before
    stats: dict[str, int | float] = {
        "layers": len(changed), "weights": total, "zeros_before": zeros_before,
        "zeros_after": zeros_after, "sparsity": zeros_after / total if total else 0.0}
    if opts.refit:
        stats["layers_refit"] = sum(r["method"] != "drop" for r in reports.values())
    return PassResult(modified=bool(changed), stats=stats)
