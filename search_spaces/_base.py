"""The search-space contract: labelled choices, conditional activity, decoding to a spec.

A space is a list of :class:`Choice` (label -> allowed values). A sampler proposes a flat dict
``{label: value}`` (NNI proposes every label, Optuna only those it is asked), :meth:`decode`
keeps the active ones and turns them into a :class:`Candidate` (an
:class:`~dynas.spec.ArchSpec` plus the temperature schedule of its dynamic layers).

Adding a space takes one file: subclass :class:`SearchSpace` and register it::

    from dynas.spec import ArchSpec, BlockSpec, StageSpec
    from search_spaces import register_space
    from search_spaces._base import Candidate, Choice, SearchSpace

    @register_space
    class TinySpace(SearchSpace):
        name = "tiny"

        def __init__(self, input_size: int = 32, num_classes: int = 10) -> None:
            self.input_size, self.num_classes = input_size, num_classes

        def choices(self) -> list[Choice]:
            return [Choice("kernel", (3, 5)), Choice("dynamic", (False, True)),
                    Choice("num_kernels", (2, 4), depends_on=("dynamic",))]

        def is_active(self, choice: Choice, params) -> bool:
            return choice.label != "num_kernels" or params.get("dynamic") is True

        def make_candidate(self, params) -> Candidate:
            block = BlockSpec(params["kernel"], 6, 32, 2, num_kernels=params.get("num_kernels", 1))
            arch = ArchSpec(16, (StageSpec((block,)),), 128, stem_stride=1,
                            num_classes=self.num_classes, input_size=self.input_size)
            return Candidate(arch, tau_start=30.0, anneal_fraction=0.1, params=params)

Choices must be listed so that every label in a ``depends_on`` comes before the choice itself:
:meth:`SearchSpace.suggest` asks them in that order.
"""

from __future__ import annotations

import abc
import random
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, ClassVar, Protocol

from dynas.errors import DynasError, did_you_mean
from dynas.spec import ArchSpec

__all__ = ["Candidate", "Choice", "SearchSpace", "TrialLike"]


class TrialLike(Protocol):
    """The part of ``optuna.Trial`` that :meth:`SearchSpace.suggest` uses (duck-typed)."""

    def suggest_categorical(self, name: str, choices: list[Any]) -> Any: ...


@dataclass(frozen=True)
class Choice:
    """One searchable decision."""

    label: str  # "s{stage}_b{block}_{choice}", e.g. "s2_b1_kernel", or global "width"
    values: tuple[Hashable, ...]  # allowed values, in order
    depends_on: tuple[str, ...] = ()  # labels whose values decide whether this one is active

    def __post_init__(self) -> None:
        if not isinstance(self.label, str) or not self.label:
            raise ValueError(f"`label` must be a non-empty string, but got label={self.label!r}.")
        object.__setattr__(self, "values", tuple(self.values))
        object.__setattr__(self, "depends_on", tuple(self.depends_on))
        if not self.values:
            raise ValueError(f"`values` of choice {self.label!r} must not be empty, but got values=().")
        if len(set(self.values)) != len(self.values):
            raise ValueError(f"`values` of choice {self.label!r} must be distinct, but got values={self.values!r}.")

    def canonical(self, value: Any) -> Any:
        """The allowed value equal to ``value`` (``30`` -> ``30.0``); a bool only matches a bool.

        Raises:
            DynasError: ``value`` is not one of :attr:`values`.
        """
        for allowed in self.values:
            if allowed == value and isinstance(allowed, bool) == isinstance(value, bool):
                return allowed
        raise DynasError(
            f"`{self.label}` must be one of {self.values!r}, but got {self.label}={value!r}."
        )


@dataclass(frozen=True)
class Candidate:
    """A decoded architecture and the training settings searched with it."""

    arch: ArchSpec
    tau_start: float  # initial temperature of dynamic layers
    anneal_fraction: float  # fraction of training steps over which tau goes tau_start -> 1
    params: Mapping[str, Any] = field(default_factory=dict, hash=False)  # the active choices decoded

    def __post_init__(self) -> None:
        object.__setattr__(self, "params", MappingProxyType(dict(self.params)))


