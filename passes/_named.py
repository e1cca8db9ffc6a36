"""Named registries: passes, importance criteria and calibrators share one naming scheme.

A :class:`NamedRegistry` is a dict from a lowercase name (dotted for third-party entries,
``acme.linf``) to a function, with the checks every registry wants: a malformed or duplicate
name is an error, never a silent override, and an unknown name lists the known ones.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Generic, TypeVar

__all__ = ["NAME", "NamedRegistry", "check_name"]

#: What a registered name looks like: lowercase words, dotted for third-party entries.
NAME = re.compile(r"^[a-z][a-z0-9_-]*(\.[a-z][a-z0-9_-]*)*$")

F = TypeVar("F")


def check_name(name: str, word: str, plural: str) -> None:
    """Raise ValueError unless ``name`` is a valid registry name (``word``: what it names)."""
    if not NAME.match(name):
        raise ValueError(f"{word} name {name!r} must be lowercase words (a-z, 0-9, -, _), "
                         f"dotted for third-party {plural}")


class NamedRegistry(dict[str, F], Generic[F]):
    """Functions by name (see the module docs).

    Args:
        kind: what an entry is, in messages (``importance criterion``).
        word: the word before "name" in a malformed-name message (``criterion``).
        plural: the plural of ``word`` (``criteria``).
        unknown: the exception type of an unknown name (ValueError, or the caller's
            user-facing error type).
    """

    def __init__(self, kind: str, word: str, plural: str,
                 unknown: type[Exception] = ValueError) -> None:
        super().__init__()
        self.kind, self.word, self.plural, self.unknown = kind, word, plural, unknown

    def register(self, name: str) -> Callable[[F], F]:
        """A decorator registering its function as ``name``, returned unchanged.

        Raises:
            ValueError: the name is malformed or already registered.
        """
        check_name(name, self.word, self.plural)

        def decorate(fn: F) -> F:
            if name in self:
                raise ValueError(f"{self.kind} {name!r} is already registered (by "
                                 f"{getattr(self[name], '__module__', '?')})")
            self[name] = fn
            return fn

        return decorate

    def names(self) -> list[str]:
        """Every registered name, sorted."""
        return sorted(self)

    def lookup(self, name: str) -> F:
        """The entry registered as ``name``.

        Raises:
            ``unknown``: no such entry; the message lists the registered ones.
        """
        if name not in self:
            raise self.unknown(f"unknown {self.kind} {name!r}; available: "
                               f"{', '.join(self.names())}")
        return self[name]
