"""The search-space contract: every space decodes, suggests, builds, trains and is counted exactly."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any

import pytest
import torch

from dynas.builder import build_model
from dynas.cost import closed_form_macs, closed_form_params
from dynas.spaces import SearchSpace
from dynas.spec import ArchSpec

__all__ = ["FakeTrial", "SearchSpaceContract"]


class FakeTrial:
    """Duck-typed ``optuna.Trial``: answers from ``answers`` (else the first value) and logs the asks."""

    def __init__(self, answers: Mapping[str, Any] | None = None) -> None:
        self.answers = dict(answers or {})
        self.asked: list[str] = []

    def suggest_categorical(self, name: str, choices: list[Any]) -> Any:
        assert name not in self.asked, f"{name} asked twice"
        self.asked.append(name)
        return self.answers.get(name, choices[0])


def _input(arch: ArchSpec) -> torch.Tensor:
    size = min(arch.input_size, 32)  # ImageNet archs run at 32x32: any resolution works
    return torch.randn(2, arch.in_channels, size, size)


class SearchSpaceContract:
    """Contract tests of a search space; subclasses provide a ``make_space`` fixture.

    ``make_space(**kwargs)`` returns a new space (``input_size``, ``num_classes`` keywords).
    """

    samples = 4  # random candidates checked per test

    @pytest.fixture
    def make_space(self) -> Callable[..., SearchSpace]:
        raise NotImplementedError("subclasses provide a `make_space` fixture")

    def test_choices_are_well_formed(self, make_space):  # noqa: ANN001
        choices = make_space().choices()
        labels = [c.label for c in choices]
        assert len(labels) == len(set(labels))
        for i, choice in enumerate(choices):
            assert all(dep in labels[:i] for dep in choice.depends_on), choice  # asked after what it depends on

    def test_samples_build_train_and_round_trip(self, make_space):  # noqa: ANN001
        space = make_space()
        for seed in range(self.samples):
            candidate = space.sample(seed)
            arch = candidate.arch
            assert ArchSpec.from_str(arch.to_str()) == arch
            assert ArchSpec.from_dict(json.loads(json.dumps(arch.to_dict()))) == arch
            assert space.decode(json.loads(json.dumps(dict(candidate.params)))) == candidate
            out = build_model(arch)(_input(arch))
            assert out.shape == (2, arch.num_classes) and torch.isfinite(out).all(), arch.to_str()
            out.logsumexp(1).mean().backward()

    def test_smallest_and_largest_bound_every_sample(self, make_space):  # noqa: ANN001
        space = make_space()
        low, high = closed_form_macs(space.smallest()), closed_form_macs(space.largest())
        for seed in range(self.samples * 4):
            assert low <= closed_form_macs(space.sample(seed).arch) <= high

    def test_the_closed_form_equals_fvcore(self, make_space):  # noqa: ANN001
        from dynas.counting import count_macs

        space = make_space(input_size=32)
        for seed in range(2):
            arch = space.sample(seed).arch
            report = count_macs(arch)
            assert (report.total_macs, report.params) == (closed_form_macs(arch), closed_form_params(arch))

    def test_sample_is_reproducible(self, make_space):  # noqa: ANN001
        space = make_space()
        assert space.sample(7) == space.sample(7)
        assert len({space.sample(seed).arch for seed in range(10)}) > 1

    def test_input_size_and_num_classes_reach_the_spec(self, make_space):  # noqa: ANN001
        arch = make_space(input_size=48, num_classes=7).sample(0).arch
        assert (arch.input_size, arch.num_classes) == (48, 7)

    def test_suggest_asks_exactly_the_active_choices(self, make_space):  # noqa: ANN001
        space = make_space()
        for seed in range(self.samples):
            params = dict(space.sample(seed).params)
            trial = FakeTrial(params)
            candidate = space.suggest(trial)
            assert trial.asked == list(params) and candidate == space.decode(params)

    def test_uniform_candidates_exist(self, make_space):  # noqa: ANN001
        assert make_space().uniform_candidates()
