"""Every search trains the best uniform all-static and all-dynamic architectures first."""

from __future__ import annotations

import logging

import pytest

from dynas.baselines import baselines
from dynas.budget import Budget
from dynas.cost import closed_form_macs
from dynas.spaces import get_space
from dynas.study import search


@pytest.fixture(scope="module")
def space():
    return get_space("mobile_cifar", input_size=16)


def _blocks(candidate):
    return [b for stage in candidate.arch.stages for b in stage.blocks]


def test_uniform_candidates_share_every_choice_across_blocks(space):
    for candidate in space.uniform_candidates()[::97]:
        blocks = _blocks(candidate)
        for field in ("kernel_size", "expansion", "se", "num_kernels"):
            assert len({getattr(b, field) for b in blocks}) == 1, (field, candidate.arch.to_str())


def test_at_an_unlimited_budget_the_baselines_are_the_largest_uniform_networks(space):
    static, dynamic = baselines(space, Budget(max_macs=1e12))
    largest = {c.label: max(c.values) for c in space.choices()}  # every block at its largest, dynamic
    by_hand = {k: v for k, v in largest.items() if not k.endswith("num_kernels") and k not in ("tau_start", "anneal_fraction")}
    as_static = space.decode({**by_hand, **{k: False for k in by_hand if k.endswith("_dynamic")}})
    assert (static.origin, static.candidate.arch) == ("baseline-static", as_static.arch)
    as_dynamic = space.decode({**largest, **{k: 4 for k in largest if k.endswith("num_kernels")}})
    assert (dynamic.origin, dynamic.candidate.arch) == ("baseline-dynamic", as_dynamic.arch)


def test_the_baselines_fit_the_budget_and_are_uniform_of_their_kind(space):
    budget = Budget(max_macs=1.5e6)
    static, dynamic = baselines(space, budget)
    assert {b.num_kernels for b in _blocks(static.candidate)} == {1}
    assert {b.num_kernels for b in _blocks(dynamic.candidate)} == {4}
    for baseline in (static, dynamic):
        assert budget.is_feasible(baseline.candidate.arch)
        cheaper = [c for c in space.uniform_candidates()
                   if {b.num_kernels for b in _blocks(c)} == {b.num_kernels for b in _blocks(baseline.candidate)}
                   and closed_form_macs(c.arch) > closed_form_macs(baseline.candidate.arch)]
        assert cheaper and all(not budget.is_feasible(c.arch) for c in cheaper)  # nothing bigger fits


def test_a_baseline_that_cannot_fit_is_skipped_with_one_line(space, caplog):
    smallest = closed_form_macs(space.smallest())
    with caplog.at_level(logging.WARNING, logger="dynas.baselines"):
        found = baselines(space, Budget(max_macs=smallest * 1.05))
    assert [b.origin for b in found] == ["baseline-static"]
    assert "baseline-dynamic skipped: no uniform all-dynamic (K=4) architecture of space 'mobile_cifar'" in caplog.text


@pytest.mark.parametrize("engine", ["optuna", "nni"])
def test_searches_train_the_baselines_first(space, tmp_path, engine):
    if engine == "nni":
        pytest.importorskip("nni")
    kwargs = {"strategy": "random"} if engine == "nni" else {"sampler": "random"}
    result = search(space, max_macs=1.5e6, objective=lambda c, t: 1.0, n_trials=4, engine=engine,
                    run_dir=tmp_path / engine, **kwargs)
    trained = result.frame[result.frame["state"] != "rejected"]  # NNI's over-budget proposals are rows too
    assert trained["origin"].tolist() == ["baseline-static", "baseline-dynamic", "search", "search"]
    assert result.frame["origin"].tolist()[:2] == ["baseline-static", "baseline-dynamic"] and result.counters.trained == 4
    alone = search(space, max_macs=1.5e6, objective=lambda c, t: 1.0, n_trials=2, engine=engine, baselines=False,
                   run_dir=tmp_path / f"{engine}-none", **kwargs)
    assert set(alone.frame["origin"]) == {"search"}
