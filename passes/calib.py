"""Calibration data, shared by every data-driven pass (importance, recovery, quantization).

:func:`load_calibration` turns what the user gives to ``--calib SPEC`` into a
:class:`CalibrationData`: for each model input one array whose axis 0 indexes samples.

**Sources** (``SPEC``):

* ``data.npz``: one array per model input, keyed by input name; axis 0 = samples.
* a folder. Files are read in natural name order (``x2`` before ``x10``), then the files of
  each sub-folder, one level deep (ONNX ``test_data_set_0``, ``test_data_set_1``, ...). Hidden
  files and other extensions are skipped. A file holds one sample (an array without the
  model's batch axis) or several (with it); files are concatenated along axis 0.

  - ``*.npz``: arrays keyed by input name (a lone unnamed ``arr_0`` goes to a one-input model).
  - ``*.npy``: one array, for the input the file name starts with: ``<input>.npy`` or
    ``<input>_<anything>.npy`` (the longest matching input wins; in input names, characters
    other than letters, digits, ``.``, ``-`` and ``_`` read as ``_``). With a one-input model
    any name will do.
  - ``*.pb``: a serialized ONNX ``TensorProto``, as in ONNX test-data folders. It goes to
    the input its tensor name names, else ``input_<i>.pb`` goes to the i-th model input
    (initializers excluded). ``output_*.pb`` files are skipped.
  - images (``.png .jpg .jpeg .bmp .pgm .ppm .pnm .tif .tiff .webp``; needs Pillow): named like
    ``.npy`` files, each one sample, converted as ``--preprocess`` says (below).

* a single ``.npy``, ``.pb`` or image file, read as one file of a folder.
* ``random`` or ``random:N``: N (default 8) seeded samples drawn from the input shapes and
  types (floats ~ N(0, 1), integers in [0, 10), booleans fair). A symbolic batch dim (axis
  0) takes the samples; any other symbolic dim needs a size, from ``input_shapes`` (the
  CLI's ``--input-shape``) or ``dim_values``: without one, ``random`` refuses rather than
  guess (a 1 x 1 "image" would calibrate an image model on nothing like its inputs). A loud
  warning is logged and ``CalibrationData.synthetic`` is True: statistics of random inputs
  do not describe real data. (Use ``./random`` for a folder of that name.)

**Samples and runs.** An array whose rank equals the model input's rank is split along the
input's axis 0 (its batch axis): a symbolic batch dim takes any number of samples per run; a
static batch dim B takes exactly B (the sample count must be a multiple of B). An array with one
more axis than the input holds whole inputs: each run feeds one sample, without the sample
axis. Symbolic dims are bound from the data, consistently across inputs; static dims must match.
Types are cast when that is safe: any float to float, integer to float, integer (or bool) to
integer when every value fits. Anything else, like an unknown or missing input, a wrong rank, a
wrong static dim, an unsafe type, different sample counts between inputs, an empty folder or an
unreadable file, raises :class:`CalibrationError` with a one-line message naming the file and the
input. Files are read with ``allow_pickle=False``: calibration data never runs code.

**Image preprocessing** (``--preprocess``): comma-separated ``key=value`` pairs, lists
separated by ``|``; every key is optional::

    resize=HxW | S     resize to H x W pixels (S: S x S); default: the input's static H and W
                       (images keep their size when those are symbolic)
    crop=HxW | S       center crop after resizing; default: none
    layout=L           nchw | nhwc | chw | hwc | nhw | hw: axis order of the model input
                       (n = batch axis); default: guessed from the input shape (the channel
                       axis is where the model has 1 or 3)
    grayscale=BOOL     convert to one channel; default: when the input has 1 channel or none
    scale=F            pixel values 0..255 are divided by F first; default 255 for float
                       inputs, 1 for integer inputs (whose pixels then pass through unchanged)
    mean=F|F|F         subtracted per channel (one value = all channels); default 0
    std=F|F|F          divides per channel after the mean; default 1
    interp=NAME        bilinear | nearest | bicubic | lanczos; default bilinear

    value = (pixel / scale - mean) / std
    e.g.  resize=224x224,layout=nchw,mean=0.485|0.456|0.406,std=0.229|0.224|0.225
"""

