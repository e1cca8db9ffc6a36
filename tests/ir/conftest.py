"""Fixtures of tests/ir, and the peer-suite summary printed at the end of a run.

pytest imports every ``conftest.py`` outside a package under the module name ``conftest``, so
once this file is loaded, ``from conftest import parse_model`` in any test module finds *this*
module. Names it does not define are therefore looked up in ``tests/conftest.py`` (the module
pytest already loaded, found through the plugin manager), which keeps the shared fixtures
importable exactly as before.
"""

from __future__ import annotations

import importlib.util
import os
import re
import types
from collections import Counter
from typing import Any

import pytest

#: Every skip of a peer-suite case starts with this: ORT itself cannot run the original model.
ORT_CANNOT = "ORT cannot"

#: The peer-suite test function whose outcomes are counted per source.
PEER_TEST = "test_peer_suite.py::test_peer_model"

_PARENT_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                            "conftest.py")
_parent: types.ModuleType | None = None


def pytest_configure(config: pytest.Config) -> None:
    """Remember the ``tests/conftest.py`` module pytest loaded (for ``__getattr__``)."""
    global _parent
    for plugin in config.pluginmanager.get_plugins():
        file = getattr(plugin, "__file__", None)
        if isinstance(plugin, types.ModuleType) and file and \
                os.path.abspath(file) == _PARENT_PATH:
            _parent = plugin


def _parent_module() -> types.ModuleType:
    global _parent
    if _parent is None:  # imported outside pytest: load the shared conftest ourselves
        spec = importlib.util.spec_from_file_location("_edgeopt_tests_conftest", _PARENT_PATH)
        assert spec is not None and spec.loader is not None
        _parent = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(_parent)
    return _parent


def __getattr__(name: str) -> Any:
    # Only called for names this module lacks: delegate to tests/conftest.py.
    if name.startswith("__"):
        raise AttributeError(name)
    return getattr(_parent_module(), name)


def _bucket(report: pytest.TestReport) -> str | None:
    if report.when == "call" and report.passed and not hasattr(report, "wasxfail"):
        return "passed"
    if report.skipped and hasattr(report, "wasxfail"):
        return "xfail"  # a strict xfail: a known bug, still counted as failed
    if report.skipped:
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else ""
        return "skipped (ORT cannot)" if ORT_CANNOT in reason else "failed"
    if report.failed:
        return "failed"
    return None


def peer_counts(reports: list[pytest.TestReport]) -> dict[str, Counter[str]]:
    """Outcome counts of the peer-suite cases, per source (the part of the id before '/')."""
    counts: dict[str, Counter[str]] = {}
    seen: set[str] = set()
    for report in reports:
        if PEER_TEST not in report.nodeid or report.nodeid in seen:
            continue
        bucket = _bucket(report)
        if bucket is None:
            continue
        seen.add(report.nodeid)  # a failed teardown after a pass still counts once
        match = re.search(r"\[([^/\]]+)/", report.nodeid)
        source = match.group(1) if match else "?"
        counter = counts.setdefault(source, Counter())
        counter[bucket] += 1
        if bucket == "xfail":
            counter["failed"] += 1
    return counts


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """Print passed / skipped-because-ORT-cannot / failed per peer-suite source (failed
    includes strict xfails: known bugs, shown in brackets)."""
    reports = [r for key in ("passed", "failed", "skipped", "xfailed", "error")
               for r in terminalreporter.stats.get(key, [])
               if isinstance(r, pytest.TestReport)]
    counts = peer_counts(reports)
    if not counts:
        return
    terminalreporter.section("peer suite (onnx backend test data)")
    total: Counter[str] = Counter()
    for source in sorted(counts):
        total.update(counts[source])
        terminalreporter.write_line(_row(source, counts[source]))
    terminalreporter.write_line(_row("total", total))


def _row(source: str, c: Counter[str]) -> str:
    xfail = f" ({c['xfail']} xfail)" if c["xfail"] else ""
    return (f"{source:<18} passed {c['passed']:5d}   skipped (ORT cannot) "
            f"{c['skipped (ORT cannot)']:5d}   failed {c['failed']:3d}{xfail}")
