"""What static quantization quantizes: a plan over the main graph, before any rewrite.

Each operator type has a *rule* (:data:`RULES`): which of its inputs are activations it reads
quantized, which is its weight (quantized per output channel along ``weight_axis``) and bias
(int32), and how its output range is found:

* ``own``: calibrated (Conv, Gemm, MatMul, Add, Mul, AveragePool, ...);
* ``shared``: the same parameters as its data input (MaxPool, Reshape, Transpose, ...: they
  move or select values, so int8 in gives the same int8 out) or, for Concat, as all of its
  inputs (one scale, so that concatenation is a copy);
* ``fixed``: a known range (Sigmoid ``[0, 1]``, Tanh ``[-1, 1]``).

Softmax stays float: it usually ends a classifier, where 8 bits cannot hold small
probabilities.

A shared-range operator is quantized only when its data input already is (a Reshape of a
shape tensor stays as it is). A Relu, or a Clip with a lower bound of 0, that is the only
reader of a quantized operator's output is *fused*: the range is taken after it, and the
rewrite drops it when quantization's own saturation clamps the same (zero point at the
bottom of the integer range), as TFLite's fused activations and ONNX Runtime's
``ReluQuantFusion`` do.

The plan names the tensors to quantize, their sharing classes (a union-find), and the
operators and fused activations; :mod:`._quant_qdq` turns it into QuantizeLinear and
DequantizeLinear nodes.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from edgeopt.ir import DataType, Model, Node, Value

from ._util import constant_tensor, is_default_domain

__all__ = ["RULES", "OpRule", "QuantPlan", "clip_bounds", "excluded", "node_label", "plan_static",
           "weight_axis"]

FLOATS = (DataType.FLOAT, DataType.FLOAT16)


@dataclass(frozen=True)
class OpRule:
    """How one operator type is quantized.

    Attributes:
        acts: input indices read as quantized activations; ``None``: every input.
        weight: input index of a constant weight, quantized per output channel (see
            :func:`weight_axis`). Required, unless the index is also in ``acts``: then a
            non-constant one is an activation (MatMul of two activations).
        bias: input index of a bias quantized to int32 with ``x_scale * w_scale``.
        const_inputs: float constants among the inputs are quantized per tensor (Add, Mul).
        output: ``own``, ``shared`` or ``fixed``.
        fixed: the known output range of ``fixed`` operators.
    """

    acts: tuple[int, ...] | None = (0,)
    weight: int | None = None
    bias: int | None = None
    const_inputs: bool = False
    output: str = "own"
    fixed: tuple[float, float] | None = None

    def weight_required(self) -> bool:
        """Whether the operator is quantized only with a constant weight."""
        return self.weight is not None and self.acts is not None \
            and self.weight not in self.acts


def weight_axis(node: Node, rank: int) -> int | None:
    """The output-channel axis of ``node``'s weight (input 1), or None if it has none.

    Conv ``[M, C/g, k...]``: 0; ConvTranspose ``[C, M/g, k...]``: 1; Gemm: 0 with
    ``transB``, else 1; MatMul ``[..., K, N]``: the last.
    """
    op = node.op_type
    if op == "Conv" and rank >= 3:
        return 0
    if op == "ConvTranspose" and rank >= 3:
        return 1
    if op == "Gemm" and rank == 2:
        return 0 if node.attr("transB", 0) else 1
    if op == "MatMul" and rank >= 2:
        return rank - 1
    return None


def excluded(node: Node, patterns: tuple[str, ...]) -> bool:
    """Whether ``node``'s label matches one of the fnmatch ``patterns``."""
    return any(fnmatch.fnmatchcase(node_label(node), p) for p in patterns)


