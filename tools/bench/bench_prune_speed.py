"""Real speed of ``prune:0.5`` in ONNX Runtime, per ``round_to``, and the time of the pass.

Issue 4's "Real speed", "Never slower" and "Pipeline time" checks. Two models:

- ``resnet50``: the onnx package's ``light/light_resnet50.onnx`` after ``simplify``, with
  seeded random non-constant weights (``tests/models.py``'s ``randomize_weights``: the light
  model's dummy weights are constant, so every channel would tie on importance);
- ``mobilenetv2``: a MobileNetV2 (width 1.0, the paper's inverted-residual settings, ReLU6,
  1x3x224x224 input, 1000 classes) built here with ``tests/models.py``'s ``Net``, seeded random
  weights and BatchNormalization, then ``simplify`` (which folds the BNs).

For each model the original (after ``simplify``) and ``prune:0.5`` with every ``--round-to``
value (``default`` = the pass's own choice) are exported and run in ORT on the CPU
(``intra_op_num_threads=2``, one inter-op thread, batch 1, ``ORT_ENABLE_ALL``). All sessions
of a model are created first and measured round-robin for ``--rounds`` rounds (each round:
``--warmup`` runs, then ``--runs`` timed runs per variant), so background load hits every
variant alike; the latency is the median of all timed runs, the spread is the min..max of the
per-round medians. A variant is flagged slower when its median exceeds the original's.

Params are the initializer elements of the exported model; MACs are summed from
``passes/analyses/costs.py`` (batch 1). The pipeline time is ``edgeopt.optimize(model,
"simplify,prune:0.5", calib=random_calibration(model, 64))`` on a freshly loaded light
ResNet-50 (best and worst of ``--pipeline-repeat`` runs), plus any ``--pipeline-spec`` extras.

Usage::

    python tools/bench/bench_prune_speed.py [--models resnet50,mobilenetv2] [--ratio 0.5]
        [--round-to 1,4,8,16,default] [--rounds 3] [--runs 50] [--warmup 10]
        [--pipeline-repeat 3] [--pipeline-spec simplify,prune:0.5,importance=act]
        [--no-pipeline] [--json out.json]
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import platform
import statistics
import sys
import time
from typing import Any

import numpy as np
import onnx

import edgeopt
from edgeopt import ir
from edgeopt.passes._manager import model_stats
from edgeopt.passes.analyses.costs import bind_batch, layer_costs
from edgeopt.passes.calib import random_calibration

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LIGHT = os.path.join(os.path.dirname(onnx.__file__), "backend", "test", "data", "light")
MODELS = ("resnet50", "mobilenetv2")
#: MobileNetV2 inverted residual settings (expansion t, channels c, repeats n, stride s).
MBV2_SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
                 (6, 160, 3, 2), (6, 320, 1, 1))


def _test_models() -> Any:
    """``tests/models.py``, imported by path (``tests`` is not a package)."""
    spec = importlib.util.spec_from_file_location("edgeopt_test_models",
                                                  os.path.join(ROOT, "tests", "models.py"))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def resnet50(seed: int = 0) -> ir.Model:
    """Light ResNet-50 after ``simplify``, with seeded random weights."""
    model = edgeopt.load(os.path.join(LIGHT, "light_resnet50.onnx"))
    edgeopt.optimize(model, "simplify")
    _test_models().randomize_weights(model, seed)
    edgeopt.optimize(model, "dce")  # the shared originals are now unused
    return model


def mobilenetv2(seed: int = 0, size: int = 224, classes: int = 1000) -> ir.Model:
    """MobileNetV2 (width 1.0) at ``size`` x ``size``, BN folded by ``simplify``."""
    tm = _test_models()
    n = tm.Net(seed)
    h = n.cbr(tm.T("x", 3, size), 32, stride=2, op="Relu6")
    for t, c, reps, s in MBV2_SETTINGS:
        for i in range(reps):
            x, stride = h, s if i == 0 else 1
            if t != 1:  # t = 1 has no expansion conv
                h = n.cbr(h, h.c * t, k=1, op="Relu6")
            h = n.cbr(h, h.c, stride=stride, group=h.c, op="Relu6")
            h = n.cbr(h, c, k=1, op=None)
            if stride == 1 and c == x.c:
                h = n.binary("Add", h, x)
    h = n.cbr(h, 1280, k=1, op="Relu6")
    model = ir.from_proto(n.model([1, 3, size, size], n.gemm(n.flatten(n.gap(h)), classes),
                                  "mobilenetv2"))
    edgeopt.optimize(model, "simplify")
    return model


def costs(model: ir.Model) -> tuple[int, int]:
    """Params (initializer elements) and MACs at batch 1."""
    return model_stats(model).params, sum(c.macs or 0 for c in layer_costs(bind_batch(model)))


def variants(model: ir.Model, ratio: float, round_tos: list[str]
             ) -> list[dict[str, Any]]:
    """The original and one ``prune:<ratio>`` per ``round_to``, exported, with their costs."""
    params, macs = costs(model)
    out = [{"variant": "original", "spec": "", "params": params, "macs": macs,
            "proto": ir.to_proto(model).SerializeToString(), "prune_s": 0.0}]
    for r in round_tos:
        spec = f"prune:{ratio}" + ("" if r == "default" else f",round_to={r}")
        t0 = time.perf_counter()
        report = edgeopt.optimize(model, spec, copy=True)
        seconds = time.perf_counter() - t0
        params, macs = costs(report.model)
        out.append({"variant": f"round_to={r}", "spec": spec, "params": params, "macs": macs,
                    "proto": ir.to_proto(report.model).SerializeToString(),
                    "prune_s": seconds, "channels": _channels(report.model)})
        print(f"  {spec}: {params:,} params, {macs / 1e6:.1f} MMACs", file=sys.stderr,
              flush=True)
    return out


def _channels(model: ir.Model) -> list[int]:
    """Output channels of every Conv (for seeing which counts ORT gets)."""
    return [int(n.inputs[1].const_value.shape[0]) for n in model.graph
            if n.op_type == "Conv" and n.inputs[1].const_value is not None]


def session(proto: bytes) -> Any:
    """An ORT CPU session: 2 intra-op threads, 1 inter-op thread, all optimizations."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    return ort.InferenceSession(proto, so, providers=["CPUExecutionProvider"])


