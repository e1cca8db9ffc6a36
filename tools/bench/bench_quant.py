"""int8 quantization fidelity: ONNX Runtime's ``quantize_static`` vs edgeopt's ``quant:int8``.

Issue 5's fidelity check. For each model, the same calibration samples go to every quantizer
and the result is measured on a separate evaluation set against the fp32 model:

- digits ``cnn``, ``resnet``, ``mobilenetv2``, ``mlp`` (``examples/digits``): the 256 images
  of ``calib.npz``; test accuracy on the 360 ``test_x``/``test_y`` of ``digits_16x16.npz`` and
  its drop from fp32.
- PP-OCRv4 ``det``, ``rec``, ``cls`` (``tools/fetch_models.py``'s cache): rendered-text images
  from ``tools/ocr_data.py`` (``--calib`` 32 and ``--eval`` 64 by default), preprocessed as
  rapidocr does. det: a 640 x 640 page (``--det-limit max:960``, rapidocr's other limit type,
  keeps it at that size; its default ``min:736`` would scale it up to 736 x 736) gives a
  1 x 3 x 640 x 640 input. rec: 3 x 48 x ``--rec-width`` (320, rapidocr's rec_img_shape).
  cls: 3 x 48 x 192.

  * det: IoU and F1 (= Dice; fp32's map as the truth) of the probability maps binarized at
    0.3 (rapidocr's ``thresh``), means over images; "box F1": text boxes (8-connected
    components of the binary map after rapidocr's 2 x 2 dilation, kept when at least 3 px
    on each side and of mean probability >= 0.5, rapidocr's ``box_thresh``; an axis-aligned
    stand-in for its contours), matched one to one to fp32's at box IoU >= 0.5, counted over
    all images.
  * rec: per-timestep argmax agreement, and CTC-decoded sequences (repeats collapsed, blanks
    dropped) equal to fp32's; "text" is the share of lines read exactly as rendered (outer
    spaces stripped), a check that the data is realistic.
  * cls: top-1 agreement with fp32; "truth" is the accuracy on the 0/180 labels.

ONNX Runtime (``onnxruntime.quantization.quantize_static``): ``QuantFormat.QDQ``,
``per_channel=True``, weights ``QInt8``, activations ``QUInt8`` (u8) and ``QInt8`` (s8), with
``CalibrationMethod.MinMax``, ``Percentile`` and ``Entropy`` at their defaults; one sample per
calibration run. The histogram calibrators keep every activation of every sample in memory
before binning (~0.7 GB per 640 x 640 det sample), so when the samples' activations exceed
``--calib-mem-gb``, ORT's own ``CalibStridedMinMax`` option feeds them in strides (the
histograms are merged between strides; MinMax reduces in the graph and never needs it).
Each ORT setting runs twice (``--ort-pre``): ``ORT`` quantizes the model as is (the issue's
setting); ``ORT+pre`` first converts it to opset 13 and runs ORT's recommended
``quant_pre_process`` (graph optimizations: Constant nodes become initializers,
BatchNormalization folds; its symbolic shape inference is skipped, it needs sympy). This
matters for the PP-OCR files, whose weights are all Constant nodes: as is,
``quantize_static`` quantizes no weight (it quantizes initializers only) and treats every
weight as an activation with a per-tensor range. And they are opset 11-12: ORT 1.32 writes
per-channel DequantizeLinear nodes with an ``axis`` (opset 13) into them anyway, and the
result does not load; ``onnx.version_converter`` to 13 changes no output of these models.
Each quantization is timed (wall, in this process, calibration and pre-processing included).

edgeopt: ``edgeopt MODEL -p SPEC --calib CALIB.npz -o OUT.onnx`` for each ``--edgeopt SPEC``,
timed as a subprocess (wall, Python start-up included) and by its report's pipeline seconds.
A spec the installed edgeopt rejects (e.g. before the ``quant`` pass exists) gives a row
saying so.

Every int8 model is also timed against its fp32 model in ONNX Runtime (``tools/_runtime.py``:
CPU, 2 intra-op threads, batch 1 = the first evaluation sample, median of ``--runs``
interleaved runs, ten times as many for the digits models): the latency ratio int8 / fp32;
and its file size over fp32's.

The tool-speed row: onnx's ``light/light_resnet50.onnx`` after ``edgeopt FILE -p simplify``,
64 seeded standard-normal samples, ORT MinMax (u8) vs each edgeopt spec, the spec both as
the CLI and "in process" (load + optimize + save in a fresh Python, imports not timed, as
ORT is timed here); with ``--speed-repeats N``, N interleaved rounds (ORT, then each spec),
reported as medians and as the median per-round ratio to ORT.

Usage::

    python tools/bench/bench_quant.py [--models cnn,resnet,mobilenetv2,mlp,det,rec,cls]
        [--methods MinMax,Percentile,Entropy] [--acts u8,s8] [--ort-pre off,on]
        [--edgeopt quant:int8 ...]
        [--calib 32] [--eval 64] [--det-size 640] [--det-limit max:960] [--rec-width 320]
        [--runs 30] [--calib-mem-gb 6] [--no-resnet50] [--speed-repeats 1]
        [--workdir DIR] [--json out.json]

``--models ''`` runs the tool-speed row alone.

Needs Pillow for the OCR images (a tools-only dependency, not one of edgeopt's) and scipy
(an edgeopt dependency) for the det boxes.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import logging
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOOLS = os.path.join(ROOT, "tools")
DIGITS = os.path.join(ROOT, "examples", "digits")
LIGHT_R50 = os.path.join(os.path.dirname(onnx.__file__), "backend", "test", "data", "light",
                         "light_resnet50.onnx")
DIGIT_MODELS = ("cnn", "resnet", "mobilenetv2", "mlp")
OCR_MODELS = ("det", "rec", "cls")
METHODS = ("MinMax", "Percentile", "Entropy")
ACTS = ("u8", "s8")
DET_THRESH, DET_BOX_THRESH = 0.3, 0.5


def _tool(name: str) -> Any:
    """A module of ``tools/`` imported by path (the scripts run without installing tools)."""
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", os.path.join(TOOLS,
                                                                                f"{name}.py"))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)  # progress; stdout is the markdown


# ----------------------------------------------------------------------------- tasks


@dataclass
class Task:
    """One model with its calibration file and evaluation data."""

    name: str
    path: str
    key: str  # the model's input name
    calib_npz: str  # keyed by ``key``: what ORT's reader and ``edgeopt --calib`` both read
    eval_x: np.ndarray
    metric: Callable[[np.ndarray, np.ndarray], dict[str, float]]
    baseline: dict[str, float] = field(default_factory=dict)  # fp32's own metric, if any

    def calib(self) -> np.ndarray:
        with np.load(self.calib_npz) as data:
            return data[self.key]


def digits_task(name: str) -> Task:
    """A digits model: the 256 bundled calibration images, the 360 test images."""
    with np.load(os.path.join(DIGITS, "digits_16x16.npz")) as data:
        x, y = data["test_x"].astype(np.float32), data["test_y"]

    def metric(ref: np.ndarray, out: np.ndarray) -> dict[str, float]:
        acc, acc_ref = 100 * float((out.argmax(1) == y).mean()), 100 * float(
            (ref.argmax(1) == y).mean())
        return {"acc %": acc, "drop": acc_ref - acc}

    return Task(name, os.path.join(DIGITS, f"{name}.onnx"), "input",
                os.path.join(DIGITS, "calib.npz"), x, metric)


def ocr_task(role: str, workdir: str, args: argparse.Namespace) -> Task:
    """A PP-OCR model with freshly rendered calibration and evaluation images."""
    ocr, fetch = _tool("ocr_data"), _tool("fetch_models")
    path = str(fetch.fetch_ppocr()[role])
    key = ocr.input_name(path)
    cfg = ocr.Config(args.det_size, args.det_limit, args.rec_width)
    files = ocr.write_role(role, workdir, args.calib, args.eval, args.seed, cfg, key)
    with np.load(files["eval"]) as data, open(files["truth"]) as f:
        x, truth = data[key], json.load(f)
    if role == "det":
        metric = det_metric
    elif role == "rec":
        metric = rec_metric(_characters(path), [t["text"] for t in truth])
    else:
        labels = np.array([t["rotated"] for t in truth], dtype=np.int64)
        metric = cls_metric(labels)
    return Task(role, path, key, files["calib"], x, metric)


def _characters(path: str) -> list[str]:
    """The rec model's CTC alphabet as rapidocr builds it: blank, the metadata list, space."""
    meta = {p.key: p.value for p in onnx.load(path, load_external_data=False).metadata_props}
    return ["blank", *meta["character"].splitlines(), " "]


