"""Fetch the real PP-OCRv4 det/rec/cls ONNX models used as third-party test models.

The models are not downloaded from a model hub: they are the ``.onnx`` files
shipped inside the pure-Python ``rapidocr-onnxruntime`` wheel on PyPI. This
script downloads that wheel (pinned to :data:`WHEEL_VERSION`) with
``python -m pip download --no-deps`` into a temporary directory, extracts only
the three model files from the wheel zip, checks each one against a pinned
SHA-256 and moves it into the cache with :func:`os.replace`, so the cache never
holds a partially written or unverified file.

If all three files are already in the cache with the right hashes, nothing is
downloaded and no network access happens.

Cache directory (the directory the ``.onnx`` files are written into):

* ``--cache DIR`` / ``fetch_ppocr(cache_dir=DIR)`` if given, else
* ``$EDGEOPT_CACHE/models/ppocrv4`` if ``EDGEOPT_CACHE`` is set, else
* ``~/.cache/edgeopt/models/ppocrv4``.

Command line::

    python tools/fetch_models.py [--cache DIR] [--quiet]

prints one ``<role>: <path>`` line per model (``det``, ``rec``, ``cls``) on
stdout and exits with status 0. On failure (pip cannot download the wheel,
e.g. when offline, or a hash does not match) it prints a one-line error on
stderr and exits with status 1.

From Python::

    from edgeopt.tools.fetch_models import fetch_ppocr   # or load by file path
    paths = fetch_ppocr()          # {"det": Path, "rec": Path, "cls": Path}

Only the standard library is used; pip is run as a subprocess of the current
interpreter (:data:`sys.executable`).
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import pathlib
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass

__all__ = [
    "MODELS",
    "WHEEL_NAME",
    "WHEEL_SHA256",
    "WHEEL_VERSION",
    "FetchError",
    "ModelFile",
    "default_cache_dir",
    "fetch_ppocr",
    "main",
]

logger = logging.getLogger(__name__)

#: PyPI distribution that ships the models.
WHEEL_NAME = "rapidocr-onnxruntime"
#: Pinned wheel version (``rapidocr_onnxruntime-1.4.4-py3-none-any.whl``).
WHEEL_VERSION = "1.4.4"
#: SHA-256 of the pinned wheel file, for information (the model hashes below
#: are what is verified).
WHEEL_SHA256 = "971d7d5f223a7a808662229df1ef69893809d8457d834e6373d3854bc1782cbf"

#: The wheel declares ``Requires-Python: >=3.6,<3.13``; pip refuses to download
#: it for a newer interpreter unless told which Python it is meant for. The
#: models do not depend on the interpreter, so always ask for this one.
_PIP_TARGET_PYTHON = "3.11"

#: Seconds to wait for ``pip download`` before giving up.
_PIP_TIMEOUT_S = 900

_CHUNK = 1 << 20


@dataclass(frozen=True)
class ModelFile:
    """One model file shipped in the wheel.

    Attributes:
        member: Path of the file inside the wheel zip.
        sha256: Expected lowercase hex SHA-256 of the file's contents.
        size: Expected size in bytes.
    """

    member: str
    sha256: str
    size: int

    @property
    def filename(self) -> str:
        """Base name the file is stored under in the cache."""
        return self.member.rsplit("/", 1)[-1]


#: The three PP-OCR models, keyed by role.
MODELS: dict[str, ModelFile] = {
    "det": ModelFile(
        member="rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx",
        sha256="d2a7720d45a54257208b1e13e36a8479894cb74155a5efe29462512d42f49da9",
        size=4745517,
    ),
    "rec": ModelFile(
        member="rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx",
        sha256="48fc40f24f6d2a207a2b1091d3437eb3cc3eb6b676dc3ef9c37384005483683b",
        size=10857958,
    ),
    "cls": ModelFile(
        member="rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx",
        sha256="e47acedf663230f8863ff1ab0e64dd2d82b838fceb5957146dab185a89d6215c",
        size=585532,
    ),
}


class FetchError(RuntimeError):
    """Raised when the models cannot be fetched or fail verification."""


def default_cache_dir() -> pathlib.Path:
    """Return the default directory the model files are cached in.

    Returns:
        ``$EDGEOPT_CACHE/models/ppocrv4`` if the ``EDGEOPT_CACHE`` environment
        variable is set and non-empty, else ``~/.cache/edgeopt/models/ppocrv4``.
    """
    root = os.environ.get("EDGEOPT_CACHE")
    base = pathlib.Path(root).expanduser() if root else pathlib.Path.home() / ".cache" / "edgeopt"
    return base / "models" / "ppocrv4"


def _sha256_file(path: pathlib.Path) -> str:
    """Compute the SHA-256 of a file.

    Args:
        path: File to hash.

    Returns:
        Lowercase hex digest.
    """
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _is_cached(path: pathlib.Path, model: ModelFile) -> bool:
    """Tell whether ``path`` already holds the expected model file.

    Args:
        path: Location of the file in the cache.
        model: Expected file description.

    Returns:
        True if the file exists with the expected size and SHA-256.
    """
    try:
        if not path.is_file() or path.stat().st_size != model.size:
            return False
        actual = _sha256_file(path)
    except OSError:
        return False
    if actual != model.sha256:
        logger.warning(
            "cached %s has SHA-256 %s, expected %s; fetching it again",
            path,
            actual,
            model.sha256,
        )
        return False
    return True


def _pip_error_line(stderr: str, stdout: str) -> str:
    """Pick the most telling single line from pip's output.

    Args:
        stderr: pip's standard error.
        stdout: pip's standard output.

    Returns:
        The last ``ERROR:`` line if any, else the last non-empty line, cut to
        300 characters (``"no output"`` if pip printed nothing), with a hint
        appended when pip saw no version at all (typically offline).
    """
    lines = [ln.strip() for ln in (stderr + "\n" + stdout).splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("ERROR:")]
    line = (errors or lines or ["no output"])[-1]
    if len(line) > 300:
        line = line[:297] + "..."
    if "(from versions: none)" in stderr + stdout:
        line += " (no versions found at all: is the package index reachable?)"
    return line


def _download_wheel(dest: pathlib.Path) -> pathlib.Path:
    """Download the pinned wheel into ``dest`` with ``pip download``.

    Args:
        dest: Empty directory to download into.

    Returns:
        Path of the downloaded wheel file.

    Raises:
        FetchError: If pip cannot be run, fails, times out, or leaves no wheel.
    """
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--python-version",
        _PIP_TARGET_PYTHON,
        "--no-input",
        "--disable-pip-version-check",
        "-d",
        str(dest),
        f"{WHEEL_NAME}=={WHEEL_VERSION}",
    ]
    logger.info("downloading %s==%s with pip", WHEEL_NAME, WHEEL_VERSION)
    logger.debug("running %s", " ".join(cmd))
    try:
        proc = subprocess.run(
            cmd,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=_PIP_TIMEOUT_S,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise FetchError(
            f"pip download of {WHEEL_NAME}=={WHEEL_VERSION} timed out after {_PIP_TIMEOUT_S} s"
        ) from exc
    except OSError as exc:
        raise FetchError(f"cannot run pip ({sys.executable} -m pip): {exc}") from exc
    if proc.returncode != 0:
        raise FetchError(
            f"pip download of {WHEEL_NAME}=={WHEEL_VERSION} failed "
            f"(exit {proc.returncode}): {_pip_error_line(proc.stderr, proc.stdout)}"
        )
    prefix = f"{WHEEL_NAME.replace('-', '_')}-{WHEEL_VERSION}-"
    wheels = sorted(p for p in dest.glob("*.whl") if p.name.startswith(prefix))
    if not wheels:
        found = ", ".join(sorted(p.name for p in dest.iterdir())) or "nothing"
        raise FetchError(
            f"pip download reported success but no {prefix}*.whl was saved (found: {found})"
        )
    logger.info("downloaded %s", wheels[0].name)
    return wheels[0]


def _extract_to_temp(
    wheel: zipfile.ZipFile, model: ModelFile, cache_dir: pathlib.Path
) -> pathlib.Path:
    """Extract one model into a temporary file in ``cache_dir`` and verify it.

    Args:
        wheel: The opened wheel.
        model: The file to extract.
        cache_dir: Cache directory (the temp file is created there so that the
            final :func:`os.replace` is atomic).

    Returns:
        Path of the verified temporary file. The caller owns it.

    Raises:
        FetchError: If the member is missing from the wheel, cannot be
            written, or its SHA-256 does not match the pinned one. No
            temporary file is left behind in that case.
    """
    try:
        info = wheel.getinfo(model.member)
    except KeyError as exc:
        raise FetchError(
            f"{model.member} not found in {WHEEL_NAME}=={WHEEL_VERSION} wheel"
        ) from exc
    fd, tmp_name = tempfile.mkstemp(prefix=f".{model.filename}.", suffix=".part", dir=cache_dir)
    tmp = pathlib.Path(tmp_name)
    try:
        digest = hashlib.sha256()
        with os.fdopen(fd, "wb") as out, wheel.open(info) as src:
            for chunk in iter(lambda: src.read(_CHUNK), b""):
                digest.update(chunk)
                out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
        actual = digest.hexdigest()
        if actual != model.sha256:
            raise FetchError(
                f"SHA-256 mismatch for {model.filename}: expected {model.sha256}, got {actual}"
            )
        os.chmod(tmp, 0o644)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, (OSError, zipfile.BadZipFile)):
            raise FetchError(f"cannot extract {model.filename}: {exc}") from exc
        raise
    return tmp


def fetch_ppocr(cache_dir: str | os.PathLike[str] | None = None) -> dict[str, pathlib.Path]:
    """Make sure the PP-OCRv4 det/rec/cls ONNX models are in the cache.

    If every file is already cached with the pinned SHA-256, returns at once
    without touching the network. Otherwise downloads the pinned
    ``rapidocr-onnxruntime`` wheel with pip, extracts the missing or corrupt
    models to temporary files in the cache directory, verifies all of them,
    and only then moves them into place with :func:`os.replace`.

    Args:
        cache_dir: Directory to store the ``.onnx`` files in. ``None`` means
            :func:`default_cache_dir`.

    Returns:
        Mapping ``{"det": path, "rec": path, "cls": path}`` of absolute paths
        to the verified model files.

    Raises:
        FetchError: If the cache directory cannot be created, pip fails (for
            example offline), the wheel is unreadable, or a file's SHA-256
            does not match the pinned value.
    """
    directory = (
        pathlib.Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    )
    directory = directory.absolute()
    paths = {role: directory / model.filename for role, model in MODELS.items()}

    missing = [role for role, model in MODELS.items() if not _is_cached(paths[role], model)]
    if not missing:
        logger.info("PP-OCR models already cached in %s", directory)
        return paths

    with tempfile.TemporaryDirectory(prefix="edgeopt-fetch-") as tmp_dl:
        wheel_path = _download_wheel(pathlib.Path(tmp_dl))
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise FetchError(f"cannot create cache directory {directory}: {exc}") from exc
        staged: dict[str, pathlib.Path] = {}
        try:
            try:
                wheel = zipfile.ZipFile(wheel_path)
            except (OSError, zipfile.BadZipFile) as exc:
                raise FetchError(f"cannot open wheel {wheel_path.name}: {exc}") from exc
            with wheel:
                for role in missing:
                    staged[role] = _extract_to_temp(wheel, MODELS[role], directory)
            for role in missing:
                os.replace(staged.pop(role), paths[role])
                logger.info("cached %s model at %s", role, paths[role])
        except OSError as exc:
            raise FetchError(f"cannot write to cache directory {directory}: {exc}") from exc
        finally:
            for tmp in staged.values():
                tmp.unlink(missing_ok=True)
    return paths


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point.

    Args:
        argv: Arguments without the program name; ``None`` means
            ``sys.argv[1:]``.

    Returns:
        Process exit status: 0 on success, 1 on a fetch error, 130 if
        interrupted.
    """
    parser = argparse.ArgumentParser(
        prog="fetch_models.py",
        description=(
            f"Fetch the PP-OCRv4 det/rec/cls ONNX models shipped in the "
            f"{WHEEL_NAME}=={WHEEL_VERSION} wheel into a local cache and print "
            f"their paths."
        ),
    )
    parser.add_argument(
        "--cache",
        metavar="DIR",
        default=None,
        help=(
            "directory to store the .onnx files in (default: "
            "$EDGEOPT_CACHE/models/ppocrv4, else ~/.cache/edgeopt/models/ppocrv4)"
        ),
    )
    parser.add_argument(
        "--quiet",
        action="store_true",
        help="log only warnings and errors (the paths are still printed)",
    )
    args = parser.parse_args(argv)

    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO,
        format="fetch_models: %(message)s",
        stream=sys.stderr,
    )
    try:
        paths = fetch_ppocr(args.cache)
    except FetchError as exc:
        print(f"fetch_models: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("fetch_models: error: interrupted", file=sys.stderr)
        return 130
    for role, path in paths.items():
        print(f"{role}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
