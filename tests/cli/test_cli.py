"""The `edgeopt` command: outputs, reports, and one clear line for every user mistake."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from edgeopt.tools.cli import main


def _write_model(path, op="Relu", domain=""):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])
    w = helper.make_tensor("w", TensorProto.FLOAT, [4, 3], np.arange(12, dtype=np.float32))
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
             helper.make_node("Identity", ["h"], ["h2"], name="id"),
             helper.make_node(op, ["h2"], ["y"], name="act", domain=domain)]
    graph = helper.make_graph(nodes, "g", [x], [y], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, path)
    return path


def _one_error_line(capsys, code, expected):
    _, err = capsys.readouterr()
    assert code == 2
    lines = err.strip().splitlines()
    errors = [line for line in lines if line.startswith("edgeopt: error: ")]
    assert len(errors) == 1 and errors[0] == lines[-1], err  # progress lines may precede it
    assert "Traceback" not in err
    assert expected in errors[0], errors[0]
    return errors[0]


def test_optimize_writes_beside_the_input_with_report(tmp_path, capsys):
    src = _write_model(tmp_path / "m.onnx")
    code = main([str(src), "-p", "dce", "--report", str(tmp_path / "r.json"), "-q"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert err == ""  # --quiet
    written = tmp_path / "m.opt.onnx"
    assert f"wrote {written}" in out and "identity_removed=1" in out
    assert [n.op_type for n in onnx.load(written).graph.node] == ["MatMul", "Relu"]
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["steps"][0]["stats"]["identity_removed"] == 1
    assert report["before"]["nodes"] == 3 and report["after"]["nodes"] == 2


def test_output_folder_and_json(tmp_path, capsys):
    src = _write_model(tmp_path / "m.onnx")
    assert main([str(src), "-p", "dce", "-o", str(tmp_path / "out") + "/", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["output"] == str(tmp_path / "out" / "m.opt.onnx")
    assert os.path.isfile(data["output"])


@pytest.mark.parametrize("args, expected", [
    (["{d}/missing.onnx", "-p", "dce"], "missing.onnx: no such file"),
    (["{d}/m.onnx", "-p", "dce,bogus=1"], "pass 'dce' takes no options (got bogus)"),
    (["{d}/m.onnx", "-p", "nosuch"], "unknown pass 'nosuch'; available passes:"),
    (["{d}/m.onnx", "-p", "quant:int8"], "quant:int8 (static) needs calibration data: give "
                                         "--calib FILE, or use quant:int8,mode=dynamic"),
    (["{d}/m.onnx", "-p", "dce", "-o", "{d}/m.onnx"], "output would overwrite the input"),
    (["{d}/junk.onnx", "-p", "dce"], "junk.onnx: not a"),
    (["{d}/bad_op.onnx", "-p", "dce"],
     "bad_op.onnx: the input model is invalid: graph 'g': node 'act' (NoSuchOp): no operator "
     "'NoSuchOp' in opset 17"),
    (["info", "{d}/missing.onnx"], "missing.onnx: no such file"),
    (["{d}/m.onnx", "-p", "dce", "--calib", "{d}/bad.npz"],
     "bad.npz: input 'x' dim 1 is 7, the model expects 4 (input shape ['N',4])"),
    (["{d}/m.onnx", "-p", "dce", "--calib", "{d}/nothere"], "nothere"),
    (["compare", "{d}/m.onnx", "{d}/other_inputs.onnx"], "the models have different inputs"),
])
def test_user_mistakes_give_one_line(tmp_path, capsys, args, expected):
    _write_model(tmp_path / "m.onnx")
    _write_model(tmp_path / "bad_op.onnx", op="NoSuchOp")
    (tmp_path / "junk.onnx").write_bytes(os.urandom(300))
    np.savez(tmp_path / "bad.npz", x=np.zeros((5, 7), np.float32))
    other = onnx.load(tmp_path / "m.onnx")
    other.graph.input[0].name = "z"
    other.graph.node[0].input[0] = "z"
    onnx.save(other, tmp_path / "other_inputs.onnx")
    before = {p: p.read_bytes() for p in tmp_path.iterdir()}
    code = main([a.format(d=tmp_path) for a in args])
    _one_error_line(capsys, code, expected)
    after = {p: p.read_bytes() for p in tmp_path.iterdir()}
    assert after == before  # nothing written, nothing overwritten


def test_debug_shows_the_traceback(tmp_path):
    with pytest.raises(Exception, match="no such file"):
        main([str(tmp_path / "missing.onnx"), "-p", "dce", "--debug"])


def test_info_reports_io_ops_params_and_macs(tmp_path, capsys):
    src = _write_model(tmp_path / "m.onnx")
    assert main(["info", str(src), "--layers"]) == 0
    out = capsys.readouterr().out
    assert "input   x: float['N',4]" in out and "output  y: float['N',3]" in out
    assert "nodes: 3  (MatMul 1, Identity 1, Relu 1)" in out
    assert "parameters: 12" in out
    assert "MACs: 12 (batch 1" in out  # 1x4 @ 4x3
    assert main(["info", str(src), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["macs"] == 12 and info["weight_bytes"] == {"float": 48}
    assert info["layers"][0]["macs"] == 12 and info["layers"][0]["op_type"] == "MatMul"


def test_passes_lists_options_and_docs(capsys):
    assert main(["passes"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("dce\n    Remove unused nodes") or "\ndce\n" in out
    assert main(["passes", "--json"]) == 0
    names = [p["name"] for p in json.loads(capsys.readouterr().out)]
    assert "dce" in names


def test_compare_identical_models(tmp_path, capsys):
    src = _write_model(tmp_path / "m.onnx")
    shutil.copy(src, tmp_path / "copy.onnx")
    assert main(["compare", str(src), str(tmp_path / "copy.onnx"), "--runs", "3", "--json",
                 "-q"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["outputs"][0]["max_abs_error"] == 0.0
    assert data["outputs"][0]["cosine"] == pytest.approx(1.0)
    assert data["latency_ms"]["a"] > 0


def test_console_script_and_help():
    exe = shutil.which("edgeopt")
    cmd = [exe] if exe else [sys.executable, "-m", "edgeopt.tools.cli"]
    proc = subprocess.run([*cmd, "--help"], capture_output=True, text=True)
    assert proc.returncode == 0
    assert "Pipeline grammar" in proc.stdout and "--calib" in proc.stdout


EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(__file__))), "examples",
                        "digits")


def test_info_groups_lists_prunable_and_frozen_groups(capsys):
    assert main(["info", os.path.join(EXAMPLES, "resnet.onnx"), "--groups"]) == 0
    out = capsys.readouterr().out
    assert "channel groups: 6 (5 prunable)" in out
    assert "frozen: graph output 'logits'" in out
    assert main(["info", os.path.join(EXAMPLES, "resnet.onnx"), "--groups", "--json"]) == 0
    groups = json.loads(capsys.readouterr().out)["channel_groups"]
    assert [g["size"] for g in groups] == [16, 16, 32, 32, 32, 10]
    assert "no prunable" not in out


def test_info_groups_says_why_there_is_none(capsys):
    light = os.path.join(os.path.dirname(onnx.__file__), "backend", "test", "data", "light")
    assert main(["info", os.path.join(light, "light_squeezenet.onnx"), "--groups"]) == 0
    out = capsys.readouterr().out
    assert "channel groups: 0 (0 prunable)" in out
    assert out.endswith("no prunable channel group: 26 Conv/Gemm/MatMul layer(s) compute their "
                        "weights instead of holding them (e.g. 'n0', from ConstantOfShape); "
                        "fold them into constants first: -p simplify,prune:...\n")


def test_prune_from_the_command_line(tmp_path, capsys):
    out = tmp_path / "cnn.onnx"
    assert main([os.path.join(EXAMPLES, "cnn.onnx"), "-p", "simplify,prune:0.5", "-o", str(out),
                 "--json", "-q"]) == 0
    report = json.loads(capsys.readouterr().out)
    prune = report["steps"][-1]
    assert prune["name"] == "prune" and prune["modified"]
    assert prune["stats"]["params_after"] < prune["stats"]["params_before"] / 2
    assert report["after"]["params"] < report["before"]["params"] / 2
    assert onnx.load(out).graph.output[0].type.tensor_type.shape.dim[1].dim_value == 10


def test_demo_prunes_the_bundled_cnn_without_losing_accuracy(tmp_path, capsys):
    assert main(["demo", "-o", str(tmp_path / "demo"), "--json", "-q"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [s["name"] for s in data["steps"]] == ["simplify", "prune", "quant"]
    assert data["steps"][2]["stats"]["weights_quantized"] == 6
    assert data["after"]["params"] < data["before"]["params"] / 3
    assert data["accuracy"]["original"] == pytest.approx(357 / 360)
    assert data["accuracy"]["optimized"] >= 0.97
    assert os.path.isfile(data["output"])
    # ... and the same model as C: compiled on the host, as accurate as in ONNX Runtime
    assert data["accuracy"]["c"] == pytest.approx(data["accuracy"]["optimized"], abs=2 / 360)
    assert data["c"]["arena"]["size"] <= 1.1 * data["c"]["arena"]["lower_bound"]
    assert os.path.isfile(tmp_path / "demo" / "cnn_c" / "cnn_model.h")
