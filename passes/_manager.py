"""Running pipelines: verification between passes, statistics, timing, and the report."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, Protocol

from edgeopt.ir import EdgeoptError, Model, VerificationError, verify

from ._base import Context, PassError, PassResult
from ._pipeline import Step, format_pipeline, parse_pipeline, resolve
from ._registry import PassSpec

__all__ = ["Instrument", "ModelStats", "PassManager", "PipelineReport", "StepReport",
           "model_stats", "run_pipeline"]

log = logging.getLogger(__name__)
VerifyMode = Literal["each", "end", "none"]


@dataclass(frozen=True)
class ModelStats:
    """Size of a model: nodes (recursive), parameters and weight bytes (all graphs)."""

    nodes: int
    params: int
    weight_bytes: int

    def delta(self, after: ModelStats) -> str:
        """``1,234 -> 987`` style summary used in tables."""
        return f"{self.nodes}->{after.nodes}"


def model_stats(model: Model) -> ModelStats:
    """Count nodes, parameters (elements of initializers) and weight bytes as stored.

    A CSR-packed or sparse weight counts its packed bytes.
    """
    nodes = sum(1 for _ in model.walk())
    params = weight = 0
    for graph in [model.graph, *model.graph.subgraphs()]:
        for v in graph.initializers.values():
            t = v.const_value
            params += t.size if hasattr(t, "size") else 0
            weight += getattr(t, "stored_nbytes", t.nbytes)
    return ModelStats(nodes, params, weight)


@dataclass
class StepReport:
    """What one pass did."""

    name: str
    spec: str
    modified: bool
    stats: dict[str, int | float]
    seconds: float
    before: ModelStats
    after: ModelStats


@dataclass
class PipelineReport:
    """What a pipeline did, pass by pass."""

    pipeline: str
    steps: list[StepReport] = field(default_factory=list)
    before: ModelStats | None = None
    after: ModelStats | None = None
    seconds: float = 0.0
    #: The model the pipeline ran on (set by ``edgeopt.optimize``; not serialized).
    model: Model | None = field(default=None, repr=False, compare=False)

    @property
    def modified(self) -> bool:
        """True if any pass changed the model."""
        return any(s.modified for s in self.steps)

    def stat(self, key: str) -> int | float:
        """A statistic summed over every pass that reported it."""
        return sum(s.stats.get(key, 0) for s in self.steps)

    def to_dict(self) -> dict[str, Any]:
        """Plain data (for ``--report report.json``)."""
        return {"pipeline": self.pipeline, "seconds": round(self.seconds, 6),
                "modified": self.modified,
                "before": asdict(self.before) if self.before else None,
                "after": asdict(self.after) if self.after else None,
                "steps": [{**asdict(s), "seconds": round(s.seconds, 6)} for s in self.steps]}

    def to_json(self) -> str:
        """The report as indented JSON."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=False)

    def table(self) -> str:
        """A human table: pass | changed | nodes | params | weight bytes | ms | stats."""
        rows = [("pass", "changed", "nodes", "params", "weights", "ms", "stats")]
        for s in self.steps:
            stats = ", ".join(f"{k}={_num(v)}" for k, v in s.stats.items() if v)
            rows.append((s.spec, "yes" if s.modified else "no",
                         f"{s.before.nodes}->{s.after.nodes}",
                         f"{s.before.params:,}->{s.after.params:,}",
                         _arrow(human_bytes, s.before.weight_bytes, s.after.weight_bytes),
                         f"{s.seconds * 1e3:.1f}", stats or "-"))
        if self.before and self.after:
            rows.append(("total", "yes" if self.modified else "no",
                         f"{self.before.nodes}->{self.after.nodes}",
                         f"{self.before.params:,}->{self.after.params:,}",
                         _arrow(human_bytes, self.before.weight_bytes,
                                self.after.weight_bytes),
                         f"{self.seconds * 1e3:.1f}", ""))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
                 for r in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        return "\n".join(lines)


def _arrow(fmt: Any, before: Any, after: Any) -> str:
    return f"{fmt(before)}->{fmt(after)}"