from __future__ import annotations

import logging
import math
import os
import re
import zipfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from edgeopt.ir import DataType, Model, Value, format_shape

from ._base import CalibrationError
from ._calib_images import Preprocess, load_image, parse_preprocess, unreadable

__all__ = ["CalibrationData", "CalibrationError", "Preprocess", "load_calibration",
           "parse_preprocess", "random_calibration", "synthetic_dims"]

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".pgm", ".ppm", ".pnm", ".tif",
                              ".tiff", ".webp"})
DATA_EXTENSIONS = frozenset({".npy", ".npz", ".pb"})
DEFAULT_RANDOM_SAMPLES = 8


# -- the data ---------------------------------------------------------------------------------
class CalibrationData:
    """Calibration samples: input name -> array whose axis 0 indexes samples.

    Build it with :func:`load_calibration`, :func:`random_calibration` or
    :meth:`for_model` (which checks the arrays against a model); the constructor itself only
    checks that the inputs agree on the sample count.

    Args:
        arrays: input name -> samples.
        fixed_batch: samples every run must take (a static batch dim), or None for any.
        unbatched: inputs fed one sample per run with the sample axis removed.
        synthetic: the samples are random (``--calib random``).
        source: where the samples came from (for messages).

    Raises:
        CalibrationError: no inputs, no samples, or inputs with different sample counts.
    """

    def __init__(self, arrays: Mapping[str, np.ndarray], *, fixed_batch: int | None = None,
                 unbatched: Iterable[str] = (), synthetic: bool = False,
                 source: str = "<arrays>") -> None:
        self.arrays = {name: np.asarray(a) for name, a in arrays.items()}
        self.unbatched = frozenset(unbatched)
        self.fixed_batch = 1 if self.unbatched else fixed_batch
        self.synthetic = synthetic
        self.source = source
        if not self.arrays:
            raise CalibrationError(f"{source}: no inputs in the calibration data")
        counts = {n: (a.shape[0] if a.ndim else 0) for n, a in self.arrays.items()}
        if len(set(counts.values())) > 1:
            listing = ", ".join(f"{n!r}: {c}" for n, c in counts.items())
            raise CalibrationError(f"{source}: inputs have different sample counts ({listing})")
        self._n = next(iter(counts.values()))
        if self._n == 0:
            raise CalibrationError(f"{source}: no samples for input {next(iter(counts))!r}")
        if self.fixed_batch and self._n % self.fixed_batch:
            raise CalibrationError(f"{source}: {self._n} samples is not a multiple of the "
                                   f"model's static batch size {self.fixed_batch}")

    @classmethod
    def for_model(cls, arrays: Mapping[str, Any], model: Model, source: str = "<arrays>",
                  synthetic: bool = False) -> CalibrationData:
        """Check arrays against the model's inputs, cast them, and wrap them.

        Raises:
            CalibrationError: an unknown or missing input, a wrong rank or static dim, an
                unsafe type, or inputs that disagree on sample counts or samples per run.
        """
        required, optional = _model_inputs(model)
        listing = ", ".join(repr(v.name) for v in required) or "none"
        by_name = {v.name: v for v in [*required, *optional]}
        for name in arrays:
            if name not in by_name:
                raise CalibrationError(f"{source}: unknown input {name!r} (model inputs: "
                                       f"{listing})")
        for v in required:
            if v.name not in arrays:
                raise CalibrationError(f"{source}: missing input {v.name!r} (model inputs: "
                                       f"{listing})")
        bindings: dict[str, int] = {}
        fitted, per_run = {}, {}
        for name, arr in arrays.items():
            fitted[name] = _cast(np.asarray(arr), by_name[name].dtype, source, name)
            per_run[name] = _check_shape(fitted[name], by_name[name], source, bindings)
        counts = {n: a.shape[0] for n, a in fitted.items()}
        if len(set(counts.values())) > 1:
            listing = ", ".join(f"{n!r}: {c}" for n, c in counts.items())
            raise CalibrationError(f"{source}: inputs have different sample counts ({listing})")
        runs = {n: max(p, 1) for n, p in per_run.items() if p is not None}
        if len(set(runs.values())) > 1:
            listing = ", ".join(f"{n!r}: {c}" for n, c in runs.items())
            raise CalibrationError(f"{source}: inputs need different numbers of samples per "
                                   f"run ({listing})")
        for name, k in runs.items():
            if counts[name] % k:
                raise CalibrationError(f"{source}: {counts[name]} samples of input {name!r} "
                                       f"is not a multiple of its static batch size {k}")
        return cls(fitted, fixed_batch=next(iter(runs.values()), None),
                   unbatched=[n for n, p in per_run.items() if p == 0], synthetic=synthetic,
                   source=source)

    @property
    def num_samples(self) -> int:
        """Number of samples (the common length of axis 0)."""
        return self._n

    @property
    def input_names(self) -> list[str]:
        """Names of the inputs the data feeds."""
        return list(self.arrays)

    @property
    def nbytes(self) -> int:
        """Bytes held by the arrays."""
        return sum(a.nbytes for a in self.arrays.values())

    def samples_per_run(self, batch_size: int) -> int:
        """How many samples one model run takes when ``batch_size`` is asked for."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, not {batch_size}")
        return self.fixed_batch or batch_size

    def batches(self, batch_size: int = 8) -> Iterator[dict[str, np.ndarray]]:
        """Feed dicts of ``batch_size`` samples (the last may be smaller).

        A static batch dim overrides ``batch_size``; unbatched inputs are fed one sample at
        a time without the sample axis.
        """
        step = self.samples_per_run(batch_size)
        for start in range(0, self._n, step):
            # arr[i, ...] keeps a 0-d array (arr[i] of a 1-D array is a numpy scalar).
            yield {name: arr[start, ...] if name in self.unbatched else arr[start:start + step]
                   for name, arr in self.arrays.items()}

    def run_shapes(self) -> dict[str, tuple[int, ...]]:
        """The shape of each input in one run of one sample (a static batch: one batch).

        What the data binds the model's symbolic dims to, e.g. for MAC counts.
        """
        return {name: tuple(arr.shape[1:]) if name in self.unbatched else
                (self.fixed_batch or 1, *arr.shape[1:]) for name, arr in self.arrays.items()}

    def subset(self, n: int) -> CalibrationData:
        """The first ``n`` samples (rounded down to a whole static batch, at least one)."""
        if n < 1:
            raise CalibrationError(f"{self.source}: the number of samples must be at least 1, "
                                   f"not {n}")
        n = min(n, self._n)
        if self.fixed_batch:
            n = max(self.fixed_batch, n - n % self.fixed_batch)
        if n == self._n:
            return self
        return CalibrationData({k: a[:n] for k, a in self.arrays.items()},
                               fixed_batch=self.fixed_batch, unbatched=self.unbatched,
                               synthetic=self.synthetic, source=self.source)

    def describe(self) -> str:
        """One line: ``8 samples from calib.npz: x float32[8,3,32,32]``."""
        kind = "synthetic samples" if self.synthetic else "samples"
        arrays = ", ".join(f"{n} {a.dtype}[{','.join(map(str, a.shape))}]"
                           for n, a in self.arrays.items())
        return f"{self._n} {kind} from {self.source}: {arrays}"

    def __repr__(self) -> str:
        return f"CalibrationData({self.describe()})"


def _model_inputs(model: Model) -> tuple[list[Value], list[Value]]:
    """(inputs that need data, inputs with an initializer default that data may override)."""
    inputs = list(model.graph.inputs)
    return ([v for v in inputs if not v.is_initializer()],
            [v for v in inputs if v.is_initializer()])


def _cast(arr: np.ndarray, dtype: DataType | None, source: str, name: str) -> np.ndarray:
    """``arr`` as the input's numpy type, if the conversion loses nothing that matters."""
    if dtype is None:
        return arr
    try:
        target = dtype.numpy()
    except TypeError:  # no numpy counterpart: let ONNX Runtime judge
        return arr
    if arr.dtype == target:
        return arr
    src, dst = arr.dtype.kind, target.kind
    want = dtype.name.lower()
    if dst == "f" and src in "fiu":
        return arr.astype(target)
    if dst in "iu" and src in "iub":
        info = np.iinfo(target)
        if arr.size and (arr.min() < info.min or arr.max() > info.max):
            raise CalibrationError(f"{source}: input {name!r} expects {want}, got {arr.dtype} "
                                   f"values outside its range")
        return arr.astype(target)
    raise CalibrationError(f"{source}: input {name!r} expects {want}, got {arr.dtype} "
                           "(no safe cast)")