class SearchSpace(abc.ABC):
    """A conditional categorical search space over :class:`~dynas.spec.ArchSpec`.

    Subclasses set :attr:`name` and implement :meth:`choices` and :meth:`make_candidate`;
    a space with dependent choices also overrides :meth:`is_active`. The constructor should
    accept ``input_size`` and ``num_classes`` keywords (the CLI passes the data set's).
    """

    name: ClassVar[str]

    @abc.abstractmethod
    def choices(self) -> list[Choice]:
        """All choices, in asking order (a choice after every label it depends on)."""

    @abc.abstractmethod
    def make_candidate(self, params: Mapping[str, Any]) -> Candidate:
        """The candidate of ``params``: exactly the active choices, each with an allowed value."""

    def is_active(self, choice: Choice, params: Mapping[str, Any]) -> bool:
        """Whether ``choice`` is asked given the values in ``params`` (of earlier choices).

        The default suits spaces without dependencies; a dependent choice needs an override.
        """
        if choice.depends_on:
            raise TypeError(
                f"{type(self).__name__} declares `{choice.label}` depends_on={choice.depends_on}, "
                "so it must override is_active()."
            )
        return True

    # ------------------------------------------------------------------ derived operations

    def _walk(self, value_of: Callable[[Choice, dict[str, Any]], Any]) -> dict[str, Any]:
        """Visit the active choices in order; ``value_of(choice, params so far)`` gives each value."""
        params: dict[str, Any] = {}
        for choice in self.choices():
            if self.is_active(choice, params):
                params[choice.label] = value_of(choice, params)
        return params

    def decode(self, params: Mapping[str, Any]) -> Candidate:
        """Turn a sampler's flat dict into a :class:`Candidate`; labels of inactive choices are ignored.

        Raises:
            DynasError: an unknown label (with a close-match suggestion), a missing active label,
                or a value that is not allowed (naming the allowed values).
        """
        labels = [c.label for c in self.choices()]
        for label in params:
            if label not in labels:
                raise DynasError(
                    f"unknown label {label!r} for search space {self.name!r}.{did_you_mean(label, labels)}"
                )

        def given(choice: Choice, _: dict[str, Any]) -> Any:
            if choice.label not in params:
                raise DynasError(
                    f"missing a value for the active choice `{choice.label}` of search space {self.name!r} "
                    f"(allowed values: {choice.values!r})."
                )
            return choice.canonical(params[choice.label])

        return self.make_candidate(self._walk(given))

    def suggest(self, trial: TrialLike) -> Candidate:
        """Ask an Optuna trial (define-by-run) for the active choices only, in order."""
        return self.make_candidate(self._walk(lambda c, _: trial.suggest_categorical(c.label, list(c.values))))

    def sample(self, seed: int | None = None, budget: Any = None, max_attempts: int = 1000) -> Candidate:
        """A candidate drawn uniformly over the active choices, reproducible with ``seed``.

        With a :class:`~dynas.budget.Budget`, only feasible candidates are returned (rejection
        sampling on the closed-form cost, at most ``max_attempts`` draws, then a clear error; an
        infeasible budget is an error before any draw).
        """
        if budget is not None:
            from dynas.budget import sample_within_budget

            return sample_within_budget(self, budget, seed=seed, max_attempts=max_attempts)
        rng = random.Random(seed)
        return self.make_candidate(self._walk(lambda c, _: rng.choice(c.values)))

    def smallest(self) -> ArchSpec:
        """The arch taking the smallest value of every active choice (the cheapest, analytically)."""
        return self.make_candidate(self._walk(lambda c, _: min(c.values))).arch

    def largest(self) -> ArchSpec:
        """The arch taking the largest value of every active choice (the most expensive)."""
        return self.make_candidate(self._walk(lambda c, _: max(c.values))).arch

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, choices={len(self.choices())})"
