"""The built-in channel rules of the ``ChannelGroups`` analysis, one per ONNX operator family.

How rules work is described in :mod:`edgeopt.passes.analyses.channel_groups`: a rule
``rule(node, env) -> Effects`` says what a node does to the channels of its inputs (moves,
couples, produces or consumes them), or raises :class:`Unsupported` with the reason that
freezes them. Register more with ``@channel_rule("OpType")``. The rules of the operators that
reshape, split, slice, join, pad or resize are in :mod:`._prune_rules_layout`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from edgeopt.ir import Node, Value

from ._util import NameGen, default_opset
from .analyses.channel_groups import (
    Effects,
    Fixup,
    Keep,
    Labels,
    RuleEnv,
    Unsupported,
    channel_rule,
    node_name,
)

if TYPE_CHECKING:
    from edgeopt.ir import Shape

# -- helpers ------------------------------------------------------------------------------------
def _input(node: Node, i: int) -> Value | None:
    return node.inputs[i] if i < len(node.inputs) else None


def _ints(env: RuleEnv, node: Node, i: int, attr: str | None, cast: type = int) -> list | None:
    """A list from constant input ``i`` or, for older opsets, attribute ``attr``."""
    value = _input(node, i)
    if value is not None:
        tensor = env.tensor(value)
        if tensor is None:
            raise Unsupported(f"{node.op_type} with a computed {attr or 'shape'} input")
        return [cast(x) for x in tensor.numpy().reshape(-1)]
    got = node.attr(attr) if attr else None
    return None if got is None else [cast(x) for x in got]


def _rank(env: RuleEnv, value: Value | None) -> int | None:
    labels = env.labels(value)
    if labels is not None:
        return labels.rank
    tensor = env.tensor(value)
    if tensor is not None:
        return len(tensor.shape)
    shape = env.shape(value) if value is not None else None
    return None if shape is None else len(shape)


def _only_input(node: Node, env: RuleEnv) -> Labels:
    """The labels of input 0; channels on any other input are not followed."""
    labels = env.labels(node.inputs[0])
    if labels is None:
        raise Unsupported(f"{node.op_type} reads channels through a secondary input")
    return labels


def _same_all(node: Node, labels: Labels, effects: Effects) -> Effects:
    """Every output carries the labels of input 0 (shape-preserving ops)."""
    for i, out in enumerate(node.outputs):
        if out.name:
            effects.outputs[i] = labels
    effects.handled.add(0)
    return effects


def _dim(shape: Shape | None, axis: int) -> Any:
    return None if shape is None or not -len(shape) <= axis < len(shape) else shape[axis]


# -- channel-preserving ops ---------------------------------------------------------------------
def _axis(a: Any, rank: int) -> int:
    """An ONNX axis attribute (negative counts from the end) as a non-negative index."""
    a = int(a)
    return a + rank if a < 0 else a


@channel_rule("Relu", "Sigmoid", "Tanh", "HardSigmoid", "HardSwish", "LeakyRelu", "Elu", "Selu",
              "Celu", "ThresholdedRelu", "Softplus", "Softsign", "Mish", "Gelu", "Erf", "Abs",
              "Neg", "Exp", "Log", "Sqrt", "Reciprocal", "Floor", "Ceil", "Round", "Sign",
              "Identity", "Cast", "Clip", "Dropout", "Sin", "Cos", "IsNaN", "IsInf", "Not")
def _unary(node: Node, env: RuleEnv) -> Effects:
    """Elementwise on input 0 (Clip's bounds and Dropout's ratio are scalars)."""
    return _same_all(node, _only_input(node, env), Effects())


@channel_rule("MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "LpPool",
              "GlobalLpPool")
def _pool(node: Node, env: RuleEnv) -> Effects:
    """Pooling keeps axis 1; MaxPool's Indices output encodes channels, so it must be unused."""
    labels = _only_input(node, env)
    if labels.axis != 1:
        raise Unsupported(f"{node.op_type} on a tensor whose channels are on axis {labels.axis}")
    if len(node.outputs) > 1 and (node.outputs[1].uses() or node.outputs[1].is_graph_output()):
        raise Unsupported("MaxPool Indices are used (they encode channel positions)")
    return _same_all(node, labels, Effects())


