"""Paper backbones as :class:`~dynas.spec.ArchSpec`: MobileNetV2 and MobileNetV3-Small, static, DY, ODConv, DCD.

>>> get_preset("mobilenetv2_100").to_str()[:40]
'r224_in3_stem32s2_relu6 / k3e1c16s1_relu'

Static presets reproduce torchvision's models (MobileNetV2 x1.0: 3,504,872 parameters;
MobileNetV3-Small: 2,542,856). A ``dy_`` preset is the same network with K = 4 dynamic kernels
in both 1x1 convs of every block and in the head conv (``dynamic_convs="pw"``,
``head_num_kernels=4``, the arguments of :func:`mobilenet_v2` / :func:`mobilenet_v3_small`):
DY-MobileNetV2 x1.0 then has 11.07M parameters and 313.4M MACs, the paper's 11.1M / 312.9M.

The other operators follow their official models (``experiments/paper_table.py`` compares them):

* ``od1_`` / ``od4_`` (OSVAI/ODConv ``od_mobilenetv2``): ODConv with K = 1 or 4 in all three convs of
  every block and in the head conv (``op="od"``, ``dynamic_convs="all"``); stem and classifier
  static. Parameters equal the official models' exactly (x1.0: 4,940,185 and 11,512,149);
* ``dcd_`` (liyunsheng13/dcd ``mobilenetv2_dcd``): DCD in both 1x1 convs of every block but the
  first (expansion 1, static there officially), static depthwise and head convs, attention
  fc-squeeze 16 at x1.0 (the README's) and 8 at x0.5 (the training script's default, which gives
  the paper's 3.1M). The official model's dynamic classifier (``DYCls``, +0.18M) is not modelled.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from functools import partial
from types import MappingProxyType

from dynas.errors import DynasError, did_you_mean
from dynas.spec import ArchSpec, BlockSpec, StageSpec, make_divisible

__all__ = [
    "PRESETS",
    "cifar_variant",
    "dcd_mobilenet_v2",
    "get_preset",
    "list_presets",
    "mobilenet_v2",
    "mobilenet_v3_small",
]

# MobileNetV2 (Sandler et al. 2018, Table 2): expansion t, channels c, repeats n, stride s.
_MBV2_STAGES = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))

# MobileNetV3-Small (torchvision): in, kernel, expanded, out, se, activation, stride; one stage
# per output resolution (C1..C4).
_MBV3_SMALL_STAGES = (
    ((16, 3, 16, 16, True, "relu", 2),),
    ((16, 3, 72, 24, False, "relu", 2), (24, 3, 88, 24, False, "relu", 1)),
    (
        (24, 5, 96, 40, True, "hswish", 2),
        (40, 5, 240, 40, True, "hswish", 1),
        (40, 5, 240, 40, True, "hswish", 1),
        (40, 5, 120, 48, True, "hswish", 1),
        (48, 5, 144, 48, True, "hswish", 1),
    ),
    ((48, 5, 288, 96, True, "hswish", 2), (96, 5, 576, 96, True, "hswish", 1), (96, 5, 576, 96, True, "hswish", 1)),
)


def mobilenet_v2(
    width_mult: float = 1.0,
    *,
    num_kernels: int = 1,
    dynamic_convs: str = "pw",
    head_num_kernels: int | None = None,
    op: str = "dy",
    head_op: str | None = None,
    dcd_reduction: int = 16,
    num_classes: int = 1000,
    input_size: int = 224,
) -> ArchSpec:
    """MobileNetV2 (torchvision's config), optionally with dynamic convolution.

    Args:
        width_mult: channel multiplier; channels are ``make_divisible(c * width_mult, 8)``, the
            head's 1280 is scaled only when ``width_mult > 1``.
        num_kernels: K of every block (with ``op="dy"``, 1 = the static network).
        dynamic_convs: which convs of a dynamic block are dynamic (``"pw"`` or ``"all"``).
        head_num_kernels: K of the head's 1x1 conv (default: ``num_kernels``).
        op: every block's operator, ``"dy"``, ``"od"`` or ``"dcd"`` (:data:`dynas.spec.OPS`).
        head_op: the head conv's operator (default: ``op``).
        dcd_reduction: DCD's attention fc-squeeze (:attr:`ArchSpec.dcd_reduction`).
        num_classes, input_size: classifier width and square input resolution.
    """
    blocks_in_stages = []
    for t, c, n, s in _MBV2_STAGES:
        out = make_divisible(c * width_mult, 8)
        blocks = [
            BlockSpec(3, t, out, s if i == 0 else 1, False, "relu6", num_kernels, dynamic_convs, op) for i in range(n)
        ]
        blocks_in_stages.append(StageSpec(tuple(blocks)))
    return ArchSpec(
        stem_channels=make_divisible(32 * width_mult, 8),
        stem_stride=2,
        stem_activation="relu6",
        stages=tuple(blocks_in_stages),
        head_channels=make_divisible(1280 * max(1.0, width_mult), 8),
        head_activation="relu6",
        head_num_kernels=num_kernels if head_num_kernels is None else head_num_kernels,
        head_op=op if head_op is None else head_op,
        dcd_reduction=dcd_reduction,
        num_classes=num_classes,
        input_size=input_size,
        dropout=0.2,
    )


def dcd_mobilenet_v2(width_mult: float = 1.0, *, dcd_reduction: int = 16, **kwargs: object) -> ArchSpec:
    """DCD-MobileNetV2 as the official code builds it: DCD in both 1x1 convs of every block but the
    first (expansion 1), static depthwise and head convs. ``kwargs`` go to :func:`mobilenet_v2`."""
    static_head = {"head_op": "dy", "head_num_kernels": 1}
    arch = mobilenet_v2(width_mult, op="dcd", dcd_reduction=dcd_reduction, **static_head, **kwargs)  # type: ignore[arg-type]
    first, *rest = arch.stages
    static_first = StageSpec(tuple(dataclasses.replace(b, op="dy") for b in first.blocks))
    return dataclasses.replace(arch, stages=(static_first, *rest))


def mobilenet_v3_small(
    *,
    num_kernels: int = 1,
    dynamic_convs: str = "pw",
    head_num_kernels: int | None = None,
    num_classes: int = 1000,
    input_size: int = 224,
) -> ArchSpec:
    """MobileNetV3-Small x1.0 (torchvision's config), optionally with dynamic convolution.

    Expansions are torchvision's expanded widths divided by the input width (e.g. 88 / 24); the
    builder's ``make_divisible(in * expansion, 8)`` gives those widths back exactly.

    Args: as :func:`mobilenet_v2`.
    """
    stages = tuple(
        StageSpec(
            tuple(
                BlockSpec(k, expanded / cin, out, stride, se, act, num_kernels, dynamic_convs)
                for cin, k, expanded, out, se, act, stride in stage
            )
        )
        for stage in _MBV3_SMALL_STAGES
    )
    return ArchSpec(
        stem_channels=16,
        stem_stride=2,
        stem_activation="hswish",
        stages=stages,
        head_channels=576,
        head_activation="hswish",
        head_hidden=1024,
        head_num_kernels=num_kernels if head_num_kernels is None else head_num_kernels,
        num_classes=num_classes,
        input_size=input_size,
        dropout=0.2,
    )


def cifar_variant(arch: ArchSpec, num_classes: int = 10, input_size: int = 32) -> ArchSpec:
    """Adapt an ImageNet arch to small inputs: stem stride 1 and the first stride-2 block at stride 1.

    MobileNetV2 then ends at 4x4 on a 32x32 input (a total stride of 8 instead of 32).
    """
    stages = list(arch.stages)
    for i, stage in enumerate(stages):
        strided = [j for j, b in enumerate(stage.blocks) if b.stride == 2]
        if strided:
            blocks = list(stage.blocks)
            blocks[strided[0]] = dataclasses.replace(blocks[strided[0]], stride=1)
            stages[i] = StageSpec(tuple(blocks))
            break
    return dataclasses.replace(arch, stem_stride=1, stages=tuple(stages), num_classes=num_classes, input_size=input_size)


def _presets() -> dict[str, Callable[[], ArchSpec]]:
    presets: dict[str, Callable[[], ArchSpec]] = {}
    for width, suffix in ((1.0, "100"), (0.75, "075"), (0.5, "050"), (0.35, "035")):
        presets[f"mobilenetv2_{suffix}"] = partial(mobilenet_v2, width)
        presets[f"dy_mobilenetv2_{suffix}"] = partial(mobilenet_v2, width, num_kernels=4)
    for width, suffix, squeeze in ((1.0, "100", 16), (0.5, "050", 8)):
        for k in (1, 4):
            od = {"op": "od", "num_kernels": k, "dynamic_convs": "all"}
            presets[f"od{k}_mobilenetv2_{suffix}"] = partial(mobilenet_v2, width, **od)
        presets[f"dcd_mobilenetv2_{suffix}"] = partial(dcd_mobilenet_v2, width, dcd_reduction=squeeze)
    presets["mobilenetv3_small"] = mobilenet_v3_small
    presets["dy_mobilenetv3_small"] = partial(mobilenet_v3_small, num_kernels=4)
    # CIFAR variants (32x32, 10 classes; stem and first strided block at stride 1).
    for name, make in list(presets.items()):
        presets[f"{name}_cifar"] = lambda make=make: cifar_variant(make())
    return presets


#: Preset name -> function making its ArchSpec (224x224, 1000 classes; ``*_cifar``: 32x32, 10 classes).
PRESETS: Mapping[str, Callable[[], ArchSpec]] = MappingProxyType(_presets())


def list_presets() -> list[str]:
    """The preset names, sorted."""
    return sorted(PRESETS)


def get_preset(name: str) -> ArchSpec:
    """The ArchSpec of preset ``name``; an unknown name raises with a close-match suggestion."""
    if name not in PRESETS:
        raise DynasError(
            f"unknown preset {name!r}.{did_you_mean(name, PRESETS)} Known presets: {', '.join(list_presets())}."
        )
    return PRESETS[name]()