def measure(rows: list[dict[str, Any]], rounds: int, runs: int, warmup: int) -> None:
    """Round-robin latency of every variant; fills ``ms``, ``ms_rounds`` and ``ok``."""
    sessions = [session(r["proto"]) for r in rows]
    inp = sessions[0].get_inputs()[0]
    x = np.random.default_rng(0).standard_normal(
        [d if isinstance(d, int) else 1 for d in inp.shape]).astype(np.float32)
    ref_shape = sessions[0].run(None, {inp.name: x})[0].shape
    samples: list[list[float]] = [[] for _ in rows]
    for k in range(rounds):
        order = list(range(len(rows)))
        order = order[k % len(order):] + order[:k % len(order)]  # rotate who goes first
        for i in order:
            sess, feeds = sessions[i], {inp.name: x}
            for _ in range(warmup):
                sess.run(None, feeds)
            times = []
            for _ in range(runs):
                t0 = time.perf_counter()
                sess.run(None, feeds)
                times.append(time.perf_counter() - t0)
            samples[i].extend(times)
            rows[i].setdefault("ms_rounds", []).append(statistics.median(times) * 1e3)
    for i, row in enumerate(rows):
        row["ms"] = statistics.median(samples[i]) * 1e3
        row["ok"] = sessions[i].run(None, {inp.name: x})[0].shape == ref_shape
    del sessions
    gc.collect()


def bench_model(name: str, ratio: float, round_tos: list[str], rounds: int, runs: int,
                warmup: int) -> dict[str, Any]:
    """Build, prune and time one model."""
    print(f"{name}: building", file=sys.stderr, flush=True)
    model = resnet50() if name == "resnet50" else mobilenetv2()
    rows = variants(model, ratio, round_tos)
    del model
    print(f"{name}: measuring {len(rows)} variants x {rounds} rounds x {runs} runs",
          file=sys.stderr, flush=True)
    measure(rows, rounds, runs, warmup)
    base = rows[0]
    for row in rows:
        row.pop("proto")
        row["speedup"] = base["ms"] / row["ms"]
        row["mac_ratio"] = base["macs"] / row["macs"] if row["macs"] else float("inf")
        row["slower"] = row is not base and row["ms"] > base["ms"]
        # Slower beyond noise: even its best round is worse than the original's worst.
        row["slower_beyond_noise"] = row is not base and min(row["ms_rounds"]) > max(
            base["ms_rounds"])
    return {"model": name, "rows": rows}


