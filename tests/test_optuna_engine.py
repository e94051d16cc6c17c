from __future__ import annotations

import statistics
import time

import optuna
import pytest
from optuna.trial import TrialState

import dynas.engines.evaluate as evaluate_module
from dynas.budget import Budget
from dynas.cost import closed_form_macs
from dynas.data import load_data
from dynas.errors import DynasError
from dynas.engines.evaluate import MAX_REJECTIONS_PER_TRIAL, CandidateEvaluator
from dynas.engines.optuna_engine import _FeasibleStartup, run_optuna_search
from dynas.engines.samplers import RANDOM_STARTUP_TRIALS, make_pruner, make_sampler
from dynas.engines.storage import make_storage
from dynas.results import ResultsTable, pareto_front
from dynas.training import TrainConfig
from dynas.spaces import get_space


@pytest.fixture(scope="module")
def data():
    return load_data("digits", input_size=16, train_subset=240, val_fraction=0.2)


@pytest.fixture(scope="module")
def space(data):
    return get_space("mobile_cifar", input_size=data.input_size, num_classes=data.num_classes)


@pytest.fixture(scope="module")
def median_macs(space):
    # A budget at the median cost of random samples: about half the proposals break it.
    return int(statistics.median(closed_form_macs(space.sample(seed=s).arch) for s in range(60)))


@pytest.fixture
def built(monkeypatch):
    """Record the MACs of every model the evaluator builds (i.e. trains)."""
    seen: list[int] = []
    real = evaluate_module.build_model

    def counting_build(arch):
        seen.append(closed_form_macs(arch))
        return real(arch)

    monkeypatch.setattr(evaluate_module, "build_model", counting_build)
    return seen


def _evaluator(run_dir, data, max_macs):
    config = TrainConfig(epochs=2, max_steps_per_epoch=2, batch_size=32, quiet=True, num_threads=1)
    return CandidateEvaluator(Budget(max_macs=max_macs), data, config, ResultsTable(run_dir))


def _run(evaluator, space, run_dir, n, **kw):
    storage = make_storage(f"sqlite:///{run_dir / 'study.db'}")
    return run_optuna_search(space, evaluator, n_trials=n, storage=storage, study_name="s", **kw)


def test_tpe_search_never_trains_over_budget_and_resumes(tmp_path, data, space, median_macs, built):
    evaluator = _evaluator(tmp_path, data, median_macs)
    study = _run(evaluator, space, tmp_path, 8, sampler="tpe", pruner="none")
    table = evaluator.results.frame()
    # TPE's random start-up trials are drawn within the budget: about half of uniform proposals
    # would break it, none of these does.
    assert 8 <= RANDOM_STARTUP_TRIALS and (table["state"] != "rejected").all()
    assert len(table) == len(study.trials) == 8 and table["trial"].is_unique

    # Rerunning the same search resumes: nothing new to do, then more trials on request, the
    # last ones proposed by TPE itself; rejections cost no training and do not count as trials.
    again = _evaluator(tmp_path, data, median_macs)
    assert len(_run(again, space, tmp_path, 8, sampler="tpe", pruner="none").trials) == 8
    assert again.counters.proposed == 0
    study = _run(again, space, tmp_path, RANDOM_STARTUP_TRIALS + 4, sampler="tpe", pruner="none")
    table = again.results.frame()
    assert (table["state"] != "rejected").sum() == RANDOM_STARTUP_TRIALS + 4 and table["trial"].is_unique
    trained = table[table["state"].isin(["complete", "pruned", "failed"])]
    rejected = table[table["state"] == "rejected"]
    assert (trained["macs"] <= median_macs).all()
    assert (rejected["macs"] > median_macs).all() and (rejected["train_seconds"] == 0).all()
    assert built and max(built) <= median_macs
    assert len(built) == evaluator.counters.trained + again.counters.trained + again.counters.failed
    assert again.counters.rejected == len(rejected)
    assert len(study.trials) == len(table)
    # the sampler was told about violations; a rejection is PRUNED without a value, not a 0
    assert rejected.size  # TPE's own proposals broke the budget at least once
    for t in study.trials:
        assert (t.system_attrs["constraints:macs"] > 0) == (t.user_attrs["state"] == "rejected")
        if t.user_attrs["state"] == "rejected":
            assert t.state == TrialState.PRUNED and t.value is None and not t.intermediate_values
    assert study.best_trial.user_attrs["state"] == "complete"


def test_nsga2_multi_objective_pareto(tmp_path, data, space, median_macs, built):
    evaluator = _evaluator(tmp_path, data, median_macs)
    study = _run(evaluator, space, tmp_path, 6, sampler="nsga2", objective="top1-macs", pruner="none")
    assert all(len(t.values) == 2 for t in study.trials if t.values)
    front = pareto_front(evaluator.results.frame())
    assert not front.empty and (front["state"] == "complete").all()
    assert max(built) <= median_macs


