"""dynas.search: the library's search loop, with the built-in trainer or a user objective."""

from __future__ import annotations

import optuna
import pytest

import dynas
from dynas.budget import Budget, InfeasibleBudgetError
from dynas.cost import closed_form_macs
from dynas.engines.samplers import BudgetStartupSampler
from dynas.errors import DynasError
from dynas.spaces import get_space
from dynas.study import SearchResult, search

BUDGET = 1.5e6  # the default job's: low in mobile_cifar at 16x16 (0.46M..15.8M MACs)


@pytest.fixture(scope="module")
def space():
    return get_space("mobile_cifar", input_size=16)


def _macs_objective(calls):
    def objective(candidate, trial):
        calls.append(trial)
        return closed_form_macs(candidate.arch) / 1e6  # "bigger is better": presses on the budget

    return objective


def test_a_user_objective_is_gated_by_the_budget(space, tmp_path):
    calls: list = []
    result = search(space, max_macs=BUDGET, objective=_macs_objective(calls), n_trials=14, sampler="tpe",
                    pruner="none", run_dir=tmp_path, seed=0)
    assert isinstance(result, SearchResult) and result.run_dir == tmp_path
    done = result.frame[result.frame["state"] == "complete"]
    assert len(done) == 14 == len(calls) and (done["macs"] <= BUDGET).all()
    assert all(isinstance(t, optuna.Trial) for t in calls)  # Optuna's trial reaches the objective
    assert done["val_top1"].tolist() == pytest.approx((done["macs"] / 1e6).tolist())
    assert result.best["val_top1"] == done["val_top1"].max()
    # Every start-up trial was drawn within the budget: none of the first 10 proposals rejected.
    assert (result.frame.head(10)["state"] == "complete").all()
    assert isinstance(result.study._storage, optuna.storages.InMemoryStorage)  # in memory by default


def test_a_sampler_object_and_the_random_sampler_never_propose_over_budget(space, tmp_path):
    result = search(space, max_macs=BUDGET, objective=lambda c, t: 1.0, n_trials=6,
                    sampler=optuna.samplers.RandomSampler(seed=1), run_dir=tmp_path)
    assert result.counters.rejected == 0 and result.counters.trained == 6


def test_the_built_in_trainer_end_to_end(space, tmp_path):
    data = dynas.load_data("digits", input_size=16)
    config = dynas.TrainConfig(epochs=1, max_steps_per_epoch=2, quiet=True)
    result = search("mobile_cifar", max_macs=BUDGET, data=data, n_trials=2, train_config=config, run_dir=tmp_path,
                    pruner="none")
    assert result.counters.trained == 2 and (tmp_path / "results.jsonl").is_file()
    assert 0 <= result.best["val_top1"] <= 100


def test_nni_engine_with_an_objective(space, tmp_path):
    pytest.importorskip("nni")
    calls: list = []
    result = search(space, max_macs=BUDGET, objective=_macs_objective(calls), n_trials=3, engine="nni",
                    strategy="random", run_dir=tmp_path)
    done = result.frame[result.frame["state"] == "complete"]
    assert len(done) == 3 and (done["macs"] <= BUDGET).all() and result.study is None


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"max_macs": 1e3}, InfeasibleBudgetError, r"smallest architecture of space 'mobile_cifar' needs"),
        ({"engine": "ray"}, DynasError, r"unknown engine 'ray'"),
        ({"n_trials": 0}, DynasError, r"`n_trials` must be an integer >= 1, but got n_trials=0"),
        ({"sampler": "tpee"}, DynasError, r"unknown sampler 'tpee'.*Did you mean 'tpe'"),
        ({"metric": "top5"}, DynasError, r"unknown objective 'top5'"),
        ({"enqueue": [{"width": 3.0}]}, DynasError, r"`width` must be one of"),
        ({"objective": None}, DynasError, r"a search needs `data`"),
        ({"objective": "f"}, TypeError, r"`objective` must be callable"),
        ({"seed": 2**32}, DynasError, r"`seed` must be an integer in 0\.\.4294967295, but got seed=4294967296"),
    ],
)
def test_bad_arguments_fail_before_any_work(space, tmp_path, kwargs, error, match):
    calls: list = []
    arguments = {"max_macs": BUDGET, "objective": _macs_objective(calls), "run_dir": tmp_path / "run", **kwargs}
    with pytest.raises(error, match=match):
        search(space, **arguments)
    assert calls == [] and not (tmp_path / "run" / "results.jsonl").exists()


def test_an_objective_must_return_a_finite_number(space, tmp_path):
    with pytest.raises(DynasError, match=r"`objective` must return a finite number, but returned nan"):
        search(space, max_macs=BUDGET, objective=lambda c, t: float("nan"), n_trials=1, run_dir=tmp_path)


def test_plain_optuna_users_get_in_budget_startup_draws(space):
    optuna.logging.set_verbosity(optuna.logging.WARNING)

    def objective(trial):
        return -closed_form_macs(space.suggest(trial).arch)

    within = {}
    for wrapped in (False, True):
        sampler = optuna.samplers.RandomSampler(seed=0)
        if wrapped:
            sampler = BudgetStartupSampler(sampler, space, Budget(max_macs=BUDGET), seed=0)
        study = optuna.create_study(sampler=sampler, direction="maximize")
        study.optimize(objective, n_trials=12)
        within[wrapped] = sum(-t.value <= BUDGET for t in study.trials)
    assert within == {False: pytest.approx(0, abs=2), True: 12}


def test_the_optuna_study_reads_without_dynas(space, tmp_path):
    result = search(space, max_macs=BUDGET, objective=lambda c, t: 1.0, n_trials=3, sampler="random", run_dir=tmp_path)
    study = result.study
    assert study.metric_names == ["val_top1"]
    trial = study.trials[0]
    assert trial.user_attrs["origin"] == "baseline-static" and trial.user_attrs["dynamic_blocks"] == 0
    assert trial.user_attrs["num_params"] > 0 and trial.user_attrs["macs"] <= BUDGET
    assert trial.user_attrs["fidelity"] == "objective"


def test_a_library_run_leaves_the_record_report_and_retraining_read(space, tmp_path):
    from dynas.config import read_run_config, train_config
    from dynas.report import write_report

    data = dynas.load_data("digits", input_size=16, train_subset=64)
    recipe = dynas.TrainConfig(epochs=1, max_steps_per_epoch=1, batch_size=16, lr=0.02, quiet=True)
    search("mobile_cifar", max_macs=BUDGET, data=data, n_trials=2, pruner="none", run_dir=tmp_path, train_config=recipe)
    settings = read_run_config(tmp_path)
    assert (settings["space"], settings["dataset"], settings["input_size"], settings["max_macs"]) == ("mobile_cifar", "digits", 16, BUDGET)
    assert (settings["engine"], settings["sampler"], settings["pruner"], settings["trials"]) == ("optuna", "tpe", "none", 2)
    assert train_config(settings) == recipe
    write_report(tmp_path)
    header = (tmp_path / "report.md").read_text().splitlines()[2]
    assert header.startswith("space `mobile_cifar`; dataset `digits`; input 16x16; budget <= 1.50M MACs; engine optuna")
