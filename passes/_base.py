"""What a pass is: a function over the IR with typed options and a :class:`PassResult`.

Passes work in place. A pass is any callable ``fn(model, ctx[, opts]) -> PassResult``
registered by name with :func:`~edgeopt.passes.register_pass`. Analyses that several passes
share are classes built as ``A(model, ctx, **params)`` and requested through
:meth:`Context.analysis`, which caches them until a pass modifies the model without
preserving them (MLIR's preserved-analyses scheme).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, TypeVar, Union

from edgeopt.ir import EdgeoptError

if TYPE_CHECKING:
    from edgeopt.ir import Model

__all__ = ["CalibrationError", "Context", "OptionError", "PassError", "PassResult", "Preserved"]

Preserved = Union[frozenset, Literal["all"]]  # noqa: UP007 - evaluated at runtime
A = TypeVar("A")


def _freeze(value: Any) -> Any:
    """A hashable stand-in for an analysis parameter (lists and sets become tuples)."""
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    if isinstance(value, (set, frozenset)):
        return tuple(sorted(_freeze(v) for v in value))
    if isinstance(value, dict):
        return tuple(sorted((k, _freeze(v)) for k, v in value.items()))
    return value


class PassError(EdgeoptError):
    """A pass failed; the message names the pass and the passes that ran before it."""


class CalibrationError(EdgeoptError):
    """Calibration data is missing, unreadable, or does not fit the model's inputs."""


class OptionError(EdgeoptError):
    """A pipeline spec or pass option is invalid; the message lists the valid choices."""


@dataclass(frozen=True)
class PassResult:
    """What a pass reports.

    Attributes:
        modified: whether the pass changed the model. ``False`` implies everything is
            preserved, and the pass manager checks that the model really did not change.
        stats: public counters (``{"nodes_removed": 3}``), aggregated in the pipeline report.
        preserved: analysis classes still valid after the pass, or ``"all"``.
    """

    modified: bool
    stats: dict[str, int | float] = field(default_factory=dict)
    preserved: Preserved = frozenset()


class Context:
    """State shared by the passes of one pipeline run.

    Args:
        calib: calibration data (a :class:`~edgeopt.passes.calib.CalibrationData`), or None.
        progress: called as ``progress(description, done, total)`` by long-running work.
        options: free-form settings for passes (e.g. ``{"measure": True}``); ``input_shapes``
            (input name -> shape, the CLI's ``--input-shape``) is what :meth:`input_shapes`
            returns first.
    """

    def __init__(self, calib: Any = None,
                 progress: Callable[[str, int, int], None] | None = None,
                 options: dict[str, Any] | None = None) -> None:
        self.calib = calib
        self.progress = progress or (lambda desc, done, total: None)
        self.options = dict(options or {})
        self.log = logging.getLogger("edgeopt.passes")
        self._analyses: dict[tuple[type, tuple], Any] = {}
        self._model: Model | None = None

    def input_shapes(self) -> dict[str, tuple[int, ...]] | None:
        """The input shapes to count costs at.

        ``options["input_shapes"]``, else one run of the calibration data
        (:meth:`CalibrationData.run_shapes`), else None.
        """
        shapes = self.options.get("input_shapes")
        if shapes:
            return {k: tuple(v) for k, v in shapes.items()}
        run_shapes = getattr(self.calib, "run_shapes", None)
        return run_shapes() if run_shapes is not None else None

    def bind(self, model: Model) -> None:
        """Attach the model that analyses are computed on (drops caches of another model)."""
        if model is not self._model:
            self._analyses.clear()
            self._model = model

    def analysis(self, cls: type[A], **params: Any) -> A:
        """The analysis ``cls`` with ``params`` on the bound model, computed once and cached.

        Raises:
            PassError: no model is bound (call :meth:`bind` or run through a PassManager).
        """
        if self._model is None:
            raise PassError("Context.analysis() needs a model: run passes through a PassManager")
        key = (cls, tuple(sorted((k, _freeze(v)) for k, v in params.items())))
        if key not in self._analyses:
            self._analyses[key] = cls(self._model, self, **params)
        return self._analyses[key]

    def cached(self) -> list[type]:
        """Analysis classes currently cached (for tests and reports)."""
        return [cls for cls, _ in self._analyses]

    def invalidate(self, preserved: Preserved | Iterable[type] = frozenset()) -> None:
        """Drop every cached analysis whose class is not in ``preserved``."""
        if preserved == "all":
            return
        keep = set(preserved)
        self._analyses = {k: v for k, v in self._analyses.items() if k[0] in keep}
