"""The ``edgeopt`` sub-commands (argument parsing lives in :mod:`.cli`)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import tempfile
from collections import Counter
from typing import Any

import numpy as np

from edgeopt import ir
from edgeopt.ir import EdgeoptError
from edgeopt.passes import Context, PassManager, list_passes, parse_pipeline, plugins, resolve
from edgeopt.passes._options import describe_type
from edgeopt.passes.analyses.costs import bind_batch, layer_costs, unbound_inputs

from . import _layer_diff as layer_diff
from ._console import Console, format_table, human_bytes
from ._files import output_path, write_text_atomic
from ._runtime import THREADS, WARMUP, OrtModel, feeds_for, median_latencies_ms
from .cli import print_json

__all__ = ["cmd_compare", "cmd_demo", "cmd_info", "cmd_optimize", "cmd_passes"]

#: The headline pipeline of `edgeopt demo`; it grows as passes land (quant, C output).
DEMO_PIPELINE = "simplify,prune:0.5,quant:int8"


class _Announce:
    """Instrument that tells the user which pass is running."""

    def __init__(self, console: Console) -> None:
        self.console = console

    def before_pass(self, name: str, model: ir.Model) -> None:
        self.console.info(f"running {name} ...")


def _load_calib(args: argparse.Namespace, model: ir.Model,
                shapes: dict[str, tuple[int, ...]] | None = None) -> Any:
    if not args.calib:
        return None
    from edgeopt.passes.calib import load_calibration

    return load_calibration(args.calib, model, preprocess=args.preprocess,
                            num_samples=args.calib_samples, input_shapes=shapes)


def _input_shapes(args: argparse.Namespace, model: ir.Model
                  ) -> dict[str, tuple[int, ...]] | None:
    """``--input-shape``, parsed and checked against the model's inputs."""
    if not getattr(args, "input_shape", None):
        return None
    from edgeopt.backends.c import parse_input_shapes
    from edgeopt.passes.calib import synthetic_dims

    shapes = parse_input_shapes(args.input_shape)
    inputs = {v.name: v for v in model.graph.inputs if not v.is_initializer()}
    for name in shapes:
        if name not in inputs:
            raise EdgeoptError(f"--input-shape: {args.model} has no input {name!r} (inputs: "
                               f"{', '.join(map(repr, inputs)) or 'none'})")
        if inputs[name].shape is not None:
            synthetic_dims(inputs[name], shapes)  # the shape fits the input's static dims
    return shapes


def _unbound(model: ir.Model, shapes: dict[str, tuple[int, ...]] | None) -> str | None:
    """The first input whose symbolic dims leave MACs unknown, described; or None."""
    free = unbound_inputs(model, shapes)
    return f"{free[0].name!r} {ir.format_shape(free[0].shape)}" if free else None


def _macs_totals(model: ir.Model, shapes: dict[str, tuple[int, ...]] | None,
                 before: list[Any], after: list[Any]) -> dict[str, int | None]:
    """The report's ``macs``: before/after at batch 1 (None while input sizes are unknown),
    and ``not_counted`` layers of unknown shape when there are any."""
    if _unbound(model, shapes):
        return {"before": None, "after": None}
    tb, ta = layer_diff.totals(before), layer_diff.totals(after)
    out: dict[str, int | None] = {"before": tb["macs"], "after": ta["macs"]}
    if tb["macs_unknown"] or ta["macs_unknown"]:
        out["not_counted"] = max(tb["macs_unknown"], ta["macs_unknown"])
    return out


def _macs_line(macs: dict[str, int | None], model: ir.Model,
               shapes: dict[str, tuple[int, ...]] | None) -> str:
    """The report's MACs line, or why they are unknown."""
    free = _unbound(model, shapes)
    if free or macs["before"] is None or macs["after"] is None:  # None only while unbound
        return (f"MACs: unknown: input {free} has symbolic dims besides the batch; give "
                "--calib data or --input-shape NAME:DxD.. to count them")
    line = (f"MACs (batch 1): {macs['before']:,} -> {macs['after']:,}"
            + (f" ({macs['after'] / macs['before'] - 1:+.1%})" if macs["before"] else ""))
    if macs.get("not_counted"):
        line += f"; {macs['not_counted']} layers of unknown shape not counted"
    return line


