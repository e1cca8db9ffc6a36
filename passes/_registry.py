"""The pass registry: names -> passes, with third-party passes found through entry points.

``@register_pass("name")`` makes a function (or any callable) a pass. A duplicate name is an
error, never a silent override. Third-party packages ship passes through the entry-point group
``edgeopt.passes``; each entry names the registered object, and entry points are loaded
lazily: on a registry miss, or when every pass is listed.
"""

from __future__ import annotations

import importlib.metadata
import inspect
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ._base import OptionError, Preserved
from ._named import check_name

__all__ = ["PassSpec", "get_pass", "list_passes", "plugins", "register_pass", "unregister_pass"]

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "edgeopt.passes"

@dataclass
class PassSpec:
    """A registered pass.

    Attributes:
        name: the CLI name (``dce``, ``acme.fuse-hswish``).
        fn: the callable, ``fn(model, ctx[, opts]) -> PassResult``.
        options: the options dataclass, or None for a pass without options.
        primary: the option that ``name:value`` fills.
        preserves: analyses the pass keeps valid unless its result says otherwise.
        doc: the first line of the docstring (``edgeopt passes`` shows it).
        provider: the distribution that shipped it (None for built-ins and in-process ones).
    """

    name: str
    fn: Callable[..., Any]
    options: type | None = None
    primary: str | None = None
    preserves: Preserved = frozenset()
    doc: str = ""
    provider: str | None = None
    takes_options: bool = field(default=False)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Call the pass directly (the registered object stays usable as a function)."""
        return self.fn(*args, **kwargs)


_REGISTRY: dict[str, PassSpec] = {}
_entry_points_loaded = False
_providers: dict[str, list[str]] = {}


def register_pass(name: str, options: type | None = None, primary: str | None = None,
                  preserves: Preserved = frozenset()) -> Callable[[Callable[..., Any]], PassSpec]:
    """Register a pass under ``name``.

    Args:
        name: short lowercase CLI word; third-party passes use a dotted prefix.
        options: a dataclass of typed options; the pass then takes ``opts`` as third argument.
        primary: the option filled by ``name:value`` in a pipeline spec.
        preserves: analyses kept valid by default.

    Returns:
        A decorator returning the :class:`PassSpec` (what an entry point should name).

    Raises:
        ValueError: the name is malformed, taken, or ``primary`` is not an option.
    """
    check_name(name, "pass", "passes")
    if primary is not None and (options is None or primary not in
                                getattr(options, "__dataclass_fields__", {})):
        raise ValueError(f"pass {name!r}: primary option {primary!r} is not an option")

    def decorate(fn: Callable[..., Any]) -> PassSpec:
        if name in _REGISTRY:
            raise ValueError(f"pass {name!r} is already registered (by "
                             f"{_REGISTRY[name].fn.__module__})")
        doc = inspect.getdoc(fn) or ""
        spec = PassSpec(name, fn, options, primary, preserves, doc.split("\n", 1)[0],
                        takes_options=options is not None)
        _REGISTRY[name] = spec
        return spec

    return decorate


def unregister_pass(name: str) -> None:
    """Remove a pass (tests and interactive sessions)."""
    _REGISTRY.pop(name, None)


def _load_entry_points() -> None:
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        provider = ep.dist.name if ep.dist is not None else ep.module
        try:
            obj = ep.load()
        except Exception as e:  # a broken plugin must not break edgeopt itself
            log.warning("pass plugin %r from %s failed to load: %s", ep.name, provider, e)
            continue
        if not isinstance(obj, PassSpec):
            log.warning("entry point %r of %s does not name a @register_pass object",
                        ep.name, provider)
            continue
        if obj.name != ep.name:
            log.warning("entry point %r of %s names pass %r; names must match", ep.name,
                        provider, obj.name)
            continue
        obj.provider = provider
        _providers.setdefault(provider, []).append(obj.name)


def get_pass(name: str) -> PassSpec:
    """The pass registered as ``name``.

    Raises:
        OptionError: unknown (the message lists the available passes).
    """
    _ensure_builtins()
    if name not in _REGISTRY:
        _load_entry_points()
    if name in _REGISTRY:
        return _REGISTRY[name]
    raise OptionError(f"unknown pass {name!r}; available passes: {', '.join(list_names())}")


def list_names() -> list[str]:
    """Every available pass name, sorted."""
    return [spec.name for spec in list_passes()]


def list_passes() -> list[PassSpec]:
    """Every available pass (built-in, in-process and plugins), sorted by name."""
    _ensure_builtins()
    _load_entry_points()
    return sorted(_REGISTRY.values(), key=lambda s: s.name)


def plugins() -> dict[str, list[str]]:
    """Distributions that provided passes through entry points, with their pass names."""
    _load_entry_points()
    return {k: sorted(v) for k, v in _providers.items()}


def _ensure_builtins() -> None:
    # Importing the package registers the built-in passes.
    import edgeopt.passes  # noqa: F401
