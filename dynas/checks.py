"""Validation rules for arguments a user can get wrong: one home for each rule.

Every check raises :class:`~dynas.errors.DynasError` (a ``ValueError``) whose message names the
argument, the rule and the value, in Optuna's form::

    `epochs` must be an integer >= 1, but got epochs=0.

This module imports only the standard library, so the operators and the spec may use it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

from dynas.errors import DynasError, did_you_mean

__all__ = ["check_choice", "check_int", "check_name", "check_number"]


def check_int(name: str, value: object, minimum: int | None = 1, maximum: int | None = None) -> int:
    """``value`` itself if it is an int (not a bool) within ``[minimum, maximum]``."""
    ok = isinstance(value, int) and not isinstance(value, bool)
    ok = ok and (minimum is None or value >= minimum) and (maximum is None or value <= maximum)  # type: ignore[operator]
    if not ok:
        if maximum is not None:
            rule = f"an integer in {minimum}..{maximum}"
        else:
            rule = "an integer" if minimum is None else f"an integer >= {minimum}"
        raise DynasError(f"`{name}` must be {rule}, but got {name}={value!r}.")
    return value  # type: ignore[return-value]


def check_number(
    name: str,
    value: object,
    low: float = -math.inf,
    high: float = math.inf,
    *,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """``value`` as a float if it is a finite real number in the interval (bounds open or closed)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > low if low_open else value >= low) and (value < high if high_open else value <= high)  # type: ignore[operator]
    if not ok:
        if math.isinf(high) and math.isinf(low):
            rule = "a finite number"
        elif math.isinf(high):
            rule = f"a finite number {'>' if low_open else '>='} {low:g}"
        else:
            rule = f"a finite number in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        raise DynasError(f"`{name}` must be {rule}, but got {name}={value!r}.")
    return float(value)  # type: ignore[arg-type]


def check_choice(name: str, value: object, allowed: Iterable[object]) -> object:
    """``value`` if it is one of ``allowed`` (a close match is suggested for a typo)."""
    allowed = tuple(allowed)
    if value in allowed and not (isinstance(value, bool) and not any(isinstance(a, bool) for a in allowed)):
        return value
    raise DynasError(
        f"`{name}` must be one of {allowed}, but got {name}={value!r}.{did_you_mean(str(value), map(str, allowed))}"
    )


def check_name(kind: str, name: str, options: Iterable[str]) -> str:
    """``name`` if it is one of the named ``options`` (samplers, pruners, strategies, spaces, ...)."""
    options = list(options)
    if name not in options:
        raise DynasError(f"unknown {kind} {name!r}; choose one of {', '.join(options)}.{did_you_mean(name, options)}")
    return name
