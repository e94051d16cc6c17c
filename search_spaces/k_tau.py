"""Tune K and the temperature schedule of dynamic convolution on one fixed architecture.

The paper's own ablations vary K (the number of kernels), which convs are dynamic, and the
temperature schedule with the architecture held fixed. This space does exactly that: every
block (and the head 1x1) of a fixed backbone gets the same K, K = 1 meaning static.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from dynas.presets import cifar_variant, mobilenet_v2
from dynas.spec import ArchSpec
from dynas.spaces import Candidate, Choice, SearchSpace, register_space

__all__ = ["KTauSpace"]

_DYNAMIC_ONLY = ("dynamic_convs", "tau_start", "anneal_fraction")


@register_space
class KTauSpace(SearchSpace):
    """K, dynamic convs and tau schedule of MobileNetV2 (CIFAR variant below 64 px) at ``width``."""

    name = "k_tau"

    def __init__(
        self, input_size: int | None = None, num_classes: int | None = None, width: float = 0.5, in_channels: int = 3
    ) -> None:
        input_size = 32 if input_size is None else input_size
        num_classes = 10 if num_classes is None else num_classes
        base = mobilenet_v2(width, num_classes=num_classes, input_size=input_size)
        base = cifar_variant(base, num_classes, input_size) if input_size <= 64 else base
        self.base = dataclasses.replace(base, in_channels=in_channels)

    def choices(self) -> list[Choice]:
        return [
            Choice("num_kernels", (1, 2, 4, 6, 8)),
            Choice("dynamic_convs", ("pw", "all"), depends_on=("num_kernels",)),
            Choice("tau_start", (1.0, 10.0, 30.0, 50.0), depends_on=("num_kernels",)),
            Choice("anneal_fraction", (0.1, 0.25, 0.5, 1.0), depends_on=("num_kernels",)),
        ]

    def is_active(self, choice: Choice, params: Mapping[str, Any]) -> bool:
        if choice.label in _DYNAMIC_ONLY:
            return params.get("num_kernels", 1) > 1
        return True

    def smallest(self) -> ArchSpec:
        return self.make_candidate({"num_kernels": 1}).arch  # the static backbone

    def largest(self) -> ArchSpec:
        # "all" (depthwise too) costs more than "pw", which max() of the strings would not pick.
        params = {"num_kernels": 8, "dynamic_convs": "all", "tau_start": 1.0, "anneal_fraction": 0.1}
        return self.make_candidate(params).arch

    def make_candidate(self, params: Mapping[str, Any]) -> Candidate:
        k = params["num_kernels"]
        convs = params.get("dynamic_convs", "pw")
        stages = tuple(
            dataclasses.replace(
                stage, blocks=tuple(dataclasses.replace(b, num_kernels=k, dynamic_convs=convs) for b in stage.blocks)
            )
            for stage in self.base.stages
        )
        arch: ArchSpec = dataclasses.replace(self.base, stages=stages, head_num_kernels=k)
        return Candidate(
            arch,
            tau_start=params.get("tau_start", 30.0),
            anneal_fraction=params.get("anneal_fraction", 0.5),
            params=params,
        )
