"""prune: options, channel selection, rewrites, and exactness with planted zero channels."""

from __future__ import annotations

import os
import sys

import numpy as np
import onnx
import pytest
from conftest import ONNX_TEST_DATA, build_model, run_ort
from models import BUILDERS, plan_removal, plant_zeros, randomize_weights

import edgeopt.passes.prune  # noqa: F401  (registers the pass)
from edgeopt import ir
from edgeopt.passes import Context, OptionError, PassError, PassManager, parse_pipeline, resolve
from edgeopt.passes.analyses.channel_groups import ChannelGroup, ChannelGroups
from edgeopt.passes.prune import PruneOptions, keep_count, plan


def run(model: ir.Model, spec: str = "prune:0.5", ctx: Context | None = None):
    return PassManager(spec, verify="each").run(model, ctx).steps[0]


def feeds_for(proto: onnx.ModelProto, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    inits = {t.name for t in proto.graph.initializer}
    return {i.name: rng.standard_normal([d.dim_value or 1 for d in i.type.tensor_type.shape.dim]
                                        ).astype(np.float32)
            for i in proto.graph.input if i.name not in inits}


def assert_same(got: list[np.ndarray], want: list[np.ndarray], tol: float = 1e-5) -> None:
    """Equal within ``tol``, times the largest |element| of each expected output if above 1."""
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape
        np.testing.assert_allclose(g, w, rtol=0, atol=tol * max(1.0, float(np.abs(w).max())))


def passes_strict_check(proto: onnx.ModelProto) -> bool:
    """Whether onnx's checker with strict shape inference accepts the model."""
    try:
        onnx.checker.check_model(proto, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError):
        return False
    return True


def check_exact(model: ir.Model, ratio: float = 0.5, spec: str | None = None,
                tol: float = 1e-5, chosen: dict[str, list[int]] | None = None) -> dict:
    """Plant zeros in the channels prune:<ratio> will remove, prune, compare ORT outputs.

    ``chosen`` fixes the planted channels of the groups of the named producers (the others
    are drawn at random).
    """
    groups = ChannelGroups(model)
    removal = plan_removal(groups, ratio)
    for producer, channels in (chosen or {}).items():
        (group,) = [g for g in groups.groups if producer in g.producers]
        assert len(removal[group.id]) == len(channels)
        removal[group.id] = np.array(channels)
    assert removal, "nothing to prune"
    plant_zeros(groups, removal)
    proto = ir.to_proto(model)
    feeds = feeds_for(proto)
    expected = run_ort(proto, feeds)
    strict = passes_strict_check(proto)
    step = run(model, spec or f"prune:{ratio}")
    assert step.modified
    assert step.stats["channels_removed"] == sum(len(r) for r in removal.values())
    assert step.stats["groups_pruned"] == len(removal)
    pruned = ir.to_proto(model)
    if strict:  # strict shape inference agrees with every shape prune wrote
        onnx.checker.check_model(pruned, full_check=True)
    assert_same(run_ort(pruned, feeds), expected, tol)
    return step.stats


# -- options and selection --------------------------------------------------------------------
def test_options_from_spec():
    (step,) = resolve(parse_pipeline(
        "prune:0.6,importance=l2,scope=global,round_to=8,min_channels=4,exclude=conv1|fc*,"
        "target=macs"))
    _, opts = step
    assert opts == PruneOptions(0.6, "l2", "global", None, 4, 8, ("conv1", "fc*"), "macs")
    (step,) = resolve(parse_pipeline("prune:0.5,overrides=conv1*:0.25|x:0:0"))
    assert step[1].override_ratios() == [("conv1*", 0.25), ("x:0", 0.0)]


@pytest.mark.parametrize(("spec", "message"), [
    ("prune:1", "ratio must be in \\[0, 1\\), got 1.0"),
    ("prune:0.5,min_channels=0", "min_channels must be >= 1"),
    ("prune:0.5,round_to=0", "round_to must be >= 1"),
    ("prune:0.5,thresh=0.1,target=params", "thresh removes channels by score; it cannot be "
                                           "combined with target=params"),
    ("prune:0.5,scope=all", "'all' is not one of local, global"),
    ("prune:0.5,overrides=conv1", "override 'conv1' must be pattern:ratio with a ratio in"),
    ("prune:0.5,overrides=conv1:1.5", "override 'conv1:1.5' must be pattern:ratio"),
])
def test_bad_options(spec, message):
    with pytest.raises(OptionError, match=message):
        resolve(parse_pipeline(spec))


@pytest.mark.parametrize(("size", "removed", "min_channels", "round_to", "keep"), [
    (64, 32, 1, None, 32), (64, 38, 1, None, 32), (64, 30, 1, None, 40), (24, 12, 1, None, 16),
    (12, 6, 1, None, 8), (10, 5, 1, None, 8), (6, 3, 1, None, 3), (6, 5, 4, None, 4),
    (64, 63, 1, 1, 1), (16, 0, 1, None, 16), (20, 10, 1, 8, 16), (5, 3, 1, 8, 5),
])
def test_keep_count(size, removed, min_channels, round_to, keep):
    assert keep_count(size, removed, min_channels, round_to) == keep


def fake(gid: int, size: int) -> ChannelGroup:
    return ChannelGroup(gid, size, [], None)


def test_plan_local_global_thresh():
    groups = [fake(0, 4), fake(1, 4)]
    scores = {0: np.array([0.5, 2.0, 0.1, 1.4]), 1: np.array([1.0, 1.0, 1.0, 1.0])}
    local = plan(groups, scores, PruneOptions(0.5, round_to=1))
    assert {k: v.tolist() for k, v in local.items()} == {0: [0, 2], 1: [2, 3]}
    glob = plan(groups, scores, PruneOptions(0.5, scope="global", round_to=1))
    # The 4 lowest of all 8: 0.1, 0.5 in group 0, then ties at 1.0 (later channels first).
    assert {k: v.tolist() for k, v in glob.items()} == {0: [0, 2], 1: [2, 3]}
    glob = plan(groups, scores, PruneOptions(0.25, scope="global", round_to=1))
    assert {k: v.tolist() for k, v in glob.items()} == {0: [0, 2]}
    low = plan(groups, scores, PruneOptions(0.0, thresh=1.2, round_to=1))
    assert {k: v.tolist() for k, v in low.items()} == {0: [0, 2], 1: [0, 1, 2, 3][1:]}


# -- the pass on the test architectures --------------------------------------------------------
def test_prune_zero_is_a_noop():
    model = ir.from_proto(BUILDERS["resnet"]())
    version = model.version
    step = run(model, "prune:0")
    assert not step.modified and model.version == version
    assert step.stats["channels_removed"] == 0 and step.stats["theta"] == 0.0
    assert step.stats["params_after"] == step.stats["params_before"] == 38970


def test_cnn_structure_and_stats():
    model = ir.from_proto(BUILDERS["cnn"]())
    step = run(model)
    shapes = {v.name: tuple(v.const_value.shape) for v in model.graph.initializers.values()
              if v.name.endswith(".w")}
    assert shapes == {"conv1.w": (8, 3, 3, 3), "conv4.w": (8, 8, 3, 3),
                      "conv8.w": (16, 8, 3, 3), "fc11.w": (16, 256), "fc13.w": (10, 16)}
    assert [n.inputs[0].shape for n in model.graph if n.op_type == "Gemm"] == \
        [(1, 256), (1, 16)]
    assert step.stats == {"groups": 5, "groups_prunable": 4, "groups_pruned": 4,
                          "channels": 88, "channels_removed": 40, "params_before": 18994,
                          "params_after": 6306, "macs_before": 243008, "macs_after": 73376,
                          "theta": pytest.approx((18994 - 6306) / 18994)}


@pytest.mark.parametrize("name", ["cnn", "resnet", "mobilenetv2", "se", "concat", "mlp"])
@pytest.mark.parametrize("ratio", [0.5, 0.7])
def test_exact_with_planted_zeros(name, ratio):
    model = ir.from_proto(BUILDERS[name]())
    stats = check_exact(model, ratio)
    assert stats["params_after"] < stats["params_before"]
    assert stats["macs_after"] < stats["macs_before"]


@pytest.mark.parametrize("name", ["resnet", "mobilenetv2"])
def test_thresh_removes_exactly_the_zero_channels(name):
    # Planted channels score 0; every other normalized score is far above 0.05.
    check_exact(ir.from_proto(BUILDERS[name]()), 0.5, "prune:0,thresh=0.05")


def test_depthwise_group_shrinks_with_channels():
    model = ir.from_proto(BUILDERS["mobilenetv2"]())
    check_exact(model, 0.5)
    depthwise = [n for n in model.graph if n.op_type == "Conv" and n.attr("group", 1) > 1]
    assert [(n.attr("group"), n.inputs[1].const_value.shape[0]) for n in depthwise] == \
        [(32, 32), (32, 32), (48, 48)]


def test_shuffle_is_frozen_and_left_alone(caplog):
    model = ir.from_proto(BUILDERS["shuffle"]())
    groups = ChannelGroups(model)
    assert [g.frozen for g in groups.groups] == [
        "Reshape 'reshape7': Reshape splits the channel axis (channel shuffle)",
        "graph output 'y'"]
    version = model.version
    with caplog.at_level("WARNING", logger="edgeopt.passes.prune"):
        step = run(model)
    assert not step.modified and model.version == version
    assert caplog.messages == [
        "prune: no prunable channel group: all 2 are frozen (first: Reshape 'reshape7': "
        "Reshape splits the channel axis (channel shuffle)); see edgeopt info --groups"]


def test_no_group_says_why(caplog):
    from edgeopt.passes._util import computed_weights

    # The onnx light models compute their weights (ConstantOfShape): no group sees them
    # until simplify folds them; an exclude= that matches everything is named too.
    raw = ir.load(os.path.join(ONNX_TEST_DATA, "light", "light_resnet50.onnx"))
    with caplog.at_level("WARNING", logger="edgeopt.passes.prune"):
        assert not run(raw).modified
        assert not run(ir.from_proto(BUILDERS["cnn"]()), "prune:0.5,exclude=*").modified
    assert caplog.messages == [
        "prune: no prunable channel group: 54 Conv/Gemm/MatMul layer(s) compute their weights "
        "instead of holding them (e.g. 'n0', from ConstantOfShape); fold them into constants "
        "first: -p simplify,prune:...",
        "prune: no prunable channel group: exclude= matches every one"]
    PassManager("simplify", verify="none").run(raw)
    assert computed_weights(raw.graph) == []
    assert len(ChannelGroups(raw).prunable()) > 20


SPLIT_MODEL = """<ir_version: 8, opset_import: ["" : 17]>
g (float[1,3,6,6] x, float[8,3,1,1] w1, int64[2] sizes, int64[1] st, int64[1] en,
   int64[1] ax, float[4,4,3,3] w2, float[4,4,1,1] w3, float[8,4,1,1] w4, int64[4] rs,
   int64[3] shape, float[8,10] wm) => (float[1,9,10] y) {
  a = Conv <kernel_shape = [1, 1]> (x, w1)
  s1, s2 = Split <axis = 1> (a, sizes)
  t = Slice (a, st, en, ax)
  u = Conv <kernel_shape = [3, 3], pads = [1, 1, 1, 1]> (s1, w2)
  v = Conv <kernel_shape = [1, 1]> (s2, w3)
  c = Concat <axis = 1> (u, v, t)
  h = Conv <kernel_shape = [1, 1]> (c, w4)
  r = Resize <mode = "nearest"> (h, , , rs)
  p = MaxPool <kernel_shape = [4, 4], strides = [4, 4]> (r)
  q = Reshape (p, shape)
  k = Transpose <perm = [0, 2, 1]> (q)
  y = MatMul (k, wm)
}"""


def split_model() -> ir.Model:
    rng = np.random.default_rng(0)
    weights = {"w1": (8, 3, 1, 1), "w2": (4, 4, 3, 3), "w3": (4, 4, 1, 1), "w4": (8, 4, 1, 1),
               "wm": (8, 10)}
    arrays = {k: rng.standard_normal(s).astype(np.float32) for k, s in weights.items()}
    arrays.update(sizes=np.array([4, 4], np.int64), st=np.array([2], np.int64),
                  en=np.array([6], np.int64), ax=np.array([1], np.int64),
                  rs=np.array([1, 8, 12, 12], np.int64), shape=np.array([1, 8, 9], np.int64))
    model = build_model(SPLIT_MODEL.replace("float[8,4,1,1] w4", "float[8,12,1,1] w4"),
                        {**arrays, "w4": rng.standard_normal((8, 12, 1, 1)).astype(np.float32)})
    ir.infer_shapes(model)
    return model


def test_split_slice_concat_resize_reshape_fixups():
    model = split_model()
    # Channels 1, 2, 4, 7 of `a` stay: 2 in each Split output, 1 before the Slice range [2, 6)
    # and 2 inside it.
    check_exact(model, 0.5, "prune:0.5,round_to=2", chosen={"a": [0, 3, 5, 6]})
    consts = {n.op_type: n for n in model.graph}
    assert consts["Split"].inputs[1].const_value.numpy().tolist() == [2, 2]
    slice_node = consts["Slice"]
    assert (slice_node.inputs[1].const_value.numpy().tolist(),
            slice_node.inputs[2].const_value.numpy().tolist()) == ([1], [3])
    assert consts["Resize"].inputs[3].const_value.numpy().tolist() == [1, 4, 12, 12]
    assert consts["Reshape"].inputs[1].const_value.numpy().tolist() == [1, 4, 9]
    assert consts["MatMul"].inputs[1].const_value.shape == (4, 10)


def test_split_output_never_empties():
    # Channels 0-3 of `a` are zero and the only ones pruned (the other groups are excluded):
    # all of the first Split output would go, so its best channel (0, by order) stays.
    model = split_model()
    groups = ChannelGroups(model)
    (a,) = [g for g in groups.groups if "a" in g.producers]
    plant_zeros(groups, {a.id: np.arange(4)})
    proto = ir.to_proto(model)
    feeds = feeds_for(proto)
    expected = run_ort(proto, feeds)
    step = run(model, "prune:0.5,exclude=u|v|h|y")
    assert step.stats["channels_removed"] == 3
    nodes = {n.op_type: n for n in model.graph}
    assert nodes["Split"].inputs[1].const_value.numpy().tolist() == [1, 4]
    assert nodes["Slice"].inputs[1].const_value.numpy().tolist() == [1]
    assert nodes["Slice"].inputs[2].const_value.numpy().tolist() == [3]
    assert_same(run_ort(ir.to_proto(model), feeds), expected)


def test_exclude_patterns():
    model = ir.from_proto(BUILDERS["cnn"]())
    step = run(model, "prune:0.5,exclude=conv1|fc1*")
    assert step.stats["groups_prunable"] == 2 and step.stats["groups_pruned"] == 2
    shapes = {v.name: v.const_value.shape[0] for v in model.graph.initializers.values()
              if v.name in ("conv1.w", "fc11.w", "conv4.w")}
    assert shapes == {"conv1.w": 16, "fc11.w": 32, "conv4.w": 8}


def test_per_layer_overrides():
    model = ir.from_proto(BUILDERS["cnn"]())
    step = run(model, "prune:0.5,overrides=conv1*:0|fc*:0.75,round_to=1")
    channels = {v.name: v.const_value.shape[0] for v in model.graph.initializers.values()
                if v.name in ("conv1.w", "conv4.w", "conv8.w", "fc11.w")}
    assert channels == {"conv1.w": 16, "conv4.w": 8, "conv8.w": 12, "fc11.w": 8}
    assert step.stats["channels_removed"] == 8 + 12 + 24


@pytest.mark.parametrize("target", ["params", "macs"])
def test_target_params_and_macs(target):
    model = ir.from_proto(BUILDERS["resnet"]())
    step = run(model, f"prune:0.5,target={target},round_to=1")
    s = step.stats
    got = 1 - (s["params_after"] / s["params_before"] if target == "params"
               else s["macs_after"] / s["macs_before"])
    assert 0.5 <= got < 0.6
    # Both costs shrink about quadratically with channels: far fewer than half go.
    assert s["channels_removed"] < 0.4 * s["channels"]


def test_subgraph_capture_freezes_only_its_group():
    text = """<ir_version: 8, opset_import: ["" : 17]>
    g (float[1,3,6,6] x, bool c, float[8,3,1,1] w1, float[8,8,1,1] w2, float[4,8,1,1] w3)
      => (float[1,4,6,6] y, float[1,8,6,6] z) {
      a = Conv <kernel_shape = [1, 1]> (x, w1)
      b = Conv <kernel_shape = [1, 1]> (a, w2)
      r = Relu (b)
      y = Conv <kernel_shape = [1, 1]> (r, w3)
      z = If (c) <then_branch = t () => (float[1,8,6,6] o) { o = Relu(a) },
                  else_branch = e () => (float[1,8,6,6] o2) { o2 = Sigmoid(a) }>
    }"""
    rng = np.random.default_rng(0)
    model = build_model(text, {k: rng.standard_normal(s).astype(np.float32) for k, s in
                               {"w1": (8, 3, 1, 1), "w2": (8, 8, 1, 1),
                                "w3": (4, 8, 1, 1)}.items()})
    groups = ChannelGroups(model)
    assert [g.frozen for g in groups.groups] == ["'a' is read inside a subgraph of If 'z'",
                                                 None, "graph output 'y'"]
    removal = plan_removal(groups, 0.5)
    plant_zeros(groups, removal)
    feeds = {"x": rng.standard_normal((1, 3, 6, 6)).astype(np.float32),
             "c": np.array(True)}
    expected = run_ort(ir.to_proto(model), feeds)
    step = run(model)
    assert step.stats["channels_removed"] == 4
    assert model.graph.initializers["w1"].const_value.shape == (8, 3, 1, 1)
    assert_same(run_ort(ir.to_proto(model), feeds), expected)


def test_l1_fallback_without_importance_module(monkeypatch):
    # Without the importance analysis, prune ranks channels by its own L1 of the filters.
    monkeypatch.setitem(sys.modules, "edgeopt.passes.analyses.importance", None)
    check_exact(ir.from_proto(BUILDERS["resnet"]()), 0.5)
    with pytest.raises(PassError, match=r"pass 'prune' failed \(first pass\): importance=l2 "
                                        r"needs the importance analysis"):
        run(ir.from_proto(BUILDERS["resnet"]()), "prune:0.5,importance=l2")


@pytest.mark.parametrize("criterion", ["l2", "fpgm", "bn", "random"])
def test_other_criteria_produce_valid_models(criterion):
    proto = BUILDERS["resnet"]()
    model = ir.from_proto(proto)
    step = run(model, f"prune:0.5,importance={criterion}")
    assert step.stats["channels_removed"] == 64
    out = run_ort(ir.to_proto(model), feeds_for(proto))
    assert out[0].shape == (1, 10) and np.isfinite(out[0]).all()


def test_global_scope_on_planted_zeros():
    # Half of the first hidden layer is zero: a global ranking removes exactly those 16
    # (0.3 of all 56 channels) and leaves the second layer alone.
    proto = BUILDERS["mlp"]()
    model = ir.from_proto(proto)
    groups = ChannelGroups(model)
    first, second = groups.prunable()
    assert (first.size, second.size) == (32, 24)
    plant_zeros(groups, {first.id: np.arange(0, 32, 2)})
    feeds = feeds_for(proto)
    expected = run_ort(ir.to_proto(model), feeds)
    step = run(model, "prune:0.3,scope=global,round_to=1")
    assert step.stats["channels_removed"] == 16 and step.stats["groups_pruned"] == 1
    assert model.graph.initializers["mm2.w"].const_value.shape == (64, 16)
    assert model.graph.initializers["mm6.w"].const_value.shape == (16, 24)
    assert_same(run_ort(ir.to_proto(model), feeds), expected)


# -- real models ----------------------------------------------------------------------------------
DIGITS = os.path.join(os.path.dirname(__file__), "..", "..", "examples", "digits")


@pytest.mark.parametrize("name", ["cnn", "resnet", "mobilenetv2", "mlp"])
def test_digits_models_exact(name):
    """The example models (PyTorch exports, BatchNormalization kept) prune exactly too."""
    model = ir.load(os.path.join(DIGITS, f"{name}.onnx"))
    stats = check_exact(model, 0.5)
    assert stats["groups_pruned"] == {"cnn": 5, "resnet": 5, "mobilenetv2": 9, "mlp": 2}[name]


def expose_logits(model: ir.Model) -> None:
    """Add the input of a final Softmax/Sigmoid as a graph output.

    A Softmax over 1000 classes (or a Sigmoid saturated near 0) flattens differences by
    orders of magnitude, so the comparison must see what comes before it.
    """
    graph = model.graph
    for node in graph:
        if node.op_type in ("Softmax", "Sigmoid") and any(o.is_graph_output()
                                                          for o in node.outputs):
            logits = node.inputs[0]
            logits.dtype = logits.dtype or node.outputs[0].dtype
            graph.outputs.append(logits)


# -- the onnx package's light models ----------------------------------------------------------
def light_model(name: str) -> ir.Model:
    model = ir.load(os.path.join(ONNX_TEST_DATA, "light", f"light_{name}.onnx"))
    PassManager("simplify", verify="none").run(model)
    model.upgrade_ir_version(8)  # IR 3 lists its initializers as inputs: unlisted
    randomize_weights(model, seed=0)
    PassManager("dce", verify="none").run(model)
    expose_logits(model)
    ir.infer_shapes(model)
    return model


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet50", "densenet121", "inception_v1", "inception_v2",
                                  "squeezenet", "vgg19"])
