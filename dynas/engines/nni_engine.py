"""The NNI engine: NNI 3.0 multi-trial strategies over a dynas search space under a hard MAC budget.

The space maps onto NNI one to one: :class:`DynasModelSpace` registers one ``nni.choice(label,
values)`` per :class:`~search_spaces.Choice`, under the same label, so an NNI sample is the flat dict
``space.decode()`` takes. NNI has no conditional choices, so every label is sampled every time; the
space ignores inactive labels when decoding, and two samples that differ only in them decode to the
same candidate, which the evaluator's duplicate detection answers from the earlier trial's row.

Every sample passes a budget gate (NNI's ``Filter`` middleware) before it can become an NNI trial:
an over-budget candidate is recorded as ``rejected`` by :meth:`CandidateEvaluator.evaluate` (which
rejects it from the closed-form count, without building a model) and the strategy is told 0.0. The
rest are trained by the same :meth:`CandidateEvaluator.evaluate` as Optuna's trials, so both engines
fill one results table; NNI is told the final val top-1 (0.0 for rejected or failed candidates).
As in the Optuna engine, the strategies' random start-up samples are drawn within the budget
(:class:`_InBudgetDraws`), so a tight budget does not spend the start on rejections.

``n_trials`` counts every candidate a run proposes, rejected ones included, as in the Optuna engine.
NNI's own resume does not work here, so a rerun starts a new NNI strategy (its population and its
in-run deduplication start empty) but appends to the same table with trial numbers after the
existing ones, and reuses the result of any candidate already trained there.

Two executions: ``sequential`` (default) trains in this process, with no web server and no files
outside the results table. ``local`` runs NNI's manager and web UI, with each trial in a
subprocess; NNI's manager binds to every interface, so a Node preload script forces it onto
``host`` (127.0.0.1 unless asked otherwise). Its database, logs and checkpoint go under
``run_dir/nni``; only NNI's experiment index, ``~/nni-experiments/.experiment``, stays at the fixed
path NNI 3.0 gives it.
"""

from __future__ import annotations

import contextlib
import copy
import ipaddress
import logging
import math
import os
import pickle
import random
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from dynas.budget import Budget, NoFeasibleSampleError, sample_within_budget
from dynas.checks import check_int, check_name
from dynas.errors import DynasError
from dynas.spaces import SearchSpace
from dynas.engines.evaluate import MAX_REJECTIONS_PER_TRIAL, CandidateEvaluator
from dynas.results import COLUMNS, TrialRecord

try:
    with warnings.catch_warnings():
        # NNI 3.0 warns at import about every torch class newer than itself.
        warnings.simplefilter("ignore")
        import cloudpickle
        import nni
        from nni.mutable import ensure_frozen
        from nni.nas.evaluator import FunctionalEvaluator
        from nni.nas.execution import SequentialExecutionEngine
        from nni.nas.nn.pytorch import ModelSpace
        from nni.nas.space import ExecutableModelSpace, SimplifiedModelSpace
        from nni.algorithms.hpo.tpe_tuner import TpeTuner
        from nni.common.hpo_utils import deformat_parameters, format_parameters
        from nni.nas.strategy import TPE, GridSearch, Random, RegularizedEvolution, Strategy
        from nni.nas.strategy.hpo import HPOTunerStrategy
        from nni.nas.strategy.middleware import Chain, Filter
except ImportError as err:
    raise ImportError("the NNI engine needs the nni extra: pip install 'dynas[nni]'") from err

__all__ = ["EXECUTIONS", "STRATEGIES", "DynasModelSpace", "make_strategy", "nni_choices", "run_nni_search"]

logger = logging.getLogger(__name__)