@channel_rule("BatchNormalization", "InstanceNormalization")
def _norm(node: Node, env: RuleEnv) -> Effects:
    """Per-channel parameters (axis 0 of every parameter input) shrink with the channels."""
    labels = _only_input(node, env)
    if labels.axis != 1:
        raise Unsupported(f"{node.op_type} on a tensor whose channels are on axis {labels.axis}")
    extra = [o for o in node.outputs[1:] if o.uses() or o.is_graph_output()]
    if extra:
        raise Unsupported(f"{node.op_type} in training mode (running statistics are read)")
    effects = Effects()
    for i in range(1, len(node.inputs)):
        if node.inputs[i] is None:
            continue
        if env.tensor(node.inputs[i]) is None or env.labels(node.inputs[i]) is not None:
            raise Unsupported(f"{node.op_type} with computed parameters")
        effects.const(node, i, 0, labels.atoms, "param")
    effects.outputs[0] = labels
    for i in range(1, len(node.outputs)):  # unused statistics outputs keep consistent shapes
        if node.outputs[i].name:
            effects.outputs[i] = Labels(0, 1, labels.atoms)
    effects.handled.add(0)
    return effects


@channel_rule("Add", "Sub", "Mul", "Div", "Sum", "Max", "Min", "Mean", "Pow", "PRelu", "Where",
              "Equal", "Less", "Greater", "LessOrEqual", "GreaterOrEqual", "And", "Or", "Xor",
              "BitShift", "Mod")
def _elementwise(node: Node, env: RuleEnv) -> Effects:
    """Broadcasting elementwise ops: labeled inputs are coupled position by position.

    Inputs are aligned on trailing axes. A constant whose size on the channel axis equals the
    channel count is a per-channel parameter that shrinks; one of size 1 broadcasts. A computed
    input without labels that spans the channels couples them to something untracked, which
    freezes them (a graph input added to a residual branch, say).
    """
    ranks = [_rank(env, v) if v is not None else 0 for v in node.inputs]
    if any(r is None for r in ranks):
        raise Unsupported(f"{node.op_type} with an input of unknown rank")
    out_rank = max(ranks)  # type: ignore[type-var]
    labeled = {i: lab for i, v in enumerate(node.inputs) if (lab := env.labels(v)) is not None}
    width = max(len(lab) for lab in labeled.values())
    axes = {lab.axis + out_rank - lab.rank for lab in labeled.values() if len(lab) == width}
    if len(axes) != 1:
        raise Unsupported(f"{node.op_type} combines channels on different axes")
    (axis,) = axes
    effects = Effects(handled=set(labeled))
    base = next(lab for lab in labeled.values() if len(lab) == width)
    for i, value in enumerate(node.inputs):
        if value is None:
            continue
        local = axis - (out_rank - ranks[i])  # type: ignore[operator]
        lab = labeled.get(i)
        if lab is not None:
            if len(lab) == width and lab.axis == local:
                effects.unions.append((base.atoms, lab.atoms))
            elif len(lab) == 1 and lab.axis == local:  # a 1-channel map broadcast over channels
                effects.freezes.append((lab.atoms, f"broadcast over the channels by "
                                                    f"{node.op_type} '{node_name(node)}'"))
            else:
                raise Unsupported(f"{node.op_type} combines channels on different axes")
            continue
        _elementwise_other(node, env, i, local, base, effects)
    effects.outputs[0] = Labels(axis, out_rank, base.atoms)  # type: ignore[arg-type]
    return effects


def _elementwise_other(node: Node, env: RuleEnv, i: int, local: int, base: Labels,
                       effects: Effects) -> None:
    """An input of an elementwise op without labels: a parameter, a broadcast, or untracked."""
    value = node.inputs[i]
    assert value is not None
    tensor = env.tensor(value)
    shape = tuple(tensor.shape) if tensor is not None else env.shape(value)
    if local < 0:
        return  # lower rank: it broadcasts along the channel axis
    dim = _dim(shape, local)
    if dim == 1:
        return
    if dim != len(base):
        if dim is None or isinstance(dim, str):
            raise Unsupported(f"{node.op_type} input '{value.name}' has an unknown size on "
                              "the channel axis")
        raise Unsupported(f"{node.op_type} input '{value.name}' has {dim} channels, not "
                          f"{len(base)}")
    if tensor is not None:
        effects.const(node, i, local, base.atoms, "param")
    else:
        effects.unions.append((base.atoms, env.source(value, dim, f"combined with untracked "
                                                                  f"value '{value.name}'")))