def test_light_models_exact(name):
    model = light_model(name)
    stats = check_exact(model, 0.5)
    assert stats["theta"] > 0.5


@pytest.mark.slow
def test_light_shufflenet_is_frozen():
    model = light_model("shufflenet")
    groups = ChannelGroups(model)
    assert groups.prunable() == []
    reasons = {g.frozen.split(": ", 1)[-1] for g in groups.groups}
    assert "Reshape splits the channel axis (channel shuffle)" in reasons
    assert not run(model).modified


@pytest.mark.slow
@pytest.mark.parametrize(("role", "shape"), [("cls", (1, 3, 48, 192)),
                                             ("det", (1, 3, 160, 160)),
                                             ("rec", (1, 3, 48, 320))])
def test_ppocr_exact(role, shape):
    """PP-OCRv4 det/rec and the mobile cls model (Paddle exports: SE blocks, HardSwish,
    FPN Concat/Resize, ConvTranspose head, SVTR attention in rec)."""
    from edgeopt.tools.fetch_models import FetchError, fetch_ppocr

    try:
        path = os.fspath(fetch_ppocr()[role])
    except FetchError as e:
        pytest.skip(f"PP-OCR models unavailable: {e}")
    model = ir.load(path)
    model.graph.inputs[0].shape = None  # '?' dims: bind the input from scratch
    ir.static_shapes(model, {model.graph.inputs[0].name: shape})
    PassManager("simplify", verify="none").run(model)
    expose_logits(model)
    # rec's 6625-way Softmax after two SVTR attention blocks: removing zero channels
    # reorders float32 sums, which moves its probabilities by up to ~1.1e-5.
    stats = check_exact(model, 0.5, tol=1e-4 if role == "rec" else 1e-5)
    assert stats["macs_after"] < 0.4 * stats["macs_before"]
