"""Errors a user can cause. Every message names the input, the rule and the value."""

from __future__ import annotations

import difflib
from collections.abc import Iterable

__all__ = ["DynasError", "did_you_mean"]


class DynasError(ValueError):
    """Base class of dynas' user-facing errors (a ``ValueError``, so callers may catch either)."""


def did_you_mean(name: str, options: Iterable[str]) -> str:
    """Return ``" Did you mean 'x'?"`` for the closest option, or ``""`` when none is close."""
    matches = difflib.get_close_matches(str(name), [str(o) for o in options], n=1)
    return f" Did you mean {matches[0]!r}?" if matches else ""