# ----------------------------------------------------------------------------- metrics


def det_metric(ref: np.ndarray, out: np.ndarray) -> dict[str, float]:
    """Against fp32: IoU and F1 of the binarized maps (means over images), box F1."""
    ious, f1s, matched, n_ref, n_out = [], [], 0, 0, 0
    for r, o in zip(ref[:, 0], out[:, 0], strict=True):
        a, b = r > DET_THRESH, o > DET_THRESH
        inter, union, total = (a & b).sum(), (a | b).sum(), a.sum() + b.sum()
        ious.append(float(inter / union) if union else 1.0)
        f1s.append(float(2 * inter / total) if total else 1.0)
        boxes_r, boxes_o = det_boxes(r), det_boxes(o)
        matched += match_boxes(boxes_r, boxes_o)
        n_ref, n_out = n_ref + len(boxes_r), n_out + len(boxes_o)
    box_f1 = 2 * matched / (n_ref + n_out) if n_ref + n_out else 1.0
    return {"IoU": float(np.mean(ious)), "F1": float(np.mean(f1s)), "box F1": box_f1}


def det_boxes(prob: np.ndarray) -> list[tuple[int, int, int, int]]:
    """Text boxes (y0, x0, y1, x1) of one probability map, see the module docstring."""
    from scipy import ndimage

    mask = ndimage.binary_dilation(prob > DET_THRESH, structure=np.ones((2, 2), bool))
    labels, _ = ndimage.label(mask, structure=np.ones((3, 3), bool))
    boxes = []
    for k, sl in enumerate(ndimage.find_objects(labels), start=1):
        h, w = sl[0].stop - sl[0].start, sl[1].stop - sl[1].start
        if min(h, w) < 3 or prob[sl][labels[sl] == k].mean() < DET_BOX_THRESH:
            continue
        boxes.append((sl[0].start, sl[1].start, sl[0].stop, sl[1].stop))
    return boxes


