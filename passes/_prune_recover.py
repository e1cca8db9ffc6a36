"""Recovery orchestration for ``prune``: which layers to repair, in which order, with what.

The numerics live in :mod:`edgeopt.passes.recovery`; this module finds the *consumers* (Conv
with group 1, Gemm and MatMul layers whose constant weight reads a pruned group's channels),
fetches their inputs (the :class:`Activations` analysis for ``bias``, an
:class:`ActivationCache` per model for ``lsq``), and writes the refit weights, biases and
BatchNormalization statistics back:

- :func:`recover_prepare` + :func:`recover_install`: ``recover=bias`` (means of the unpruned
  model, computed before the channels go);
- :func:`recover_sequential`: ``recover=lsq``, level by level on the pruned model's inputs,
  with saturation-aware rounds where a Relu/Clip follows (:func:`_clamp_after`) and the
  shortcut's error in the targets of a layer that feeds a residual sum
  (:func:`_residual_offset`); the consumers downstream of a refit one are refit too (their
  inputs drifted).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from edgeopt.ir import ArrayTensor, Model, Node, Tensor, Value

from ._base import Context
from ._util import NameGen, levels, replace_constant_input
from .analyses.activation_cache import ActivationCache
from .analyses.activations import Activations
from .analyses.channel_groups import ChannelGroup, ChannelGroups, Keep, Record, node_name
from .recovery import (
    Clamp,
    LayerSpec,
    bias_compensation,
    depthwise_refit,
    layer_output,
    least_squares_refit,
    match_batchnorm,
    reconstruction_error,
    reestimate_batchnorm,
)

__all__ = ["META_KEY", "Consumer", "Deferred", "Origins", "dead_channels", "find_consumers",
           "find_depthwise", "recover_install", "recover_prepare", "recover_sequential",
           "upstream"]

log = logging.getLogger("edgeopt.passes.prune")

#: ``Node.meta`` key of a recovered layer's ``{"drop", "after", "method"}``: its relative
#: output error on the calibration data with the channels just dropped and after recovery.
META_KEY = "edgeopt.recovery"


RECOVERABLE = ("Conv", "Gemm", "MatMul")


@dataclass(eq=False)
class Consumer:
    """A layer whose constant weight reads a prunable group's channels (role ``in``)."""

    node: Node
    spec: LayerSpec
    rec: Record                       # the weight's input-channel record
    outs: list[Record]                # the weight's output-channel records (if also pruned)
    w0: Tensor | None = None          # the unpruned weight, bias and following BN mean/var
    b0: Tensor | None = None
    bn0: tuple[Tensor, Tensor] | None = None
    weight: np.ndarray | None = None  # refit results, over the surviving outputs
    bias: np.ndarray | None = None
    bn: tuple[np.ndarray, np.ndarray] | None = None  # matched BN mean/var, full channels
    clamp: Clamp | None = None        # the activation after it (and its BN), unpruned
    depthwise: bool = False           # a depthwise Conv: ``rec`` is its output (= input) axis

    @property
    def input(self) -> str:
        return self.node.inputs[0].name  # type: ignore[union-attr]


def find_consumers(model: Model, cg: ChannelGroups) -> list[Consumer]:
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
        found.append(Consumer(
            node, spec, ins[0], [r for r in recs if r.role == "out"],
            ins[0].value.const_value, None if bias is None else bias.const_value,
            None if bn is None else (bn.inputs[3].const_value, bn.inputs[4].const_value),
            clamp=_clamp_after(node)))
    return found


def find_depthwise(model: Model, cg: ChannelGroups) -> list[Consumer]:
    """Depthwise Convs of the main graph (``group`` = channels, constant weight and bias).

    They are members of their input's channel group, not consumers: they never lose an input
    channel they read, but ``recover=lsq`` refits them when their inputs drift
    (:func:`~edgeopt.passes.recovery.depthwise_refit`). ``rec`` is the weight's axis 0.
    """
    found = []
    for rec in cg.records:
        node = rec.node
        if node is None or node.op_type != "Conv" or rec.index != 1 or rec.axis != 0 \
                or node.graph is not model.graph or rec.value.const_value is None:
            continue
        shape = rec.value.const_value.shape
        x, bias = node.inputs[0], node.inputs[2] if len(node.inputs) > 2 else None
        if len(shape) < 3 or shape[1] != 1 or int(node.attr("group", 1)) != shape[0] \
                or shape[0] == 1 or x is None or not x.name or x.const_value is not None \
                or (bias is not None and bias.const_value is None):
            continue
        spec = LayerSpec.from_onnx("Conv", {k: v for k, v in node.attrs.items() if k != "group"})
        bn = _following_bn(node)
        found.append(Consumer(
            node, spec, rec, [], rec.value.const_value,
            None if bias is None else bias.const_value,
            None if bn is None else (bn.inputs[3].const_value, bn.inputs[4].const_value),
            clamp=_clamp_after(node), depthwise=True))
    return found


