"""Saving: never over the input, atomic (no partial or temporary files), external data by rule.

Also the streaming check behind the memory benchmark (``tools/bench/bench_memory.py``): loading
and saving a model with external data does not hold its weights in memory.
"""

from __future__ import annotations

import errno
import json
import mmap
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import ONNX_TEST_DATA, random_inputs, run_ort
from onnx import TensorProto, helper, numpy_helper

import edgeopt
from edgeopt import EdgeoptError, ir
from edgeopt.ir import io_onnx

REPO = Path(__file__).resolve().parents[2]
BENCH = REPO / "tools" / "bench" / "bench_memory.py"
MiB = 1 << 20


# -- models ---------------------------------------------------------------------------------------
def _mlp_proto(seed: int = 0) -> onnx.ModelProto:
    """x[1,256] -> MatMul W0 (1 MiB) -> Add B0 (4 KiB) -> MatMul W1 (1.2 MiB) -> Add B1 (1200 B)
    -> Relu -> Mul S (4 B): weights small and large, in an order that needs padding."""
    rng = np.random.default_rng(seed)
    weights = {
        "W0": rng.standard_normal((256, 1024), dtype=np.float32) / 16,
        "B0": rng.standard_normal(1024, dtype=np.float32),
        "W1": rng.standard_normal((1024, 300), dtype=np.float32) / 32,
        "B1": rng.standard_normal(300, dtype=np.float32),
        "S": rng.standard_normal(1, dtype=np.float32),
    }
    nodes = [helper.make_node("MatMul", ["x", "W0"], ["m0"]),
             helper.make_node("Add", ["m0", "B0"], ["a0"]),
             helper.make_node("MatMul", ["a0", "W1"], ["m1"]),
             helper.make_node("Add", ["m1", "B1"], ["a1"]),
             helper.make_node("Relu", ["a1"], ["r"]),
             helper.make_node("Mul", ["r", "S"], ["y"])]
    graph = helper.make_graph(
        nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 256])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 300])],
        [numpy_helper.from_array(a, n) for n, a in weights.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _write_external(folder: Path, name: str = "src.onnx", location: str = "weights.bin") -> Path:
    """The MLP saved by onnx itself with every tensor >= 1 KiB in one external file."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    onnx.save_model(_mlp_proto(), str(path), save_as_external_data=True,
                    all_tensors_to_one_file=True, location=location, size_threshold=1024)
    return path


def _write_inline(folder: Path, name: str = "src.onnx") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_bytes(_mlp_proto().SerializeToString())
    return path


def _files(folder: Path) -> dict[str, bytes]:
    """Every file in ``folder`` with its bytes (the whole state a save could touch)."""
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def _external_entries(path: Path) -> dict[str, dict[str, str]]:
    """name -> external_data entries of each initializer stored outside the model file."""
    proto = onnx.load(str(path), load_external_data=False)
    return {t.name: {e.key: e.value for e in t.external_data} for t in proto.graph.initializer
            if t.data_location == TensorProto.EXTERNAL}


def _ort_outputs(path: Path) -> list[np.ndarray]:
    feeds = random_inputs(_mlp_proto(), seed=3)
    return run_ort(str(path), feeds)


# -- never over the input --------------------------------------------------------------------------
@pytest.mark.parametrize("external", [False, True], ids=["inline", "external"])
def test_save_onto_its_own_source_is_refused(tmp_path, external):
    src = (_write_external if external else _write_inline)(tmp_path / "m")
    before = _files(src.parent)
    model = edgeopt.load(src)
    with pytest.raises(EdgeoptError, match=r"src\.onnx: refusing to overwrite the input model$"):
        edgeopt.save(model, src)
    assert _files(src.parent) == before


def test_save_onto_its_source_under_another_spelling_is_refused(tmp_path, monkeypatch):
    src = _write_inline(tmp_path / "m")
    before = _files(src.parent)
    model = edgeopt.load(src)
    os.symlink(src, tmp_path / "alias.onnx")
    os.link(src, tmp_path / "hardlink.onnx")
    monkeypatch.chdir(tmp_path)
    for spelling in ["m/src.onnx", "m/../m/./src.onnx", "alias.onnx", "hardlink.onnx"]:
        with pytest.raises(EdgeoptError, match=r": refusing to overwrite the input model$"):
            edgeopt.save(model, spelling)
    assert _files(src.parent) == before


def test_save_whose_data_file_would_replace_the_input_data_is_refused(tmp_path):
    """The source keeps its weights in ``out.onnx.data``: saving to ``out.onnx`` (whose data
    file has exactly that name) must not replace them."""
    src = _write_external(tmp_path, "src.onnx", location="out.onnx.data")
    before = _files(tmp_path)
    model = edgeopt.load(src)
    with pytest.raises(EdgeoptError, match=r"out\.onnx\.data: refusing to overwrite the input "
                                           r"model's external data; save under another name$"):
        edgeopt.save(model, tmp_path / "out.onnx")
    assert _files(tmp_path) == before


def test_save_inline_onto_the_input_data_file_is_refused(tmp_path):
    src = _write_external(tmp_path)
    before = _files(tmp_path)
    model = edgeopt.load(src)
    with pytest.raises(EdgeoptError, match=r"weights\.bin: refusing to overwrite the input "
                                           r"model's external data"):
        edgeopt.save(model, tmp_path / "weights.bin", external_data=False)
    assert _files(tmp_path) == before


def test_save_whose_data_file_would_replace_the_input_model_is_refused(tmp_path):
    src = _write_inline(tmp_path, "out.onnx.data")
    before = _files(tmp_path)
    model = edgeopt.load(src)
    with pytest.raises(EdgeoptError, match=r"out\.onnx\.data: refusing to overwrite the input "
                                           r"model$"):
        edgeopt.save(model, tmp_path / "out.onnx", external_data=True)
    assert _files(tmp_path) == before


def test_clone_keeps_the_guard(tmp_path):
    src = _write_inline(tmp_path)
    before = _files(tmp_path)
    clone = edgeopt.load(src).clone()
    with pytest.raises(EdgeoptError, match=r"refusing to overwrite the input model$"):
        edgeopt.save(clone, src)
    assert _files(tmp_path) == before


# -- atomic: failures leave nothing behind ---------------------------------------------------------
def _fail_after_first_tensor(monkeypatch):
    """Make the external writer raise after it wrote one tensor's bytes."""
    original = io_onnx.ExternalWriter.write
    calls = []

    def write(self, tensor, name):
        if calls:
            raise OSError(errno.ENOSPC, "No space left on device")
        calls.append(name)
        return original(self, tensor, name)

    monkeypatch.setattr(io_onnx.ExternalWriter, "write", write)
    return calls


def _fail_half_way_through_the_model_file(monkeypatch):
    """Write half of the serialized model into its temporary file, then fail (disk full)."""
    def write_proto(proto, path, txn, deferred=None):
        with txn.open(path) as f:
            data = proto.SerializeToString()
            f.write(data[:len(data) // 2])
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(io_onnx, "_write_proto", write_proto)


def _fail_in_the_serializer(monkeypatch):
    def to_proto(model, external=None, **kwargs):
        raise RuntimeError("serializer exploded")

    monkeypatch.setattr(io_onnx, "to_proto", to_proto)


def _fail_renaming_the_model(monkeypatch):
    """The data file is renamed into place, then renaming the model fails."""
    original = os.replace

    def replace(src, dst):
        if str(dst).endswith(".onnx"):
            raise OSError(errno.EIO, "Input/output error")
        return original(src, dst)

    monkeypatch.setattr(io_onnx.os, "replace", replace)


@pytest.mark.parametrize("external", [False, True], ids=["inline", "external"])
@pytest.mark.parametrize("existing", [False, True], ids=["new", "over-existing"])
def test_failed_external_write_leaves_nothing(tmp_path, monkeypatch, external, existing):
    src = (_write_external if external else _write_inline)(tmp_path / "in")
    out = tmp_path / "out"
    out.mkdir()
    if existing:
        (out / "m.onnx").write_bytes(b"previous model")
        (out / "m.onnx.data").write_bytes(b"previous data")
    before = _files(out)
    model = edgeopt.load(src)
    calls = _fail_after_first_tensor(monkeypatch)
    with pytest.raises(EdgeoptError, match=r"m\.onnx: cannot write the model \(No space left "
                                           r"on device\)$"):
        edgeopt.save(model, out / "m.onnx", external_data=True)
    assert calls == ["W0"]  # it did fail mid-way, after writing data
    assert _files(out) == before
    assert sorted(os.listdir(out)) == sorted(before)  # no temporary file either


@pytest.mark.parametrize("external", [False, True], ids=["inline", "external"])
def test_failed_model_write_leaves_nothing(tmp_path, monkeypatch, external):
    src = _write_external(tmp_path / "in")
    out = tmp_path / "out"
    out.mkdir()
    (out / "m.onnx").write_bytes(b"previous model")
    before = _files(out)
    model = edgeopt.load(src)
    _fail_half_way_through_the_model_file(monkeypatch)
    with pytest.raises(EdgeoptError, match=r"cannot write the model \(No space left on device\)"):
        edgeopt.save(model, out / "m.onnx", external_data=external)
    assert sorted(os.listdir(out)) == ["m.onnx"]
    assert _files(out) == before


def test_failed_serializer_leaves_nothing(tmp_path, monkeypatch):
    src = _write_external(tmp_path / "in")
    out = tmp_path / "out"
    out.mkdir()
    (out / "m.onnx").write_bytes(b"previous model")
    before = _files(out)
    model = edgeopt.load(src)
    _fail_in_the_serializer(monkeypatch)
    with pytest.raises(RuntimeError, match="serializer exploded"):
        edgeopt.save(model, out / "m.onnx")
    assert sorted(os.listdir(out)) == ["m.onnx"]
    assert _files(out) == before


@pytest.mark.parametrize("existing", [False, True], ids=["new", "over-existing"])
def test_failed_rename_of_the_model_rolls_back_the_data_file(tmp_path, monkeypatch, existing):
    """The data file is renamed into place first; when the model's rename then fails, the
    data file is rolled back, so an existing model never points at new data."""
    src = _write_external(tmp_path / "in")
    out = tmp_path / "out"
    out.mkdir()
    if existing:
        edgeopt.save(edgeopt.load(_write_inline(tmp_path / "old")), out / "m.onnx",
                     external_data=True)
        (out / "keep.txt").write_bytes(b"unrelated")
    before = _files(out)
    model = edgeopt.load(src)
    _fail_renaming_the_model(monkeypatch)
    with pytest.raises(EdgeoptError, match=r"cannot write the model \(Input/output error\)"):
        edgeopt.save(model, out / "m.onnx")
    assert _files(out) == before
    assert sorted(os.listdir(out)) == sorted(before)  # no temporary or backup file


def test_unwritable_folder_is_a_clean_error(tmp_path, monkeypatch):
    src = _write_inline(tmp_path / "in")
    model = edgeopt.load(src)

    def mkstemp(**kw):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(io_onnx.tempfile, "mkstemp", mkstemp)
    with pytest.raises(EdgeoptError, match=r"m\.onnx: cannot write the model \(Permission "
                                           r"denied\)$"):
        edgeopt.save(model, tmp_path / "m.onnx")
    assert sorted(os.listdir(tmp_path)) == ["in"]


def test_missing_output_folder(tmp_path):
    model = edgeopt.load(_write_inline(tmp_path))
    with pytest.raises(EdgeoptError, match=r"nope/m\.onnx: output folder does not exist$"):
        edgeopt.save(model, tmp_path / "nope" / "m.onnx")
    assert not (tmp_path / "nope").exists()


def test_output_path_is_a_folder(tmp_path):
    model = edgeopt.load(_write_inline(tmp_path))
    (tmp_path / "dir.onnx").mkdir()
    with pytest.raises(EdgeoptError, match=r"dir\.onnx: is a folder; give a file name$"):
        edgeopt.save(model, tmp_path / "dir.onnx")
    assert list((tmp_path / "dir.onnx").iterdir()) == []


def test_save_replaces_an_existing_file_and_uses_the_normal_mode(tmp_path):
    model = edgeopt.load(_write_inline(tmp_path / "in"))
    dest = tmp_path / "m.onnx"
    dest.write_bytes(b"old")
    edgeopt.save(model, dest)
    assert onnx.load(str(dest)).graph.name == "mlp"
    umask = os.umask(0)
    os.umask(umask)
    assert dest.stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's private 0600
    assert sorted(os.listdir(tmp_path)) == ["in", "m.onnx"]


def test_save_proto_is_atomic_and_checks_the_folder(tmp_path, monkeypatch):
    proto = _mlp_proto()
    io_onnx.save_proto(proto, tmp_path / "p.onnx")
    assert onnx.load(str(tmp_path / "p.onnx")) == proto
    with pytest.raises(EdgeoptError, match=r"output folder does not exist$"):
        io_onnx.save_proto(proto, tmp_path / "nope" / "p.onnx")
    _fail_half_way_through_the_model_file(monkeypatch)
    with pytest.raises(EdgeoptError, match=r"No space left on device"):
        io_onnx.save_proto(proto, tmp_path / "p.onnx")
    assert sorted(os.listdir(tmp_path)) == ["p.onnx"]
    assert onnx.load(str(tmp_path / "p.onnx")) == proto


# -- external data ---------------------------------------------------------------------------------
def _mapped(array: np.ndarray) -> bool:
    """True when the array's memory is a read-only mmap (not a copy)."""
    base = array
    while isinstance(base, np.ndarray) and base.base is not None:
        base = base.base
    if isinstance(base, memoryview):
        base = base.obj
    return isinstance(base, mmap.mmap) and not array.flags.writeable


def test_external_data_loads_memory_mapped(tmp_path):
    src = _write_external(tmp_path)
    model = edgeopt.load(src)
    inits = model.graph.initializers
    external = {n for n, v in inits.items() if isinstance(v.const_value, ir.ExternalTensor)}
    assert external == {"W0", "B0", "W1", "B1"}  # S (4 bytes) stayed inline
    reference = {t.name: numpy_helper.to_array(t) for t in _mlp_proto().graph.initializer}
    for name in external:
        array = inits[name].const_value.numpy()
        assert _mapped(array), name
        np.testing.assert_array_equal(array, reference[name])


def test_external_data_round_trip(tmp_path):
    src = _write_external(tmp_path / "in")
    expected = _ort_outputs(src)
    out = tmp_path / "out"
    out.mkdir()
    edgeopt.save(edgeopt.load(src), out / "m.onnx")  # default: external, as loaded
    assert sorted(os.listdir(out)) == ["m.onnx", "m.onnx.data"]
    entries = _external_entries(out / "m.onnx")
    assert set(entries) == {"W0", "B0", "W1", "B1"}
    assert {e["location"] for e in entries.values()} == {"m.onnx.data"}
    for got, want in zip(_ort_outputs(out / "m.onnx"), expected, strict=True):
        np.testing.assert_array_equal(got, want)
    # and the copy loads memory-mapped from its own folder, not from the source's
    again = edgeopt.load(out / "m.onnx")
    tensor = again.graph.initializers["W1"].const_value
    assert isinstance(tensor, ir.ExternalTensor)
    assert Path(tensor.path) == out / "m.onnx.data"


def test_large_tensors_start_at_64k_aligned_offsets(tmp_path):
    src = _write_external(tmp_path / "in")
    edgeopt.save(edgeopt.load(src), tmp_path / "m.onnx")
    entries = _external_entries(tmp_path / "m.onnx")
    offsets = {n: int(e["offset"]) for n, e in entries.items()}
    lengths = {n: int(e["length"]) for n, e in entries.items()}
    assert lengths == {"W0": MiB, "B0": 4096, "W1": 1228800, "B1": 1200}
    assert offsets["W0"] == 0 and offsets["W1"] % (64 << 10) == 0
    # small tensors are packed right after their predecessor, without padding
    assert offsets["B0"] == offsets["W0"] + lengths["W0"]
    assert offsets["B1"] == offsets["W1"] + lengths["W1"]
    assert offsets["W1"] == MiB + (64 << 10)  # next 64 KiB boundary after B0
    assert (tmp_path / "m.onnx.data").stat().st_size == offsets["B1"] + lengths["B1"]


@pytest.mark.parametrize(("source", "flag", "files"), [
    ("external", False, ["m.onnx"]),
    ("external", True, ["m.onnx", "m.onnx.data"]),
    ("inline", None, ["m.onnx"]),
    ("inline", True, ["m.onnx", "m.onnx.data"]),
])
def test_external_data_flag_overrides(tmp_path, source, flag, files):
    src = (_write_external if source == "external" else _write_inline)(tmp_path / "in")
    expected = _ort_outputs(src)
    out = tmp_path / "out"
    out.mkdir()
    edgeopt.save(edgeopt.load(src), out / "m.onnx", external_data=flag)
    assert sorted(os.listdir(out)) == files
    entries = _external_entries(out / "m.onnx")
    assert set(entries) == ({"W0", "B0", "W1", "B1"} if len(files) == 2 else set())
    for got, want in zip(_ort_outputs(out / "m.onnx"), expected, strict=True):
        np.testing.assert_array_equal(got, want)


def test_size_threshold_keeps_small_tensors_inline(tmp_path):
    edgeopt.save(edgeopt.load(_write_inline(tmp_path / "in")), tmp_path / "m.onnx",
                 external_data=True, size_threshold=MiB)
    assert set(_external_entries(tmp_path / "m.onnx")) == {"W0", "W1"}


def test_no_empty_data_file_when_nothing_goes_external(tmp_path):
    edgeopt.save(edgeopt.load(_write_inline(tmp_path / "in")), tmp_path / "m.onnx",
                 external_data=True, size_threshold=4 * MiB)
    assert sorted(os.listdir(tmp_path)) == ["in", "m.onnx"]
    assert _external_entries(tmp_path / "m.onnx") == {}


def test_source_model_still_reads_its_data_after_saving(tmp_path):
    src = _write_external(tmp_path / "in")
    model = edgeopt.load(src)
    edgeopt.save(model, tmp_path / "m.onnx")
    w0 = model.graph.initializers["W0"].const_value.numpy()
    np.testing.assert_array_equal(w0, numpy_helper.to_array(_mlp_proto().graph.initializer[0]))


# -- the 2 GB rule ---------------------------------------------------------------------------------
def test_weights_over_the_protobuf_limit_go_external(tmp_path, monkeypatch):
    """With the limit scaled down to 1 MiB (headroom 32 KiB), the 2.2 MiB MLP is written with
    external data by default, while a 16 KiB model stays inline."""
    big = edgeopt.load(_write_inline(tmp_path / "in"))
    small = edgeopt.load(_write_small(tmp_path / "small_src.onnx", 4096))
    monkeypatch.setattr(io_onnx, "PROTOBUF_LIMIT", MiB)
    edgeopt.save(big, tmp_path / "big.onnx")
    assert set(_external_entries(tmp_path / "big.onnx")) == {"W0", "B0", "W1", "B1"}
    for got, want in zip(_ort_outputs(tmp_path / "big.onnx"),
                         _ort_outputs(tmp_path / "in" / "src.onnx"), strict=True):
        np.testing.assert_array_equal(got, want)

    edgeopt.save(small, tmp_path / "small.onnx")
    assert not (tmp_path / "small.onnx.data").exists()
    assert _external_entries(tmp_path / "small.onnx") == {}


def test_protobuf_limit_boundary(tmp_path, monkeypatch):
    """Inline up to the limit minus 1/32 headroom, external from there."""
    monkeypatch.setattr(io_onnx, "PROTOBUF_LIMIT", 32 * 1024)
    under = edgeopt.load(_write_small(tmp_path / "under.onnx", 31 * 1024 // 4 - 1))
    over = edgeopt.load(_write_small(tmp_path / "over.onnx", 31 * 1024 // 4))
    edgeopt.save(under, tmp_path / "u.onnx")
    edgeopt.save(over, tmp_path / "o.onnx")
    assert _external_entries(tmp_path / "u.onnx") == {}
    assert set(_external_entries(tmp_path / "o.onnx")) == {"W"}


def test_forcing_inline_over_the_limit_is_refused(tmp_path, monkeypatch):
    model = edgeopt.load(_write_inline(tmp_path / "in"))
    monkeypatch.setattr(io_onnx, "PROTOBUF_LIMIT", MiB)
    with pytest.raises(EdgeoptError, match=r"m\.onnx: weights are over protobuf's 2 GiB limit; "
                                           r"save with external_data=True$"):
        edgeopt.save(model, tmp_path / "m.onnx", external_data=False)
    assert sorted(os.listdir(tmp_path)) == ["in"]


def test_loading_a_file_over_the_protobuf_limit_is_refused(tmp_path, monkeypatch):
    src = _write_inline(tmp_path)
    monkeypatch.setattr(io_onnx, "PROTOBUF_LIMIT", MiB)
    with pytest.raises(ir.ModelLoadError, match=r"src\.onnx: \d+ bytes is over protobuf's 2 GiB "
                                                r"limit; large models must keep their weights "
                                                r"in external data$"):
        edgeopt.load(src)


def _write_small(path: Path, elements: int) -> Path:
    """y = x + W with W float32[elements], inline."""
    w = numpy_helper.from_array(np.arange(elements, dtype=np.float32), "W")
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "W"], ["y"])], "small",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [elements])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [elements])], [w])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString())
    return path