def match_boxes(a: list[tuple[int, ...]], b: list[tuple[int, ...]], min_iou: float = 0.5
                ) -> int:
    """Greedy one-to-one matches between two box lists at IoU >= ``min_iou``."""
    def iou(p: tuple[int, ...], q: tuple[int, ...]) -> float:
        ih = max(0, min(p[2], q[2]) - max(p[0], q[0]))
        iw = max(0, min(p[3], q[3]) - max(p[1], q[1]))
        inter = ih * iw
        area = (p[2] - p[0]) * (p[3] - p[1]) + (q[2] - q[0]) * (q[3] - q[1])
        return inter / (area - inter) if area > inter else 0.0

    pairs = sorted(((iou(p, q), i, j) for i, p in enumerate(a) for j, q in enumerate(b)),
                   reverse=True)
    used_a, used_b = set(), set()
    for v, i, j in pairs:
        if v >= min_iou and i not in used_a and j not in used_b:
            used_a.add(i)
            used_b.add(j)
    return len(used_a)


def ctc_decode(probs: np.ndarray) -> list[tuple[int, ...]]:
    """rapidocr's CTCLabelDecode on indices: argmax, collapse repeats, drop blank (0)."""
    idx = probs.argmax(-1)
    keep = np.ones_like(idx, dtype=bool)
    keep[:, 1:] = idx[:, 1:] != idx[:, :-1]
    keep &= idx != 0
    return [tuple(row[k].tolist()) for row, k in zip(idx, keep, strict=True)]


