"""A peer's test suite, not ours: every model of onnx's backend test data goes through
``edgeopt.load`` -> ``ir.verify`` -> ``edgeopt.save`` and must still give the reference outputs
in ONNX Runtime, with the tolerances onnx's own backend runner uses.

Sources (ids are ``<source>/<case>``):

- ``pytorch-converted``, ``pytorch-operator``, ``simple``: ``data/<source>/<case>/model.onnx``
  with ``test_data_set_*/{input,output}_*.pb``.
- ``light``: ``data/light/light_<name>.onnx`` with ``light_<name>_output_0.pb``; inputs are made
  by onnx's runner's own ``generate_dummy_data`` (tolerances from ``data/real/*/data.json``).
- ``node``: this wheel ships no ``data/node``, so the cases come from onnx's generator
  (``onnx.backend.test.case.node.collect_testcases()``) and are written to a file first.
- ``model``: generated model cases (``case.model.collect_testcases()``) not on disk in ``simple``.

Each case ends in exactly one bucket, counted per source in the terminal summary
(``tests/ir/conftest.py``): passed; skipped because ORT cannot (it fails to load or run the
*original* file, or its outputs on the original differ from the reference); or failed.
"""

from __future__ import annotations

import functools
import glob
import json
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
import onnx.checker
import pytest
from conftest import ONNX_TEST_DATA, ORT_CANNOT
from onnx import numpy_helper
from onnx.backend.test.runner import Runner

import edgeopt
from edgeopt import ir

pytestmark = pytest.mark.slow

FILE_SOURCES = ("pytorch-converted", "pytorch-operator", "simple")

#: Known bugs in IR files owned elsewhere: case id -> reason. Such a case xfails if the bug
#: shows and fails once it no longer does (strict), whatever ORT can do with the model.
KNOWN_BUGS: dict[str, str] = {}


@dataclass(frozen=True)
class PeerCase:
    """One model of the peer suite."""

    source: str
    name: str
    rtol: float
    atol: float
    path: str | None = None  # the model file; None for generated (in-memory) cases

    @property
    def id(self) -> str:
        return f"{self.source}/{self.name}"


# -- collecting the cases --------------------------------------------------------------------
def _file_cases() -> Iterator[PeerCase]:
    for source in FILE_SOURCES:
        for case_dir in sorted(glob.glob(os.path.join(ONNX_TEST_DATA, source, "*"))):
            model = os.path.join(case_dir, "model.onnx")
            if not os.path.exists(model):
                continue
            tol = {"rtol": 1e-3, "atol": 1e-7}  # onnx.backend.test.loader defaults
            data_json = os.path.join(case_dir, "data.json")
            if os.path.exists(data_json):
                with open(data_json) as f:
                    tol.update({k: v for k, v in json.load(f).items() if k in tol})
            yield PeerCase(source, os.path.basename(case_dir), tol["rtol"], tol["atol"], model)


def _light_cases() -> Iterator[PeerCase]:
    for data_json in sorted(glob.glob(os.path.join(ONNX_TEST_DATA, "real", "*", "data.json"))):
        with open(data_json) as f:
            data = json.load(f)
        path = os.path.join(ONNX_TEST_DATA, "light", f"light_{data['model_name']}.onnx")
        if os.path.exists(path):
            yield PeerCase("light", data["model_name"], data.get("rtol", 1e-3),
                           data.get("atol", 1e-7), path)


@functools.cache
def _generated() -> dict[str, Any]:
    """onnx's generated node and model test cases (TestCase objects) by case id."""
    from onnx.backend.test.case import model as model_cases
    from onnx.backend.test.case import node as node_cases

    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")  # the generators overflow casts on purpose
        nodes = node_cases.collect_testcases()
        models = model_cases.collect_testcases()
    on_disk = set(os.listdir(os.path.join(ONNX_TEST_DATA, "simple")))
    cases = {f"node/{c.name}": c for c in nodes}
    cases.update({f"model/{c.name}": c for c in models
                  if c.model is not None and c.data_sets and c.name not in on_disk})
    return cases


@functools.cache
def all_cases() -> dict[str, PeerCase]:
    """Every case of the suite by id."""
    cases = [*_file_cases(), *_light_cases()]
    for case_id, tc in _generated().items():
        cases.append(PeerCase(case_id.split("/")[0], tc.name, tc.rtol, tc.atol))
    return {c.id: c for c in cases}


# -- data sets -------------------------------------------------------------------------------
def _read_pb(path: str, tp: onnx.TypeProto) -> Any:
    """A stored input/output, decoded by its declared type (as onnx's runner does)."""
    with open(path, "rb") as f:
        data = f.read()
    kind = tp.WhichOneof("value")
    if kind == "sequence_type":
        seq = onnx.SequenceProto()
        seq.ParseFromString(data)
        return numpy_helper.to_list(seq)
    if kind == "optional_type":
        opt = onnx.OptionalProto()
        opt.ParseFromString(data)
        return numpy_helper.to_optional(opt)
    tensor = onnx.TensorProto()
    tensor.ParseFromString(data)
    return numpy_helper.to_array(tensor)


def _as_feed(x: Any) -> Any:
    if isinstance(x, onnx.TensorProto):
        return numpy_helper.to_array(x)
    if isinstance(x, np.generic):
        return np.asarray(x)
    if isinstance(x, list):
        return [_as_feed(e) for e in x]
    return x


DataSet = tuple[dict[str, Any], list[Any]]


