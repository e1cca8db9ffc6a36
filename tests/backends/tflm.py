"""One-operator TFLite models run by the TensorFlow Lite Micro interpreter (``tflite-micro``).

The kernel tests use TFLM as an outside oracle for ``backends/c/reference.py``: its int8
kernels are TFLite's reference_integer_ops, so agreement shows that the reference (and the C
kernels, which match it) follow TFLite bit for bit, including how TFLite derives multipliers
from float scales inside each kernel's Prepare.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import flatbuffers
import numpy as np
from tflite_micro import runtime

S = runtime.schema_fb
TYPES = {np.dtype(np.int8): S.TensorType.INT8, np.dtype(np.int32): S.TensorType.INT32,
         np.dtype(np.float32): S.TensorType.FLOAT32}


@dataclass
class Tensor:
    """A tensor of the model: an input (data None) or a constant; per-axis quantization when
    ``scale`` has more than one entry."""

    shape: tuple[int, ...]
    dtype: type
    scale: list[float] = field(default_factory=list)
    zero_point: list[int] = field(default_factory=list)
    data: np.ndarray | None = None
    axis: int = 0


def _tensor(t: Tensor, buffer: int) -> S.TensorT:
    out = S.TensorT()
    out.shape = list(t.shape)
    out.type = TYPES[np.dtype(t.dtype)]
    out.buffer = buffer
    if t.scale:
        q = S.QuantizationParametersT()
        q.scale = [float(s) for s in t.scale]
        q.zeroPoint = [int(z) for z in t.zero_point]
        q.quantizedDimension = t.axis
        out.quantization = q
    return out


def build(op: int, options_type: int, options, tensors: list[Tensor], inputs: list[int],
          outputs: list[int]) -> bytes:
    """The flatbuffer of a model with one operator over ``tensors`` (indices into it)."""
    model, sub, buffers = S.ModelT(), S.SubGraphT(), [S.BufferT()]
    sub.tensors = []
    for t in tensors:
        buf = 0
        if t.data is not None:
            b = S.BufferT()
            b.data = np.frombuffer(np.ascontiguousarray(t.data, t.dtype).tobytes(), np.uint8)
            buffers.append(b)
            buf = len(buffers) - 1
        sub.tensors.append(_tensor(t, buf))
    sub.inputs = [i for i in inputs if tensors[i].data is None]
    sub.outputs = outputs
    code = S.OperatorCodeT()
    code.builtinCode, code.deprecatedBuiltinCode, code.version = op, min(op, 127), 1
    oper = S.OperatorT()
    oper.opcodeIndex, oper.inputs, oper.outputs = 0, inputs, outputs
    oper.builtinOptionsType, oper.builtinOptions = options_type, options
    sub.operators = [oper]
    model.version, model.operatorCodes, model.subgraphs, model.buffers = 3, [code], [sub], buffers
    builder = flatbuffers.Builder(1024)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


def run(model: bytes, *inputs: np.ndarray) -> np.ndarray:
    """Invoke the model in TFLM on ``inputs`` and return output 0."""
    interp = runtime.Interpreter.from_bytes(model, arena_size=1 << 20)
    for i, x in enumerate(inputs):
        interp.set_input(np.ascontiguousarray(x), i)
    interp.invoke()
    return interp.get_output(0)


def options(cls_name: str, **fields):
    """A builtin-options object (e.g. ``Conv2DOptionsT``) with the given fields set."""
    obj = getattr(S, cls_name)()
    for k, v in fields.items():
        setattr(obj, k, v)
    return obj