_SHARED = OpRule(output="shared")
RULES: dict[str, OpRule] = {
    "Conv": OpRule(weight=1, bias=2),
    "ConvTranspose": OpRule(weight=1, bias=2),
    "Gemm": OpRule(weight=1, bias=2),
    "MatMul": OpRule(acts=(0, 1), weight=1),
    "Add": OpRule(acts=None, const_inputs=True),
    "Mul": OpRule(acts=None, const_inputs=True),
    "AveragePool": OpRule(),
    "GlobalAveragePool": OpRule(),
    "LeakyRelu": OpRule(),
    "Relu": OpRule(),
    "Clip": OpRule(),
    "Sigmoid": OpRule(output="fixed", fixed=(0.0, 1.0)),
    "HardSigmoid": OpRule(output="fixed", fixed=(0.0, 1.0)),
    "Tanh": OpRule(output="fixed", fixed=(-1.0, 1.0)),
    "Concat": OpRule(acts=None, output="shared"),
    "MaxPool": _SHARED,
    "Reshape": _SHARED,
    "Flatten": _SHARED,
    "Transpose": _SHARED,
    "Squeeze": _SHARED,
    "Unsqueeze": _SHARED,
    "Identity": _SHARED,
    "Resize": _SHARED,
    "Slice": _SHARED,
    "DepthToSpace": _SHARED,
    "SpaceToDepth": _SHARED,
}

#: Activations that may be fused into the quantized output of the operator before them.
FUSABLE = ("Relu", "Clip")


@dataclass
class QuantPlan:
    """The static quantization of one model (see the module docs).

    Attributes:
        nodes: the quantized operators, in graph order.
        tensors: the activations to quantize, in graph order (name -> value).
        fused: fused activation node -> the value whose quantization replaces it (its input).
        fixed: tensor name -> known range.
        clamp: tensor name -> the ``[lo, hi]`` its fused activation clamps to.
        consts: float constants read by quantized Add/Mul (quantized per tensor).
        skipped: operator name -> why it stays float.
    """

    nodes: list[Node] = field(default_factory=list)
    tensors: dict[str, Value] = field(default_factory=dict)
    fused: dict[Node, Value] = field(default_factory=dict)
    fixed: dict[str, tuple[float, float]] = field(default_factory=dict)
    clamp: dict[str, tuple[float, float]] = field(default_factory=dict)
    consts: dict[int, Value] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    _parent: dict[str, str] = field(default_factory=dict)

    # -- sharing classes ----------------------------------------------------------------------
    def find(self, name: str) -> str:
        """The representative of ``name``'s sharing class."""
        root = name
        while self._parent.get(root, root) != root:
            root = self._parent[root]
        while name != root:
            self._parent[name], name = root, self._parent.get(name, name)
        return root

    def share(self, a: str, b: str) -> None:
        """Give ``a`` and ``b`` the same quantization parameters."""
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self._parent[rb] = ra

    def classes(self) -> dict[str, list[str]]:
        """Representative -> the tensors of its class."""
        out: dict[str, list[str]] = {}
        for name in self.tensors:
            out.setdefault(self.find(name), []).append(name)
        return out


def node_label(node: Node) -> str:
    """The name shown for a node: its name, else its first output's."""
    return node.name or (node.outputs[0].name if node.outputs else node.op_type)


def _is_float_act(value: Value | None, model: Model) -> bool:
    return value is not None and bool(value.name) and value.dtype in FLOATS \
        and constant_tensor(value, model) is None


def clip_bounds(node: Node, model: Model) -> tuple[float, float] | None:
    """``(lo, hi)`` a Relu or Clip clamps to (None: a bound that is not a constant scalar)."""
    if node.op_type == "Relu":
        return 0.0, float("inf")
    if "min" in node.attrs or "max" in node.attrs:  # opset < 11
        return float(node.attr("min", -np.inf)), float(node.attr("max", np.inf))
    bounds = []
    for i, default in ((1, -np.inf), (2, np.inf)):
        v = node.inputs[i] if len(node.inputs) > i else None
        t = constant_tensor(v, model)
        if v is not None and (t is None or t.size != 1):
            return None
        bounds.append(default if t is None else float(np.asarray(t.numpy()).ravel()[0]))
    return bounds[0], bounds[1]


def _clamp_of(node: Node, model: Model) -> tuple[float, float] | None:
    """``[0, hi]`` of a Relu or Clip that can be fused (lower bound 0), else None."""
    b = clip_bounds(node, model)
    return (0.0, b[1]) if b is not None and b[0] == 0.0 and b[1] > 0 else None


