"""edgeopt ``simplify`` vs onnxsim and onnxoptimizer on the onnx package's light models.

For each model of ``onnx/backend/test/data/light`` the benchmark runs, in this process and on
the same loaded ``ModelProto``:

- edgeopt: ``ir.from_proto`` + ``PassManager("simplify")`` (verifying at the end, as the CLI
  does) + ``ir.to_proto``;
- edgeopt-noaffine (only when asked for with ``--tools``): the same with
  ``simplify,affine=false``, i.e. without ``fold-affine``, to show what that pass contributes;
- onnxsim: ``onnxsim.simplify(proto)`` (its defaults: constant folding, shape inference, its
  onnxoptimizer pass list, no output check);
- onnxoptimizer: ``onnxoptimizer.optimize(proto, passes)`` with its default pass list
  (``get_fuse_and_elimination_passes()``, which includes ``fuse_bn_into_conv``).

It reports compute nodes before and after (``Constant`` nodes are not counted: an IR 3 file
must store computed weights as Constant nodes, a newer one as initializers), the
BatchNormalization and ConstantOfShape nodes left, the best wall time of ``--repeat`` runs,
and whether ONNX Runtime's output on the result matches the model's stored reference output
within onnx's own tolerances for that model. A tool that raises is recorded as failed.

``onnxsim`` and ``onnxoptimizer`` are not edgeopt dependencies; install them for the
benchmark only (``pip install onnxsim onnxoptimizer``).

Usage::

    python tools/bench/bench_simplify.py [--models resnet50,vgg19] [--repeat 3] [--json out.json]
        [--tools edgeopt,edgeopt-noaffine,onnxsim,onnxoptimizer]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import onnx

LIGHT = ["bvlc_alexnet", "densenet121", "inception_v1", "inception_v2", "resnet50",
         "shufflenet", "squeezenet", "vgg19", "zfnet512"]
DATA = os.path.join(os.path.dirname(onnx.__file__), "backend", "test", "data")


def run_edgeopt(proto: onnx.ModelProto, spec: str = "simplify") -> onnx.ModelProto:
    """edgeopt: import, ``simplify``, export (all in memory)."""
    import edgeopt.passes.simplify  # noqa: F401
    from edgeopt import ir
    from edgeopt.passes import PassManager

    model = ir.from_proto(proto)
    PassManager(spec, verify="end").run(model)
    return ir.to_proto(model)


def run_edgeopt_noaffine(proto: onnx.ModelProto) -> onnx.ModelProto:
    """edgeopt's ``simplify`` without ``fold-affine``."""
    return run_edgeopt(proto, "simplify,affine=false")


def run_onnxsim(proto: onnx.ModelProto) -> onnx.ModelProto:
    """onnxsim with its defaults."""
    import onnxsim

    out, ok = onnxsim.simplify(proto)
    if not ok:
        raise RuntimeError("onnxsim reported a failed check")
    return out


def run_onnxoptimizer(proto: onnx.ModelProto) -> onnx.ModelProto:
    """onnxoptimizer with its default passes (fuse_bn_into_conv included)."""
    import onnxoptimizer

    passes = onnxoptimizer.get_fuse_and_elimination_passes()
    if "fuse_bn_into_conv" not in passes:
        passes.append("fuse_bn_into_conv")
    return onnxoptimizer.optimize(proto, passes)


TOOLS: dict[str, Callable[[onnx.ModelProto], onnx.ModelProto]] = {
    "edgeopt": run_edgeopt,
    "edgeopt-noaffine": run_edgeopt_noaffine,
    "onnxsim": run_onnxsim,
    "onnxoptimizer": run_onnxoptimizer,
}
#: What runs without ``--tools``.
DEFAULT_TOOLS = ["edgeopt", "onnxsim", "onnxoptimizer"]


def versions() -> dict[str, str]:
    """Versions of the tools compared (``missing`` when not installed)."""
    import importlib.metadata as md

    found = {}
    for dist in ("edgeopt", "onnxsim", "onnxoptimizer", "onnx", "onnxruntime"):
        try:
            found[dist] = md.version(dist)
        except md.PackageNotFoundError:
            found[dist] = "missing"
    return found


def count(proto: onnx.ModelProto, op: str | None = None) -> int:
    """Nodes of the main graph other than Constant (or only those of type ``op``)."""
    if op is not None:
        return sum(n.op_type == op for n in proto.graph.node)
    return sum(n.op_type != "Constant" for n in proto.graph.node)


def feeds_for(proto: onnx.ModelProto, name: str) -> dict[str, np.ndarray]:
    """The inputs onnx's backend test runner feeds a light model."""
    from onnx.backend.test.runner import Runner

    inits = {t.name for t in proto.graph.initializer}
    return {x.name: Runner.generate_dummy_data(x, seed=0, name=name, random=False)
            for x in proto.graph.input if x.name not in inits}