def dead_channels(cg: ChannelGroups, groups: list[ChannelGroup], act: Activations,
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


def _out_kept(c: Consumer, keep: Keep) -> np.ndarray | None:
    """Indices of the consumer's output channels that survive (None: all of them)."""
    out_axis = 0 if c.rec.axis == 1 else 1
    mask = None
    for rec in c.outs:
        if rec.axis == out_axis:
            m = keep(rec.atoms)
            mask = m if mask is None else mask & m
    return None if mask is None or mask.all() else np.flatnonzero(mask)


def _refit(c: Consumer, x: np.ndarray, keep: np.ndarray, mode: str,
           x_pruned: np.ndarray | None = None, out_kept: np.ndarray | None = None,
           y_offset: np.ndarray | None = None) -> dict:
    """Compute the recovered weight/bias (and BN statistics) of one consumer.

    ``x`` is the consumer's input in the unpruned model; ``x_pruned`` (optional, ``lsq``)
    its kept channels as the pruned model computes them; ``out_kept`` the output channels
    that survive (the others are neither fitted nor scored).
    """
    w = np.asarray(c.w0.numpy())  # type: ignore[union-attr]
    b = None if c.b0 is None else np.asarray(c.b0.numpy()).ravel()
    axis = c.rec.axis
    clamp, bn0 = c.clamp, None if c.bn0 is None else [np.asarray(t.numpy()) for t in c.bn0]
    if out_kept is not None:
        w = np.take(w, out_kept, axis=0 if axis == 1 else 1)
        b = None if b is None else b[out_kept]
        bn0 = None if bn0 is None else [a[out_kept] for a in bn0]
        clamp = None if clamp is None else Clamp(clamp.scale[out_kept], clamp.shift[out_kept],
                                                 clamp.lo, clamp.hi)
    if c.depthwise:
        c.weight, c.bias, report = depthwise_refit(
            w, b, x, keep, c.spec, x_pruned, clamp=clamp, rounds=SATURATION_ROUNDS)
        drop, after = report["rel_err_drop"], report["rel_err_refit"]
    elif mode == "lsq":
        c.weight, c.bias, report = least_squares_refit(
            w, b, x, keep, c.spec, x_inputs=x_pruned, clamp=clamp, rounds=SATURATION_ROUNDS,
            y_offset=y_offset)
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
    # A refit already aims at the BN's unpruned input, and its least-squares prediction is
    # rightly less spread than that input: matching the variance would amplify its error
    # (MobileNetV2 digits at 0.6: KL to the unpruned logits 0.118 -> 0.105 without). Only
    # bias compensation, which keeps the weights, gets the BN statistics matched.
    if bn is not None and bn0 is not None and report["method"] == "bias" and not c.depthwise:
        xk = np.take(x, keep, axis=x.ndim - 1 if c.spec.kind == "gemm" else 1) \
            if x_pruned is None else x_pruned
        ref = reestimate_batchnorm(layer_output(x, w, b, c.spec))
        new = reestimate_batchnorm(layer_output(xk, c.weight, c.bias, c.spec))
        c.bn = match_batchnorm(bn0[0], bn0[1], float(bn.attr("epsilon", 1e-5)), ref, new)
    result = {"layer": node_name(c.node), "drop": drop, "after": after,
              "method": report["method"]}
    # For reports (``edgeopt`` shows it in its layer table); kept by clones, not exported.
    c.node.meta[META_KEY] = {k: result[k] for k in ("drop", "after", "method")}
    return result


#: Saturation rounds after a refit when an activation clamps the consumer's output
#: (see :func:`~edgeopt.passes.recovery.least_squares_refit`).
SATURATION_ROUNDS = 8


def _clamp_after(node: Node) -> Clamp | None:
    """The Relu/Clip that alone reads ``node``'s output (through its BatchNormalization).

    Returns the :class:`~edgeopt.passes.recovery.Clamp` of the unpruned model (BN scale and
    shift per output channel, and the clip bounds), or None when something else follows or
    a bound is not constant.
    """
    bn = _following_bn(node)
    v = (bn or node).outputs[0]
    users = v.consumers()
    weight = node.inputs[1].const_value if len(node.inputs) > 1 and node.inputs[1] else None
    if len(users) != 1 or users[0].op_type not in ("Relu", "Clip") or v.is_graph_output() \
            or users[0].inputs[0] is not v or weight is None:
        return None
    act = users[0]
    bounds = [0.0, math.inf] if act.op_type == "Relu" else [-math.inf, math.inf]
    for i in (1, 2):
        if act.op_type == "Clip" and i < len(act.inputs) and act.inputs[i] is not None:
            if act.inputs[i].const_value is None:
                return None
            bounds[i - 1] = float(np.asarray(act.inputs[i].const_value.numpy()))
    if bn is None:
        n_out = weight.shape[0] if node.op_type == "Conv" else \
            weight.shape[0 if node.attr("transB", 0) else 1]
        return Clamp(np.ones(n_out), np.zeros(n_out), *bounds)
    if any(v is None or v.const_value is None for v in bn.inputs[1:5]):
        return None
    gamma, beta, mean, var = (np.asarray(bn.inputs[i].const_value.numpy(), np.float64)
                              for i in range(1, 5))
    scale = gamma / np.sqrt(var + float(bn.attr("epsilon", 1e-5)))
    return Clamp(scale, beta - mean * scale, *bounds)


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


def recover_prepare(model: Model, ctx: Context, consumers: list[Consumer], keep: Keep,
                    act: Activations, mode: str, samples: int) -> list[dict]:
    """Bias-compensate every consumer that loses input channels (``recover=bias``).

    The means come from the consumers' inputs in the unpruned model; the results are
    installed by :func:`recover_install`.

    Activations are requested in chunks that fit the analysis' byte budget.
    """
    lost = [(c, np.flatnonzero(keep(c.rec.atoms))) for c in consumers]
    lost = [(c, k) for c, k in lost if len(k) < len(c.rec.atoms)]
    by_input: dict[str, list[tuple[Consumer, np.ndarray]]] = defaultdict(list)
    for c, k in lost:
        by_input[c.input].append((c, k))
    reports = []
    for names, n in _sample_chunks(act, list(by_input), samples):
        data = act.samples(tuple(names), n)
        for name in names:
            for c, k in by_input[name]:
                reports.append(_refit(c, data[name], k, mode, out_kept=_out_kept(c, keep)))
                _log_report(reports[-1])
        del data
    return reports


@dataclass
class Deferred:
    """Refits owed across ``sequential`` rounds (see :func:`recover_sequential`).

    Attributes:
        pending: names of the layers that lost channels or whose inputs drifted since they
            were last refit.
        due: names of the layers whose refits are due this round (None: all of them).
    """

    pending: set[str] = dataclasses.field(default_factory=set)
    due: set[str] | None = None


def recover_sequential(model: Model, ctx: Context, original: Model, consumers: list[Consumer],
                       keep: Keep, samples: int, depthwise: list[Consumer] | None = None,
                       origins: Origins | None = None, deferred: Deferred | None = None
                       ) -> list[dict]:
    """Least-squares refit of every consumer, level by level, on the pruned model's inputs.

    Each consumer's targets are its outputs in the ``original`` (unpruned) model; its inputs
    are its kept input channels as the pruned model, with the levels before already refit,
    computes them, so that errors made upstream are corrected downstream. The consumers
    refit are those that lost input channels and every consumer downstream of one (whose
    inputs drifted although it lost nothing: when only some groups are pruned, the layers
    after them correct the error instead of passing it on). The ``depthwise`` Convs (see
    :func:`find_depthwise`) among those downstream are refit channel by channel. Activations are
    fetched in chunks that fit the byte budget, from caches that keep the values already
    computed (:class:`~edgeopt.passes.analyses.activation_cache.ActivationCache`).

    With ``origins`` (``prune``'s ``steps``; ``original`` is then ``origins.model``, the model
    before the first step), each consumer is fitted with its unpruned weights over the
    unpruned indices of its kept channels: every step fits the unpruned outputs rather than
    the previous step's fit of them.

    With ``deferred`` (and ``origins``) the layers this round affects join
    ``deferred.pending``, and only the pending ones in ``deferred.due`` are refit now; the
    others wait for a later round (a layer refit later fits the unpruned outputs all the
    same, over its kept channels then).
    """
    lost = [(c, np.flatnonzero(keep(c.rec.atoms))) for c in consumers]
    drifted = _downstream([c.node for c, k in lost if len(k) < len(c.rec.atoms)])
    affected = {node_name(c.node) for c, k in lost
                if len(k) < len(c.rec.atoms) or id(c.node) in drifted}
    affected |= {node_name(c.node) for c in depthwise or () if id(c.node) in drifted}
    lost += [(c, np.flatnonzero(keep(c.rec.atoms))) for c in depthwise or ()]
    if deferred is None:
        lost = [(c, k) for c, k in lost if node_name(c.node) in affected]
    else:
        deferred.pending |= affected
        lost = [(c, k) for c, k in lost if node_name(c.node) in deferred.pending
                and (deferred.due is None or node_name(c.node) in deferred.due)]
        deferred.pending -= {node_name(c.node) for c, _ in lost}
    kept = {id(c): k for c, k in lost}
    ref = Activations(original, ctx, values=())  # size estimates for _chunks
    # Each cache runs only the nodes between the values it holds and the ones asked for:
    # about one pass over each model in all, instead of one per level.
    ref_x = origins.activations(ctx, samples, ref.max_bytes // 2) if origins is not None \
        else ActivationCache(original, ctx, samples, max_bytes=ref.max_bytes // 2)
    now_x = ActivationCache(model, ctx, samples, max_bytes=ref.max_bytes // 2)
    reports = []
    order = levels(model.graph, [c for c, _ in lost], lambda c: c.node)
    last = _last_level_upstream(model, order)
    for i, level in enumerate(order):
        ctx.progress("recovery (lsq)", i, len(order))

        def final(v: Value, i: int = i) -> bool:  # nothing left to refit upstream of v
            return last.get(id(v.producer()), -1) < i

        names = list(dict.fromkeys(c.input for c in level))
        fitted = []
        for chunk in _chunks(ref, names, samples, factor=2):
            xs = ref_x.get(chunk)
            xp = now_x.get(chunk)
            for c in level:
                if c.input in chunk:
                    c_in, c_out = kept[id(c)], _out_kept(c, keep)
                    if origins is not None:
                        c, c_in, c_out = origins.view(c, c_in, c_out)
                    offset = _residual_offset(c, final, c_out, ref_x, now_x)
                    reports.append(_refit(c, xs[c.input], c_in, "lsq", xp[c.input], c_out,
                                          offset))
                    _log_report(reports[-1])
                    fitted.append(c)
            del xs, xp
        recover_install(model, fitted)
    ctx.progress("recovery (lsq)", len(order), len(order))
    return reports


class Origins:
    """Where the channels of each layer were in the unpruned model, across ``prune`` steps.

    ``prune``'s ``steps`` removes channels in rounds and refits after each. The refit targets
    must stay the unpruned model's outputs: fitting each step to the step before compounds
    their errors. A layer's input and output channels after some steps are a subset of its
    unpruned ones; this keeps that subset (unpruned indices, in order) per layer, keyed by
    its output's name, and gives :func:`recover_sequential` the unpruned weights and channel
    indices to fit with.
    """

    def __init__(self, unpruned: Model, consumers: list[Consumer]) -> None:
        self.model = unpruned
        self._unpruned = {_consumer_key(c): c for c in consumers}
        self._maps: dict[str, tuple[np.ndarray | None, np.ndarray | None]] = {}
        self._cache: ActivationCache | None = None

    def activations(self, ctx: Context, samples: int, max_bytes: int) -> ActivationCache:
        """An activation cache of the unpruned model, kept from one step to the next."""
        if self._cache is None:
            self._cache = ActivationCache(self.model, ctx, samples, max_bytes=max_bytes)
        return self._cache

    def view(self, c: Consumer, kept: np.ndarray, out_kept: np.ndarray | None
             ) -> tuple[Consumer, np.ndarray, np.ndarray | None]:
        """``c`` with its unpruned weights, and its kept channels as unpruned indices."""
        u = self._unpruned.get(_consumer_key(c))
        in_map, out_map = self._maps.get(_consumer_key(c), (None, None))
        out_axis = 0 if c.rec.axis == 1 else 1
        if u is None or c.w0 is None or (in_map is not None and len(in_map) != len(
                c.rec.atoms)) or (out_map is not None and len(out_map) != c.w0.shape[out_axis]):
            return c, kept, out_kept  # not followed since the first step: fit the last one
        view = dataclasses.replace(c, w0=u.w0, b0=u.b0, bn0=u.bn0, clamp=u.clamp)
        # A depthwise Conv's one channel axis is given by ``kept`` alone.
        return view, _compose(in_map, kept), \
            None if c.depthwise else _compose(out_map, out_kept)

    def update(self, consumers: list[Consumer], keep: Keep) -> None:
        """Record a step's removal (``keep``, over the channels before it)."""
        for c in consumers:
            key = _consumer_key(c)
            in_map, out_map = self._maps.get(key, (None, None))
            self._maps[key] = (_compose(in_map, np.flatnonzero(keep(c.rec.atoms))),
                               None if c.depthwise else _compose(out_map, _out_kept(c, keep)))


def _consumer_key(c: Consumer) -> str:
    return c.node.outputs[0].name


def _compose(first: np.ndarray | None, then: np.ndarray | None) -> np.ndarray | None:
    """Indices ``then`` (None: all) into a list that is ``first`` (None: the identity)."""
    if first is None or then is None:
        return then if first is None else first
    return first[then]


def _last_level_upstream(model: Model, order: list[list[Consumer]]) -> dict[int, int]:
    """Per main-graph node id, the last level of ``order`` with a consumer at or above it."""
    level = {id(c.node): i for i, lv in enumerate(order) for c in lv}
    last: dict[int, int] = {}
    for node in model.graph:  # topological order
        up = [last.get(id(v.producer()), -1) for v in node.inputs if v is not None]
        last[id(node)] = max([level.get(id(node), -1), *up])
    return last


def _residual_offset(c: Consumer, final: Callable[[Value], bool], out_kept: np.ndarray | None,
                     ref_x: ActivationCache, now_x: ActivationCache) -> np.ndarray | None:
    """Target correction of a layer whose output is added to another value (a residual).

    When ``c``'s output alone feeds an ``Add`` whose other addend ``s`` is already final in
    the pruned model (nothing still to be refit is upstream of it), what the network needs
    is the unpruned sum: ``c`` is fitted to ``y + s_unpruned - s_pruned`` so that it also
    cancels the error the shortcut carries. ``final(s)`` says whether nothing still to be
    refit lies upstream of ``s``. None when that does not apply.
    """
    bn = _following_bn(c.node)
    if c.depthwise or c.clamp is not None or (bn is not None and c.bn0 is None):
        return None
    s = _shortcut(c.node)
    if s is None or not final(s):
        return None
    axis = 1 if c.spec.kind == "conv" else -1
    ref = ref_x.get([s.name])[s.name]
    now = now_x.get([s.name])[s.name]
    if out_kept is not None:
        ref = np.take(ref, out_kept, axis=axis)
    if ref.shape != now.shape:
        return None
    offset = np.subtract(ref, now, dtype=np.float32)  # as large as an activation: float32
    if bn is not None:  # the sum reads the BN's output: move the offset before the BN
        gamma = np.asarray(bn.inputs[1].const_value.numpy(), np.float64)  # type: ignore
        var = np.asarray(c.bn0[1].numpy(), np.float64)  # type: ignore[union-attr]
        var = var if out_kept is None else var[out_kept]  # gamma is already pruned
        if gamma.shape != var.shape:
            return None
        scale = gamma / np.sqrt(var + float(bn.attr("epsilon", 1e-5)))
        inv = np.divide(1.0, scale, out=np.zeros_like(scale), where=abs(scale) > 1e-12)
        shape = [1] * offset.ndim
        shape[axis] = -1
        offset *= inv.reshape(shape).astype(np.float32)  # a dead BN channel: no offset
    return offset


def _shortcut(node: Node) -> Value | None:
    """The shortcut of the residual sum ``node`` feeds, if any.

    That is the other addend of the two-input Add/Sum that ``node``'s output (through its
    BatchNormalization) alone feeds, when it is not a constant.
    """
    out = (_following_bn(node) or node).outputs[0]
    users = out.consumers()
    if len(users) != 1 or out.is_graph_output() or users[0].op_type not in ("Add", "Sum") \
            or len(users[0].inputs) != 2:
        return None
    other = [v for v in users[0].inputs if v is not out]
    if len(other) != 1 or other[0] is None or other[0].const_value is not None:
        return None
    return other[0]


def upstream(nodes: list[Node]) -> set[str]:
    """Names of the nodes whose refits the refits of ``nodes`` depend on.

    That is ``nodes``, every node whose outputs they read, and the producers of the
    shortcut of every residual sum one of those feeds (a layer feeding one is fitted
    against its shortcut, see :func:`_residual_offset`), transitively.
    """
    seen: set[str] = set()
    todo = list(nodes)
    while todo:
        node = todo.pop()
        if node_name(node) in seen:
            continue
        seen.add(node_name(node))
        shortcut = _shortcut(node)
        for v in (*node.inputs, shortcut):
            if v is not None and (producer := v.producer()) is not None:
                todo.append(producer)
    return seen


def _downstream(nodes: list[Node]) -> set[int]:
    """Ids of the nodes that read, directly or not, an output of one of ``nodes``."""
    seen: set[int] = set()
    todo = [v for n in nodes for v in n.outputs if v is not None]
    while todo:
        for user in todo.pop().consumers():
            if id(user) not in seen:
                seen.add(id(user))
                todo.extend(v for v in user.outputs if v is not None)
    return seen


def _log_report(report: dict) -> None:
    log.info("prune: recover %s (%s): relative error %.4f dropped -> %.4f", report["layer"],
             report["method"], report["drop"], report["after"])


def recover_install(model: Model, consumers: list[Consumer]) -> int:
    """Write the refit weights, biases and BN statistics into the pruned model."""
    names = NameGen(model)
    done = 0
    for c in consumers:
        if c.weight is None or c.bias is None:
            continue
        w, b = c.weight, c.bias.ravel()  # already over the surviving outputs (_refit)
        replace_constant_input(c.node, 1, ArrayTensor(np.ascontiguousarray(w)), names)
        _set_bias(model, c.node, b, names)
        bn = _following_bn(c.node)
        if c.bn is not None and bn is not None:
            for i, arr in zip((3, 4), c.bn, strict=True):
                replace_constant_input(bn, i, ArrayTensor(np.ascontiguousarray(arr)), names)
        done += 1
    return done


#: ``Node.meta`` key marking the ``Add`` that holds a recovered MatMul's bias.
BIAS_ADD_KEY = "edgeopt.recovery_bias"


def _set_bias(model: Model, node: Node, bias: np.ndarray, names: NameGen) -> None:
    """Give ``node`` the bias ``bias``; a MatMul gets an ``Add`` after it.

    A MatMul refit again (a later ``steps`` round: its bias fits the unpruned output, as
    its weight does) gets the constant of its ``Add`` replaced, not a second ``Add``.
    """
    if node.op_type != "MatMul":
        old = node.inputs[2] if len(node.inputs) > 2 else None
        if old is not None and old.const_value is not None and len(old.const_value.shape) == 2:
            bias = bias.reshape(1, -1)  # keep a Gemm C of shape [1, out]
        replace_constant_input(node, 2, ArrayTensor(bias), names)
        return
    out = node.outputs[0]
    users = out.consumers()
    if len(users) == 1 and users[0].meta.get(BIAS_ADD_KEY) and users[0].inputs[0] is out:
        replace_constant_input(users[0], 1, ArrayTensor(bias), names)
        return
    graph = node.graph
    assert graph is not None
    const = graph.add_initializer(names.fresh(f"{out.name}_bias"), ArrayTensor(bias))
    result = Value(names.fresh(f"{out.name}_biased"), out.dtype, out.shape)
    uses = list(out.uses())
    add = Node("Add", (out, const), outputs=(result,),
               name=names.fresh(f"{node.name or out.name}_bias"))
    add.meta[BIAS_ADD_KEY] = True
    graph.insert_after(node, [add])
    for use in uses:
        use.node.set_input(use.index, result)