from edgeopt.ir.shapes import ANONYMOUS_DIMS  # noqa: E402 - re-exported for callers


def _check_shape(arr: np.ndarray, value: Value, source: str,
                 bindings: dict[str, int]) -> int | None:
    """Check ``arr`` against the input's shape.

    Returns:
        Samples per run: None (a symbolic batch dim), the static batch size, or 0 when the
        array stacks whole inputs (one sample per run, fed without the sample axis).
    """
    shape, name = value.shape, value.name
    if shape is None:  # unknown rank: nothing to check, axis 0 taken as the batch axis
        if arr.ndim == 0:
            raise CalibrationError(f"{source}: input {name!r} got a scalar, not samples")
        return None
    rank = len(shape)
    if rank and arr.ndim == rank:
        dims, per_run = zip(range(1, rank), arr.shape[1:], shape[1:], strict=True), shape[0]
        per_run = per_run if isinstance(per_run, int) else None
    elif arr.ndim == rank + 1:
        dims, per_run = zip(range(rank), arr.shape[1:], shape, strict=True), 0
    else:
        expected = f"rank {rank}, or {rank + 1} with a leading sample axis" if rank else \
            "rank 1 (the sample axis)"
        raise CalibrationError(f"{source}: input {name!r} has shape {format_shape(shape)}, got "
                               f"an array of shape {list(arr.shape)} (expected {expected})")
    for axis, got, want in dims:
        if isinstance(want, int) and got != want:
            raise CalibrationError(f"{source}: input {name!r} dim {axis} is {got}, the model "
                                   f"expects {want} (input shape {format_shape(shape)})")
        if isinstance(want, str) and want not in ANONYMOUS_DIMS \
                and bindings.setdefault(want, got) != got:
            raise CalibrationError(f"{source}: input {name!r} dim {axis} ({want!r}) is {got}, "
                                   f"but another input has {want!r} = {bindings[want]}")
    return per_run


