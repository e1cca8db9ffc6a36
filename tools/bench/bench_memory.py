"""Peak memory of ``edgeopt.load`` + ``verify`` + ``save`` on a model with external-data weights.

The benchmark writes a chain of ``MatMul``/``Add`` nodes whose float32 weights (about ``--gb``
GiB in total) live in one external data file, generated in chunks so that the generator stays
small. A fresh Python process then loads the model, verifies it and saves it with external data
to a new path, and reports its peak resident set size. The target is a peak RSS below 1.5x the
weight bytes: weights are memory-mapped on load and streamed on save, never held twice.

Usage::

    python tools/bench/bench_memory.py --gb 1.0 [--json result.json] [--dir /big/tmp]
    python tools/bench/bench_memory.py --gb 0.25 --inline   # weights inside the .onnx file

Run by file path or as ``python -m tools.bench.bench_memory`` from the checkout.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any

import numpy as np

CHUNK_ELEMS = 1 << 22  # 16 MiB of float32 per generator write
TARGET_RATIO = 1.5


def generate(folder: str, total_bytes: int, n_weights: int = 8, seed: int = 0,
             inline: bool = False) -> dict[str, Any]:
    """Write ``model.onnx`` + ``model.onnx.data`` with ``n_weights`` square float32 weights.

    The data file is written chunk by chunk from a seeded generator, so this function never
    holds more than one chunk (16 MiB) of weights. With ``inline`` the weights go into the
    model file instead (and the generator holds them: protobuf serializes whole messages).

    Returns:
        ``{"model": path, "weight_bytes": int, "dim": K, "n_weights": n}``.
    """
    from onnx import TensorProto, helper

    dim = max(1, math.isqrt(total_bytes // (4 * n_weights)))
    model_path = os.path.join(folder, "model.onnx")
    location = "model.onnx.data"
    rng = np.random.default_rng(seed)
    scale = np.float32(1.0 / math.sqrt(dim))  # keeps activations O(1) along the chain
    inits, nodes, offset = [], [], 0
    with open(os.path.join(folder, location), "wb") as f:
        for i in range(n_weights):
            t = TensorProto(name=f"W{i}", data_type=TensorProto.FLOAT, dims=[dim, dim])
            buf = bytearray() if inline else None
            left = dim * dim
            while left:
                n = min(left, CHUNK_ELEMS)
                chunk = (rng.standard_normal(n, dtype=np.float32) * scale).tobytes()
                if buf is not None:
                    buf += chunk
                else:
                    f.write(chunk)
                left -= n
            if buf is not None:
                t.raw_data = bytes(buf)
                del buf
            if not inline:
                t.data_location = TensorProto.EXTERNAL
                for key, val in (("location", location), ("offset", str(offset)),
                                 ("length", str(dim * dim * 4))):
                    t.external_data.add(key=key, value=val)
            offset += dim * dim * 4
            inits.append(t)
            bias = rng.standard_normal(dim, dtype=np.float32)
            inits.append(helper.make_tensor(f"B{i}", TensorProto.FLOAT, [dim], bias))
            src = "x" if i == 0 else f"a{i - 1}"
            nodes.append(helper.make_node("MatMul", [src, f"W{i}"], [f"m{i}"]))
            nodes.append(helper.make_node("Add", [f"m{i}", f"B{i}"], [f"a{i}"]))
    nodes[-1].output[0] = "y"
    graph = helper.make_graph(
        nodes, "bench_memory",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, dim])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, dim])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    with open(model_path, "wb") as f:
        f.write(model.SerializeToString())
    if inline:
        os.unlink(os.path.join(folder, location))
    return {"model": model_path, "weight_bytes": offset, "dim": dim, "n_weights": n_weights}


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def _reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0), so the next phase has its own peak."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def child(model_path: str, out_path: str, external: bool) -> dict[str, Any]:
    """Load, verify and save in this process; return timings and memory figures (bytes)."""
    import edgeopt

    baseline = _status_kib("VmRSS") * 1024  # interpreter + numpy + onnx + edgeopt imported
    t0 = time.perf_counter()
    model = edgeopt.load(model_path)
    t1 = time.perf_counter()
    edgeopt.verify(model)
    t2 = time.perf_counter()
    load_peak = _status_kib("VmHWM") * 1024
    reset = _reset_peak()
    edgeopt.save(model, out_path, external_data=external)
    t3 = time.perf_counter()
    save_peak = _status_kib("VmHWM") * 1024
    return {"baseline_rss": baseline, "peak_rss": max(load_peak, save_peak),
            "load_peak_rss": load_peak, "save_peak_rss": save_peak if reset else None,
            "load_s": t1 - t0, "verify_s": t2 - t1, "save_s": t3 - t2}


def measure(model_path: str, out_path: str, external: bool = True) -> dict[str, Any]:
    """Run :func:`child` in a fresh interpreter, so its peak RSS covers only this job."""
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", model_path,
                           out_path, "external" if external else "inline"],
                          capture_output=True, text=True, check=False)
    if proc.returncode:
        raise RuntimeError(f"benchmark child failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _digests(model_path: str) -> dict[str, str]:
    """sha256 of every external tensor of a model, read in chunks."""
    import onnx

    proto = onnx.load(model_path, load_external_data=False)
    folder = os.path.dirname(model_path)
    out = {}
    for t in proto.graph.initializer:
        info = {e.key: e.value for e in t.external_data}
        h = hashlib.sha256()
        if t.data_location == onnx.TensorProto.EXTERNAL:
            with open(os.path.join(folder, info["location"]), "rb") as f:
                f.seek(int(info.get("offset", 0)))
                left = int(info["length"])
                while left:
                    block = f.read(min(left, 1 << 24))
                    h.update(block)
                    left -= len(block)
        elif t.HasField("raw_data"):
            h.update(t.raw_data)
        else:
            h.update(onnx.numpy_helper.to_array(t).tobytes())
        out[t.name] = h.hexdigest()
    return out


def run(gb: float, n_weights: int = 8, folder: str | None = None, check: bool = True,
        inline: bool = False) -> dict[str, Any]:
    """Generate a model of ``gb`` GiB of weights, measure load+verify+save, clean up.

    Args:
        gb: GiB of weights.
        n_weights: how many square weights they are split into.
        folder: parent of the temporary folder (default: the system's temp folder).
        check: compare every saved tensor with the original, byte for byte.
        inline: weights inside the model file, saved inline (default: external data).

    Returns:
        The figures: ``weight_bytes``, ``peak_rss``, ``baseline_rss``, ``ratio`` (peak RSS /
        weight bytes), ``growth_ratio`` ((peak - baseline) / weight bytes), the peaks of the
        load and save phases (``load_peak_rss``, ``save_peak_rss``), timings, and
        ``identical`` (every saved tensor has the same bytes as the original).
    """
    tmp = tempfile.mkdtemp(prefix="edgeopt-bench-", dir=folder)
    try:
        src, dst = os.path.join(tmp, "src"), os.path.join(tmp, "dst")
        os.mkdir(src)
        os.mkdir(dst)
        t0 = time.perf_counter()
        info = generate(src, int(gb * (1 << 30)), n_weights, inline=inline)
        gen_s = time.perf_counter() - t0
        out_path = os.path.join(dst, "model.onnx")
        figures = measure(info["model"], out_path, external=not inline)
        if check:
            figures["identical"] = _digests(info["model"]) == _digests(out_path)
        weight_bytes = info["weight_bytes"]
        figures.update(
            weight_bytes=weight_bytes, dim=info["dim"], n_weights=n_weights, inline=inline,
            generate_s=gen_s, ratio=figures["peak_rss"] / weight_bytes,
            growth_ratio=(figures["peak_rss"] - figures["baseline_rss"]) / weight_bytes)
        return figures
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _report(fig: dict[str, Any]) -> str:
    mib = 1 << 20
    save_peak = fig["save_peak_rss"]
    return "\n".join([
        f"weights:      {fig['weight_bytes'] / mib:9.1f} MiB ({fig['n_weights']} x "
        f"[{fig['dim']},{fig['dim']}] float32, {'inline' if fig['inline'] else 'external data'})",
        f"baseline RSS: {fig['baseline_rss'] / mib:9.1f} MiB (after imports)",
        f"peak RSS:     {fig['peak_rss'] / mib:9.1f} MiB (load+verify "
        f"{fig['load_peak_rss'] / mib:.1f} MiB, save "
        f"{'n/a' if save_peak is None else f'{save_peak / mib:.1f} MiB'})",
        f"ratio:        {fig['ratio']:9.3f} x weight bytes (target < {TARGET_RATIO}); "
        f"growth over baseline {fig['growth_ratio']:.3f} x",
        f"load {fig['load_s']:.3f} s, verify {fig['verify_s']:.3f} s, "
        f"save {fig['save_s']:.3f} s (generate {fig['generate_s']:.1f} s)",
        f"saved weights identical: {fig.get('identical', 'not checked')}",
    ])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gb", type=float, default=1.0, help="GiB of weights (default 1.0)")
    parser.add_argument("--weights", type=int, default=8, help="number of large weights")
    parser.add_argument("--json", help="also write the figures to this JSON file")
    parser.add_argument("--dir", help="parent folder of the temporary model folder")
    parser.add_argument("--inline", action="store_true",
                        help="weights inside the model file, saved inline")
    parser.add_argument("--no-check", action="store_true", help="skip the byte comparison")
    parser.add_argument("--child", nargs=3, metavar=("MODEL", "OUT", "MODE"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        model, out, mode = args.child
        print(json.dumps(child(model, out, external=mode == "external")))
        return 0
    fig = run(args.gb, args.weights, args.dir, check=not args.no_check, inline=args.inline)
    print(_report(fig))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(fig, f, indent=2, sort_keys=True)
    return 0 if fig["ratio"] < TARGET_RATIO and fig.get("identical", True) else 1


if __name__ == "__main__":
    sys.exit(main())