# -- byte-exact, streamed serialization ---------------------------------------------------------
def _backend_models() -> list[Path]:
    root = Path(ONNX_TEST_DATA)
    return sorted(root.glob("light/*.onnx")) + sorted(root.glob("*/*/model.onnx"))


def test_streamed_writer_matches_protobuf_byte_for_byte(tmp_path):
    """``save`` writes node by node and tensor by tensor; the file is still exactly what
    ``SerializeToString`` gives, for every model of onnx's backend test data."""
    models = _backend_models()
    assert len(models) > 100
    for i, path in enumerate(models):
        proto = onnx.load(str(path), load_external_data=False)
        io_onnx.save_proto(proto, tmp_path / f"{i}.onnx")
        assert (tmp_path / f"{i}.onnx").read_bytes() == proto.SerializeToString(), path


def test_saved_model_is_the_exported_proto(tmp_path):
    path = Path(ONNX_TEST_DATA) / "light" / "light_inception_v1.onnx"
    model = edgeopt.load(path)
    edgeopt.save(model, tmp_path / "m.onnx")
    assert (tmp_path / "m.onnx").read_bytes() == ir.to_proto(model).SerializeToString()


def test_streamed_writer_with_a_large_graph_and_subgraph(tmp_path):
    """Big initializers, an If with its own initializer, a doc string and metadata after the
    graph: every field lands where protobuf puts it."""
    proto = _mlp_proto()
    then = helper.make_graph([helper.make_node("Identity", ["k"], ["o"])], "then", [],
                             [helper.make_tensor_value_info("o", TensorProto.FLOAT, [3])],
                             [numpy_helper.from_array(np.ones(3, np.float32), "k")])
    proto.graph.node.append(helper.make_node("If", ["c"], ["z"], then_branch=then,
                                             else_branch=then))
    proto.graph.doc_string = "doc"
    proto.metadata_props.add(key="k", value="v")
    proto.functions.add(name="f", domain="d")
    io_onnx.save_proto(proto, tmp_path / "m.onnx")
    assert (tmp_path / "m.onnx").read_bytes() == proto.SerializeToString()


