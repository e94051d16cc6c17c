"""YAML experiment configs that set command-line defaults, validated against the parser.

A config file maps option names (``max_macs`` or ``max-macs``) to values. Unknown keys and values
of the wrong type are errors naming the file, the key and the value; flags given on the command
line override the file; the resolved settings are written next to the results.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from collections.abc import Collection, Mapping
from typing import Any

import yaml

from dynas.checks import brief
from dynas.errors import DynasError, did_you_mean

__all__ = [
    "apply_config",
    "load_run_data",
    "read_run_config",
    "supernet_paths",
    "train_config",
    "train_subset",
    "write_resolved",
]

def _actions(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {a.dest: a for a in parser._actions if a.dest not in ("help", "config", "command") and a.option_strings}


def _convert(action: argparse.Action, value: Any, where: str) -> Any:
    if value is None:
        return None
    try:
        if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
            if not isinstance(value, bool):
                raise ValueError(f"expected true or false, but got {brief(value)}")
            return value
        if action.nargs in ("+", "*"):  # a list option (e.g. --supernet A B): a list, or one value
            items = value if isinstance(value, list) else [value]
            if action.nargs == "+" and not items:
                raise ValueError("must be a non-empty list")
            return [_convert_one(action, item) for item in items]
        value = _convert_one(action, value)
    except (ValueError, TypeError, argparse.ArgumentTypeError) as err:
        raise DynasError(f"{where}: {err}") from None
    return value


def _convert_one(action: argparse.Action, value: Any) -> Any:
    """One value of ``action``, by its type and choices (ValueError when it breaks them)."""
    if isinstance(value, bool):
        _reject_bool(value)
    if action.type is not None:
        value = action.type(value)  # the parser's types take YAML's ints, floats and lists too
    elif not isinstance(value, str):
        raise ValueError(f"must be a string, but got {brief(value)}")
    if action.choices is not None and value not in action.choices:
        raise ValueError(f"must be one of {', '.join(map(str, action.choices))}, but got {value!r}")
    return value


def _reject_bool(value: bool) -> None:
    raise ValueError(f"expected a value, not a boolean ({value!r})")


def apply_config(
    parser: argparse.ArgumentParser, path: str | os.PathLike, ignore: Collection[str] = ()
) -> dict[str, Any]:
    """Read the YAML file at ``path``, validate it against ``parser`` and set it as its defaults.

    Keys in ``ignore`` (another command's options, as in a run's config.yaml) are skipped.
    """
    path = Path(path)
    if path.is_dir():
        raise DynasError(f"config file {str(path)!r} is a folder; give the YAML file (e.g. {str(path / 'config.yaml')!r}).")
    if not path.is_file():
        raise DynasError(f"config file {str(path)!r} does not exist.")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError:
        raise DynasError(f"config file {str(path)!r} is not UTF-8 text.") from None
    except yaml.YAMLError as err:
        first = str(err).replace("\n", " ")
        raise DynasError(f"config file {str(path)!r} is not valid YAML: {first}") from None
    except RecursionError:
        raise DynasError(f"config file {str(path)!r} is not valid YAML: too deeply nested.") from None
    if not isinstance(data, dict):
        raise DynasError(f"config file {str(path)!r} must be a mapping of option: value, but got {type(data).__name__}.")
    actions = _actions(parser)
    defaults = {}
    for key, value in data.items():
        dest = str(key).replace("-", "_")
        if dest in ignore and dest not in actions:
            continue
        if dest not in actions:
            raise DynasError(
                f"config file {str(path)!r}: unknown key {key!r}.{did_you_mean(dest, actions)} "
                f"Known keys: {', '.join(sorted(actions))}."
            )
        defaults[dest] = _convert(actions[dest], value, f"config file {str(path)!r}, key {key!r}")
    parser.set_defaults(**defaults)
    return defaults


def supernet_paths(value: str | list[str] | None) -> list[str]:
    """``--supernet``'s files as a list (a run's config.yaml of an older dynas holds one path)."""
    if not value:
        return []
    return [value] if isinstance(value, str) else list(value)


def write_resolved(args: argparse.Namespace, path: str | os.PathLike) -> None:
    """Write the settings a run actually used, as YAML that ``--config`` accepts (passwords left out)."""
    resolved = {k: v for k, v in sorted(vars(args).items()) if k not in ("command", "config", "verbose")}
    if resolved.get("storage"):  # never a password on disk: the database's own auth (e.g. ~/.pgpass) supplies it
        from dynas.engines.storage import strip_password

        resolved["storage"] = strip_password(resolved["storage"])
    Path(path).write_text(yaml.safe_dump(resolved, sort_keys=True), encoding="utf-8")


# ----------------------------------------------------------------------------- the run record
# ``RUN_DIR/config.yaml`` holds every setting a run used (the flags, resolved against --config);
# these functions rebuild the run's objects from it, so that `search`, `train`, `export` and
# retraining never copy a default by hand: a missing key takes the dataclass' own default.


def read_run_config(run_dir: str | os.PathLike) -> dict[str, Any]:
    """The settings in ``run_dir/config.yaml`` ({} when the run has none).

    Raises:
        DynasError: the file exists but is not a YAML mapping.
    """
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        return {}
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise DynasError(f"config file {str(path)!r} is damaged: {str(err).splitlines()[0]}") from None
    except RecursionError:
        raise DynasError(f"config file {str(path)!r} is damaged: too deeply nested.") from None
    if not isinstance(data, dict):
        raise DynasError(f"config file {str(path)!r} must be a mapping of option: value, but got {type(data).__name__}.")
    return data


def train_config(settings: Mapping[str, Any], **overrides: Any) -> Any:
    """The :class:`~dynas.training.TrainConfig` of a run's settings (its fields by name), then ``overrides``."""
    import dataclasses

    from dynas.training import TrainConfig

    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    values = {k: v for k, v in settings.items() if k in fields and v is not None}
    return TrainConfig(**{**values, **overrides})


def train_subset(value: int | float | None) -> int | float | None:
    """``--train-subset`` as load_data takes it: a count (>= 1) as an int, a fraction as a float.

    Anything else is passed on as it is, for load_data to refuse by name.
    """
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    return int(value) if number and value >= 1 and float(value).is_integer() else value


def load_run_data(settings: Mapping[str, Any], *, full_train: bool = False) -> Any:
    """The run's dataset (``settings["dataset"]``), split as the run split it (same seed, share, subset).

    With ``full_train`` the validation split and any subset are folded back into the training
    split (retraining on the full training set).
    """
    from dynas.data import load_data

    dataset = settings.get("dataset")
    if not isinstance(dataset, str):
        raise DynasError(f"key 'dataset' must be a dataset name (a string), but got {brief(dataset)}.")
    kwargs = {key: settings[key] for key in ("val_fraction", "input_size", "seed") if settings.get(key) is not None}
    if not full_train:
        kwargs["train_subset"] = train_subset(settings.get("train_subset"))
    data = load_data(dataset, root=settings.get("data_root"), **kwargs)
    return data.with_full_train() if full_train else data