def _verify_input(model: ir.Model, path: str) -> None:
    """Reject an invalid input up front, so later errors can be blamed on the right pass."""
    try:
        ir.verify(model)
    except ir.VerificationError as e:
        raise EdgeoptError(f"{path}: the input model is invalid: {e}") from None


def _external(choice: str) -> bool | None:
    return {"auto": None, "yes": True, "no": False}[choice]


def cmd_optimize(args: argparse.Namespace, console: Console) -> int:
    """Run a pipeline on a model and write the result (with --measure, time both in ORT)."""
    passes = resolve(parse_pipeline(args.pipeline))  # bad specs fail before any work
    if args.report and not os.path.isdir(os.path.dirname(os.path.abspath(args.report))):
        raise EdgeoptError(f"{args.report}: folder does not exist")
    if args.emit != "onnx":
        if args.measure or args.sparse_initializers:
            raise EdgeoptError(f"--measure and --sparse-initializers apply to ONNX output, not "
                               f"--emit {args.emit}")
        return _emit_c(args, console, passes)
    if args.budget or args.prefix:
        raise EdgeoptError("--budget and --prefix apply to --emit c / c-header")
    out = output_path(args.model, args.output)
    model = ir.load(args.model)
    _verify_input(model, args.model)
    shapes = _input_shapes(args, model)
    calib = _load_calib(args, model, shapes)
    bench = _Bench(args, model, calib, shapes) if args.measure else None  # fails before work
    ctx = Context(calib=calib, progress=console.progress,
                  options={"input_shapes": shapes} if shapes else None)
    cost_shapes = ctx.input_shapes()
    layers_before = layer_diff.snapshot(model, cost_shapes)
    manager = PassManager(passes, verify="each" if args.verify_each else "end",
                          instruments=[_Announce(console)])
    report = manager.run(model, ctx)
    layers_after = layer_diff.snapshot(model, cost_shapes)
    changes = layer_diff.diff(layers_before, layers_after)
    external = _external(args.external_data)
    sparse = args.sparse_initializers
    latency = bench.measure(model, out, external, sparse, console) if bench else None
    # only once everything above succeeded
    ir.save(model, out, external_data=external, sparse_initializers=sparse)
    packing = packed_weights(model)
    result = {**report.to_dict(), "input": args.model, "output": out,
              "layers": layer_diff.to_dicts(changes),
              "macs": _macs_totals(model, cost_shapes, layers_before, layers_after)}
    if latency is not None:
        result["latency"] = latency
    if packing["weights"]:
        result["csr"] = packing
    if _report_or_json(args, result):
        return 0
    print(report.table())
    if changes:
        print()
        print(layer_diff.format_changes(changes, None if args.layers else layer_diff.MAX_ROWS))
        print(_macs_line(result["macs"], model, cost_shapes))
    if latency is not None:
        print(_latency_line(latency))
    if packing["weights"]:
        print(_packing_line(packing, sparse))
    before, after = os.path.getsize(args.model), os.path.getsize(out)
    print(f"wrote {out} ({human_bytes(before)} -> {human_bytes(after)})")
    return 0


def _report_or_json(args: argparse.Namespace, data: dict[str, Any]) -> bool:
    """Write ``--report``; with ``--json`` also print ``data`` and return True."""
    if args.report:
        write_text_atomic(args.report, json.dumps(data, indent=2, default=str) + "\n")
    if args.json:
        print_json(data)
    return bool(args.json)