def test_serialized_size_over_the_limit_is_refused(tmp_path, monkeypatch):
    proto = _mlp_proto()
    monkeypatch.setattr(io_onnx, "PROTOBUF_LIMIT", MiB)
    with pytest.raises(EdgeoptError, match=rf"p\.onnx: model too large to serialize inline "
                                           rf"\({proto.ByteSize()} bytes\); save with "
                                           r"external_data=True$"):
        io_onnx.save_proto(proto, tmp_path / "p.onnx")
    assert os.listdir(tmp_path) == []


# -- memory: weights are streamed, not held ---------------------------------------------------
def _bench(tmp_path: Path, *flags: str) -> dict:
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, str(BENCH), "--gb", "0.0625", "--json", str(out),
                           "--dir", str(tmp_path), *flags], capture_output=True, text=True,
                          timeout=300, check=False)
    fig = json.loads(out.read_text())
    assert sorted(os.listdir(tmp_path)) == ["bench.json"]  # the benchmark cleaned up
    assert fig["weight_bytes"] == 8 * 1448 * 1448 * 4
    assert fig["identical"] is True
    fig["returncode"] = proc.returncode
    return fig


@pytest.fixture(scope="module")
def inline_bench(tmp_path_factory) -> dict:
    return _bench(tmp_path_factory.mktemp("bench_inline"), "--inline")


