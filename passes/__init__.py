"""Passes over the IR: the infrastructure and the built-in passes.

A pass is a function ``fn(model, ctx[, opts]) -> PassResult`` registered by name::

    from edgeopt.passes import Context, PassResult, register_pass

    @register_pass("fold-identity")
    def fold_identity(model, ctx):
        \"\"\"Bypass Identity nodes.\"\"\"
        ...
        return PassResult(modified=True, stats={"identity_removed": 1})

Pipelines are run by :class:`PassManager` (``"prune:0.6,dce"`` spec strings).
"""

from __future__ import annotations

# Built-in passes register themselves on import.
from . import cse as _cse  # noqa: F401
from . import csr as _csr  # noqa: F401
from . import dce as _dce  # noqa: F401
from . import fold_affine as _fold_affine  # noqa: F401
from . import fold_bn as _fold_bn  # noqa: F401
from . import fold_constants as _fold_constants  # noqa: F401
from . import prune as _prune  # noqa: F401
from . import quant as _quant  # noqa: F401
from . import score as _score  # noqa: F401
from . import simplify as _simplify  # noqa: F401
from . import sparsify as _sparsify  # noqa: F401
from ._base import Context, OptionError, PassError, PassResult
from ._manager import (
    Instrument,
    ModelStats,
    PassManager,
    PipelineReport,
    StepReport,
    model_stats,
    run_pipeline,
)
from ._pipeline import Step, format_pipeline, parse_pipeline, resolve
from ._registry import PassSpec, get_pass, list_passes, plugins, register_pass, unregister_pass

__all__ = [
    "Context",
    "Instrument",
    "ModelStats",
    "OptionError",
    "PassError",
    "PassManager",
    "PassResult",
    "PassSpec",
    "PipelineReport",
    "Step",
    "StepReport",
    "format_pipeline",
    "get_pass",
    "list_passes",
    "model_stats",
    "parse_pipeline",
    "plugins",
    "register_pass",
    "resolve",
    "run_pipeline",
    "unregister_pass",
]