# -- loading ----------------------------------------------------------------------------------
def load_calibration(spec: str | os.PathLike, model: Model, preprocess: str | None = None,
                     num_samples: int | None = None, seed: int = 0, *,
                     dim_values: Mapping[str, int] | None = None,
                     input_shapes: Mapping[str, Sequence[int]] | None = None
                     ) -> CalibrationData:
    """Load calibration data for ``model`` (the engine behind ``--calib``).

    Args:
        spec: a ``.npz`` file, a folder, a ``.npy``/``.pb``/image file, or ``random[:N]``
            (see the module documentation).
        model: the model whose inputs the data must fit.
        preprocess: image preprocessing spec (``--preprocess``); ignored without images.
        num_samples: keep at most this many samples (for ``random``: how many to draw).
        seed: seed of ``random``.
        dim_values: sizes of symbolic dims for ``random``, by dim name.
        input_shapes: full shapes of inputs for ``random`` (their axis 0 is the batch).

    Returns:
        The data, checked and cast to the model's input types.

    Raises:
        CalibrationError: the spec, a file, or the data's fit to the model is wrong.
    """
    spec = os.fspath(spec)
    if num_samples is not None and num_samples < 1:
        raise CalibrationError(f"{spec}: the number of samples must be at least 1, not "
                               f"{num_samples}")
    if spec == "random" or spec.startswith("random:"):
        count = spec.partition(":")[2]
        if count and not count.isdigit():
            raise CalibrationError(f"{spec}: expected random or random:N with N a number")
        n = num_samples or (int(count) if count else DEFAULT_RANDOM_SAMPLES)
        return random_calibration(model, n, seed, dim_values, input_shapes)
    pre = parse_preprocess(preprocess)
    if os.path.isdir(spec):
        files = _list_files(spec)
        if not files:
            raise CalibrationError(f"{spec}: no calibration files (.npy, .npz, .pb or images)")
    elif os.path.isfile(spec):
        files = [spec]
    else:
        raise CalibrationError(f"{spec}: no such file or folder (give a .npz file, a folder of "
                               "samples, or 'random')")
    # A .npz given directly has its samples on axis 0; a folder's files may hold one each.
    one_per_file = not (os.path.isfile(spec) and spec.lower().endswith(".npz"))
    reader = _FileReader(model, pre, num_samples, one_per_file)
    arrays = reader.read_all(files, spec)
    if preprocess and not reader.images:
        log.warning("--preprocess ignored: %s holds no images", spec)
    data = CalibrationData.for_model(arrays, model, spec)
    if num_samples is not None:
        data = data.subset(num_samples)
    log.info("calibration: %s", data.describe())
    return data