def test_load_and_save_stream_external_weights(tmp_path):
    """The memory benchmark at 64 MiB: a fresh process loads, verifies and saves the model;
    its peak RSS (interpreter and imports included) stays under 1.5x the weight bytes, which
    fails if the weights were materialized even once (about 1.8x at this size)."""
    fig = _bench(tmp_path)
    assert fig["returncode"] == 0
    assert fig["ratio"] < 1.5, fig
    assert fig["growth_ratio"] < 0.5, fig


def test_inline_load_holds_the_weights_once(inline_bench):
    """Parsing field by field: the parsed weights plus one tensor in flight (1/8 of them),
    not the file's bytes and the parsed message together (2x)."""
    growth = (inline_bench["load_peak_rss"] - inline_bench["baseline_rss"])
    assert growth / inline_bench["weight_bytes"] < 1.3, inline_bench


def test_inline_save_does_not_serialize_the_whole_file_at_once(inline_bench):
    """Writing tensor by tensor: the model, the exporter's proto, and one tensor in flight
    (about 2.5x); serializing the whole file at once would add about 2x more."""
    if inline_bench["save_peak_rss"] is None:
        pytest.skip("this kernel cannot reset the peak RSS between load and save")
    growth = (inline_bench["save_peak_rss"] - inline_bench["baseline_rss"])
    assert growth / inline_bench["weight_bytes"] < 3.0, inline_bench


