"""Output paths and atomic writes for the command line."""

from __future__ import annotations

import contextlib
import os
import tempfile

from edgeopt.ir import EdgeoptError

__all__ = ["output_path", "write_text_atomic"]


def write_text_atomic(path: str, text: str) -> None:
    """Write a text file through a temporary file and a rename."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise EdgeoptError(f"{path}: folder does not exist")
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", dir=folder)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def output_path(model_path: str, out: str | None, suffix: str = ".opt.onnx") -> str:
    """Where to write the optimized model.

    No ``out``: ``<stem>.opt.onnx`` beside the input. ``out`` naming a folder (existing, or
    written with a trailing slash, created on demand): ``<folder>/<stem>.opt.onnx``.
    Otherwise ``out`` itself. Never the input file.

    Raises:
        EdgeoptError: the result would be the input file.
    """
    stem = os.path.splitext(os.path.basename(model_path))[0]
    if out is None:
        path = os.path.join(os.path.dirname(os.path.abspath(model_path)), stem + suffix)
    elif out.endswith(("/", os.sep)) or os.path.isdir(out):
        os.makedirs(out, exist_ok=True)
        path = os.path.join(out, stem + suffix)
    else:
        path = out
    if os.path.abspath(path) == os.path.abspath(model_path) or (
            os.path.exists(path) and os.path.samefile(path, model_path)):
        raise EdgeoptError(f"{path}: output would overwrite the input model; choose another -o")
    return path
