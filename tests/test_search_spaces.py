from __future__ import annotations

import dataclasses
import sys
from collections.abc import Mapping
from typing import Any

import pytest
import torch

import dynas.spaces
import search_spaces
from dynas.builder import build_model
from dynas.counting import count_macs
from dynas.errors import DynasError
from dynas.spec import ArchSpec, BlockSpec, StageSpec
from dynas.testing import FakeTrial, SearchSpaceContract
from dynas.spaces import Candidate, Choice, SearchSpace, get_space, list_spaces, register_space

N_SAMPLES = 200  # random candidates each contract test builds per space


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _input(arch: ArchSpec) -> torch.Tensor:
    size = min(arch.input_size, 32)  # ImageNet archs run at 32x32: any resolution works
    return torch.randn(2, arch.in_channels, size, size)


# ----------------------------------------------------------------------------- every registered space


class TestRegisteredSpaces(SearchSpaceContract):
    """The search-space contract (dynas.testing) for every registered space."""

    samples = N_SAMPLES

    @pytest.fixture(params=list_spaces())
    def make_space(self, request):
        return lambda **kwargs: get_space(request.param, **kwargs)


def test_builtin_spaces_are_registered():
    assert {"mobile_cifar", "mobile_imagenet"} <= set(list_spaces())


@pytest.mark.parametrize("name", list_spaces())
def test_smallest_and_largest_build(name):
    space = get_space(name)
    for arch in (space.smallest(), space.largest()):
        out = build_model(arch)(_input(arch))
        out.sum().backward()
        assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", list_spaces())
def test_get_space_passes_input_size_and_num_classes(name):
    arch = get_space(name, input_size=48, num_classes=7).sample(0).arch
    assert (arch.input_size, arch.num_classes) == (48, 7)
    with pytest.raises(ValueError, match=r"`num_classes` must be an integer >= 1, but got num_classes=0\."):
        get_space(name, num_classes=0)


@pytest.mark.parametrize("name", list_spaces())
def test_optuna_define_by_run(name):
    optuna = pytest.importorskip("optuna")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    space = get_space(name)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(3):
        trial = study.ask()
        candidate = space.suggest(trial)
        assert dict(candidate.params) == trial.params  # exactly the active choices were asked
        assert space.decode(trial.params) == candidate
        study.tell(trial, 0.0)


# ----------------------------------------------------------------------------- the mobile spaces


def test_mobile_cifar_spans_the_budgets():
    space = get_space("mobile_cifar")
    smallest, largest = count_macs(space.smallest()).total_macs, count_macs(space.largest()).total_macs
    # the 5M, 10M and 20M budgets each keep some of the space and reject the rest
    assert 1.5e6 < smallest < 2.5e6 and 35e6 < largest < 45e6


@pytest.mark.parametrize("name", ["mobile_cifar", "mobile_imagenet"])
def test_mobile_smallest_and_largest_are_the_extremes(name):
    space = get_space(name)
    small, large = space.smallest(), space.largest()
    assert all(b.num_kernels == 1 and not b.se and b.kernel_size == 3 for b in small.blocks)
    assert all(b.num_kernels == 8 and b.se and b.kernel_size == 7 for b in large.blocks)
    assert len(small.blocks) < len(large.blocks) and small.stem_channels < large.stem_channels


@pytest.mark.parametrize("name", ["mobile_cifar", "mobile_cifar_ops", "mobile_imagenet"])
def test_the_largest_static_arch_is_the_largest_with_every_block_static(name):
    space = get_space(name)
    large, static = space.largest(), space.largest_static()
    assert any(b.is_dynamic for b in large.blocks) and not any(b.is_dynamic for b in static.blocks)
    assert all(b.num_kernels == 1 and b.op == "dy" and b.latent == 0 for b in static.blocks)
    # every other choice at its largest: the same network as the largest, with static convolutions
    as_static = [dataclasses.replace(b, num_kernels=1, op="dy", dynamic_convs="pw", latent=0) for b in large.blocks]
    assert list(static.blocks) == as_static and static.stem_channels == large.stem_channels
    assert static.head_channels == large.head_channels


@pytest.mark.parametrize("name", ["mobile_cifar", "mobile_cifar_ops", "mobile_imagenet"])
def test_the_static_twin_of_a_draw_changes_only_its_dynamic_blocks(name):
    space = get_space(name)
    dynamic = 0
    for seed in range(5):
        params = space.sample(seed=seed).params
        arch, twin = space.decode(params).arch, space.static_of(params)
        dynamic += any(b.is_dynamic for b in arch.blocks)
        assert not any(b.is_dynamic for b in twin.blocks)
        as_static = [dataclasses.replace(b, num_kernels=1, op="dy", dynamic_convs="pw", latent=0) for b in arch.blocks]
        assert list(twin.blocks) == as_static
        assert (twin.stem_channels, twin.head_channels) == (arch.stem_channels, arch.head_channels)
    assert dynamic  # the draws had dynamic blocks to make static


