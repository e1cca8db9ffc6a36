"""Small seeded ONNX test models for the pruning tests, built with onnx.helper and numpy.

Every builder returns an ``onnx.ModelProto`` (opset 17, IR 8) with one float input ``x`` and
one output ``y``; weights are initializers drawn from ``numpy.random.default_rng(seed)``.
:class:`Net` is the little builder they share; it tracks the channel count and spatial size
of each tensor it makes, so the builders read like the architectures they imitate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgeopt import ir
from edgeopt.passes.analyses.channel_groups import ChannelGroups
from edgeopt.passes.prune import keep_count

__all__ = ["BUILDERS", "Net", "cnn", "concat_net", "mlp", "mobilenetv2", "plan_removal",
           "plant_zeros", "randomize_weights", "resnet", "se_net", "shuffle_net"]


@dataclass
class T:
    """A tensor of the model being built: name, channels (or features), spatial size."""

    name: str
    c: int
    hw: int = 0


@dataclass
class Net:
    """Accumulates nodes and initializers; every method returns the output tensor."""

    seed: int = 0
    nodes: list = field(default_factory=list)
    inits: list = field(default_factory=list)
    count: int = 0

    def __post_init__(self) -> None:
        self.rng = np.random.default_rng(self.seed)

    def _name(self, kind: str) -> str:
        self.count += 1
        return f"{kind}{self.count}"

    def weight(self, name: str, shape: tuple, scale: float = 1.0, offset: float = 0.0) -> str:
        fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 1
        arr = self.rng.standard_normal(shape) * scale / np.sqrt(fan_in) + offset
        self.inits.append(numpy_helper.from_array(arr.astype(np.float32), name))
        return name

    def const(self, name: str, arr: np.ndarray) -> str:
        self.inits.append(numpy_helper.from_array(np.asarray(arr), name))
        return name

    def node(self, op: str, inputs: list[str], c: int, hw: int, n_out: int = 1,
             **attrs) -> T:
        name = self._name(op.lower())
        outs = [name] + [f"{name}_{i}" for i in range(1, n_out)]
        self.nodes.append(helper.make_node(op, inputs, outs, name=name, **attrs))
        return T(name, c, hw)

    def conv(self, x: T, c: int, k: int = 3, stride: int = 1, group: int = 1,
             bias: bool = True) -> T:
        name = self._name("conv")
        w = self.weight(f"{name}.w", (c, x.c // group, k, k))
        ins = [x.name, w] + ([self.weight(f"{name}.b", (c,), 0.1)] if bias else [])
        pad = k // 2
        self.nodes.append(helper.make_node("Conv", ins, [name], name=name, group=group,
                                           kernel_shape=[k, k], strides=[stride, stride],
                                           pads=[pad] * 4))
        return T(name, c, (x.hw + 2 * pad - k) // stride + 1)

    def bn(self, x: T) -> T:
        name = self._name("bn")
        c = x.c
        params = [self.const(f"{name}.s", self.rng.uniform(0.5, 1.5, c).astype(np.float32)),
                  self.const(f"{name}.b", self.rng.normal(0, 0.1, c).astype(np.float32)),
                  self.const(f"{name}.m", self.rng.normal(0, 0.1, c).astype(np.float32)),
                  self.const(f"{name}.v", self.rng.uniform(0.5, 1.5, c).astype(np.float32))]
        self.nodes.append(helper.make_node("BatchNormalization", [x.name, *params], [name],
                                           name=name))
        return T(name, c, x.hw)

    def act(self, x: T, op: str = "Relu", **attrs) -> T:
        if op == "Relu6":
            lo, hi = self.const(self._name("lo"), np.float32(0)), \
                self.const(self._name("hi"), np.float32(6))
            return self.node("Clip", [x.name, lo, hi], x.c, x.hw)
        return self.node(op, [x.name], x.c, x.hw, **attrs)

    def cbr(self, x: T, c: int, k: int = 3, stride: int = 1, group: int = 1,
            op: str | None = "Relu") -> T:
        y = self.bn(self.conv(x, c, k, stride, group, bias=False))
        return self.act(y, op) if op else y

    def binary(self, op: str, a: T, b: T) -> T:
        return self.node(op, [a.name, b.name], max(a.c, b.c), max(a.hw, b.hw))

    def gap(self, x: T) -> T:
        return self.node("GlobalAveragePool", [x.name], x.c, 1)

    def flatten(self, x: T) -> T:
        return self.node("Flatten", [x.name], x.c * x.hw * x.hw, 0, axis=1)

    def gemm(self, x: T, n: int) -> T:
        name = self._name("fc")
        w = self.weight(f"{name}.w", (n, x.c))
        b = self.weight(f"{name}.b", (n,), 0.1)
        self.nodes.append(helper.make_node("Gemm", [x.name, w, b], [name], name=name,
                                           transB=1))
        return T(name, n)

    def linear(self, x: T, n: int) -> T:
        """MatMul + Add, the way exporters write a Linear layer."""
        name = self._name("mm")
        w = self.weight(f"{name}.w", (x.c, n))
        mm = self.node("MatMul", [x.name, w], n, 0)
        return self.node("Add", [mm.name, self.weight(f"{name}.b", (n,), 0.1)], n, 0)

    def model(self, x_shape: list, y: T, name: str = "net") -> onnx.ModelProto:
        self.nodes.append(helper.make_node("Identity", [y.name], ["y"], name="out"))
        graph = helper.make_graph(
            self.nodes, name, [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], self.inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)],
                                  ir_version=8)
        return onnx.shape_inference.infer_shapes(model)


def cnn(seed: int = 0) -> onnx.ModelProto:
    """Conv-BN-ReLU x3 with a MaxPool, Flatten -> Gemm -> ReLU -> Gemm."""
    n = Net(seed)
    x = T("x", 3, 8)
    h = n.cbr(x, 16)
    h = n.node("MaxPool", [n.cbr(h, 16).name], 16, 4, kernel_shape=[2, 2], strides=[2, 2])
    h = n.act(n.conv(h, 24), "LeakyRelu", alpha=0.1)
    h = n.act(n.gemm(n.flatten(h), 32))
    return n.model([1, 3, 8, 8], n.gemm(h, 10), "cnn")


def basic_block(n: Net, x: T, c: int, stride: int = 1) -> T:
    h = n.cbr(n.cbr(x, c, stride=stride), c, op=None)
    short = x if stride == 1 and c == x.c else n.cbr(x, c, k=1, stride=stride, op=None)
    return n.act(n.binary("Add", h, short))


def resnet(seed: int = 0) -> onnx.ModelProto:
    """Stem, two residual blocks (identity and 1x1 strided downsample shortcut), GAP, Gemm."""
    n = Net(seed)
    h = n.cbr(T("x", 3, 8), 16)
    h = basic_block(n, h, 16)
    h = basic_block(n, h, 32, stride=2)
    h = basic_block(n, h, 32)
    return n.model([1, 3, 8, 8], n.gemm(n.flatten(n.gap(h)), 10), "resnet")


def inverted_residual(n: Net, x: T, c: int, stride: int = 1, expand: int = 4) -> T:
    h = n.cbr(x, x.c * expand, k=1, op="Relu6")
    h = n.cbr(h, h.c, stride=stride, group=h.c, op="Relu6")
    h = n.cbr(h, c, k=1, op=None)
    return n.binary("Add", h, x) if stride == 1 and c == x.c else h


def mobilenetv2(seed: int = 0) -> onnx.ModelProto:
    """MobileNetV2-style: depthwise convs, ReLU6 (Clip), inverted residuals with Adds."""
    n = Net(seed)
    h = n.cbr(T("x", 3, 8), 16, op="Relu6")
    h = inverted_residual(n, h, 16)
    h = inverted_residual(n, h, 24, stride=2)
    h = inverted_residual(n, h, 24)
    h = n.cbr(h, 32, k=1, op="Relu6")
    return n.model([1, 3, 8, 8], n.gemm(n.flatten(n.gap(h)), 10), "mobilenetv2")


def se_block(n: Net, x: T, reduce: int = 4) -> T:
    s = n.gap(x)
    s = n.act(n.conv(s, x.c // reduce, k=1))
    s = n.act(n.conv(s, x.c, k=1), "Sigmoid")
    return n.binary("Mul", x, s)


def se_net(seed: int = 0) -> onnx.ModelProto:
    """Conv-BN-ReLU, squeeze-and-excitation gating, a residual Add, Conv, GAP, Gemm."""
    n = Net(seed)
    h = n.cbr(T("x", 3, 8), 16)
    g = se_block(n, n.cbr(h, 16, op="HardSwish"))
    h = n.act(n.binary("Add", g, h))
    h = n.cbr(h, 24)
    return n.model([1, 3, 8, 8], n.gemm(n.flatten(n.gap(h)), 10), "se")


def concat_net(seed: int = 0) -> onnx.ModelProto:
    """DenseNet-style dense Concats and an Inception-style block of parallel branches."""
    n = Net(seed)
    x0 = n.cbr(T("x", 3, 8), 16)
    x1 = n.cbr(x0, 8)
    d = n.node("Concat", [x0.name, x1.name], 24, 8, axis=1)
    x2 = n.cbr(n.act(n.bn(d)), 8)
    d = n.node("Concat", [d.name, x2.name], 32, 8, axis=1)
    b1 = n.cbr(d, 8, k=1)
    b2 = n.cbr(n.cbr(d, 8, k=1), 16)
    b3 = n.cbr(n.node("MaxPool", [d.name], 32, 8, kernel_shape=[3, 3], pads=[1] * 4), 8, k=1)
    inc = n.node("Concat", [b1.name, b2.name, b3.name], 32, 8, axis=1)
    h = n.cbr(inc, 16)
    return n.model([1, 3, 8, 8], n.gemm(n.flatten(n.gap(h)), 10), "concat")


def mlp(seed: int = 0) -> onnx.ModelProto:
    """Flatten(1x8x8) -> Linear 32 -> ReLU -> Linear 24 -> Tanh -> Gemm 10."""
    n = Net(seed)
    h = n.flatten(T("x", 1, 8))
    h = n.act(n.linear(h, 32))
    h = n.act(n.linear(h, 24), "Tanh")
    return n.model([2, 1, 8, 8], n.gemm(h, 10), "mlp")


def shuffle_net(seed: int = 0, groups: int = 2) -> onnx.ModelProto:
    """ShuffleNet-v1 style: grouped 1x1 Conv, channel shuffle (Reshape-Transpose-Reshape),
    depthwise 3x3, grouped 1x1 Conv, residual Add."""
    n = Net(seed)
    h = n.cbr(T("x", 3, 8), 16)
    g = n.cbr(h, 16, k=1, group=groups)
    hw, c = g.hw, g.c
    s1 = n.const("shape_split", np.array([1, groups, c // groups, hw, hw], np.int64))
    s2 = n.const("shape_merge", np.array([1, c, hw, hw], np.int64))
    r = n.node("Reshape", [g.name, s1], c, hw)
    t = n.node("Transpose", [r.name], c, hw, perm=[0, 2, 1, 3, 4])
    m = n.node("Reshape", [t.name, s2], c, hw)
    d = n.cbr(m, c, group=c, op=None)
    e = n.cbr(d, 16, k=1, group=groups, op=None)
    h = n.act(n.binary("Add", e, h))
    return n.model([1, 3, 8, 8], n.gemm(n.flatten(n.gap(h)), 10), "shuffle")


BUILDERS = {"cnn": cnn, "resnet": resnet, "mobilenetv2": mobilenetv2, "se": se_net,
            "concat": concat_net, "mlp": mlp, "shuffle": shuffle_net}


# -- planting removable channels (the exactness check) -------------------------------------------
def randomize_weights(model: ir.Model, seed: int = 0) -> None:
    """Give every float constant read by a node its own seeded random copy.

    Shared constants (``cse`` merges the light models' identical dummy weights) are split per
    use, so zeroing one layer's channels cannot leave zeros in another. Weights of rank >= 2
    are scaled by ``1/sqrt(fan_in)``; rank <= 1 constants (biases, per-channel factors)
    become ``1 + 0.1 * N(0, 1)`` for Mul/Div and ``0.1 * N(0, 1)`` otherwise.
    """
    rng = np.random.default_rng(seed)
    graph = model.graph
    for node in graph:
        for i, value in enumerate(node.inputs):
            if value is None or value.const_value is None or value.is_graph_input() \
                    or value.const_value.dtype != ir.DataType.FLOAT or node.op_type in (
                    "Reshape", "Resize", "Clip", "Pad", "BatchNormalization",
                    "InstanceNormalization"):
                continue
            shape = tuple(value.const_value.shape)
            if len(shape) >= 2:
                arr = rng.standard_normal(shape, dtype=np.float32) / np.float32(
                    math.sqrt(int(np.prod(shape[1:])) or 1))
            elif node.op_type in ("Mul", "Div"):
                arr = 1 + 0.1 * rng.standard_normal(shape)
            else:
                arr = 0.1 * rng.standard_normal(shape)
            fresh = graph.add_initializer(f"{value.name}__r{node.outputs[0].name}_{i}",
                                          ir.ArrayTensor(arr.astype(np.float32)))
            node.set_input(i, fresh)


def plan_removal(groups: ChannelGroups, ratio: float, seed: int = 0) -> dict[int, np.ndarray]:
    """Random channels per prunable group, as many as ``prune:<ratio>`` removes."""
    rng = np.random.default_rng(seed)
    removal = {}
    for g in groups.prunable():
        n = g.size - keep_count(g.size, math.floor(g.size * ratio + 1e-9))
        if n:
            removal[g.id] = np.sort(rng.choice(g.size, n, replace=False))
    return removal


def plant_zeros(groups: ChannelGroups, removal: dict[int, np.ndarray]) -> int:
    """Zero the producer rows and consumer columns of the channels in ``removal``.

    After this, the channels contribute nothing to the model's outputs (whatever flows
    through them only reaches consumers with zero weights), so removing them is exact, and
    an ``l1`` importance ranks them lowest. Returns how many tensors were changed.
    """
    changed = 0
    for gid, channels in removal.items():
        group = groups.groups[gid]
        for m in [*group.members, *group.partial_members]:
            if m.role not in ("out", "in") or m.value.const_value is None:
                continue
            pos = m.positions[channels].ravel()
            pos = pos[pos >= 0]
            if not len(pos):
                continue
            arr = np.array(m.value.const_value.numpy())
            index = [slice(None)] * arr.ndim
            index[m.axis] = pos
            arr[tuple(index)] = 0
            m.value.const_value = ir.ArrayTensor(arr)
            changed += 1
    return changed