def rec_metric(chars: list[str], texts: list[str]
               ) -> Callable[[np.ndarray, np.ndarray], dict[str, float]]:
    """Per-timestep argmax agreement, sequence match vs fp32, exact text vs the truth."""
    def metric(ref: np.ndarray, out: np.ndarray) -> dict[str, float]:
        seq_ref, seq_out = ctc_decode(ref), ctc_decode(out)
        read = ["".join(chars[i] for i in s).strip() for s in seq_out]
        return {"step": float((ref.argmax(-1) == out.argmax(-1)).mean()),
                "seq": float(np.mean([a == b for a, b in zip(seq_ref, seq_out, strict=True)])),
                "text": float(np.mean([r == t for r, t in zip(read, texts, strict=True)]))}
    return metric


def cls_metric(labels: np.ndarray) -> Callable[[np.ndarray, np.ndarray], dict[str, float]]:
    """Top-1 agreement with fp32 and accuracy on the 0/180 labels."""
    def metric(ref: np.ndarray, out: np.ndarray) -> dict[str, float]:
        return {"top-1": float((ref.argmax(1) == out.argmax(1)).mean()),
                "truth": float((out.argmax(1) == labels).mean())}
    return metric


# ----------------------------------------------------------------------------- running


def outputs(path: str, key: str, x: np.ndarray, batch: int) -> np.ndarray:
    """The first output of the model on all of ``x``, ``batch`` samples per run."""
    runtime = _tool("_runtime")
    model = runtime.OrtModel(path)
    return np.concatenate([model.run({key: x[i:i + batch]})[0]
                           for i in range(0, len(x), batch)])


def latency_ms(fp32: str, int8: str, key: str, sample: np.ndarray, runs: int
               ) -> tuple[float, float]:
    """Median batch-1 latency of the fp32 and the int8 model, runs interleaved."""
    runtime = _tool("_runtime")
    a, b = runtime.median_latencies_ms([runtime.OrtModel(fp32), runtime.OrtModel(int8)],
                                       {key: sample[None]}, runs)
    return a, b


class Reader:
    """ORT ``CalibrationDataReader``: one sample per run; supports strided calibration."""

    def __init__(self, key: str, x: np.ndarray) -> None:
        self.key, self.x = key, x
        self.set_range(0, len(x))

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.pos >= self.end:
            return None
        self.pos += 1
        return {self.key: self.x[self.pos - 1:self.pos]}

    def __len__(self) -> int:
        return len(self.x)

    def set_range(self, start_index: int, end_index: int) -> None:
        self.pos, self.end = start_index, min(end_index, len(self.x))


def activation_bytes(path: str, key: str, sample: np.ndarray) -> int:
    """Bytes of every float node output for one sample (what a histogram calibrator keeps)."""
    import onnxruntime as ort

    model = onnx.shape_inference.infer_shapes(onnx.load(path))
    types = {v.name: v.type.tensor_type.elem_type for v in model.graph.value_info}
    names = [o for n in model.graph.node if n.op_type != "Constant" for o in n.output
             if types.get(o) == onnx.TensorProto.FLOAT]
    del model.graph.output[:]
    model.graph.output.extend(onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT,
                                                                 None) for n in names)
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), so,
                                providers=["CPUExecutionProvider"])
    out = sess.run(None, {key: sample[None]})
    return sum(o.nbytes for o in out if isinstance(o, np.ndarray) and o.dtype == np.float32)


def calib_stride(n: int, per_sample: int, budget_gb: float) -> int | None:
    """Largest divisor of ``n`` whose samples' activations fit the budget (None: all fit).

    ORT keeps every output of a stride, then stacks, flattens and bins one tensor at a time;
    the factor 1.5 leaves room for those copies and the session's own memory.
    """
    def fits(k: int) -> bool:
        return 1.5 * k * per_sample <= budget_gb * 1e9

    if fits(n):
        return None
    return max([d for d in range(1, n + 1) if n % d == 0 and fits(d)] or [1])