def test_inline_save_holds_the_weights_once(inline_bench):
    assert inline_bench["save_peak_rss"] is not None
    growth = (inline_bench["save_peak_rss"] - inline_bench["baseline_rss"])
    assert growth / inline_bench["weight_bytes"] < 1.5, inline_bench


def test_external_tensors_map_only_their_own_bytes(tmp_path):
    """Each ExternalTensor maps its own range, not the whole data file."""
    import mmap as mmap_mod

    from edgeopt.ir import DataType, ExternalTensor

    data = np.arange(3 * 70000, dtype=np.float32)
    path = tmp_path / "w.bin"
    path.write_bytes(data.tobytes())
    offset = 4 * 70001  # deliberately not aligned to the allocation granularity
    t = ExternalTensor(str(path), offset, 4 * 1000, DataType.FLOAT, (1000,))
    arr = t.numpy()
    assert np.array_equal(arr, data[70001:71001])
    mapped = arr.base
    while mapped is not None and not isinstance(mapped, mmap_mod.mmap):
        mapped = getattr(mapped, "base", getattr(mapped, "obj", None))
    assert isinstance(mapped, mmap_mod.mmap)
    assert len(mapped) < 4 * 1000 + mmap_mod.ALLOCATIONGRANULARITY


# -- value_info policy ----------------------------------------------------------------------------
def _custom_op_model() -> onnx.ModelProto:
    """x -> Relu -> r -> com.example.Scale -> s -> Relu -> y; ``r`` annotated in the file."""
    nodes = [helper.make_node("Relu", ["x"], ["r"], name="relu0"),
             helper.make_node("Scale", ["r"], ["s"], name="scale", domain="com.example"),
             helper.make_node("Relu", ["s"], ["t"], name="relu1"),
             helper.make_node("Neg", ["t"], ["y"], name="neg")]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
        value_info=[helper.make_tensor_value_info("r", TensorProto.FLOAT, [2, 3])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                   helper.make_opsetid("com.example", 1)])