def synthetic_dims(value: Value, input_shapes: Mapping[str, Sequence[int]] | None = None,
                   dim_values: Mapping[str, int] | None = None) -> list[int]:
    """The dims of one run of synthetic data for graph input ``value``.

    Static dims are kept; the shape in ``input_shapes`` (by input name) wins; a symbolic dim
    named in ``dim_values`` takes its size; a symbolic axis 0 (the batch) is 1. Any other
    symbolic dim has no sensible default (an image model's height and width), so it is an
    error naming the input and the fix.

    Raises:
        CalibrationError: the shape is unknown, a given shape does not fit the input, or a
            symbolic dim besides the batch has no size.
    """
    if value.shape is None:
        raise CalibrationError(f"random: cannot synthesize input {value.name!r}: its shape is "
                               "unknown")
    given = (input_shapes or {}).get(value.name)
    if given is not None:
        given = [int(d) for d in given]
        if len(given) != len(value.shape) or any(
                isinstance(d, int) and d != g for d, g in zip(value.shape, given, strict=True)):
            raise CalibrationError(f"input shape {value.name}:{'x'.join(map(str, given))} "
                                   f"does not fit the input's {format_shape(value.shape)}")
        return given
    sizes = dict(dim_values or {})
    dims: list[int] = []
    free = []
    for axis, d in enumerate(value.shape):
        if isinstance(d, int):
            dims.append(d)
        elif isinstance(d, str) and d in sizes:
            dims.append(int(sizes[d]))
        else:  # the batch is 1 per run; any other unsized dim is an error below
            dims.append(1)
            if axis:
                free.append(axis)
    if free:
        example = "x".join(f"D{i}" if i in free else str(n) for i, n in enumerate(dims))
        raise CalibrationError(
            f"random: input {value.name!r} {format_shape(value.shape)} has symbolic dims "
            f"besides the batch, and random samples need their sizes: give the shape to "
            f"run at, e.g. --input-shape {value.name}:{example} "
            f"({', '.join(f'D{i}' for i in free)}: the sizes of your real inputs)")
    return dims


def random_calibration(model: Model, num_samples: int = DEFAULT_RANDOM_SAMPLES, seed: int = 0,
                       dim_values: Mapping[str, int] | None = None,
                       input_shapes: Mapping[str, Sequence[int]] | None = None
                       ) -> CalibrationData:
    """Seeded synthetic samples shaped like the model's inputs (``--calib random``).

    Args:
        model: the model.
        num_samples: how many samples (rounded up to a whole static batch).
        seed: random seed.
        dim_values: sizes of symbolic dims, by dim name.
        input_shapes: full shapes of inputs (one run); their axis 0 is the batch, which the
            samples replace unless the model's batch is static.

    Raises:
        CalibrationError: an input's shape or element type is unknown or not synthesizable,
            or a symbolic dim besides the batch has no size (see :func:`synthetic_dims`).
    """
    rng = np.random.default_rng(seed)
    arrays = {}
    for v in _model_inputs(model)[0]:
        if v.dtype is None:
            raise CalibrationError(f"random: cannot synthesize input {v.name!r}: its element "
                                   "type is unknown")
        dims = synthetic_dims(v, input_shapes, dim_values)
        if dims:  # samples run along the batch axis, in whole static batches
            batch = v.shape[0] if isinstance(v.shape[0], int) and v.shape[0] > 0 else 1
            dims[0] = math.ceil(num_samples / batch) * batch
        else:
            dims = [num_samples]
        arrays[v.name] = _random_array(rng, v, dims)
    log.warning("calibration data is RANDOM (--calib random, seed %d): %d synthetic samples; "
                "activation statistics, importance scores and quantization ranges will not "
                "reflect real inputs", seed, num_samples)
    return CalibrationData.for_model(arrays, model, "random", synthetic=True)