# -- producers and consumers --------------------------------------------------------------------
@channel_rule("Conv", producer=True)
def _conv(node: Node, env: RuleEnv) -> Effects:
    """Conv: reads channels on axis 1 of X (axis 1 of W), produces W.shape[0] channels.

    A grouped Conv (depthwise included) couples its input and output channels group by group:
    each conv group is one channel of the coupled group (its ``C_in/group`` input channels
    are unioned, and its ``C_out/group`` outputs repeat that atom), so pruning removes whole
    conv groups and the ``group`` attribute shrinks with them.
    """
    x, w, b = node.inputs[0], node.inputs[1], _input(node, 2)
    weight = env.tensor(w)
    if weight is None or (b is not None and env.tensor(b) is None):
        raise Unsupported("Conv with a computed weight or bias")
    lx = env.labels(x)
    if lx is not None and lx.axis != 1:
        raise Unsupported(f"Conv reads a tensor whose channels are on axis {lx.axis}")
    groups, c_out, c_in_g = int(node.attr("group", 1)), weight.shape[0], weight.shape[1]
    rank = len(weight.shape)
    effects = Effects()
    if groups == 1:
        if lx is not None:
            effects.const(node, 1, 1, lx.atoms, "in")
            effects.handled.add(0)
        atoms = env.new_atoms(c_out, node_name(node))
    else:
        if lx is None:
            return effects  # a grouped Conv of an untracked input: its output is untracked too
        if len(lx) != groups * c_in_g or c_out % groups:
            raise Unsupported(f"grouped Conv with {len(lx)} input channels and group={groups}")
        blocks = lx.atoms.reshape(groups, c_in_g)
        effects.unions.extend((blocks[:, 0], blocks[:, j]) for j in range(1, c_in_g))
        atoms = np.repeat(blocks[:, 0], c_out // groups)
        effects.fixups.append(Fixup(node, _fix_conv_group, {"per_group": c_out // groups,
                                                            "atoms": atoms}))
        effects.handled.add(0)
    effects.const(node, 1, 0, atoms, "out")
    if b is not None:
        effects.const(node, 2, 0, atoms, "out")
    effects.outputs[0] = Labels(1, rank, atoms)
    return effects


def _fix_conv_group(fix: Fixup, keep: Keep, names: NameGen) -> None:
    kept = int(keep(fix.data["atoms"]).sum())
    fix.node.attrs["group"] = kept // fix.data["per_group"]


@channel_rule("ConvTranspose", producer=True)
def _conv_transpose(node: Node, env: RuleEnv) -> Effects:
    """ConvTranspose (group 1): W is ``[C_in, C_out, k...]``."""
    x, w, b = node.inputs[0], node.inputs[1], _input(node, 2)
    weight = env.tensor(w)
    if weight is None or (b is not None and env.tensor(b) is None):
        raise Unsupported("ConvTranspose with a computed weight or bias")
    if int(node.attr("group", 1)) != 1:
        raise Unsupported("grouped ConvTranspose")
    lx = env.labels(x)
    if lx is not None and lx.axis != 1:
        raise Unsupported(f"ConvTranspose reads a tensor whose channels are on axis {lx.axis}")
    effects = Effects()
    if lx is not None:
        effects.const(node, 1, 0, lx.atoms, "in")
        effects.handled.add(0)
    atoms = env.new_atoms(weight.shape[1], node_name(node))
    effects.const(node, 1, 1, atoms, "out")
    if b is not None:
        effects.const(node, 2, 0, atoms, "out")
    effects.outputs[0] = Labels(1, len(weight.shape), atoms)
    return effects


@channel_rule("Gemm", producer=True)
def _gemm(node: Node, env: RuleEnv) -> Effects:
    """Gemm with a constant B: reads features on axis 1 of A, produces B's output features."""
    a, b, c = node.inputs[0], node.inputs[1], _input(node, 2)
    weight = env.tensor(b)
    la = env.labels(a)
    if weight is None:
        if la is not None:
            raise Unsupported("Gemm with a computed B")
        return Effects()
    trans_b = bool(node.attr("transB", 0))
    if la is not None and (node.attr("transA", 0) or la.axis != 1):
        raise Unsupported("Gemm reads features on axis 0 (transA)")
    n_out = weight.shape[0 if trans_b else 1]
    bias = env.tensor(c) if c is not None else None
    if c is not None and (bias is None or env.labels(c) is not None):
        raise Unsupported("Gemm with a computed C")
    effects = Effects()
    if la is not None:
        effects.const(node, 1, 1 if trans_b else 0, la.atoms, "in")
        effects.handled.add(0)
    atoms = env.new_atoms(n_out, node_name(node))
    effects.const(node, 1, 0 if trans_b else 1, atoms, "out")
    if bias is not None and len(bias.shape) >= 1 and bias.shape[-1] == n_out and n_out > 1:
        effects.const(node, 2, len(bias.shape) - 1, atoms, "out")
    effects.outputs[0] = Labels(1, 2, atoms)
    return effects


@channel_rule("MatMul", producer=True)
def _matmul(node: Node, env: RuleEnv) -> Effects:
    """MatMul with a constant 2-D right operand: features on the last axis in and out."""
    a, b = node.inputs
    la, weight = env.labels(a), env.tensor(b)
    if env.labels(b) is not None:
        raise Unsupported("MatMul reads channels through its right operand")
    if weight is None or len(weight.shape) != 2:
        if la is not None:
            raise Unsupported("MatMul of channels with a computed or batched right operand")
        return Effects()
    rank = la.rank if la is not None else _rank(env, a)
    if rank is None:
        return Effects()
    effects = Effects()
    if la is not None:
        if la.axis != la.rank - 1:
            raise Unsupported(f"MatMul reads a tensor whose features are on axis {la.axis}")
        effects.const(node, 1, 0, la.atoms, "in")
        effects.handled.add(0)
    atoms = env.new_atoms(weight.shape[1], node_name(node))
    effects.const(node, 1, 1, atoms, "out")
    effects.outputs[0] = Labels(rank - 1, rank, atoms)  # [..., K] @ [K, N] -> [..., N]
    return effects


# -- ops that move the channel axis --------------------------------------------------------------
@channel_rule("Flatten")
def _flatten(node: Node, env: RuleEnv) -> Effects:
    """Flatten: channels on axis ``a >= axis`` become blocks of features on axis 1."""
    labels = _only_input(node, env)
    axis = _axis(node.attr("axis", 1), labels.rank)
    shape = env.shape(node.inputs[0])
    if shape is None or not 0 < axis <= labels.axis:
        raise Unsupported("Flatten merges the channels with the batch axis")
    inner, outer = shape[labels.axis + 1:], shape[axis:labels.axis]
    if not all(isinstance(d, int) for d in (*inner, *outer)):
        raise Unsupported("Flatten of a tensor with non-static spatial dims")
    if int(np.prod(outer, dtype=np.int64)) != 1:
        raise Unsupported("Flatten puts the channels inside a block (axes before them)")
    atoms = np.repeat(labels.atoms, int(np.prod(inner, dtype=np.int64)))
    return Effects(outputs={0: Labels(1, 2, atoms)}, handled={0})


@channel_rule("Transpose")
def _transpose(node: Node, env: RuleEnv) -> Effects:
    """Transpose moves the channel axis to where the permutation puts it."""
    labels = _only_input(node, env)
    perm = node.attr("perm") or list(reversed(range(labels.rank)))
    return Effects(outputs={0: labels.moved(list(perm).index(labels.axis))}, handled={0})


@channel_rule("Squeeze", "Unsqueeze")
def _squeeze(node: Node, env: RuleEnv) -> Effects:
    """(Un)Squeeze shifts the channel axis; squeezing the channel axis itself is refused."""
    labels = _only_input(node, env)
    axes = _ints(env, node, 1, "axes")
    effects = Effects(handled={0})
    if node.op_type == "Squeeze":
        if axes is None:
            shape = env.shape(node.inputs[0])
            if shape is None or not all(isinstance(d, int) for d in shape) or len(labels) == 1:
                raise Unsupported("Squeeze without axes of a tensor with unknown dims")
            axes = [i for i, d in enumerate(shape) if d == 1]
        axes = [_axis(a, labels.rank) for a in axes]
        if labels.axis in axes:
            raise Unsupported("Squeeze removes the channel axis")
        new = labels.axis - sum(a < labels.axis for a in axes)
        effects.outputs[0] = Labels(new, labels.rank - len(axes), labels.atoms)
        return effects
    assert axes is not None
    out_rank = labels.rank + len(axes)
    axes = sorted(a + out_rank if a < 0 else a for a in axes)
    kept = [i for i in range(out_rank) if i not in axes]
    effects.outputs[0] = Labels(kept[labels.axis], out_rank, labels.atoms)
    return effects


@channel_rule("ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1",
              "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare")
def _reduce(node: Node, env: RuleEnv) -> Effects:
    """Reductions over other axes keep the channels (a reduction over them mixes them)."""
    labels = _only_input(node, env)
    opset = default_opset(env.model)
    new_style = opset >= 18 or (node.op_type == "ReduceSum" and opset >= 13)
    axes = _ints(env, node, 1, "axes") if new_style else node.attr("axes")
    if not axes:
        if node.attr("noop_with_empty_axes", 0):
            return _same_all(node, labels, Effects())
        raise Unsupported(f"{node.op_type} over every axis mixes the channels")
    axes = [_axis(a, labels.rank) for a in axes]
    if labels.axis in axes:
        raise Unsupported(f"{node.op_type} over the channel axis mixes the channels")
    if node.attr("keepdims", 1):
        return _same_all(node, labels, Effects())
    new = labels.axis - sum(a < labels.axis for a in axes)
    return Effects(outputs={0: Labels(new, labels.rank - len(set(axes)), labels.atoms)},
                   handled={0})


@channel_rule("Softmax", "LogSoftmax", "Hardmax")
def _softmax(node: Node, env: RuleEnv) -> Effects:
    """Softmax over another axis keeps the channels; over them it mixes them.

    Before opset 13 the input is flattened from ``axis`` on, so any ``axis <= channel axis``
    normalizes across the channels.
    """
    labels = _only_input(node, env)
    new_style = default_opset(env.model) >= 13
    axis = _axis(node.attr("axis", -1 if new_style else 1), labels.rank)
    if axis == labels.axis or (not new_style and axis <= labels.axis):
        raise Unsupported(f"{node.op_type} normalizes across the channels")
    return _same_all(node, labels, Effects())


@channel_rule("LRN", "LpNormalization", "GroupNormalization", "LayerNormalization",
              "MeanVarianceNormalization")
def _mixing_norm(node: Node, env: RuleEnv) -> Effects:
    """Normalizations whose statistics may span channels."""
    labels = _only_input(node, env)
    axis = _axis(node.attr("axis", -1), labels.rank)
    if node.op_type == "LayerNormalization" and axis > labels.axis:
        return _same_all(node, labels, Effects())  # scale/bias span the axes after channels
    if node.op_type == "MeanVarianceNormalization":
        axes = [_axis(x, labels.rank) for x in node.attr("axes", [0, 2, 3])]
        if labels.axis not in axes:
            return _same_all(node, labels, Effects())
    if node.op_type == "LpNormalization" and axis != labels.axis:
        return _same_all(node, labels, Effects())
    raise Unsupported(f"{node.op_type} mixes neighbouring channels"
                      if node.op_type == "LRN" else f"{node.op_type} normalizes across channels")


@channel_rule("Shape")
def _shape(node: Node, env: RuleEnv) -> Effects:
    """Shape is fine as long as it does not read the channel count."""
    labels = _only_input(node, env)
    start = _axis(node.attr("start", 0), labels.rank)
    end = node.attr("end")
    stop = labels.rank if end is None else _axis(end, labels.rank)
    if start <= labels.axis < stop:
        raise Unsupported("Shape reads the channel count")
    return Effects(handled={0})
