"""Generated C against the Program interpreter (backends/c/interpret.py), and the interpreter
against ONNX Runtime layer by layer.

The digits models (CNN, ResNet with residual adds, MobileNetV2 with depthwise convs, MLP) run
float, ``quant:int8`` (uint8 activations, as int8 with the zero point moved), ``quant:int8,
activations=int8``, ``prune:0.5`` before ``quant:int8``, and with CSR layers (80% of every
Conv/Gemm weight zeroed by magnitude, then ``quant:int8,csr``). The C library of each is
compiled with the strict flags and run on 16 test images through the int8 API.

- Every int8 tensor is compared bit for bit: the last layer of these models runs in float
  (its output is not quantized), so a second build exposes every QuantizeLinear output as an
  extra graph output. That only moves those tensors from the arena into output buffers; the
  kernels that run are the same (checked), and each of their int8 results reaches the caller.
- Float outputs (and float models) agree within 1e-5 of the output's magnitude: the
  interpreter sums in a different order than the C loops.
- The interpreter is checked independently of the lowering's own code path: each int8 kernel,
  fed ONNX Runtime's int8 inputs, gives ONNX Runtime's int8 output within 1 LSB (TFLite rounds
  the requantization half away from zero, ORT's QuantizeLinear half to even).
"""

from __future__ import annotations

import functools
import pathlib
import shutil
import subprocess

import numpy as np
import onnxruntime
import pytest

from edgeopt import ir
from edgeopt.backends.c import emit_c, interpret
from edgeopt.backends.c import reference as ref
from edgeopt.backends.c.program import Op, Program, TensorRef
from edgeopt.passes import Context, PassManager
from edgeopt.passes.calib import load_calibration

DIGITS = pathlib.Path(__file__).resolve().parents[2] / "examples" / "digits"
RUNTIME = pathlib.Path(interpret.__file__).parent / "runtime"
CFLAGS = ["-std=c99", "-Wall", "-Wextra", "-Wpedantic", "-Werror", "-O2"]
MODELS = ["cnn", "resnet", "mobilenetv2", "mlp"]
QUANT = {"int8": "quant:int8", "int8act": "quant:int8,activations=int8",
         "prune": "prune:0.5,quant:int8", "csr": "quant:int8,csr"}
MOVES = {"memcpy", "eo_transpose"}  # what exposing a tensor as an output may add
pytestmark = pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc")


@functools.cache
def images() -> np.ndarray:
    """16 test images, NHWC float32."""
    with np.load(DIGITS / "digits_16x16.npz") as d:
        return d["test_x"][:16].astype(np.float32).transpose(0, 2, 3, 1)


def sparsify_by_hand(model: ir.Model, ratio: float = 0.8) -> None:
    """Zero the ``ratio`` smallest-magnitude entries of every Conv/Gemm weight."""
    for node in model.graph:
        if node.op_type in ("Conv", "Gemm"):
            w = node.inputs[1].const_value.numpy().copy()
            w[np.abs(w) < np.quantile(np.abs(w), ratio)] = 0
            node.inputs[1].const_value = ir.ArrayTensor(w)


@functools.cache
def _model(name: str, config: str) -> ir.Model:
    model = ir.load(str(DIGITS / f"{name}.onnx"))
    if config == "csr":
        sparsify_by_hand(model)
    if config != "float":
        ctx = Context(calib=load_calibration(str(DIGITS / "calib.npz"), model))
        PassManager(QUANT[config], verify="end").run(model, ctx)
    return model


def model(name: str, config: str, taps: bool = False) -> ir.Model:
    """The prepared model (a fresh clone); ``taps`` adds every QuantizeLinear output."""
    m = _model(name, config).clone()
    if taps:
        for node in list(m.graph):
            if node.op_type == "QuantizeLinear":
                m.graph.outputs.append(node.outputs[0])
    return m


@pytest.fixture(scope="module")
def runtime_objects(tmp_path_factory) -> list[str]:
    """The kernel library compiled once (every generated library copies it verbatim)."""
    out = tmp_path_factory.mktemp("eo_runtime")
    objs = []
    for src in sorted(RUNTIME.glob("*.c")):
        obj = out / (src.stem + ".o")
        subprocess.run(["gcc", *CFLAGS, "-c", str(src), "-o", str(obj)], check=True)
        objs.append(str(obj))
    return objs


