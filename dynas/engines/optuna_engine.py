"""The Optuna engine: define-by-run search over a dynas space under a hard MAC budget.

Every trial asks the space's choices through ``space.suggest(trial)`` (K only when a block is
dynamic), computes the closed-form cost, tells the sampler about any budget violation with
``trial.set_constraint`` (feasible when <= 0) and trains only feasible candidates. The study lives
in an Optuna storage (default: a journal file in the run directory, ``study.log``), so rerunning
the same command resumes it.
"""

from __future__ import annotations

import logging
import math
import random
import threading
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import optuna
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState

from dynas.budget import InfeasibleBudgetError, NoFeasibleSampleError, sample_within_budget
from dynas.checks import check_int, check_name
from dynas.engines.evaluate import MAX_REJECTIONS_PER_TRIAL, CandidateEvaluator
from dynas.engines.samplers import OBJECTIVES, make_pruner, make_sampler, startup_trials
from dynas.engines.storage import make_storage, redact_url
from dynas.errors import DynasError
from dynas.spaces import SearchSpace

logger = logging.getLogger(__name__)

__all__ = ["run_optuna_search"]

try:
    from sqlalchemy.exc import OperationalError as _DatabaseDown
except ImportError:  # no sqlalchemy, so no database storage either
    _STORAGE_ERRORS: tuple[type[BaseException], ...] = ()
else:
    _STORAGE_ERRORS = (_DatabaseDown,)


class _Surplus(Exception):
    """This trial was asked after the study already had its trials; it is not run."""


def _counted(study: optuna.Study, states: Sequence[TrialState]) -> list[Any]:
    """Trials in ``states`` that count towards ``n_trials``: all but budget rejections."""
    return [t for t in study.get_trials(deepcopy=False, states=tuple(states)) if t.user_attrs.get("state") != "rejected"]


def _live_before(study: optuna.Study, number: int) -> int:
    """Counted trials numbered below ``number`` that are finished or may still finish."""
    live = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.WAITING)
    return sum(t.number < number for t in _counted(study, live))


def _run_trial(
    study: optuna.Study, trial: optuna.Trial, space: SearchSpace, evaluator: CandidateEvaluator, objective: str, n_trials: int
) -> tuple[TrialState, Any]:
    """Evaluate one asked trial; returns the state and values to tell the study."""
    multi = len(OBJECTIVES[objective]) > 1
    # Trial numbers are handed out atomically by the storage, so counting the live trials with
    # smaller numbers tells each worker, without a lock, whether the study already has enough.
    if _live_before(study, trial.number) >= n_trials:
        raise _Surplus
    candidate = space.suggest(trial)
    macs, params, _ = evaluator.cost(candidate.arch)
    budget = evaluator.budget
    system_attrs = study._storage.get_trial_system_attrs(trial._trial_id)
    constraints = {"macs": macs - budget.max_macs}
    if budget.max_params is not None:
        constraints["params"] = params - budget.max_params
    for key, value in constraints.items():
        if f"constraints:{key}" not in system_attrs:  # a retried trial inherits its constraints
            trial.set_constraint(key, float(value))
    trial.set_user_attr("arch", candidate.arch.to_str())
    trial.set_user_attr("macs", macs)

    def prune(epoch: int, val_top1: float) -> bool:
        trial.report(val_top1, epoch)
        return trial.should_prune()

    # Set by RetryHeartbeatStaleTrialCallback on a re-queued trial: the number of the trial it retries.
    retry_of = system_attrs.get("failed_trial")
    origin = trial.user_attrs.get("origin", "search")
    record = evaluator.evaluate(
        candidate, trial.number, "optuna", None if multi else prune, resume_key=retry_of, handle=trial, origin=origin
    )
    trial.set_user_attr("state", record.state)
    # What optuna-dashboard and study.trials_dataframe() show beside the value, without dynas.
    for key in ("params", "dynamic_blocks", "origin", "fidelity"):
        trial.set_user_attr(key if key != "params" else "num_params", getattr(record, key))
    if record.attention_entropy:
        trial.set_user_attr("min_attention_entropy", float(min(record.attention_entropy.values())))
    if budget.max_latency_ms is not None and not math.isnan(record.latency_ms):
        trial.set_constraint("latency_ms", float(record.latency_ms - budget.max_latency_ms))
    if record.state == "pruned":
        return TrialState.PRUNED, None
    if record.state == "failed":
        return TrialState.FAIL, None
    if record.state == "rejected" and _models_pruned_constraints(study.sampler):
        # Never trained, so no value: PRUNED (no intermediate values) with its constraint set.
        # TPE splits off infeasible trials by their constraint before it looks at the state, so
        # its constraint handling is what it is for a COMPLETE trial, and optuna-dashboard,
        # best_trial and trials_dataframe() do not show a 0 that was never measured.
        return TrialState.PRUNED, None
    # Samplers that model COMPLETE trials only (GP, NSGA-II) get a rejected candidate as the
    # worst accuracy with its constraint (user attribute state="rejected" marks it).
    top1 = 0.0 if record.state == "rejected" else float(record.val_top1)
    return TrialState.COMPLETE, ((top1, float(macs)) if multi else top1)


