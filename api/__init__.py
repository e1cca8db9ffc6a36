"""edgeopt: shrink ONNX models onto edge devices and microcontrollers.

The public Python API::

    import edgeopt
    model = edgeopt.load("model.onnx")      # safe for untrusted files; external data mmapped
    edgeopt.verify(model)                   # IR invariants + ONNX schema checks
    report = edgeopt.optimize(model, "simplify,dce")   # runs passes in place
    print(report.table())
    edgeopt.save(model, "out/model.onnx")   # atomic; never overwrites the input
    edgeopt.emit_c(model, "out/c", prefix="net")   # C99 library for a microcontroller

The IR itself is :mod:`edgeopt.ir`; passes and the pass manager are :mod:`edgeopt.passes`.
"""

from __future__ import annotations

from typing import Any

from edgeopt import ir
from edgeopt.ir import (
    EdgeoptError,
    ModelLoadError,
    VerificationError,
    infer_shapes,
    load,
    save,
    static_shapes,
    verify,
)

__version__ = "0.1.0"


def optimize(model: ir.Model, spec: str, calib: Any = None, *, verify: str = "end",
             copy: bool = False, progress: Any = None) -> Any:
    """Run a pipeline of passes on a model.

    Args:
        model: the model; changed in place unless ``copy`` is set.
        spec: a pipeline spec such as ``"simplify,dce"`` (or ``"@pipeline.toml"``).
        calib: calibration data: a :class:`~edgeopt.passes.calib.CalibrationData`, or a
            path/``"random"`` that is loaded against the model's inputs.
        verify: ``"each"``, ``"end"`` (default) or ``"none"``.
        copy: work on ``model.clone()`` and leave ``model`` untouched (the optimized
            model is then ``report.model``).
        progress: ``progress(description, done, total)`` callback for long work.

    Returns:
        The :class:`~edgeopt.passes.PipelineReport`; ``report.model`` is the optimized model.

    Raises:
        EdgeoptError: a bad spec (``OptionError``) or a failing pass (``PassError``).
    """
    from edgeopt.passes import Context, PassManager

    target = model.clone() if copy else model
    if isinstance(calib, str):
        from edgeopt.passes.calib import load_calibration

        calib = load_calibration(calib, target)
    report = PassManager(spec, verify=verify).run(target, Context(calib=calib, progress=progress))
    report.model = target
    return report

def emit_c(model: ir.Model, out_dir: str | None = None, prefix: str = "model",
           **options: Any) -> Any:
    """Generate the C library of a model (see :func:`edgeopt.backends.c.emit_c`).

    Returns the :class:`~edgeopt.backends.c.EmitResult` (``files`` and ``report``); writes the
    files into ``out_dir`` when given. Options: ``mode``, ``budget``, ``alignment``,
    ``pipeline``, ``source_sha256``.
    """
    from edgeopt.backends.c import emit_c as _emit_c

    return _emit_c(model, out_dir, prefix, **options)


__all__ = [
    "EdgeoptError",
    "ModelLoadError",
    "VerificationError",
    "__version__",
    "emit_c",
    "infer_shapes",
    "ir",
    "load",
    "optimize",
    "save",
    "static_shapes",
    "verify",
]
