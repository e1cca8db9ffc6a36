"""Wall time of ``simplify,prune:0.5`` with least-squares recovery on light ResNet-50.

Issue 4's "Pipeline time" check: pruning + recovery of ResNet-50 (the onnx package's
``light/light_resnet50.onnx``, 25M parameters) with 64 calibration samples must finish in
under 60 s on a 2-core machine. The model is loaded fresh, 64 seeded random samples are drawn
(:func:`~edgeopt.passes.calib.random_calibration`, seed 0), ``edgeopt.optimize(model,
"simplify,prune:RATIO[,OPTIONS]", calib=...)`` runs (``recover=auto`` is ``lsq`` with
calibration data), then the model is exported (pruned weights are lazy slices until then).

Printed: the wall time of each phase (load, calibration, every pass, export) and, inside
``prune``, inclusive times of its main parts, measured by wrapping the functions it calls
(the library is not changed): the activation statistics of the unpruned model, importance,
the ``apply`` rewrite, the activations fetched by the level-by-level recovery (unpruned and
pruned model apart), the least-squares refits (design moments and solves inside them) and
the BatchNormalization matching. Parts nest, so they do not add up to the total.

The light model's weights are constant fills, and ``simplify`` merges the identical ones
(11.5M parameters are left). ``--weights random`` gives the model seeded random weights first
(``simplify``, then ``tests/models.py``'s ``randomize_weights``; 25.5M parameters), as
``bench_prune_speed.py`` does for latency; that preparation counts as "load".
``--profile FILE`` also runs the pipeline under cProfile, writes the stats to FILE and prints
the top functions by cumulative time.

Usage::

    python tools/bench/bench_prune_time.py [--ratio 0.5] [--options importance=l1,...]
        [--samples 64] [--repeat 1] [--weights light|random] [--profile prof.out] [--top 40]
"""

from __future__ import annotations

import argparse
import cProfile
import functools
import gc
import importlib.util
import io
import os
import pstats
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import onnx

import edgeopt
from edgeopt import ir
from edgeopt.passes import _prune_recover as recover_module
from edgeopt.passes import prune as prune_module
from edgeopt.passes import recovery
from edgeopt.passes.analyses import activation_cache, activations
from edgeopt.passes.calib import random_calibration

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LIGHT_RESNET50 = os.path.join(os.path.dirname(onnx.__file__), "backend", "test", "data",
                              "light", "light_resnet50.onnx")


class Timers:
    """Inclusive wall time and call count per label."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)

    @contextmanager
    def time(self, label: str) -> Iterator[None]:
        """Add the time of the ``with`` body to ``label``."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[label] += time.perf_counter() - t0
            self.calls[label] += 1

    def table(self, total: float) -> str:
        """One line per label, in insertion order, with its share of ``total``."""
        lines = [f"{'part':<44} {'calls':>6} {'seconds':>9} {'share':>6}"]
        for label, s in self.seconds.items():
            lines.append(f"{label:<44} {self.calls[label]:>6} {s:>9.2f} "
                         f"{100 * s / total if total else 0:>5.1f}%")
        return "\n".join(lines)


@contextmanager
def instrumented(timers: Timers, pruned: ir.Model) -> Iterator[None]:
    """Wrap the functions ``prune`` calls with timers; restore them on exit.

    ``pruned`` is the model being optimized: activations fetched from it are the pruned
    model's, any other model's are the unpruned copy's.
    """
    Activations = activations.Activations
    patches: list[tuple[Any, str, Any]] = []

    def wrap(owner: Any, name: str, label: Callable[..., str] | str) -> None:
        original = getattr(owner, name, None)
        if original is None:  # renamed since: time the rest
            print(f"note: {getattr(owner, '__name__', owner)}.{name} not found, not timed",
                  file=sys.stderr)
            return

        @functools.wraps(original)
        def timed(*args: Any, **kwargs: Any) -> Any:
            with timers.time(label(*args, **kwargs) if callable(label) else label):
                return original(*args, **kwargs)

        patches.append((owner, name, original))
        setattr(owner, name, timed)

    def which(self: Any, *args: Any, **kwargs: Any) -> str:
        return "pruned" if self._model is pruned else "unpruned"

    wrap(Activations, "__init__", lambda self, model, ctx, values=None, **kw:
         "prune: Activations() statistics" if values else "prune: Activations() setup")
    wrap(Activations, "samples", lambda self, *a, **kw: f"prune: samples() of {which(self)} model")
    wrap(activation_cache.ActivationCache, "get",
         lambda self, *a, **kw: f"prune: ActivationCache.get() of {which(self)} model")
    wrap(prune_module, "_scores", "prune: importance")
    wrap(prune_module, "apply", "prune: apply (slice)")
    wrap(prune_module, "recover_sequential", "prune: recover_sequential")
    wrap(recover_module, "least_squares_refit", "prune:   least_squares_refit")
    wrap(recovery._Design, "moments", "prune:     _Design.moments")
    wrap(recovery, "_solve", "prune:     _solve")
    wrap(recover_module, "reestimate_batchnorm", "prune:   BN statistics (layer_output)")
    wrap(recover_module, "recover_install", "prune:   recover_install")
    wrap(prune_module, "dce", "prune: dce")
    try:
        yield
    finally:
        for owner, name, original in reversed(patches):
            setattr(owner, name, original)