def data_sets(case: PeerCase, proto: onnx.ModelProto) -> list[DataSet]:
    """(feeds by input name, reference outputs) of every data set of a case."""
    graph = proto.graph
    if case.source == "light":
        inits = {t.name for t in graph.initializer}
        feeds = {x.name: Runner.generate_dummy_data(x, seed=0, name=case.name, random=False)
                 for x in graph.input if x.name not in inits}
        prefix = os.path.splitext(case.path)[0]
        refs = [_read_pb(f"{prefix}_output_{i}.pb", o.type) for i, o in enumerate(graph.output)]
        return [(feeds, refs)]
    if case.path is None:
        tc = _generated()[case.id]
        return [({graph.input[i].name: _as_feed(x) for i, x in enumerate(inputs)},
                 [_as_feed(y) for y in outputs]) for inputs, outputs in tc.data_sets]
    sets = []
    for folder in sorted(glob.glob(os.path.join(os.path.dirname(case.path), "test_data_set*"))):
        n_in = len(glob.glob(os.path.join(folder, "input_*.pb")))
        n_out = len(glob.glob(os.path.join(folder, "output_*.pb")))
        feeds = {graph.input[i].name: _read_pb(os.path.join(folder, f"input_{i}.pb"),
                                               graph.input[i].type) for i in range(n_in)}
        refs = [_read_pb(os.path.join(folder, f"output_{i}.pb"), graph.output[i].type)
                for i in range(n_out)]
        sets.append((feeds, refs))
    return sets


# -- running ---------------------------------------------------------------------------------
def _session(path: str) -> Any:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 4
    so.intra_op_num_threads = 1
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def _first_line(e: BaseException, path: str = "") -> str:
    """The error's first line, without the model's path (so equal reasons group in -ra)."""
    text = str(e).strip().replace(path, "<model>") if path else str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0][:160] if text else ''}"


def assert_similar(refs: list[Any], outs: list[Any], rtol: float, atol: float,
                   case_id: str = "?") -> None:
    """onnx's ``Runner.assert_similar_outputs``, applied one output at a time.

    onnx's own recursion hands each element of a sequence output back in as a *list of
    outputs*, which iterates the element's rows and raises TypeError on 0-d elements; here
    every sequence element is compared as a whole tensor (shape, dtype, values), which is
    at least as strict.
    """
    assert len(outs) == len(refs), f"{len(outs)} outputs, expected {len(refs)}"
    for i, (ref, out) in enumerate(zip(refs, outs, strict=True)):
        if isinstance(ref, (list, tuple)) or isinstance(out, (list, tuple)):
            assert isinstance(ref, (list, tuple)) and isinstance(out, (list, tuple)), \
                f"output {i}: {type(out).__name__}, expected {type(ref).__name__}"
            Runner.assert_similar_outputs(list(ref), list(out), rtol, atol, model_dir=case_id)
        elif ref is None or out is None:  # an empty optional
            assert ref is None and out is None, f"output {i}: {out!r}, expected {ref!r}"
        else:
            Runner.assert_similar_outputs([ref], [out], rtol, atol, model_dir=case_id)


def _checker_passes(path: str) -> bool:
    try:
        onnx.checker.check_model(path, full_check=True)
    except Exception:  # any checker complaint (ValidationError, InferenceError, ...)
        return False
    return True


def _ort_on_original(case: PeerCase, path: str, sets: list[DataSet]) -> None:
    """Skip the case (bucket 'ORT cannot') unless ORT reproduces the reference on the
    original file."""
    try:
        sess = _session(path)
    except Exception as e:
        pytest.skip(f"{ORT_CANNOT} load the original: {_first_line(e, path)}")
    for feeds, refs in sets:
        try:
            outs = sess.run(None, feeds)
        except Exception as e:
            pytest.skip(f"{ORT_CANNOT} run the original: {_first_line(e, path)}")
        try:
            assert_similar(refs, outs, case.rtol, case.atol)
        except AssertionError as e:
            pytest.skip(f"{ORT_CANNOT} reproduce the reference on the original: "
                        f"{_first_line(e)}")


def original_proto(case: PeerCase) -> onnx.ModelProto:
    """The case's model as onnx ships it."""
    return onnx.load(case.path) if case.path is not None else _generated()[case.id].model


def original_file(case: PeerCase, tmp_path: Any) -> str:
    """The case's model file (generated cases are written to ``tmp_path`` first)."""
    if case.path is not None:
        return case.path
    path = str(tmp_path / "original.onnx")
    onnx.save(_generated()[case.id].model, path)
    return path


def _load_verify_save(original: str, exported: str) -> None:
    model = edgeopt.load(original)
    ir.verify(model)
    edgeopt.save(model, exported)
    if _checker_passes(original):
        onnx.checker.check_model(exported, full_check=True)


@pytest.mark.parametrize("case_id", list(all_cases()))
def test_peer_model(case_id: str, tmp_path: Any) -> None:
    case = all_cases()[case_id]
    original = original_file(case, tmp_path)
    sets = data_sets(case, onnx.load(original))
    exported = str(tmp_path / "export.onnx")

    # Our part first, so a model ORT cannot run still checks load/verify/save/checker.
    known_bug = KNOWN_BUGS.get(case_id)
    try:
        _load_verify_save(original, exported)
    except Exception:
        if known_bug:
            pytest.xfail(known_bug)
        raise
    if known_bug:
        pytest.fail(f"known bug no longer shows; remove {case_id!r} from KNOWN_BUGS")

    _ort_on_original(case, original, sets)
    sess = _session(exported)
    for feeds, refs in sets:
        assert_similar(refs, sess.run(None, feeds), case.rtol, case.atol, case_id)


def test_every_source_is_collected() -> None:
    """The suite really covers the sources it claims (a missing folder is not 'all passed')."""
    sources = {c.source for c in all_cases().values()}
    assert sources == {*FILE_SOURCES, "light", "node", "model"}
    counts = {s: sum(c.source == s for c in all_cases().values()) for s in sources}
    assert counts["light"] == 9
    assert counts["node"] > 1500