def _random_array(rng: np.random.Generator, value: Value, dims: list[int]) -> np.ndarray:
    try:
        dtype = value.dtype.numpy()  # type: ignore[union-attr]
    except TypeError:
        dtype = np.dtype(object)
    if dtype.kind == "f":
        return rng.standard_normal(dims).astype(dtype)
    if dtype.kind == "b":
        return rng.integers(0, 2, dims).astype(np.bool_)
    if dtype.kind in "iu":
        return rng.integers(0, 10, dims).astype(dtype)
    raise CalibrationError(f"random: cannot synthesize input {value.name!r} of type "
                           f"{value.dtype.name.lower()}")  # type: ignore[union-attr]


def _natural_key(name: str) -> list[Any]:
    return [int(p) if p.isdigit() else p.lower() for p in re.split(r"(\d+)", name)]


def _list_files(folder: str) -> list[str]:
    """Known calibration files of ``folder``, then of its sub-folders (one level)."""
    def entries(path: str) -> list[os.DirEntry]:
        with os.scandir(path) as it:
            return sorted((e for e in it if not e.name.startswith(".")),
                          key=lambda e: _natural_key(e.name))

    def known(path: str) -> list[str]:
        out = []
        for e in entries(path):
            ext = os.path.splitext(e.name)[1].lower()
            if e.is_file() and (ext in DATA_EXTENSIONS or ext in IMAGE_EXTENSIONS):
                out.append(e.path)
            elif e.is_file():
                log.debug("calibration: skipping %s (unknown extension)", e.path)
        return out

    files = known(folder)
    for e in entries(folder):
        if e.is_dir():
            files.extend(known(e.path))
    return files


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", name)


