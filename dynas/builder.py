"""Build a plain ``nn.Module`` from an :class:`~dynas.spec.ArchSpec`.

Submodule names are stable checkpoint keys::

    stem                      ConvBnAct (conv, bn, act)
    stages.{i}.{j}            InvertedResidual: expand (absent when expansion == 1), depthwise,
                              se (optional: fc1, fc2), project (conv, bn)
    head                      ClassifierHead: conv (ConvBnAct 1x1), hidden (optional Linear),
                              classifier (Linear)

Every conv is followed by BatchNorm and has no bias (as in MobileNet). A conv is an
``nn.Conv2d``, a :class:`~dynas.ops.DynamicConv2d`, an :class:`~dynas.ops.ODConv2d` or a
:class:`~dynas.ops.DCDConv2d`, picked by :func:`create_conv2d` from the block's ``op``.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from dynas.ops import DCDConv2d, DynamicConv2d, ODConv2d
from dynas.spec import OPS, ArchSpec, BlockSpec, expanded_channels, se_channels

__all__ = [
    "ClassifierHead",
    "ConvBnAct",
    "DynasNet",
    "InvertedResidual",
    "SqueezeExcite",
    "build_model",
    "create_act",
    "create_conv2d",
    "init_weights",
]

_ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "relu6": nn.ReLU6, "hswish": nn.Hardswish}


def create_act(name: str) -> nn.Module:
    """Return the (in-place) activation module called ``name`` (``relu``, ``relu6``, ``hswish``)."""
    if name not in _ACTIVATIONS:
        raise ValueError(f"`name` must be one of {tuple(_ACTIVATIONS)}, but got name={name!r}.")
    return _ACTIVATIONS[name](inplace=True)


def create_conv2d(
    in_channels: int,
    out_channels: int,
    kernel_size: int,
    stride: int = 1,
    groups: int = 1,
    bias: bool = False,
    *,
    num_kernels: int = 1,
    reduction: int = 4,
    min_hidden: int = 4,
    op: str = "dy",
    latent: int = 0,
) -> nn.Module:
    """A "same"-padded conv of operator ``op``: static, DY-conv, ODConv or DCD.

    Args:
        in_channels, out_channels, kernel_size, stride, groups, bias: as in ``nn.Conv2d``
            (odd ``kernel_size``; padding is ``kernel_size // 2``).
        num_kernels: K; with ``op="dy"`` 1 is an ``nn.Conv2d``, with ``op="od"`` ODConv's K (>= 1).
        reduction, min_hidden: the attention width of DY-conv (``max(in // reduction, min_hidden)``)
            or DCD (:func:`~dynas.spec.dcd_hidden_channels`); ODConv keeps the official 1/16 and 16.
        op: ``"dy"`` (:class:`~dynas.ops.DynamicConv2d`), ``"od"`` (:class:`~dynas.ops.ODConv2d`) or
            ``"dcd"`` (:class:`~dynas.ops.DCDConv2d`, 1x1 only).
        latent: DCD's latent width; 0 takes the official rule.
    """
    if op not in OPS:
        raise ValueError(f"`op` must be one of {OPS}, but got op={op!r}.")
    padding = kernel_size // 2
    if op == "od":
        return ODConv2d(
            in_channels, out_channels, kernel_size, stride, padding, groups=groups, bias=bias, num_kernels=num_kernels
        )
    if op == "dcd":
        if kernel_size != 1 or groups != 1:
            raise ValueError(f"op='dcd' is a dense 1x1 conv, but got kernel_size={kernel_size}, groups={groups}.")
        widths = {"reduction": reduction, "min_hidden": min_hidden}
        return DCDConv2d(in_channels, out_channels, 1, stride, bias=bias, latent=latent or None, **widths)
    if num_kernels == 1:
        return nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, groups=groups, bias=bias)
    return DynamicConv2d(
        in_channels,
        out_channels,
        kernel_size,
        stride,
        padding,
        groups=groups,
        bias=bias,
        num_kernels=num_kernels,
        reduction=reduction,
        min_hidden=min_hidden,
    )


class ConvBnAct(nn.Sequential):
    """conv -> BatchNorm -> activation (``act=None``: no activation, as in a projection)."""

    def __init__(self, conv: nn.Module, out_channels: int, act: str | None) -> None:
        layers: OrderedDict[str, nn.Module] = OrderedDict(conv=conv, bn=nn.BatchNorm2d(out_channels))
        if act is not None:
            layers["act"] = create_act(act)
        super().__init__(layers)


class SqueezeExcite(nn.Module):
    """MobileNetV3 squeeze-excite: GAP -> 1x1 conv -> ReLU -> 1x1 conv -> hardsigmoid -> scale."""

    def __init__(self, channels: int, squeeze_channels: int) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(channels, squeeze_channels, 1)
        self.fc2 = nn.Conv2d(squeeze_channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = F.adaptive_avg_pool2d(x, 1)  # (B, C, 1, 1)
        scale = F.hardsigmoid(self.fc2(F.relu(self.fc1(scale))))  # (B, C, 1, 1), in [0, 1]
        return x * scale


def _attention_widths(op: str, reduction: int, min_hidden: int, dcd_reduction: int) -> dict[str, int]:
    """``create_conv2d``'s attention widths for ``op``: DY-conv's or DCD's (min hidden 4, the official)."""
    if op == "dcd":
        return {"reduction": dcd_reduction, "min_hidden": 4}
    return {"reduction": reduction, "min_hidden": min_hidden}


class InvertedResidual(nn.Module):
    """One :class:`~dynas.spec.BlockSpec`: expand 1x1 -> depthwise kxk -> SE -> project 1x1 (+ x)."""

    def __init__(
        self, in_channels: int, block: BlockSpec, reduction: int = 4, min_hidden: int = 4, dcd_reduction: int = 16
    ) -> None:
        super().__init__()
        # "pw" and "all" both make the 1x1 convs dynamic; "all" the depthwise too (never DCD: 1x1 only)
        pw = {"num_kernels": block.num_kernels, "op": block.op, "latent": block.latent}
        dw = pw if block.dynamic_convs == "all" else {"num_kernels": 1}
        attn = _attention_widths(block.op, reduction, min_hidden, dcd_reduction)
        mid = expanded_channels(in_channels, block.expansion)
        if block.expansion != 1:
            conv = create_conv2d(in_channels, mid, 1, **pw, **attn)
            self.expand = ConvBnAct(conv, mid, block.activation)
        conv = create_conv2d(mid, mid, block.kernel_size, block.stride, groups=mid, **dw, **attn)
        self.depthwise = ConvBnAct(conv, mid, block.activation)
        if block.se:
            self.se = SqueezeExcite(mid, se_channels(mid))
        self.project = ConvBnAct(create_conv2d(mid, block.out_channels, 1, **pw, **attn), block.out_channels, None)
        self.use_residual = block.stride == 1 and in_channels == block.out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x
        for name in ("expand", "depthwise", "se", "project"):  # absent parts are skipped
            if name in self._modules:
                out = self._modules[name](out)
        return x + out if self.use_residual else out


class ClassifierHead(nn.Module):
    """1x1 conv + BN + act -> global average pool -> [Linear + act] -> dropout -> Linear."""

    def __init__(self, in_channels: int, arch: ArchSpec) -> None:
        super().__init__()
        conv = create_conv2d(
            in_channels,
            arch.head_channels,
            1,
            num_kernels=arch.head_num_kernels,
            op=arch.head_op,
            **_attention_widths(arch.head_op, arch.attention_reduction, arch.attention_min_hidden, arch.dcd_reduction),
        )
        self.conv = ConvBnAct(conv, arch.head_channels, arch.head_activation)
        features = arch.head_channels
        if arch.head_hidden:
            self.hidden = nn.Sequential(nn.Linear(features, arch.head_hidden), create_act(arch.head_activation))
            features = arch.head_hidden
        self.dropout = nn.Dropout(arch.dropout)
        self.classifier = nn.Linear(features, arch.num_classes)

    def forward(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Logits, or with ``pre_logits`` the pooled features the classifier reads."""
        x = self.conv(x)  # (B, head_channels, H, W)
        return self.forward_pooled(x, pre_logits)

    def forward_pooled(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """From the head conv's output (B, head_channels, H, W) on: pool, [FC], dropout, classifier."""
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)  # (B, head_channels)
        if "hidden" in self._modules:
            x = self._modules["hidden"](x)  # (B, head_hidden)
        x = self.dropout(x)
        return x if pre_logits else self.classifier(x)  # (B, num_classes)


class DynasNet(nn.Module):
    """The network of an :class:`~dynas.spec.ArchSpec` (kept, read-only, as :attr:`arch`)."""

    def __init__(self, arch: ArchSpec) -> None:
        super().__init__()
        self.arch = arch
        stem_conv = create_conv2d(arch.in_channels, arch.stem_channels, 3, arch.stem_stride)
        self.stem = ConvBnAct(stem_conv, arch.stem_channels, arch.stem_activation)
        channels = arch.stem_channels
        stages = []
        for stage in arch.stages:
            blocks = []
            for block in stage.blocks:
                widths = (arch.attention_reduction, arch.attention_min_hidden, arch.dcd_reduction)
                blocks.append(InvertedResidual(channels, block, *widths))
                channels = block.out_channels
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.ModuleList(stages)
        self.head = ClassifierHead(channels, arch)

    def _body(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)  # (B, stem_channels, H/s, W/s)
        for stage in self.stages:
            x = stage(x)
        return x  # (B, last block's out_channels, H/stride, W/stride)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The last feature map, after the head's 1x1 conv: (B, head_channels, H/stride, W/stride)."""
        return self.head.conv(self._body(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """From :meth:`forward_features`' output to logits (or the pooled features, ``pre_logits``)."""
        return self.head.forward_pooled(x, pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The head as one module call, so that counters and traces see its ops under "head".
        return self.head(self._body(x))  # (B, num_classes)

    def get_classifier(self) -> nn.Linear:
        """The final linear layer."""
        return self.head.classifier

    def reset_classifier(self, num_classes: int) -> None:
        """A new, initialised classifier of ``num_classes`` outputs; :attr:`arch` follows."""
        arch = dataclasses.replace(self.arch, num_classes=num_classes)  # validates num_classes
        old = self.head.classifier
        self.head.classifier = nn.Linear(old.in_features, num_classes, device=old.weight.device, dtype=old.weight.dtype)
        nn.init.normal_(self.head.classifier.weight, 0.0, 0.01)
        nn.init.zeros_(self.head.classifier.bias)
        self.arch = arch


def init_weights(model: nn.Module) -> None:
    """torchvision MobileNetV2's init; each of a DynamicConv2d's (or ODConv2d's) K kernels is drawn independently.

    Convs: kaiming normal (fan_out), zero bias; BatchNorm: ones / zeros; Linear: normal(0, 0.01),
    zero bias. The attention branch of a DY-conv or ODConv keeps the operator's own init (a
    normal(0, 0.01) there would only shrink the logits, which the temperature already controls;
    ODConv's trunk is the official one, its heads zero: :meth:`OmniAttention.reset_parameters`).
    DCD's kernels W0 and Q^T are convs, P is zero (its dynamic branch starts at zero: without the
    official latent BatchNorms a kaiming P diverged), its attention Linears normal(0, 0.01), as
    the official DCD init.
    """
    skip: set[int] = set()
    for module in model.modules():
        if isinstance(module, (DynamicConv2d, ODConv2d)):
            skip.update(id(m) for m in module.attention.modules())
            for k in range(module.num_kernels):  # (Cout, Cin/g, kh, kw) each, fan_out as nn.Conv2d's
                nn.init.kaiming_normal_(module.weight.data[k], mode="fan_out")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, DCDConv2d):
            for weight in (module.weight, module.weight_q[:, :, None, None]):
                nn.init.kaiming_normal_(weight.data, mode="fan_out")
            nn.init.zeros_(module.weight_p)  # the dynamic branch starts at zero (DCDConv2d.reset_parameters)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Linear) and id(module) not in skip:
            nn.init.normal_(module.weight, 0.0, 0.01)
            if module.bias is not None:  # DCD's attention Linears have none
                nn.init.zeros_(module.bias)


def build_model(arch: ArchSpec) -> DynasNet:
    """Build the (initialised, train-mode) network of ``arch``; any input resolution works."""
    if not isinstance(arch, ArchSpec):
        raise TypeError(f"`arch` must be an ArchSpec, but got {type(arch).__name__}: {arch!r}.")
    model = DynasNet(arch)
    init_weights(model)
    return model
