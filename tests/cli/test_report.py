"""The optimize command's layer table and `--measure` latency."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re

import numpy as np
import onnx
import pytest
from conftest import build_model
from onnx import TensorProto, helper, numpy_helper

from edgeopt.passes import PassResult, register_pass, unregister_pass
from edgeopt.tools import _layer_diff as layer_diff
from edgeopt.tools.cli import main

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(__file__))), "examples",
                        "digits")
CNN = os.path.join(EXAMPLES, "cnn.onnx")
CONV3 = "/features/features.3/Conv"


def _params_in_file(path, node_name):
    """Elements of the initializers a node reads, straight from the ONNX file."""
    proto = onnx.load(path)
    inits = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    node = next(n for n in proto.graph.node if n.name == node_name)
    return sum(inits[i].size for i in node.input if i in inits), inits[node.input[1]].shape


@pytest.fixture(scope="module")
def pruned(tmp_path_factory):
    """`edgeopt cnn.onnx -p simplify,prune:0.5 --json --report`: (json, report, output path)."""
    folder = tmp_path_factory.mktemp("pruned")
    out, report = folder / "cnn.onnx", folder / "report.json"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = main([CNN, "-p", "simplify,prune:0.5", "-o", str(out), "--report", str(report),
                     "--json", "-q"])
    assert code == 0
    return json.loads(stdout.getvalue()), json.loads(report.read_text()), str(out)


def test_layer_rows_of_a_real_prune(pruned):
    data, _, out = pruned
    rows = {r["node"]: r for r in data["layers"]}
    assert list(rows) == ["/features/features.0/Conv", CONV3, "/features/features.7/Conv",
                          "/features/features.11/Conv", "/classifier/classifier.1/Gemm",
                          "/classifier/classifier.3/Gemm"]
    row = rows[CONV3]
    assert row["op_type"] == "Conv" and row["status"] == "changed"
    assert row["in_channels"] == {"before": 16, "after": 8}
    assert row["out_channels"] == {"before": 32, "after": 16}
    # Parameters are the elements of the layer's initializers, in the files on either side.
    before, w_before = _params_in_file(CNN, CONV3)
    after, w_after = _params_in_file(out, CONV3)
    assert row["params"] == {"before": before, "after": after} == {"before": 4608, "after": 1168}
    assert w_before == (32, 16, 3, 3) and w_after == (16, 8, 3, 3)
    # MACs at batch 1: every output element (C_out x 16 x 16) reads C_in x 3 x 3 inputs.
    assert row["macs"] == {"before": 32 * 256 * 16 * 9, "after": 16 * 256 * 8 * 9}
    # The Flatten into the first Gemm carries 2 x 2 positions per channel.
    assert rows["/classifier/classifier.1/Gemm"]["in_channels"] == {"before": 256, "after": 128}
    assert rows["/classifier/classifier.3/Gemm"]["out_channels"] == {"before": 10, "after": 10}
    assert data["macs"] == {"before": 3003008, "after": sum(r["macs"]["after"]
                                                          for r in data["layers"])}
    assert "latency" not in data  # only with --measure


def test_report_file_carries_the_layers(pruned):
    data, report, _ = pruned
    assert report["layers"] == data["layers"] and report["macs"] == data["macs"]
    assert report["steps"][-1]["name"] == "prune"


def test_layer_table_text(tmp_path, capsys):
    assert main([CNN, "-p", "simplify,prune:0.5", "-o", str(tmp_path / "o.onnx"), "-q"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("layer "))
    assert lines[header].split() == ["layer", "op", "in", "out", "params", "MACs"]
    row = next(line for line in lines if line.startswith(CONV3 + " "))
    assert row.split() == [CONV3, "Conv", "16->8", "32->16", "4,608->1,168",
                           "1,179,648->294,912"]
    assert "MACs (batch 1): 3,003,008 -> 760,128 (-74.7%)" in out
    assert "latency:" not in out


def test_unchanged_model_prints_no_layer_table(tmp_path, capsys):
    assert main([CNN, "-p", "dce", "-o", str(tmp_path / "o.onnx"), "-q", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["layers"] == []
    assert main([CNN, "-p", "dce", "-o", str(tmp_path / "o.onnx"), "-q"]) == 0
    assert "MACs" not in capsys.readouterr().out


def test_layers_with_computed_weights_count(tmp_path, capsys):
    # The onnx light models compute their weights (ConstantOfShape): those layers count with
    # their shapes and MACs (and no stored parameters), so simplify, which folds the weights
    # into constants, shows them as changed (0 -> N parameters), not as added, and the MACs
    # before are the model's, not 0.
    light = os.path.join(os.path.dirname(onnx.__file__), "backend", "test", "data", "light")
    assert main([os.path.join(light, "light_squeezenet.onnx"), "-p", "simplify", "-o",
                 str(tmp_path / "o.onnx"), "-q"]) == 0
    out = capsys.readouterr().out
    assert "MACs (batch 1): 349,151,936 -> 349,151,936 (+0.0%)" in out
    assert "(added)" not in out
    assert re.search(r"^n62\s+Conv\s+512->512\s+1000->1000\s+0->513,000\s+"
                     r"86,528,000->86,528,000$", out, re.M)


# -- the diff itself --------------------------------------------------------------------------
def _layer(name, cin, cout, params, macs=0, op="Conv"):
    return layer_diff.Layer(name, op, cin, cout, params, macs)


def test_diff_reports_changed_removed_and_added_layers():
    before = [_layer("a", 3, 16, 432), _layer("b", 16, 16, 2304), _layer("c", 16, 8, 128),
              _layer("dup", 8, 8, 64), _layer("dup", 8, 8, 64)]
    after = [_layer("a", 3, 8, 216), _layer("b", 16, 16, 2304), _layer("dup", 8, 8, 64),
             _layer("dup", 8, 4, 32), _layer("new", 4, 2, 8, op="Gemm")]
    changes = layer_diff.diff(before, after)
    assert [(c.node, c.status) for c in changes] == [
        ("a", "changed"), ("c", "removed"), ("dup", "changed"), ("new", "added")]
    assert changes[2].before.out_channels == 8 and changes[2].after.out_channels == 4
    assert changes[1].to_dict() == {
        "node": "c", "op_type": "Conv", "status": "removed",
        "in_channels": {"before": 16, "after": None}, "out_channels": {"before": 8, "after": None},
        "params": {"before": 128, "after": None}, "macs": {"before": 0, "after": None}}
    table = layer_diff.format_changes(changes)
    assert re.search(r"^c \(removed\)\s+Conv\s+16->-\s+8->-\s+128->-\s+0->-$", table, re.M)
    assert re.search(r"^new \(added\)\s+Gemm\s+-->4\s+-->2\s+-->8\s+-->0$", table, re.M)


def test_long_tables_show_the_biggest_changes_in_model_order():
    before = [_layer(f"l{i}", 8, 8, 100, macs=1000 * i) for i in range(50)]
    after = [_layer(f"l{i}", 8, 4, 50, macs=500 * i) for i in range(50)]
    changes = layer_diff.diff(before, after)
    table = layer_diff.format_changes(changes, limit=3).splitlines()
    assert [line.split()[0] for line in table[2:5]] == ["l47", "l48", "l49"]
    assert table[5] == "... and 47 more changed layers (smaller changes; --layers lists all)"
    assert len(layer_diff.format_changes(changes, limit=None).splitlines()) == 2 + 50


CHANNELS = """<ir_version: 9, opset_import: ["" : 17]>
g (float[N,6,5,5] x, float[N,4] v, float[6,2,4,4] wt, float[3,4] wg, float[4,2] wm)
  => (float[N,4,8,8] y, float[N,3] z, float[N,2] u) {
  y = ConvTranspose <group = 2> (x, wt)
  z = Gemm <transB = 1> (v, wg)
  u = MatMul(v, wm)
}"""


def test_channel_counts_of_each_layer_kind():
    model = build_model(CHANNELS, {"wt": np.zeros((6, 2, 4, 4), np.float32),
                                   "wg": np.zeros((3, 4), np.float32),
                                   "wm": np.zeros((4, 2), np.float32)})
    layers = {x.op_type: x for x in layer_diff.snapshot(model)}
    assert (layers["ConvTranspose"].in_channels, layers["ConvTranspose"].out_channels) == (6, 4)
    assert layers["ConvTranspose"].macs == 6 * 25 * 2 * 16  # each input element scatters
    assert (layers["Gemm"].in_channels, layers["Gemm"].out_channels) == (4, 3)
    assert (layers["MatMul"].in_channels, layers["MatMul"].out_channels) == (4, 2)
    assert layers["MatMul"].params == 8 and layers["MatMul"].macs == 8
    assert model.graph.inputs[0].shape == ("N", 6, 5, 5)  # the snapshot bound a clone


# -- --measure --------------------------------------------------------------------------------
LATENCY = re.compile(r"^latency: (\d+\.\d{3}) ms -> (\d+\.\d{3}) ms \((\d+\.\d\d)x\)  "
                     r"\[ORT CPU, 2 threads, batch 1, median of 3 runs, (.*) input\]$", re.M)


def test_measure_prints_and_reports_latency(tmp_path, capsys):
    out, report = tmp_path / "o.onnx", tmp_path / "r.json"
    assert main([CNN, "-p", "simplify,prune:0.5", "-o", str(out), "--measure", "--runs", "3",
                 "--report", str(report), "-q"]) == 0
    text = capsys.readouterr().out
    match = LATENCY.search(text)
    assert match and match.group(4) == "random (seed 0)", text
    latency = json.loads(report.read_text())["latency"]
    assert f"{latency['before_ms']:.3f}" == match.group(1)
    assert f"{latency['after_ms']:.3f}" == match.group(2)
    assert latency["speedup"] == pytest.approx(latency["before_ms"] / latency["after_ms"])
    assert {k: latency[k] for k in ("runs", "warmup", "threads", "batch")} == {
        "runs": 3, "warmup": 3, "threads": 2, "batch": 1}
    assert os.path.isfile(out)


def test_measure_json_with_calibration_input(tmp_path, capsys):
    assert main([CNN, "-p", "simplify", "-o", str(tmp_path / "o.onnx"), "--measure", "--runs",
                 "2", "--calib", os.path.join(EXAMPLES, "calib.npz"), "--json", "-q"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["latency"]["inputs"] == "first calibration sample"
    assert data["latency"]["before_ms"] > 0 and data["latency"]["after_ms"] > 0
    assert data["layers"][0]["node"] == "/features/features.0/Conv"


def _model_ort_cannot_load(path):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])
    graph = helper.make_graph([helper.make_node("Foo", ["x"], ["y"], name="foo",
                                                domain="com.acme")], "g", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("com.acme", 1)])
    onnx.save(model, path)


def _one_error(capsys, code):
    _, err = capsys.readouterr()
    assert code == 2 and "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("edgeopt: error: "), err
    return lines[0]


def test_measure_an_input_ort_cannot_load(tmp_path, capsys):
    src = tmp_path / "acme.onnx"
    _model_ort_cannot_load(src)
    code = main([str(src), "-p", "dce", "--measure", "--report", str(tmp_path / "r.json"),
                 "-q"])
    line = _one_error(capsys, code)
    assert line.startswith(f"edgeopt: error: {src}: ONNX Runtime cannot load it: ")
    assert "com.acme:Foo" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["acme.onnx"]  # nothing written


@pytest.fixture
def acme_pass():
    """A pass that turns every Relu into an operator ONNX Runtime does not know."""
    @register_pass("test.acme-relu")
    def acme_relu(model, ctx):
        """Replace Relu by com.acme::Relu."""
        model.opset_imports["com.acme"] = 1
        for node in model.walk():
            if node.op_type == "Relu":
                node.domain = "com.acme"
        return PassResult(modified=True)

    yield "test.acme-relu"
    unregister_pass("test.acme-relu")


def test_measure_an_output_ort_cannot_load(tmp_path, capsys, acme_pass):
    out = tmp_path / "o.onnx"
    code = main([CNN, "-p", acme_pass, "-o", str(out), "--measure", "--runs", "1", "--report",
                 str(tmp_path / "r.json"), "-q"])
    line = _one_error(capsys, code)
    assert line.startswith(f"edgeopt: error: {out} (optimized model; not written): ONNX "
                           "Runtime cannot load it: ")
    assert list(tmp_path.iterdir()) == []
    # Without --measure the same pipeline writes the model: only the measurement refuses it.
    assert main([CNN, "-p", acme_pass, "-o", str(out), "-q"]) == 0
    assert os.path.isfile(out)


def test_runs_must_be_positive(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main([CNN, "--measure", "--runs", "0", "-o", str(tmp_path / "o.onnx")])
    assert e.value.code == 2
    assert "argument --runs: must be at least 1, not 0" in capsys.readouterr().err


def test_compare_times_a_static_batch_model(tmp_path, capsys):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    model = helper.make_model(helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                                                [x], [y]),
                              opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, tmp_path / "a.onnx")
    assert main(["compare", str(tmp_path / "a.onnx"), str(tmp_path / "a.onnx"), "--runs", "2",
                 "--json", "-q"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["outputs"][0]["max_abs_error"] == 0.0 and data["latency_ms"]["a"] > 0


def test_recovered_layers_show_their_output_error(tmp_path, capsys):
    calib = os.path.join(EXAMPLES, "calib.npz")
    out = tmp_path / "o.onnx"
    assert main([CNN, "-p", "prune:0.5", "--calib", calib, "-o", str(out), "-q", "--json"]) == 0
    rows = {r["node"]: r for r in json.loads(capsys.readouterr().out)["layers"]}
    # The first Conv reads the image (nothing pruned upstream): no recovery.
    assert "recovery_error" not in rows["/features/features.0/Conv"]
    err = rows[CONV3]["recovery_error"]
    assert 0 <= err["recovered"] < err["dropped"] <= 1.5
    assert main([CNN, "-p", "prune:0.5", "--calib", calib, "-o", str(out), "-q"]) == 0
    text = capsys.readouterr().out
    assert "output error (dropped->recovered)" in text
    row = next(line for line in text.splitlines() if line.startswith(CONV3 + " "))
    assert row.split()[-1] == f"{err['dropped']:.3f}->{err['recovered']:.3f}"