def opset_13(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` converted to opset 13 when older (per-channel DequantizeLinear needs 13)."""
    version = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    return onnx.version_converter.convert_version(model, 13) if version < 13 else model


def ort_quantize(task: Task, out: str, method: str, act: str, stride: int | None,
                 pre: bool = False) -> float:
    """``quantize_static`` (QDQ, per-channel, s8 weights); returns its wall seconds.

    ``pre``: first convert to opset 13 if older, then ORT's ``quant_pre_process`` (without
    its symbolic shape inference, which needs sympy); timed with the quantization.
    """
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    extra = {"CalibStridedMinMax": stride} if stride and method != "MinMax" else {}
    reader = Reader(task.key, task.calib())
    t0 = time.perf_counter()
    src = task.path
    if pre:
        src = out + ".pre.onnx"
        onnx.save(opset_13(onnx.load(task.path)), src)
        quant_pre_process(src, src, skip_symbolic_shape=True)
    with contextlib.redirect_stdout(sys.stderr):  # the histogram collector prints progress
        quantize_static(src, out, reader, quant_format=QuantFormat.QDQ,
                        per_channel=True, weight_type=QuantType.QInt8,
                        activation_type=QuantType.QUInt8 if act == "u8" else QuantType.QInt8,
                        calibrate_method=getattr(CalibrationMethod, method),
                        extra_options=extra)
    return time.perf_counter() - t0


def edgeopt_quantize(model: str, spec: str, calib_npz: str, out: str
                     ) -> tuple[float, float | None, str | None]:
    """Run the CLI: (wall seconds, pipeline seconds from its report, error line or None)."""
    report = out + ".report.json"
    cmd = ["edgeopt", model, "-p", spec, "--calib", calib_npz, "-o", out, "--report", report,
           "-q"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL,
                          check=False)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        lines = [ln for ln in proc.stderr.splitlines() if ln.strip()] or [f"exit "
                                                                          f"{proc.returncode}"]
        return wall, None, lines[-1].strip()
    with open(report) as f:
        return wall, float(json.load(f)["seconds"]), None


#: Times edgeopt's load + optimize + save in a fresh Python, imports excluded: the terms on
#: which ``quantize_static`` is timed in this process (its imports happened before).
_IN_PROCESS = """
import sys, time
import edgeopt, edgeopt.passes
path, spec, npz, out = sys.argv[1:]
t = time.perf_counter()
model = edgeopt.load(path)
edgeopt.optimize(model, spec, calib=npz)
edgeopt.save(model, out)
print(time.perf_counter() - t)
"""


def edgeopt_in_process(model: str, spec: str, calib_npz: str, out: str
                       ) -> tuple[float | None, None, str | None]:
    """(seconds of load + optimize + save, None, error line or None), imports excluded."""
    proc = subprocess.run([sys.executable, "-c", _IN_PROCESS, model, spec, calib_npz, out],
                          capture_output=True, text=True, stdin=subprocess.DEVNULL, check=False)
    if proc.returncode != 0:
        lines = [ln for ln in proc.stderr.splitlines() if ln.strip()] or [f"exit "
                                                                          f"{proc.returncode}"]
        return None, None, lines[-1].strip()
    return float(proc.stdout.split()[-1]), None, None


# ----------------------------------------------------------------------------- benchmark


def measure(task: Task, label: str, qpath: str, ref: np.ndarray, args: argparse.Namespace,
            batch: int) -> dict[str, Any]:
    """Metric, latency ratio and size ratio of one quantized model."""
    out = outputs(qpath, task.key, task.eval_x, batch)
    runs = args.runs * (10 if task.name in DIGIT_MODELS else 1)  # tens of microseconds
    fp_ms, q_ms = latency_ms(task.path, qpath, task.key, task.eval_x[0], runs)
    return {"variant": label, **task.metric(ref, out), "fp32_ms": fp_ms, "int8_ms": q_ms,
            "latency": q_ms / fp_ms, "size": os.path.getsize(qpath) / os.path.getsize(task.path)}


def bench_model(task: Task, args: argparse.Namespace, workdir: str) -> dict[str, Any]:
    """Every ORT variant and every edgeopt spec on one model."""
    batch = 8 if task.name in OCR_MODELS else len(task.eval_x)
    ref = outputs(task.path, task.key, task.eval_x, batch)
    calib = task.calib()
    per_sample = activation_bytes(task.path, task.key, calib[0])
    stride = calib_stride(len(calib), per_sample, args.calib_mem_gb)
    res: dict[str, Any] = {"model": task.name, "calib": len(calib), "eval": len(task.eval_x),
                           "input": list(task.eval_x.shape[1:]), "stride": stride,
                           "activation_mb": per_sample / 1e6, "rows": []}
    if task.name not in ("det",):  # fp32's own accuracy on the truth
        res["fp32"] = task.metric(ref, ref)
    for pre in args.ort_pre:
        for method in args.methods:
            for act in args.acts:
                res["rows"].append(bench_ort(task, method, act, pre == "on", stride, ref, args,
                                             workdir, batch))
    for spec in args.edgeopt:
        res["rows"].append(bench_edgeopt(task, spec, ref, args, workdir, batch))
    return res


def bench_ort(task: Task, method: str, act: str, pre: bool, stride: int | None,
              ref: np.ndarray, args: argparse.Namespace, workdir: str, batch: int
              ) -> dict[str, Any]:
    """One ORT row; a quantizer that raises is a result too (its first line)."""
    label = f"ORT{'+pre' if pre else ''} {method} {act}"
    qpath = os.path.join(workdir, f"{task.name}.{label.replace(' ', '.')}.onnx")
    log(f"{task.name}: {label}")
    try:
        seconds = ort_quantize(task, qpath, method, act, stride, pre)
        return {**measure(task, label, qpath, ref, args, batch), "seconds": seconds}
    except Exception as e:
        line = (str(e).strip().splitlines() or [type(e).__name__])[0]
        return {"variant": label, "error": f"failed: {type(e).__name__}: {line[:160]}"}


def bench_edgeopt(task: Task, spec: str, ref: np.ndarray, args: argparse.Namespace,
                  workdir: str, batch: int) -> dict[str, Any]:
    """One ``edgeopt -p SPEC`` row (or the CLI's error when it rejects the spec)."""
    label = f"edgeopt `{spec}`"
    qpath = os.path.join(workdir, f"{task.name}.edgeopt.{len(os.listdir(workdir))}.onnx")
    log(f"{task.name}: {label}")
    wall, pipeline, error = edgeopt_quantize(task.path, spec, task.calib_npz, qpath)
    if error:
        return {"variant": label, "error": f"not run: {error}"}
    return {**measure(task, label, qpath, ref, args, batch), "seconds": wall,
            "pipeline_s": pipeline}


def tool_speed(args: argparse.Namespace, workdir: str) -> list[dict[str, Any]]:
    """ORT MinMax vs edgeopt on the simplified light ResNet-50 with 64 random samples.

    edgeopt is timed twice per spec: as the CLI (Python start-up, imports, loading the
    calibration file and the model, saving) and "in process": load + optimize + save in a
    fresh Python whose imports are not timed, as ``quantize_static`` is timed here.
    ``--speed-repeats`` rounds, each running ORT then every spec (interleaved, so load from
    elsewhere on the machine hits all of them alike); a row holds the median seconds and the
    median over rounds of the spec's seconds over ORT's in the same round.
    """
    path = os.path.join(workdir, "resnet50.onnx")
    subprocess.run(["edgeopt", LIGHT_R50, "-p", "simplify", "-o", path, "-q"], check=True,
                   capture_output=True, stdin=subprocess.DEVNULL)
    key = onnx.load(path, load_external_data=False).graph.input[0].name
    x = np.random.default_rng(0).standard_normal((64, 3, 224, 224)).astype(np.float32)
    npz = os.path.join(workdir, "resnet50_calib.npz")
    np.savez(npz, **{key: x})
    task = Task("resnet50", path, key, npz, x[:1], lambda r, o: {})
    rounds: list[dict[str, tuple[float | None, float | None, str | None]]] = []
    for i in range(args.speed_repeats):
        log(f"resnet50: round {i + 1} of {args.speed_repeats}: ORT MinMax u8")
        got = {"ORT MinMax u8": (ort_quantize(task, path + ".ort.onnx", "MinMax", "u8", None),
                                 None, None)}
        for spec in args.edgeopt:
            log(f"resnet50: round {i + 1}: edgeopt {spec}")
            got[f"edgeopt `{spec}`"] = edgeopt_quantize(path, spec, npz, path + ".edgeopt.onnx")
            got[f"edgeopt `{spec}` in process"] = edgeopt_in_process(
                path, spec, npz, path + ".edgeopt.onnx")
        rounds.append(got)
    return [_speed_row(label, rounds) for label in rounds[0]]


def _speed_row(label: str, rounds: list[dict[str, tuple[float | None, float | None, str | None]]]
               ) -> dict[str, Any]:
    """Medians of one variant over the rounds (see :func:`tool_speed`)."""
    errors = [r[label][2] for r in rounds if r[label][2]]
    if errors:
        return {"variant": label, "seconds": None, "pipeline_s": None,
                "error": f"not run: {errors[0]}"}
    walls = [r[label][0] for r in rounds]
    pipes = [r[label][1] for r in rounds if r[label][1] is not None]
    ratios = [r[label][0] / r["ORT MinMax u8"][0] for r in rounds]  # type: ignore[operator]
    return {"variant": label, "seconds": float(np.median(walls)), "all_seconds": walls,
            "pipeline_s": float(np.median(pipes)) if pipes else None,
            "vs_ort": float(np.median(ratios)), "rounds": len(rounds), "error": None}


# ----------------------------------------------------------------------------- output


def _cell(v: Any, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def markdown(res: dict[str, Any]) -> str:
    """One model's table: a row per quantizer."""
    names = sorted({k for r in res["rows"] for k in r} - {
        "variant", "fp32_ms", "int8_ms", "latency", "size", "seconds", "pipeline_s", "error"},
        key=lambda k: ["acc %", "drop", "IoU", "F1", "box F1", "step", "seq", "text", "top-1",
                       "truth"].index(k))
    head = (f"**{res['model']}** (input {'x'.join(map(str, res['input']))}, "
            f"{res['calib']} calibration / {res['eval']} evaluation samples")
    if res.get("stride"):
        head += (f", ORT histogram calibration in strides of {res['stride']} "
                 f"({res['activation_mb']:.0f} MB of activations per sample)")
    if res.get("fp32"):
        head += ", fp32: " + ", ".join(f"{k} {v:.3f}" for k, v in res["fp32"].items()
                                       if k in ("acc %", "text", "truth"))
    header = ["quantizer", *names, "quantize s", "latency int8/fp32 (fp32 ms)", "size int8/fp32"]
    lines = [head + ")", "", "| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    fmt = {"acc %": ".2f", "drop": "+.2f"}
    for r in res["rows"]:
        if r.get("error"):
            cells = ["-"] * len(names) + [_cell(r.get("seconds"), ".1f"), r["error"], "-"]
        else:
            secs = _cell(r["seconds"], ".1f") + (f" ({r['pipeline_s']:.1f} pipeline)"
                                                  if r.get("pipeline_s") is not None else "")
            cells = [_cell(r.get(k), fmt.get(k, ".3f")) for k in names] + [
                secs, f"{r['latency']:.2f} ({r['fp32_ms']:.2f})", f"{r['size']:.2f}"]
        lines.append(f"| {r['variant']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def speed_markdown(rows: list[dict[str, Any]]) -> str:
    n = rows[0].get("rounds", 1) if rows else 1
    lines = ["**tool speed**: light ResNet-50 after `simplify`, 64 random calibration samples"
             + (f"; medians of {n} interleaved rounds" if n > 1 else ""), "",
             "| quantizer | seconds | / ORT MinMax |", "|---|---|---|"]
    for r in rows:
        secs = r.get("error") or _cell(r["seconds"], ".1f") + (
            f" ({r['pipeline_s']:.1f} pipeline)" if r.get("pipeline_s") is not None else "")
        lines.append(f"| {r['variant']} | {secs} | {_cell(r.get('vs_ort'), '.2f')} |")
    return "\n".join(lines) + "\n"


def environment() -> dict[str, Any]:
    import onnxruntime as ort

    import edgeopt

    return {"edgeopt": edgeopt.__version__, "onnx": onnx.__version__,
            "onnxruntime": ort.__version__, "numpy": np.__version__,
            "python": platform.python_version(), "cores": os.cpu_count()}


def _list(choices: tuple[str, ...]) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        items = [t for t in text.split(",") if t]
        if bad := [t for t in items if t not in choices]:
            raise argparse.ArgumentTypeError(f"unknown: {', '.join(bad)} "
                                             f"(choose from {', '.join(choices)})")
        return items
    return parse


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ocr = _tool("ocr_data")
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", type=_list(DIGIT_MODELS + OCR_MODELS),
                    default=list(DIGIT_MODELS + OCR_MODELS))
    ap.add_argument("--methods", type=_list(METHODS), default=list(METHODS))
    ap.add_argument("--acts", type=_list(ACTS), default=list(ACTS),
                    help="ORT activation types: u8 (QUInt8), s8 (QInt8)")
    ap.add_argument("--ort-pre", type=_list(("off", "on")), default=["off", "on"],
                    help="quantize the model as is (off) and/or after ORT's quant_pre_process")
    ap.add_argument("--edgeopt", action="append", default=None, metavar="SPEC",
                    help="edgeopt pipeline to compare (repeatable; default quant:int8)")
    ap.add_argument("--calib", type=int, default=32, help="OCR calibration images")
    ap.add_argument("--eval", type=int, default=64, help="OCR evaluation images")
    ap.add_argument("--seed", type=int, default=0, help="seed of the OCR images")
    ap.add_argument("--det-size", type=ocr._size, default=(640, 640), metavar="HxW")
    ap.add_argument("--det-limit", type=ocr._limit, default=("max", 960), metavar="TYPE:N",
                    help="rapidocr det limit_type:limit_side_len (default max:960)")
    ap.add_argument("--rec-width", type=int, default=320)
    ap.add_argument("--runs", type=int, default=30, help="timed runs per latency")
    ap.add_argument("--calib-mem-gb", type=float, default=6.0,
                    help="memory for ORT's histogram calibration before it goes in strides")
    ap.add_argument("--no-resnet50", action="store_true", help="skip the tool-speed row")
    ap.add_argument("--speed-repeats", type=int, default=1, metavar="N",
                    help="interleaved rounds of the tool-speed row (medians are reported)")
    ap.add_argument("--workdir", help="keep data and models here (default: a temp folder)")
    ap.add_argument("--json", help="also write the raw results here")
    args = ap.parse_args(argv)
    args.edgeopt = args.edgeopt or ["quant:int8"]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.getLogger().setLevel(logging.ERROR)  # ORT's "consider pre-processing" advice
    t0 = time.perf_counter()
    with contextlib.ExitStack() as stack:
        workdir = args.workdir or stack.enter_context(tempfile.TemporaryDirectory(
            prefix="bench_quant."))
        os.makedirs(workdir, exist_ok=True)
        results = []
        for name in args.models:
            task = digits_task(name) if name in DIGIT_MODELS else ocr_task(name, workdir, args)
            results.append(bench_model(task, args, workdir))
            print(markdown(results[-1]), flush=True)
        speed = [] if args.no_resnet50 else tool_speed(args, workdir)
        if speed:
            print(speed_markdown(speed), flush=True)
    total = time.perf_counter() - t0
    env = environment()
    print(", ".join(f"{k} {v}" for k, v in env.items()) + f"; bench {total / 60:.1f} min, "
          f"load average at end {os.getloadavg()[0]:.1f}")
    print("command: python tools/bench/bench_quant.py " + shlex.join(argv or sys.argv[1:]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"environment": env, "args": {k: v for k, v in vars(args).items()},
                       "models": results, "tool_speed": speed, "seconds": total}, f, indent=2,
                      default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
