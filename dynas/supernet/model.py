"""A weight-sharing supernet of a mobile search space, in which K = 1 is the static conv.

One network holds the weights of the space's largest choices; every architecture the space can
produce runs as a slice of it (see :mod:`dynas.supernet.elastic`):

* ``width`` -- the global multiplier -- selects channel prefixes everywhere (stem, blocks, head);
* ``s{i}_depth`` runs the first d blocks of stage i;
* ``s{i}_b{j}_kernel`` crops the centre of the largest depthwise kernel;
* ``s{i}_b{j}_expansion`` selects a prefix of the expanded channels (expansion 1: no expand conv);
* ``s{i}_b{j}_se`` switches squeeze-excite on, with a prefix of its squeeze channels;
* ``s{i}_b{j}_dynamic`` / ``s{i}_b{j}_num_kernels``: K kernels ``[:K]`` and their attention
  logits; a static block (K = 1) uses kernel 0 and no attention;
* ``s{i}_b{j}_op`` (``mobile_cifar_ops``) with ``s{i}_b{j}_num_kernels`` / ``_od_num_kernels``:
  DY-conv or ODConv over the same kernels ``[:K]`` (each with its own attention), or DCD, whose
  ``W0`` is kernel 0; ``static`` is kernel 0 alone.

``tau_start`` and ``anneal_fraction`` are training settings, not architecture: the supernet
anneals tau on its own schedule (:func:`~dynas.supernet.train_supernet`) and scoring ignores them.

Module names follow :mod:`dynas.builder` (``stem``, ``stages.{i}.{j}.expand/depthwise/se/project``,
``head.conv/classifier``), and :meth:`Supernet.extract` fills the very network
:func:`dynas.build_model` builds for an arch with the subnet's weights and BN statistics.
"""

from __future__ import annotations

import dataclasses
import os
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from dynas.builder import DynasNet, build_model, create_act
from dynas.checks import check_name
from dynas.data import DataBundle
from dynas.errors import DynasError, did_you_mean
from dynas.spec import ArchSpec, BlockSpec, dcd_latent_channels, expanded_channels, se_channels
from dynas.supernet.elastic import KERNEL_BANKS, ElasticBatchNorm2d, ElasticConv2d, ElasticLinear, ElasticSqueezeExcite

if TYPE_CHECKING:
    from search_spaces.mobile import MobileSpace

__all__ = ["FILE_FORMAT", "Supernet", "load_supernet", "read_supernet_file"]

#: The ``format`` entry of a file written by :meth:`Supernet.save`.
FILE_FORMAT = "dynas-supernet"
_FILE_VERSION = 1
_FILE_KEYS = ("space", "input_size", "num_classes", "temperature", "progress", "state_dict")
#: Labels of a mobile space that set training, not the architecture.
_TRAINING_LABELS = ("tau_start", "anneal_fraction")


# ----------------------------------------------------------------------------- block dimensions


