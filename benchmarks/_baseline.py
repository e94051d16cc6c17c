"""Another version of ``DynamicConv2d`` timed alongside this one: before and after in one run.

Separate runs on a shared machine differ by more than most optimisations gain, so a change to
``dynas/ops/dynamic_conv.py`` is measured against the old file in the same interleaved rounds::

    git show 98104fe:dynas/ops/dynamic_conv.py > /tmp/dynamic_conv_98104fe.py
    python benchmarks/bench_networks.py --baseline /tmp/dynamic_conv_98104fe.py
"""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

from torch import nn

from dynas.ops import DynamicConv2d

__all__ = ["add_baseline_arg", "use_baseline"]


def add_baseline_arg(parser: argparse.ArgumentParser) -> None:
    """``--baseline FILE``: another version's ``dynas/ops/dynamic_conv.py``."""
    parser.add_argument("--baseline", type=Path, default=None,
                        help="another version's dynas/ops/dynamic_conv.py, timed alongside as baseline_cl")


def _load(path: Path) -> type[nn.Module]:
    spec = importlib.util.spec_from_file_location("baseline_dynamic_conv", path)
    if not path.is_file() or spec is None or spec.loader is None:
        raise SystemExit(f"`--baseline` must be a Python file, but got {str(path)!r}.")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.DynamicConv2d


def use_baseline(model: nn.Module, path: Path) -> nn.Module:
    """Run every DynamicConv2d in ``model`` with the code of ``path`` (same parameters, attributes)."""
    cls = _load(path)
    for m in model.modules():
        if isinstance(m, DynamicConv2d):
            m.__class__ = cls
    return model
