"""Arena planners compared: naive, TFLite Micro's greedy-by-size, edgeopt's best, lower bound.

Synthetic int8 schedules shaped like the networks the C backend targets (a plain conv chain,
ResNet blocks with in-place residual adds, MobileNetV2 inverted residuals, Inception-style
concat branches, a U-Net with long concat skips, random DAGs), planned with
:mod:`edgeopt.backends.c.memory`. Prints a markdown table; ``--random N`` adds the
distribution of best / lower bound over ``N`` seeds per family.

Usage::

    python tools/bench/bench_arena.py [--random 50] [--json out.json]

For real models, build :class:`~edgeopt.backends.c.memory.Buffer` lists from the emitter's
schedule and call :func:`compare` (one row) and :func:`table` (markdown).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

from edgeopt.backends.c.memory import Buffer, greedy_by_size, liveness, plan

COLUMNS = ("case", "buffers", "naive", "tflm", "greedy", "best", "lower", "best/lower",
           "greedy/lower", "strategy", "ms")


def compare(buffers: Sequence[Buffer], case: str = "", alignment: int = 16) -> dict[str, Any]:
    """One row: arena bytes of every planner on ``buffers``.

    ``tflm`` is greedy-by-size without in-place reuse (TFLite Micro's planner sees no aliases),
    ``greedy`` the same with this schedule's aliases, ``best`` edgeopt's :func:`plan`.
    """
    t0 = time.perf_counter()
    best = plan(buffers, alignment)
    ms = (time.perf_counter() - t0) * 1e3
    greedy = greedy_by_size(buffers, alignment)
    tflm = greedy_by_size([replace(b, inplace_of=None) for b in buffers], alignment)
    lower = max(best.lower_bound, 1)
    return {"case": case, "buffers": len(buffers), "naive": best.naive_size,
            "tflm": tflm.arena_size, "greedy": greedy.arena_size, "best": best.arena_size,
            "lower": best.lower_bound, "best/lower": round(best.arena_size / lower, 4),
            "greedy/lower": round(greedy.arena_size / lower, 4), "strategy": best.strategy,
            "ms": round(ms, 1)}


def table(rows: Sequence[dict[str, Any]], columns: Sequence[str] = COLUMNS) -> str:
    """A markdown table of ``rows`` (byte counts with thousands separators)."""
    def cell(v: Any) -> str:
        return f"{v:,}" if isinstance(v, int) else f"{v:.3f}" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r[c]) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


class Schedule:
    """A schedule under construction: int8 HWC activations, one op per step."""

    def __init__(self, rng: random.Random, shape: tuple[int, int, int]):
        self.rng = rng
        self.steps: list[tuple[list[str], list[str]]] = []
        self.sizes: dict[str, int] = {}
        self.shapes: dict[str, tuple[int, int, int]] = {}
        self.inplace: dict[str, str] = {}
        self.input = self._new(shape)

    def _new(self, shape: tuple[int, int, int]) -> str:
        name = f"t{len(self.sizes)}"
        self.sizes[name], self.shapes[name] = shape[0] * shape[1] * shape[2], shape
        return name

    def op(self, inputs: Sequence[str], shape: tuple[int, int, int] | None = None,
           inplace: bool = False) -> str:
        """One step reading ``inputs``; elementwise (``inplace``) ops keep the first's shape."""
        out = self._new(shape or self.shapes[inputs[0]])
        self.steps.append(([out], list(inputs)))
        if inplace:
            self.inplace[out] = inputs[0]
        return out

    def conv(self, x: str, c: int, stride: int = 1, relu: bool = True) -> str:
        h, w, _ = self.shapes[x]
        y = self.op([x], (-(-h // stride), -(-w // stride), c))
        return self.op([y], inplace=True) if relu else y

    def buffers(self, *outputs: str) -> list[Buffer]:
        return liveness(self.steps, self.sizes, outputs, self.inplace)


def chain(rng: random.Random) -> list[Buffer]:
    s = Schedule(rng, (32, 32, 3))
    x = s.input
    for _ in range(rng.randint(6, 14)):
        x = s.conv(x, rng.choice([8, 16, 24, 32, 64]), rng.choice([1, 1, 2]), rng.random() < 0.7)
    return s.buffers(s.op([x], (1, 1, 10)))


def resnet(rng: random.Random) -> list[Buffer]:
    s = Schedule(rng, (32, 32, 3))
    x, c = s.conv(s.input, 16), 16
    for stage in range(3):
        for block in range(rng.randint(1, 3)):
            down = stage > 0 and block == 0
            c2 = c * 2 if down else c
            y = s.conv(s.conv(x, c2, 2 if down else 1), c2, relu=False)
            skip = s.conv(x, c2, 2, relu=False) if down else x
            x, c = s.op([s.op([y, skip], inplace=True)], inplace=True), c2
    return s.buffers(s.op([s.op([x], (1, 1, c))], (1, 1, 10)))


def mobilenetv2(rng: random.Random) -> list[Buffer]:
    s = Schedule(rng, (48, 48, 3))
    x, c = s.conv(s.input, 16, 2), 16
    for c2, stride in [(16, 1), (24, 2), (24, 1), (32, 2), (32, 1), (64, 2), (64, 1)]:
        e = s.conv(x, c * rng.choice([4, 6]))
        d = s.conv(e, s.shapes[e][2], stride)  # depthwise
        y = s.conv(d, c2, relu=False)
        x = s.op([y, x], inplace=True) if stride == 1 and c2 == c else y
        c = c2
    return s.buffers(s.op([x], (1, 1, 10)))


def inception(rng: random.Random) -> list[Buffer]:
    s = Schedule(rng, (28, 28, 3))
    x = s.conv(s.input, 32)
    for _ in range(rng.randint(2, 4)):
        branches = []
        for _ in range(rng.randint(2, 4)):
            b = s.conv(x, rng.choice([8, 16, 32]))
            if rng.random() < 0.5:
                b = s.conv(b, rng.choice([8, 16, 32]))
            branches.append(b)
        h, w, _ = s.shapes[x]
        x = s.op(branches, (h, w, sum(s.shapes[b][2] for b in branches)))
    return s.buffers(s.op([x], (1, 1, 10)))


def unet(rng: random.Random) -> list[Buffer]:
    s = Schedule(rng, (64, 64, 1))
    x, skips, c = s.input, [], 8
    depth = rng.randint(2, 4)
    for _ in range(depth):
        x = s.conv(s.conv(x, c), c)
        skips.append(x)
        h, w, _ = s.shapes[x]
        x, c = s.op([x], (h // 2, w // 2, c)), c * 2
    x = s.conv(x, c)
    for skip in reversed(skips):
        h, w, cs = s.shapes[skip]
        up = s.op([x], (h, w, s.shapes[x][2]))
        x = s.conv(s.op([up, skip], (h, w, s.shapes[x][2] + cs)), cs)
    return s.buffers(s.op([x], (64, 64, 1)))


def random_dag(rng: random.Random) -> list[Buffer]:
    s = Schedule(rng, (1, 1, rng.randint(16, 4096)))
    live = [s.input]
    for _ in range(rng.randint(10, 40)):
        k = rng.choice([1, 1, 1, 2, 2, 3])
        ins = rng.sample(live[-6:], min(k, len(live[-6:])))
        out = s.op(ins, (1, 1, rng.randint(0, 4096)), inplace=k == 1 and rng.random() < 0.3)
        live.append(out)
    return s.buffers(live[-1])


FAMILIES: dict[str, Callable[[random.Random], list[Buffer]]] = {
    "chain": chain, "resnet": resnet, "mobilenetv2": mobilenetv2, "inception": inception,
    "unet": unet, "random-dag": random_dag,
}


def distribution(n: int) -> list[dict[str, Any]]:
    """Per family over ``n`` seeds: how often best hits the bound, and best/greedy ratios."""
    rows = []
    for family, make in FAMILIES.items():
        rs = [compare(make(random.Random(seed))) for seed in range(n)]
        ratios = [r["best/lower"] for r in rs]
        rows.append({"family": family, "seeds": n,
                     "best=lower": sum(r["best"] == r["lower"] for r in rs),
                     "best<greedy": sum(r["best"] < r["greedy"] for r in rs),
                     "best<=tflm": sum(r["best"] <= r["tflm"] for r in rs),
                     "median best/lower": statistics.median(ratios),
                     "max best/lower": max(ratios),
                     "max greedy/lower": max(r["greedy/lower"] for r in rs),
                     "max ms": max(r["ms"] for r in rs)})
    return rows


def model_buffers(path: str) -> list[Buffer]:
    """The arena buffers of an ONNX model's C schedule (the plain API: I/O in caller memory)."""
    from edgeopt import ir
    from edgeopt.backends.c import _prepare
    from edgeopt.backends.c.emit import liveness
    from edgeopt.backends.c.lower import lower
    from edgeopt.backends.c.rules import register_all

    return liveness(lower(_prepare(ir.load(path)), "m", register_all()), False)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--random", type=int, default=0, help="seeds per family for the distribution")
    ap.add_argument("--json", help="also write the rows here")
    ap.add_argument("--onnx", nargs="*", default=[], metavar="MODEL",
                    help="also plan the arena of these ONNX models as --emit c lowers them "
                         "(float, batch 1)")
    args = ap.parse_args(argv)
    rows = [compare(make(random.Random(0)), name) for name, make in FAMILIES.items()]
    rows += [compare(model_buffers(path), os.path.basename(path)) for path in args.onnx]
    print(table(rows))
    out: dict[str, Any] = {"cases": rows}
    if args.random:
        dist = distribution(args.random)
        print()
        print(table(dist, list(dist[0])))
        out["distribution"] = dist
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