def _emit_c(args: argparse.Namespace, console: Console, passes: Any) -> int:
    """``--emit c|c-header``: run the pipeline, then write the C library into a folder."""
    from edgeopt.backends.c import emit_c, file_sha256, parse_budget

    budget = parse_budget(args.budget) if args.budget else None
    stem = os.path.splitext(os.path.basename(args.model))[0]
    out_dir = args.output or os.path.join(os.path.dirname(os.path.abspath(args.model)),
                                          stem + "_c")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise EdgeoptError(f"{out_dir}: --emit {args.emit} writes a folder; this is a file")
    model = ir.load(args.model)
    _verify_input(model, args.model)
    shapes = _input_shapes(args, model)
    calib = _load_calib(args, model, shapes)
    ctx = Context(calib=calib, progress=console.progress,
                  options={"input_shapes": shapes} if shapes else None)
    report = PassManager(passes, verify="end", instruments=[_Announce(console)]).run(model, ctx)
    console.info(f"emitting {args.emit} ...")
    result = emit_c(model, None, args.prefix or stem, mode=args.emit, budget=budget,
                    pipeline=args.pipeline, source_sha256=file_sha256(args.model),
                    input_shapes=shapes)
    from edgeopt.backends.c import write_files

    write_files(out_dir, result.files)  # only once everything above succeeded
    data = {**report.to_dict(), "input": args.model, "output": out_dir,
            "files": sorted(result.files), "c": result.report}
    if _report_or_json(args, data):
        return 0
    print(report.table())
    c = result.report
    print(f"flash: {c['flash_bytes']:,} bytes of constants; RAM: arena {c['arena']['size']:,} "
          f"bytes (lower bound {c['arena']['lower_bound']:,}, without reuse "
          f"{c['arena']['naive']:,}); {c['macs']:,} MACs; CRC-32 {c['crc32']}")
    print(f"wrote {os.path.join(out_dir, '')} ({', '.join(sorted(result.files))})")
    return 0


class _Bench:
    """``--measure``: ORT latency of the input and the optimized model on the same input.

    The input model is loaded (and run once) at construction, so a model ONNX Runtime
    cannot run fails before the pipeline does any work.
    """

    def __init__(self, args: argparse.Namespace, model: ir.Model, calib: Any,
                 shapes: dict[str, tuple[int, ...]] | None) -> None:
        self.runs = args.runs
        self.feeds = feeds_for(model, calib, batch=1, shapes=shapes)
        self.inputs = "first calibration sample" if calib is not None else "random (seed 0)"
        self.source = OrtModel(args.model)
        self.source.run(self.feeds)

    def measure(self, model: ir.Model, out: str, external: bool | None, sparse: bool,
                console: Console) -> dict[str, Any]:
        """Time both models; the optimized one from a temporary copy (``out`` is untouched).

        Raises:
            EdgeoptError: ONNX Runtime cannot load or run the optimized model.
        """
        console.info(f"measuring latency ({self.runs} runs each) ...")
        with tempfile.TemporaryDirectory(prefix="edgeopt-measure-") as tmp:
            path = os.path.join(tmp, os.path.basename(out))
            ir.save(model, path, external_data=external, sparse_initializers=sparse)
            optimized = OrtModel(path, label=f"{out} (optimized model; not written)")
            before, after = median_latencies_ms([self.source, optimized], self.feeds,
                                                self.runs)
        return {"before_ms": before, "after_ms": after,
                "speedup": before / after if after else None, "runs": self.runs,
                "warmup": WARMUP, "threads": THREADS, "batch": 1, "inputs": self.inputs}


def _latency_line(lat: dict[str, Any]) -> str:
    speedup = f"{lat['speedup']:.2f}x" if lat["speedup"] else "-"
    return (f"latency: {lat['before_ms']:.3f} ms -> {lat['after_ms']:.3f} ms ({speedup})  "
            f"[ORT CPU, {lat['threads']} threads, batch 1, median of {lat['runs']} runs, "
            f"{lat['inputs']} input]")


