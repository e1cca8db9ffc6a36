"""Models with symbolic dims besides the batch (an image's H and W, as Paddle and many
PyTorch exports have): nothing is computed at a made-up size. Random inputs and MAC counts
need ``--input-shape`` (or calibration data, whose shape they take); without it, random data
is refused with the fix and MACs are reported unknown."""

from __future__ import annotations

import json
import os

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from edgeopt import ir
from edgeopt.passes.analyses.costs import bind_batch, layer_costs, unbound_inputs
from edgeopt.tools.cli import main

SHAPE = "['N',3,'H','W']"
UNKNOWN = (f"MACs: unknown: input 'x' {SHAPE} has symbolic dims besides the batch; give "
           "--calib data or --input-shape NAME:DxD.. to count them")


def _conv_model(path):
    """x[N,3,H,W] -> Conv 3->8 (3x3, pad 1) -> Relu -> Conv 8->4 (1x1) -> y."""
    rng = np.random.default_rng(0)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, "H", "W"])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, "H", "W"])
    inits = [helper.make_tensor(name, TensorProto.FLOAT, a.shape, a.ravel())
             for name, a in [("w1", rng.standard_normal((8, 3, 3, 3)).astype(np.float32)),
                             ("b1", rng.standard_normal(8).astype(np.float32)),
                             ("w2", rng.standard_normal((4, 8, 1, 1)).astype(np.float32))]]
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["h"], name="c1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("Conv", ["r", "w2"], ["y"], name="c2")]
    graph = helper.make_graph(nodes, "g", [x], [y], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return str(path)


def _macs(h, w, mid=8):
    return 3 * 9 * mid * h * w + mid * 4 * h * w


def _run(capsys, args):
    code = main(args)
    out, err = capsys.readouterr()
    return code, out, err


def _error(capsys, args):
    code, _, err = _run(capsys, args)
    assert code == 2 and "Traceback" not in err
    return err.strip().splitlines()[-1]


def test_costs_bind_only_the_batch_unless_told(tmp_path):
    model = ir.load(_conv_model(tmp_path / "m.onnx"))
    assert [v.name for v in unbound_inputs(model)] == ["x"]
    assert [c.macs for c in layer_costs(bind_batch(model, 1))] == [None, None]
    shapes = {"x": (1, 3, 10, 6)}
    assert unbound_inputs(model, shapes) == []
    assert [c.macs for c in layer_costs(bind_batch(model, 1, shapes))] == \
        [3 * 9 * 8 * 60, 8 * 4 * 60]
    assert model.graph.inputs[0].shape == ("N", 3, "H", "W")  # the model itself is untouched


def test_random_data_refuses_to_guess_the_image_size(tmp_path, capsys):
    src = _conv_model(tmp_path / "m.onnx")
    before = sorted(os.listdir(tmp_path))
    line = _error(capsys, [src, "-p", "prune:0.5", "--calib", "random", "-q"])
    assert line == (f"edgeopt: error: random: input 'x' {SHAPE} has symbolic dims besides the "
                    "batch, and random samples need their sizes: give the shape to run at, e.g. "
                    "--input-shape x:1x3xD2xD3 (D2, D3: the sizes of your real inputs)")
    # --measure's random input and compare's too
    assert "--input-shape x:1x3xD2xD3" in _error(capsys, [src, "-p", "dce", "--measure", "-q"])
    assert "--input-shape x:1x3xD2xD3" in _error(capsys, ["compare", src, src, "-q"])
    assert sorted(os.listdir(tmp_path)) == before  # nothing written


def test_macs_are_unknown_rather_than_counted_at_1x1(tmp_path, capsys):
    src = _conv_model(tmp_path / "m.onnx")
    code, out, err = _run(capsys, [src, "-p", "prune:0.5", "-o", str(tmp_path / "o.onnx")])
    assert code == 0, err
    assert UNKNOWN in out.splitlines()
    code, out, _ = _run(capsys, [src, "-p", "prune:0.5", "-o", str(tmp_path / "o.onnx"),
                                 "--json"])
    data = json.loads(out)
    assert data["macs"] == {"before": None, "after": None}
    assert "macs_before" not in data["steps"][0]["stats"]
    code, out, _ = _run(capsys, ["info", src])
    assert (f"MACs: unknown: input 'x' {SHAPE} has symbolic dims besides the batch; give "
            "--input-shape NAME:DxD..") in out.splitlines()


def test_input_shape_sets_random_data_and_macs_and_keeps_the_onnx_dims(tmp_path, capsys):
    src = _conv_model(tmp_path / "m.onnx")
    out_path = tmp_path / "o.onnx"
    code, out, err = _run(capsys, [src, "-p", "prune:0.5", "--calib", "random",
                                   "--input-shape", "x:1x3x16x12", "-o", str(out_path),
                                   "--json", "-q"])
    assert code == 0, err
    data = json.loads(out)
    assert data["macs"] == {"before": _macs(16, 12), "after": _macs(16, 12, mid=4)}
    stats = data["steps"][0]["stats"]
    assert (stats["macs_before"], stats["macs_after"]) == (_macs(16, 12), _macs(16, 12, mid=4))
    dims = onnx.load(out_path).graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param or d.dim_value for d in dims] == ["N", 3, "H", "W"]
    code, out, _ = _run(capsys, ["info", src, "--input-shape", "x:1x3x16x12"])
    assert f"MACs: {_macs(16, 12):,} (batch 1, x 1x3x16x12)" in out.splitlines()
    code, out, _ = _run(capsys, ["compare", src, src, "--input-shape", "x:1x3x8x8", "--json",
                                 "--runs", "2", "-q"])
    assert code == 0 and json.loads(out)["outputs"][0]["max_abs_error"] == 0.0


def test_calibration_data_gives_the_shape(tmp_path, capsys):
    src = _conv_model(tmp_path / "m.onnx")
    np.savez(tmp_path / "c.npz", x=np.random.default_rng(1).standard_normal(
        (6, 3, 9, 7)).astype(np.float32))
    code, out, err = _run(capsys, [src, "-p", "prune:0.5,target=macs", "--calib",
                                   str(tmp_path / "c.npz"), "-o", str(tmp_path / "o.onnx")])
    assert code == 0, err
    assert f"MACs (batch 1): {_macs(9, 7):,} -> {_macs(9, 7, mid=4):,} (-50.0%)" in out


@pytest.mark.parametrize("args, expected", [
    (["-p", "prune:0.5,target=macs"],
     "pass 'prune' failed (first pass): "
     f"target=macs: MACs depend on the sizes of input 'x' {SHAPE}, which has symbolic dims "
     "besides the batch; give calibration data (--calib) or --input-shape NAME:DxD.."),
    (["-p", "dce", "--input-shape", "y:1x3"], "--input-shape: {src} has no input 'y' (inputs: "
                                              "'x')"),
    (["-p", "dce", "--input-shape", "x:1x4x8x8"],
     f"input shape x:1x4x8x8 does not fit the input's {SHAPE}"),
    (["-p", "dce", "--input-shape", "x=1x3"], "--input-shape 'x=1x3': expected NAME:DxDx..., "
                                              "e.g. x:1x3x48x192"),
])
def test_input_shape_mistakes_give_one_line(tmp_path, capsys, args, expected):
    src = _conv_model(tmp_path / "m.onnx")
    before = sorted(os.listdir(tmp_path))
    assert _error(capsys, [src, *args, "-q"]) == "edgeopt: error: " + expected.format(src=src)
    assert sorted(os.listdir(tmp_path)) == before
