"""Search spaces and their registry.

>>> list_spaces()
['k_tau', 'mobile_cifar', 'mobile_imagenet']
>>> get_space("mobile_cifar", num_classes=100).smallest().num_classes
100

A new space is one file that subclasses :class:`SearchSpace` and calls :func:`register_space`
(see :mod:`search_spaces._base`). Every public module of this folder is imported here, so a file
dropped into ``search_spaces/`` registers its space; an installed package can register spaces
through the ``dynas.search_spaces`` entry-point group instead.
"""

from __future__ import annotations

import importlib
import pkgutil
from importlib.metadata import entry_points
from typing import Any, TypeVar

from dynas.errors import DynasError, did_you_mean
from search_spaces._base import Candidate, Choice, SearchSpace

__all__ = ["Candidate", "Choice", "SearchSpace", "discover_spaces", "get_space", "list_spaces", "register_space"]

_S = TypeVar("_S", bound=type[SearchSpace])
_REGISTRY: dict[str, type[SearchSpace]] = {}


def register_space(space: _S) -> _S:
    """Register a :class:`SearchSpace` subclass under its ``name`` (usable as a class decorator).

    Raises:
        TypeError: ``space`` is not a SearchSpace subclass, or has no string ``name``.
        DynasError: another space is registered under that name.
    """
    if not (isinstance(space, type) and issubclass(space, SearchSpace)):
        raise TypeError(f"`space` must be a SearchSpace subclass, but got space={space!r}.")
    name = getattr(space, "name", None)
    if not isinstance(name, str) or not name:
        raise TypeError(f"`{space.__name__}.name` must be a non-empty string, but got name={name!r}.")
    if name in _REGISTRY:
        raise DynasError(
            f"a search space named {name!r} is already registered ({_REGISTRY[name].__qualname__}); "
            f"choose another `name` for {space.__qualname__}."
        )
    _REGISTRY[name] = space
    return space


def list_spaces() -> list[str]:
    """The registered space names, sorted."""
    return sorted(_REGISTRY)


def get_space(name: str, **kwargs: Any) -> SearchSpace:
    """A new instance of the space registered as ``name``; ``kwargs`` go to its constructor.

    Raises:
        DynasError: no space has that name (with a close-match suggestion).
    """
    if name not in _REGISTRY:
        raise DynasError(
            f"unknown search space {name!r}.{did_you_mean(name, _REGISTRY)} "
            f"Registered spaces: {', '.join(list_spaces())}."
        )
    return _REGISTRY[name](**kwargs)


def discover_spaces() -> None:
    """Import every public module of this package and every ``dynas.search_spaces`` entry point.

    Each registers its spaces on import; modules already imported are not imported again.
    """
    for info in pkgutil.iter_modules(__path__):
        if not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}")
    for entry in entry_points(group="dynas.search_spaces"):
        entry.load()


# The spaces register themselves on import; this must follow register_space's definition.
discover_spaces()
