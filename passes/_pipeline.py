"""The pipeline spec grammar: ``prune:0.6,importance=l2,dce,quant:int8``.

Comma-separated tokens. ``name`` starts a pass with its default options; ``name:value``
starts a pass and fills its *primary* option; ``key=value`` sets an option of the pass
before it. Values are coerced from the option types (see :mod:`._options`); list values
use ``|``. ``@file.toml`` reads a pipeline from a file, either as ``pipeline = "..."`` or as a
list of ``[[pass]]`` tables with ``name`` and option keys.
"""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass, field
from typing import Any

from ._base import OptionError
from ._options import build_options
from ._registry import PassSpec, get_pass

__all__ = ["Step", "format_pipeline", "load_pipeline_file", "parse_pipeline", "resolve"]

_OPTION = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)=(.*)$", re.S)
_PASS = re.compile(r"^([a-z][a-z0-9_-]*(?:\.[a-z][a-z0-9_-]*)*)(?::(.*))?$", re.S)


@dataclass
class Step:
    """One pass of a pipeline, before its options are type-checked.

    Attributes:
        name: pass name.
        arg: the ``name:value`` positional value, if any.
        options: ``key=value`` options, as written (strings) or as read from TOML.
    """

    name: str
    arg: Any = None
    options: dict[str, Any] = field(default_factory=dict)

    def __str__(self) -> str:
        return format_pipeline([self])


def parse_pipeline(spec: str) -> list[Step]:
    """Split a pipeline spec into steps (no registry look-up yet).

    Raises:
        OptionError: empty spec or step, an option before any pass, a repeated option, or a
            malformed token.
    """
    if spec.startswith("@"):
        return load_pipeline_file(spec[1:])
    if not spec.strip():
        raise OptionError("empty pipeline spec")
    steps: list[Step] = []
    for i, raw in enumerate(spec.split(",")):
        token = raw.strip()
        if not token:
            raise OptionError(f"pipeline spec {spec!r}: empty step at position {i + 1}")
        opt = _OPTION.match(token)
        if opt:
            if not steps:
                raise OptionError(f"pipeline spec {spec!r}: option {token!r} comes before any "
                                  "pass")
            key, value = opt.group(1), opt.group(2).strip()
            if key in steps[-1].options:
                raise OptionError(f"pipeline spec {spec!r}: option {key!r} of pass "
                                  f"{steps[-1].name!r} is given twice")
            steps[-1].options[key] = value
            continue
        m = _PASS.match(token)
        if not m:
            raise OptionError(f"pipeline spec {spec!r}: cannot read {token!r} (expected "
                              "'name', 'name:value' or 'key=value')")
        arg = m.group(2).strip() if m.group(2) is not None else None
        steps.append(Step(m.group(1), arg))
    return steps


def format_pipeline(steps: list[Step]) -> str:
    """The spec string of a list of steps (inverse of :func:`parse_pipeline`)."""
    tokens = []
    for step in steps:
        tokens.append(step.name if step.arg is None else f"{step.name}:{_fmt(step.arg)}")
        tokens.extend(f"{k}={_fmt(v)}" for k, v in step.options.items())
    return ",".join(tokens)


def _fmt(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "|".join(_fmt(v) for v in value)
    return str(getattr(value, "value", value))


def load_pipeline_file(path: str) -> list[Step]:
    """Read a pipeline from a TOML file.

    Raises:
        OptionError: unreadable file, bad TOML, or neither ``pipeline`` nor ``[[pass]]``.
    """
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        import tomli as tomllib
    try:
        with open(path, "rb") as f:
            doc = tomllib.load(f)
    except OSError as e:
        raise OptionError(f"{path}: cannot read pipeline file ({e.strerror})") from None
    except tomllib.TOMLDecodeError as e:
        raise OptionError(f"{path}: invalid TOML ({e})") from None
    if isinstance(doc.get("pipeline"), str):
        if doc["pipeline"].startswith("@"):
            raise OptionError(f"{path}: a pipeline file cannot include another one")
        return parse_pipeline(doc["pipeline"])
    passes = doc.get("pass")
    if not isinstance(passes, list) or not passes:
        raise OptionError(f"{path}: expected 'pipeline = \"...\"' or [[pass]] tables with a "
                          "'name'")
    steps = []
    for i, table in enumerate(passes):
        table = dict(table)
        name = table.pop("name", None)
        if not isinstance(name, str):
            raise OptionError(f"{path}: [[pass]] number {i + 1} has no 'name'")
        steps.append(Step(name, None, table))
    return steps


def resolve(steps: list[Step]) -> list[tuple[PassSpec, Any]]:
    """Look up each step's pass and build its typed options.

    Raises:
        OptionError: unknown pass, option or value (messages list the valid choices).
    """
    resolved = []
    for step in steps:
        spec = get_pass(step.name)
        raw = dict(step.options)
        if step.arg is not None:
            if spec.primary is None:
                raise OptionError(f"pass {spec.name!r} takes no positional value "
                                  f"(got {step.name}:{step.arg})")
            if spec.primary in raw:
                raise OptionError(f"pass {spec.name!r}: option {spec.primary!r} is given both "
                                  f"as {step.name}:{step.arg} and as {spec.primary}=")
            raw = {spec.primary: step.arg, **raw}
        resolved.append((spec, build_options(spec.options, spec.name, raw)))
    return resolved


def spec_path_exists(spec: str) -> bool:
    """True when ``spec`` is ``@file`` naming an existing file."""
    return spec.startswith("@") and os.path.isfile(spec[1:])
