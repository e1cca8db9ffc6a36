"""Per-layer changes between two versions of a model (the optimize command's layer table).

A *layer* is a Conv, ConvTranspose, Gemm or MatMul node whose weight (input 1) is a
constant. :func:`snapshot` records each layer's input/output channel counts, parameters
(elements of its constant inputs) and MACs (batch 1, from :mod:`passes.analyses.costs`);
:func:`diff` matches two snapshots by node name and keeps the layers that changed, were
removed, or were added. The snapshot of the input must be taken before the pipeline runs,
because passes change the model in place.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from edgeopt.ir import EdgeoptError, Model, Node
from edgeopt.passes.analyses.costs import MAC_RULES, bind_batch, stored_constant
from edgeopt.passes.prune import RECOVERY_META_KEY as RECOVERY_KEY
from edgeopt.passes.quant import META_KEY as QUANT_KEY

from ._console import format_table

__all__ = ["Layer", "LayerChange", "diff", "format_changes", "snapshot", "to_dicts", "totals"]

log = logging.getLogger(__name__)

#: Rows the text table shows before summarizing the rest (``--layers`` shows all).
MAX_ROWS = 40


@dataclass(frozen=True)
class Layer:
    """One weight layer as seen in one version of the model."""

    node: str
    op_type: str
    in_channels: int | None
    out_channels: int | None
    params: int
    macs: int | None  # None: shapes unknown
    #: prune's recovery of this layer: relative output error (dropped, recovered), or None.
    recovery: tuple[float, float] | None = None
    #: the stored weight's element type (``float32``, ``int8``, ...).
    weight_type: str = ""
    #: quant's notes on this layer: ``sensitivity`` (relative output error with only this
    #: layer quantized) and ``float`` (why it stayed float), or None.
    quant: dict | None = None
    #: entries of the weight, how many are zero, and the bytes it is stored in (CSR-packed
    #: or dense), and whether it is packed (stored bytes differ from dense).
    weight_size: int = 0
    zeros: int = 0
    weight_bytes: int = 0
    packed: bool = False

    @property
    def sparsity(self) -> float:
        """Share of the weight's entries that are zero."""
        size = self.weight_size
        return self.zeros / size if size else 0.0

    def signature(self) -> tuple:
        """What the table compares: channels, parameters, MACs, weight type and storage."""
        return (self.in_channels, self.out_channels, self.params, self.macs, self.weight_type,
                self.zeros, self.weight_bytes)


@dataclass(frozen=True)
class LayerChange:
    """A layer that differs between the two models (``before``/``after`` None: added/removed)."""

    before: Layer | None
    after: Layer | None

    @property
    def node(self) -> str:
        """The layer's node name."""
        return (self.before or self.after).node  # type: ignore[union-attr]

    @property
    def op_type(self) -> str:
        """The layer's operator."""
        return (self.before or self.after).op_type  # type: ignore[union-attr]

    @property
    def status(self) -> str:
        """``changed``, ``removed`` or ``added``."""
        return "removed" if self.after is None else "added" if self.before is None else "changed"

    def magnitude(self) -> tuple[int, int]:
        """How big the change is (MACs, then parameters), to pick the rows worth showing."""
        def get(layer: Layer | None, key: str) -> int:
            return (getattr(layer, key) or 0) if layer is not None else 0

        return (abs(get(self.before, "macs") - get(self.after, "macs")),
                abs(get(self.before, "params") - get(self.after, "params")))

    def to_dict(self) -> dict[str, Any]:
        """Plain data: node, op, status, and each field as ``{"before", "after"}``."""
        out: dict[str, Any] = {"node": self.node, "op_type": self.op_type,
                               "status": self.status}
        for key in ("in_channels", "out_channels", "params", "macs"):
            out[key] = {"before": getattr(self.before, key, None),
                        "after": getattr(self.after, key, None)}
        rec = getattr(self.after, "recovery", None)
        if rec is not None:
            out["recovery_error"] = {"dropped": rec[0], "recovered": rec[1]}
        types = {"before": getattr(self.before, "weight_type", None) or None,
                 "after": getattr(self.after, "weight_type", None) or None}
        if any(types.values()):
            out["weight_type"] = types
        if getattr(self.after, "quant", None):
            out["quant"] = dict(self.after.quant)  # type: ignore[union-attr]
        if any(getattr(x, "zeros", 0) or getattr(x, "packed", False)
               for x in (self.before, self.after)):
            for key in ("sparsity", "weight_bytes"):
                out[key] = {"before": getattr(self.before, key, None),
                            "after": getattr(self.after, key, None)}
        return out