def _infos(path: Path) -> dict[str, list]:
    g = onnx.load(str(path)).graph
    return {vi.name: [d.dim_value for d in vi.type.tensor_type.shape.dim] for vi in g.value_info}


def test_save_writes_the_files_value_info_and_what_inference_cannot_recover(tmp_path):
    """``save`` keeps the file's own entry (``r``), writes the type of a custom operator's
    output that a pass set (``s``: ONNX inference cannot know it), and leaves out the type of a
    standard operator's output that only inference found (``t``); ``value_info="all"`` writes
    that too."""
    model = ir.from_proto(_custom_op_model())
    scale = next(n for n in model.graph if n.op_type == "Scale")
    scale.outputs[0].dtype, scale.outputs[0].shape = ir.DataType.FLOAT, (2, 3)
    ir.infer_shapes(model)
    relu1 = next(n for n in model.graph if n.name == "relu1")
    assert relu1.outputs[0].shape == (2, 3)  # known in the IR ...
    edgeopt.save(model, tmp_path / "file.onnx")
    assert _infos(tmp_path / "file.onnx") == {"r": [2, 3], "s": [2, 3]}  # ... not written
    edgeopt.save(model, tmp_path / "all.onnx", value_info="all")
    assert _infos(tmp_path / "all.onnx") == {"r": [2, 3], "s": [2, 3], "t": [2, 3]}
    assert ir.to_proto(model).graph.value_info[-1].name == "t"  # in memory: everything
    with pytest.raises(ValueError, match="value_info must be one of all, file, got 'some'"):
        ir.to_proto(model, value_info="some")


