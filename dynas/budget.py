"""Cost budgets (MACs, parameters, latency) and sampling within them.

MACs and parameters are checked from the spec alone with the closed-form counter of
:mod:`dynas.counting` (microseconds, no model built), so an infeasible budget fails before any
work, and a search never trains an over-budget candidate. Latency needs a built model: measure it
with :func:`dynas.latency.measure_latency` and check it with :meth:`Budget.check_latency`.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from dynas.cost import closed_form_macs, closed_form_params, format_count
from dynas.errors import DynasError

if TYPE_CHECKING:
    from dynas.spec import ArchSpec

__all__ = [
    "Budget",
    "CostRange",
    "InfeasibleBudgetError",
    "NoFeasibleSampleError",
    "ensure_feasible",
    "sample_within_budget",
    "space_cost_range",
]


class InfeasibleBudgetError(DynasError):
    """Even the smallest architecture of a search space is over the budget."""


class NoFeasibleSampleError(DynasError):
    """Random sampling found no architecture within the budget in the allowed attempts."""


def _check_limit(name: str, value: object, required: bool) -> None:
    if value is None and not required:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"`{name}` must be a number, but got {name}={value!r}.")
    if not math.isfinite(value):
        raise ValueError(f"`{name}` must be finite, but got {name}={value!r}.")
    if value <= 0:
        raise ValueError(f"`{name}` must be > 0, but got {name}={value!r}.")


@dataclass(frozen=True)
class Budget:
    """Upper bounds on the cost of an architecture.

    Attributes:
        max_macs: most multiply-adds per image at the spec's input size.
        max_params: most parameters, or ``None`` for no bound.
        max_latency_ms: most milliseconds per forward pass, or ``None``; it needs a built model,
            so :meth:`check` does not look at it -- use :meth:`check_latency`.
    """

    max_macs: float
    max_params: float | None = None
    max_latency_ms: float | None = None

    def __post_init__(self) -> None:
        _check_limit("max_macs", self.max_macs, required=True)
        _check_limit("max_params", self.max_params, required=False)
        _check_limit("max_latency_ms", self.max_latency_ms, required=False)

    def check(self, arch: ArchSpec) -> list[str]:
        """Return the MAC and parameter violations of ``arch`` (empty when within budget).

        Example: ``["macs 12.3M > max 10M"]``. Counted with the closed form, no model built.
        """
        violations = []
        macs = closed_form_macs(arch)
        if macs > self.max_macs:
            violations.append(f"macs {format_count(macs)} > max {format_count(self.max_macs)}")
        if self.max_params is not None:
            params = closed_form_params(arch)
            if params > self.max_params:
                violations.append(f"params {format_count(params)} > max {format_count(self.max_params)}")
        return violations

    def is_feasible(self, arch: ArchSpec) -> bool:
        """Whether ``arch`` is within the MAC and parameter bounds (latency is not checked)."""
        return not self.check(arch)

    def check_latency(self, latency_ms: float) -> list[str]:
        """Return the latency violation of a measured latency (empty when within budget)."""
        if self.max_latency_ms is None or latency_ms <= self.max_latency_ms:
            return []
        return [f"latency {latency_ms:.3g}ms > max {self.max_latency_ms:g}ms"]


@dataclass(frozen=True)
class CostRange:
    """The cost of a space's smallest and largest architecture, counted in closed form."""

    min_macs: int
    max_macs: int
    min_params: int
    max_params: int
    input_size: int | tuple[int, int]

    def __str__(self) -> str:
        return (
            f"macs {format_count(self.min_macs)}..{format_count(self.max_macs)}, "
            f"params {format_count(self.min_params)}..{format_count(self.max_params)} "
            f"at {_resolution_str(self.input_size)}"
        )


def _resolution_str(input_size: int | tuple[int, int]) -> str:
    height, width = (input_size, input_size) if isinstance(input_size, int) else input_size
    return f"{height}×{width}"


def space_cost_range(space: Any, input_size: int | tuple[int, int] | None = None) -> CostRange:
    """Cost range of a search space from ``space.smallest()`` and ``space.largest()``.

    Args:
        space: a :class:`search_spaces.SearchSpace`.
        input_size: resolution to count at; ``None`` uses the specs' own ``input_size``.

    Returns:
        The :class:`CostRange`.
    """
    smallest, largest = space.smallest(), space.largest()
    return CostRange(
        min_macs=closed_form_macs(smallest, input_size),
        max_macs=closed_form_macs(largest, input_size),
        min_params=closed_form_params(smallest),
        max_params=closed_form_params(largest),
        input_size=smallest.input_size if input_size is None else input_size,
    )


def ensure_feasible(space: Any, budget: Budget) -> CostRange:
    """Raise unless the smallest architecture of ``space`` fits ``budget``; return the cost range.

    Call it before any work: a budget no architecture can meet is a configuration error.

    Raises:
        InfeasibleBudgetError: the smallest architecture needs more MACs or parameters than the
            budget allows. The message names the space, the need and the budget.
    """
    costs = space_cost_range(space)
    needs = [("MACs", costs.min_macs, budget.max_macs), ("parameters", costs.min_params, budget.max_params)]
    for what, need, limit in needs:
        if limit is not None and need > limit:
            raise InfeasibleBudgetError(
                f"the smallest architecture of space {space.name!r} needs {format_count(need)} "
                f"{what} at {_resolution_str(costs.input_size)}; the budget is {format_count(limit)}. "
                f"The space spans {costs}."
            )
    return costs


def sample_within_budget(
    space: Any, budget: Budget, seed: int | None = None, max_attempts: int = 1000
) -> Any:
    """Sample random candidates of ``space`` until one is within ``budget`` (MACs, parameters).

    The budget is first checked against the space's smallest architecture, so an infeasible
    budget fails at once instead of after ``max_attempts`` samples. Attempt ``i`` samples with a
    seed drawn from ``random.Random(seed)``, so a seed gives the same candidate every time.

    Args:
        space: a :class:`search_spaces.SearchSpace`; ``space.sample(seed=...)`` is called without
            a budget.
        budget: the bounds; ``max_latency_ms`` is not checked (it needs a built model).
        seed: seed of the attempt sequence; ``None`` for a fresh one.
        max_attempts: samples drawn before giving up.

    Returns:
        The first sampled candidate (``space.sample``'s return value) within the budget.

    Raises:
        InfeasibleBudgetError: the smallest architecture of the space is over the budget.
        NoFeasibleSampleError: none of ``max_attempts`` samples was within the budget.
    """
    if isinstance(max_attempts, bool) or not isinstance(max_attempts, int) or max_attempts < 1:
        raise ValueError(f"`max_attempts` must be an integer >= 1, but got {max_attempts=!r}.")
    ensure_feasible(space, budget)
    rng = random.Random(seed)
    seen_macs: list[int] = []
    for _ in range(max_attempts):
        candidate = space.sample(seed=rng.randrange(2**63))
        if budget.is_feasible(candidate.arch):
            return candidate
        seen_macs.append(closed_form_macs(candidate.arch))
    raise NoFeasibleSampleError(
        f"none of {max_attempts} samples of space {space.name!r} (seed={seed}) is within "
        f"{budget}; their MACs ranged {format_count(min(seen_macs))}..{format_count(max(seen_macs))}. "
        "Raise the budget or `max_attempts`, or search a smaller space."
    )