def packed_weights(model: ir.Model) -> dict[str, int]:
    """Totals over the CSR-packed weights: count, dense bytes, CSR bytes.

    ``onnx_sparse*`` count those whose ONNX sparse form (int64 COO indices) is smaller than
    dense, what ``--sparse-initializers`` writes.
    """
    out = {"weights": 0, "dense_bytes": 0, "csr_bytes": 0, "onnx_sparse": 0,
           "onnx_sparse_dense_bytes": 0, "onnx_sparse_bytes": 0}
    for g in [model.graph, *model.graph.subgraphs()]:
        for v in g.initializers.values():
            t = v.const_value
            if not isinstance(t, ir.CSRTensor):
                continue
            out["weights"] += 1
            out["dense_bytes"] += t.nbytes
            out["csr_bytes"] += t.stored_nbytes
            coo = t.coo_nbytes
            if coo < t.nbytes:
                out["onnx_sparse"] += 1
                out["onnx_sparse_dense_bytes"] += t.nbytes
                out["onnx_sparse_bytes"] += coo
    return out


def _packing_line(p: dict[str, int], written: bool) -> str:
    line = (f"CSR-packed weights: {p['weights']}, {human_bytes(p['dense_bytes'])} dense -> "
            f"{human_bytes(p['csr_bytes'])} CSR")
    saving = p["onnx_sparse_dense_bytes"] - p["onnx_sparse_bytes"]
    if not p["onnx_sparse"]:
        return line + "; none is smaller as an ONNX sparse_initializer (int64 indices)"
    if written:
        return line + (f"; {p['onnx_sparse']} written as ONNX sparse_initializer "
                       f"({human_bytes(saving)} saved)")
    return line + (f"; --sparse-initializers would write {p['onnx_sparse']} as ONNX "
                   f"sparse_initializer and save {human_bytes(saving)}")


def _type_str(v: ir.Value) -> str:
    dtype = v.dtype.name.lower() if v.dtype is not None else "?"
    return f"{dtype}{ir.format_shape(v.shape)}"


def model_info(model: ir.Model, shapes: dict[str, tuple[int, ...]] | None = None
               ) -> dict[str, Any]:
    """Everything ``edgeopt info`` reports, as plain data (MACs at batch 1 and ``shapes``)."""
    graph = model.graph
    by_dtype: Counter[str] = Counter()
    params = 0
    for g in [graph, *graph.subgraphs()]:
        for v in g.initializers.values():
            by_dtype[v.const_value.dtype.name.lower()] += v.const_value.nbytes
            params += v.const_value.size
    macs: int | None = None
    try:
        costs = layer_costs(bind_batch(model, 1, shapes))
        free = _unbound(model, shapes)
        unknown = sum(1 for c in costs if c.macs is None)
        if free:
            macs_note = (f"unknown: input {free} has symbolic dims besides the batch; give "
                         "--input-shape NAME:DxD..")
        else:
            macs = sum(c.macs or 0 for c in costs)
            macs_note = "batch 1" + "".join(f", {k} {'x'.join(map(str, v))}"
                                            for k, v in (shapes or {}).items()) \
                + (f"; {unknown} layers of unknown shape not counted" if unknown else "")
    except EdgeoptError as e:
        costs, macs_note = [], f"unavailable: {e}"
    ops = Counter((f"{n.domain}::" if n.domain not in ("", "ai.onnx") else "") + n.op_type
                  for n in model.walk())
    return {
        "ir_version": model.ir_version,
        "opsets": dict(model.opset_imports),
        "producer": f"{model.producer_name} {model.producer_version}".strip(),
        "inputs": [{"name": v.name, "type": _type_str(v)} for v in graph.inputs
                   if not v.is_initializer()],
        "outputs": [{"name": v.name, "type": _type_str(v)} for v in graph.outputs],
        "nodes": sum(ops.values()),
        "ops": dict(ops.most_common()),
        "params": params,
        "weight_bytes": dict(by_dtype),
        "macs": macs,
        "macs_note": macs_note,
        "layers": [dataclasses.asdict(c) for c in costs],
        "weights": weight_storage(model),
    }