def test_duplicate_architecture_is_not_retrained(tmp_path, data, space, median_macs, built):
    evaluator = _evaluator(tmp_path, data, 10**12)
    candidate = space.sample(seed=3)
    first = evaluator.evaluate(candidate, 0, "optuna")
    second = evaluator.evaluate(candidate, 1, "optuna")
    assert first.state == "complete" and second.state == "duplicate"
    assert second.val_top1 == first.val_top1 and second.reason == "same as trial 0"
    assert len(built) == 1


def test_latency_budget_rejects_before_training(tmp_path, data, space):
    config = TrainConfig(epochs=1, max_steps_per_epoch=1, batch_size=32, quiet=True, num_threads=1)
    evaluator = CandidateEvaluator(Budget(max_macs=10**12, max_latency_ms=1e-6), data, config, ResultsTable(tmp_path))
    record = evaluator.evaluate(space.sample(seed=0), 0, "optuna")
    assert record.state == "rejected" and record.latency_ms > 0
    assert record.reason.startswith("latency") and record.train_seconds == 0 and record.epochs == 0


def test_refuses_to_mix_budgets_in_one_study(tmp_path, data, space, median_macs):
    _run(_evaluator(tmp_path, data, median_macs), space, tmp_path, 1, pruner="none")
    with pytest.raises(DynasError, match=r"was created with budget .* refusing to mix"):
        _run(_evaluator(tmp_path, data, median_macs + 1), space, tmp_path, 2, pruner="none")


def test_refuses_a_study_asked_with_other_choice_values(tmp_path, data, space, median_macs, built):
    # A study whose trials asked anneal_fraction from the values of an older dynas: Optuna would
    # raise mid-trial on the first suggest; the run is refused before any training instead.
    storage = make_storage(f"sqlite:///{tmp_path / 'study.db'}")
    study = optuna.create_study(storage=storage, study_name="s")
    old = optuna.distributions.CategoricalDistribution((0.05, 0.1, 0.2))
    study.tell(study.ask({"anneal_fraction": old}), 50.0)
    with pytest.raises(DynasError, match=r"searched with anneal_fraction in \(0\.05, 0\.1, 0\.2\), but space 'mobile_cifar' now offers \(0\.25, 0\.5, 1\.0\)"):
        _run(_evaluator(tmp_path, data, median_macs), space, tmp_path, 2, pruner="none")
    assert built == [] and len(study.get_trials()) == 1


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(sampler="tpee"), r"unknown sampler 'tpee'.*Did you mean 'tpe'\?"),
        (dict(pruner="medain"), r"unknown pruner 'medain'.*Did you mean 'median'\?"),
        (dict(objective="acc"), r"unknown objective 'acc'"),
    ],
)
def test_unknown_names(tmp_path, data, space, kwargs, match):
    with pytest.raises(DynasError, match=match):
        _run(_evaluator(tmp_path, data, 10**9), space, tmp_path, 1, **kwargs)


def test_grid_refuses_huge_space(space):
    with pytest.raises(DynasError, match=r"grid sampler needs a space of at most 10000 points"):
        make_sampler("grid", space, 0)


@pytest.mark.parametrize(
    "url,match",
    [
        ("postgresql://u:secret@127.0.0.1:1/db", r"cannot open storage 'postgresql://u:\*\*\*@127.0.0.1:1/db'"),
        ("nosuchdb://x/y", r"cannot open storage 'nosuchdb://x/y'"),
    ],
)
def test_bad_storage_urls(url, match):
    with pytest.raises(DynasError, match=match):
        make_storage(url)


class _DriverError(Exception):
    def __init__(self, message: str, pgcode: str) -> None:
        super().__init__(message)
        self.pgcode = pgcode


@pytest.mark.parametrize("pgcode,message", [
    ("42710", 'type "studydirection" already exists'),  # duplicate_object
    ("42P07", 'relation "studies" already exists'),  # duplicate_table
])
def test_storage_retries_a_lost_race_to_create_the_tables(monkeypatch, pgcode, message):
    import sqlalchemy

    calls = []

    def rdb(*args, **kwargs):
        calls.append(args)
        if len(calls) < 3:
            raise sqlalchemy.exc.ProgrammingError("CREATE ...", {}, _DriverError(message, pgcode))
        return "storage"

    monkeypatch.setattr(optuna.storages, "RDBStorage", rdb)
    monkeypatch.setattr("dynas.engines.storage.time.sleep", lambda s: None)
    assert make_storage("postgresql://u@127.0.0.1:1/db") == "storage"
    assert len(calls) == 3