def pipeline_time(spec: str, samples: int, repeat: int) -> dict[str, Any]:
    """Wall time of ``edgeopt.optimize(light ResNet-50, spec, calib=random(samples))``."""
    times, steps, export = [], {}, []
    for _ in range(repeat):
        gc.collect()
        model = edgeopt.load(os.path.join(LIGHT, "light_resnet50.onnx"))
        calib = random_calibration(model, samples)
        t0 = time.perf_counter()
        report = edgeopt.optimize(model, spec, calib=calib)
        times.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        ir.to_proto(model)  # pruned weights are lazy slices: export materializes them
        export.append(time.perf_counter() - t0)
        for s in report.steps:
            steps.setdefault(s.spec, []).append(s.seconds)
        del model, calib, report
    return {"spec": spec, "samples": samples, "seconds_min": min(times),
            "seconds_max": max(times), "export_s_min": min(export),
            "steps_min": {k: min(v) for k, v in steps.items()}}


def markdown(results: list[dict[str, Any]], pipelines: list[dict[str, Any]]) -> str:
    """The latency table (one per model) and the pipeline-time table."""
    lines = []
    for res in results:
        lines += [f"**{res['model']}**", "",
                  "| variant | params | MMACs | MAC reduction | latency ms (median) "
                  "| per-round medians | speed-up | slower? |", "|---|---|---|---|---|---|---|---|"]
        for r in res["rows"]:
            spread = "..".join(f"{v:.2f}" for v in (min(r["ms_rounds"]), max(r["ms_rounds"])))
            slower = "-" if r["variant"] == "original" else (
                "YES (beyond noise)" if r["slower_beyond_noise"] else
                "yes (within noise)" if r["slower"] else "no")
            lines.append(f"| {r['variant']} | {r['params']:,} | {r['macs'] / 1e6:,.1f} | "
                         f"{r['mac_ratio']:.2f}x | {r['ms']:.2f} | {spread} | "
                         f"{r['speedup']:.2f}x | {slower} |")
        lines.append("")
    if pipelines:
        lines += ["| pipeline (light ResNet-50) | calib | optimize s (min..max) | steps (min s) "
                  "| export s |", "|---|---|---|---|---|"]
        for p in pipelines:
            steps = ", ".join(f"{k} {v:.2f}" for k, v in p["steps_min"].items())
            lines.append(f"| `{p['spec']}` | random:{p['samples']} | {p['seconds_min']:.2f}.."
                         f"{p['seconds_max']:.2f} | {steps} | {p['export_s_min']:.2f} |")
    return "\n".join(lines)


def environment() -> dict[str, Any]:
    """Versions and machine facts the numbers depend on."""
    import onnxruntime as ort

    return {"edgeopt": edgeopt.__version__, "onnx": onnx.__version__,
            "onnxruntime": ort.__version__, "python": platform.python_version(),
            "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "loadavg_at_end": os.getloadavg()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--round-to", default="1,4,8,16,default",
                        help="comma-separated round_to values; 'default' = the pass's choice")
    parser.add_argument("--rounds", type=int, default=3, help="round-robin rounds")
    parser.add_argument("--runs", type=int, default=50, help="timed runs per variant per round")
    parser.add_argument("--warmup", type=int, default=10, help="untimed runs before each round")
    parser.add_argument("--pipeline-repeat", type=int, default=3)
    parser.add_argument("--pipeline-spec", action="append", default=[],
                        help="extra pipelines to time besides simplify,prune:<ratio>")
    parser.add_argument("--no-pipeline", action="store_true")
    parser.add_argument("--json", help="also write the raw results here")
    args = parser.parse_args(argv)
    models = [m for m in args.models.split(",") if m]
    if unknown := [m for m in models if m not in MODELS]:
        parser.error(f"unknown model: {', '.join(unknown)}")
    round_tos = [r for r in args.round_to.split(",") if r]
    results = [bench_model(m, args.ratio, round_tos, args.rounds, args.runs, args.warmup)
               for m in models]
    pipelines = []
    if not args.no_pipeline:
        for spec in [f"simplify,prune:{args.ratio}", *args.pipeline_spec]:
            print(f"pipeline: {spec}", file=sys.stderr, flush=True)
            pipelines.append(pipeline_time(spec, 64, args.pipeline_repeat))
    print(markdown(results, pipelines))
    env = environment()
    print("\n" + ", ".join(f"{k} {v}" for k, v in env.items()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"environment": env, "args": vars(args), "models": results,
                       "pipelines": pipelines}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
