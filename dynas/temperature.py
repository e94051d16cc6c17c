"""Temperature (tau) annealing for dynamic convolution.

The paper trains with a high temperature (tau = 30) so that the attention is near uniform and all
K kernels receive gradient, then anneals tau linearly to 1 over the early part of training.
A schedule is any callable ``step -> tau``; the optimizer step is the unit (not the epoch).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from dynas.ops import TEMPERATURE_LAYERS, DynamicConv2d, ODConv2d

__all__ = ["LinearAnneal", "TemperatureSchedule", "current_temperature", "dynamic_layers", "set_temperature"]

TemperatureSchedule = Callable[[int], float]
"""Any callable mapping the optimizer step (0-based) to tau > 0 is a schedule."""


@dataclass(frozen=True)
class LinearAnneal:
    """tau goes linearly from ``start`` to ``end`` over the first ``anneal_steps`` steps, then stays.

    >>> s = LinearAnneal(start=30.0, end=1.0, anneal_steps=100)
    >>> s(0), s(50), s(100), s(10_000)
    (30.0, 15.5, 1.0, 1.0)
    """

    start: float = 30.0
    end: float = 1.0
    anneal_steps: int = 0

    def __post_init__(self) -> None:
        for name in ("start", "end"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"`{name}` (temperature) must be a finite number > 0, but got {name}={value!r}.")
        if isinstance(self.anneal_steps, bool) or not isinstance(self.anneal_steps, int) or self.anneal_steps < 0:
            raise ValueError(f"`anneal_steps` must be an integer >= 0, but got anneal_steps={self.anneal_steps!r}.")

    @classmethod
    def from_fraction(
        cls, total_steps: int, fraction: float = 0.1, start: float = 30.0, end: float = 1.0
    ) -> LinearAnneal:
        """Anneal over the first ``fraction`` of ``total_steps`` optimizer steps."""
        if not (0.0 <= fraction <= 1.0):
            raise ValueError(f"`fraction` must lie in [0, 1], but got fraction={fraction!r}.")
        if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 0:
            raise ValueError(f"`total_steps` must be an integer >= 0, but got total_steps={total_steps!r}.")
        return cls(start=start, end=end, anneal_steps=round(fraction * total_steps))

    def __call__(self, step: int) -> float:
        if step < 0:
            raise ValueError(f"`step` must be >= 0, but got step={step}.")
        if step >= self.anneal_steps:
            return float(self.end)
        return float(self.start + (self.end - self.start) * step / self.anneal_steps)


def dynamic_layers(model: nn.Module) -> list[tuple[str, DynamicConv2d | ODConv2d]]:
    """All submodules of ``model`` with a temperature (DY-conv, ODConv), with their qualified names."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, TEMPERATURE_LAYERS)]


def current_temperature(model: nn.Module, default: float = 1.0) -> float:
    """The tau of ``model``'s dynamic layers (``default`` for a static model)."""
    layers = dynamic_layers(model)
    return float(layers[0][1].temperature) if layers else float(default)


def set_temperature(model: nn.Module, temperature: float) -> int:
    """Set tau on every dynamic layer of ``model``; returns how many layers were set."""
    layers = dynamic_layers(model)
    for _, layer in layers:
        layer.temperature = temperature
    return len(layers)