def _models_pruned_constraints(sampler: optuna.samplers.BaseSampler) -> bool:
    """Whether ``sampler`` (or the sampler a dynas wrapper delegates to) is TPE, which reads the
    constraints of PRUNED trials as it does those of COMPLETE ones."""
    while not isinstance(sampler, optuna.samplers.TPESampler) and isinstance(getattr(sampler, "sampler", None), optuna.samplers.BaseSampler):
        sampler = sampler.sampler
    return isinstance(sampler, optuna.samplers.TPESampler)


class _Heartbeat:
    """Records a trial's heartbeat in the storage while it runs (what study.optimize does)."""

    def __init__(self, study: optuna.Study, trial: optuna.Trial) -> None:
        storage = study._storage
        self.interval = storage.get_heartbeat_interval() if hasattr(storage, "get_heartbeat_interval") else None
        self.stop = threading.Event()
        self.thread = None
        if self.interval:
            trial_id = trial._trial_id
            storage.record_heartbeat(trial_id)

            def beat() -> None:
                while not self.stop.wait(self.interval):
                    storage.record_heartbeat(trial_id)

            self.thread = threading.Thread(target=beat, name="dynas-heartbeat", daemon=True)
            self.thread.start()

    def __enter__(self) -> _Heartbeat:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        if self.thread is not None:
            self.thread.join()


def _check_same_search(study: optuna.Study, space: SearchSpace, evaluator: CandidateEvaluator, objective: str) -> None:
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
    _check_same_choices(study, space)


def _check_same_choices(study: optuna.Study, space: SearchSpace) -> None:
    """Refuse a study whose trials asked a choice with other values than the space offers now.

    Optuna cannot mix two value sets of one categorical parameter in a study (the first such
    suggest raises mid-trial); this says so before any work, naming the choice and both sets.
    """
    offered = {choice.label: tuple(choice.values) for choice in space.choices()}
    for trial in study.get_trials(deepcopy=False):
        for label, dist in trial.distributions.items():
            values = tuple(getattr(dist, "choices", ()))
            if label in offered and values and values != offered[label]:
                raise DynasError(
                    f"study {study.study_name!r} was searched with {label} in {values!r}, but space "
                    f"{space.name!r} now offers {offered[label]!r} (dynas changed this choice); Optuna "
                    "cannot mix the two in one study. Start it in another --run-dir or --study-name."
                )


def run_optuna_search(
    space: SearchSpace,
    evaluator: CandidateEvaluator,
    *,
    n_trials: int,
    storage: str | Any,
    study_name: str,
    sampler: str | optuna.samplers.BaseSampler = "tpe",
    pruner: str | optuna.pruners.BasePruner = "median",
    objective: str = "top1",
    seed: int | None = 0,
    timeout: float | None = None,
    callbacks: Sequence[Any] = (),
    poll_seconds: float = 5.0,
    enqueue: Sequence[Mapping[str, Any]] = (),
    on_ready: Callable[[], None] | None = None,
    baselines: Sequence[Any] = (),
) -> optuna.Study:
    """Run (or resume, or join) a study until it holds ``n_trials`` evaluated trials.

    Any number of workers may run this on the same storage at once. Rejected (over-budget)
    proposals are told to the sampler (worst value plus the violated constraint) but do not count
    as trials: they cost no training; a diverged candidate (NaN loss, told FAIL) was trained and
    counts. A run gives up after ``MAX_REJECTIONS_PER_TRIAL`` rejections per requested trial. A
    database that goes away mid-run is one :class:`DynasError` (a rerun continues).
    ``callbacks`` are called as ``callback(study, frozen_trial)`` after each trial. On
    KeyboardInterrupt (SIGINT; the CLI maps SIGTERM to it) the running trial is recorded as
    ``interrupted``, its parameters are queued again so a rerun continues it, and the interrupt
    is re-raised. ``enqueue``: choice dicts (validated by ``space.decode``) evaluated first.
    ``on_ready()`` is called once the study is open and checked, before the first trial (the
    CLI writes the run's config.yaml there, so a refused run changes nothing). ``baselines``
    (:class:`dynas.baselines.Baseline`) are enqueued before everything else, tagged with their
    origin; a resumed study does not queue them again.
    Returns the study; the rows are in ``evaluator.results``.
    """
    check_name("objective", objective, list(OBJECTIVES))
    check_int("trials", n_trials, 1)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if isinstance(storage, str):
        storage = make_storage(storage)
    sampler = make_sampler(sampler, space, seed) if isinstance(sampler, str) else sampler
    pruner = make_pruner(pruner, evaluator.train_config.epochs) if isinstance(pruner, str) else pruner
    # An existing study is loaded (create_study would append a "create" entry to a journal
    # even when it refuses), so a run refused below leaves the storage as it was.
    if study_name in optuna.get_all_study_names(storage):
        study = optuna.load_study(storage=storage, study_name=study_name, sampler=sampler, pruner=pruner)
    else:
        study = optuna.create_study(
            storage=storage, study_name=study_name, load_if_exists=True, sampler=sampler, pruner=pruner,
            directions=list(OBJECTIVES[objective]),
        )
        with warnings.catch_warnings():  # set_metric_names is experimental in Optuna
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names(["val_top1", "macs"][: len(OBJECTIVES[objective])])
    for params in enqueue:
        space.decode(params)
    _check_same_search(study, space, evaluator, objective)
    if on_ready is not None:
        on_ready()
    for baseline in baselines:
        study.enqueue_trial(dict(baseline.candidate.params), user_attrs={"origin": baseline.origin}, skip_if_exists=True)
    for params in enqueue:
        study.enqueue_trial(dict(params), user_attrs={"origin": "enqueued"}, skip_if_exists=True)
    deadline = None if timeout is None else time.monotonic() + timeout
    startup = _FeasibleStartup(space, evaluator, startup_trials(sampler), seed)
    try:
        while deadline is None or time.monotonic() < deadline:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                optuna.storages.fail_stale_trials(study)  # re-queues trials of dead workers
            # A diverged candidate (NaN loss: told FAIL) was trained, so it counts as one of the
            # trials; else a run whose every candidate diverged would train forever.
            finished = _counted(study, (TrialState.COMPLETE, TrialState.PRUNED)) + [
                t for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,)) if t.user_attrs.get("state") == "failed"
            ]
            if len(finished) >= n_trials:
                break
            if evaluator.counters.rejected >= MAX_REJECTIONS_PER_TRIAL * n_trials:
                logger.warning(
                    "stopping: %d proposals in a row of this run broke the budget; the sampler does "
                    "not find the feasible region (try a larger budget or the random sampler).",
                    evaluator.counters.rejected,
                )
                break
            running = _counted(study, (TrialState.RUNNING, TrialState.WAITING))
            if len(finished) + len(running) >= n_trials and not any(t.state == TrialState.WAITING for t in running):
                time.sleep(poll_seconds)  # others are on the last trials; wait in case one dies
                continue
            startup.enqueue(study)
            _ask_and_tell(study, space, evaluator, objective, n_trials, callbacks)
    except _STORAGE_ERRORS as err:  # a database gone mid-run: every finished trial is in the table already
        url = getattr(storage, "url", None)
        where = f"storage {redact_url(url)!r}" if url else "the storage"
        first = str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__
        raise DynasError(
            f"lost {where} mid-run ({first}); the results table is up to date: rerun the same command "
            f"once the database is back to continue."
        ) from None
    return study


