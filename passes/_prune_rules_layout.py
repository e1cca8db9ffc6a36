"""Built-in channel rules of the operators that reshape, split, slice, join, pad or resize.

The others, and how rules work, are in :mod:`._prune_rules`.

Most of these rewrite a constant when channels go: a Reshape shape, Split sizes, Slice
bounds, Pad amounts.
"""

from __future__ import annotations

import numpy as np

from edgeopt.ir import Node

from ._prune_rules import _axis, _dim, _input, _ints, _only_input, _rank, _same_all
from ._util import NameGen, as_tensor, default_opset, replace_constant_input
from .analyses.channel_groups import (
    Effects,
    Fixup,
    Keep,
    Labels,
    RuleEnv,
    Unsupported,
    channel_rule,
)


# -- reshapes ------------------------------------------------------------------------------------
@channel_rule("Reshape")
def _reshape(node: Node, env: RuleEnv) -> Effects:
    """Reshape that keeps the channel axis, or merges it with the axes after it.

    The dims before the channel axis must stay as they are, and the product of the dims from
    the channel axis on must be static. Splitting the channel axis (the first half of a
    channel shuffle) is refused. When the target shape spells the channel count out, a
    :class:`Fixup` rewrites it after pruning.
    """
    labels = _only_input(node, env)
    tensor = env.tensor(_input(node, 1))
    if tensor is None:
        raise Unsupported("Reshape to a computed shape")
    if node.attr("allowzero", 0):
        raise Unsupported("Reshape with allowzero")
    target = [int(x) for x in tensor.numpy().reshape(-1)]
    shape = env.shape(node.inputs[0])
    a = labels.axis
    if shape is None or len(target) <= a:
        raise Unsupported("Reshape of a tensor of unknown shape, or to a lower rank")
    out = [shape[i] if d == 0 and i < len(shape) else d for i, d in enumerate(target)]
    tail_in = shape[a:]
    if not all(isinstance(d, int) for d in tail_in):
        raise Unsupported("Reshape of a tensor with non-static dims after the channels")
    total = int(np.prod(tail_in, dtype=np.int64))
    out = _resolve_tail(out, a, total)
    if any(out[i] != shape[i] and target[i] not in (0, -1) for i in range(a)):
        raise Unsupported("Reshape changes the axes before the channels")
    merged = _merged_block(tail_in, out[a])
    if merged is None:
        raise Unsupported("Reshape splits the channel axis (channel shuffle)")
    atoms = np.repeat(labels.atoms, merged)
    effects = Effects(outputs={0: Labels(a, len(target), atoms)}, handled={0})
    if target[a] > 0:
        effects.fixups.append(Fixup(node, _fix_shape_entry, {"input": 1, "j": a, "atoms": atoms}))
    return effects


def _resolve_tail(out: list, a: int, total: int) -> list:
    """Resolve a -1 in the dims from the channel axis on (their product must be ``total``)."""
    tail = out[a:]
    if -1 in tail:
        known = int(np.prod([d for d in tail if d != -1], dtype=np.int64))
        if known == 0 or total % known:
            raise Unsupported("Reshape with an inconsistent target shape")
        tail[tail.index(-1)] = total // known
    if not all(isinstance(d, int) for d in tail) or int(np.prod(tail, dtype=np.int64)) != total:
        raise Unsupported("Reshape moves elements across the channel axis")
    return out[:a] + tail


def _merged_block(tail_in: tuple, channels_out: int) -> int | None:
    """How many input positions each output channel position covers (None: the axis splits)."""
    prod, block = tail_in[0], 1
    if prod == channels_out:
        return 1
    for d in tail_in[1:]:
        prod, block = prod * d, block * d
        if prod == channels_out:
            return block
    return None


def _fix_shape_entry(fix: Fixup, keep: Keep, names: NameGen) -> None:
    """Set entry ``j`` of constant input ``input`` to the number of channels kept.

    The input is a shape vector: Reshape's ``shape``, Resize's ``sizes``.
    """
    node, i = fix.node, fix.data["input"]
    shape = node.inputs[i].const_value.numpy().copy()  # type: ignore[union-attr]
    shape.reshape(-1)[fix.data["j"]] = int(keep(fix.data["atoms"]).sum())
    replace_constant_input(node, i, as_tensor(shape), names)


