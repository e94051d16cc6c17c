"""Mobile (inverted-residual) spaces in which every block picks static or dynamic convolution.

Per block: kernel size, expansion, squeeze-excite, static vs dynamic and, when dynamic, the
number of kernels K. Per stage: depth (blocks beyond the chosen depth are inactive). Globally: a
width multiplier, and -- asked only when some block is dynamic -- the temperature schedule of
the dynamic layers (``tau_start``, ``anneal_fraction``). Labels::

    width, s{i}_depth, s{i}_b{j}_kernel, s{i}_b{j}_expansion, s{i}_b{j}_se, s{i}_b{j}_dynamic,
    s{i}_b{j}_num_kernels, tau_start, anneal_fraction          (stages and blocks count from 1)

The width multiplier is applied here, once: a spec holds actual channel counts
(``make_divisible(channels * width, 8)``, head included).

Registered spaces:

* ``mobile_cifar`` -- 32x32 inputs, 10 classes by default; a stem at stride 1 and five stages
  ending at 2x2. It spans 1.85M MACs (smallest) to 39.7M MACs (largest) at 32x32, so MAC
  budgets of 5M, 10M and 20M each cut through it.
* ``mobile_imagenet`` -- 224x224, 1000 classes; MobileNetV2's stages (first and last fixed at
  one block, as in the paper), with searchable depth 2..4 elsewhere.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from dynas.spec import ArchSpec, BlockSpec, StageSpec, make_divisible
from dynas.spaces import Candidate, Choice, SearchSpace, register_space

__all__ = ["MobileCifarSpace", "MobileImageNetSpace", "MobileSpace", "StageConfig"]

_Rule = Callable[[Mapping[str, Any]], bool]


@dataclass(frozen=True)
class StageConfig:
    """One stage of a mobile space, at width 1.0."""

    channels: int  # output channels before the width multiplier
    stride: int  # of the stage's first block
    depths: tuple[int, ...]  # allowed numbers of blocks; a single value is fixed, not searched
    expansions: tuple[float, ...] = (3.0, 4.0, 6.0)  # a single value is fixed, not searched
    activation: str = "relu6"


class MobileSpace(SearchSpace):
    """A mobile space; subclasses set ``name``, the stem, the stages and the head.

    Args:
        input_size: square input resolution written into every spec.
        num_classes: classifier width.
        in_channels: image channels (1 for grayscale data).
    """

    stem_channels: ClassVar[int]
    stem_stride: ClassVar[int]
    stages: ClassVar[tuple[StageConfig, ...]]
    head_channels: ClassVar[int]
    default_input_size: ClassVar[int]
    default_num_classes: ClassVar[int]

    widths: ClassVar[tuple[float, ...]] = (0.5, 0.75, 1.0)
    kernel_sizes: ClassVar[tuple[int, ...]] = (3, 5, 7)
    num_kernels: ClassVar[tuple[int, ...]] = (2, 4, 6, 8)
    tau_starts: ClassVar[tuple[float, ...]] = (10.0, 30.0, 50.0)
    anneal_fractions: ClassVar[tuple[float, ...]] = (0.25, 0.5, 1.0)
    default_tau_start: ClassVar[float] = 30.0  # used when no block is dynamic
    default_anneal_fraction: ClassVar[float] = 0.5

    def __init__(self, input_size: int | None = None, num_classes: int | None = None, in_channels: int = 3) -> None:
        self.input_size = self.default_input_size if input_size is None else input_size
        self.num_classes = self.default_num_classes if num_classes is None else num_classes
        self.in_channels = in_channels
        for key in ("input_size", "num_classes", "in_channels"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"`{key}` must be an integer >= 1, but got {key}={value!r}.")
        self._choices: list[Choice] = []
        self._rules: dict[str, _Rule] = {}
        self._build_choices()

    # ------------------------------------------------------------------ choices and activity

    def _add(self, label: str, values: tuple[Any, ...], depends_on: tuple[str, ...], rule: _Rule) -> None:
        self._choices.append(Choice(label, values, depends_on))
        self._rules[label] = rule

    def _block_rule(self, stage: int, block: int) -> _Rule:
        """Block ``block`` of stage ``stage`` exists when the stage's depth reaches it."""
        config = self.stages[stage - 1]
        if block <= min(config.depths):
            return lambda params: True
        depth_label = f"s{stage}_depth"
        return lambda params: _is_int(params.get(depth_label)) and params[depth_label] >= block

    def _dynamic_rule(self, stage: int, block: int) -> _Rule:
        exists = self._block_rule(stage, block)
        label = f"s{stage}_b{block}_dynamic"
        return lambda params: exists(params) and params.get(label) is True

    def _build_choices(self) -> None:
        always: _Rule = lambda params: True  # noqa: E731
        self._add("width", self.widths, (), always)
        dynamic_rules: list[_Rule] = []
        dependencies: list[str] = []
        for i, config in enumerate(self.stages, start=1):
            if len(config.depths) > 1:
                self._add(f"s{i}_depth", config.depths, (), always)
            for j in range(1, max(config.depths) + 1):
                deps = (f"s{i}_depth",) if j > min(config.depths) else ()
                exists = self._block_rule(i, j)
                self._add(f"s{i}_b{j}_kernel", self.kernel_sizes, deps, exists)
                if len(config.expansions) > 1:
                    self._add(f"s{i}_b{j}_expansion", config.expansions, deps, exists)
                self._add(f"s{i}_b{j}_se", (False, True), deps, exists)
                self._add(f"s{i}_b{j}_dynamic", (False, True), deps, exists)
                dyn = f"s{i}_b{j}_dynamic"
                self._add(f"s{i}_b{j}_num_kernels", self.num_kernels, (*deps, dyn), self._dynamic_rule(i, j))
                dynamic_rules.append(self._dynamic_rule(i, j))
                dependencies += [*deps, dyn]
        any_dynamic: _Rule = lambda params: any(rule(params) for rule in dynamic_rules)  # noqa: E731
        deps = tuple(dict.fromkeys(dependencies))
        self._add("tau_start", self.tau_starts, deps, any_dynamic)
        self._add("anneal_fraction", self.anneal_fractions, deps, any_dynamic)

    def choices(self) -> list[Choice]:
        """All choices in asking order (see the module docstring for the labels)."""
        return list(self._choices)

    def is_active(self, choice: Choice, params: Mapping[str, Any]) -> bool:
        """Blocks beyond their stage's depth are inactive; K and tau only when a block is dynamic."""
        return self._rules[choice.label](params)

    def largest_static(self) -> ArchSpec:
        """The largest architecture with every block static (``*_dynamic`` off / ``*_op`` static).

        The widest, deepest static network of the space: what a supernet trains besides
        :meth:`largest` so that its static kernels learn at full size every step.
        """

        def value_of(choice: Choice, _: dict[str, Any]) -> Any:
            return _static_value(choice.label, max(choice.values))

        return self.make_candidate(self._walk(value_of)).arch

    def static_of(self, params: Mapping[str, Any]) -> ArchSpec:
        """The architecture of ``params`` with every block static (its static twin).

        Every other choice keeps its value; what a supernet trains besides a random subnet
        (``SupernetTrainConfig(static_twins=True)``) and what a ranking compares a mixed subnet with.
        """
        return self.decode({label: _static_value(label, value) for label, value in params.items()}).arch

    # ------------------------------------------------------------------ decoding

    def make_candidate(self, params: Mapping[str, Any]) -> Candidate:
        """Build the spec of ``params`` (only active labels; fixed dimensions take their value)."""
        width = params["width"]
        stages = []
        for i, config in enumerate(self.stages, start=1):
            depth = params.get(f"s{i}_depth", config.depths[0])
            out = make_divisible(config.channels * width, 8)
            blocks = [self._block(params, i, j, config, out) for j in range(1, depth + 1)]
            stages.append(StageSpec(tuple(blocks)))
        arch = ArchSpec(
            stem_channels=make_divisible(self.stem_channels * width, 8),
            stem_stride=self.stem_stride,
            stem_activation="relu6",
            stages=tuple(stages),
            head_channels=make_divisible(self.head_channels * width, 8),
            head_activation=self.stages[-1].activation,
            num_classes=self.num_classes,
            input_size=self.input_size,
            in_channels=self.in_channels,
            dropout=0.2,
        )
        tau = params.get("tau_start", self.default_tau_start)
        fraction = params.get("anneal_fraction", self.default_anneal_fraction)
        return Candidate(arch, float(tau), float(fraction), params)

    @staticmethod
    def _block(params: Mapping[str, Any], i: int, j: int, config: StageConfig, out_channels: int) -> BlockSpec:
        prefix = f"s{i}_b{j}_"
        dynamic = params[prefix + "dynamic"]
        return BlockSpec(
            kernel_size=params[prefix + "kernel"],
            expansion=params.get(prefix + "expansion", config.expansions[0]),
            out_channels=out_channels,
            stride=config.stride if j == 1 else 1,
            se=params[prefix + "se"],
            activation=config.activation,
            num_kernels=params[prefix + "num_kernels"] if dynamic else 1,
            dynamic_convs="pw",
        )


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@register_space
class MobileCifarSpace(MobileSpace):
    """CIFAR-style: 32x32, stem at stride 1, five stages down to 2x2 (1.85M-39.7M MACs)."""

    name = "mobile_cifar"
    default_input_size = 32
    default_num_classes = 10
    stem_channels = 16
    stem_stride = 1
    stages = (
        StageConfig(16, 2, (1, 2)),  # 16x16
        StageConfig(24, 1, (1, 2, 3)),
        StageConfig(40, 2, (2, 3, 4)),  # 8x8
        StageConfig(80, 2, (2, 3, 4), activation="hswish"),  # 4x4
        StageConfig(160, 2, (1, 2), activation="hswish"),  # 2x2
    )
    head_channels = 640


@register_space
class MobileImageNetSpace(MobileSpace):
    """ImageNet: 224x224, MobileNetV2's stages with searchable depth, kernels, expansions, K."""

    name = "mobile_imagenet"
    default_input_size = 224
    default_num_classes = 1000
    stem_channels = 32
    stem_stride = 2
    stages = (
        StageConfig(16, 1, (1,), expansions=(1.0,)),  # 112x112
        StageConfig(24, 2, (2, 3, 4)),  # 56x56
        StageConfig(32, 2, (2, 3, 4)),  # 28x28
        StageConfig(64, 2, (2, 3, 4)),  # 14x14
        StageConfig(96, 1, (2, 3, 4)),
        StageConfig(160, 2, (2, 3, 4)),  # 7x7
        StageConfig(320, 1, (1,)),
    )
    head_channels = 1280


def _static_value(label: str, value: Any) -> Any:
    """``value`` of choice ``label`` in a static block: ``*_dynamic`` off, ``*_op`` static, the rest as is."""
    if label.endswith("_dynamic"):
        return False
    if label.endswith("_op"):
        return "static"
    return value