class _FeasibleStartup:
    """Draws a sampler's random start-up trials within the budget, by rejection on the closed-form cost.

    A sampler's first trials (all of them for ``random``) are uniform over the space. Proposed
    through Optuna, every over-budget one costs a trial in the storage (~45 ms); in the default job
    the first 27 proposals were all rejected, and TPE then modelled mostly rejections. Drawn here
    (~0.1 ms a draw) and enqueued, the trained start-up trials have the same distribution (uniform
    over the feasible candidates) and TPE starts from trained ones. A budget too tight for uniform
    draws to hit falls back to Optuna's own proposals.
    """

    def __init__(self, space: SearchSpace, evaluator: CandidateEvaluator, trials: float, seed: int | None) -> None:
        self.space, self.budget, self.trials = space, evaluator.budget, trials
        self.rng = random.Random(seed)

    def enqueue(self, study: optuna.Study) -> None:
        if len(_counted(study, tuple(TrialState))) >= self.trials:
            return
        try:
            candidate = sample_within_budget(self.space, self.budget, seed=self.rng.randrange(2**63))
        except (InfeasibleBudgetError, NoFeasibleSampleError) as err:
            logger.info("start-up trials are left to the sampler: %s", err)
            self.trials = 0
            return
        study.enqueue_trial(dict(candidate.params), skip_if_exists=True)


def _ask_and_tell(
    study: optuna.Study, space: SearchSpace, evaluator: CandidateEvaluator, objective: str, n_trials: int, callbacks: Sequence[Any]
) -> None:
    with warnings.catch_warnings():
        # We record heartbeats ourselves (_Heartbeat), which Optuna only expects of optimize().
        warnings.filterwarnings("ignore", message="Heartbeat of storage")
        trial = study.ask()
    with _Heartbeat(study, trial):
        try:
            state, values = _run_trial(study, trial, space, evaluator, objective, n_trials)
        except _Surplus:
            trial.set_user_attr("state", "surplus")
            study.tell(trial, state=TrialState.FAIL)
            return
        except KeyboardInterrupt:
            _interrupted(study, trial)
            raise
        except Exception:
            study.tell(trial, state=TrialState.FAIL)
            raise
    frozen = study.tell(trial, values, state=state)
    for callback in callbacks:
        callback(study, frozen)


def _interrupted(study: optuna.Study, trial: optuna.Trial) -> None:
    """Record an interrupted trial and queue its parameters again so a rerun continues it."""
    trial.set_user_attr("state", "interrupted")  # the evaluator wrote the table row
    frozen = study.tell(trial, state=TrialState.FAIL)
    RetryHeartbeatStaleTrialCallback(max_retry=3)(study, frozen)
