"""``dce``: dead-node elimination."""

from __future__ import annotations

from collections.abc import Iterable

from edgeopt.ir import Graph, Model, Node, Value

from ._base import Context, PassResult
from ._registry import register_pass

__all__ = ["dce", "remove_unused_initializers"]

#: Ops with effects beyond their outputs; never removed even when unused.
_SIDE_EFFECTS: frozenset[tuple[str, str]] = frozenset()


def _is_dead(node: Node) -> bool:
    return (node.domain, node.op_type) not in _SIDE_EFFECTS and not any(
        out.uses() or out.is_graph_output() for out in node.outputs)


def _bypass(node: Node, model: Model) -> bool:
    """Reroute the readers of an Identity / inference Dropout to its input; True if done."""
    out = node.outputs[0]
    src = node.inputs[0] if node.inputs else None
    if src is None or out.is_graph_output():
        return False  # graph outputs keep their names
    if node.op_type == "Dropout":
        mask_used = len(node.outputs) > 1 and (node.outputs[1].uses() or
                                               node.outputs[1].is_graph_output())
        training = node.inputs[2] if len(node.inputs) > 2 else None
        # Dropout-1/6 run in training mode unless is_test is set (its default is 0).
        opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx", 0))
        training_attr = opset < 7 and node.attr("is_test", 0) == 0
        if mask_used or training_attr or (
                training is not None and not _is_false_constant(training)):
            return False
    out.replace_all_uses_with(src)
    return True


def _is_false_constant(value) -> bool:
    t = value.const_value
    return t is not None and not value.is_graph_input() and not bool(t.numpy().any())


def _sweep(graph: Graph, model: Model, stats: dict[str, int]) -> None:
    for node in reversed(graph.nodes):
        if node.graph is not graph:
            continue
        if node.domain in ("", "ai.onnx") and node.op_type in ("Identity", "Dropout") \
                and _bypass(node, model):
            stats[f"{node.op_type.lower()}_removed"] += 1
        if _is_dead(node):
            graph.remove(node)
            stats["nodes_removed"] += 1
            continue
        for sub in node.subgraphs():
            _sweep(sub, model, stats)
    stats["initializers_removed"] += remove_unused_initializers(graph, model)


def remove_unused_initializers(graph: Graph, model: Model,
                               among: Iterable[Value | None] | None = None) -> int:
    """Remove the initializers of ``graph`` that nothing reads (only ``among``, if given).

    Ones that are also graph inputs are part of the interface (an overridable default),
    except in IR < 4, where every initializer had to be an input. Returns how many went.
    """
    candidates = list(graph.initializers.values()) if among is None else \
        [v for v in dict.fromkeys(among) if v is not None and v.is_initializer()
         and v.graph is graph]
    removed = 0
    for value in candidates:
        if value.uses() or value.is_graph_output():
            continue
        if value.is_graph_input():
            if model.ir_version >= 4 or graph is not model.graph:
                continue
            graph.inputs.remove(value)
        del graph.initializers[value.name]
        removed += 1
    return removed


@register_pass("dce")
def dce(model: Model, ctx: Context) -> PassResult:
    """Remove unused nodes and initializers, Identity, and inference-mode Dropout.

    Recurses into subgraphs. Graph outputs and graph inputs are never removed (except unused
    initializer-inputs of IR < 4 models, which are not part of the interface). Requires: a
    topologically sorted graph (one backwards sweep then removes whole dead chains).
    Preserves: nothing when it modifies.
    """
    stats = {"nodes_removed": 0, "identity_removed": 0, "dropout_removed": 0,
             "initializers_removed": 0}
    _sweep(model.graph, model, stats)
    # Bypassed Identity/Dropout nodes are dead now and were removed in the same sweep.
    return PassResult(modified=any(stats.values()), stats=stats)
