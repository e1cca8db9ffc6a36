"""ChannelGroups: one tiny graph per channel rule, the coupling cases, and the frozen reasons."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import build_model

from edgeopt.passes.analyses.channel_groups import (
    CHANNEL_RULES,
    ChannelGroup,
    ChannelGroups,
    Effects,
    channel_rule,
)

HEADER = '<ir_version: 8, opset_import: ["" : 17]>\n'


def analyze(body: str, inputs: str, outputs: str = "float[1,10] y", header: str = HEADER,
            **weights) -> ChannelGroups:
    """Groups of a one-graph model; ``weights`` are shapes (random) or arrays."""
    rng = np.random.default_rng(0)
    arrays = {k: (v if isinstance(v, np.ndarray) else
                  rng.standard_normal(v).astype(np.float32)) for k, v in weights.items()}
    decl = ", ".join([inputs, *(f"{_type(a)} {k}" for k, a in arrays.items())])
    text = header + f"g ({decl}) => ({outputs}) {{\n{body}\n}}"
    return ChannelGroups(build_model(text, arrays))


def _type(a: np.ndarray) -> str:
    kind = {np.float32: "float", np.int64: "int64"}[a.dtype.type]
    return f"{kind}[{','.join(map(str, a.shape))}]"


def group_of(cg: ChannelGroups, producer: str) -> ChannelGroup:
    (group,) = [g for g in cg.groups if producer in g.producers]
    return group


def summary(group: ChannelGroup) -> set[tuple[str, int, str, tuple]]:
    """(value, axis, role, positions as nested tuples) of every full member."""
    return {(m.value.name, m.axis, m.role, tuple(map(tuple, m.positions.tolist())))
            for m in group.members}


def col(*xs: int) -> tuple:
    return tuple((x,) for x in xs)


X = "float[1,3,6,6] x"
HEAD = "gp = GlobalAveragePool(h)\n fl = Flatten(gp)\n y = Gemm <transB = 1> (fl, wf)"


# -- producers, consumers, propagation ----------------------------------------------------------
def test_conv_producer_and_consumer():
    cg = analyze("a = Conv <kernel_shape = [3, 3], pads = [1, 1, 1, 1]> (x, w1, b1)\n"
                 "h = Conv <kernel_shape = [1, 1]> (a, w2)\n" + HEAD, X,
                 w1=(4, 3, 3, 3), b1=(4,), w2=(5, 4, 1, 1), wf=(10, 5))
    group = group_of(cg, "a")  # unnamed nodes are named after their output
    assert group.size == 4 and group.frozen is None
    assert summary(group) == {("w1", 0, "out", col(0, 1, 2, 3)), ("b1", 0, "out", col(0, 1, 2, 3)),
                              ("a", 1, "act", col(0, 1, 2, 3)), ("w2", 1, "in", col(0, 1, 2, 3))}
    assert [m.value.name for m in group.producer_weights()] == ["w1", "b1"]
    assert [m.value.name for m in group.consumer_weights()] == ["w2"]
    assert [m.value.name for m in group.activations()] == ["a"]
    assert group_of(cg, "h").size == 5
    assert group_of(cg, "y").frozen == "graph output 'y'"
    assert [g.id for g in cg.prunable()] == [0, 1]


@pytest.mark.parametrize("op", ["Relu", "Sigmoid", "Tanh", "HardSigmoid", "HardSwish",
                                "LeakyRelu <alpha = 0.2>", "Identity", "Dropout",
                                "Cast <to = 1>", "MaxPool <kernel_shape = [2, 2]>",
                                "AveragePool <kernel_shape = [3, 3], pads = [1, 1, 1, 1]>",
                                "GlobalAveragePool", "GlobalMaxPool"])
def test_channel_preserving_ops(op):
    cg = analyze(f"a = Conv <kernel_shape = [1, 1]> (x, w1)\n t = {op} (a)\n"
                 "h = Conv <kernel_shape = [1, 1]> (t, w2)\n" + HEAD, X,
                 w1=(4, 3, 1, 1), w2=(5, 4, 1, 1), wf=(10, 5))
    group = group_of(cg, "a")
    assert group.frozen is None
    assert {m.value.name for m in group.members} == {"w1", "a", "t", "w2"}


def test_clip_pad_resize_keep_channels():
    body = """a = Conv <kernel_shape = [1, 1]> (x, w1)
    c = Clip (a, lo, hi)
    p = Pad <mode = "constant"> (c, pads)
    r = Resize <mode = "nearest"> (p, , scales)
    h = Conv <kernel_shape = [1, 1]> (r, w2)
    """ + HEAD
    cg = analyze(body, X, w1=(4, 3, 1, 1), w2=(5, 4, 1, 1), wf=(10, 5),
                 lo=np.array(0, np.float32), hi=np.array(6, np.float32),
                 pads=np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64),
                 scales=np.array([1, 1, 2, 2], np.float32))
    group = group_of(cg, "a")
    assert group.frozen is None
    assert {m.value.name for m in group.activations()} == {"a", "c", "p", "r"}


@pytest.mark.parametrize(("what", "reason"), [
    ("p = Pad <mode = \"constant\"> (a, pads)", "Pad 'p': Pad of the channel axis"),
    ("p = Resize <mode = \"nearest\"> (a, , scales)", "Resize 'p': Resize scales the channel axis"),
    ("p = Softmax <axis = 1> (a)", "Softmax 'p': Softmax normalizes across the channels"),
    ("p = LRN <size = 3> (a)", "LRN 'p': LRN mixes neighbouring channels"),
    ("p = ReduceMax <axes = [1]> (a)", "ReduceMax 'p': ReduceMax over the channel axis mixes "
                                       "the channels"),
    ("p = Gather <axis = 1> (a, idx)", "Gather 'p': Gather on the channel axis"),
    ("p = acme.Foo (a)", "no channel rule for acme::Foo ('p')"),
    ("s = Shape (a)\n p = Reshape (a, s)", "Shape 's': Shape reads the channel count"),
])
def test_frozen_reasons(what, reason):
    body = f"a = Conv <kernel_shape = [1, 1]> (x, w1)\n {what}\n y = Identity(p)"
    weights = {"w1": (4, 3, 1, 1), "pads": np.array([0, 1, 0, 0, 0, 1, 0, 0], np.int64),
               "scales": np.array([1, 2, 1, 1], np.float32), "idx": np.array([0, 2], np.int64)}
    header = '<ir_version: 8, opset_import: ["" : 17, "acme" : 1]>\n'
    cg = analyze(body, X, outputs="float[1,4,6,6] y", header=header,
                 **{k: v for k, v in weights.items() if k in what or k == "w1"})
    assert group_of(cg, "a").frozen == reason
    assert cg.prunable() == []


def test_batchnorm_and_prelu_params():
    body = """a = Conv <kernel_shape = [1, 1]> (x, w1)
    b = BatchNormalization (a, s, bb, m, v)
    c = PRelu (b, slope)
    d = Add (c, bias)
    e = Mul (d, k)
    h = Conv <kernel_shape = [1, 1]> (e, w2)
    """ + HEAD
    cg = analyze(body, X, w1=(4, 3, 1, 1), w2=(5, 4, 1, 1), wf=(10, 5), s=(4,), bb=(4,),
                 m=(4,), v=np.ones(4, np.float32), slope=(4, 1, 1), bias=(1, 4, 1, 1),
                 k=np.array(2, np.float32))
    group = group_of(cg, "a")
    params = {(m.value.name, m.axis) for m in group.members if m.role == "param"}
    assert params == {("s", 0), ("bb", 0), ("m", 0), ("v", 0), ("slope", 0), ("bias", 1)}
    assert [(m.value.name, m.node.op_type, m.index) for m in group.bn_scales()] == \
        [("s", "BatchNormalization", 1)]


def test_residual_add_couples_producers():
    body = """a = Conv <kernel_shape = [1, 1]> (x, w1)
    r = Relu (a)
    b = Conv <kernel_shape = [3, 3], pads = [1, 1, 1, 1]> (r, w2)
    c = Add (b, r)
    d = Conv <kernel_shape = [1, 1]> (c, w3)
    s = Add (d, c)
    h = Conv <kernel_shape = [1, 1]> (s, w4)
    """ + HEAD
    cg = analyze(body, X, w1=(4, 3, 1, 1), w2=(4, 4, 3, 3), w3=(4, 4, 1, 1),
                 w4=(5, 4, 1, 1), wf=(10, 5))
    group = group_of(cg, "a")
    assert group.producers == ["a", "b", "d"]
    assert {m.value.name for m in group.consumer_weights()} == {"w2", "w3", "w4"}
    assert len(cg.prunable()) == 2


def test_se_gating_couples_excitation_with_features():
    body = """a = Conv <kernel_shape = [1, 1]> (x, w1)
    g = GlobalAveragePool (a)
    r = Conv <kernel_shape = [1, 1]> (g, wr, br)
    rr = Relu (r)
    e = Conv <kernel_shape = [1, 1]> (rr, we, be)
    s = Sigmoid (e)
    h = Mul (a, s)
    """ + HEAD
    cg = analyze(body, X, w1=(8, 3, 1, 1), wr=(2, 8, 1, 1), br=(2,), we=(8, 2, 1, 1),
                 be=(8,), wf=(10, 8))
    main = group_of(cg, "a")
    assert main.producers == ["a", "e"] and main.size == 8
    assert {m.value.name for m in main.consumer_weights()} == {"wr", "wf"}
    squeeze = group_of(cg, "r")
    assert squeeze.size == 2 and {m.value.name for m in squeeze.consumer_weights()} == {"we"}


def test_elementwise_with_graph_input_freezes():
    cg = analyze("a = Conv <kernel_shape = [1, 1]> (x, w1)\n h = Add (a, z)\n" + HEAD,
                 X + ", float[1,4,6,6] z", w1=(4, 3, 1, 1), wf=(10, 4))
    assert group_of(cg, "a").frozen == "combined with untracked value 'z'"


def test_broadcast_one_channel_map_is_frozen_not_coupled():
    body = """a = Conv <kernel_shape = [1, 1]> (x, w1)
    m = Conv <kernel_shape = [1, 1]> (a, wm)
    s = Sigmoid (m)
    h = Mul (a, s)
    """ + HEAD
    cg = analyze(body, X, w1=(4, 3, 1, 1), wm=(1, 4, 1, 1), wf=(10, 4))
    assert group_of(cg, "a").frozen is None
    assert group_of(cg, "m").frozen == "broadcast over the channels by Mul 'h'"


# -- index maps -----------------------------------------------------------------------------------
def test_concat_index_ranges():
    body = """a = Conv <kernel_shape = [1, 1]> (x, w1)
    b = Conv <kernel_shape = [1, 1]> (a, w2)
    c = Concat <axis = 1> (a, b)
    h = Conv <kernel_shape = [1, 1]> (c, w3)
    """ + HEAD
    cg = analyze(body, X, w1=(3, 3, 1, 1), w2=(2, 3, 1, 1), w3=(5, 5, 1, 1), wf=(10, 5))
    a, b = group_of(cg, "a"), group_of(cg, "b")
    assert ("w3", 1, "in", col(0, 1, 2)) in summary(a)
    assert ("w3", 1, "in", col(3, 4)) in summary(b)
    assert ("c", 1, "act", col(0, 1, 2)) in summary(a)
    assert ("c", 1, "act", col(3, 4)) in summary(b)


def test_concat_with_graph_input_keeps_own_channels_prunable():
    body = """a = Conv <kernel_shape = [1, 1]> (x, w1)
    c = Concat <axis = 1> (x, a)
    h = Conv <kernel_shape = [1, 1]> (c, w3)
    """ + HEAD
    cg = analyze(body, X, w1=(4, 3, 1, 1), w3=(5, 7, 1, 1), wf=(10, 5))
    assert ("w3", 1, "in", col(3, 4, 5, 6)) in summary(group_of(cg, "a"))
    assert group_of(cg, "a").frozen is None


def test_split_and_slice_hand_out_ranges():
    body = """a = Conv <kernel_shape = [1, 1]> (x, w1)
    s1, s2 = Split <axis = 1> (a, sizes)
    t = Slice (a, st, en, ax)
    u = Conv <kernel_shape = [1, 1]> (s1, w2)
    v = Conv <kernel_shape = [1, 1]> (s2, w3)
    w = Conv <kernel_shape = [1, 1]> (t, w4)
    h = Sum (u, v, w)
    """ + HEAD
    cg = analyze(body, X, w1=(6, 3, 1, 1), sizes=np.array([2, 4], np.int64),
                 st=np.array([1], np.int64), en=np.array([4], np.int64),
                 ax=np.array([1], np.int64), w2=(5, 2, 1, 1), w3=(5, 4, 1, 1),
                 w4=(5, 3, 1, 1), wf=(10, 5))
    group = group_of(cg, "a")
    partial = {(m.value.name, m.role): m.positions.ravel().tolist()
               for m in group.partial_members}
    assert partial[("w2", "in")] == [0, 1, -1, -1, -1, -1]
    assert partial[("w3", "in")] == [-1, -1, 0, 1, 2, 3]
    assert partial[("w4", "in")] == [-1, 0, 1, 2, -1, -1]
    assert group_of(cg, "u").producers == ["u", "v", "w"]


def test_depthwise_couples_input_and_output():
    body = """a = Conv <kernel_shape = [1, 1]> (x, w1)
    d = Conv <kernel_shape = [3, 3], pads = [1, 1, 1, 1], group = 4> (a, wd, bd)
    h = Conv <kernel_shape = [1, 1]> (d, w2)
    """ + HEAD
    cg = analyze(body, X, w1=(4, 3, 1, 1), wd=(4, 1, 3, 3), bd=(4,), w2=(5, 4, 1, 1),
                 wf=(10, 5))
    group = group_of(cg, "a")
    assert group.producers == ["a"]
    assert {("wd", 0, "out"), ("bd", 0, "out"), ("d", 1, "act")} <= \
        {(n, a, r) for n, a, r, _ in summary(group)}
    assert len(cg.fixups) == 1 and cg.fixups[0].node.op_type == "Conv"


def test_grouped_conv_couples_per_group():
    body = """a = Conv <kernel_shape = [1, 1]> (x, w1)
    d = Conv <kernel_shape = [1, 1], group = 2> (a, wd)
    h = Conv <kernel_shape = [1, 1]> (d, w2)
    """ + HEAD
    cg = analyze(body, X, w1=(4, 3, 1, 1), wd=(6, 2, 1, 1), w2=(5, 6, 1, 1), wf=(10, 5))
    group = group_of(cg, "a")
    assert group.size == 2  # one channel per conv group
    assert ("w1", 0, "out", ((0, 1), (2, 3))) in summary(group)
    assert ("wd", 0, "out", ((0, 1, 2), (3, 4, 5))) in summary(group)
    assert ("w2", 1, "in", ((0, 1, 2), (3, 4, 5))) in summary(group)


def test_flatten_into_gemm_owns_blocks():
    body = """a = Conv <kernel_shape = [1, 1]> (x, w1)
    p = MaxPool <kernel_shape = [3, 3], strides = [3, 3]> (a)
    f = Flatten (p)
    y = Gemm <transB = 1> (f, wf, bf)
    """
    cg = analyze(body, X, w1=(3, 3, 1, 1), wf=(10, 12), bf=(10,))
    group = group_of(cg, "a")
    assert ("wf", 1, "in", ((0, 1, 2, 3), (4, 5, 6, 7), (8, 9, 10, 11))) in summary(group)
    assert ("f", 1, "act", ((0, 1, 2, 3), (4, 5, 6, 7), (8, 9, 10, 11))) in summary(group)


def test_reshape_into_matmul_and_transpose():
    body = """a = Conv <kernel_shape = [1, 1]> (x, w1)
    r = Reshape (a, shape)
    m = MatMul (r, wm)
    z = Add (m, bm)
    t = Transpose <perm = [0, 2, 3, 1]> (a)
    n = MatMul (t, wt)
    o = ReduceMean <axes = [1, 2], keepdims = 0> (n)
    y = Add (z, o)
    """
    cg = analyze(body, X, outputs="float[1,5] y", w1=(2, 3, 1, 1),
                 shape=np.array([1, -1], np.int64), wm=(72, 5), bm=(5,), wt=(2, 5))
    group = group_of(cg, "a")
    assert ("wm", 0, "in", (tuple(range(36)), tuple(range(36, 72)))) in summary(group)
    assert ("wt", 0, "in", col(0, 1)) in summary(group)
    assert ("t", 3, "act", col(0, 1)) in summary(group)
    coupled = group_of(cg, "m")
    assert coupled.producers == ["m", "n"] and coupled.frozen == "graph output 'y'"
    assert ("bm", 0, "param", col(*range(5))) in summary(coupled)


def test_gemm_matmul_producers_mlp():
    body = """f = Flatten (x)
    a = MatMul (f, w1)
    b = Add (a, b1)
    r = Relu (b)
    y = Gemm (r, w2, b2)
    """
    cg = analyze(body, "float[2,1,3,3] x", outputs="float[2,4] y", w1=(9, 6), b1=(6,),
                 w2=(6, 4), b2=(4,))
    hidden = group_of(cg, "a")
    assert summary(hidden) == {("w1", 1, "out", col(*range(6))),
                               ("b1", 0, "param", col(*range(6))),
                               ("a", 1, "act", col(*range(6))), ("b", 1, "act", col(*range(6))),
                               ("r", 1, "act", col(*range(6))), ("w2", 0, "in", col(*range(6)))}
    assert group_of(cg, "y").frozen == "graph output 'y'"


def test_conv_transpose():
    body = """a = Conv <kernel_shape = [1, 1]> (x, w1)
    u = ConvTranspose <kernel_shape = [2, 2], strides = [2, 2]> (a, wt, bt)
    h = Conv <kernel_shape = [1, 1]> (u, w2)
    """ + HEAD
    cg = analyze(body, X, w1=(4, 3, 1, 1), wt=(4, 3, 2, 2), bt=(3,), w2=(5, 3, 1, 1),
                 wf=(10, 5))
    assert ("wt", 0, "in", col(0, 1, 2, 3)) in summary(group_of(cg, "a"))
    assert {("wt", 1, "out"), ("bt", 0, "out"), ("w2", 1, "in")} <= \
        {(n, a, r) for n, a, r, _ in summary(group_of(cg, "u"))}


# -- frozen groups --------------------------------------------------------------------------------
def test_channel_shuffle_is_frozen():
    body = """a = Conv <kernel_shape = [1, 1]> (x, w1)
    r = Reshape (a, s1)
    t = Transpose <perm = [0, 2, 1, 3, 4]> (r)
    u = Reshape (t, s2)
    h = Conv <kernel_shape = [1, 1]> (u, w2)
    """ + HEAD
    cg = analyze(body, X, w1=(4, 3, 1, 1), s1=np.array([1, 2, 2, 6, 6], np.int64),
                 s2=np.array([1, 4, 6, 6], np.int64), w2=(5, 4, 1, 1), wf=(10, 5))
    assert group_of(cg, "a").frozen == \
        "Reshape 'r': Reshape splits the channel axis (channel shuffle)"
    assert group_of(cg, "h").frozen is None  # the next producer is unaffected


def test_value_read_in_subgraph_is_frozen():
    body = """a = Conv <kernel_shape = [1, 1]> (x, w1)
    h = If (c) <then_branch = t () => (float[1,4,6,6] o) { o = Relu(a) },
                else_branch = e () => (float[1,4,6,6] o2) { o2 = Identity(a) }>
    """ + HEAD
    cg = analyze(body, X + ", bool c", w1=(4, 3, 1, 1), wf=(10, 4))
    assert group_of(cg, "a").frozen == "'a' is read inside a subgraph of If 'h'"


def test_non_static_flatten_is_frozen():
    cg = analyze("a = Conv <kernel_shape = [1, 1]> (x, w1)\n f = Flatten(a)\n"
                 "y = Gemm <transB = 1> (f, wf)", "float[1,3,H,W] x", w1=(4, 3, 1, 1),
                 wf=(10, 4))
    assert group_of(cg, "a").frozen == \
        "Flatten 'f': Flatten of a tensor with non-static spatial dims"


def test_custom_rule_registry():
    assert "Conv" in CHANNEL_RULES and "Concat" in CHANNEL_RULES
    with pytest.raises(ValueError, match="channel rule for 'Relu' is already registered"):
        channel_rule("Relu")(lambda node, env: Effects())


def test_describe():
    cg = analyze("a = Conv <kernel_shape = [1, 1]> (x, w1, b1)\n"
                 "h = Conv <kernel_shape = [1, 1]> (a, w2)\n" + HEAD, X,
                 w1=(4, 3, 1, 1), b1=(4,), w2=(5, 4, 1, 1), wf=(10, 5))
    rows = cg.describe()
    assert rows[0] == {"id": 0, "size": 4, "prunable": True, "frozen": None,
                       "producers": ["a"], "members": 4, "partial_members": 0,
                       "params": 12 + 4 + 20}
    assert rows[-1]["frozen"] == "graph output 'y'" and not rows[-1]["prunable"]
    assert cg.table().splitlines() == [
        "group  channels      params  status / producers",
        "    0         4          36  prunable  [a]",
        "    1         5          70  prunable  [h]",
        "    2        10          50  frozen: graph output 'y'  [y]"]
