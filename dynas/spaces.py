"""Search spaces: the contract (labelled choices, conditional activity, decoding to a spec) and the registry.

A space is a list of :class:`Choice` (label -> allowed values). A sampler proposes a flat dict
``{label: value}`` (NNI proposes every label, Optuna only those it is asked), :meth:`decode`
keeps the active ones and turns them into a :class:`Candidate` (an
:class:`~dynas.spec.ArchSpec` plus the temperature schedule of its dynamic layers).

Adding a space takes one file: subclass :class:`SearchSpace` and register it::

    from dynas.spaces import Candidate, Choice, SearchSpace, register_space
    from dynas.spec import ArchSpec, BlockSpec, StageSpec

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
            return Candidate(arch, tau_start=30.0, anneal_fraction=0.5, params=params)

Choices must be listed so that every label in a ``depends_on`` comes before the choice itself:
:meth:`SearchSpace.suggest` asks them in that order.

The registry finds spaces in three places, on first use: the ``search_spaces`` folder beside
dynas (every public module in it is imported: drop a file there), the ``dynas.search_spaces``
entry-point group (an installed package), and any module that calls :func:`register_space`.

>>> list_spaces()
['k_tau', 'mobile_cifar', 'mobile_cifar_ops', 'mobile_imagenet']
>>> get_space("mobile_cifar", num_classes=100).smallest().num_classes
100
"""

from __future__ import annotations

import abc
import importlib
import itertools
import pkgutil
import random
import re
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from types import MappingProxyType
from typing import Any, ClassVar, Protocol, TypeVar

from dynas.errors import DynasError, did_you_mean
from dynas.spec import ArchSpec

__all__ = [
    "Candidate",
    "Choice",
    "SearchSpace",
    "TrialLike",
    "discover_spaces",
    "get_space",
    "list_spaces",
    "register_space",
]


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
    accept ``input_size`` and ``num_classes`` keywords (a search passes the data set's), and
    ``in_channels`` to search on grayscale data.
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

    def uniform_candidates(self) -> list[Candidate]:
        """Every *uniform* candidate: each kind of choice takes the same value in every block.

        A choice's kind is its label without the ``s{i}_`` / ``s{i}_b{j}_`` prefix (``kernel``,
        ``depth``, ``num_kernels``, ...); a kind whose allowed values differ between stages
        takes the same position in each (clipped to the last). ``tau_start`` and
        ``anneal_fraction`` are training settings: they take their middle value.
        """
        kinds: dict[str, int] = {}
        for choice in self.choices():
            kind = _kind(choice.label)
            kinds[kind] = max(kinds.get(kind, 0), len(choice.values))
        searched = [k for k in kinds if k not in _SCHEDULE_KINDS]
        candidates = []
        for position in itertools.product(*(range(kinds[k]) for k in searched)):
            at = dict(zip(searched, position))

            def value_of(choice: Choice, _: dict[str, Any]) -> Any:
                kind = _kind(choice.label)
                index = len(choice.values) // 2 if kind in _SCHEDULE_KINDS else min(at[kind], len(choice.values) - 1)
                return choice.values[index]

            candidates.append(self.make_candidate(self._walk(value_of)))
        return candidates

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, choices={len(self.choices())})"


_SCHEDULE_KINDS = ("tau_start", "anneal_fraction")


def _kind(label: str) -> str:
    """``s2_b1_kernel`` -> ``kernel``; ``s3_depth`` -> ``depth``; ``width`` -> ``width``."""
    return re.sub(r"^s\d+_(b\d+_)?", "", label)


# ----------------------------------------------------------------------------- registry

#: The drop-in folder of spaces, shipped beside dynas.
_FOLDER = "search_spaces"

_S = TypeVar("_S", bound=type[SearchSpace])
_REGISTRY: dict[str, type[SearchSpace]] = {}


def register_space(space: _S) -> _S:
    """Register a :class:`SearchSpace` subclass under its ``name`` (usable as a class decorator).

    Raises:
        TypeError: ``space`` is not a SearchSpace subclass, or has no string ``name``.
        DynasError: another space is registered under that name.
    """
    if not (isinstance(space, type) and issubclass(space, SearchSpace)):
        raise TypeError(f"`space` must be a SearchSpace subclass, but got space={space!r}.")
    name = getattr(space, "name", None)
    if not isinstance(name, str) or not name:
        raise TypeError(f"`{space.__name__}.name` must be a non-empty string, but got name={name!r}.")
    if name in _REGISTRY:
        raise DynasError(
            f"a search space named {name!r} is already registered ({_REGISTRY[name].__qualname__}); "
            f"choose another `name` for {space.__qualname__}."
        )
    _REGISTRY[name] = space
    return space


def list_spaces() -> list[str]:
    """The registered space names, sorted."""
    _discover_once()
    return sorted(_REGISTRY)


def get_space(name: str, **kwargs: Any) -> SearchSpace:
    """A new instance of the space registered as ``name``; ``kwargs`` go to its constructor.

    Raises:
        DynasError: no space has that name (with a close-match suggestion).
    """
    _discover_once()
    if name not in _REGISTRY:
        raise DynasError(
            f"unknown search space {name!r}.{did_you_mean(name, _REGISTRY)} "
            f"Registered spaces: {', '.join(list_spaces())}."
        )
    return _REGISTRY[name](**kwargs)


_DISCOVERED = False


def _discover_once() -> None:
    if not _DISCOVERED:
        discover_spaces()


def discover_spaces() -> None:
    """Import every public module of the ``search_spaces`` folder and every ``dynas.search_spaces`` entry point.

    Each registers its spaces on import; a module already imported is not imported again. The
    registry calls it on its first lookup; call it again to pick up a file added since.
    """
    global _DISCOVERED
    _DISCOVERED = True
    try:
        package = importlib.import_module(_FOLDER)
    except ModuleNotFoundError:
        package = None
    for info in pkgutil.iter_modules(getattr(package, "__path__", [])):
        if not info.name.startswith("_"):
            importlib.import_module(f"{_FOLDER}.{info.name}")
    for entry in entry_points(group="dynas.search_spaces"):
        entry.load()