# -- channel counts -------------------------------------------------------------------------
def _conv_channels(node: Node, w: tuple[int, ...]) -> tuple[int | None, int | None]:
    # W is [C_out, C_in/group, k...]
    return w[1] * int(node.attr("group", 1)), w[0]


def _conv_transpose_channels(node: Node, w: tuple[int, ...]) -> tuple[int | None, int | None]:
    # W is [C_in, C_out/group, k...]
    return w[0], w[1] * int(node.attr("group", 1))


def _gemm_channels(node: Node, w: tuple[int, ...]) -> tuple[int | None, int | None]:
    return (w[1], w[0]) if node.attr("transB", 0) else (w[0], w[1])


def _matmul_channels(node: Node, w: tuple[int, ...]) -> tuple[int | None, int | None]:
    return (w[-2], w[-1]) if len(w) >= 2 else (w[0], None)  # a 1-D B drops the output axis


#: op_type -> (in, out) channel counts from the layer's constant weight shape.
CHANNEL_RULES: dict[str, Callable[[Node, tuple[int, ...]], tuple[int | None, int | None]]] = {
    "Conv": _conv_channels,
    "ConvTranspose": _conv_transpose_channels,
    "Gemm": _gemm_channels,
    "MatMul": _matmul_channels,
}


def _layer(node: Node) -> Layer | None:
    """The layer ``node`` is, or None (not a weight layer, or a weight of unknown shape).

    A weight computed at run time from constants (the onnx ``light/`` models' ConstantOfShape
    weights) counts with its shape, MACs and type but no stored parameters, so the layer is
    not reported as added when ``simplify`` folds it into a constant.
    """
    rule = CHANNEL_RULES.get(node.op_type) if node.domain in ("", "ai.onnx") else None
    v = node.inputs[1] if rule is not None and len(node.inputs) > 1 else None
    if v is None:
        return None
    w = stored_constant(v)
    shape = tuple(w.shape) if w is not None else v.shape
    if w is None and (v.producer() is None or shape is None
                      or not all(isinstance(d, int) for d in shape)):
        return None  # a graph input or an unknown shape: not a layer we can describe
    try:
        channels = rule(node, shape)  # type: ignore[arg-type]
    except IndexError:  # a weight of too low a rank (invalid for the op): counts unknown
        channels = (None, None)
    params = sum(t.size for t in map(stored_constant, node.inputs) if t is not None)
    rec = node.meta.get(RECOVERY_KEY)
    dtype = w.dtype if w is not None else v.dtype
    return Layer(node.name or node.outputs[0].name, node.op_type, *channels, params,
                 MAC_RULES[node.op_type](node),
                 None if rec is None else (float(rec["drop"]), float(rec["after"])),
                 "" if dtype is None else dtype.name.lower(), node.meta.get(QUANT_KEY),
                 zeros=0 if w is None else w.size - int(np.count_nonzero(w.numpy())),
                 weight_bytes=0 if w is None else getattr(w, "stored_nbytes", w.nbytes),
                 weight_size=0 if w is None else w.size,
                 packed=w is not None and hasattr(w, "stored_nbytes"))


def snapshot(model: Model, shapes: Mapping[str, Sequence[int]] | None = None) -> list[Layer]:
    """Every layer of ``model`` (all graphs, in walk order), with MACs at batch 1.

    The model is not changed: MACs come from a clone whose batch is bound to 1 and whose
    inputs in ``shapes`` take those shapes (:func:`bind_batch`). Layers whose shapes stay
    symbolic (other dims not given), or all when the binding fails, have unknown MACs (None).
    """
    try:
        bound = bind_batch(model, 1, shapes)
    except EdgeoptError as e:
        log.info("layer MACs unavailable: %s", e)
        bound = model
    layers = (_layer(n) for n in bound.walk())
    return [x for x in layers if x is not None]


