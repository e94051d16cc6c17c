"""Elastic operators: one set of weights, sliced to whichever subnet is active.

As Once-for-All's sliceable ops (``ofa/imagenet_classification/elastic_nn/modules/dynamic_op.py``;
mind the name clash: OFA's "DynamicConv2d" is what is called :class:`ElasticConv2d` here), an
elastic op holds the weights of its largest setting and runs a smaller one by slicing:

* input channels: a prefix, read off the input (``x.shape[1]``);
* output channels: a prefix, set with ``set_active``;
* kernel size: the centre ``k x k`` crop of the largest kernel;
* dynamic convolution (Chen et al., CVPR 2020) with K kernels: kernels ``[:K]`` and attention
  logits ``[:K]`` (the softmax runs over that prefix). K = 1 is kernel 0 alone and skips the
  attention: exactly a static convolution;
* BatchNorm: statistics, scale and shift sliced to the active channels.

Which sizes are active is decided outside (by :class:`~dynas.supernet.Supernet`); each op only
slices, runs, and copies its active slice into the plain module a subnet is built from
(``copy_active_to``), so the supernet's forward and the extracted network read the same weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dynas.checks import check_int
from dynas.ops import DynamicConv2d

__all__ = [
    "ElasticBatchNorm2d",
    "ElasticConv2d",
    "ElasticKernelAttention",
    "ElasticLinear",
    "ElasticSqueezeExcite",
    "centre_crop",
]


def centre_crop(weight: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """The centre ``kernel_size x kernel_size`` window of ``weight`` (..., k_max, k_max)."""
    k_max = weight.shape[-1]
    start = (k_max - kernel_size) // 2
    return weight[..., start : start + kernel_size, start : start + kernel_size]


def _check_size(what: str, value: int, maximum: int, minimum: int = 1) -> int:
    return check_int(what, value, minimum, maximum)


def _copy(target: torch.Tensor, source: torch.Tensor, name: str) -> None:
    """Copy ``source`` into ``target`` in place; the shapes must agree exactly."""
    if target.shape != source.shape:
        raise RuntimeError(
            f"cannot copy the active slice into `{name}`: shape {tuple(source.shape)} vs the target's "
            f"{tuple(target.shape)} (the supernet's active setting and the built subnet disagree)."
        )
    target.copy_(source)


class ElasticKernelAttention(nn.Module):
    """The routing branch of an elastic dynamic conv: GAP -> FC1 -> ReLU -> FC2 -> /tau -> softmax.

    FC1 has ``max(in_channels // reduction, min_hidden)`` rows for the largest input; an input of
    ``c`` channels uses the first ``max(c // reduction, min_hidden)`` rows and first ``c`` columns,
    which is the hidden width a :class:`~dynas.ops.KernelAttention` of ``c`` inputs has. FC2 uses
    its first K rows (the logits of kernels ``[:K]``) and the active hidden columns.
    """

    def __init__(self, in_channels: int, num_kernels: int, reduction: int = 4, min_hidden: int = 4) -> None:
        super().__init__()
        self.reduction = reduction
        self.min_hidden = min_hidden
        self.fc1 = nn.Linear(in_channels, self.hidden_of(in_channels))
        self.fc2 = nn.Linear(self.hidden_of(in_channels), num_kernels)

    def hidden_of(self, in_channels: int) -> int:
        """Hidden width for an input of ``in_channels`` channels (as in ``KernelAttention``)."""
        return max(in_channels // self.reduction, self.min_hidden)

    def active_parameters(self, in_channels: int, num_kernels: int) -> dict[str, torch.Tensor]:
        """The slices used for ``in_channels`` inputs and K kernels, by ``KernelAttention`` key."""
        hidden = self.hidden_of(in_channels)
        return {
            "fc1.weight": self.fc1.weight[:hidden, :in_channels],  # (hidden, Cin)
            "fc1.bias": self.fc1.bias[:hidden],
            "fc2.weight": self.fc2.weight[:num_kernels, :hidden],  # (K, hidden)
            "fc2.bias": self.fc2.bias[:num_kernels],
        }

    def forward(self, x: torch.Tensor, num_kernels: int, temperature: float) -> torch.Tensor:
        # x: (B, Cin, H, W) -> pi: (B, K), softmax over the first K logits only.
        p = self.active_parameters(x.shape[1], num_kernels)
        pooled = x.sum(dim=(2, 3)) / (x.shape[2] * x.shape[3])  # (B, Cin)
        hidden = F.linear(pooled, p["fc1.weight"], p["fc1.bias"]).relu_()  # (B, hidden)
        logits = F.linear(hidden, p["fc2.weight"], p["fc2.bias"])  # (B, K)
        return torch.softmax(logits / temperature, dim=1)


class ElasticConv2d(nn.Module):
    """A "same"-padded, bias-free conv whose channels, kernel size and K are sliced per subnet.

    Args:
        in_channels, out_channels: the largest input / output widths.
        kernel_size: the largest (odd) kernel; a smaller one is its centre crop.
        stride: fixed for the layer.
        depthwise: one group per channel (``groups`` follows the active channels, and the
            output has as many channels as the input).
        num_kernels: K_max, the most kernels a subnet may mix; 1 = always static (no attention).
        reduction, min_hidden: the attention's hidden width rule (as in ``DynamicConv2d``).

    The weight is ``(K_max, Cout_max, Cin_max/g, k_max, k_max)`` for static layers too, so
    that kernel 0 is the static conv of every subnet that has K = 1.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        *,
        depthwise: bool = False,
        num_kernels: int = 1,
        reduction: int = 4,
        min_hidden: int = 4,
    ) -> None:
        super().__init__()
        if kernel_size % 2 != 1:
            raise ValueError(f"`kernel_size` must be odd, but got {kernel_size=}.")
        if depthwise and in_channels != out_channels:
            raise ValueError(f"a depthwise conv keeps its width, but got {in_channels=}, {out_channels=}.")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = kernel_size
        self.stride = stride
        self.depthwise = depthwise
        self.num_kernels = num_kernels
        self.temperature = 30.0
        cin_g = 1 if depthwise else in_channels
        # (K_max, Cout_max, Cin_max/g, k_max, k_max)
        self.weight = nn.Parameter(torch.empty(num_kernels, out_channels, cin_g, kernel_size, kernel_size))
        self.attention = (
            ElasticKernelAttention(in_channels, num_kernels, reduction, min_hidden) if num_kernels > 1 else None
        )
        self.active_out_channels = out_channels
        self.active_kernel_size = kernel_size
        self.active_num_kernels = num_kernels
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Each kernel as ``init_weights`` does a conv: kaiming normal, fan_out (of the largest)."""
        for k in range(self.num_kernels):
            nn.init.kaiming_normal_(self.weight.data[k], mode="fan_out")

    def set_active(self, out_channels: int, kernel_size: int, num_kernels: int) -> None:
        """Select the output width, kernel size and K that the next forwards use."""
        _check_size("out_channels", out_channels, self.out_channels)
        _check_size("kernel_size", kernel_size, self.kernel_size)
        if kernel_size % 2 != 1:
            raise ValueError(f"`kernel_size` must be odd, but got {kernel_size=}.")
        _check_size("num_kernels", num_kernels, self.num_kernels)
        self.active_out_channels = out_channels
        self.active_kernel_size = kernel_size
        self.active_num_kernels = num_kernels

    def active_weight(self, in_channels: int) -> torch.Tensor:
        """Kernels ``[:K]``, output / input prefixes, centre crop: (K, Cout, Cin/g, k, k)."""
        cout = in_channels if self.depthwise else self.active_out_channels
        cin_g = 1 if self.depthwise else in_channels
        weight = self.weight[: self.active_num_kernels, :cout, :cin_g]
        return centre_crop(weight, self.active_kernel_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, Cin, H, W) with Cin <= in_channels -> (B, Cout, H', W')
        cin = x.shape[1]
        groups = cin if self.depthwise else 1
        padding = self.active_kernel_size // 2
        weight = self.active_weight(cin)  # (K, Cout, Cin/g, k, k)
        if self.active_num_kernels == 1:
            return F.conv2d(x, weight[0], None, self.stride, padding, 1, groups)
        pi = self.attention(x, self.active_num_kernels, self.temperature)  # (B, K)
        return _dynamic_conv(x, weight, pi, self.stride, padding, groups)

    @torch.no_grad()
    def copy_active_to(self, target: nn.Module) -> None:
        """Copy the active slice into ``target``: an ``nn.Conv2d`` (K = 1) or a ``DynamicConv2d``."""
        k = self.active_num_kernels
        expected = nn.Conv2d if k == 1 else DynamicConv2d
        if type(target) is not expected:
            raise RuntimeError(f"the active K={k} needs a {expected.__name__} target, but got {type(target).__name__}.")
        weight = self.active_weight(target.in_channels)
        if k == 1:
            _copy(target.weight, weight[0], "weight")
            return
        _copy(target.weight, weight, "weight")
        for name, value in self.attention.active_parameters(target.in_channels, k).items():
            _copy(target.attention.get_parameter(name), value, f"attention.{name}")
        target.temperature = self.temperature

    def extra_repr(self) -> str:
        s = f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}"
        if self.depthwise:
            s += ", depthwise=True"
        return s + f", num_kernels={self.num_kernels}"


def _dynamic_conv(
    x: torch.Tensor, weight: torch.Tensor, pi: torch.Tensor, stride: int, padding: int, groups: int
) -> torch.Tensor:
    """Each sample convolved with its own kernel ``sum_k pi_k W_k`` (Chen et al.'s aggregation).

    Args:
        x: (B, Cin, H, W); weight: (K, Cout, Cin/g, k, k); pi: (B, K).
    """
    b, k, cout = x.shape[0], weight.shape[0], weight.shape[1]
    mixed = torch.mm(pi, weight.reshape(k, -1))  # (B, Cout*Cin/g*k*k)
    if weight.shape[-1] == 1 and stride == 1 and groups == 1:
        # A 1x1 conv is a matmul over pixels: one batched matmul, no batch folded into groups.
        out = torch.bmm(mixed.view(b, cout, -1), x.reshape(b, x.shape[1], -1))  # (B, Cout, H*W)
        return out.view(b, cout, *x.shape[2:])
    folded = x.reshape(1, -1, *x.shape[2:])  # (1, B*Cin, H, W): sample i meets only its kernel
    out = F.conv2d(folded, mixed.view(b * cout, *weight.shape[2:]), None, stride, padding, 1, b * groups)
    return out.view(b, cout, *out.shape[2:])  # (B, Cout, H', W')


class ElasticBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm over the first ``C`` channels of its largest width, ``C`` read off the input.

    Training updates only the active prefix of the running statistics (in place, through
    views), as OFA's ``DynamicBatchNorm2d``; ``momentum=None`` (a cumulative average, as
    ``nn.BatchNorm2d`` has it) is honoured, which is how BN statistics are recalibrated.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = x.shape[1]  # x: (B, C, H, W) with C <= num_features
        factor = self.momentum
        if self.training:
            self.num_batches_tracked.add_(1)
            if factor is None:
                factor = 1.0 / float(self.num_batches_tracked)
        return F.batch_norm(
            x,
            self.running_mean[:c],
            self.running_var[:c],
            self.weight[:c],
            self.bias[:c],
            self.training,
            0.0 if factor is None else factor,
            self.eps,
        )

    @torch.no_grad()
    def copy_active_to(self, target: nn.BatchNorm2d) -> None:
        """Copy the first ``target.num_features`` channels' scale, shift and statistics."""
        c = target.num_features
        _check_size("num_features", c, self.num_features)
        for name in ("weight", "bias", "running_mean", "running_var"):
            _copy(getattr(target, name), getattr(self, name)[:c], name)
        target.num_batches_tracked.copy_(self.num_batches_tracked)


class ElasticSqueezeExcite(nn.Module):
    """MobileNetV3 squeeze-excite with sliced widths: channels from the input, squeeze set active.

    ``fc1``/``fc2`` are 1x1 convs with bias, as in :class:`dynas.builder.SqueezeExcite`.
    """

    def __init__(self, channels: int, squeeze_channels: int) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(channels, squeeze_channels, 1)
        self.fc2 = nn.Conv2d(squeeze_channels, channels, 1)
        self.active_squeeze_channels = squeeze_channels

    def set_active(self, squeeze_channels: int) -> None:
        """Select the squeeze width the next forwards use."""
        self.active_squeeze_channels = _check_size("squeeze_channels", squeeze_channels, self.fc1.out_channels)

    def active_parameters(self, channels: int) -> dict[str, torch.Tensor]:
        """The slices used for ``channels`` inputs, by ``SqueezeExcite`` key."""
        s = self.active_squeeze_channels
        return {
            "fc1.weight": self.fc1.weight[:s, :channels],  # (S, C, 1, 1)
            "fc1.bias": self.fc1.bias[:s],
            "fc2.weight": self.fc2.weight[:channels, :s],  # (C, S, 1, 1)
            "fc2.bias": self.fc2.bias[:channels],
        }

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.active_parameters(x.shape[1])
        scale = F.adaptive_avg_pool2d(x, 1)  # (B, C, 1, 1)
        scale = F.relu(F.conv2d(scale, p["fc1.weight"], p["fc1.bias"]))  # (B, S, 1, 1)
        scale = F.hardsigmoid(F.conv2d(scale, p["fc2.weight"], p["fc2.bias"]))  # (B, C, 1, 1), in [0, 1]
        return x * scale

    @torch.no_grad()
    def copy_active_to(self, target: nn.Module) -> None:
        """Copy the active slices into a :class:`dynas.builder.SqueezeExcite`."""
        for name, value in self.active_parameters(target.fc1.in_channels).items():
            _copy(target.get_parameter(name), value, name)


class ElasticLinear(nn.Linear):
    """A linear layer reading the first ``F`` of its input features, ``F`` read off the input."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, F) with F <= in_features -> (B, out_features)
        return F.linear(x, self.weight[:, : x.shape[1]], self.bias)

    @torch.no_grad()
    def copy_active_to(self, target: nn.Linear) -> None:
        """Copy the first ``target.in_features`` columns and the bias."""
        _check_size("in_features", target.in_features, self.in_features)
        _copy(target.weight, self.weight[:, : target.in_features], "weight")
        _copy(target.bias, self.bias, "bias")