def _why_not(node: Node, model: Model, rule: OpRule | None, exclude: tuple[str, ...],
             keep_float: Callable[[Node], str]) -> str:
    """Why ``node`` is not quantized ('' if it can be)."""
    if rule is None or not is_default_domain(node):
        return "operator not quantized"
    if excluded(node, exclude):
        return "excluded"
    why = keep_float(node)
    if why:
        return why
    if node.op_type == "Gemm" and (node.attr("transA", 0) or node.attr("alpha", 1.0) != 1.0
                                   or node.attr("beta", 1.0) != 1.0):
        return "Gemm with transA, alpha or beta"
    if rule.weight_required():
        w = node.inputs[rule.weight] if len(node.inputs) > rule.weight else None  # type: ignore[operator]
        if constant_tensor(w, model) is None:
            return "weight is not a constant"
    if not all(o.dtype in FLOATS for o in node.outputs[:1]):
        return "output is not float"
    return ""


def _act_inputs(node: Node, rule: OpRule, model: Model) -> list[Value]:
    idx = range(len(node.inputs)) if rule.acts is None else rule.acts
    out = []
    for i in idx:
        v = node.inputs[i] if i < len(node.inputs) else None
        if i == rule.weight and constant_tensor(v, model) is not None:
            continue
        if _is_float_act(v, model):
            out.append(v)  # type: ignore[arg-type]
    return out


def _fusable_after(node: Node, model: Model, exclude: tuple[str, ...]) -> Node | None:
    """The Relu/Clip that is the only reader of ``node``'s output and can be fused."""
    out = node.outputs[0]
    uses = out.uses()
    if len(uses) != 1 or out.is_graph_output():
        return None
    act = uses[0].node
    if act.op_type not in FUSABLE or not is_default_domain(act) or uses[0].index != 0 \
            or act.outputs[0].is_graph_output():
        return None
    if excluded(act, exclude):
        return None
    return act if _clamp_of(act, model) is not None else None


def _never(node: Node) -> str:
    return ""


def plan_static(model: Model, exclude: tuple[str, ...] = (),
                keep_float: Callable[[Node], str] = _never) -> QuantPlan:
    """Decide what to quantize in the main graph of ``model`` (see the module docs).

    Args:
        model: the model (not modified).
        exclude: fnmatch patterns of node names left float.
        keep_float: returns why a node must stay float ('' to quantize it if it can).
    """
    plan = QuantPlan()
    fused_acts: set[int] = set()
    for node in model.graph:
        if id(node) in fused_acts:
            continue
        rule = RULES.get(node.op_type)
        why = _why_not(node, model, rule, exclude, keep_float)
        if why:
            if rule is not None:
                plan.skipped[node_label(node)] = why
                after = _fusable_after(node, model, ()) if rule.output == "own" else None
                if after is not None and why != "operator not quantized":
                    fused_acts.add(id(after))  # a float layer keeps its activation float
                    plan.skipped[node_label(after)] = why
            continue
        assert rule is not None
        acts = _act_inputs(node, rule, model)
        if not acts or (rule.output == "shared" and node.op_type != "Concat" \
                and acts[0].name not in plan.tensors):
            continue  # a data-movement op runs on int8 only when its input is int8
        plan.nodes.append(node)
        for v in acts:
            plan.tensors.setdefault(v.name, v)
        if rule.const_inputs:
            plan.consts.update((id(v), v) for v in node.inputs
                               if v is not None and v.dtype in FLOATS
                               and constant_tensor(v, model) is not None)
        out = node.outputs[0]
        act = _fusable_after(node, model, exclude) if rule.output == "own" else None
        if act is not None:
            fused_acts.add(id(act))
            plan.fused[act] = out
            out = act.outputs[0]
            plan.clamp[out.name] = _clamp_of(act, model)  # type: ignore[assignment]
        if out.uses():
            plan.tensors.setdefault(out.name, out)
        if rule.output == "fixed":
            plan.fixed[out.name] = rule.fixed  # type: ignore[assignment]
        elif rule.output == "shared" and out.name in plan.tensors:
            for v in acts if node.op_type == "Concat" else acts[:1]:
                plan.share(v.name, out.name)
    return plan
