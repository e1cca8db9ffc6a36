"""Typed pass options: coercion of pipeline-spec strings into options dataclasses."""

from __future__ import annotations

import dataclasses
import enum
import types
import typing
from typing import Any, Literal, Union, get_args, get_origin

from ._base import OptionError

__all__ = ["build_options", "coerce", "describe_type", "option_fields", "parse_overrides"]

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def option_fields(cls: type) -> dict[str, dataclasses.Field]:
    """The fields of an options dataclass, by name."""
    return {f.name: f for f in dataclasses.fields(cls)}


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def describe_type(tp: Any) -> str:
    """Short human name of an option type (``float``, ``l1|l2|bn``, ``list of str``)."""
    origin = get_origin(tp)
    if origin is Literal:
        return "|".join(str(a) for a in get_args(tp))
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return "|".join(str(m.value) for m in tp)
    if origin in (Union, types.UnionType):
        return " or ".join(describe_type(a) for a in get_args(tp) if a is not type(None))
    if origin in (tuple, list):
        return f"list of {describe_type(get_args(tp)[0])} (separated by '|')"
    return getattr(tp, "__name__", str(tp))


def coerce(value: Any, tp: Any, where: str) -> Any:
    """Convert ``value`` (a spec string or a TOML value) to the option type ``tp``.

    Raises:
        OptionError: the value does not fit the type; the message names ``where``.
    """
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if (value is None or (isinstance(value, str) and value.lower() == "none")) \
                and type(None) in get_args(tp):
            return None
        errors = []
        for arg in args:
            try:
                return coerce(value, arg, where)
            except OptionError as e:
                errors.append(str(e))
        raise OptionError(f"{where}: {value!r} is not a {describe_type(tp)}")
    if origin is Literal:
        choices = get_args(tp)
        for choice in choices:
            if value == choice or str(value) == str(choice):
                return choice
        raise OptionError(f"{where}: {value!r} is not one of {', '.join(map(str, choices))}")
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        for member in tp:
            if str(value) in (str(member.value), member.name):
                return member
        raise OptionError(f"{where}: {value!r} is not one of "
                          f"{', '.join(str(m.value) for m in tp)}")
    if origin in (tuple, list):
        (item,) = get_args(tp)[:1]
        items = value.split("|") if isinstance(value, str) else list(value)
        items = [i for i in items if i != ""]
        out = [coerce(i, item, where) for i in items]
        return tuple(out) if origin is tuple else out
    if tp is bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in _TRUE:
            return True
        if text in _FALSE:
            return False
        raise OptionError(f"{where}: {value!r} is not a boolean (true/false)")
    if tp in (int, float):
        if isinstance(value, bool):
            raise OptionError(f"{where}: {value!r} is not a {tp.__name__}")
        try:
            if tp is int:
                number = float(str(value).replace("_", ""))
                if not number.is_integer():
                    raise ValueError
                return int(number)
            return float(str(value))
        except ValueError:
            raise OptionError(f"{where}: {value!r} is not a {tp.__name__}") from None
    if tp is str:
        return str(value)
    if tp is Any:
        return value
    raise OptionError(f"{where}: options of type {tp!r} are not supported")


def build_options(cls: type | None, pass_name: str, raw: dict[str, Any]) -> Any:
    """Instantiate a pass's options dataclass from raw key/values.

    Raises:
        OptionError: an unknown key (the message lists the valid ones) or a bad value.
    """
    if cls is None:
        if raw:
            raise OptionError(f"pass {pass_name!r} takes no options (got "
                              f"{', '.join(sorted(raw))})")
        return None
    fields = option_fields(cls)
    hints = _hints(cls)
    values = {}
    for key, value in raw.items():
        if key not in fields:
            valid = ", ".join(fields) or "none"
            raise OptionError(f"pass {pass_name!r} has no option {key!r}; valid options: {valid}")
        values[key] = coerce(value, hints[key], f"pass {pass_name!r} option {key!r}")
    try:
        opts = cls(**values)
    except (TypeError, ValueError) as e:
        raise OptionError(f"pass {pass_name!r}: {e}") from None
    check = getattr(opts, "validate", None)
    if callable(check):
        try:
            check()
        except ValueError as e:
            raise OptionError(f"pass {pass_name!r}: {e}") from None
    return opts


def parse_overrides(entries: tuple[str, ...]) -> list[tuple[str, float]]:
    """Per-layer ratios ``pattern:ratio`` (``prune``'s and ``sparsify``'s ``overrides``).

    Raises:
        ValueError: an entry is not ``pattern:ratio`` with a ratio in [0, 1).
    """
    pairs = []
    for entry in entries:
        pattern, sep, value = entry.rpartition(":")
        try:
            ratio = float(value)
        except ValueError:
            ratio = -1.0
        if not sep or not pattern or not 0.0 <= ratio < 1.0:
            raise ValueError(f"override {entry!r} must be pattern:ratio with a ratio in [0, 1)")
        pairs.append((pattern, ratio))
    return pairs