def weight_storage(model: ir.Model) -> list[dict[str, Any]]:
    """Sparsity and storage of every layer weight (also the integer ones of a QDQ model).

    Each row: zeros, dense bytes, CSR bytes, and how the weight is stored now.
    """
    from edgeopt.passes._weights import layer_weights

    rows, seen = [], set()
    for lw in layer_weights(model):
        if id(lw.value) in seen:
            continue
        seen.add(id(lw.value))
        t = lw.value.const_value
        dense = t.numpy()
        stored = "csr" if isinstance(t, ir.CSRTensor) else \
            "onnx-sparse" if isinstance(t, ir.SparseTensor) else "dense"
        zeros = t.size - int(np.count_nonzero(dense))
        rows.append({"layer": lw.node.name or lw.node.outputs[0].name, "weight": lw.value.name,
                     "dtype": t.dtype.name.lower(), "elements": t.size, "zeros": zeros,
                     "sparsity": zeros / t.size if t.size else 0.0, "dense_bytes": t.nbytes,
                     "csr_bytes": ir.csr_nbytes(dense, lw.layout, t.dtype),
                     "stored": stored,
                     "stored_bytes": getattr(t, "stored_nbytes", t.nbytes)})
    return rows


def cmd_info(args: argparse.Namespace, console: Console) -> int:
    """Print a summary of a model."""
    model = ir.load(args.model)
    info = model_info(model, _input_shapes(args, model))
    groups = None
    if args.groups:
        from edgeopt.passes.analyses import ChannelGroups

        groups = ChannelGroups(model, Context())
        info["channel_groups"] = groups.describe()
    if args.json:
        print_json(info)
        return 0
    print(f"{args.model}: IR {info['ir_version']}, opsets "
          + ", ".join(f"{d or 'ai.onnx'} {v}" for d, v in info["opsets"].items())
          + (f", producer {info['producer']}" if info["producer"] else ""))
    for kind in ("inputs", "outputs"):
        for v in info[kind]:
            print(f"  {kind[:-1]:6}  {v['name']}: {v['type']}")
    print(f"nodes: {info['nodes']}  ("
          + ", ".join(f"{op} {n}" for op, n in info["ops"].items()) + ")")
    total = sum(info["weight_bytes"].values())
    print(f"parameters: {info['params']:,}  weights: {human_bytes(total)} ("
          + ", ".join(f"{d} {human_bytes(b)}" for d, b in info["weight_bytes"].items()) + ")")
    print(f"MACs: {info['macs']:,} ({info['macs_note']})" if info["macs"] is not None
          else f"MACs: {info['macs_note']}")
    weights = info["weights"]
    if weights:
        print(_sparsity_line(weights))
    if args.layers and info["layers"]:
        rows = [(c["node"], c["op_type"], ir.format_shape(c["output_shape"]), f"{c['params']:,}",
                 "?" if c["macs"] is None else f"{c['macs']:,}") for c in info["layers"]]
        print(format_table(rows, ("layer", "op", "output", "params", "MACs"), right=(3, 4)))
    if args.layers and weights:
        rows = [(w["layer"], w["dtype"], f"{w['elements']:,}", f"{w['sparsity']:.1%}",
                 f"{w['dense_bytes']:,}", f"{w['csr_bytes']:,}",
                 f"{w['stored']} {w['stored_bytes']:,}") for w in weights]
        print(format_table(rows, ("layer", "weight", "elements", "zeros", "dense bytes",
                                  "CSR bytes", "stored as"), right=(2, 3, 4, 5)))
    if groups is not None:
        prunable = sum(1 for g in info["channel_groups"] if g["prunable"])
        print(f"channel groups: {len(info['channel_groups'])} ({prunable} prunable)")
        print(groups.table())
        if not prunable:
            from edgeopt.passes.prune import nothing_to_prune

            print(nothing_to_prune(groups))
    return 0


def _sparsity_line(weights: list[dict[str, Any]]) -> str:
    elements = sum(w["elements"] for w in weights)
    zeros = sum(w["zeros"] for w in weights)
    dense = sum(w["dense_bytes"] for w in weights)
    best = sum(min(w["dense_bytes"], w["csr_bytes"]) for w in weights)
    stored = sum(w["stored_bytes"] for w in weights)
    packed = sum(w["stored"] == "csr" for w in weights)
    return (f"layer weights: {len(weights)}, {zeros / max(elements, 1):.1%} zeros; "
            f"{human_bytes(dense)} dense, {human_bytes(stored)} as stored"
            f"{f' ({packed} CSR-packed)' if packed else ''}, {human_bytes(best)} with CSR "
            "where smaller")