def diff(before: Sequence[Layer], after: Sequence[Layer]) -> list[LayerChange]:
    """The layers that changed, in the order of ``before`` (then added layers).

    Layers are matched by node name; repeated names are matched in order.
    """
    remaining: dict[str, list[Layer]] = defaultdict(list)
    for layer in after:
        remaining[layer.node].append(layer)
    changes = []
    for old in before:
        candidates = remaining.get(old.node)
        new = candidates.pop(0) if candidates else None
        if new is None or new.signature() != old.signature() or new.op_type != old.op_type:
            changes.append(LayerChange(old, new))
    changes += [LayerChange(None, new) for rest in remaining.values() for new in rest]
    return changes


def totals(layers: Sequence[Layer]) -> dict[str, int]:
    """Parameters and MACs summed over all layers; ``macs_unknown``: layers not counted."""
    return {"params": sum(x.params for x in layers),
            "macs": sum(x.macs for x in layers if x.macs is not None),
            "macs_unknown": sum(1 for x in layers if x.macs is None)}


def _arrow(before: int | None, after: int | None, *, status: str, sep: bool = False) -> str:
    def fmt(v: int | None, present: bool) -> str:
        if not present:
            return "-"
        return "?" if v is None else f"{v:,}" if sep else str(v)

    return f"{fmt(before, status != 'added')}->{fmt(after, status != 'removed')}"


def format_changes(changes: Sequence[LayerChange], limit: int | None = MAX_ROWS) -> str:
    """The layer table. Over ``limit`` rows, the biggest changes are shown in model order."""
    shown = list(changes)
    if limit is not None and len(shown) > limit:
        keep = set(sorted(range(len(shown)), key=lambda i: shown[i].magnitude(),
                          reverse=True)[:limit])
        shown = [c for i, c in enumerate(shown) if i in keep]
    recovered = any(getattr(c.after, "recovery", None) for c in shown)
    typed = any(getattr(c.before, "weight_type", None) != getattr(c.after, "weight_type", None)
                for c in shown if c.status == "changed")
    noted = any(getattr(c.after, "quant", None) for c in shown)
    sparse = any(c.status == "changed" and c.before.zeros != c.after.zeros  # type: ignore[union-attr]
                 for c in shown)
    stored = typed or any(getattr(x, "packed", False) for c in shown for x in (c.before, c.after))
    rows = []
    for c in shown:
        b, a = c.before, c.after
        name = c.node if c.status == "changed" else f"{c.node} ({c.status})"
        rows.append((name, c.op_type,
                     *(_arrow(getattr(b, k, None), getattr(a, k, None), status=c.status,
                              sep=k in ("params", "macs"))
                       for k in ("in_channels", "out_channels", "params", "macs")),
                     *([_error(getattr(a, "recovery", None))] if recovered else []),
                     *([f"{getattr(b, 'weight_type', '-') or '-'}->"
                        f"{getattr(a, 'weight_type', '-') or '-'}"] if typed else []),
                     *([_quant_note(getattr(a, "quant", None))] if noted else []),
                     *([f"{_pct(b)}->{_pct(a)}"] if sparse else []),
                     *([_arrow(getattr(b, "weight_bytes", None), getattr(a, "weight_bytes", None),
                               status=c.status, sep=True)] if stored else [])))
    header = ("layer", "op", "in", "out", "params", "MACs") + \
        (("output error (dropped->recovered)",) if recovered else ()) + \
        (("weights",) if typed else ()) + (("quant sensitivity / kept float",) if noted else ()) \
        + (("zeros",) if sparse else ()) + (("weight bytes",) if stored else ())
    text = format_table(rows, header, right=(2, 3, 4, 5))
    if len(shown) < len(changes):
        text += (f"\n... and {len(changes) - len(shown)} more changed layers (smaller changes; "
                 "--layers lists all)")
    return text


def _pct(layer: Layer | None) -> str:
    return "-" if layer is None else f"{layer.sparsity:.0%}"


def _quant_note(note: dict | None) -> str:
    if not note:
        return ""
    parts = [f"{note['sensitivity']:.4g}"] if "sensitivity" in note else []
    if "float" in note:
        parts.append(f"float ({note['float']})")
    return "; ".join(parts)


def _error(rec: tuple[float, float] | None) -> str:
    return "" if rec is None else f"{rec[0]:.3f}->{rec[1]:.3f}"


def to_dicts(changes: Sequence[LayerChange]) -> list[dict[str, Any]]:
    """Every change as plain data (for ``--json`` and ``--report``)."""
    return [c.to_dict() for c in changes]