def randomize(model: ir.Model, seed: int = 0) -> None:
    """``simplify``, then seeded random weights (``tests/models.py``), then ``dce``."""
    path = os.path.join(ROOT, "tests", "models.py")
    spec = importlib.util.spec_from_file_location("edgeopt_test_models", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    edgeopt.optimize(model, "simplify")
    module.randomize_weights(model, seed)
    edgeopt.optimize(model, "dce")


def run_once(spec: str, samples: int, weights: str, profile: cProfile.Profile | None
             ) -> dict[str, Any]:
    """Load, calibrate, optimize and export once; returns the phase times and timers."""
    gc.collect()
    phases: dict[str, float] = {}
    t0 = time.perf_counter()
    model = edgeopt.load(LIGHT_RESNET50)
    if weights == "random":
        randomize(model)
    phases["load"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    calib = random_calibration(model, samples, seed=0)
    phases["calibration data"] = time.perf_counter() - t0
    timers = Timers()
    t0 = time.perf_counter()
    with instrumented(timers, model):
        if profile is not None:
            profile.enable()
        report = edgeopt.optimize(model, spec, calib=calib)
        if profile is not None:
            profile.disable()
    phases["optimize (all passes)"] = time.perf_counter() - t0
    for step in report.steps:
        phases[f"  {step.spec}"] = step.seconds
    t0 = time.perf_counter()
    ir.to_proto(model)
    phases["export"] = time.perf_counter() - t0
    prune_stats = report.steps[-1].stats
    return {"phases": phases, "timers": timers, "stats": prune_stats}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--options", default="",
                        help="extra prune options, e.g. importance=l1,recover_samples=32")
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--weights", choices=("light", "random"), default="light")
    parser.add_argument("--profile", help="write cProfile stats here (first run only)")
    parser.add_argument("--top", type=int, default=40, help="profile lines to print")
    args = parser.parse_args(argv)
    if not os.path.exists(LIGHT_RESNET50):
        parser.error(f"{LIGHT_RESNET50} not found (it ships with the onnx package)")
    spec = f"simplify,prune:{args.ratio}" + (f",{args.options}" if args.options else "")
    totals = []
    for i in range(args.repeat):
        profile = cProfile.Profile() if args.profile and i == 0 else None
        res = run_once(spec, args.samples, args.weights, profile)
        total = res["phases"]["optimize (all passes)"]
        totals.append(total)
        print(f"run {i + 1}: light ResNet-50 ({args.weights} weights), {spec}, "
              f"{args.samples} random samples")
        for name, s in res["phases"].items():
            print(f"  {name:<42} {s:>9.2f} s")
        print("\n" + res["timers"].table(total) + "\n")
        keys = ("recovered_layers", "recon_err_drop_mean", "recon_err_after_mean",
                "params_before", "params_after")
        print("  " + ", ".join(f"{k} {res['stats'][k]:.4g}" for k in keys
                               if k in res["stats"]) + "\n")
        if profile is not None:
            profile.dump_stats(args.profile)
            out = io.StringIO()
            pstats.Stats(profile, stream=out).sort_stats("cumulative").print_stats(args.top)
            print(out.getvalue())
    if args.repeat > 1:
        print(f"optimize: min {min(totals):.2f} s, max {max(totals):.2f} s over {args.repeat} runs")
    print(f"load average at end: {', '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