def build(m: ir.Model, out: pathlib.Path, objs: list[str]) -> tuple[Program, str]:
    """Emit C into ``out``, compile it, and lower the same model for the interpreter."""
    result = emit_c(m, str(out), prefix="net")
    files = result.files
    for name in files:
        if (RUNTIME / name).exists():
            assert files[name] == (RUNTIME / name).read_text()
    exe = str(out / "run")
    subprocess.run(["gcc", *CFLAGS, "-DNET_TEST_MAIN", f"-I{out}", *map(str, out.glob("net_*.c")),
                    *objs, "-o", exe, "-lm"], check=True)
    program = interpret.lower_model(m, "net")  # lowering again gives the emitted schedule
    assert [layer["kernel"] for layer in result.report["layers"]] == \
        [op.kernel for op in program.ops]
    return program, exe


def api_input(t: TensorRef, x: np.ndarray) -> np.ndarray:
    """An image as the C API takes it: quantized like QuantizeLinear for an int8 input."""
    return ref.quantize(x, t.scale, t.zero_point) if t.ctype == "int8_t" else x


def run_c(exe: str, program: Program, x: np.ndarray, tmp: pathlib.Path) -> list[np.ndarray]:
    """The C program's outputs (raw bytes split by the Program's output types and shapes)."""
    (tmp / "in.bin").write_bytes(np.ascontiguousarray(x).tobytes())
    subprocess.run([exe, str(tmp / "in.bin"), str(tmp / "out.bin")], check=True)
    raw, outs, at = (tmp / "out.bin").read_bytes(), [], 0
    for t in program.outputs:
        dtype = np.dtype(np.int8 if t.ctype == "int8_t" else np.float32)
        outs.append(np.frombuffer(raw, dtype, t.size, at).reshape(t.shape))
        at += t.nbytes
    assert at == len(raw)
    return outs


def compare(exe: str, program: Program, tmp: pathlib.Path) -> tuple[int, float]:
    """Run every image through C and the interpreter: (int8 outputs equal, max float error)."""
    exact, worst = 0, 0.0
    for img in images():
        x = api_input(program.inputs[0], img[None])
        want = interpret.run(program, [x])
        for t, c, y in zip(program.outputs, run_c(exe, program, x, tmp), want, strict=True):
            if t.ctype == "int8_t":
                assert np.array_equal(c, y), f"{t.name}: {np.count_nonzero(c != y)} bytes differ"
                exact += 1
            else:
                worst = max(worst, float(np.abs(c - y).max() / np.abs(y).max()))
    return exact, worst


@pytest.mark.parametrize("name", MODELS)
def test_float_model_matches_interpreter(name, tmp_path, runtime_objects):
    program, exe = build(model(name, "float"), tmp_path, runtime_objects)
    assert {op.kernel for op in program.ops} & {"eo_conv_f32", "eo_fc_f32"}
    _, worst = compare(exe, program, tmp_path)
    assert worst <= 1e-5


@pytest.mark.parametrize("config", list(QUANT))
@pytest.mark.parametrize("name", MODELS)
def test_quantized_output_matches_interpreter(name, config, tmp_path, runtime_objects):
    program, exe = build(model(name, config), tmp_path, runtime_objects)
    kernels = {op.kernel for op in program.ops}
    assert {"eo_conv_s8", "eo_fc_s8", "eo_conv_s8_csr", "eo_fc_s8_csr"} & kernels
    if config == "csr":
        assert {"eo_conv_s8_csr", "eo_fc_s8_csr"} & kernels
    _, worst = compare(exe, program, tmp_path)
    assert worst <= 1e-5  # the float last layer, fed by bit-identical int8 tensors


@pytest.mark.parametrize("config", list(QUANT))
@pytest.mark.parametrize("name", MODELS)
def test_every_int8_tensor_is_bit_exact(name, config, tmp_path, runtime_objects):
    plain = interpret.lower_model(model(name, config), "net")
    program, exe = build(model(name, config, taps=True), tmp_path, runtime_objects)
    # the same kernels run in the same order; exposing tensors only adds copies to outputs
    assert [op.kernel for op in program.ops if op.kernel not in MOVES] == \
        [op.kernel for op in plain.ops if op.kernel not in MOVES]
    int8_ops = sum(op.writes[0].ctype == "int8_t" and op.kernel not in MOVES
                   for op in plain.ops)
    taps = sum(t.ctype == "int8_t" for t in program.outputs)
    assert taps >= int8_ops
    exact, worst = compare(exe, program, tmp_path)
    assert exact == taps * len(images())
    assert worst <= 1e-5


