"""Cross-compile C for a Cortex-M4F and run it on QEMU's ``mps2-an386`` board (issue 7).

This is the test bench for the C backend: it builds generated code with our own start-up file
(``mcu/startup.c``), linker script (``mcu/mps2_an386.ld``) and semihosted test program
(``mcu/harness.c``), runs the image under ``qemu-system-arm`` and reads back its output.

Running the ``mcu`` tests locally (Debian/Ubuntu)::

    PKGS="gcc-arm-none-eabi libnewlib-arm-none-eabi qemu-system-arm"
    sudo apt-get install --no-install-recommends $PKGS  # ~0.9 GB (3.2 GB with recommends)
    python -m pytest -m mcu -q tests/backends/test_mcu.py

Without those packages the tests skip with a message naming what is missing; see
:func:`toolchain_missing_reason`.

The program under test provides::

    int eo_test_run(const void *in, size_t in_bytes, void *out, size_t out_bytes);

returning the number of output bytes written (``0..out_bytes``) or a negative status. The
harness reads ``eo_in.bin``, calls it, writes ``eo_out.bin`` and ``eo_stats.txt`` (timer ticks
spent in ``eo_test_run``) in QEMU's working directory, and returns 0, or 10 (input), 11 (output),
12 (heap) or 13 (``eo_test_run`` < 0). A fault prints its name, pc and fault status registers on
stderr and exits with 240 + exception number (HardFault: 243). QEMU's exit status is main's
return value (semihosting ``SYS_EXIT_EXTENDED``).

Memory map (mps2-an386 as QEMU models it; both regions are RAM in QEMU):

=============  ============  =======  ===============================================
region         origin        size     contents
=============  ============  =======  ===============================================
"flash"        0x00000000    4 MiB    vectors, .text, .rodata*, .edgeopt*, .data image
RAM            0x20000000    4 MiB    .data, .bss, heap (>= 64 KiB), stack (64 KiB)
=============  ============  =======  ===============================================

Put constants in flash with ``const`` (``.rodata*``) or a section named ``.edgeopt``,
``.edgeopt.*`` or ``.edgeopt_*``; the link fails on any section the script does not place.

Instruction counts: ``run_detailed(..., icount=True)`` runs QEMU with ``-icount shift=0`` (one
instruction per virtual nanosecond) and converts the 25 MHz timer ticks the harness measured
around ``eo_test_run`` into instructions (40 per tick, so +-40 instructions).
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "CPU_FLAGS",
    "FLASH",
    "RAM",
    "McuBuildError",
    "McuError",
    "McuRun",
    "McuRunError",
    "McuTimeout",
    "Symbol",
    "Toolchain",
    "build",
    "run",
    "run_detailed",
    "size",
    "symbols",
    "toolchain",
    "toolchain_missing_reason",
]

MCU_DIR = Path(__file__).with_name("mcu")
STARTUP = MCU_DIR / "startup.c"
HARNESS = MCU_DIR / "harness.c"
LINKER_SCRIPT = MCU_DIR / "mps2_an386.ld"

#: (origin, size) of the two memory regions in the linker script.
FLASH = (0x0000_0000, 4 << 20)
RAM = (0x2000_0000, 4 << 20)

CPU_FLAGS = ("-mcpu=cortex-m4", "-mthumb", "-mfloat-abi=hard", "-mfpu=fpv4-sp-d16")
CFLAGS = (
    "-O2",
    "-std=c99",
    "-Wall",
    "-Wextra",
    "-Werror",
    "-ffunction-sections",
    "-fdata-sections",
)
LDFLAGS = (
    "--specs=rdimon.specs",
    "-nostartfiles",
    "-Wl,--gc-sections",
    "-Wl,--orphan-handling=error",
)
QEMU_ARGS = (
    "-M",
    "mps2-an386",
    "-nographic",
    "-monitor",
    "none",
    "-serial",
    "none",
    "-semihosting-config",
    "enable=on,target=native",
)

INPUT_FILE, OUTPUT_FILE, STATS_FILE = "eo_in.bin", "eo_out.bin", "eo_stats.txt"
TIMER_HZ = 25_000_000  # CMSDK APB timer 0 of the MPS2 images (QEMU's SYSCLK_FRQ)
INSNS_PER_TICK = 1_000_000_000 // TIMER_HZ  # under -icount shift=0: 1 instruction per ns
FAULT_EXIT_BASE = 240
HARNESS_EXITS = {
    10: "input file error",
    11: "output file error",
    12: "out of heap",
    13: "eo_test_run returned a negative status",
}
EXCEPTIONS = {2: "NMI", 3: "HardFault", 4: "MemManage", 5: "BusFault", 6: "UsageFault"}
PACKAGES = "gcc-arm-none-eabi libnewlib-arm-none-eabi qemu-system-arm"


class McuError(RuntimeError):
    """Base class of the errors of this module."""


class McuBuildError(McuError):
    """The cross-compiler or linker failed; the message holds its diagnostics."""


class McuRunError(McuError):
    """The program exited non-zero, faulted or produced no output.

    Attributes:
        returncode: QEMU's exit status (main's return value), or None after a timeout.
        stdout, stderr: what QEMU (the program's semihosted stdio) printed.
    """

    def __init__(self, message: str, returncode: int | None, stdout: str, stderr: str):
        super().__init__(message)
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr


class McuTimeout(McuRunError):
    """QEMU did not exit within the timeout (it was killed)."""


@dataclass(frozen=True)
class Toolchain:
    """Paths of the cross tools and QEMU."""

    gcc: str
    size: str
    objdump: str
    nm: str
    qemu: str


@functools.cache
def _probe() -> tuple[Toolchain | None, str]:
    """The toolchain, or None and the reason it is unusable."""
    names = {
        "gcc": "arm-none-eabi-gcc",
        "size": "arm-none-eabi-size",
        "objdump": "arm-none-eabi-objdump",
        "nm": "arm-none-eabi-nm",
        "qemu": "qemu-system-arm",
    }
    paths = {key: shutil.which(exe) for key, exe in names.items()}
    missing = [names[key] for key, path in paths.items() if path is None]
    if missing:
        return None, f"{', '.join(missing)} not found on PATH (apt-get install {PACKAGES})"
    specs = _output([paths["gcc"], *CPU_FLAGS, "-print-file-name=rdimon.specs"]).strip()
    if not os.path.isabs(specs):
        return None, "newlib's rdimon.specs not found (apt-get install libnewlib-arm-none-eabi)"
    machines = _output([paths["qemu"], "-machine", "help"])
    if not re.search(r"^mps2-an386\s", machines, re.MULTILINE):
        return None, f"{paths['qemu']} has no mps2-an386 machine (QEMU >= 5.2 needed)"
    return Toolchain(**paths), ""


def _output(cmd: Sequence[str]) -> str:
    """A command's stdout ('' if it fails to run)."""
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def toolchain() -> Toolchain | None:
    """The cross toolchain and QEMU, or None when any piece is missing (see the reason)."""
    return _probe()[0]


def toolchain_missing_reason() -> str:
    """Why :func:`toolchain` is None ('' when it is available)."""
    return _probe()[1]


def _require() -> Toolchain:
    tc, reason = _probe()
    if tc is None:
        raise McuError(f"mcu toolchain unavailable: {reason}")
    return tc


def build(
    sources: Iterable[str | os.PathLike],
    include_dirs: Iterable[str | os.PathLike] = (),
    out_dir: str | os.PathLike = ".",
    *,
    defines: Mapping[str, str | int | None] | None = None,
    cflags: Iterable[str] = (),
    name: str = "app",
    harness: bool = True,
) -> Path:
    """Compile and link ``sources`` with the start-up file, linker script and harness.

    Args:
        sources: C files of the program under test (it defines ``eo_test_run``).
        include_dirs: ``-I`` directories.
        out_dir: where ``<name>.elf`` and ``<name>.map`` go (created if needed).
        defines: ``-D`` macros; a None value defines the name without a value.
        cflags: extra compiler flags, after the defaults (``-O2``, ``-std=c99``, ``-Wall``, ...).
        name: base name of the image.
        harness: link ``mcu/harness.c`` (False: ``sources`` provide ``main``).

    Returns:
        The ELF path.

    Raises:
        McuBuildError: with the compiler's diagnostics.
        McuError: the toolchain is missing.
    """
    tc = _require()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    elf = out / f"{name}.elf"
    cmd = [tc.gcc, *CPU_FLAGS, *CFLAGS, *cflags]
    cmd += [f"-I{d}" for d in include_dirs]
    for key, value in (defines or {}).items():
        cmd.append(f"-D{key}" if value is None else f"-D{key}={value}")
    cmd += [str(STARTUP), *([str(HARNESS)] if harness else []), *map(str, sources)]
    cmd += ["-T", str(LINKER_SCRIPT), *LDFLAGS, f"-Wl,-Map={out / f'{name}.map'}", "-o", str(elf)]
    env = {**os.environ, "LC_ALL": "C"}  # ASCII quotes in diagnostics
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise McuBuildError(
            f"arm-none-eabi-gcc failed (exit {proc.returncode}):\n{proc.stderr.strip()}\n"
            f"command: {' '.join(cmd)}"
        )
    return elf


@dataclass(frozen=True)
class McuRun:
    """What one QEMU run produced.

    Attributes:
        output: the bytes ``eo_test_run`` wrote.
        ticks: 25 MHz timer ticks spent in ``eo_test_run`` (virtual time; meaningful as a
            cost measure only with ``icount``).
        instructions: ``ticks * 40`` under ``icount`` (+-40), else None.
        stdout, stderr: the program's semihosted stdio.
        seconds: host wall time of the QEMU process.
    """

    output: bytes
    ticks: int
    instructions: int | None
    stdout: str
    stderr: str
    seconds: float


def run_detailed(
    elf: str | os.PathLike, input_bytes: bytes, *, timeout: float = 60.0, icount: bool = False
) -> McuRun:
    """Run a harness image on QEMU mps2-an386 in a scratch directory.

    Args:
        elf: an image from :func:`build`.
        input_bytes: the content of the input file.
        timeout: seconds before QEMU is killed.
        icount: run with ``-icount shift=0`` and report instruction counts.

    Raises:
        McuTimeout: QEMU did not exit in time.
        McuRunError: non-zero exit (fault, harness error, main's status) or missing output;
            the message names the cause and carries QEMU's stderr.
    """
    tc = _require()
    cmd = [tc.qemu, *QEMU_ARGS, *(["-icount", "shift=0"] if icount else [])]
    cmd += ["-kernel", str(Path(elf).resolve())]
    with tempfile.TemporaryDirectory(prefix="edgeopt-mcu-") as tmp:
        work = Path(tmp)
        (work / INPUT_FILE).write_bytes(input_bytes)
        start = time.perf_counter()
        try:
            proc = subprocess.run(
                cmd,
                cwd=work,
                capture_output=True,
                text=True,
                timeout=timeout,
                stdin=subprocess.DEVNULL,
            )
        except subprocess.TimeoutExpired as exc:
            raise McuTimeout(
                f"qemu-system-arm timed out after {timeout:g} s running {elf}",
                None,
                _text(exc.stdout),
                _text(exc.stderr),
            ) from None
        seconds = time.perf_counter() - start
        if proc.returncode != 0:
            raise McuRunError(
                f"qemu-system-arm exited with status {proc.returncode} "
                f"({_describe_exit(proc.returncode)}) running {elf}; stderr:\n"
                f"{proc.stderr.strip()}",
                proc.returncode,
                proc.stdout,
                proc.stderr,
            )
        try:
            output = (work / OUTPUT_FILE).read_bytes()
            stats = (work / STATS_FILE).read_text()
        except OSError as exc:
            raise McuRunError(
                f"{elf} exited 0 but wrote no {exc.filename}; stderr:\n{proc.stderr.strip()}",
                proc.returncode,
                proc.stdout,
                proc.stderr,
            ) from None
    ticks = int(re.search(r"^ticks=(\d+)$", stats, re.MULTILINE).group(1))
    return McuRun(
        output=output,
        ticks=ticks,
        instructions=ticks * INSNS_PER_TICK if icount else None,
        stdout=proc.stdout,
        stderr=proc.stderr,
        seconds=seconds,
    )


def run(elf: str | os.PathLike, input_bytes: bytes, *, timeout: float = 60.0) -> bytes:
    """Run a harness image on QEMU and return its output bytes (see :func:`run_detailed`)."""
    return run_detailed(elf, input_bytes, timeout=timeout).output


def _text(data: bytes | str | None) -> str:
    if data is None:
        return ""
    return data if isinstance(data, str) else data.decode(errors="replace")


def _describe_exit(code: int) -> str:
    """A QEMU exit status in words."""
    if code >= FAULT_EXIT_BASE:
        exc = code - FAULT_EXIT_BASE
        return f"fault: {EXCEPTIONS.get(exc, f'exception {exc}')}"
    if code in HARNESS_EXITS:
        return f"harness: {HARNESS_EXITS[code]}"
    if code < 0:
        return f"QEMU killed by signal {-code}"
    return "main's return value, or a QEMU error"


def size(elf: str | os.PathLike) -> dict:
    """Flash and RAM use of an image, from ``arm-none-eabi-size -A``.

    Returns:
        ``{"flash": bytes, "ram": bytes, "sections": {name: {"size", "addr", "flash", "ram"}}}``
        over the allocated sections: flash counts code, constants and the ``.data`` load image;
        RAM counts ``.data`` and ``.bss`` (not the heap or stack). Non-allocated sections
        (debug information, ``.comment``) are left out.
    """
    tc = _require()
    sizes = subprocess.run(
        [tc.size, "-A", "-d", str(elf)], capture_output=True, text=True, check=True
    ).stdout
    flags = _section_flags(tc, elf)
    sections = {}
    for line in sizes.splitlines():
        m = re.match(r"^(\.\S+)\s+(\d+)\s+(\d+)\s*$", line)
        if not m or "ALLOC" not in flags.get(m.group(1), ()):
            continue
        name, nbytes, addr = m.group(1), int(m.group(2)), int(m.group(3))
        in_ram = RAM[0] <= addr < RAM[0] + RAM[1]
        loaded = "LOAD" in flags[name]
        sections[name] = {
            "size": nbytes,
            "addr": addr,
            "flash": nbytes if loaded else 0,
            "ram": nbytes if in_ram else 0,
        }
    return {
        "flash": sum(s["flash"] for s in sections.values()),
        "ram": sum(s["ram"] for s in sections.values()),
        "sections": sections,
    }


def _section_flags(tc: Toolchain, elf: str | os.PathLike) -> dict[str, set[str]]:
    """Section name -> flags (``ALLOC``, ``LOAD``, ...) from ``objdump -h``."""
    text = subprocess.run(
        [tc.objdump, "-h", str(elf)], capture_output=True, text=True, check=True
    ).stdout
    flags: dict[str, set[str]] = {}
    last = None
    for line in text.splitlines():
        m = re.match(r"^\s*\d+\s+(\S+)\s+[0-9a-f]+\s", line)
        if m:
            last = m.group(1)
        elif last is not None and line.startswith(" " * 8):
            flags[last] = {f.strip() for f in line.split(",")}
            last = None
    return flags


@dataclass(frozen=True)
class Symbol:
    """A defined symbol of an image: address, size in bytes and ``nm`` type letter."""

    addr: int
    size: int
    kind: str


def symbols(elf: str | os.PathLike) -> dict[str, Symbol]:
    """Sized symbols of an image (``arm-none-eabi-nm -S``), e.g. to find a weights array."""
    tc = _require()
    text = subprocess.run(
        [tc.nm, "-S", "--defined-only", str(elf)], capture_output=True, text=True, check=True
    ).stdout
    found = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 4:
            addr, nbytes, kind, name = parts
            found[name] = Symbol(int(addr, 16), int(nbytes, 16), kind)
    return found