@dataclass(frozen=True)
class _BlockDims:
    """The sizes of one inverted residual, as :class:`dynas.builder.InvertedResidual` builds it.

    One block has one operator: DY-conv (``pw_kernels`` / ``dw_kernels``; 1 = static), ODConv
    (``od_kernels`` in the 1x1 convs, ``od_dw_kernels`` in the depthwise one) or DCD (the 1x1
    convs' latent widths). The union of several (:meth:`union`) holds every operator any of
    them has, each at its largest K / L, and every pool a DCD attention meets.
    """

    in_channels: int
    mid_channels: int
    out_channels: int
    kernel_size: int
    stride: int
    activation: str
    expand: bool  # has an expand 1x1 conv (expansion != 1)
    se: bool
    squeeze_channels: int
    pw_kernels: int  # K of the DY-conv 1x1 convs (1: static)
    dw_kernels: int  # K of the DY-conv depthwise conv
    od_kernels: int = 0  # K of the ODConv 1x1 convs (0: not ODConv)
    od_dw_kernels: int = 0  # K of the ODConv depthwise conv (0: not ODConv)
    expand_latent: int = 0  # DCD's L of the expand conv (0: not DCD)
    project_latent: int = 0
    expand_pools: frozenset[bool] = frozenset()  # DCD attention pools met: True = 2x2 (widening)
    project_pools: frozenset[bool] = frozenset()

    @classmethod
    def of(cls, in_channels: int, block: BlockSpec) -> _BlockDims:
        mid = expanded_channels(in_channels, block.expansion)
        op = block.op if block.is_dynamic else "dy"
        k, every_conv = block.num_kernels, block.dynamic_convs == "all"
        ops: dict[str, Any] = {"pw_kernels": 1, "dw_kernels": 1}
        if op == "dy":
            ops.update(pw_kernels=k, dw_kernels=k if every_conv else 1)
        elif op == "od":
            ops.update(od_kernels=k, od_dw_kernels=k if every_conv else 0)
        else:  # dcd, in the 1x1 convs
            ops.update(
                expand_latent=block.latent or dcd_latent_channels(in_channels, mid) if block.expansion != 1 else 0,
                project_latent=block.latent or dcd_latent_channels(mid, block.out_channels),
                expand_pools=frozenset({in_channels < mid}) if block.expansion != 1 else frozenset(),
                project_pools=frozenset({mid < block.out_channels}),
            )
        return cls(
            in_channels=in_channels,
            mid_channels=mid,
            out_channels=block.out_channels,
            kernel_size=block.kernel_size,
            stride=block.stride,
            activation=block.activation,
            expand=block.expansion != 1,
            se=block.se,
            squeeze_channels=se_channels(mid),
            **ops,
        )

    @property
    def op(self) -> str:
        """The operator of an active block's dynamic convs: ``"od"``, ``"dcd"`` or ``"dy"``."""
        return "od" if self.od_kernels else "dcd" if self.project_latent else "dy"

    @property
    def residual(self) -> bool:
        return self.stride == 1 and self.in_channels == self.out_channels

    def union(self, other: _BlockDims) -> _BlockDims:
        """The smallest dims holding both (sizes: max; parts and pools: either); stride and activation must agree."""
        if (self.stride, self.activation) != (other.stride, other.activation):
            raise DynasError(
                "a supernet needs each block position to keep its stride and activation across the space, "
                f"but got stride/activation {self.stride}/{self.activation} and {other.stride}/{other.activation}."
            )
        either = ("expand", "se", "expand_pools", "project_pools")
        sizes = {
            f.name: max(getattr(self, f.name), getattr(other, f.name))
            for f in dataclasses.fields(self)
            if f.name not in ("stride", "activation", *either)
        }
        parts = {name: getattr(self, name) | getattr(other, name) for name in either}
        return dataclasses.replace(self, **parts, **sizes)


def _arch_dims(arch: ArchSpec) -> list[list[_BlockDims]]:
    """Per stage, per block: the dims of ``arch``'s inverted residuals."""
    dims, channels = [], arch.stem_channels
    for stage in arch.stages:
        dims.append([])
        for block in stage.blocks:
            dims[-1].append(_BlockDims.of(channels, block))
            channels = block.out_channels
    return dims


def _reference_archs(space: MobileSpace) -> list[tuple[Any, ArchSpec]]:
    """(width, arch) pairs whose archs together reach every layer's largest size.

    Every choice at its largest, except ``width`` (each value), the expansions (the t-th value
    of every block together) and a per-block operator (``*_op``, each value in every block
    together): a block's expanded width depends on both its input width and its expansion, and
    not every pair is reached by the largest arch alone; each operator brings its own parts.
    """
    choices = space.choices()
    expansions = [c for c in choices if c.label.endswith("_expansion")]
    operators = [c for c in choices if c.label.endswith("_op")]
    rounds = max((len(c.values) for c in expansions), default=1)
    ops = operators[0].values if operators else (None,)
    (width,) = [c for c in choices if c.label == "width"]
    archs = []
    for w in width.values:
        for t in range(rounds):
            for op in ops:
                params = {c.label: max(c.values) for c in choices if c not in operators}
                params["width"] = w
                params.update({c.label: c.values[min(t, len(c.values) - 1)] for c in expansions})
                params.update({c.label: op for c in operators})
                archs.append((w, space.decode(params).arch))
    return archs


