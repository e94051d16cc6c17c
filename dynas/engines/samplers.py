"""Optuna samplers and pruners by name, and the objectives' directions.

``make_sampler("tpe", space, seed)`` is what the CLI's ``--sampler`` gives; any Optuna sampler
object can be passed to :func:`dynas.search` instead.
"""

from __future__ import annotations

import math
import random
import warnings
from collections.abc import Sequence
from typing import Any

import optuna
from optuna.distributions import BaseDistribution
from optuna.trial import FrozenTrial, TrialState

from dynas.checks import check_name
from dynas.errors import DynasError
from dynas.spaces import SearchSpace

__all__ = [
    "OBJECTIVES",
    "BudgetStartupSampler",
    "PRUNERS",
    "RANDOM_STARTUP_TRIALS",
    "SAMPLERS",
    "STARTUP_TRIALS",
    "make_pruner",
    "make_sampler",
    "startup_trials",
]

SAMPLERS = ("tpe", "random", "nsga2", "gp", "grid")
PRUNERS = ("median", "hyperband", "none")
OBJECTIVES = {
    "top1": ("maximize",),
    "top1-macs": ("maximize", "minimize"),
}
_GRID_LIMIT = 10_000
#: TPE and GP draw their first trials at random; dynas draws them within the budget (see
#: ``_FeasibleStartup``). The random sampler draws every trial at random.
RANDOM_STARTUP_TRIALS = 10
#: Trials each sampler draws uniformly at random (dynas draws them within the budget).
STARTUP_TRIALS = {"tpe": RANDOM_STARTUP_TRIALS, "gp": RANDOM_STARTUP_TRIALS, "random": math.inf}


def make_sampler(name: str, space: SearchSpace, seed: int | None) -> optuna.samplers.BaseSampler:
    """An Optuna sampler by name (``SAMPLERS``), seeded."""
    check_name("sampler", name, SAMPLERS)
    if name == "tpe":
        # group=True: multivariate TPE over a define-by-run space whose choices come and go.
        with warnings.catch_warnings():  # `group` is experimental
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.samplers.TPESampler(
                n_startup_trials=RANDOM_STARTUP_TRIALS, multivariate=True, group=True, constant_liar=True, seed=seed
            )
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed)
    if name == "gp":
        return optuna.samplers.GPSampler(n_startup_trials=RANDOM_STARTUP_TRIALS, seed=seed)
    grid = {c.label: list(c.values) for c in space.choices()}
    size = math.prod(len(v) for v in grid.values())
    if size > _GRID_LIMIT:
        raise DynasError(
            f"the grid sampler needs a space of at most {_GRID_LIMIT} points, but space "
            f"{space.name!r} has {size}; use tpe or random, or a smaller space."
        )
    return optuna.samplers.GridSampler(grid, seed=seed)


def make_pruner(name: str, epochs: int) -> optuna.pruners.BasePruner:
    """An Optuna pruner by name (``PRUNERS``) fed with per-epoch validation top-1."""
    check_name("pruner", name, PRUNERS)
    if name == "median":
        # Epochs report 1-based. Before half the epochs accuracy is mostly noise (in the default
        # job every candidate sits near chance after epoch 1 and the good ones take off in epoch
        # 2-3), so pruning there would prune at random.
        return optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=max(1, epochs // 2))
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=max(epochs, 1))
    return optuna.pruners.NopPruner()


def startup_trials(sampler: str | optuna.samplers.BaseSampler) -> float:
    """How many first trials ``sampler`` draws uniformly at random (``inf`` for random search).

    dynas draws these within the budget instead (rejection on the closed-form cost), for a
    sampler given by name or as an Optuna object; an unknown sampler class gets none.
    """
    if isinstance(sampler, str):
        return STARTUP_TRIALS.get(sampler, 0)
    if isinstance(sampler, optuna.samplers.RandomSampler):
        return math.inf
    return getattr(sampler, "_n_startup_trials", 0)


class BudgetStartupSampler(optuna.samplers.BaseSampler):
    """Wrap an Optuna sampler so that its random start-up trials are drawn within a budget.

    For a plain Optuna objective that calls ``space.suggest(trial)``::

        sampler = BudgetStartupSampler(optuna.samplers.TPESampler(), space, Budget(max_macs=1.5e6))
        study = optuna.create_study(sampler=sampler, direction="maximize")

    The first ``n_startup_trials`` trials (default: as many as the wrapped sampler draws at
    random, every trial for ``RandomSampler``) take the choices of a candidate drawn uniformly
    among the feasible ones (rejection on the closed-form cost, microseconds a draw); later
    trials are the wrapped sampler's. At a tight budget uniform proposals are nearly all over
    it (27 of the default job's first 27), which leaves a model-based sampler nothing to learn
    from. Each process draws its own start-up candidates from ``seed``.
    """

    def __init__(
        self,
        sampler: optuna.samplers.BaseSampler,
        space: SearchSpace,
        budget: Any,
        n_startup_trials: float | None = None,
        seed: int | None = None,
    ) -> None:
        self.sampler, self.space, self.budget = sampler, space, budget
        self.n_startup_trials = startup_trials(sampler) if n_startup_trials is None else n_startup_trials
        self._rng = random.Random(seed)
        self._drawn: dict[int, dict[str, Any]] = {}  # trial number -> the start-up candidate's choices

    def _startup(self, trial: FrozenTrial) -> dict[str, Any] | None:
        return self._drawn.get(trial.number)

    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        from dynas.budget import NoFeasibleSampleError, sample_within_budget

        if trial.number < self.n_startup_trials and not trial.system_attrs.get("fixed_params"):
            try:
                candidate = sample_within_budget(self.space, self.budget, seed=self._rng.randrange(2**63))
                self._drawn[trial.number] = dict(candidate.params)
            except NoFeasibleSampleError:
                self.n_startup_trials = 0  # too tight for uniform draws: the sampler proposes
        self.sampler.before_trial(study, trial)

    def infer_relative_search_space(self, study: optuna.Study, trial: FrozenTrial) -> dict[str, BaseDistribution]:
        if self._startup(trial) is not None:
            return {}
        return self.sampler.infer_relative_search_space(study, trial)

    def sample_relative(
        self, study: optuna.Study, trial: FrozenTrial, search_space: dict[str, BaseDistribution]
    ) -> dict[str, Any]:
        if self._startup(trial) is not None:
            return {}
        return self.sampler.sample_relative(study, trial, search_space)

    def sample_independent(
        self, study: optuna.Study, trial: FrozenTrial, param_name: str, param_distribution: BaseDistribution
    ) -> Any:
        drawn = self._startup(trial)
        if drawn is not None and param_name in drawn:
            return drawn[param_name]
        return self.sampler.sample_independent(study, trial, param_name, param_distribution)

    def after_trial(
        self, study: optuna.Study, trial: FrozenTrial, state: TrialState, values: Sequence[float] | None
    ) -> None:
        self._drawn.pop(trial.number, None)
        self.sampler.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        self.sampler.reseed_rng()