STRATEGIES = ("random", "evolution", "tpe", "grid")
EXECUTIONS = ("sequential", "local")
ENGINE = "nni"  # the `engine` column of this engine's rows
_GRID_LIMIT = 10_000  # same bound as the Optuna grid sampler
_LOOPBACK_JS = """\
'use strict';
// dynas: NNI's manager calls listen(port) with no host, i.e. on every interface. Put every
// TCP listener of this Node process on DYNAS_NNI_HOST instead (unix sockets are left alone).
const net = require('net');
const host = process.env.DYNAS_NNI_HOST;
const listen = net.Server.prototype.listen;
net.Server.prototype.listen = function (...args) {
  const first = args[0];
  if (first !== null && typeof first === 'object') {
    if (first.path === undefined && first.fd === undefined && first.handle === undefined && first._handle === undefined) {
      args[0] = Object.assign({}, first, { host });
    }
  } else if (typeof first === 'number' || (typeof first === 'string' && /^\\d+$/.test(first))) {
    if (typeof args[1] === 'string') { args[1] = host; } else { args.splice(1, 0, host); }
  } else if (first === undefined || typeof first === 'function') {
    args.unshift(0, host);
  }
  return listen.apply(this, args);
};
"""


class DynasModelSpace(ModelSpace):
    """An NNI model space with one ``nni.choice`` per dynas choice, under the same label.

    It holds choices, not a network: frozen by NNI, ``params`` is the sampled flat dict (every
    label, active or not) that the trial decodes with ``space.decode`` and hands to the evaluator,
    which builds and trains the network. It has no ``forward``.

    Args:
        choices: ``(label, values)`` pairs, e.g. ``nni_choices(space)``; plain data, so NNI can
            send the space to trial subprocesses.
    """

    def __init__(self, choices: Sequence[tuple[str, Sequence[Any]]]) -> None:
        super().__init__()
        # Dry run: each label's first value; frozen: the sampled one.
        self.params: dict[str, Any] = {
            label: ensure_frozen(self.add_mutable(nni.choice(label, list(values)))) for label, values in choices
        }


def nni_choices(space: SearchSpace) -> list[tuple[str, list[Any]]]:
    """The ``(label, values)`` pairs of ``space.choices()``, in order: the NNI space's mutables."""
    return [(choice.label, list(choice.values)) for choice in space.choices()]


class _InBudgetDraws:
    """Start-up samples drawn uniformly over the candidates within the budget, as NNI samples them.

    A strategy's random start (all of ``random``, the first population of ``evolution``, TPE's
    start-up jobs) is uniform over the space; under a tight budget almost every such sample is
    rejected (at 16x16 under 1.5M MACs, 500 of 502 proposals of ``evolution``, which then stopped
    with 2 trials). Drawn here by rejection on the closed-form cost (~0.1 ms a draw, as the
    Optuna engine's start-up trials), they have the same distribution over the feasible
    candidates. Inactive labels, which NNI samples too, take a random value. A budget too tight
    for uniform draws to hit (``sample_within_budget`` gives up) leaves the start to the strategy.
    """

    def __init__(self, space: SearchSpace, budget: Budget | None, seed: int | None) -> None:
        self.space, self.budget = space, budget
        self.rng = random.Random(seed)

    def __call__(self) -> dict[str, Any] | None:
        if self.budget is None:
            return None
        try:
            candidate = sample_within_budget(self.space, self.budget, seed=self.rng.randrange(2**63))
        except NoFeasibleSampleError as err:
            logger.info("start-up samples are left to the NNI strategy: %s", err)
            self.budget = None
            return None
        sample = {choice.label: self.rng.choice(choice.values) for choice in self.space.choices()}
        sample.update(candidate.params)
        return sample


