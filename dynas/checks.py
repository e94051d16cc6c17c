"""Validation rules for arguments a user can get wrong: one home for each rule.

Every check raises :class:`~dynas.errors.DynasError` (a ``ValueError``) whose message names the
argument, the rule and the value, in Optuna's form::

    `epochs` must be an integer >= 1, but got epochs=0.

This module imports only the standard library, so the operators and the spec may use it.
"""

from __future__ import annotations

import ipaddress
import math
import re
import reprlib
from collections.abc import Iterable

from dynas.errors import DynasError, did_you_mean

__all__ = [
    "MAX_SEED",
    "brief",
    "check_choice",
    "check_heartbeat",
    "check_host",
    "check_input_size",
    "check_int",
    "check_name",
    "check_number",
    "check_train_batches",
]

MAX_SEED = 2**32 - 1
"""The largest seed every generator takes (NumPy's ``RandomState``, behind Optuna's and NNI's samplers)."""

_BRIEF = reprlib.Repr()  # keyword arguments only from Python 3.12
_BRIEF.maxlevel, _BRIEF.maxlist, _BRIEF.maxdict, _BRIEF.maxstring, _BRIEF.maxother = 2, 5, 5, 60, 60
_HOST_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")


def brief(value: object) -> str:
    """``repr(value)`` cut to a line: a YAML value may be a huge (or alias-bombed) nested list."""
    return _BRIEF.repr(value)


def check_int(name: str, value: object, minimum: int | None = 1, maximum: int | None = None) -> int:
    """``value`` itself if it is an int (not a bool) within ``[minimum, maximum]``."""
    ok = isinstance(value, int) and not isinstance(value, bool)
    ok = ok and (minimum is None or value >= minimum) and (maximum is None or value <= maximum)  # type: ignore[operator]
    if not ok:
        if maximum is not None:
            rule = f"an integer in {minimum}..{maximum}"
        else:
            rule = "an integer" if minimum is None else f"an integer >= {minimum}"
        raise DynasError(f"`{name}` must be {rule}, but got {name}={brief(value)}.")
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


def check_host(name: str, value: object) -> str:
    """``value`` if it is an IP address or a host name (RFC 1123 labels, not an all-numeric one)."""
    ok = isinstance(value, str) and 0 < len(value) <= 253
    if ok:
        try:
            ipaddress.ip_address(value)
        except ValueError:
            labels = value.removesuffix(".").split(".")
            ok = all(_HOST_LABEL.fullmatch(label) for label in labels) and not labels[-1].isdigit()
    if not ok:
        raise DynasError(f"`{name}` must be an IP address or a host name, but got {name}={brief(value)}.")
    return value  # type: ignore[return-value]


def check_heartbeat(heartbeat_interval: int | None, grace_period: int | None) -> None:
    """A trial's grace period must outlast a heartbeat interval, or a live trial looks dead.

    Another worker fails (and retries) a trial whose last heartbeat is older than the grace
    period; with a grace period of at most one interval it does so between two beats of a live one.
    """
    if heartbeat_interval is not None and grace_period is not None and grace_period <= heartbeat_interval:
        raise DynasError(
            f"`grace_period` must be longer than `heartbeat_interval` (else another worker fails a live "
            f"trial between two of its heartbeats), but got {grace_period=}, {heartbeat_interval=}; "
            f"leave --grace-period out for 2 intervals."
        )


def check_input_size(input_size: int, total_stride: int, what: str) -> None:
    """An input must be at least as large as the network's total stride (its last feature map >= 1x1)."""
    if input_size < total_stride:
        raise DynasError(
            f"`input_size` must be >= {total_stride} for {what} (its strides divide the input by "
            f"{total_stride}), but got input_size={input_size}."
        )


def check_train_batches(batch_size: int, train_images: int, where: str = "") -> None:
    """Training batches need >= 2 images: BatchNorm in train mode cannot normalise a single one."""
    if min(batch_size, train_images) >= 2:
        return
    got = f"batch_size={batch_size}" if batch_size < 2 else f"{train_images} training image{where}"
    raise DynasError(
        f"training batches must hold >= 2 images (BatchNorm in train mode), but got {got}; "
        f"use a larger batch size or training subset."
    )