# ----------------------------------------------------------------------------- modules


class _ConvBnAct(nn.Sequential):
    """conv -> BatchNorm -> activation, with the builder's keys (``conv``, ``bn``, ``act``)."""

    def __init__(self, conv: ElasticConv2d, act: str | None) -> None:
        layers = OrderedDict(conv=conv, bn=ElasticBatchNorm2d(conv.out_channels))
        if act is not None:
            layers["act"] = create_act(act)
        super().__init__(layers)


class _ElasticBlock(nn.Module):
    """An inverted residual of the largest dims; runs whichever dims are active."""

    def __init__(
        self, dims: _BlockDims, reduction: int, min_hidden: int, dcd_reduction: int = 16, bank: str = "independent"
    ) -> None:
        super().__init__()
        attn = {"reduction": reduction, "min_hidden": min_hidden, "dcd_reduction": dcd_reduction, "bank": bank}
        cin, mid = dims.in_channels, dims.mid_channels
        pw = {"num_kernels": dims.pw_kernels, "od_kernels": dims.od_kernels, **attn}
        if dims.expand:
            conv = ElasticConv2d(cin, mid, 1, dcd_latent=dims.expand_latent, dcd_pools=dims.expand_pools, **pw)
            self.expand = _ConvBnAct(conv, dims.activation)
        conv = ElasticConv2d(
            mid,
            mid,
            dims.kernel_size,
            dims.stride,
            depthwise=True,
            num_kernels=dims.dw_kernels,
            od_kernels=dims.od_dw_kernels,
            **attn,
        )
        self.depthwise = _ConvBnAct(conv, dims.activation)
        if dims.se:
            self.se = ElasticSqueezeExcite(mid, dims.squeeze_channels)
        conv = ElasticConv2d(mid, dims.out_channels, 1, dcd_latent=dims.project_latent, dcd_pools=dims.project_pools, **pw)
        self.project = _ConvBnAct(conv, None)
        self.active = dims

    def set_active(self, dims: _BlockDims) -> None:
        op = dims.op
        pw_k = {"od": dims.od_kernels, "dcd": 1}.get(op, dims.pw_kernels)
        if dims.expand:
            self.expand.conv.set_active(dims.mid_channels, 1, pw_k, op, dims.expand_latent)
        if dims.od_dw_kernels:
            self.depthwise.conv.set_active(dims.mid_channels, dims.kernel_size, dims.od_dw_kernels, "od")
        else:
            self.depthwise.conv.set_active(dims.mid_channels, dims.kernel_size, dims.dw_kernels)
        if dims.se:
            self.se.set_active(dims.squeeze_channels)
        self.project.conv.set_active(dims.out_channels, 1, pw_k, op, dims.project_latent)
        self.active = dims

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dims = self.active
        out = self.expand(x) if dims.expand else x  # (B, mid, H, W)
        out = self.depthwise(out)  # (B, mid, H/s, W/s)
        if dims.se:
            out = self.se(out)
        out = self.project(out)  # (B, out, H/s, W/s)
        return x + out if dims.residual else out


class _ElasticHead(nn.Module):
    """1x1 conv + BN + act -> global average pool -> dropout -> Linear (the builder's head)."""

    def __init__(self, conv: ElasticConv2d, act: str, dropout: float, num_classes: int) -> None:
        super().__init__()
        self.conv = _ConvBnAct(conv, act)
        self.dropout = nn.Dropout(dropout)
        self.classifier = ElasticLinear(conv.out_channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)  # (B, head_channels, H, W)
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)  # (B, head_channels)
        return self.classifier(self.dropout(x))  # (B, num_classes)