def matches(proto: onnx.ModelProto, name: str, feeds: dict[str, np.ndarray]) -> str:
    """``yes`` when ORT's output equals the stored reference within onnx's tolerances."""
    import onnxruntime as ort

    with open(os.path.join(DATA, "real", f"test_{name}", "data.json")) as f:
        tol = json.load(f)
    ref = onnx.numpy_helper.to_array(onnx.load_tensor(
        os.path.join(DATA, "light", f"light_{name}_output_0.pb")))
    so = ort.SessionOptions()
    so.log_severity_level = 3
    try:
        sess = ort.InferenceSession(proto.SerializeToString(), so,
                                    providers=["CPUExecutionProvider"])
        got = sess.run(None, {k: v for k, v in feeds.items()
                              if k in {i.name for i in sess.get_inputs()}})[0]
    except Exception as e:  # an invalid result is a finding, not a crash of the benchmark
        return f"ORT error: {type(e).__name__}"
    ok = got.shape == ref.shape and np.allclose(got, ref, rtol=tol["rtol"], atol=tol["atol"])
    return "yes" if ok else "NO"


def bench_tool(fn: Callable[[onnx.ModelProto], onnx.ModelProto], proto: onnx.ModelProto,
               name: str, feeds: dict[str, np.ndarray], repeat: int) -> dict[str, Any]:
    """Best-of-``repeat`` time of one tool on one model, with the result's counts."""
    best, out = float("inf"), None
    for _ in range(repeat):
        src = onnx.ModelProto()
        src.CopyFrom(proto)  # every tool gets a pristine copy; copying is not timed
        gc.collect()
        t0 = time.perf_counter()
        try:
            out = fn(src)
        except Exception as e:
            return {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"}
        best = min(best, time.perf_counter() - t0)
        del src
    assert out is not None
    result = {"nodes": count(out), "bn": count(out, "BatchNormalization"),
              "cos": count(out, "ConstantOfShape"), "seconds": best,
              "matches": matches(out, name, feeds)}
    del out
    gc.collect()
    return result


def bench(models: list[str], tools: list[str], repeat: int) -> list[dict[str, Any]]:
    """Run every tool on every model; one row per model."""
    rows = []
    for name in models:
        proto = onnx.load(os.path.join(DATA, "light", f"light_{name}.onnx"))
        feeds = feeds_for(proto, name)
        row: dict[str, Any] = {"model": name, "before": count(proto),
                               "bn": count(proto, "BatchNormalization"),
                               "cos": count(proto, "ConstantOfShape")}
        for tool in tools:
            row[tool] = bench_tool(TOOLS[tool], proto, name, feeds, repeat)
            print(f"{name:14s} {tool:14s} {row[tool]}", file=sys.stderr, flush=True)
        rows.append(row)
        del proto
        gc.collect()
    return rows


def _nodes_cell(r: dict[str, Any]) -> str:
    if "error" in r:
        return "failed"
    left = [f"{r[k]} {label}" for k, label in (("bn", "BN"), ("cos", "CoS")) if r[k]]
    return f"{r['nodes']}" + (f" ({', '.join(left)} left)" if left else "")


def markdown(rows: list[dict[str, Any]], tools: list[str]) -> str:
    """The result tables: nodes, then time and output check."""
    head = ["model", "nodes before (BN, CoS)", *(f"{t} nodes" for t in tools)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [row["model"], f"{row['before']} ({row['bn']}, {row['cos']})",
                 *(_nodes_cell(row[t]) for t in tools)]
        lines.append("| " + " | ".join(cells) + " |")
    head = ["model", *(f"{t} s" for t in tools), *(f"{t} output = ref" for t in tools)]
    lines += ["", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [row["model"]]
        cells += ["-" if "error" in row[t] else f"{row[t]['seconds']:.3f}" for t in tools]
        cells += [row[t].get("matches", row[t].get("error", "")) for t in tools]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--models", default=",".join(LIGHT), help="comma-separated names")
    parser.add_argument("--tools", default=",".join(DEFAULT_TOOLS),
                        help=f"comma-separated tools, from {', '.join(TOOLS)}")
    parser.add_argument("--repeat", type=int, default=3, help="runs per tool; best is kept")
    parser.add_argument("--json", help="also write the raw results here")
    args = parser.parse_args(argv)
    models = [m for m in args.models.split(",") if m]
    tools = [t for t in args.tools.split(",") if t]
    unknown = [m for m in models if m not in LIGHT] + [t for t in tools if t not in TOOLS]
    if unknown:
        parser.error(f"unknown model or tool: {', '.join(unknown)}")
    rows = bench(models, tools, args.repeat)
    print(markdown(rows, tools))
    print()
    print("versions: " + ", ".join(f"{k} {v}" for k, v in versions().items()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"versions": versions(), "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
