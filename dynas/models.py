"""The front door to networks: ``create_model`` (as ``timm.create_model``) and model files.

>>> model = create_model("dy_mobilenetv2_050_cifar")
>>> model.arch.input_size, model.get_classifier().out_features
(32, 10)
>>> create_model("mobilenetv2_100", num_classes=37).arch.num_classes
37

``name_or_arch`` is any of the forms an architecture takes in dynas:

* a preset name (:func:`list_models`), e.g. ``"dy_mobilenetv2_100"``;
* a one-line arch string (:meth:`~dynas.spec.ArchSpec.to_str`), as in a results table;
* an :class:`~dynas.spec.ArchSpec`;
* the path of an ``arch.json`` (exported, or ``{"arch": {...}}`` / a bare spec dict);
* the path of a ``model.pt`` written by :func:`save_model` (a search's kept weights, ``train``,
  ``export``): the trained network, in eval mode at its trained temperature.

A model file is a ``torch.save``'d dict ``{"arch", "state_dict", "temperature", ...}``, read
with ``weights_only=True``; :func:`save_model` is its only writer.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dynas.builder import DynasNet, build_model
from dynas.errors import DynasError
from dynas.presets import PRESETS, get_preset
from dynas.spec import ArchSpec
from dynas.temperature import set_temperature

__all__ = ["create_model", "list_models", "load_model", "read_arch", "read_model_file", "save_model"]

_TORCH_MAGIC = (b"PK\x03\x04", b"\x80")  # zip (torch >= 1.6) or legacy pickle


def list_models(pattern: str | None = None) -> list[str]:
    """Preset names, sorted; ``pattern`` filters them as ``fnmatch`` does (``"dy_*"``)."""
    names = sorted(PRESETS)
    return names if pattern is None else fnmatch.filter(names, pattern)


def create_model(
    name_or_arch: str | Path | ArchSpec,
    *,
    num_classes: int | None = None,
    input_size: int | None = None,
    in_channels: int | None = None,
    checkpoint_path: str | Path | None = None,
) -> DynasNet:
    """Build a network from a preset name, an arch string, an ArchSpec, an arch.json or a model.pt.

    Args:
        name_or_arch: see the module docstring.
        num_classes: classifier width (default: the architecture's). Given with a trained model
            file, every weight but the classifier's is loaded and the classifier is new.
        input_size: square input resolution the spec (and its MAC count) is made for.
        in_channels: image channels (1 for grayscale).
        checkpoint_path: a ``model.pt`` whose weights to load into the network (its
            architecture must be the same one).

    Returns:
        A :class:`~dynas.builder.DynasNet`: freshly initialised in train mode, or, from a model
        file or ``checkpoint_path``, trained weights in eval mode at the trained temperature.

    Raises:
        DynasError: an unknown name, a malformed string or file, or weights of another
            architecture (each message names the input).
    """
    payload = None
    if isinstance(name_or_arch, ArchSpec):
        arch = name_or_arch
    elif isinstance(name_or_arch, (str, Path)):
        path = Path(name_or_arch)
        if path.is_file() and _is_torch_file(path):
            payload = read_model_file(path)
            arch = ArchSpec.from_dict(payload["arch"])
        else:
            arch = read_arch(str(name_or_arch))
    else:
        raise TypeError(
            f"`name_or_arch` must be a preset name, an arch string, an ArchSpec or a file path, "
            f"but got {type(name_or_arch).__name__}: {name_or_arch!r}."
        )
    changes = {"input_size": input_size, "in_channels": in_channels}
    arch = dataclasses.replace(arch, **{k: v for k, v in changes.items() if v is not None})
    if payload is None and num_classes is not None:
        arch = dataclasses.replace(arch, num_classes=num_classes)
    model = build_model(arch)
    if checkpoint_path is not None:
        payload = read_model_file(Path(checkpoint_path))
        _check_same_arch(payload, dataclasses.replace(arch, num_classes=payload["arch"].get("num_classes")), checkpoint_path)
    if payload is None:
        return model
    if in_channels is not None and in_channels != payload["arch"].get("in_channels", 3):
        raise DynasError(
            f"`in_channels` must match the trained model's {payload['arch'].get('in_channels', 3)}, "
            f"but got in_channels={in_channels}."
        )
    _load_weights(model, payload, payload["arch"].get("num_classes", arch.num_classes) if num_classes is None else num_classes)
    return model.eval()


def _load_weights(model: DynasNet, payload: dict, num_classes: int) -> None:
    """Load ``payload``'s weights into ``model``, then give it a new ``num_classes`` classifier if asked."""
    trained = payload["arch"].get("num_classes", model.arch.num_classes)
    if model.arch.num_classes != trained:
        model.reset_classifier(trained)
    try:
        model.load_state_dict(payload["state_dict"])
    except RuntimeError as err:
        first = str(err).strip().splitlines()[0]
        raise DynasError(f"the weights do not fit the architecture {model.arch.to_str()!r}: {first}") from None
    if num_classes != trained:
        model.reset_classifier(num_classes)
    set_temperature(model, payload.get("temperature", 1.0))


def _check_same_arch(payload: dict, arch: ArchSpec, path: str | Path) -> None:
    saved = ArchSpec.from_dict(payload["arch"])
    if dataclasses.replace(saved, input_size=arch.input_size) != arch:
        raise DynasError(
            f"`checkpoint_path` {str(path)!r} holds the weights of {saved.to_str()!r}, "
            f"not of {arch.to_str()!r}."
        )


def _is_torch_file(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(4)
    return head.startswith(_TORCH_MAGIC)


def read_arch(text: str) -> ArchSpec:
    """The ArchSpec of a preset name, a one-line arch string or an arch JSON file's path.

    Raises:
        DynasError: no such preset (with a close match), a malformed string, or a file that
            is missing, not UTF-8, not JSON or not an arch.
    """
    path = Path(text)
    if path.suffix == ".json" or path.is_file() or path.is_dir():
        return _read_arch_file(path, text)
    if text in PRESETS:
        return get_preset(text)
    if any(c in text for c in " |/"):
        return ArchSpec.from_str(text)
    return get_preset(text)  # raises with close-match suggestions


def _read_arch_file(path: Path, text: str) -> ArchSpec:
    if path.is_dir():
        raise DynasError(f"arch file {text!r} is a folder; give its arch.json.")
    if not path.is_file():
        raise DynasError(f"arch file {text!r} does not exist.")
    if _is_torch_file(path):
        raise DynasError(
            f"arch file {text!r} is a model file (torch), not an arch JSON; give the arch.json exported "
            f"beside it, a preset name or an arch string."
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise DynasError(f"arch file {text!r} is not UTF-8 text.") from None
    except json.JSONDecodeError as err:
        raise DynasError(f"arch file {text!r} is not valid JSON: {err}") from None
    except RecursionError:
        raise DynasError(f"arch file {text!r} is not valid JSON: too deeply nested.") from None
    if not isinstance(data, dict):
        raise DynasError(f"arch file {text!r} must hold a JSON object (an arch spec), but holds a {type(data).__name__}.")
    try:
        return ArchSpec.from_dict(data.get("arch", data))
    except (DynasError, TypeError, ValueError) as err:
        raise DynasError(f"arch file {text!r}: {err}") from None


def save_model(path: str | Path, model: nn.Module, arch: ArchSpec, temperature: float, **extra: Any) -> None:
    """Write ``model``'s weights with its spec and inference temperature (read back by :func:`load_model`).

    The file is written beside its destination and renamed into place, so a crash never leaves
    a partial ``model.pt``.
    """
    from dynas import __version__

    path = Path(path)
    payload = {
        "arch": arch.to_dict(),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "temperature": float(temperature),
        "dynas_version": __version__,
        **extra,
    }
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(payload, tmp)
    tmp.replace(path)


def read_model_file(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """The payload of a dynas model file, checked to hold an arch and a state dict."""
    path = Path(path)
    if not path.is_file():
        raise DynasError(f"model file {str(path)!r} does not exist.")
    if not _is_torch_file(path):
        raise DynasError(f"{str(path)!r} is not a dynas model file: not a torch file at all.")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # a foreign pickle, a truncated file
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DynasError(f"{str(path)!r} is not a dynas model file: torch.load failed ({first[:160]}).") from None
    if not isinstance(payload, dict) or "arch" not in payload or "state_dict" not in payload:
        raise DynasError(f"{str(path)!r} is not a dynas model file (it needs 'arch' and 'state_dict').")
    return payload


def load_model(path: str | Path, map_location: str | torch.device = "cpu") -> DynasNet:
    """Rebuild a model saved by dynas (export, ``train`` or a search trial) in eval mode, at its trained tau."""
    payload = read_model_file(path, map_location)
    model = build_model(ArchSpec.from_dict(payload["arch"]))
    _load_weights(model, payload, model.arch.num_classes)
    return model.eval()
