"""The search front door: ``dynas.search(space, max_macs=..., ...) -> SearchResult``.

The library owns the search loop (as ``optuna.create_study(...).optimize(...)`` does); the CLI's
``search`` command is a thin layer over :func:`search`. Five lines search a space with the
built-in trainer::

    import dynas
    data = dynas.load_data("digits", input_size=16)
    result = dynas.search("mobile_cifar", max_macs=1.5e6, data=data, n_trials=4,
                          train_config=dynas.TrainConfig(epochs=2))
    print(result.best["arch"], result.best["val_top1"])

or score candidates with your own ``objective(candidate, trial) -> float`` (higher is better)
instead of training; the budget gate, the in-budget start-up draws, constraints and duplicate
handling are the same either way.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from dynas.budget import Budget, ensure_feasible
from dynas.checks import MAX_SEED, check_int, check_name
from dynas.errors import DynasError
from dynas.results import ResultsTable, TrialRecord
from dynas.spaces import Candidate, SearchSpace, get_space

__all__ = ["ENGINES", "SearchResult", "search", "supernet_objective"]

ENGINES = ("optuna", "nni")


@dataclass(frozen=True)
class SearchResult:
    """What a search left: its table, its study (Optuna) and where its files are.

    Attributes:
        frame: every row of the run's results table (one per proposal, rejections included),
            as ``dynas.results.ResultsTable.frame()`` gives it.
        run_dir: the folder holding ``results.jsonl``/``results.csv`` and kept weights.
        study: the ``optuna.Study`` (``None`` for NNI).
        counters: what this call did (proposed, rejected, trained, ...).
    """

    frame: pd.DataFrame
    run_dir: Path
    study: Any
    counters: Any

    @property
    def best(self) -> pd.Series | None:
        """The completed row with the highest ``val_top1`` (the objective's value), or None."""
        done = self.frame[self.frame["state"] == "complete"]
        if done.empty:
            return None
        return done.sort_values("val_top1", ascending=False, kind="stable").iloc[0]


def _resolve_space(space: SearchSpace | str, data: Any) -> SearchSpace:
    if isinstance(space, SearchSpace):
        return space
    if not isinstance(space, str):
        raise TypeError(f"`space` must be a SearchSpace or a registered name, but got {type(space).__name__}: {space!r}.")
    if data is None:
        return get_space(space)
    sizes = {"input_size": data.input_size, "num_classes": data.num_classes}
    if data.in_channels != 3:  # spaces of other packages may not take the keyword
        sizes["in_channels"] = data.in_channels
    return get_space(space, **sizes)


def search(
    space: SearchSpace | str,
    *,
    max_macs: float,
    max_params: float | None = None,
    max_latency_ms: float | None = None,
    objective: Callable[[Candidate, Any], float] | None = None,
    data: Any = None,
    n_trials: int = 10,
    engine: str = "optuna",
    sampler: Any = None,
    pruner: Any = "median",
    metric: str = "top1",
    storage: Any = None,
    study_name: str | None = None,
    run_dir: str | Path | None = None,
    train_config: Any = None,
    keep_weights: int = 3,
    enqueue: Sequence[Mapping[str, Any]] = (),
    seed: int = 0,
    timeout: float | None = None,
    strategy: str = "evolution",
    execution: str = "sequential",
    host: str = "127.0.0.1",
    port: int = 8081,
    heartbeat_interval: int | None = 60,
    grace_period: int | None = None,
    on_record: Callable[[TrialRecord], None] | None = None,
    on_ready: Callable[[], None] | None = None,
    fidelity: str | None = None,
    baselines: bool = True,
) -> SearchResult:
    """Search ``space`` under a MAC budget; every argument is checked before any work.

    Args:
        space: a :class:`~dynas.spaces.SearchSpace`, or a registered name (built for ``data``'s
            input size, channels and classes when ``data`` is given).
        max_macs, max_params, max_latency_ms: the budget (:class:`~dynas.budget.Budget`);
            candidates over it are rejected from the closed-form cost, never trained.
        objective: ``objective(candidate, trial) -> float`` (higher is better) instead of the
            built-in trainer; ``trial`` is the ``optuna.Trial`` (or the trial number, NNI).
        data: a :class:`~dynas.data.DataBundle` for the built-in trainer (``dynas.load_data``).
        n_trials: candidates to evaluate (rejections do not count).
        engine: ``"optuna"`` or ``"nni"``.
        sampler: Optuna: a name (``tpe``, ``random``, ``nsga2``, ``gp``, ``grid``) or any
            ``optuna.samplers.BaseSampler``; default ``tpe``.
        pruner: Optuna: a name (``median``, ``hyperband``, ``none``) or a ``BasePruner``.
        metric: ``top1`` (maximise) or ``top1-macs`` (Pareto: maximise, minimise MACs).
        storage: Optuna: a storage object, a URL, or a journal file path; default in memory.
        study_name: default: the run directory's name.
        run_dir: folder for the results table and kept weights; default a new temporary folder.
        train_config: a :class:`~dynas.training.TrainConfig` (default: its defaults).
        keep_weights: keep the weights of the best N trials (0: none).
        enqueue: choice dicts evaluated first (each validated by ``space.decode``).
        seed: the sampler's / strategy's seed.
        timeout: Optuna: stop starting trials after this many seconds.
        strategy, execution, host, port: NNI's strategy and execution (see :mod:`dynas.engines.nni_engine`).
        heartbeat_interval, grace_period: for a storage given as a URL or path.
        on_record: called with every results row as it is written.
        on_ready: called once everything is checked and the study is open, before the first trial.
        fidelity: the rows' ``fidelity`` column (default ``scratch``, or ``objective`` with one;
            :func:`supernet_objective` searches pass ``supernet``).
        baselines: train the space's best uniform all-static and all-dynamic (K = 4)
            architectures within the budget first (:mod:`dynas.baselines`; ``origin`` column).

    Returns:
        A :class:`SearchResult`.

    Raises:
        DynasError: an argument breaks its rule (the message names it), the budget is below the
            space's smallest architecture, or an existing study was made for another search.
    """
    from dynas.engines.evaluate import CandidateEvaluator
    from dynas.training import TrainConfig

    check_name("engine", engine, ENGINES)
    check_int("n_trials", n_trials, 1)
    check_int("keep_weights", keep_weights, 0)
    check_int("seed", seed, 0, MAX_SEED)
    if objective is None and data is None:
        raise DynasError("a search needs `data` (e.g. dynas.load_data('digits')) for the built-in trainer, or an `objective`.")
    if objective is not None and not callable(objective):
        raise TypeError(f"`objective` must be callable as objective(candidate, trial), but got {objective!r}.")
    space = _resolve_space(space, data)
    budget = Budget(max_macs=max_macs, max_params=max_params, max_latency_ms=max_latency_ms)
    ensure_feasible(space, budget)
    for params in enqueue:
        space.decode(params)  # a bad label or value (e.g. K outside the space) fails here
    from dynas.baselines import baselines as reference_baselines

    references = reference_baselines(space, budget) if baselines else []
    train_config = TrainConfig() if train_config is None else train_config
    run_dir = Path(tempfile.mkdtemp(prefix="dynas-search-")) if run_dir is None else Path(run_dir)
    evaluator = CandidateEvaluator(
        budget, data, train_config, ResultsTable(run_dir), keep_weights=keep_weights, on_record=on_record, objective=objective,
        fidelity=fidelity,
    )
    caller_ready = on_ready

    def ready() -> None:  # everything checked, the study open: the run's record, then the caller's
        _write_record(run_dir, space, budget, engine, sampler, pruner, metric, n_trials, seed, storage, study_name,
                      strategy, data, train_config)
        if caller_ready is not None:
            caller_ready()

    on_ready = ready
    if engine == "optuna":
        study = _optuna(space, evaluator, n_trials, sampler, pruner, metric, storage, study_name or run_dir.name,
                        seed, timeout, enqueue, heartbeat_interval, grace_period, on_ready, references)
    else:
        from dynas.engines.nni_engine import run_nni_search

        if enqueue:
            raise DynasError("`enqueue` is an Optuna feature; the NNI engine proposes every candidate itself.")
        study = None
        run_nni_search(space, evaluator, n_trials=n_trials, strategy=strategy, seed=seed, execution=execution,
                       port=port, host=host, on_ready=on_ready, baselines=references)
    return SearchResult(frame=evaluator.results.frame(), run_dir=run_dir, study=study, counters=evaluator.counters)


def _write_record(run_dir, space, budget, engine, sampler, pruner, metric, n_trials, seed, storage, study_name,
                  strategy, data, train_config) -> None:  # type: ignore[no-untyped-def]
    """``run_dir/config.yaml`` in the CLI's keys, so that ``report``, ``export`` and retraining read a
    library run as they read a CLI one (the CLI writes its own, fuller record over it)."""
    import dataclasses

    import yaml

    from dynas.engines.storage import strip_password

    def name(obj: Any) -> Any:
        return obj if obj is None or isinstance(obj, str) else type(obj).__name__

    record: dict[str, Any] = {
        "space": space.name, "max_macs": budget.max_macs, "max_params": budget.max_params,
        "max_latency_ms": budget.max_latency_ms, "engine": engine, "objective": metric, "trials": n_trials, "seed": seed,
        "run_dir": str(run_dir),
    }
    if engine == "optuna":
        record.update(sampler=name(sampler) or "tpe", pruner=name(pruner), study_name=study_name or run_dir.name,
                      storage=strip_password(str(storage)) if isinstance(storage, (str, Path)) else None)
    else:
        record["strategy"] = strategy
    if data is not None:
        record.update(dataset=data.name, input_size=data.input_size)
    record.update({f.name: getattr(train_config, f.name) for f in dataclasses.fields(train_config) if f.name != "schedule"})
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(yaml.safe_dump(record, sort_keys=True), encoding="utf-8")
    except OSError as err:
        raise DynasError(f"run directory {str(run_dir)!r} is not writable: {err.strerror or err}.") from None


def _optuna(space, evaluator, n_trials, sampler, pruner, metric, storage, study_name, seed, timeout, enqueue,
            heartbeat_interval, grace_period, on_ready, references):  # type: ignore[no-untyped-def]
    import optuna

    from dynas.engines.optuna_engine import run_optuna_search
    from dynas.engines.samplers import OBJECTIVES, PRUNERS, SAMPLERS
    from dynas.engines.storage import make_storage

    check_name("objective", metric, list(OBJECTIVES))
    sampler = "tpe" if sampler is None else sampler
    if isinstance(sampler, str):
        check_name("sampler", sampler, SAMPLERS)
    if isinstance(pruner, str):
        check_name("pruner", pruner, PRUNERS)
    if storage is None:
        storage = optuna.storages.InMemoryStorage()
    elif isinstance(storage, (str, Path)):
        storage = make_storage(str(storage), heartbeat_interval, grace_period)
    return run_optuna_search(
        space, evaluator, n_trials=n_trials, storage=storage, study_name=study_name, sampler=sampler, pruner=pruner,
        objective=metric, seed=seed, timeout=timeout, enqueue=enqueue, on_ready=on_ready, baselines=references,
    )


def supernet_objective(
    supernet: Any, data: Any, *, calib_images: int = 2000, seed: int = 0, device: str = "auto"
) -> Callable[[Candidate, Any], float]:
    """An ``objective`` that scores a candidate with a trained supernet's weights (seconds, not minutes).

    Each call recalibrates BatchNorm on ``calib_images`` seeded training images and returns the
    validation top-1 (:func:`dynas.supernet.score_subnet`); the candidate's τ choices play no
    part (the supernet anneals τ on its own schedule). ``supernet`` may also be a list of
    supernets of one space (e.g. a residual-bank and a separate-bank one): the score is then the
    mean of their top-1s, each scored the same way. Pass ``fidelity="supernet"`` to
    :func:`search` so the rows say so.
    """
    from dynas.supernet import Supernet, score_subnet

    supernets = list(supernet) if isinstance(supernet, (list, tuple)) else [supernet]
    if not supernets:
        raise DynasError("`supernet` must be a supernet or a non-empty list of them, but got an empty list.")
    for i, net in enumerate(supernets):
        if not isinstance(net, Supernet):
            raise TypeError(f"`supernet` must hold dynas.supernet.Supernet objects, but item {i} is {type(net).__name__}.")
    def kind(net: Supernet) -> tuple[str, int, int, int]:
        return net.space.name, net.space.input_size, net.space.num_classes, net.space.in_channels

    for i, net in enumerate(supernets[1:], 1):
        if kind(net) != kind(supernets[0]):
            raise DynasError(
                "the supernets must be of one space, input size, class count and channel count, but supernet "
                f"{i} is of {kind(net)} and supernet 0 of {kind(supernets[0])}."
            )

    def objective(candidate: Candidate, trial: Any) -> float:
        scores = [
            score_subnet(net, candidate, data, calib_images=calib_images, seed=seed, device=device).top1 for net in supernets
        ]
        return sum(scores) / len(scores)

    return objective
