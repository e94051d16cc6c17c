"""``mobile_cifar_ops``: the CIFAR mobile space in which every block picks its operator.

Per block, instead of ``mobile_cifar``'s static-or-dynamic switch, ``s{i}_b{j}_op`` picks one of

* ``static`` -- plain convolutions;
* ``dy`` -- DY-conv in both 1x1 convs, with K from ``s{i}_b{j}_num_kernels`` (2, 4, 6, 8);
* ``od`` -- ODConv in all three convs (as the official OD-MobileNetV2), with K from
  ``s{i}_b{j}_od_num_kernels`` (1, 2, 4: the paper's 1x to 4x);
* ``dcd`` -- DCD in both 1x1 convs (its latent width by the official rule).

Every other label is ``mobile_cifar``'s (width, depths, kernels, expansions, SE; ``tau_start`` and
``anneal_fraction`` asked when some block is ``dy`` or ``od``, the operators with a temperature),
and that space is unchanged, so its studies resume as before. The uniform baselines
(:mod:`dynas.baselines`) are the all-static network and the all-``dy`` one with K = 4.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from dynas.cost import closed_form_macs
from dynas.spec import ArchSpec, BlockSpec
from dynas.spaces import Choice, register_space
from search_spaces.mobile import MobileCifarSpace, StageConfig, _Rule

__all__ = ["MobileCifarOpsSpace"]

#: A block's operator choice -> (BlockSpec.op, dynamic_convs).
_OPS: dict[str, tuple[str, str]] = {"static": ("dy", "pw"), "dy": ("dy", "pw"), "od": ("od", "all"), "dcd": ("dcd", "pw")}


@register_space
class MobileCifarOpsSpace(MobileCifarSpace):
    """``mobile_cifar`` with a per-block operator: static, DY-conv (K), ODConv (K) or DCD."""

    name = "mobile_cifar_ops"
    ops: ClassVar[tuple[str, ...]] = ("static", "dy", "od", "dcd")
    od_num_kernels: ClassVar[tuple[int, ...]] = (1, 2, 4)

    def _op_rule(self, stage: int, block: int, ops: tuple[str, ...]) -> _Rule:
        """The block exists and its operator is one of ``ops``."""
        exists = self._block_rule(stage, block)
        label = f"s{stage}_b{block}_op"
        return lambda params: exists(params) and params.get(label) in ops

    def _build_choices(self) -> None:
        always: _Rule = lambda params: True  # noqa: E731
        self._add("width", self.widths, (), always)
        tempered: list[_Rule] = []  # blocks whose operator has a temperature
        dependencies: list[str] = []
        for i, config in enumerate(self.stages, start=1):
            if len(config.depths) > 1:
                self._add(f"s{i}_depth", config.depths, (), always)
            for j in range(1, max(config.depths) + 1):
                deps = (f"s{i}_depth",) if j > min(config.depths) else ()
                exists = self._block_rule(i, j)
                prefix = f"s{i}_b{j}_"
                self._add(prefix + "kernel", self.kernel_sizes, deps, exists)
                if len(config.expansions) > 1:
                    self._add(prefix + "expansion", config.expansions, deps, exists)
                self._add(prefix + "se", (False, True), deps, exists)
                self._add(prefix + "op", self.ops, deps, exists)
                op_deps = (*deps, prefix + "op")
                self._add(prefix + "num_kernels", self.num_kernels, op_deps, self._op_rule(i, j, ("dy",)))
                self._add(prefix + "od_num_kernels", self.od_num_kernels, op_deps, self._op_rule(i, j, ("od",)))
                tempered.append(self._op_rule(i, j, ("dy", "od")))
                dependencies += [*deps, prefix + "op"]
        any_tempered: _Rule = lambda params: any(rule(params) for rule in tempered)  # noqa: E731
        deps = tuple(dict.fromkeys(dependencies))
        self._add("tau_start", self.tau_starts, deps, any_tempered)
        self._add("anneal_fraction", self.anneal_fractions, deps, any_tempered)

    @staticmethod
    def _block(params: Mapping[str, Any], i: int, j: int, config: StageConfig, out_channels: int) -> BlockSpec:
        prefix = f"s{i}_b{j}_"
        choice = params[prefix + "op"]
        op, convs = _OPS[choice]
        k = {"dy": params.get(prefix + "num_kernels"), "od": params.get(prefix + "od_num_kernels")}.get(choice) or 1
        return BlockSpec(
            kernel_size=params[prefix + "kernel"],
            expansion=params.get(prefix + "expansion", config.expansions[0]),
            out_channels=out_channels,
            stride=config.stride if j == 1 else 1,
            se=params[prefix + "se"],
            activation=config.activation,
            num_kernels=k,
            dynamic_convs=convs,
            op=op,
        )

    def smallest(self) -> ArchSpec:
        """Every block static, every other choice at its smallest (the operator labels are not ordered)."""
        return self.make_candidate(self._walk(lambda c, _: "static" if c.label.endswith("_op") else min(c.values))).arch

    def largest(self) -> ArchSpec:
        """Every choice at its largest and each block's operator the costliest there.

        Which operator costs most depends on the block (DCD's cost grows with the map, DY-conv's
        and ODConv's with the kernel), and a block's cost does not depend on the others'
        operators, so each block's operator is picked on its own by the closed form.
        """
        params = self._walk(lambda c, _: "dy" if c.label.endswith("_op") else max(c.values))
        for choice in self.choices():
            if choice.label.endswith("_op") and choice.label in params:
                cost = lambda op: closed_form_macs(self._largest_with(params, choice, op))  # noqa: E731
                params[choice.label] = max(self.ops, key=cost)
        return self._largest_with(params, None, None)

    def _largest_with(self, params: dict[str, Any], choice: Choice | None, op: str | None) -> ArchSpec:
        """The arch of ``params`` with ``choice`` set to ``op`` (its K choices at their largest)."""
        trial = dict(params) if choice is None else {**params, choice.label: op}
        return self.make_candidate(self._walk(lambda c, _: trial[c.label] if c.label in trial else max(c.values))).arch