class _InBudgetRandom(Random):
    """NNI's random search, every sample drawn within the budget."""

    def __init__(self, draws: _InBudgetDraws, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._draws = draws

    def random(self, model_space: ExecutableModelSpace) -> ExecutableModelSpace:
        sample = self._draws()
        if sample is None:
            return super().random(model_space)
        if self._dedup_helper is not None:
            self._dedup_helper.dedup(sample)  # a repeat raises, and NNI draws again
        return model_space.freeze(sample)


class _InBudgetEvolution(RegularizedEvolution):
    """Regularized evolution whose first population is drawn within the budget (mutations are not)."""

    def __init__(self, draws: _InBudgetDraws, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._draws = draws

    def random(self) -> ExecutableModelSpace:
        sample = self._draws()
        if sample is None:
            return super().random()
        if self._dedup_helper is not None:
            self._dedup_helper.dedup(sample)
        self._individual_counter += 1
        return self.model_space.freeze(sample)


class _InBudgetTpeTuner(TpeTuner):
    """NNI's TPE tuner whose start-up jobs (random in TPE) are drawn within the budget."""

    def __init__(self, draws: _InBudgetDraws, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._draws = draws

    def generate_parameters(self, parameter_id: int, **kwargs: Any) -> dict[str, Any]:
        if parameter_id < self.args.n_startup_jobs and (sample := self._draws()) is not None:
            params = self.dedup(format_parameters(sample, self.space))
            self._params[parameter_id] = self._running_params[parameter_id] = params
            return deformat_parameters(params, self.space)
        return super().generate_parameters(parameter_id, **kwargs)


class _InBudgetTPE(TPE):
    """NNI's TPE strategy over :class:`_InBudgetTpeTuner` (NNI 3.0's TPE is HPOTunerStrategy(TpeTuner))."""

    def __init__(self, draws: _InBudgetDraws, **kwargs: Any) -> None:
        HPOTunerStrategy.__init__(self, _InBudgetTpeTuner(draws, **kwargs))


def make_strategy(
    name: str, space: SearchSpace, n_trials: int, seed: int | None, budget: Budget | None = None
) -> Strategy:
    """An NNI 3.0 multi-trial strategy by name (``STRATEGIES``), seeded; all maximise the metric.

    With a ``budget``, the strategy's random start-up samples are drawn within it (see
    :class:`_InBudgetDraws`); ``grid`` walks its grid in order and has none.
    """
    check_name("strategy", name, STRATEGIES)
    choices = space.choices()
    draws = _InBudgetDraws(space, budget, seed)
    if name == "random":
        return _InBudgetRandom(draws, seed=seed)
    if name == "evolution":
        # NNI's defaults (population 100, tournament 25) never leave the random phase in a short
        # search: size the population to the run, and mutate one choice per child on average.
        population = min(50, max(2, n_trials // 2))
        return _InBudgetEvolution(
            draws,
            population_size=population,
            sample_size=max(1, population // 3),
            mutation_prob=1.0 / max(1, len(choices)),
            seed=seed,
        )
    if name == "tpe":
        return _InBudgetTPE(draws, optimize_mode="maximize", seed=seed)  # NNI's TPE minimises by default
    size = math.prod(len(c.values) for c in choices)
    if size > _GRID_LIMIT:
        # NNI walks the grid in order: a huge grid would only ever see its first corner.
        raise DynasError(
            f"the grid strategy needs a space of at most {_GRID_LIMIT} points, but space "
            f"{space.name!r} has {size}; use random, evolution or tpe, or a smaller space."
        )
    return GridSearch(seed=seed)


def _next_trial(evaluator: CandidateEvaluator) -> int:
    """The trial number after every row already in the table (from any engine or earlier run)."""
    return max((int(row["trial"]) for row in evaluator.results.records()), default=-1) + 1


def _final_metric(record: TrialRecord) -> float:
    """What NNI is told: the val top-1 in %, 0.0 for rejected, failed or unmeasured candidates."""
    if record.state in ("rejected", "failed") or not math.isfinite(record.val_top1):
        return 0.0
    return float(record.val_top1)


def _report_epoch(epoch: int, val_top1: float) -> None:
    """Per-epoch val top-1 to NNI (the web UI's curves); never stops training."""
    nni.report_intermediate_result(float(val_top1))


def _evaluate_sample(model: DynasModelSpace, space: SearchSpace, evaluator: CandidateEvaluator) -> None:
    """The NNI trial: decode the frozen sample, train it through the shared evaluator, report."""
    candidate = space.decode(model.params)
    record = evaluator.evaluate(candidate, _next_trial(evaluator), ENGINE, _report_epoch)
    nni.report_final_result(_final_metric(record))


def _evaluate_sample_from_file(model: DynasModelSpace, job: str) -> None:
    """The NNI trial in a subprocess of the local training service: space and evaluator from ``job``."""
    with open(job, "rb") as f:
        state = pickle.load(f)
    _evaluate_sample(model, state["space"], state["evaluator"])


class _BudgetGate(Filter):
    """NNI ``Filter`` that keeps over-budget samples from becoming trials and ends the run.

    A rejected sample still gets a ``rejected`` row from the evaluator (which never trains an
    over-budget candidate) and the strategy a 0.0 metric. Rejections cost no training, so they do
    not count as trials: ``budget_available`` turns false once ``n_trials`` samples were admitted,
    or after ``MAX_REJECTIONS_PER_TRIAL * n_trials`` rejections.
    """

    def __init__(self, space: SearchSpace, evaluator: CandidateEvaluator, n_trials: int) -> None:
        self.max_rejected = MAX_REJECTIONS_PER_TRIAL * n_trials
        super().__init__(self._admit, metric_for_invalid=0.0, patience=self.max_rejected + 1)
        self.space = space
        self.evaluator = evaluator
        self.n_trials = n_trials
        self.admitted = 0
        self.rejected_trials: list[int] = []
        self.before_admit: Callable[[], None] | None = None  # local execution: report the trials done so far

    def _admit(self, model: ExecutableModelSpace) -> bool:
        if self.before_admit is not None:
            self.before_admit()
        candidate = self.space.decode(model.sample)
        if not self.evaluator.cost(candidate.arch)[2]:
            self.admitted += 1
            return True
        trial = _next_trial(self.evaluator)
        self.evaluator.evaluate(candidate, trial, ENGINE)  # records the rejection; trains nothing
        self.rejected_trials.append(trial)
        return False

    def budget_available(self) -> bool:
        within = self.admitted < self.n_trials and len(self.rejected_trials) < self.max_rejected
        return within and super().budget_available()


@contextlib.contextmanager
def _nni_logging(verbose: bool) -> Iterator[None]:
    """NNI logs every sample at INFO; keep it to warnings unless ``verbose``."""
    nni_logger = logging.getLogger("nni")
    previous = nni_logger.level
    nni_logger.setLevel(logging.INFO if verbose else logging.WARNING)
    try:
        yield
    finally:
        nni_logger.setLevel(previous)


def run_nni_search(
    space: SearchSpace,
    evaluator: CandidateEvaluator,
    *,
    n_trials: int,
    strategy: str = "evolution",
    seed: int | None = 0,
    execution: str = "sequential",
    port: int = 8081,
    host: str = "127.0.0.1",
    verbose: bool = False,
    on_ready: Callable[[], None] | None = None,
    baselines: Sequence[Any] = (),
) -> pd.DataFrame:
    """Search ``space`` with an NNI 3.0 strategy; every candidate goes through ``evaluator``.

    Args:
        space: a dynas ``SearchSpace`` (``choices()``, ``decode()``, ``name``).
        evaluator: budget check, training and results table shared with the Optuna engine.
        n_trials: candidates this run evaluates; rejected (over-budget) proposals are recorded
            but not counted.
        strategy: ``random``, ``evolution`` (regularized evolution), ``tpe`` or ``grid``.
        seed: the strategy's seed.
        execution: ``sequential`` (in this process, no server) or ``local`` (NNI's manager, web
            UI and one subprocess per trial).
        port: ``local`` only: port of NNI's manager and web UI.
        host: ``local`` only: the address the manager listens on; loopback unless you ask.
        verbose: let NNI log at INFO.
        on_ready: called once the arguments are checked, before the first trial.
        baselines: :class:`dynas.baselines.Baseline` evaluated first, in this process; they count
            towards ``n_trials``.

    Returns:
        The rows this run appended to the results table (``evaluator.results.frame()`` has all):
        ``n_trials`` evaluated ones plus the rejections, or fewer when the strategy runs out of
        new samples (a walked grid).
    """
    check_int("trials", n_trials, 1)
    check_name("execution", execution, EXECUTIONS)
    make_strategy(strategy, space, n_trials, seed)  # a bad name or a too large grid fails first
    if on_ready is not None:
        on_ready()
    first_trial = _next_trial(evaluator)
    for baseline in baselines[:n_trials]:
        evaluator.evaluate(baseline.candidate, _next_trial(evaluator), ENGINE, origin=baseline.origin)
    n_trials -= min(len(baselines), n_trials)
    if n_trials == 0:
        frame = evaluator.results.frame()
        return frame[(frame["trial"] >= first_trial) & (frame["engine"] == ENGINE)].reset_index(drop=True)
    with _nni_logging(verbose):
        gate = _BudgetGate(space, evaluator, n_trials)
        chain = Chain(make_strategy(strategy, space, n_trials, seed, evaluator.budget), gate)
        model_space = DynasModelSpace(nni_choices(space))
        if execution == "sequential":
            nni_evaluator = FunctionalEvaluator(_evaluate_sample, space=space, evaluator=evaluator)
            _run_sequential(model_space, nni_evaluator, chain)
        else:
            rows = _SubprocessRows(evaluator, _next_trial(evaluator), gate.rejected_trials)
            gate.before_admit = rows.flush
            logs = _run_local(space, evaluator, model_space, chain, port=port, host=host)
            rows.flush()
            _count_failed_trials(evaluator, gate.admitted, len(rows.seen), logs)
    frame = evaluator.results.frame()
    return frame[(frame["trial"] >= first_trial) & (frame["engine"] == ENGINE)].reset_index(drop=True)


def _run_sequential(model_space: DynasModelSpace, nni_evaluator: FunctionalEvaluator, chain: Chain) -> None:
    """What ``NasExperiment`` does for a sequential engine, minus its files in ``~/nni-experiments``."""
    engine = SequentialExecutionEngine()  # the gate ends the run; a training error ends it too
    chain.initialize(SimplifiedModelSpace.from_model(model_space, nni_evaluator), engine)
    try:
        chain.run()
    finally:
        engine.shutdown()


def _run_local(
    space: SearchSpace,
    evaluator: CandidateEvaluator,
    model_space: DynasModelSpace,
    chain: Chain,
    *,
    port: int,
    host: str,
) -> Path:
    """Run through NNI's manager and local training service, listening on ``host`` only; returns its log folder."""
    from nni.nas.experiment import NasExperiment, NasExperimentConfig

    nni_dir = (evaluator.results.run_dir / "nni").resolve()
    nni_dir.mkdir(parents=True, exist_ok=True)
    job = nni_dir / "job.pkl"
    # Trials run in subprocesses: they load the space and evaluator (data included) from disk.
    # cloudpickle (an NNI dependency) because spaces may hold lambdas; plain pickle reads it back.
    # Not the evaluator's on_record: a progress bar (a tqdm, a lambda over this process' state)
    # does not load in another process, and every trial died in pickle.load. The rows the trials
    # write are reported here instead (_SubprocessRows).
    shipped = copy.copy(evaluator)
    shipped.on_record = None
    with job.open("wb") as f:
        cloudpickle.dump({"space": space, "evaluator": shipped}, f)
    config = NasExperimentConfig("ts", "simplified", "local")
    config.trial_concurrency = 1  # trial numbers come from the table: one writer at a time
    config.experiment_working_directory = str(nni_dir)
    nni_evaluator = FunctionalEvaluator(_evaluate_sample_from_file, job=str(job))
    experiment = NasExperiment(model_space, nni_evaluator, chain, config)
    outcome: bool | None = False  # run(): True done, False error, None Ctrl-C (NNI stopped it)
    try:
        with _bind_node_to(host, nni_dir):
            outcome = experiment.run(port=port)
    except RuntimeError as err:
        if "is not idle" in str(err):
            raise DynasError(f"`port` must be free for NNI's manager, but got port={port} (in use).") from None
        raise
    finally:
        if outcome is not None:
            # Also after a failed start: stop() closes NNI's log file and drops its atexit hook.
            experiment.stop()
        job.unlink(missing_ok=True)  # a copy of the data set: not worth keeping
    log = nni_dir / experiment.id / "log"
    if outcome is None:  # NNI caught Ctrl-C, stopped the experiment and returned None
        raise KeyboardInterrupt
    if outcome is False:
        raise DynasError(f"NNI experiment {experiment.id} ended in ERROR; see {log}.")
    logger.info("NNI experiment %s: logs and database under %s", experiment.id, log.parent)
    return log.parent


@contextlib.contextmanager
def _bind_node_to(host: str, folder: Path) -> Iterator[None]:
    """Make the NNI manager's Node process listen on ``host`` only.

    NNI 3.0 calls ``app.listen(port)`` with no host (every interface) and has no option for it;
    Node loads ``--require`` scripts given in ``NODE_OPTIONS`` before NNI's code, so a preload
    script that supplies the host to ``net.Server.listen`` binds every listener there.
    """
    if not _is_loopback(host):
        logger.warning("NNI's manager and web UI will listen on %s: reachable from other machines.", host)
    script = folder / "bind_host.js"
    script.write_text(_LOOPBACK_JS, encoding="utf-8")
    saved = {key: os.environ.get(key) for key in ("NODE_OPTIONS", "DYNAS_NNI_HOST")}
    os.environ["NODE_OPTIONS"] = f'{saved["NODE_OPTIONS"] or ""} --require "{script}"'.strip()
    os.environ["DYNAS_NNI_HOST"] = host
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: only "localhost" is known to stay on this machine
        return False


_STATE_COUNTERS: Mapping[str, tuple[str, ...]] = {
    "complete": ("trained",),
    "pruned": ("trained", "pruned"),
    "failed": ("failed",),
    "duplicate": ("duplicates",),
    "rejected": ("rejected",),
}


class _SubprocessRows:
    """The rows written by local trial subprocesses: counted into ``evaluator.counters`` (their copies
    of the evaluator are gone) and passed to ``evaluator.on_record`` (the progress bar) here."""

    def __init__(self, evaluator: CandidateEvaluator, first_trial: int, written_here: Sequence[int]) -> None:
        self.evaluator, self.first_trial, self.written_here = evaluator, first_trial, written_here
        self.seen: set[int] = set()

    def flush(self) -> None:
        counters = self.evaluator.counters
        for row in self.evaluator.results.records():
            trial = row["trial"]
            if row["engine"] != ENGINE or trial < self.first_trial or trial in self.seen or trial in self.written_here:
                continue
            self.seen.add(trial)
            counters.proposed += 1
            for name in _STATE_COUNTERS.get(row["state"], ()):
                setattr(counters, name, getattr(counters, name) + 1)
            if self.evaluator.on_record is not None:
                self.evaluator.on_record(TrialRecord(**{k: row[k] for k in COLUMNS if k in row}))


def _count_failed_trials(evaluator: CandidateEvaluator, admitted: int, written: int, logs: Path) -> None:
    """Count the admitted samples whose trial process died before writing a row as failed."""
    died = admitted - written
    if died > 0:
        evaluator.counters.proposed += died
        evaluator.counters.failed += died
        logger.warning("%d of %d NNI trials failed before writing a row; see their logs under %s",
                       died, admitted, logs / "trials")
