"""The Optuna engine: define-by-run search over a dynas space under a hard MAC budget.

Every trial asks the space's choices through ``space.suggest(trial)`` (K only when a block is
dynamic), computes the closed-form cost, tells the sampler about any budget violation with
``trial.set_constraint`` (feasible when <= 0) and trains only feasible candidates. The study lives
in an Optuna storage (default: a journal file in the run directory, ``study.log``), so rerunning
the same command resumes it.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import random
import re
import sqlite3
import threading
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from dynas.budget import InfeasibleBudgetError, NoFeasibleSampleError, sample_within_budget
from dynas.errors import DynasError, did_you_mean
from dynas.search.evaluate import MAX_REJECTIONS_PER_TRIAL, CandidateEvaluator

try:
    import optuna
    import sqlalchemy
    from optuna.storages import JournalStorage, RetryHeartbeatStaleTrialCallback
    from optuna.storages._heartbeat import BaseHeartbeat
    from optuna.storages.journal import JournalFileBackend
    from optuna.trial import FrozenTrial, TrialState
except ImportError as err:  # pragma: no cover - optuna is a core dependency
    raise ImportError("The Optuna engine needs optuna: pip install optuna") from err

logger = logging.getLogger(__name__)

__all__ = [
    "OBJECTIVES",
    "PRUNERS",
    "RANDOM_STARTUP_TRIALS",
    "SAMPLERS",
    "JournalFileStorage",
    "make_pruner",
    "make_sampler",
    "make_storage",
    "run_optuna_search",
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
_STARTUP = {"tpe": RANDOM_STARTUP_TRIALS, "gp": RANDOM_STARTUP_TRIALS, "random": math.inf}


def _check_name(kind: str, name: str, options: Sequence[str]) -> None:
    if name not in options:
        raise DynasError(f"unknown {kind} {name!r}; choose one of {', '.join(options)}.{did_you_mean(name, options)}")


def make_sampler(name: str, space: Any, seed: int | None) -> optuna.samplers.BaseSampler:
    """An Optuna sampler by name (``SAMPLERS``), seeded."""
    _check_name("sampler", name, SAMPLERS)
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
    _check_name("pruner", name, PRUNERS)
    if name == "median":
        # Epochs report 1-based. Before half the epochs accuracy is mostly noise (in the default
        # job every candidate sits near chance after epoch 1 and the good ones take off in epoch
        # 2-3), so pruning there would prune at random.
        return optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=max(1, epochs // 2))
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=max(epochs, 1))
    return optuna.pruners.NopPruner()


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
    study: optuna.Study, trial: optuna.Trial, space: Any, evaluator: CandidateEvaluator, objective: str, n_trials: int
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
    record = evaluator.evaluate(
        candidate, trial.number, "optuna", None if multi else prune, resume_key=retry_of
    )
    trial.set_user_attr("state", record.state)
    if budget.max_latency_ms is not None and not math.isnan(record.latency_ms):
        trial.set_constraint("latency_ms", float(record.latency_ms - budget.max_latency_ms))
    if record.state == "pruned":
        return TrialState.PRUNED, None
    if record.state == "failed":
        return TrialState.FAIL, None
    # A rejected candidate was never trained: worst accuracy; the constraint tells the sampler why.
    top1 = 0.0 if record.state == "rejected" else float(record.val_top1)
    return TrialState.COMPLETE, ((top1, float(macs)) if multi else top1)


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


def make_storage(url: str, heartbeat_interval: int | None = 60, grace_period: int | None = None) -> Any:
    """An Optuna storage from a URL or a file path, with heartbeats and retry of dead workers' trials.

    As Optuna's CLI reads ``--storage``: a URL (``sqlite:///study.db``,
    ``postgresql://user@host/db``) is an RDB storage; anything else is the path of a journal file
    (Optuna's append-only log of the study, created if missing; what a run uses by default).

    A worker killed mid-trial stops sending heartbeats; after ``grace_period`` seconds (default:
    two intervals) any other worker, or a rerun, marks its trial failed and re-queues the same
    parameters (up to 3 times), and the retried trial resumes from the dead one's last epoch
    checkpoint when the run directory is shared.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        retry = RetryHeartbeatStaleTrialCallback(max_retry=3)
    if "://" not in url:
        return _journal_storage(url, heartbeat_interval, grace_period, retry)
    for attempt in range(5):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return optuna.storages.RDBStorage(
                    _with_driver(url),
                    heartbeat_interval=heartbeat_interval,
                    grace_period=grace_period,
                    heartbeat_stale_trial_callback=retry,
                    engine_kwargs={"pool_pre_ping": True, **_sqlite_engine_kwargs(url)},
                )
        except sqlalchemy.exc.IntegrityError:
            # Workers started together on a fresh database race to create Optuna's tables;
            # the losers see a unique violation and find the tables there on the next try.
            time.sleep(0.5 + random.random() * (attempt + 1))
        except Exception as err:  # sqlalchemy raises many types: unreachable host, bad driver, ...
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise DynasError(f"cannot open storage {_redact(url)!r}: {first}") from None
    raise DynasError(f"cannot open storage {_redact(url)!r}: its tables could not be created (5 tries).")


class JournalFileStorage(JournalStorage, BaseHeartbeat):
    """Optuna's journal file storage with the heartbeats that Optuna gives only RDB storages.

    A journal keeps the study in memory and appends each change to the file, so asking a trial
    for its choices costs no database round trip: 45 ms per proposal of the default job's space
    against 189 ms with SQLite (``benchmarks/README.md``). Several workers may share the file
    (Optuna locks it; on NFS too). The heartbeat is a trial system attribute holding the worker's
    clock (workers on several hosts need synchronised clocks).
    """

    def __init__(
        self,
        path: str,
        heartbeat_interval: int | None,
        grace_period: int | None,
        stale_trial_callback: Callable[[optuna.Study, FrozenTrial], None] | None,
    ) -> None:
        super().__init__(JournalFileBackend(path))
        self.heartbeat_interval = heartbeat_interval
        self.grace_period = grace_period if grace_period is not None else 2 * (heartbeat_interval or 0)
        self.stale_trial_callback = stale_trial_callback

    def record_heartbeat(self, trial_id: int) -> None:
        self.set_trial_system_attr(trial_id, _HEARTBEAT_ATTR, time.time())

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        now = time.time()
        stale = []
        for trial in self.get_all_trials(study_id, deepcopy=False, states=(TrialState.RUNNING,)):
            # A worker killed between asking a trial and its first beat leaves only the start time.
            beat = trial.system_attrs.get(_HEARTBEAT_ATTR)
            if beat is None and trial.datetime_start is not None:
                beat = trial.datetime_start.timestamp()
            if beat is not None and now - beat > self.grace_period:
                stale.append(trial._trial_id)
        return stale

    def get_heartbeat_interval(self) -> int | None:
        return self.heartbeat_interval

    def get_heartbeat_stale_trial_callback(self) -> Callable[[optuna.Study, FrozenTrial], None] | None:
        return self.stale_trial_callback


_HEARTBEAT_ATTR = "dynas:heartbeat"
_SQLITE_MAGIC = b"SQLite format 3\x00"


def _journal_storage(
    path: str,
    heartbeat_interval: int | None,
    grace_period: int | None,
    retry: Callable[[optuna.Study, FrozenTrial], None],
) -> JournalFileStorage:
    file = Path(path).expanduser()
    if file.is_dir():
        raise DynasError(f"`storage` must be a URL or the path of a journal file, but got storage={path!r}, a directory.")
    if not file.parent.is_dir():
        raise DynasError(
            f"`storage` {path!r} is a journal file path, but its folder {str(file.parent)!r} does not exist."
        )
    if file.is_file() and file.stat().st_size:
        with open(file, "rb") as f:
            first = f.readline()
        if first.startswith(_SQLITE_MAGIC):
            raise DynasError(
                f"`storage` {path!r} is a SQLite database; give it as a URL: storage='sqlite:///{file.as_posix()}'."
            )
        if not _is_journal_line(first):
            # Optuna skips lines it cannot parse, so it would append a study to any file.
            raise DynasError(f"`storage` {path!r} is not an Optuna journal file (its first line is not a journal entry).")
    return JournalFileStorage(str(file), heartbeat_interval, grace_period, retry)


def _is_journal_line(line: bytes) -> bool:
    try:
        entry = json.loads(line)
    except ValueError:
        return False
    return isinstance(entry, dict) and "op_code" in entry


def _sqlite_engine_kwargs(url: str) -> dict[str, Any]:
    """For a SQLite file: write-ahead logging and no fsync per commit.

    Optuna commits once per suggested choice (dozens per proposal, most of them rejected over
    budget without training); with SQLite's defaults each commit syncs the disk, which made storage
    the largest cost of a search after training. WAL keeps concurrent workers on one machine safe
    (it needs a local file system, as SQLite's locking does anyway).
    """
    parsed = sqlalchemy.engine.make_url(url)
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return {}

    def connect() -> sqlite3.Connection:
        connection = sqlite3.connect(parsed.database, timeout=60, check_same_thread=False)
        connection.execute("PRAGMA journal_mode=WAL")
        connection.execute("PRAGMA synchronous=NORMAL")
        return connection

    return {"creator": connect}


def _with_driver(url: str) -> str:
    """Plain postgresql:// URLs use psycopg2 (the `postgres` extra) unless psycopg 3 is installed.

    SQLAlchemy 2.1 made psycopg 3 the default driver of ``postgresql://``.
    """
    if url.startswith("postgresql://") and importlib.util.find_spec("psycopg") is None:
        if importlib.util.find_spec("psycopg2") is not None:
            return "postgresql+psycopg2://" + url.removeprefix("postgresql://")
    return url


def _redact(url: str) -> str:
    """Hide a password in a storage URL before printing it."""
    return re.sub(r"://([^:/@]+):[^@]*@", r"://\1:***@", url)


def run_optuna_search(
    space: Any,
    evaluator: CandidateEvaluator,
    *,
    n_trials: int,
    storage: str | Any,
    study_name: str,
    sampler: str = "tpe",
    pruner: str = "median",
    objective: str = "top1",
    seed: int | None = 0,
    timeout: float | None = None,
    callbacks: Sequence[Any] = (),
    poll_seconds: float = 5.0,
    enqueue: Sequence[Mapping[str, Any]] = (),
) -> optuna.Study:
    """Run (or resume, or join) a study until it holds ``n_trials`` evaluated trials.

    Any number of workers may run this on the same storage at once. Rejected (over-budget)
    proposals are told to the sampler (worst value plus the violated constraint) but do not count
    as trials: they cost no training. A run gives up after ``MAX_REJECTIONS_PER_TRIAL`` rejections
    per requested trial.
    ``callbacks`` are called as ``callback(study, frozen_trial)`` after each trial. On
    KeyboardInterrupt (SIGINT; the CLI maps SIGTERM to it) the running trial is recorded as
    ``interrupted``, its parameters are queued again so a rerun continues it, and the interrupt
    is re-raised. ``enqueue``: choice dicts (validated by ``space.decode``) evaluated first.
    Returns the study; the rows are in ``evaluator.results``.
    """
    _check_name("objective", objective, list(OBJECTIVES))
    if n_trials < 1:
        raise DynasError(f"`trials` must be >= 1, but got trials={n_trials}.")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if isinstance(storage, str):
        storage = make_storage(storage)
    study = optuna.create_study(
        storage=storage,
        study_name=study_name,
        load_if_exists=True,
        sampler=make_sampler(sampler, space, seed),
        pruner=make_pruner(pruner, evaluator.train_config.epochs),
        directions=list(OBJECTIVES[objective]),
    )
    _check_same_search(study, space, evaluator, objective)
    for params in enqueue:
        space.decode(params)
        study.enqueue_trial(dict(params), skip_if_exists=True)
    deadline = None if timeout is None else time.monotonic() + timeout
    startup = _FeasibleStartup(space, evaluator, _STARTUP.get(sampler, 0), seed)
    while deadline is None or time.monotonic() < deadline:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)  # re-queues trials of dead workers
        finished = _counted(study, (TrialState.COMPLETE, TrialState.PRUNED))
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

    def __init__(self, space: Any, evaluator: CandidateEvaluator, trials: float, seed: int | None) -> None:
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
    study: optuna.Study, space: Any, evaluator: CandidateEvaluator, objective: str, n_trials: int, callbacks: Sequence[Any]
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