class _FileReader:
    """Reads calibration files into per-input lists of arrays, checking each against the model.

    Each file is checked as it is read, so that a bad shape or type is reported with the name
    of the file that holds it.
    """

    def __init__(self, model: Model, pre: Preprocess, limit: int | None,
                 one_per_file: bool = True) -> None:
        self.required, optional = _model_inputs(model)
        self.by_name = {v.name: v for v in [*self.required, *optional]}
        self.pre = pre
        self.limit = limit
        self.one_per_file = one_per_file
        self.images = 0
        self.bindings: dict[str, int] = {}
        self.parts: dict[str, list[tuple[str, np.ndarray]]] = {}

    def read_all(self, files: list[str], source: str) -> dict[str, np.ndarray]:
        """Read ``files`` (stopping once every input has ``limit`` samples) and concatenate."""
        counts: dict[str, int] = {}
        for path in files:
            if self.limit is not None and self.required and all(
                    counts.get(v.name, 0) >= self.limit for v in self.required):
                break
            for name, arr in self.read(path).items():
                value = self.by_name[name]
                if self.one_per_file and value.shape is not None \
                        and arr.ndim == max(len(value.shape) - 1, 0):
                    arr = arr[np.newaxis]  # one sample without the batch (or sample) axis
                arr = _cast(arr, value.dtype, path, name)
                _check_shape(arr, value, path, self.bindings)
                self.parts.setdefault(name, []).append((path, arr))
                counts[name] = counts.get(name, 0) + arr.shape[0]
        return {name: self._concat(name, parts) for name, parts in self.parts.items()}

    @staticmethod
    def _concat(name: str, parts: list[tuple[str, np.ndarray]]) -> np.ndarray:
        first_path, first = parts[0]
        for path, arr in parts[1:]:
            if arr.shape[1:] != first.shape[1:]:
                raise CalibrationError(f"{path}: input {name!r} has sample shape "
                                       f"{list(arr.shape[1:])}, but {first_path} has "
                                       f"{list(first.shape[1:])}")
        if len(parts) == 1:
            return first
        return np.concatenate([a for _, a in parts], axis=0)

    def read(self, path: str) -> dict[str, np.ndarray]:
        """The arrays of one file, keyed by input name."""
        ext = os.path.splitext(path)[1].lower()
        stem = os.path.splitext(os.path.basename(path))[0]
        if ext == ".npz":
            return self._keyed(path, _load_npz(path))
        if ext == ".npy":
            return {self._input_for(stem, path, ext): _load_npy(path)}
        if ext == ".pb":
            if stem.startswith("output_"):
                return {}
            tensor_name, arr = _load_pb(path)
            return {self._pb_input(tensor_name, stem, path): arr}
        if ext in IMAGE_EXTENSIONS:
            name = self._input_for(stem, path, ext)
            self.images += 1
            return {name: load_image(path, self.by_name[name], self.pre)}
        raise CalibrationError(f"{path}: unsupported calibration file type {ext or '(none)'!r} "
                               "(use .npz, .npy, .pb or an image)")

    def _listing(self) -> str:
        return ", ".join(repr(v.name) for v in self.required) or "none"

    def _keyed(self, path: str, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if list(arrays) == ["arr_0"] and len(self.required) == 1 and "arr_0" not in self.by_name:
            return {self.required[0].name: arrays["arr_0"]}  # np.savez(path, array)
        for key in arrays:
            if key not in self.by_name:
                raise CalibrationError(f"{path}: unknown input {key!r} (model inputs: "
                                       f"{self._listing()})")
        return arrays

    def _input_for(self, stem: str, path: str, ext: str) -> str:
        if len(self.required) == 1:
            return self.required[0].name
        best: str | None = None
        for name in self.by_name:
            key = _safe_name(name)
            if (stem == key or stem.startswith(key + "_")) and (
                    best is None or len(key) > len(_safe_name(best))):
                best = name
        if best is None:
            raise CalibrationError(f"{path}: cannot tell which input this file is for; name it "
                                   f"<input>{ext} or <input>_<n>{ext} with <input> one of "
                                   f"{self._listing()}")
        return best

    def _pb_input(self, tensor_name: str, stem: str, path: str) -> str:
        if tensor_name in self.by_name:
            return tensor_name
        m = re.fullmatch(r"input_(\d+)", stem)
        if m and int(m.group(1)) < len(self.required):
            return self.required[int(m.group(1))].name
        if len(self.required) == 1 and not m:
            return self.required[0].name
        raise CalibrationError(f"{path}: cannot tell which input this tensor is for (tensor "
                               f"name {tensor_name!r}, model inputs: {self._listing()})")


def _load_npz(path: str) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as z:
            if not isinstance(z, np.lib.npyio.NpzFile):
                raise ValueError("not an .npz archive")
            return {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError) as e:
        raise unreadable(path, e) from None


def _load_npy(path: str) -> np.ndarray:
    try:
        arr = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise unreadable(path, e) from None
    if not isinstance(arr, np.ndarray):
        raise unreadable(path, ValueError("not an .npy array"))
    return arr


def _load_pb(path: str) -> tuple[str, np.ndarray]:
    import onnx
    from google.protobuf.message import DecodeError
    from onnx import numpy_helper

    tensor = onnx.TensorProto()
    try:
        with open(path, "rb") as f:
            tensor.ParseFromString(f.read())
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            raise ValueError("external tensor data is not supported")
        DataType.parse(tensor.data_type)
        return tensor.name, numpy_helper.to_array(tensor)
    except (OSError, ValueError, TypeError, DecodeError) as e:
        raise unreadable(path, e) from None