def _pass_info(spec: Any) -> dict[str, Any]:
    options = []
    if spec.options is not None:
        import typing

        hints = typing.get_type_hints(spec.options)
        for f in dataclasses.fields(spec.options):
            default = f.default if f.default is not dataclasses.MISSING else (
                f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
            options.append({"name": f.name, "type": describe_type(hints[f.name]),
                            "default": default, "primary": f.name == spec.primary})
    return {"name": spec.name, "doc": spec.doc, "options": options,
            "provider": spec.provider or "edgeopt"}


def cmd_passes(args: argparse.Namespace, console: Console) -> int:
    """List the available passes (and with --plugins, who provided them)."""
    if args.plugins:
        found = plugins()
        if args.json:
            print_json(found)
        elif not found:
            print("no pass plugins installed (entry-point group 'edgeopt.passes')")
        for dist, names in found.items():
            print(f"{dist}: {', '.join(names)}")
        return 0
    passes = [_pass_info(s) for s in list_passes()]
    if args.json:
        print_json(passes)
        return 0
    for p in passes:
        origin = "" if p["provider"] == "edgeopt" else f"  [{p['provider']}]"
        print(f"{p['name']}{origin}\n    {p['doc']}")
        for o in p["options"]:
            mark = f" (as {p['name']}:VALUE)" if o["primary"] else ""
            print(f"    {o['name']}={o['type']}  default {o['default']!r}{mark}")
    return 0


def compare_outputs(ya: list[np.ndarray], yb: list[np.ndarray]) -> list[dict[str, Any]]:
    """Per-output max abs error, cosine similarity and (for [N, C] outputs) top-1 agreement."""
    rows = []
    for i, (a, b) in enumerate(zip(ya, yb, strict=True)):
        a64, b64 = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
        denom = np.linalg.norm(a64) * np.linalg.norm(b64)
        row = {"output": i, "max_abs_error": float(np.max(np.abs(a64 - b64))) if a.size else 0.0,
               "cosine": float(a64 @ b64 / denom) if denom else float(np.array_equal(a64, b64))}
        if a.ndim == 2 and a.shape[1] > 1:
            row["top1_agreement"] = float(np.mean(a.argmax(1) == b.argmax(1)))
        rows.append(row)
    return rows


def cmd_compare(args: argparse.Namespace, console: Console) -> int:
    """Compare two models' outputs and latency on the same inputs."""
    model_a, model_b = ir.load(args.a), ir.load(args.b)
    names_a = [v.name for v in model_a.graph.inputs if not v.is_initializer()]
    names_b = [v.name for v in model_b.graph.inputs if not v.is_initializer()]
    if names_a != names_b:
        raise EdgeoptError(f"the models have different inputs: {names_a} vs {names_b}")
    shapes = _input_shapes(args, model_a)
    calib = _load_calib(args, model_a, shapes)
    if calib is None:
        console.info("warning: no --calib given; comparing on 8 seeded random inputs")
    feeds = feeds_for(model_a, calib, batch=None, shapes=shapes)
    sa, sb = OrtModel(args.a), OrtModel(args.b)
    rows = compare_outputs(sa.run(feeds), sb.run(feeds))
    ms_a, ms_b = median_latencies_ms([sa, sb], feeds_for(model_a, calib, batch=1, shapes=shapes),
                                     args.runs)
    result = {"outputs": rows, "latency_ms": {"a": ms_a, "b": ms_b},
              "latency_ratio_b_over_a": ms_b / ms_a if ms_a else None}
    if args.json:
        print_json(result)
        return 0
    table = [(r["output"], f"{r['max_abs_error']:.3g}", f"{r['cosine']:.6f}",
              f"{r['top1_agreement']:.3f}" if "top1_agreement" in r else "-") for r in rows]
    print(format_table(table, ("output", "max |a-b|", "cosine", "top-1 agree")))
    print(f"latency (batch 1, median of {args.runs}): A {ms_a:.3f} ms, B {ms_b:.3f} ms, "
          f"B/A {ms_b / ms_a:.2f}")
    return 0


def _demo_files() -> tuple[str, str, str]:
    here = os.path.dirname(os.path.abspath(__file__))
    for root in (os.path.join(here, "..", "examples"), os.path.join(os.getcwd(), "examples")):
        files = [os.path.join(root, "digits", f)
                 for f in ("cnn.onnx", "digits_16x16.npz", "calib.npz")]
        if all(os.path.isfile(f) for f in files):
            return tuple(os.path.normpath(f) for f in files)  # type: ignore[return-value]
    raise EdgeoptError("the bundled example (examples/digits/cnn.onnx) was not found; run "
                       "'edgeopt demo' from a checkout of edgeopt")


def cmd_demo(args: argparse.Namespace, console: Console) -> int:
    """Optimize the bundled digits CNN, then check its accuracy in ONNX Runtime."""
    model_path, data_path, calib_path = _demo_files()
    with np.load(data_path, allow_pickle=False) as data:
        test_x, test_y = data["test_x"], data["test_y"]
    os.makedirs(args.output, exist_ok=True)
    out = output_path(model_path, args.output + os.sep)
    console.info(f"edgeopt demo: {model_path} -p {DEMO_PIPELINE} --calib {calib_path} -> {out}")
    model = ir.load(model_path)
    from edgeopt.passes.calib import load_calibration

    ctx = Context(calib=load_calibration(calib_path, model), progress=console.progress)
    report = PassManager(DEMO_PIPELINE, instruments=[_Announce(console)]).run(model, ctx)
    ir.save(model, out)
    acc = {}
    for label, path in (("original", model_path), ("optimized", out)):
        logits = OrtModel(path).run({"input": test_x})[0]
        acc[label] = float(np.mean(logits.argmax(1) == test_y))
    console.info("emitting C ...")
    c_dir = os.path.join(args.output, "cnn_c")
    from edgeopt.backends.c import emit_c

    c = emit_c(model, c_dir, "cnn", pipeline=DEMO_PIPELINE).report
    c_acc = _demo_run_c(c_dir, test_x, test_y, console)
    if c_acc is not None:
        acc["c"] = c_acc
    if args.json:
        print_json({**report.to_dict(), "output": out, "accuracy": acc, "c": c})
        return 0
    print(report.table())
    print(f"test accuracy: original {acc['original']:.4f}, optimized {acc['optimized']:.4f}"
          + (f", generated C {acc['c']:.4f}" if "c" in acc else "") + f" ({len(test_y)} images)")
    print(f"C library: {c['flash_bytes']:,} bytes of constants, arena {c['arena']['size']:,} "
          f"bytes (lower bound {c['arena']['lower_bound']:,}), {c['macs']:,} MACs")
    print(f"wrote {out} and {c_dir}/")
    return 0


def _demo_run_c(c_dir: str, x: np.ndarray, y: np.ndarray, console: Console) -> float | None:
    """Compile the demo's C library with the host compiler and run it on the test images."""
    import shutil
    import subprocess

    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        console.info("no C compiler found: the generated C is not run")
        return None
    console.info(f"compiling and running the generated C ({len(y)} images) ...")
    sources = sorted(os.path.join(c_dir, f) for f in os.listdir(c_dir) if f.endswith(".c"))
    exe = os.path.join(c_dir, "cnn_test")
    subprocess.run([cc, "-std=c99", "-O2", "-DCNN_TEST_MAIN", "-I", c_dir, *sources, "-o", exe,
                    "-lm"], check=True, capture_output=True)
    hits = 0
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = os.path.join(tmp, "in.bin"), os.path.join(tmp, "out.bin")
        for image, label in zip(x.astype(np.float32), y, strict=True):
            np.ascontiguousarray(image.transpose(1, 2, 0)).tofile(src)  # NHWC
            subprocess.run([exe, src, dst, "f32"], check=True)
            hits += int(np.fromfile(dst, np.float32).argmax() == label)
    os.unlink(exe)
    return hits / len(y)
