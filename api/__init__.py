"""edgeopt: shrink ONNX models onto edge devices and microcontrollers.

The public Python API::

    import edgeopt
    model = edgeopt.load("model.onnx")      # safe for untrusted files; external data mmapped
    edgeopt.verify(model)                   # IR invariants + ONNX schema checks
    edgeopt.save(model, "out/model.onnx")   # atomic; never overwrites the input

The IR itself is :mod:`edgeopt.ir`.
"""

from __future__ import annotations

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

__all__ = [
    "EdgeoptError",
    "ModelLoadError",
    "VerificationError",
    "__version__",
    "infer_shapes",
    "ir",
    "load",
    "save",
    "static_shapes",
    "verify",
]