def test_mobile_labels():
    labels = [c.label for c in get_space("mobile_cifar").choices()]
    assert labels[:2] == ["width", "s1_depth"]
    assert labels[2:7] == ["s1_b1_kernel", "s1_b1_expansion", "s1_b1_se", "s1_b1_dynamic", "s1_b1_num_kernels"]
    assert labels[-2:] == ["tau_start", "anneal_fraction"]
    imagenet = [c.label for c in get_space("mobile_imagenet").choices()]
    assert "s1_depth" not in imagenet and "s1_b1_expansion" not in imagenet  # MobileNetV2's fixed first stage


def _all_static(space: SearchSpace) -> dict[str, Any]:
    """An NNI-style dict: every label, every block static, every stage at its deepest."""
    params = {c.label: c.values[-1] for c in space.choices()}
    params.update({c.label: False for c in space.choices() if c.label.endswith("_dynamic")})
    return params


def test_suggest_asks_k_only_for_dynamic_blocks():
    space = get_space("mobile_cifar")
    trial = FakeTrial({"s1_depth": 1})  # every block static (False is the first value)
    candidate = space.suggest(trial)
    assert not any(label.endswith("_num_kernels") for label in trial.asked)
    assert "tau_start" not in trial.asked and "anneal_fraction" not in trial.asked
    assert "s1_b2_kernel" not in trial.asked  # beyond the chosen depth
    assert (candidate.tau_start, candidate.anneal_fraction) == (30.0, 0.5)  # the defaults

    trial = FakeTrial({"s1_depth": 1, "s2_b1_dynamic": True, "s2_b1_num_kernels": 6, "tau_start": 50.0})
    candidate = space.suggest(trial)
    assert [label for label in trial.asked if label.endswith("_num_kernels")] == ["s2_b1_num_kernels"]
    assert trial.asked.index("s2_b1_num_kernels") == trial.asked.index("s2_b1_dynamic") + 1
    assert trial.asked[-2:] == ["tau_start", "anneal_fraction"]
    assert candidate.arch.stages[1].blocks[0].num_kernels == 6 and candidate.tau_start == 50.0
    assert dict(candidate.params) == {label: candidate.params[label] for label in trial.asked}


def test_decode_ignores_inactive_labels():
    space = get_space("mobile_cifar")
    params = _all_static(space)
    params.update(s1_depth=1, s1_b2_dynamic=True, s1_b2_kernel=4)  # block 2 of stage 1 does not exist
    candidate = space.decode(params)
    assert len(candidate.arch.stages[0].blocks) == 1
    assert "s1_b2_kernel" not in candidate.params and "tau_start" not in candidate.params
    assert candidate.tau_start == 30.0  # no active block is dynamic
    assert all(b.num_kernels == 1 for b in candidate.arch.blocks)


def test_is_active_follows_depth_and_dynamic():
    space = get_space("mobile_cifar")
    by_label = {c.label: c for c in space.choices()}
    k = by_label["s1_b2_num_kernels"]
    assert space.is_active(k, {"s1_depth": 2, "s1_b2_dynamic": True})
    assert not space.is_active(k, {"s1_depth": 1, "s1_b2_dynamic": True})
    assert not space.is_active(k, {"s1_depth": 2, "s1_b2_dynamic": False})
    assert space.is_active(by_label["tau_start"], {"s1_depth": 2, "s1_b2_dynamic": True})
    assert not space.is_active(by_label["tau_start"], {"s1_depth": 1, "s1_b2_dynamic": True})


def test_decode_canonicalises_values():
    space = get_space("mobile_cifar")
    params = _all_static(space)
    params.update(s2_b1_dynamic=True, s2_b1_num_kernels=4, tau_start=10, anneal_fraction=1)
    candidate = space.decode(params)
    assert candidate.tau_start == 10.0 and isinstance(candidate.params["tau_start"], float)


@pytest.mark.parametrize(
    "update,drop,match",
    [
        ({}, "s2_b1_kernel", r"missing a value for the active choice `s2_b1_kernel` .*allowed values: \(3, 5, 7\)"),
        ({"s2_b1_kernel": 4}, None, r"`s2_b1_kernel` must be one of \(3, 5, 7\), but got s2_b1_kernel=4\."),
        ({"width": True}, None, r"`width` must be one of \(0\.5, 0\.75, 1\.0\), but got width=True\."),
        ({"s2_b1_dynamic": 1}, None, r"`s2_b1_dynamic` must be one of \(False, True\), but got s2_b1_dynamic=1\."),
        ({"s2_b1_kernal": 3}, None, r"unknown label 's2_b1_kernal' for search space 'mobile_cifar'\. Did you mean 's2_b1_kernel'\?"),
        ({"s2_b1_dynamic": True}, "s2_b1_num_kernels", r"missing a value for the active choice `s2_b1_num_kernels`"),
    ],
)
def test_decode_errors(update, drop, match):
    space = get_space("mobile_cifar")
    params = {**_all_static(space), **update}
    params.pop(drop, None)
    with pytest.raises(DynasError, match=match):
        space.decode(params)


