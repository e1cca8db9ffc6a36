"""Terminal output for the command line: progress lines, tables, errors."""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from typing import TextIO

from edgeopt.passes._manager import human_bytes

__all__ = ["Console", "format_table", "human_bytes"]


def format_table(rows: Sequence[Sequence[object]], header: Sequence[str],
                 right: Sequence[int] = ()) -> str:
    """A plain-text table with a rule under the header; columns in ``right`` align right."""
    cells = [[str(c) for c in header]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]

    def line(r: list[str]) -> str:
        return "  ".join(c.rjust(w) if i in right else c.ljust(w)
                         for i, (c, w) in enumerate(zip(r, widths, strict=True))).rstrip()

    return "\n".join([line(cells[0]), "  ".join("-" * w for w in widths),
                      *(line(r) for r in cells[1:])])


class Console:
    """Where the CLI writes: results to stdout, progress and messages to stderr.

    Args:
        quiet: suppress progress and informational messages (results and errors stay).
        stream: the progress/message stream (stderr).
    """

    def __init__(self, quiet: bool = False, stream: TextIO | None = None) -> None:
        self.quiet = quiet
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self._last = 0.0
        self._open = False

    def info(self, msg: str) -> None:
        """An informational line (stderr), unless quiet."""
        if not self.quiet:
            self._end_progress()
            print(msg, file=self.stream)

    def progress(self, desc: str, done: int, total: int) -> None:
        """A self-updating progress line on a terminal; silent otherwise (or when quiet)."""
        if self.quiet or not self.tty:
            return
        now = time.monotonic()
        if done < total and now - self._last < 0.1:
            return
        self._last = now
        width = 24
        filled = int(width * done / total) if total else width
        bar = "#" * filled + "." * (width - filled)
        print(f"\r{desc[:40]:<40} [{bar}] {done}/{total}", end="", file=self.stream,
              flush=True)
        self._open = True
        if done >= total:
            self._end_progress()

    def _end_progress(self) -> None:
        if self._open:
            print(file=self.stream)
            self._open = False
