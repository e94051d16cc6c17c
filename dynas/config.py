"""YAML experiment configs that set command-line defaults, validated against the parser.

A config file maps option names (``max_macs`` or ``max-macs``) to values. Unknown keys and values
of the wrong type are errors naming the file, the key and the value; flags given on the command
line override the file; the resolved settings are written next to the results.
"""

from __future__ import annotations

import argparse
import os
import re
from pathlib import Path
from typing import Any

import yaml

from dynas.errors import DynasError, did_you_mean

__all__ = ["apply_config", "parse_count", "write_resolved"]

_SUFFIXES = {"k": 1e3, "m": 1e6, "g": 1e9}


def parse_count(text: str | int | float) -> int:
    """Parse a MAC or parameter count: ``5000000``, ``5e6``, ``5M``, ``300k``, ``1.5G``."""
    if isinstance(text, bool):
        raise ValueError(f"expected a count such as 5M or 5e6, but got {text!r}")
    if isinstance(text, (int, float)):
        value = float(text)
    else:
        match = re.fullmatch(r"\s*([+-]?[0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([kKmMgG]?)\s*", str(text))
        if not match:
            raise ValueError(f"expected a count such as 5M or 5e6, but got {text!r}")
        value = float(match.group(1)) * _SUFFIXES.get(match.group(2).lower(), 1.0)
    if value <= 0:
        raise ValueError(f"a count must be > 0, but got {text!r}")
    return int(round(value))


def _actions(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {a.dest: a for a in parser._actions if a.dest not in ("help", "config", "command") and a.option_strings}


def _convert(action: argparse.Action, value: Any, where: str) -> Any:
    if value is None:
        return None
    try:
        if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
            if not isinstance(value, bool):
                raise ValueError(f"expected true or false, but got {value!r}")
            return value
        if action.type is not None and not (isinstance(value, (int, float)) and action.type is float):
            value = action.type(value) if not isinstance(value, bool) else _reject_bool(value)
        if action.choices is not None and value not in action.choices:
            raise ValueError(f"must be one of {', '.join(map(str, action.choices))}, but got {value!r}")
    except (ValueError, TypeError, argparse.ArgumentTypeError) as err:
        raise DynasError(f"{where}: {err}") from None
    return value


def _reject_bool(value: bool) -> None:
    raise ValueError(f"expected a value, not a boolean ({value!r})")


def apply_config(parser: argparse.ArgumentParser, path: str | os.PathLike) -> dict[str, Any]:
    """Read the YAML file at ``path``, validate it against ``parser`` and set it as its defaults."""
    path = Path(path)
    if not path.is_file():
        raise DynasError(f"config file {str(path)!r} does not exist.")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise DynasError(f"config file {str(path)!r} is not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise DynasError(f"config file {str(path)!r} must be a mapping of option: value, but got {type(data).__name__}.")
    actions = _actions(parser)
    defaults = {}
    for key, value in data.items():
        dest = str(key).replace("-", "_")
        if dest not in actions:
            raise DynasError(
                f"config file {str(path)!r}: unknown key {key!r}.{did_you_mean(dest, actions)} "
                f"Known keys: {', '.join(sorted(actions))}."
            )
        defaults[dest] = _convert(actions[dest], value, f"config file {str(path)!r}, key {key!r}")
    parser.set_defaults(**defaults)
    return defaults


def write_resolved(args: argparse.Namespace, path: str | os.PathLike) -> None:
    """Write the settings a run actually used, as YAML that ``--config`` accepts."""
    resolved = {k: v for k, v in sorted(vars(args).items()) if k not in ("command", "config", "func")}
    Path(path).write_text(yaml.safe_dump(resolved, sort_keys=True), encoding="utf-8")