def test_candidate_is_hashable_and_params_read_only():
    a, b = get_space("mobile_cifar").sample(3), get_space("mobile_cifar").sample(3)
    assert a == b and hash(a) == hash(b)
    with pytest.raises(TypeError):
        a.params["width"] = 0.5  # type: ignore[index]


# ----------------------------------------------------------------------------- base class and registry


@pytest.mark.parametrize(
    "args,match",
    [
        (("", (1,)), r"`label` must be a non-empty string, but got label=''\."),
        (("k", ()), r"`values` of choice 'k' must not be empty"),
        (("k", (3, 3)), r"`values` of choice 'k' must be distinct, but got values=\(3, 3\)\."),
    ],
)
def test_choice_validation(args, match):
    with pytest.raises(ValueError, match=match):
        Choice(*args)


class TinySpace(SearchSpace):
    """The docstring example of dynas.spaces."""

    name = "tiny"

    def __init__(self, input_size: int = 32, num_classes: int = 10) -> None:
        self.input_size, self.num_classes = input_size, num_classes

    def choices(self) -> list[Choice]:
        return [Choice("kernel", (3, 5)), Choice("dynamic", (False, True)), Choice("num_kernels", (2, 4), depends_on=("dynamic",))]

    def is_active(self, choice: Choice, params: Mapping[str, Any]) -> bool:
        return choice.label != "num_kernels" or params.get("dynamic") is True

    def make_candidate(self, params: Mapping[str, Any]) -> Candidate:
        block = BlockSpec(params["kernel"], 6, 32, 2, num_kernels=params.get("num_kernels", 1))
        arch = ArchSpec(16, (StageSpec((block,)),), 128, stem_stride=1, num_classes=self.num_classes, input_size=self.input_size)
        return Candidate(arch, tau_start=30.0, anneal_fraction=0.1, params=params)


def test_a_user_space_in_one_file(registry):
    assert register_space(TinySpace) is TinySpace  # usable as a decorator
    space = get_space("tiny", num_classes=3)
    assert "tiny" in list_spaces()
    candidate = space.decode({"kernel": 5, "dynamic": True, "num_kernels": 4})
    assert candidate.arch.blocks[0].num_kernels == 4 and candidate.arch.num_classes == 3
    assert space.largest().blocks[0].num_kernels == 4 and space.smallest().blocks[0].num_kernels == 1
    build_model(space.sample(0).arch)(torch.randn(2, 3, 32, 32)).sum().backward()


_USER_FILE = """
from dynas.spec import ArchSpec, BlockSpec, StageSpec
from dynas.spaces import register_space
from dynas.spaces import Candidate, Choice, SearchSpace


@register_space
class DroppedIn(SearchSpace):
    name = "dropped_in"

    def __init__(self, input_size=32, num_classes=10):
        self.input_size, self.num_classes = input_size, num_classes

    def choices(self):
        return [Choice("kernel", (3, 5))]

    def make_candidate(self, params):
        block = BlockSpec(params["kernel"], 6, 32, 2)
        arch = ArchSpec(16, (StageSpec((block,)),), 128, num_classes=self.num_classes, input_size=self.input_size)
        return Candidate(arch, tau_start=30.0, anneal_fraction=0.1, params=params)
"""


def test_a_file_dropped_into_the_package_registers_its_space(registry, tmp_path, monkeypatch):
    (tmp_path / "dropped_in.py").write_text(_USER_FILE)
    (tmp_path / "_private.py").write_text("raise RuntimeError('private modules are not imported')")
    monkeypatch.setattr(search_spaces, "__path__", [*search_spaces.__path__, str(tmp_path)])
    monkeypatch.delitem(sys.modules, "search_spaces.dropped_in", raising=False)
    assert "dropped_in" not in list_spaces()
    dynas.spaces.discover_spaces()
    assert "dropped_in" in list_spaces()
    assert get_space("dropped_in").decode({"kernel": 5}).arch.blocks[0].kernel_size == 5
    sys.modules.pop("search_spaces.dropped_in")


def test_dependent_choice_needs_is_active(registry):
    class Forgetful(TinySpace):
        name = "forgetful"
        is_active = SearchSpace.is_active

    with pytest.raises(TypeError, match=r"Forgetful declares `num_kernels` depends_on=\('dynamic',\), so it must override is_active\(\)"):
        Forgetful().sample(0)


def test_register_rejects_duplicates_and_non_spaces(registry):
    class Again(TinySpace):
        name = "mobile_cifar"

    with pytest.raises(DynasError, match=r"a search space named 'mobile_cifar' is already registered \(MobileCifarSpace\)"):
        register_space(Again)
    with pytest.raises(TypeError, match=r"`space` must be a SearchSpace subclass"):
        register_space(TinySpace())  # type: ignore[arg-type]

    class Nameless(TinySpace):
        name = ""

    with pytest.raises(TypeError, match=r"`Nameless\.name` must be a non-empty string, but got name=''\."):
        register_space(Nameless)


def test_get_space_suggests_close_names():
    with pytest.raises(DynasError, match=r"unknown search space 'mobile_cifr'\. Did you mean 'mobile_cifar'\? Registered spaces: "):
        get_space("mobile_cifr")