def test_quantized_model_has_no_value_info_for_its_qdq_values(tmp_path):
    """The saved QDQ model carries only value_info entries the original file had (this one had
    none; the opset 9 -> 13 conversion quant runs first must not add any), none for the
    QuantizeLinear/DequantizeLinear outputs (about 3% of a quantized file), and runs in ORT
    exactly as the model with them does."""
    src = Path(ONNX_TEST_DATA) / "light" / "light_squeezenet.onnx"
    model = edgeopt.load(src)
    edgeopt.optimize(model, "simplify,quant:int8,bias_correction=false", calib="random")
    edgeopt.save(model, tmp_path / "q.onnx")
    edgeopt.save(model, tmp_path / "q_all.onnx", value_info="all")
    lean, full = onnx.load(str(tmp_path / "q.onnx")), onnx.load(str(tmp_path / "q_all.onnx"))
    original = {vi.name for vi in onnx.load(str(src)).graph.value_info}
    qdq = {o for n in lean.graph.node if n.op_type.endswith("quantizeLinear") for o in n.output}
    assert len(qdq) > 50 and {vi.name for vi in full.graph.value_info} >= qdq
    assert {vi.name for vi in lean.graph.value_info} <= original  # here: none at all
    feeds = random_inputs(lean, seed=0)
    np.testing.assert_array_equal(run_ort(lean, feeds)[0], run_ort(full, feeds)[0])
