"""ONNX Runtime for the command line: sessions, input feeds, and latency measurement.

``edgeopt compare`` and ``edgeopt MODEL --measure`` share this code, so both report latency
the same way: CPU execution provider, a fixed number of intra-op threads, a few warm-up runs,
then the median of timed runs. The models' runs are interleaved so that a change in machine
load affects them alike.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from edgeopt import ir
from edgeopt.ir import EdgeoptError

__all__ = ["THREADS", "WARMUP", "OrtModel", "feeds_for", "median_latencies_ms"]

#: Intra-op threads of every session (a small edge CPU; also keeps timings stable).
THREADS = 2
#: Untimed runs before timing starts (allocations, kernel selection, caches).
WARMUP = 3


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


class OrtModel:
    """A model loaded in ONNX Runtime (CPU) whose failures are one-line user errors.

    Args:
        path: the ``.onnx`` file.
        label: how messages name the model (default: ``path``).
        threads: intra-op threads.

    Raises:
        EdgeoptError: edgeopt's loader rejects the file, or ONNX Runtime cannot load it.
    """

    def __init__(self, path: str, label: str | None = None, threads: int = THREADS) -> None:
        import onnxruntime as ort

        self.label = label or path
        ir.load(path)  # the safety checks run before ONNX Runtime parses the file
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
        except Exception as e:
            raise EdgeoptError(f"{self.label}: ONNX Runtime cannot load it: "
                               f"{_first_line(e)}") from None

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """All outputs for ``feeds``.

        Raises:
            EdgeoptError: ONNX Runtime fails to run the model on these inputs.
        """
        try:
            return self.session.run(None, feeds)
        except Exception as e:
            raise EdgeoptError(f"{self.label}: ONNX Runtime cannot run it: "
                               f"{_first_line(e)}") from None


def feeds_for(model: ir.Model, calib: Any, batch: int | None, seed: int = 0,
              shapes: Mapping[str, Sequence[int]] | None = None) -> dict:
    """Inputs for ORT runs.

    Args:
        model: the model whose graph inputs are fed.
        calib: calibration data (its first ``batch`` samples are used), or None for seeded
            standard-normal inputs.
        batch: samples per run (a static batch dim overrides it); None takes every
            calibration sample (or 8 random ones).
        seed: seed of the random inputs.
        shapes: shapes of random inputs (``--input-shape``), needed for symbolic dims
            besides the batch.

    Raises:
        EdgeoptError: an input without a static type, or with symbolic dims besides the
            batch that ``shapes`` does not give, and no calibration data.
    """
    from edgeopt.passes.calib import synthetic_dims

    if calib is not None:
        return dict(next(iter(calib.batches(batch or calib.num_samples))))
    rng = np.random.default_rng(seed)
    feeds = {}
    for v in model.graph.inputs:
        if v.is_initializer():
            continue
        if v.shape is None or v.dtype is None:
            raise EdgeoptError(f"input {v.name!r} has no static type; pass --calib")
        shape = synthetic_dims(v, shapes)
        if shape and not isinstance(v.shape[0], int):
            shape[0] = batch or 8  # a symbolic batch axis
        try:
            dtype = np.dtype(v.dtype.numpy())
        except TypeError:
            raise EdgeoptError(f"input {v.name!r} of type {v.dtype.name.lower()} cannot be "
                               "synthesized; pass --calib") from None
        feeds[v.name] = _random(rng, dtype, shape)
    return feeds


def _random(rng: np.random.Generator, dtype: np.dtype, shape: list[int]) -> np.ndarray:
    if dtype.kind == "b":
        return rng.integers(0, 2, shape).astype(np.bool_)
    if dtype.kind in "iu":  # small non-negative values are valid indices and token ids
        return rng.integers(0, 10, shape).astype(dtype)
    return rng.standard_normal(shape).astype(dtype)


def median_latencies_ms(models: Sequence[OrtModel], feeds: dict, runs: int,
                        warmup: int = WARMUP) -> list[float]:
    """Median wall time (ms) of one run of each model on ``feeds``, runs interleaved.

    Raises:
        EdgeoptError: a model fails to run.
    """
    for _ in range(warmup):
        for m in models:
            m.run(feeds)
    times: list[list[float]] = [[] for _ in models]
    for _ in range(max(1, runs)):
        for m, t in zip(models, times, strict=True):
            t0 = time.perf_counter()
            m.session.run(None, feeds)  # the warm-up runs already proved it works
            t.append(time.perf_counter() - t0)
    return [float(np.median(t) * 1e3) for t in times]
