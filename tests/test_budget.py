"""Budgets: validation, feasibility before any work, sampling within budget; latency measurement."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from dynas.budget import (
    Budget,
    InfeasibleBudgetError,
    NoFeasibleSampleError,
    ensure_feasible,
    sample_within_budget,
    space_cost_range,
)
from dynas.cost import closed_form_macs, closed_form_params
from dynas.counting import count_macs
from dynas.latency import measure_latency
from dynas.presets import get_preset
from dynas.spaces import get_space, list_spaces


@pytest.mark.parametrize("field", ["max_macs", "max_params", "max_latency_ms"])
def test_budget_rejects_non_positive(field):
    kwargs = {"max_macs": 1e6, field: -5}
    with pytest.raises(ValueError, match=rf"`{field}` must be > 0, but got {field}=-5"):
        Budget(**kwargs)


@pytest.mark.parametrize("field", ["max_macs", "max_params", "max_latency_ms"])
def test_budget_rejects_non_finite(field):
    kwargs = {"max_macs": 1e6, field: math.inf}
    with pytest.raises(ValueError, match=rf"`{field}` must be finite, but got {field}=inf"):
        Budget(**kwargs)


@pytest.mark.parametrize("field", ["max_macs", "max_params", "max_latency_ms"])
@pytest.mark.parametrize("value", ["10M", True])
def test_budget_rejects_non_numbers(field, value):
    kwargs = {"max_macs": 1e6, field: value}
    with pytest.raises(TypeError, match=rf"`{field}` must be a number, but got {field}="):
        Budget(**kwargs)


def test_budget_requires_max_macs():
    with pytest.raises(TypeError, match="`max_macs` must be a number, but got max_macs=None"):
        Budget(max_macs=None)


def test_budget_is_frozen():
    budget = Budget(max_macs=1e6)
    with pytest.raises(AttributeError):
        budget.max_macs = 2e6


def test_check_latency():
    budget = Budget(max_macs=1e6, max_latency_ms=10)
    assert budget.check_latency(9.5) == []
    assert budget.check_latency(12.25) == ["latency 12.2ms > max 10ms"]
    assert Budget(max_macs=1e6).check_latency(1e9) == []


def test_check_reports_each_violation():
    arch = get_preset("mobilenetv2_035")
    macs, params = closed_form_macs(arch), closed_form_params(arch)
    assert Budget(max_macs=macs, max_params=params).check(arch) == []
    assert Budget(max_macs=macs, max_params=params).is_feasible(arch)
    assert Budget(max_macs=10e6, max_params=1e6).check(arch) == ["macs 59.3M > max 10M", "params 1.7M > max 1M"]
    assert not Budget(max_macs=macs - 1).is_feasible(arch)


@pytest.mark.parametrize("space_name", list_spaces())
def test_cost_range_spans_samples(space_name):
    space = get_space(space_name)
    costs = space_cost_range(space)
    assert costs.min_macs == count_macs(space.smallest()).total_macs
    for seed in range(50):
        macs = closed_form_macs(space.sample(seed=seed).arch)
        assert costs.min_macs <= macs <= costs.max_macs


@pytest.mark.parametrize("space_name", list_spaces())
def test_sampling_never_returns_an_over_budget_spec(space_name):
    space = get_space(space_name)
    costs = space_cost_range(space)
    # a quarter of the way up the range: most samples are over it
    budget = Budget(max_macs=costs.min_macs + (costs.max_macs - costs.min_macs) // 4, max_params=costs.max_params // 2)
    for seed in range(20):
        arch = sample_within_budget(space, budget, seed=seed).arch
        assert closed_form_macs(arch) <= budget.max_macs
        assert closed_form_params(arch) <= budget.max_params
    assert count_macs(arch).total_macs <= budget.max_macs  # the ground truth agrees


def test_sampling_is_reproducible():
    space = get_space("mobile_cifar")
    budget = Budget(max_macs=space_cost_range(space).max_macs // 3)
    assert sample_within_budget(space, budget, seed=7) == sample_within_budget(space, budget, seed=7)


@pytest.mark.parametrize("space_name", list_spaces())
@pytest.mark.parametrize("field", ["max_macs", "max_params"])
def test_infeasible_budget_raises_before_any_sampling(space_name, field, monkeypatch):
    space = get_space(space_name)
    costs = space_cost_range(space)
    limits = {"max_macs": costs.max_macs, "max_params": costs.max_params}
    limits[field] = (costs.min_macs if field == "max_macs" else costs.min_params) - 1
    sampled = []
    monkeypatch.setattr(space, "sample", lambda **kw: sampled.append(kw))
    what = "MACs" if field == "max_macs" else "parameters"
    with pytest.raises(InfeasibleBudgetError, match=rf"the smallest architecture of space '{space_name}' needs .* {what} at \d+×\d+; the budget is"):
        sample_within_budget(space, Budget(**limits), seed=0)
    with pytest.raises(InfeasibleBudgetError):
        ensure_feasible(space, Budget(**limits))
    assert sampled == []


def test_sampling_gives_up_after_max_attempts():
    space = get_space("mobile_cifar")
    budget = Budget(max_macs=space_cost_range(space).min_macs)  # only the very smallest fits
    with pytest.raises(NoFeasibleSampleError, match=r"none of 5 samples of space 'mobile_cifar' \(seed=3\).*MACs ranged"):
        sample_within_budget(space, budget, seed=3, max_attempts=5)


@pytest.mark.parametrize("value", [0, -1, 2.5, True])
def test_max_attempts_must_be_a_positive_int(value):
    with pytest.raises(ValueError, match="`max_attempts` must be an integer >= 1"):
        sample_within_budget(get_space("mobile_cifar"), Budget(max_macs=1e9), max_attempts=value)


def _small_model() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Dropout(0.5))


def test_measure_latency_is_positive_and_restores_state():
    model = _small_model().train()
    threads = torch.get_num_threads()
    other = 1 if threads != 1 else 2
    latency = measure_latency(model, (3, 16, 16), warmup=1, repeats=5, num_threads=other)
    assert latency > 0 and math.isfinite(latency)
    assert torch.get_num_threads() == threads
    assert model.training


def test_measure_latency_uses_the_thread_count(monkeypatch):
    seen: list[int] = []
    model = _small_model()
    model.register_forward_hook(lambda *_: seen.append(torch.get_num_threads()))
    threads = torch.get_num_threads()
    other = 1 if threads != 1 else 2
    measure_latency(model, (3, 8, 8), warmup=2, repeats=3, num_threads=other)
    assert seen == [other] * 5


def test_measure_latency_runs_in_eval_mode_without_grad():
    modes: list[tuple[bool, bool]] = []
    model = _small_model()
    model.register_forward_hook(lambda m, *_: modes.append((m.training, torch.is_grad_enabled())))
    measure_latency(model, (3, 8, 8), warmup=0, repeats=2)
    assert modes == [(False, False)] * 2


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"repeats": 0}, "`repeats` must be an integer >= 1, but got repeats=0"),
        ({"warmup": -1}, "`warmup` must be an integer >= 0, but got warmup=-1"),
        ({"batch_size": 0}, "`batch_size` must be an integer >= 1, but got batch_size=0"),
        ({"num_threads": 0}, "`num_threads` must be an integer >= 1, but got num_threads=0"),
        ({"input_size": (1, 3, 16, 16)}, r"`input_size` must be a positive int \(square\)"),
    ],
)
def test_measure_latency_validates(kwargs, message):
    kwargs = {"input_size": (3, 8, 8), **kwargs}
    with pytest.raises(ValueError, match=message):
        measure_latency(_small_model(), **kwargs)