# -- the interpreter against ONNX Runtime, one kernel at a time -----------------------------------
def onnx_to_storage(t: TensorRef, x: np.ndarray) -> np.ndarray:
    """An ONNX-order array in ``t``'s C storage order (NHWC, or a flattened NHWC tensor)."""
    if t.layout == "nhwc":
        return x.transpose(0, 2, 3, 1)
    if t.layout == "flat_hwc":
        c, h, w = t.chw
        return x.reshape(-1, c, h, w).transpose(0, 2, 3, 1)
    return x


def ort_int8_tensors(tapped: ir.Model, program: Program, x: np.ndarray
                     ) -> dict[int, np.ndarray]:
    """ORT's int8 value of every Program tensor that holds a QuantizeLinear output, by root.

    ``tapped`` has every QuantizeLinear output as a graph output (``model(..., taps=True)``).
    """
    so = onnxruntime.SessionOptions()
    so.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = onnxruntime.InferenceSession(ir.to_proto(tapped).SerializeToString(), so,
                                        providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    values = dict(zip(names, sess.run(None, {sess.get_inputs()[0].name: x}), strict=True))
    quantized = {n.outputs[0].name: n.outputs[0].name for n in tapped.graph
                 if n.op_type == "QuantizeLinear"}
    # an int8 C input is the QuantizeLinear of the graph input it replaces
    quantized |= {n.inputs[0].name: n.outputs[0].name for n in tapped.graph
                  if n.op_type == "QuantizeLinear" and n.inputs[0].is_graph_input()}
    known = {}
    for t in program.tensors:
        if t.ctype == "int8_t" and t.source in quantized:
            v = values[quantized[t.source]]
            v = v.astype(np.int16) - (128 if v.dtype == np.uint8 else 0)  # uint8 -> int8
            known[id(t.root())] = onnx_to_storage(t, v).reshape(-1).astype(np.int8)
    return known


@pytest.mark.parametrize("config", list(QUANT))
@pytest.mark.parametrize("name", MODELS)
def test_each_int8_kernel_within_one_lsb_of_onnxruntime(name, config):
    program = interpret.lower_model(model(name, config), "net")
    tapped = model(name, config, taps=True)
    checked = set()
    for img in images()[:8]:
        known = ort_int8_tensors(tapped, program, img[None].transpose(0, 3, 1, 2))
        for op in program.ops:
            out = op.writes[0].root()
            if op.kernel in MOVES or id(out) not in known or \
                    not all(id(r.root()) in known for r in op.reads):
                continue
            machine = interpret.Machine()
            for r in op.reads:
                machine.write(r.root(), known[id(r.root())])
            interpret.execute(machine, op)
            got = machine.read(out).astype(np.int16).ravel()
            assert np.abs(got - known[id(out)]).max() <= 1, f"{op.node} ({op.kernel})"
            checked.add(op.node)
    int8_kernels = {op.node for op in program.ops if op.writes[0].ctype == "int8_t"
                    and op.kernel not in MOVES and op.reads and op.reads[0].ctype == "int8_t"}
    assert int8_kernels <= checked


# -- the interpreter's own errors -----------------------------------------------------------------
def test_unknown_kernel_and_unwritten_tensor_are_clear_errors():
    x = TensorRef("m_x", "x", "int8_t", (1, 4), io="input")
    y = TensorRef("m_y", "y", "int8_t", (1, 4), io="output")
    tmp = TensorRef("m_t", "t", "int8_t", (1, 4))
    program = Program([x], [y], [x, y, tmp], [], [Op("eo_fancy_s8", "layer1", "Fancy",
                                                     [x, y, 4], [x], [y])])
    with pytest.raises(interpret.InterpretError, match=r"^layer1: kernel 'eo_fancy_s8' is not "
                                                        r"known to the interpreter \(known: "):
        interpret.run(program, [np.zeros((1, 4), np.int8)])
    program.ops = [Op("eo_clamp_s8", "layer1", "Clip", [-5, 5, tmp, y, 4], [tmp], [y])]
    with pytest.raises(interpret.InterpretError, match=r"^m_t is read before any kernel wrote it$"):
        interpret.run(program, [np.zeros((1, 4), np.int8)])
    with pytest.raises(ValueError, match=r"^input m_x must be int8_t with 4 elements \(shape "
                                         r"\(1, 4\)\), got float32 with 4$"):
        interpret.run(program, [np.zeros((1, 4), np.float32)])


def test_c_literals_are_parsed():
    assert interpret.parse_literal("(const int32_t[]){1, -2, 3, 4}") == [1, -2, 3, 4]
    assert interpret.parse_literal("-FLT_MAX") == -np.finfo(np.float32).max
    with pytest.raises(interpret.InterpretError, match=r"^cannot read the C argument 'x \+ 1'$"):
        interpret.parse_literal("x + 1")