def _num(v: int | float) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def human_bytes(n: float) -> str:
    """``1536 -> '1.5 KiB'`` (reports and the command line share this)."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{int(n)} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


class Instrument(Protocol):
    """Hooks around every pass (TVM's PassInstrument); both methods are optional."""

    def before_pass(self, name: str, model: Model) -> None:
        """Called before a pass runs."""

    def after_pass(self, name: str, model: Model, result: PassResult) -> None:
        """Called after a pass returned."""


class PassManager:
    """Runs passes in order, checking the IR between them.

    Args:
        steps: a pipeline spec string, a list of :class:`Step`, or resolved
            ``(PassSpec, options)`` pairs.
        verify: ``"each"`` verifies after every pass that modified the model, ``"end"`` once
            at the end, ``"none"`` never.
        check_modified: raise if a pass changed the model but reported ``modified=False``.
        instruments: objects with ``before_pass``/``after_pass`` hooks.
        until_fixed: repeat the whole sequence until no pass modifies the model.
        max_iterations: bound on ``until_fixed`` rounds.
    """

    def __init__(self, steps: str | Sequence[Step] | Sequence[tuple[PassSpec, Any]],
                 verify: VerifyMode = "end", check_modified: bool = True,
                 instruments: Iterable[Instrument] = (), until_fixed: bool = False,
                 max_iterations: int = 10) -> None:
        if verify not in ("each", "end", "none"):
            raise ValueError(f"verify must be 'each', 'end' or 'none', not {verify!r}")
        if isinstance(steps, str):
            steps = parse_pipeline(steps)
        if steps and isinstance(steps[0], Step):
            steps = resolve(list(steps))  # type: ignore[arg-type]
        self.steps: list[tuple[PassSpec, Any]] = list(steps)  # type: ignore[arg-type]
        self.verify = verify
        self.check_modified = check_modified
        self.instruments = list(instruments)
        self.until_fixed = until_fixed
        self.max_iterations = max_iterations

    def describe(self) -> str:
        """The pipeline as a spec string."""
        return ",".join(_describe(spec, opts) for spec, opts in self.steps)

    def run(self, model: Model, ctx: Context | None = None) -> PipelineReport:
        """Run the pipeline on ``model`` in place.

        Raises:
            PassError: a pass failed, returned something else than a PassResult, lied about
                ``modified``, or left an invalid model; the message names it and the passes
                that ran before it.
        """
        ctx = ctx or Context()
        ctx.bind(model)
        report = PipelineReport(self.describe(), before=model_stats(model))
        start = time.perf_counter()
        ran: list[str] = []
        for _ in range(self.max_iterations if self.until_fixed else 1):
            changed = False
            for i, (spec, opts) in enumerate(self.steps):
                ctx.progress(f"pass {spec.name}", i, len(self.steps))
                step = self._run_one(spec, opts, model, ctx, ran)
                report.steps.append(step)
                changed |= step.modified
            ctx.progress("pipeline", len(self.steps), len(self.steps))
            if not changed:
                break
        if self.verify == "end" and report.modified:
            try:
                verify(model)
            except VerificationError as e:
                raise PassError(f"pipeline {report.pipeline!r} left an invalid model: {e}") \
                    from e
        report.after = model_stats(model)
        report.seconds = time.perf_counter() - start
        return report

    def _run_one(self, spec: PassSpec, opts: Any, model: Model, ctx: Context,
                 ran: list[str]) -> StepReport:
        label = _describe(spec, opts)
        earlier = f" after {', '.join(ran)}" if ran else " (first pass)"
        before, version = model_stats(model), model.version
        for inst in self.instruments:
            getattr(inst, "before_pass", lambda *a: None)(spec.name, model)
        t0 = time.perf_counter()
        try:
            result = spec.fn(model, ctx, opts) if spec.takes_options else spec.fn(model, ctx)
        except PassError:
            raise
        except EdgeoptError as e:
            raise PassError(f"pass {spec.name!r} failed{earlier}: {e}") from e
        except Exception as e:
            raise PassError(f"pass {spec.name!r} failed{earlier}: internal error "
                            f"{type(e).__name__}: {e}") from e
        seconds = time.perf_counter() - t0
        ran.append(spec.name)
        if not isinstance(result, PassResult):
            raise PassError(f"pass {spec.name!r} returned {type(result).__name__}, not a "
                            "PassResult")
        if not result.modified and self.check_modified and model.version != version:
            raise PassError(f"pass {spec.name!r} reported modified=False but changed the model")
        for inst in self.instruments:
            getattr(inst, "after_pass", lambda *a: None)(spec.name, model, result)
        if result.modified:
            preserved = result.preserved if result.preserved else spec.preserves
            ctx.invalidate(preserved)
            if self.verify == "each":
                try:
                    verify(model)
                except VerificationError as e:
                    raise PassError(f"pass {spec.name!r}{earlier} left an invalid model: {e}") \
                        from e
        log.debug("%s: modified=%s stats=%s (%.1f ms)", label, result.modified, result.stats,
                  seconds * 1e3)
        return StepReport(spec.name, label, result.modified, dict(result.stats), seconds, before,
                          model_stats(model))


def _describe(spec: PassSpec, opts: Any) -> str:
    if opts is None:
        return spec.name
    from dataclasses import fields

    defaults = type(opts)()
    changed = {f.name: getattr(opts, f.name) for f in fields(opts)
               if getattr(opts, f.name) != getattr(defaults, f.name)}
    arg = changed.pop(spec.primary, None) if spec.primary else None
    return format_pipeline([Step(spec.name, arg, changed)])


def run_pipeline(model: Model, spec: str, ctx: Context | None = None,
                 verify: VerifyMode = "end") -> PipelineReport:
    """Parse ``spec`` and run it on ``model`` (the engine behind ``edgeopt.optimize``)."""
    return PassManager(spec, verify=verify).run(model, ctx)