@channel_rule("Split")
def _split(node: Node, env: RuleEnv) -> Effects:
    """Split on the channel axis hands each output its range of atoms (sizes must be static)."""
    labels = _only_input(node, env)
    axis = _axis(node.attr("axis", 0), labels.rank)
    if axis != labels.axis:
        return _same_all(node, labels, Effects())
    sizes = _ints(env, node, 1, "split")
    n = len(node.outputs)
    if sizes is None:
        if len(labels) % n:
            raise Unsupported("uneven Split without sizes")
        sizes = [len(labels) // n] * n
    if sum(sizes) != len(labels) or len(sizes) != n:
        raise Unsupported("Split sizes do not match the channels")
    bounds = np.cumsum([0, *sizes])
    parts = [labels.atoms[bounds[i]:bounds[i + 1]] for i in range(n)]
    effects = Effects(handled={0})
    for i, part in enumerate(parts):
        effects.outputs[i] = Labels(axis, labels.rank, part)
    effects.fixups.append(Fixup(node, _fix_split, {"parts": parts, "atoms": labels.atoms,
                                                  "opset": default_opset(env.model)}))
    return effects


def _fix_split(fix: Fixup, keep: Keep, names: NameGen) -> None:
    node = fix.node
    sizes = [int(keep(p).sum()) for p in fix.data["parts"]]
    if any(s == 0 for s in sizes):
        raise ValueError(f"Split '{node.name}' would have an empty output")
    if fix.data["opset"] >= 13:  # sizes are an input (opset 18 may also carry num_outputs)
        replace_constant_input(node, 1, as_tensor(np.array(sizes, np.int64)), names)
        if "num_outputs" in node.attrs:
            del node.attrs["num_outputs"]
    else:
        node.attrs["split"] = sizes


@channel_rule("Slice")
def _slice(node: Node, env: RuleEnv) -> Effects:
    """Slice of a contiguous channel range (step 1); other axes keep the channels."""
    labels = _only_input(node, env)
    opset = default_opset(env.model)
    starts = _ints(env, node, 1, "starts") if opset >= 10 else node.attr("starts")
    ends = _ints(env, node, 2, "ends") if opset >= 10 else node.attr("ends")
    axes = _ints(env, node, 3, "axes") if opset >= 10 else node.attr("axes")
    steps = _ints(env, node, 4, "steps") if opset >= 10 else None
    if starts is None or ends is None:
        raise Unsupported("Slice without static starts/ends")
    axes = list(range(len(starts))) if axes is None else [int(a) for a in axes]
    axes = [_axis(a, labels.rank) for a in axes]
    if labels.axis not in axes:
        return Effects(outputs={0: labels}, handled={0})
    j = axes.index(labels.axis)
    if steps is not None and steps[j] != 1:
        raise Unsupported("Slice of the channels with a step")
    start, stop, _ = slice(int(starts[j]), int(ends[j])).indices(len(labels))
    atoms = labels.atoms[start:max(start, stop)]
    return Effects(outputs={0: Labels(labels.axis, labels.rank, atoms)}, handled={0},
                   fixups=[Fixup(node, _fix_slice, {"j": j, "start": start, "stop": stop,
                                                    "atoms": labels.atoms})])


def _fix_slice(fix: Fixup, keep: Keep, names: NameGen) -> None:
    node, j = fix.node, fix.data["j"]
    mask = keep(fix.data["atoms"])
    new_start = int(mask[:fix.data["start"]].sum())
    new_stop = new_start + int(mask[fix.data["start"]:fix.data["stop"]].sum())
    for index, new in ((1, new_start), (2, new_stop)):
        value = node.inputs[index] if len(node.inputs) > index else None
        if value is None:  # opset < 10: attributes
            name = "starts" if index == 1 else "ends"
            vals = list(node.attr(name))
            vals[j] = new
            node.attrs[name] = vals
            continue
        arr = value.const_value.numpy().copy()  # type: ignore[union-attr]
        arr.reshape(-1)[j] = new
        replace_constant_input(node, index, as_tensor(arr), names)


@channel_rule("Concat")
def _concat(node: Node, env: RuleEnv) -> Effects:
    """Concat on the channel axis chains the inputs' atoms; on another axis it couples them.

    An untracked input (a graph input, a frozen branch) gets frozen atoms of its own.
    """
    labeled = {i: lab for i, v in enumerate(node.inputs) if (lab := env.labels(v)) is not None}
    first = next(iter(labeled.values()))
    if any(lab.rank != first.rank or lab.axis != first.axis for lab in labeled.values()):
        raise Unsupported("Concat of tensors whose channels are on different axes")
    axis = int(node.attr("axis", 0))
    axis = axis + first.rank if axis < 0 else axis
    effects = Effects(handled=set(labeled))
    parts = []
    for i, value in enumerate(node.inputs):
        lab = labeled.get(i)
        if lab is None:
            dim = _dim(env.shape(value), first.axis)
            if not isinstance(dim, int):
                raise Unsupported(f"Concat input '{value.name}' has an unknown channel count")
            atoms = env.source(value, dim, f"concatenated with untracked value '{value.name}'")
        else:
            atoms = lab.atoms
        if axis != first.axis:
            if len(atoms) != len(first):
                raise Unsupported("Concat of tensors with different channel counts")
            effects.unions.append((first.atoms, atoms))
        parts.append(atoms)
    atoms = np.concatenate(parts) if axis == first.axis else first.atoms
    effects.outputs[0] = Labels(first.axis, first.rank, atoms)
    return effects


@channel_rule("Pad")
def _pad(node: Node, env: RuleEnv) -> Effects:
    """Pad keeps the channels unless it pads the channel axis."""
    labels = _only_input(node, env)
    opset = default_opset(env.model)
    pads = _ints(env, node, 1, "pads") if opset >= 11 else node.attr("pads")
    axes = _ints(env, node, 3, "axes") if opset >= 18 else None
    if pads is None:
        raise Unsupported("Pad without static pads")
    axes = list(range(labels.rank)) if axes is None else \
        [_axis(a, labels.rank) for a in axes]
    if labels.axis in axes:
        j = axes.index(labels.axis)
        if pads[j] or pads[j + len(axes)]:
            raise Unsupported("Pad of the channel axis")
    return _same_all(node, labels, Effects())


@channel_rule("Resize", "Upsample")
def _resize(node: Node, env: RuleEnv) -> Effects:
    """Resize/Upsample with a scale of 1 on the channel axis (or target sizes, rewritten)."""
    labels = _only_input(node, env)
    old = node.op_type == "Upsample" or default_opset(env.model) < 11
    scales_at, sizes_at = (1, None) if old else (2, 3)
    sizes = _ints(env, node, sizes_at, None) if sizes_at is not None else None
    scales = _ints(env, node, scales_at, "scales" if old else None, float)
    axes = node.attr("axes")
    axes = list(range(labels.rank)) if axes is None else \
        [_axis(a, labels.rank) for a in axes]
    effects = _same_all(node, labels, Effects())
    if labels.axis not in axes:
        return effects
    j = axes.index(labels.axis)
    if sizes:
        effects.fixups.append(Fixup(node, _fix_shape_entry,
                                    {"input": 3, "j": j, "atoms": labels.atoms}))
    elif not scales or float(scales[j]) != 1.0:
        raise Unsupported(f"{node.op_type} scales the channel axis")
    return effects


@channel_rule("Gather")
def _gather(node: Node, env: RuleEnv) -> Effects:
    """Gather along another axis moves the channel axis; along it, it picks channels."""
    labels = _only_input(node, env)
    axis = _axis(node.attr("axis", 0), labels.rank)
    if axis == labels.axis:
        raise Unsupported("Gather on the channel axis")
    q = _rank(env, node.inputs[1])
    if q is None:
        raise Unsupported("Gather with indices of unknown rank")
    new = labels.axis if axis > labels.axis else labels.axis + q - 1
    return Effects(outputs={0: Labels(new, labels.rank + q - 1, labels.atoms)}, handled={0})
