"""The Optuna engine: define-by-run search over a dynas space under a hard MAC budget.

Every trial asks the space's choices through ``space.suggest(trial)`` (K only when a block is
dynamic), computes the closed-form cost, tells the sampler about any budget violation with
``trial.set_constraint`` (feasible when <= 0) and trains only feasible candidates. The study lives
in an Optuna storage URL (default: a SQLite file in the run directory), so rerunning the same
command resumes it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from dynas.errors import DynasError, did_you_mean
from dynas.search.evaluate import CandidateEvaluator

try:
    import optuna
except ImportError as err:  # pragma: no cover - optuna is a core dependency
    raise ImportError("The Optuna engine needs optuna: pip install optuna") from err

__all__ = ["OBJECTIVES", "PRUNERS", "SAMPLERS", "make_pruner", "make_sampler", "run_optuna_search"]

SAMPLERS = ("tpe", "random", "nsga2", "gp", "grid")
PRUNERS = ("median", "hyperband", "none")
OBJECTIVES = {
    "top1": ("maximize",),
    "top1-macs": ("maximize", "minimize"),
}
_GRID_LIMIT = 10_000


def _check_name(kind: str, name: str, options: Sequence[str]) -> None:
    if name not in options:
        raise DynasError(f"unknown {kind} {name!r}; choose one of {', '.join(options)}.{did_you_mean(name, options)}")


def make_sampler(name: str, space: Any, seed: int | None) -> optuna.samplers.BaseSampler:
    """An Optuna sampler by name (``SAMPLERS``), seeded."""
    _check_name("sampler", name, SAMPLERS)
    if name == "tpe":
        # group=True: multivariate TPE over a define-by-run space whose choices come and go.
        return optuna.samplers.TPESampler(multivariate=True, group=True, constant_liar=True, seed=seed)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed)
    if name == "gp":
        return optuna.samplers.GPSampler(seed=seed)
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
    _check_name("pruner", name, PRUNERS)
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=1)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=max(epochs, 1))
    return optuna.pruners.NopPruner()


def _objective(space: Any, evaluator: CandidateEvaluator, objective: str):
    multi = len(OBJECTIVES[objective]) > 1

    def run(trial: optuna.Trial) -> float | tuple[float, float]:
        candidate = space.suggest(trial)
        macs, params, _ = evaluator.cost(candidate.arch)
        budget = evaluator.budget
        trial.set_constraint("macs", float(macs - budget.max_macs))
        if budget.max_params is not None:
            trial.set_constraint("params", float(params - budget.max_params))
        trial.set_user_attr("arch", candidate.arch.to_str())
        trial.set_user_attr("macs", macs)

        def prune(epoch: int, val_top1: float) -> bool:
            trial.report(val_top1, epoch)
            return trial.should_prune()

        record = evaluator.evaluate(candidate, trial.number, "optuna", None if multi else prune)
        trial.set_user_attr("state", record.state)
        if record.state == "pruned":
            raise optuna.TrialPruned(record.reason)
        if record.state == "failed":
            return (math.nan, math.nan) if multi else math.nan  # Optuna marks the trial FAIL
        # A rejected candidate was never trained: worst accuracy; the constraint tells TPE why.
        top1 = 0.0 if record.state == "rejected" else float(record.val_top1)
        return (top1, float(macs)) if multi else top1

    return run


def _check_same_search(study: optuna.Study, space: Any, evaluator: CandidateEvaluator, objective: str) -> None:
    """Refuse to mix trials of another space, budget or objective into an existing study."""
    identity = {
        "dynas_space": space.name,
        "dynas_budget": repr(evaluator.budget),
        "dynas_objective": objective,
    }
    attrs = study.user_attrs
    for key, value in identity.items():
        if key not in attrs:
            study.set_user_attr(key, value)
        elif attrs[key] != value:
            name = key.removeprefix("dynas_")
            raise DynasError(
                f"study {study.study_name!r} was created with {name} {attrs[key]!r}, but this run "
                f"uses {value!r}; refusing to mix them. Use another --study-name or --run-dir."
            )


def run_optuna_search(
    space: Any,
    evaluator: CandidateEvaluator,
    *,
    n_trials: int,
    storage: str,
    study_name: str,
    sampler: str = "tpe",
    pruner: str = "median",
    objective: str = "top1",
    seed: int | None = 0,
    timeout: float | None = None,
    callbacks: Sequence[Any] = (),
) -> optuna.Study:
    """Run (or resume) a study until it holds ``n_trials`` finished trials.

    Rejected (over-budget) trials count as trials: they cost no training and teach the sampler
    where the budget lies. Returns the study; the rows are in ``evaluator.results``.
    """
    _check_name("objective", objective, list(OBJECTIVES))
    if n_trials < 1:
        raise DynasError(f"`trials` must be >= 1, but got trials={n_trials}.")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        storage=storage,
        study_name=study_name,
        load_if_exists=True,
        sampler=make_sampler(sampler, space, seed),
        pruner=make_pruner(pruner, evaluator.train_config.epochs),
        directions=list(OBJECTIVES[objective]),
    )
    _check_same_search(study, space, evaluator, objective)
    finished = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    remaining = n_trials - len(study.get_trials(deepcopy=False, states=finished))
    if remaining > 0:
        study.optimize(
            _objective(space, evaluator, objective),
            n_trials=remaining,
            timeout=timeout,
            # Other workers on the same storage add trials too: stop when the study has enough.
            callbacks=[optuna.study.MaxTrialsCallback(n_trials, states=finished), *callbacks],
        )
    return study