class Supernet(nn.Module):
    """All architectures of a mobile search space in one weight-sharing network.

    Args:
        space: a :class:`search_spaces.mobile.MobileSpace` instance (``mobile_cifar``,
            ``mobile_imagenet``, ...); its ``input_size`` and ``num_classes`` are the supernet's.
        kernel_bank: how a dynamic layer holds its K kernels. ``"residual"`` (default): kernel 0
            is the static conv and kernels ``1..`` are offsets from it (kernel k = W0 + D_k), so
            every mixture is centred on the static kernel
            (:class:`~dynas.supernet.elastic.ElasticConv2d`'s ``bank``). ``"independent"``:
            K kernels of their own, kernel 0 the static conv (supernets before this choice).
            ``"separate"``: a static kernel apart from K independent dynamic kernels, so that a
            dynamic choice trains from kernels of its own, as it does stand-alone. Every way a
            subnet extracts to the same plain modules.
        zero_init_residual: start every block that is always residual (a stage's second block
            on) with its last BatchNorm's scale at 0, so that the block starts as the identity
            (BigNAS's initialisation for a single-stage supernet). Together with the residual
            bank it took CIFAR-10 ranking from Kendall tau 0.24 to 0.46 (README).

    Attributes:
        space: the space.
        progress: training progress (epochs done, per-epoch history), set by
            :func:`~dynas.supernet.train_supernet` and kept by :meth:`save`.

    A new supernet runs the space's largest architecture until :meth:`activate` selects another.
    Its dynamic layers share one temperature, :attr:`temperature` (30 until training sets it).
    """

    def __init__(self, space: MobileSpace, *, kernel_bank: str = "residual", zero_init_residual: bool = True) -> None:
        from search_spaces.mobile import MobileSpace

        if not isinstance(space, MobileSpace):
            raise TypeError(f"`space` must be a MobileSpace instance, but got {type(space).__name__}: {space!r}.")
        check_name("kernel_bank", str(kernel_bank), KERNEL_BANKS)
        super().__init__()
        self.space = space
        self.kernel_bank = kernel_bank
        pairs = _reference_archs(space)
        refs = [arch for _, arch in pairs]
        largest = space.largest()
        self._largest, self._smallest = largest, space.smallest()
        self._largest_static = space.largest_static()
        # Widths by the channels they give; two widths giving the same channels are one subnet.
        self._width_of = {_channels(arch): w for w, arch in reversed(pairs)}
        dims = _arch_dims(refs[0])
        for arch in refs[1:]:
            dims = [[a.union(b) for a, b in zip(sa, sb)] for sa, sb in zip(dims, _arch_dims(arch))]
        if largest.head_op != "dy":
            raise DynasError(
                f"a supernet's head conv must be static or DY-conv, but space {space.name!r} has head_op="
                f"{largest.head_op!r}."
            )
        attn = {"reduction": largest.attention_reduction, "min_hidden": largest.attention_min_hidden}
        stem = max(a.stem_channels for a in refs)
        stem_conv = ElasticConv2d(largest.in_channels, stem, 3, largest.stem_stride)
        self.stem = _ConvBnAct(stem_conv, largest.stem_activation)
        attn["bank"] = kernel_bank
        blocks = {**attn, "dcd_reduction": largest.dcd_reduction}
        self.stages = nn.ModuleList(nn.ModuleList(_ElasticBlock(d, **blocks) for d in stage) for stage in dims)
        head_conv = ElasticConv2d(
            dims[-1][-1].out_channels,
            max(a.head_channels for a in refs),
            1,
            num_kernels=largest.head_num_kernels,
            **attn,
        )
        self.head = _ElasticHead(head_conv, largest.head_activation, largest.dropout, largest.num_classes)
        self._init_weights(zero_init_residual)
        self.progress: dict[str, Any] = {}
        self.temperature = 30.0
        self._active = largest
        self._depths = [len(s.blocks) for s in largest.stages]
        self._set_active(largest)

    def _init_weights(self, zero_init_residual: bool) -> None:
        """As :func:`dynas.builder.init_weights`: the convs init themselves; SE and classifier here."""
        if zero_init_residual:
            for stage in self.stages:
                for block in stage[1:]:
                    nn.init.zeros_(block.project.bn.weight)
        for module in self.modules():
            if isinstance(module, ElasticSqueezeExcite):
                for conv in (module.fc1, module.fc2):
                    nn.init.kaiming_normal_(conv.weight, mode="fan_out")
                    nn.init.zeros_(conv.bias)
        nn.init.normal_(self.head.classifier.weight, 0.0, 0.01)
        nn.init.zeros_(self.head.classifier.bias)

    # ------------------------------------------------------------------ temperature

    @property
    def temperature(self) -> float:
        """The softmax temperature tau of every dynamic layer (> 0)."""
        return self._temperature

    @temperature.setter
    def temperature(self, value: float) -> None:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0 < value < float("inf")):
            raise ValueError(f"`temperature` must be a finite number > 0, but got temperature={value!r}.")
        self._temperature = float(value)
        for module in self.modules():
            if isinstance(module, ElasticConv2d):
                module.temperature = self._temperature

    # ------------------------------------------------------------------ which subnet runs

    @property
    def active_arch(self) -> ArchSpec:
        """The architecture the next forward runs."""
        return self._active

    @property
    def largest(self) -> ArchSpec:
        """The space's largest architecture (every choice at its largest value)."""
        return self._largest

    @property
    def largest_static(self) -> ArchSpec:
        """The space's largest architecture with every block static (K = 1 everywhere)."""
        return self._largest_static

    @property
    def smallest(self) -> ArchSpec:
        """The space's smallest architecture (every choice at its smallest value; all static)."""
        return self._smallest

    def resolve(self, arch: ArchSpec | Mapping[str, Any] | str | Any) -> ArchSpec:
        """The :class:`ArchSpec` of ``arch``, checked to be an architecture of this supernet.

        Args:
            arch: an ``ArchSpec``, its one-line string, a search-space ``Candidate`` or the
                space's flat params dict (``tau_start`` / ``anneal_fraction`` may be left out:
                they are training settings and do not change the subnet).

        Raises:
            DynasError: ``arch`` is not one the space produces (naming the choice and its
                allowed values, or the field that differs).
        """
        if isinstance(arch, Mapping):
            return self._decode(arch, "params")
        if isinstance(arch, str):
            arch = ArchSpec.from_str(arch)
        if isinstance(getattr(arch, "arch", None), ArchSpec):  # a Candidate
            arch = arch.arch
        if not isinstance(arch, ArchSpec):
            raise TypeError(
                f"`arch` must be an ArchSpec, an arch string or a params dict, but got {type(arch).__name__}."
            )
        what = f"arch {arch.to_str()!r}"
        if len(arch.stages) != len(self.stages):
            raise DynasError(
                f"{what} is not a subnet of the {self.space.name!r} supernet: it must have "
                f"{len(self.stages)} stages, but got {len(arch.stages)}."
            )
        decoded = self._decode(self._params_of(arch, what), what)
        difference = _first_difference(arch, decoded)
        if difference:
            raise DynasError(f"{what} is not a subnet of the {self.space.name!r} supernet: {difference}.")
        return arch

    def _decode(self, params: Mapping[str, Any], what: str) -> ArchSpec:
        labels = {c.label: c for c in self.space.choices()}
        filled = dict(params)
        for label in _TRAINING_LABELS:
            if label in labels:
                filled.setdefault(label, labels[label].values[0])
        try:
            return self.space.decode(filled).arch
        except DynasError as err:
            raise DynasError(f"{what} is not a subnet of the {self.space.name!r} supernet: {err}") from None

    def _params_of(self, arch: ArchSpec, what: str) -> dict[str, Any]:
        """The space's params that should decode to ``arch`` (checked by the caller)."""
        labels = {c.label: c for c in self.space.choices()}
        width = self._width_of.get(_channels(arch))
        if width is None:
            raise DynasError(
                f"{what} is not a subnet of the {self.space.name!r} supernet: its channels "
                f"(stem, stages, head) {_channels(arch)} match no `width` of {labels['width'].values}, "
                f"which give {list(self._width_of)}."
            )
        params: dict[str, Any] = {"width": width}
        for i, stage in enumerate(arch.stages, start=1):
            if f"s{i}_depth" in labels:
                params[f"s{i}_depth"] = self._canonical(labels[f"s{i}_depth"], len(stage.blocks), what)
            for j, block in enumerate(stage.blocks, start=1):
                prefix = f"s{i}_b{j}_"
                op = block.op if block.is_dynamic else "static"
                if op not in ("static", "dy") and prefix + "op" not in labels:
                    raise DynasError(
                        f"{what} is not a subnet of the {self.space.name!r} supernet: block s{i}_b{j}'s `op` must be "
                        f"'dy' (its blocks are static or DY-conv; a space with a per-block operator, such as "
                        f"'mobile_cifar_ops', has ODConv and DCD), but got op={block.op!r}."
                    )
                values = {
                    "kernel": block.kernel_size,
                    "expansion": block.expansion,
                    "se": block.se,
                    "dynamic": block.is_dynamic,
                    "op": op,  # a per-block operator (mobile_cifar_ops), with its own K label
                    "num_kernels": block.num_kernels if op == "dy" else None,
                    "od_num_kernels": block.num_kernels if op == "od" else None,
                }
                params.update({prefix + k: v for k, v in values.items() if prefix + k in labels and v is not None})
        return params

    def _canonical(self, choice: Any, value: Any, what: str) -> Any:
        try:
            return choice.canonical(value)
        except DynasError as err:
            raise DynasError(f"{what} is not a subnet of the {self.space.name!r} supernet: {err}") from None

    @contextmanager
    def activate(self, arch: ArchSpec | Mapping[str, Any] | str | Any) -> Iterator[ArchSpec]:
        """Run ``arch`` (see :meth:`resolve`) inside the block; the previous subnet after it.

        >>> with supernet.activate(space.smallest()):  # doctest: +SKIP
        ...     logits = supernet(images)
        """
        spec = self.resolve(arch)
        previous = self._active
        self._set_active(spec)
        try:
            yield spec
        finally:
            self._set_active(previous)

    def _set_active(self, arch: ArchSpec) -> None:
        self.stem.conv.set_active(arch.stem_channels, 3, 1)
        for stage, dims in zip(self.stages, _arch_dims(arch)):
            for block, d in zip(stage, dims):
                block.set_active(d)
        self._depths = [len(s.blocks) for s in arch.stages]
        self.head.conv.conv.set_active(arch.head_channels, 1, arch.head_num_kernels)
        self._active = arch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, in_channels, H, W) -> logits (B, num_classes) of the active subnet
        x = self.stem(x)  # (B, stem_channels, H/s, W/s)
        for stage, depth in zip(self.stages, self._depths):
            for block in stage[:depth]:
                x = block(x)
        return self.head(x)

    # ------------------------------------------------------------------ extraction

    def extract(self, arch: ArchSpec | Mapping[str, Any] | str | Any) -> DynasNet:
        """``build_model(arch)`` with this subnet's weights, BN statistics and temperature.

        In eval mode it computes what the supernet computes with ``arch`` active. It is on the
        supernet's device, in the supernet's train / eval mode; the caller's RNG is left as it was.
        """
        spec = self.resolve(arch)
        with torch.random.fork_rng(devices=[]):  # the fresh init is overwritten: draw nothing visible
            model = build_model(spec)
        model.to(self.stem.conv.weight.device)
        targets = dict(model.named_modules())
        copied: list[str] = []
        with self.activate(spec), torch.no_grad():
            for name, source in self.named_modules():
                if hasattr(source, "copy_active_to") and name in targets:
                    source.copy_active_to(targets[name])
                    copied.append(name)
        missed = [k for k in model.state_dict() if not any(k.startswith(name + ".") for name in copied)]
        if missed:
            raise RuntimeError(f"extracting {spec.to_str()!r} left {missed} of the built model unfilled.")
        return model.train(self.training)

    # ------------------------------------------------------------------ files

    def identity(self) -> dict[str, Any]:
        """What a supernet file must match: space name, input size, class count, kernel bank."""
        return {
            "space": self.space.name,
            "input_size": self.space.input_size,
            "num_classes": self.space.num_classes,
            "kernel_bank": self.kernel_bank,
        }

    def check_identity(self, other: Mapping[str, Any], what: str) -> None:
        """Raise a :class:`DynasError` naming ``what`` unless ``other`` has this supernet's identity."""
        for key, expected in self.identity().items():
            value = _identity_value(other, key)
            if value != expected:
                hint = ""
                if key == "kernel_bank":
                    hint = f"; to go on with it, use --kernel-bank {value} (Supernet(..., kernel_bank={value!r}))"
                raise DynasError(
                    f"{what} is of another supernet: `{key}` must be {expected!r} (as this "
                    f"{self.space.name!r} supernet), but it has {key}={value!r}{hint}."
                )

    def check_data(self, data: DataBundle) -> None:
        """Raise a :class:`DynasError` unless ``data`` has this supernet's classes and image size."""
        expected = {
            "num_classes": self.space.num_classes,
            "input_size": self.space.input_size,
            "in_channels": self._largest.in_channels,
        }
        for key, value in expected.items():
            if getattr(data, key) != value:
                raise DynasError(
                    f"data {data.name!r} does not fit the {self.space.name!r} supernet: `{key}` must be "
                    f"{value}, but the data has {key}={getattr(data, key)}."
                )

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the supernet (identity, temperature, progress, weights) atomically to ``path``."""
        payload = {
            "format": FILE_FORMAT,
            "format_version": _FILE_VERSION,
            **self.identity(),
            "temperature": self.temperature,
            "progress": dict(self.progress),
            "state_dict": {k: v.detach().cpu() for k, v in self.state_dict().items()},
        }
        return atomic_save(payload, path)

    def extra_repr(self) -> str:
        return (
            f"space={self.space.name!r}, input_size={self.space.input_size}, num_classes={self.space.num_classes}, "
            f"kernel_bank={self.kernel_bank!r}"
        )


def _identity_value(payload: Mapping[str, Any], key: str) -> Any:
    """``payload[key]``; files and checkpoints written before kernel banks were a choice are independent."""
    return payload.get(key, "independent" if key == "kernel_bank" else None)


def _channels(arch: ArchSpec) -> tuple[int, tuple[int, ...], int]:
    """(stem, each stage's output, head) channels: what the width multiplier sets."""
    return arch.stem_channels, tuple(s.blocks[0].out_channels for s in arch.stages), arch.head_channels


def _first_difference(got: ArchSpec, expected: ArchSpec) -> str:
    """How ``got`` differs from ``expected`` first (``""`` when equal)."""
    for f in dataclasses.fields(ArchSpec):
        a, b = getattr(got, f.name), getattr(expected, f.name)
        if f.name != "stages" and a != b:
            return f"`{f.name}` must be {b!r}, but got {f.name}={a!r}"
    for i, (sa, sb) in enumerate(zip(got.stages, expected.stages), start=1):
        if len(sa.blocks) != len(sb.blocks):
            return f"stage {i} must have {len(sb.blocks)} block(s), but got {len(sa.blocks)}"
        for j, (ba, bb) in enumerate(zip(sa.blocks, sb.blocks), start=1):
            for f in dataclasses.fields(BlockSpec):
                a, b = getattr(ba, f.name), getattr(bb, f.name)
                if a != b:
                    return f"block s{i}_b{j}'s `{f.name}` must be {b!r}, but got {f.name}={a!r}"
    return ""


# ----------------------------------------------------------------------------- files


def atomic_save(payload: Any, path: str | os.PathLike[str]) -> Path:
    """``torch.save`` to a temporary file beside ``path``, then rename: a crash leaves the old file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)
    return path


def read_torch_file(path: str | os.PathLike[str], what: str, map_location: str | torch.device = "cpu") -> Any:
    """``torch.load(path, weights_only=True)``; an unreadable file is a one-line :class:`DynasError`."""
    path = Path(path)
    if not path.is_file():
        raise DynasError(f"{what} {str(path)!r} does not exist.")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # truncated zip, foreign pickle, not a torch file: all "unreadable"
        reason = (str(err).strip().splitlines() or [""])[0][:200]
        raise DynasError(
            f"{what} {str(path)!r} cannot be read as a torch file (truncated, or not written by torch.save "
            f"of plain tensors): {type(err).__name__}: {reason}"
        ) from None


def read_supernet_file(path: str | os.PathLike[str], map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """The dict :meth:`Supernet.save` wrote, checked for its format and keys."""
    payload = read_torch_file(path, "supernet file", map_location)
    fmt = payload.get("format") if isinstance(payload, dict) else None
    if fmt != FILE_FORMAT:
        kind = f"format={fmt!r}" if isinstance(payload, dict) else f"a {type(payload).__name__}"
        raise DynasError(
            f"supernet file {str(path)!r} is not a dynas supernet: `format` must be {FILE_FORMAT!r}, but it "
            f"holds {kind} (write one with Supernet.save or train_supernet)."
        )
    version = payload.get("format_version")
    if version != _FILE_VERSION:
        raise DynasError(
            f"supernet file {str(path)!r} has format_version={version!r}; "
            f"this dynas reads format_version={_FILE_VERSION}."
        )
    missing = [k for k in _FILE_KEYS if k not in payload]
    if missing:
        raise DynasError(f"supernet file {str(path)!r} is missing the key(s) {', '.join(map(repr, missing))}.")
    return payload


def _space_of(payload: Mapping[str, Any], path: str | os.PathLike[str]) -> MobileSpace:
    """The mobile space named in a supernet file, at its input size and class count."""
    from search_spaces.mobile import MobileSpace

    classes: dict[str, type[MobileSpace]] = {}
    todo = [MobileSpace]
    while todo:
        cls = todo.pop()
        todo += cls.__subclasses__()
        if isinstance(getattr(cls, "name", None), str):
            classes[cls.name] = cls
    name = payload["space"]
    if name not in classes:
        raise DynasError(
            f"supernet file {str(path)!r} is of space {name!r}, which is not a known mobile space "
            f"({', '.join(sorted(classes))}).{did_you_mean(str(name), classes)}"
        )
    return classes[name](input_size=payload["input_size"], num_classes=payload["num_classes"])


def load_supernet(
    path: str | os.PathLike[str], *, space: MobileSpace | None = None, map_location: str | torch.device = "cpu"
) -> Supernet:
    """Read a supernet file written by :meth:`Supernet.save` (in eval mode, at its temperature).

    Args:
        path: the ``.pt`` file.
        space: the space the file must be of (its name, input size and class count); default:
            the one the file names.
        map_location: where the weights go.

    Raises:
        DynasError: a missing, truncated or foreign file, or a supernet of another space /
            input size / class count than ``space``.
    """
    payload = read_supernet_file(path, map_location)
    bank = _identity_value(payload, "kernel_bank")
    if bank not in KERNEL_BANKS:
        raise DynasError(
            f"supernet file {str(path)!r} has kernel_bank={bank!r}; this dynas reads {', '.join(KERNEL_BANKS)}."
        )
    supernet = Supernet(space if space is not None else _space_of(payload, path), kernel_bank=bank)
    supernet.check_identity(payload, f"supernet file {str(path)!r}")
    try:
        supernet.load_state_dict(payload["state_dict"])
    except RuntimeError as err:
        reason = str(err).strip().splitlines()[-1].strip()[:200]
        name = supernet.space.name
        raise DynasError(f"supernet file {str(path)!r} does not fit a {name!r} supernet: {reason}") from None
    supernet.temperature = payload["temperature"]
    supernet.progress = dict(payload["progress"])
    return supernet.to(map_location).eval()
