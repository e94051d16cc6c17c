"""dynas: neural architecture search with dynamic convolution.

The front door, as timm's and Optuna's::

    model = dynas.create_model("dy_mobilenetv2_050_cifar")          # presets, arch strings, arch.json, model.pt
    result = dynas.search("mobile_cifar", max_macs=5e6, data=data)  # -> SearchResult (.frame, .best)

The light parts (operator, spec, builder, presets, temperature schedule) import eagerly; the
parts that pull fvcore, pandas, Optuna or the data loaders import on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

from dynas.builder import build_model
from dynas.errors import DynasError
from dynas.ops import DynamicConv2d
from dynas.presets import get_preset, list_presets
from dynas.spec import ArchSpec, BlockSpec, StageSpec, make_divisible
from dynas.temperature import LinearAnneal, dynamic_layers, set_temperature

__version__ = "0.1.0"

_LAZY = {
    "create_model": "dynas.models",
    "list_models": "dynas.models",
    "load_model": "dynas.models",
    "save_model": "dynas.models",
    "search": "dynas.study",
    "SearchResult": "dynas.study",
    "SearchSpace": "dynas.spaces",
    "get_space": "dynas.spaces",
    "list_spaces": "dynas.spaces",
    "register_space": "dynas.spaces",
    "Budget": "dynas.budget",
    "closed_form_macs": "dynas.cost",
    "closed_form_params": "dynas.cost",
    "count_macs": "dynas.counting",
    "measure_latency": "dynas.latency",
    "load_data": "dynas.data",
    "TrainConfig": "dynas.training",
    "train_candidate": "dynas.training",
    "evaluate": "dynas.training",
}

__all__ = [
    "ArchSpec",
    "BlockSpec",
    "DynamicConv2d",
    "DynasError",
    "LinearAnneal",
    "StageSpec",
    "__version__",
    "build_model",
    "dynamic_layers",
    "get_preset",
    "list_presets",
    "make_divisible",
    "set_temperature",
    *_LAZY,
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'dynas' has no attribute {name!r}")