def test_storage_does_not_retry_other_database_errors(monkeypatch):
    import sqlalchemy

    calls = []

    def rdb(*args, **kwargs):
        calls.append(args)
        raise sqlalchemy.exc.ProgrammingError("CREATE ...", {}, _DriverError("permission denied for schema public", "42501"))

    monkeypatch.setattr(optuna.storages, "RDBStorage", rdb)
    with pytest.raises(DynasError, match=r"cannot open storage 'postgresql://u@127.0.0.1:1/db': .*permission denied"):
        make_storage("postgresql://u@127.0.0.1:1/db")
    assert len(calls) == 1


def test_bad_journal_paths(tmp_path):
    with pytest.raises(DynasError, match=r"`storage` must be a URL or the path of a journal file, .* a directory"):
        make_storage(str(tmp_path))
    with pytest.raises(DynasError, match=r"is a journal file path, but its folder .*nowhere' does not exist"):
        make_storage(str(tmp_path / "nowhere" / "study.log"))
    sqlite = tmp_path / "study.db"
    make_storage(f"sqlite:///{sqlite}")  # creates the database
    with pytest.raises(DynasError, match=r"is a SQLite database; give it as a URL: storage='sqlite:///.*study.db'"):
        make_storage(str(sqlite))
    garbage = tmp_path / "notes.txt"
    garbage.write_text("not a journal\n")
    with pytest.raises(DynasError, match=r"`storage` '.*notes.txt' is not an Optuna journal file"):
        make_storage(str(garbage))


def test_journal_file_storage_fails_and_retries_a_dead_workers_trial(tmp_path):
    """A trial whose heartbeat stopped is failed after the grace period and its parameters re-queued."""
    path = str(tmp_path / "study.log")
    study = optuna.create_study(storage=make_storage(path, heartbeat_interval=1, grace_period=1), study_name="s")
    dead = study.ask()
    dead.suggest_categorical("k", [3, 5])
    study._storage.record_heartbeat(dead._trial_id)
    live = study.ask()
    study._storage.record_heartbeat(live._trial_id)
    optuna.storages.fail_stale_trials(study)
    assert [t.state for t in study.trials] == [TrialState.RUNNING] * 2  # within the grace period
    time.sleep(1.2)
    study._storage.record_heartbeat(live._trial_id)
    # Another process (a rerun) opens the same file and finds the dead trial.
    other = optuna.load_study(storage=make_storage(path, heartbeat_interval=1, grace_period=1), study_name="s")
    optuna.storages.fail_stale_trials(other)
    states = [t.state for t in other.trials]
    assert states == [TrialState.FAIL, TrialState.RUNNING, TrialState.WAITING]
    assert other.trials[2].params == dead.params  # re-queued with the dead trial's parameters
    assert other.trials[2].system_attrs["failed_trial"] == dead.number


def test_random_sampler_reproducible(tmp_path, data, space):
    def params(run_dir):
        run_dir.mkdir()
        ev = _evaluator(run_dir, data, 1)  # everything rejected: no training, fast
        study = _run(ev, space, run_dir, 1, sampler="random", seed=7, pruner="none")
        # nothing is feasible: the run gives up after its rejection allowance instead of looping
        assert len(study.trials) == ev.counters.rejected == MAX_REJECTIONS_PER_TRIAL
        return [t.params for t in study.trials]

    assert params(tmp_path / "a") == params(tmp_path / "b")


@pytest.mark.parametrize("epochs,first_prunable", [(1, 1), (4, 2), (10, 5)])
def test_median_pruner_waits_for_half_the_epochs(epochs, first_prunable):
    study = optuna.create_study(direction="maximize", pruner=make_pruner("median", epochs))
    for _ in range(3):  # finished trials that did much better at every epoch
        done = study.ask()
        for epoch in range(1, epochs + 1):
            done.report(90.0, epoch)
        study.tell(done, 90.0)
    trial = study.ask()
    verdicts = []
    for epoch in range(1, epochs + 1):
        trial.report(10.0, epoch)
        verdicts.append(trial.should_prune())
    assert verdicts.index(True) + 1 == first_prunable


def test_startup_too_tight_for_uniform_draws_is_left_to_the_sampler(tmp_path, data, space):
    """At the smallest architecture's cost uniform draws never fit: proposals come from Optuna again."""
    evaluator = _evaluator(tmp_path, data, closed_form_macs(space.smallest()))
    study = optuna.create_study(storage=make_storage(str(tmp_path / "study.log")), study_name="s")
    startup = _FeasibleStartup(space, evaluator, RANDOM_STARTUP_TRIALS, seed=0)
    startup.enqueue(study)
    assert startup.trials == 0 and study.trials == []
    feasible = _FeasibleStartup(space, _evaluator(tmp_path, data, 10**12), RANDOM_STARTUP_TRIALS, seed=0)
    feasible.enqueue(study)
    assert [t.state for t in study.trials] == [TrialState.WAITING]
    assert space.decode(study.trials[0].system_attrs["fixed_params"])  # a whole candidate of the space
