"""``OrtModel``: a model exported once for ONNX Runtime, and sessions that expose its values.

The analyses that run a model on calibration data (:class:`~.activations.Activations`,
:class:`~.activation_cache.ActivationCache`, bias correction) export it here and add what
they measure: extra graph outputs (:meth:`OrtModel.session`) or small reductions computed in
the graph (:meth:`OrtModel.light_session`, see :mod:`.activations`).

Weights are not copied into the export: initializers of at least 4 KiB are written as
data-less stubs marked as external data and handed to ONNX Runtime from memory with
``SessionOptions.add_external_initializers`` (the ONNX Runtime API that replaces external
initializers by given tensors). A 100 MB model otherwise costs a proto copy and its
serialization for every session (light ResNet-50: 0.12-0.16 s -> 0.03-0.04 s per
session). Models whose weights pass ``inline_limit`` bytes are written to a temporary
folder with external data instead, and sessions load them from there.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from edgeopt import ir
from edgeopt.ir import DataType, EdgeoptError, Model

from .value_stats import Window

__all__ = ["OrtModel", "run_session"]

#: What the graph computes for :attr:`Activations.tap_means`: per value, each window with
#: its tap matrices (:meth:`Window.matrices`) and output positions.
_Taps = Mapping[str, Sequence[tuple[Window, list[np.ndarray], int]]]

#: Where the stubs of in-memory weights point (never read: the data is given to the session).
IN_MEMORY = "edgeopt-in-memory"

#: Tensor types whose numpy arrays ONNX Runtime takes as they are.
_NUMPY_TYPES = frozenset({
    DataType.FLOAT, DataType.FLOAT16, DataType.DOUBLE, DataType.INT8, DataType.UINT8,
    DataType.INT16, DataType.UINT16, DataType.INT32, DataType.UINT32, DataType.INT64,
    DataType.UINT64, DataType.BOOL})


class OrtModel:
    """The model exported once for ONNX Runtime; builds sessions that expose chosen values."""

    def __init__(self, model: Model, inline_limit: int) -> None:
        import onnx

        self._tmp: tempfile.TemporaryDirectory | None = None
        self._weights: dict[str, ir.Tensor] = {}  # stubs' data, handed to every session
        if _weight_bytes(model) > inline_limit:
            self._tmp = tempfile.TemporaryDirectory(prefix="edgeopt-activations-")
            path = os.path.join(self._tmp.name, "model.onnx")
            ir.save(model, path, external_data=True)
            self.proto = onnx.load(path, load_external_data=False)
        else:
            self.proto = ir.to_proto(model, deferred=self._weights)
            self._mark_in_memory()
        graph = self.proto.graph
        self._outputs = list(graph.output)
        self._sizes = len(graph.node), len(graph.initializer)
        self.opset = next((o.version for o in self.proto.opset_import
                           if o.domain in ("", "ai.onnx")), 0)

    def _mark_in_memory(self) -> None:
        """Mark the weight stubs as external data, or write back the ones ORT cannot take."""
        from edgeopt.ir._export import full_tensor_proto

        graph = self.proto.graph
        used = _read_names(graph) | {v.name for v in graph.input}  # inputs: overridable
        unused = [t for t in graph.initializer if t.name in self._weights and t.name not in used]
        for t in unused:  # ORT would drop it, and then not find it to replace
            del self._weights[t.name]
            graph.initializer.remove(t)
        for t in graph.initializer:
            tensor = self._weights.get(t.name)
            if tensor is None:
                continue
            if tensor.dtype not in _NUMPY_TYPES:
                t.CopyFrom(full_tensor_proto(tensor, t.name))
                del self._weights[t.name]
                continue
            t.data_location = 1  # onnx.TensorProto.EXTERNAL
            for key, value in (("location", IN_MEMORY), ("offset", "0"),
                               ("length", str(tensor.nbytes))):
                t.external_data.add(key=key, value=value)

    def free_prefix(self, base: str) -> str:
        """``base``, with ``_`` added until no name in the exported graph starts with it.

        Names made of it and a suffix never clash with the model's, whatever is added.
        """
        graph = self.proto.graph
        taken = {v.name for v in [*graph.input, *graph.output, *graph.initializer]}
        taken.update(o for node in graph.node for o in node.output)
        prefix = base
        while any(t.startswith(prefix) for t in taken):
            prefix += "_"
        return prefix

    def _reset(self) -> Any:
        """The graph as exported (no added outputs, nodes or initializers)."""
        graph = self.proto.graph
        del graph.output[:]
        graph.output.extend(self._outputs)
        del graph.node[self._sizes[0]:]
        del graph.initializer[self._sizes[1]:]
        return graph

    def session(self, names: Sequence[str], dtypes: Mapping[str, DataType | None]) -> Any:
        """An ONNX Runtime session whose outputs include ``names``."""
        graph = self._reset()
        listed = {o.name for o in self._outputs}
        for name in names:
            if name not in listed:
                vi = graph.output.add(name=name)
                if dtypes.get(name) is not None:
                    vi.type.tensor_type.elem_type = int(dtypes[name])  # type: ignore[arg-type]
        # Basic optimizations only: the values are measured as the graph defines them.
        return self.load(full=False)

    def light_session(self, names: Sequence[str], strides: Mapping[str, int],
                      ranks: Mapping[str, int], taps: _Taps | None = None
                      ) -> tuple[Any, dict[str, dict[str, str]]]:
        """A session computing light statistics of ``names`` (see the module docs).

        ``strides``: the stride of each value's histogram sample (1: the whole value; no
        sample for a value missing from it). ``ranks``: the rank of each value whose
        per-channel means (over every axis but 1) are wanted. ``taps``: per value, windows
        whose tap sums (:func:`tap_sums`) are computed: ``MatMul`` nodes with the tap
        matrices, then a ``ReduceSum`` over axis 0 (role ``tap<i>``). Returns the session
        and, per value, the output holding each :meth:`_Extremes.update` argument or tap sum.
        """
        from onnx import helper, numpy_helper

        graph = self._reset()
        prefix = self.free_prefix("edgeopt_stats")
        consts: dict[str, list[int]] = {"flat": [-1], "zero": [0],
                                        "end": [np.iinfo(np.int64).max]}
        consts.update((f"step{k}", [k]) for k in set(strides.values()) if k > 1)
        consts.update((f"axes{r}", [0, *range(2, r)]) for r in set(ranks.values()))
        graph.initializer.extend(numpy_helper.from_array(np.array(v, np.int64), f"{prefix}.{k}")
                                 for k, v in consts.items())

        def node(op: str, inputs: list[str], output: str, **attrs: Any) -> str:
            graph.node.append(helper.make_node(op, inputs, [output], **attrs))
            return output

        c = f"{prefix}."  # the constants
        outputs: dict[str, dict[str, str]] = {}
        for i, name in enumerate(names):
            out = f"{prefix}.{i}."
            roles = outputs[name] = {
                "shape": node("Shape", [name], out + "shape"),
                "lo": node("ReduceMin", [name], out + "lo", keepdims=1),
                "hi": node("ReduceMax", [name], out + "hi", keepdims=1)}
            if strides.get(name, 1) > 1:
                flat = node("Reshape", [name, c + "flat"], out + "flat")
                roles["sample"] = node("Slice", [flat, c + "zero", c + "end", c + "zero",
                                                 f"{c}step{strides[name]}"], out + "sample")
            elif name in strides:
                roles["sample"] = name
            if name in ranks:  # axes: an attribute before opset 18, an input from 18 on
                axes = f"axes{ranks[name]}"
                roles["channel_mean"] = \
                    node("ReduceMean", [name, c + axes], out + "mean", keepdims=0) \
                    if self.opset >= 18 else \
                    node("ReduceMean", [name], out + "mean", keepdims=0, axes=consts[axes])
            for j, (_, mats, _) in enumerate((taps or {}).get(name, ())):
                roles[f"tap{j}"] = self._tap_nodes(name, mats, f"{out}tap{j}.", node)
        listed = {o.name for o in self._outputs}
        graph.output.extend(helper.make_empty_tensor_value_info(o) for roles in outputs.values()
                            for o in roles.values() if o not in listed)
        return self.load(full=True), outputs

    def _tap_nodes(self, name: str, mats: Sequence[np.ndarray], out: str, node: Any) -> str:
        """``x @ W.T`` (last spatial axis), ``H @ .`` (the one before), ``ReduceSum`` axis 0.

        ``mats``: one or two tap matrices, in the value's float type.
        """
        from onnx import numpy_helper

        init = self.proto.graph.initializer
        init.append(numpy_helper.from_array(np.ascontiguousarray(mats[-1].T), out + "w"))
        t = node("MatMul", [name, out + "w"], out + "tw")
        if len(mats) == 2:
            init.append(numpy_helper.from_array(mats[0], out + "h"))
            t = node("MatMul", [out + "h", t], out + "th")
        if self.opset >= 13:
            init.append(numpy_helper.from_array(np.array([0], np.int64), out + "axes"))
            return node("ReduceSum", [t, out + "axes"], out + "sum", keepdims=0)
        return node("ReduceSum", [t], out + "sum", keepdims=0, axes=[0])

    def load(self, full: bool) -> Any:
        """An ONNX Runtime session of the graph as it is now (``full``: all optimizations)."""
        import onnx
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.log_severity_level = 3
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL if full \
            else ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        src: Any = self.proto.SerializeToString() if self._tmp is None else None
        # The values must outlive the session's creation (ORT copies them then).
        values = [ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(t.numpy()))
                  for t in self._weights.values()]
        if values:
            so.add_external_initializers(list(self._weights), values)
        if self._tmp is not None:
            src = os.path.join(self._tmp.name, "exposed.onnx")
            onnx.save(self.proto, src)
        try:
            session = ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])
        except Exception as e:  # ORT raises its own exception types
            raise EdgeoptError(f"Activations: ONNX Runtime cannot load the model: "
                               f"{_first_line(e)}") from None
        del values  # copied into the session
        return session

    def close(self) -> None:
        """Delete the temporary folder, if any."""
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> OrtModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def run_session(session: Any, names: Sequence[str], feeds: Mapping[str, np.ndarray],
                who: str, source: str) -> list[np.ndarray]:
    """``session.run(names, feeds)``; an ORT failure becomes one EdgeoptError line."""
    try:
        return session.run(list(names), dict(feeds))
    except Exception as e:  # ORT raises its own exception types
        raise EdgeoptError(f"{who}: ONNX Runtime failed on the calibration data from "
                           f"{source}: {_first_line(e)}") from None


def _read_names(graph: Any) -> set[str]:
    """Names that nodes of ``graph`` (and of its subgraphs) read, and its outputs."""
    names = {o.name for o in graph.output}
    stack = [graph]
    while stack:
        g = stack.pop()
        for node in g.node:
            names.update(node.input)
            for a in node.attribute:
                stack += [a.g] if a.HasField("g") else []
                stack += list(a.graphs)
        names.update(o.name for o in g.output)
    return names


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _weight_bytes(model: Model) -> int:
    return sum(v.const_value.nbytes for g in [model.graph, *model.graph.subgraphs()]
               for v in g.initializers.values() if v.const_value is not None)
