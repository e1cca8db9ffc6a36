"""A pass shipped by a separate package is found through its entry point and runs from the CLI."""

from __future__ import annotations

import os
import subprocess
import sys

import onnx
import pytest

PKG = os.path.join(os.path.dirname(os.path.dirname(__file__)), "plugin_pkg")


@pytest.fixture(scope="module")
def plugin_site(tmp_path_factory):
    """tests/plugin_pkg installed by pip into a private folder (not into this environment)."""
    target = tmp_path_factory.mktemp("site")
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "-q",
         "--no-index", "--target", str(target), PKG], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return target


def _run(args, site, cwd):
    env = dict(os.environ, PYTHONPATH=str(site))
    return subprocess.run([sys.executable, "-m", "edgeopt.tools.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True)


def _model_with_docs(path):
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 2])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 2])
    nodes = [onnx.helper.make_node("Relu", ["x"], ["t"], doc_string="secret comment"),
             onnx.helper.make_node("Neg", ["t"], ["y"], doc_string="another")]
    model = onnx.helper.make_model(onnx.helper.make_graph(nodes, "g", [x], [y]),
                                   opset_imports=[onnx.helper.make_opsetid("", 17)])
    onnx.save(model, path)


def test_entry_point_pass_runs_from_the_cli(plugin_site, tmp_path):
    src = tmp_path / "m.onnx"
    _model_with_docs(src)
    proc = _run([str(src), "-p", "acme.strip-docs", "-o", str(tmp_path / "out.onnx")],
                plugin_site, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "docs_stripped=2" in proc.stdout
    out = onnx.load(tmp_path / "out.onnx")
    assert [n.doc_string for n in out.graph.node] == ["", ""]
    assert [n.doc_string for n in onnx.load(src).graph.node] == ["secret comment", "another"]


def test_plugins_are_listed(plugin_site, tmp_path):
    proc = _run(["passes", "--plugins"], plugin_site, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "acme-edgeopt: acme.strip-docs"
    proc = _run(["passes"], plugin_site, tmp_path)
    assert "acme.strip-docs  [acme-edgeopt]" in proc.stdout
    assert "Remove doc strings from every node" in proc.stdout


def test_without_the_plugin_the_pass_is_unknown(tmp_path):
    src = tmp_path / "m.onnx"
    _model_with_docs(src)
    proc = _run([str(src), "-p", "acme.strip-docs"], tmp_path, tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.startswith("edgeopt: error: unknown pass 'acme.strip-docs'")
    assert len(proc.stderr.strip().splitlines()) == 1
