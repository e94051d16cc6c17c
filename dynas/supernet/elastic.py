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
* ODConv with K kernels: the same kernels ``[:K]``, its own attention (:class:`ElasticOmniAttention`:
  channel, filter and kernel logits as prefixes, spatial logits the centre of the largest grid);
* DCD on a 1x1 conv: kernel 0 is its static ``W0``; ``Q^T``, ``P`` and the latent fusion
  ``Phi`` are sliced to the active latent width L (:class:`ElasticDCDBranch`);
* BatchNorm: statistics, scale and shift sliced to the active channels.

Every operator of a layer shares the kernel bank, so kernel 0 is the static conv of all of them:
the static subnet, DY-conv's first kernel, ODConv's first kernel and DCD's ``W0``.

Which sizes are active is decided outside (by :class:`~dynas.supernet.Supernet`); each op only
slices, runs, and copies its active slice into the plain module a subnet is built from
(``copy_active_to``), so the supernet's forward and the extracted network read the same weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dynas.checks import check_int
from dynas.ops import DCDConv2d, DynamicConv2d, ODConv2d
from dynas.ops.dcd import dcd_hsigmoid, dcd_pool
from dynas.ops.odconv import OmniAttention
from dynas.spec import dcd_hidden_channels, odconv_hidden_channels

__all__ = [
    "ElasticBatchNorm1d",
    "ElasticBatchNorm2d",
    "ElasticConv2d",
    "ElasticDCDBranch",
    "ElasticKernelAttention",
    "ElasticOmniAttention",
    "ElasticLinear",
    "ElasticSqueezeExcite",
    "KERNEL_BANKS",
    "centre_crop",
]


#: The scale of a residual kernel bank's offsets ``D_k`` at initialisation, relative to kernel 0's
#: kaiming scale: the kernels start apart (the attention has something to choose between) but
#: close to the static kernel.
RESIDUAL_INIT_SCALE = 0.5

#: How a dynamic layer holds its kernels (:class:`ElasticConv2d`'s ``bank``, :class:`Supernet`'s
#: ``kernel_bank``).
KERNEL_BANKS = ("independent", "residual", "separate")


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


def centre_positions(kernel_max: int, kernel_size: int) -> list[int]:
    """Row-major indices, in a ``kernel_max x kernel_max`` grid, of its centre ``kernel_size`` window."""
    start = (kernel_max - kernel_size) // 2
    rows = range(start, start + kernel_size)
    return [r * kernel_max + c for r in rows for c in rows]


class ElasticOmniAttention(nn.Module):
    """ODConv's attention (:class:`~dynas.ops.OmniAttention`) for the largest conv, sliced per subnet.

    Trunk: GAP -> FC (no bias) -> BatchNorm -> ReLU, hidden width ``max(Cin // 16, 16)`` of the
    active input (a prefix). Heads, kept apart here and joined in :class:`OmniAttention`'s order
    for the active sizes: channel (``Cin`` prefix), filter (``Cout`` prefix; none when depthwise),
    spatial (the centre ``k x k`` of the largest grid; none for 1x1), kernel (``K`` prefix; none
    at K = 1). Init as ``OmniAttention``'s: the official trunk, zero heads.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        num_kernels: int,
        *,
        depthwise: bool,
        reduction: int = 16,
        min_hidden: int = 16,
    ) -> None:
        super().__init__()
        self.reduction, self.min_hidden, self.kernel_size = reduction, min_hidden, kernel_size
        hidden = odconv_hidden_channels(in_channels, reduction, min_hidden)
        self.fc = nn.Linear(in_channels, hidden, bias=False)
        self.bn = ElasticBatchNorm1d(hidden)
        self.channel = nn.Linear(hidden, in_channels)
        self.filter = None if depthwise else nn.Linear(hidden, out_channels)
        self.spatial = nn.Linear(hidden, kernel_size * kernel_size) if kernel_size > 1 else None
        self.kernel = nn.Linear(hidden, num_kernels) if num_kernels > 1 else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            nn.init.kaiming_normal_(self.fc.weight, mode="fan_out", nonlinearity="relu")
            for head in (self.channel, self.filter, self.spatial, self.kernel):
                if head is not None:
                    nn.init.zeros_(head.weight)
                    nn.init.zeros_(head.bias)
        nn.init.ones_(self.bn.weight)
        nn.init.zeros_(self.bn.bias)

    def heads(self, in_channels: int, out_channels: int, kernel_size: int, num_kernels: int) -> tuple[
        torch.Tensor, torch.Tensor, tuple[int, int, int, int]
    ]:
        """``(weight, bias, sizes)`` of the joined heads for the active sizes (``OmniAttention.heads``)."""
        hidden = odconv_hidden_channels(in_channels, self.reduction, self.min_hidden)
        parts: list[tuple[nn.Linear, slice | list[int]]] = [(self.channel, slice(in_channels))]
        if self.filter is not None:
            parts.append((self.filter, slice(out_channels)))
        if kernel_size > 1:
            parts.append((self.spatial, centre_positions(self.kernel_size, kernel_size)))
        if num_kernels > 1:
            parts.append((self.kernel, slice(num_kernels)))
        weight = torch.cat([head.weight[rows, :hidden] for head, rows in parts])
        bias = torch.cat([head.bias[rows] for head, rows in parts])
        sizes = (
            in_channels,
            0 if self.filter is None else out_channels,
            kernel_size * kernel_size if kernel_size > 1 else 0,
            num_kernels if num_kernels > 1 else 0,
        )
        return weight, bias, sizes

    def forward(
        self, x: torch.Tensor, out_channels: int, kernel_size: int, num_kernels: int, temperature: float
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """``(a_c, a_f, a_s, a_w)`` as :meth:`OmniAttention.forward`; a skipped one is ``None``."""
        cin = x.shape[1]
        hidden = odconv_hidden_channels(cin, self.reduction, self.min_hidden)
        pooled = x.sum(dim=(2, 3)) / (x.shape[2] * x.shape[3])  # (B, Cin)
        z = self.bn(F.linear(pooled, self.fc.weight[:hidden, :cin])).relu()  # (B, hidden)
        weight, bias, sizes = self.heads(cin, out_channels, kernel_size, num_kernels)
        inv_tau = 1.0 / temperature
        logits = torch.addmm(bias, z, weight.t(), beta=inv_tau, alpha=inv_tau)
        channel, filters, spatial, kernels = logits.split(sizes, dim=1)
        return (
            torch.sigmoid(channel),
            torch.sigmoid(filters) if sizes[1] else None,
            torch.sigmoid(spatial) if sizes[2] else None,
            torch.softmax(kernels, dim=1) if sizes[3] else None,
        )

    @torch.no_grad()
    def copy_active_to(self, target: OmniAttention, out_channels: int, kernel_size: int, num_kernels: int) -> None:
        """Copy the active trunk, BatchNorm and joined heads into an :class:`OmniAttention`."""
        cin = target.fc.in_features
        hidden = target.fc.out_features
        _copy(target.fc.weight, self.fc.weight[:hidden, :cin], "attention.fc.weight")
        self.bn.copy_active_to(target.bn)
        weight, bias, sizes = self.heads(cin, out_channels, kernel_size, num_kernels)
        if tuple(target.sizes) != sizes:
            raise RuntimeError(f"the active ODConv heads {sizes} and the target's {target.sizes} disagree.")
        _copy(target.heads.weight, weight, "attention.heads.weight")
        _copy(target.heads.bias, bias, "attention.heads.bias")


class ElasticDCDBranch(nn.Module):
    """DCD's dynamic part of a 1x1 elastic conv (its ``W0`` is the conv's kernel 0), sliced per subnet.

    Holds ``Q^T`` (L_max, Cin_max), ``P`` (Cout_max, L_max) and the attention of
    :class:`~dynas.ops.DCDAttention`: the first FC for a global-average input (``fc``) and / or
    for the 2x2 pool of a widening conv (``fc_quadrants``, channel-major), the gate, and the
    ``Phi`` (L_max x L_max grid) and ``Lambda`` (Cout_max) rows. A subnet with latent width L,
    ``Cin`` inputs and ``Cout`` outputs uses ``Q^T[:L, :Cin]``, ``P[:Cout, :L]``, the top-left
    L x L block of ``Phi``, the first ``Cout`` rows of ``Lambda`` and the hidden prefix of
    :func:`~dynas.spec.dcd_hidden_channels`. Init as :func:`dynas.builder.init_weights` gives
    a DCD conv: ``Q`` kaiming (fan_out), ``P`` zero, attention normal(0, 0.01).

    Args:
        pools: which first FCs to hold: ``False`` (global average) and / or ``True`` (2x2).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        latent: int,
        pools: frozenset[bool],
        reduction: int = 16,
        min_hidden: int = 4,
    ) -> None:
        super().__init__()
        self.latent, self.reduction, self.min_hidden = latent, reduction, min_hidden
        widest = 4 * in_channels if True in pools else in_channels
        hidden = dcd_hidden_channels(widest, latent, reduction, min_hidden)
        self.weight_q = nn.Parameter(torch.empty(latent, in_channels))  # Q^T
        self.weight_p = nn.Parameter(torch.empty(out_channels, latent))  # P
        self.fc = nn.Linear(in_channels, hidden, bias=False) if False in pools else None
        self.fc_quadrants = nn.Linear(4 * in_channels, hidden, bias=False) if True in pools else None
        self.gate = nn.Linear(hidden, hidden, bias=False)
        self.phi = nn.Linear(hidden, latent * latent, bias=False)
        self.lam = nn.Linear(hidden, out_channels, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            nn.init.kaiming_normal_(self.weight_q[:, :, None, None], mode="fan_out")
            nn.init.zeros_(self.weight_p)
            for fc in (self.fc, self.fc_quadrants, self.gate, self.phi, self.lam):
                if fc is not None:
                    nn.init.normal_(fc.weight, 0.0, 0.01)

    def active_parameters(self, in_channels: int, out_channels: int, latent: int) -> dict[str, torch.Tensor]:
        """The slices for ``in_channels`` -> ``out_channels`` at latent width L, by ``DCDConv2d`` key."""
        if latent > self.latent:
            raise ValueError(f"`latent` must be <= {self.latent}, but got {latent=}.")
        quadrants = in_channels < out_channels
        fc = self.fc_quadrants if quadrants else self.fc
        if fc is None:
            kind = "2x2-pooled (widening)" if quadrants else "globally pooled"
            raise ValueError(f"this DCD branch holds no {kind} attention input for {in_channels} -> {out_channels}.")
        pooled = 4 * in_channels if quadrants else in_channels
        hidden = dcd_hidden_channels(pooled, latent, self.reduction, self.min_hidden)
        phi_rows = [i * self.latent + j for i in range(latent) for j in range(latent)]
        return {
            "weight_q": self.weight_q[:latent, :in_channels],
            "weight_p": self.weight_p[:out_channels, :latent],
            "attention.fc.weight": fc.weight[:hidden, :pooled],
            "attention.gate.weight": self.gate.weight[:hidden, :hidden],
            "attention.heads.weight": torch.cat(
                [self.phi.weight[phi_rows, :hidden], self.lam.weight[:out_channels, :hidden]]
            ),
        }

    def forward(self, x: torch.Tensor, w0: torch.Tensor, latent: int) -> torch.Tensor:
        """``Lambda (W0 x) + P (Phi (Q^T x))`` for x (B, Cin, H, W) and ``W0`` (Cout, Cin, 1, 1)."""
        cout, cin = w0.shape[0], x.shape[1]
        p = self.active_parameters(cin, cout, latent)
        z = F.linear(dcd_pool(x, cin < cout), p["attention.fc.weight"])  # (B, hidden)
        z = z * dcd_hsigmoid(F.linear(z, p["attention.gate.weight"]))
        phi, scale = F.linear(z, p["attention.heads.weight"]).split([latent * latent, cout], dim=1)
        static = F.conv2d(x, w0)  # (B, Cout, H, W)
        h, w = x.shape[2], x.shape[3]
        fused = F.conv2d(x, p["weight_q"][:, :, None, None]).reshape(-1, latent, h * w)  # (B, L, HW)
        fused = torch.matmul(phi.reshape(-1, latent, latent), fused).reshape(-1, latent, h, w)
        return static * dcd_hsigmoid(scale)[:, :, None, None] + F.conv2d(fused, p["weight_p"][:, :, None, None])

    @torch.no_grad()
    def copy_active_to(self, target: DCDConv2d) -> None:
        """Copy ``Q^T``, ``P`` and the attention slices into a :class:`~dynas.ops.DCDConv2d` (not ``W0``)."""
        active = self.active_parameters(target.in_channels, target.out_channels, target.latent)
        for name, value in active.items():
            _copy(target.get_parameter(name), value, name)


class ElasticConv2d(nn.Module):
    """A "same"-padded, bias-free conv whose channels, kernel size, operator and K are sliced per subnet.

    Args:
        in_channels, out_channels: the largest input / output widths.
        kernel_size: the largest (odd) kernel; a smaller one is its centre crop.
        stride: fixed for the layer.
        depthwise: one group per channel (``groups`` follows the active channels, and the
            output has as many channels as the input).
        num_kernels: K_max of DY-conv; 1 = no DY-conv (no attention).
        reduction, min_hidden: DY-conv's attention width rule (as in ``DynamicConv2d``).
        od_kernels: K_max of ODConv; 0 = no ODConv.
        dcd_latent, dcd_pools, dcd_reduction: DCD's largest latent width (0 = no DCD; a 1x1
            conv only), the pools its attention meets (see :class:`ElasticDCDBranch`) and its
            attention's fc-squeeze.
        bank: how the kernels are held (:data:`KERNEL_BANKS`). ``"independent"``: K_bank kernels
            of their own, kernel 0 the static conv. ``"residual"``: kernels ``1..`` are offsets
            from kernel 0, kernel ``k`` is ``weight[0] + weight[k]`` (the mixture is
            ``W0 + sum_k pi_k D_k``), so the static kernel is the centre of every mixture.
            ``"separate"``: a layer with a dynamic choice holds the static kernel (``weight[0]``,
            also DCD's ``W0``) apart from K_bank independent dynamic kernels (``weight[1:]``), so
            that a dynamic choice trains as a stand-alone dynamic conv does, from kernels of its
            own, and K = 1 is still exactly a static conv.

    The weight is ``(K_bank, Cout_max, Cin_max/g, k_max, k_max)``, ``K_bank = max(num_kernels,
    od_kernels, 1)``, for static layers too, so that kernel 0 is the static conv of every subnet
    that has K = 1 (and ODConv's first kernel, and DCD's ``W0``); with ``"separate"`` and a
    dynamic choice it is ``1 + K_bank`` kernels, the static one first. With ``"residual"``, the
    stored kernels ``1..`` are offsets from kernel 0 (initialised at :data:`RESIDUAL_INIT_SCALE`
    of a kernel's scale); :meth:`active_weight` and :meth:`copy_active_to` give the kernels
    themselves.
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
        od_kernels: int = 0,
        dcd_latent: int = 0,
        dcd_pools: frozenset[bool] = frozenset(),
        dcd_reduction: int = 16,
        bank: str = "independent",
    ) -> None:
        super().__init__()
        if bank not in KERNEL_BANKS:
            raise ValueError(f"`bank` must be one of {', '.join(KERNEL_BANKS)}, but got {bank=}.")
        if kernel_size % 2 != 1:
            raise ValueError(f"`kernel_size` must be odd, but got {kernel_size=}.")
        if depthwise and in_channels != out_channels:
            raise ValueError(f"a depthwise conv keeps its width, but got {in_channels=}, {out_channels=}.")
        if dcd_latent and (kernel_size != 1 or depthwise or stride != 1):
            raise ValueError("DCD is a dense, stride-1 1x1 conv.")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = kernel_size
        self.stride = stride
        self.depthwise = depthwise
        self.num_kernels = num_kernels
        self.od_kernels = od_kernels
        self.bank = bank
        self.temperature = 30.0
        cin_g = 1 if depthwise else in_channels
        # Where the dynamic kernels start: 1 when the static kernel is held apart from them.
        self.dynamic_start = int(bank == "separate" and (num_kernels > 1 or od_kernels > 0))
        kernels = self.dynamic_start + max(num_kernels, od_kernels, 1)
        # (K_bank, Cout_max, Cin_max/g, k_max, k_max)
        self.weight = nn.Parameter(torch.empty(kernels, out_channels, cin_g, kernel_size, kernel_size))
        self.attention = (
            ElasticKernelAttention(in_channels, num_kernels, reduction, min_hidden) if num_kernels > 1 else None
        )
        if od_kernels:
            self.od_attention = ElasticOmniAttention(
                in_channels, out_channels, kernel_size, od_kernels, depthwise=depthwise
            )
        if dcd_latent:
            self.dcd = ElasticDCDBranch(in_channels, out_channels, dcd_latent, dcd_pools, dcd_reduction)
        self.active_out_channels = out_channels
        self.active_kernel_size = kernel_size
        self.active_num_kernels = num_kernels
        self.active_op = "dy"
        self.active_latent = 0
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Each kernel as ``init_weights`` does a conv: kaiming normal, fan_out (of the largest).

        With ``"residual"``, the offsets ``1..`` are drawn at :data:`RESIDUAL_INIT_SCALE` of that.
        """
        for k in range(self.weight.shape[0]):
            nn.init.kaiming_normal_(self.weight.data[k], mode="fan_out")
            if self.bank == "residual" and k > 0:
                self.weight.data[k] *= RESIDUAL_INIT_SCALE

    def set_active(self, out_channels: int, kernel_size: int, num_kernels: int, op: str = "dy", latent: int = 0) -> None:
        """Select the output width, kernel size, operator (``dy``, ``od``, ``dcd``), its K and DCD's L."""
        _check_size("out_channels", out_channels, self.out_channels)
        _check_size("kernel_size", kernel_size, self.kernel_size)
        if kernel_size % 2 != 1:
            raise ValueError(f"`kernel_size` must be odd, but got {kernel_size=}.")
        if op == "dy":
            _check_size("num_kernels", num_kernels, self.num_kernels)
        elif op == "od" and self.od_kernels:
            _check_size("num_kernels", num_kernels, self.od_kernels)
        elif op == "dcd" and "dcd" in self._modules:
            _check_size("latent", latent, self.dcd.latent)
        else:
            raise ValueError(f"this layer has no {op!r} operator.")
        self.active_out_channels = out_channels
        self.active_kernel_size = kernel_size
        self.active_num_kernels = num_kernels
        self.active_op = op
        self.active_latent = latent

    def active_weight(self, in_channels: int) -> torch.Tensor:
        """Kernels ``[:K]``, output / input prefixes, centre crop: (K, Cout, Cin/g, k, k)."""
        cout = in_channels if self.depthwise else self.active_out_channels
        cin_g = 1 if self.depthwise else in_channels
        k = 1 if self.active_op == "dcd" else self.active_num_kernels
        static = self.active_op == "dcd" or (self.active_op == "dy" and k == 1)
        start = 0 if static else self.dynamic_start  # "separate": the dynamic kernels' own bank
        weight = centre_crop(self.weight[start : start + k, :cout, :cin_g], self.active_kernel_size)
        if self.bank == "residual" and k > 1:
            weight = torch.cat([weight[:1], weight[:1] + weight[1:]])  # kernel k = W0 + D_k
        return weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, Cin, H, W) with Cin <= in_channels -> (B, Cout, H', W')
        cin = x.shape[1]
        groups = cin if self.depthwise else 1
        padding = self.active_kernel_size // 2
        weight = self.active_weight(cin)  # (K, Cout, Cin/g, k, k)
        if self.active_op == "od":
            return self._od_forward(x, weight, padding, groups)
        if self.active_op == "dcd":
            return self.dcd(x, weight[0], self.active_latent)
        if self.active_num_kernels == 1:
            return F.conv2d(x, weight[0], None, self.stride, padding, 1, groups)
        pi = self.attention(x, self.active_num_kernels, self.temperature)  # (B, K)
        return _dynamic_conv(x, weight, pi, self.stride, padding, groups)

    def _od_forward(self, x: torch.Tensor, weight: torch.Tensor, padding: int, groups: int) -> torch.Tensor:
        """``a_f * conv(a_c * x, (sum_i a_w[i] W_i) * a_s)``: ODConv's definition, per sample."""
        k, num_kernels = self.active_kernel_size, self.active_num_kernels
        a_c, a_f, a_s, pi = self.od_attention(x, weight.shape[1], k, num_kernels, self.temperature)
        x = x * a_c[:, :, None, None]
        if pi is None and a_s is None:  # one kernel shared by the batch: a plain conv
            out = F.conv2d(x, weight[0], None, self.stride, padding, 1, groups)
        else:
            kernels = weight[:1] if pi is None else torch.mm(pi, weight.reshape(num_kernels, -1)).view(-1, *weight.shape[1:])
            if a_s is not None:
                kernels = kernels * a_s.view(-1, 1, 1, k, k)  # (B, Cout, Cin/g, k, k)
            out = _per_sample_conv(x, kernels, self.stride, padding, groups)
        return out if a_f is None else out * a_f[:, :, None, None]

    @torch.no_grad()
    def copy_active_to(self, target: nn.Module) -> None:
        """Copy the active slice into ``target``: ``nn.Conv2d`` (K = 1), ``DynamicConv2d``, ``ODConv2d`` or ``DCDConv2d``."""
        k, op = self.active_num_kernels, self.active_op
        expected = {"od": ODConv2d, "dcd": DCDConv2d}.get(op, nn.Conv2d if k == 1 else DynamicConv2d)
        if type(target) is not expected:
            raise RuntimeError(
                f"the active {op} K={k} needs a {expected.__name__} target, but got {type(target).__name__}."
            )
        weight = self.active_weight(target.in_channels)
        if op == "dcd":
            _copy(target.weight, weight[0], "weight")
            self.dcd.copy_active_to(target)
            return
        if k == 1 and op == "dy":
            _copy(target.weight, weight[0], "weight")
            return
        _copy(target.weight, weight, "weight")
        if op == "od":
            self.od_attention.copy_active_to(target.attention, weight.shape[1], self.active_kernel_size, k)
        else:
            for name, value in self.attention.active_parameters(target.in_channels, k).items():
                _copy(target.attention.get_parameter(name), value, f"attention.{name}")
        target.temperature = self.temperature

    def extra_repr(self) -> str:
        s = f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}"
        if self.depthwise:
            s += ", depthwise=True"
        s += f", num_kernels={self.num_kernels}"
        if self.od_kernels:
            s += f", od_kernels={self.od_kernels}"
        if "dcd" in self._modules:
            s += f", dcd_latent={self.dcd.latent}"
        if self.bank != "independent":
            s += f", bank={self.bank!r}"
        return s


def _dynamic_conv(
    x: torch.Tensor, weight: torch.Tensor, pi: torch.Tensor, stride: int, padding: int, groups: int
) -> torch.Tensor:
    """Each sample convolved with its own kernel ``sum_k pi_k W_k`` (Chen et al.'s aggregation).

    Args:
        x: (B, Cin, H, W); weight: (K, Cout, Cin/g, k, k); pi: (B, K).
    """
    mixed = torch.mm(pi, weight.reshape(weight.shape[0], -1))  # (B, Cout*Cin/g*k*k)
    return _per_sample_conv(x, mixed.view(-1, *weight.shape[1:]), stride, padding, groups)


def _per_sample_conv(x: torch.Tensor, kernels: torch.Tensor, stride: int, padding: int, groups: int) -> torch.Tensor:
    """Sample i convolved with ``kernels[i]`` (B, Cout, Cin/g, k, k); a (1, ...) kernel is shared."""
    if kernels.shape[0] == 1 and x.shape[0] != 1:
        kernels = kernels.expand(x.shape[0], *kernels.shape[1:])
    b, cout = x.shape[0], kernels.shape[1]
    if kernels.shape[-1] == 1 and stride == 1 and groups == 1:
        # A 1x1 conv is a matmul over pixels: one batched matmul, no batch folded into groups.
        out = torch.bmm(kernels.reshape(b, cout, -1), x.reshape(b, x.shape[1], -1))  # (B, Cout, H*W)
        return out.view(b, cout, *x.shape[2:])
    folded = x.reshape(1, -1, *x.shape[2:])  # (1, B*Cin, H, W): sample i meets only its kernel
    out = F.conv2d(folded, kernels.reshape(b * cout, *kernels.shape[2:]), None, stride, padding, 1, b * groups)
    return out.view(b, cout, *out.shape[2:])  # (B, Cout, H', W')


class _ElasticNorm:
    """BatchNorm over the first ``C`` channels of its largest width, ``C`` read off the input.

    Training updates only the active prefix of the running statistics (in place, through
    views), as OFA's ``DynamicBatchNorm2d``; ``momentum=None`` (a cumulative average, as
    ``nn.BatchNorm2d`` has it) is honoured, which is how BN statistics are recalibrated.
    """

    def _elastic_norm(self, x: torch.Tensor, training: bool) -> torch.Tensor:
        c = x.shape[1]  # x: (B, C, ...) with C <= num_features
        factor = self.momentum
        if training:
            self.num_batches_tracked.add_(1)
            if factor is None:
                factor = 1.0 / float(self.num_batches_tracked)
        return F.batch_norm(
            x,
            self.running_mean[:c],
            self.running_var[:c],
            self.weight[:c],
            self.bias[:c],
            training,
            0.0 if factor is None else factor,
            self.eps,
        )

    @torch.no_grad()
    def copy_active_to(self, target: nn.modules.batchnorm._BatchNorm) -> None:
        """Copy the first ``target.num_features`` channels' scale, shift and statistics."""
        c = target.num_features
        _check_size("num_features", c, self.num_features)
        for name in ("weight", "bias", "running_mean", "running_var"):
            _copy(getattr(target, name), getattr(self, name)[:c], name)
        target.num_batches_tracked.copy_(self.num_batches_tracked)


class ElasticBatchNorm1d(_ElasticNorm, nn.BatchNorm1d):
    """:class:`ElasticBatchNorm2d` over (B, C) features (ODConv's attention trunk).

    A training batch of one sample normalises with the running statistics and leaves them
    unchanged, as :class:`~dynas.ops.OmniAttention` does.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._elastic_norm(x, self.training and x.shape[0] > 1)


class ElasticBatchNorm2d(_ElasticNorm, nn.BatchNorm2d):
    """BatchNorm2d over the first ``C`` channels of its largest width (see ``_ElasticNorm``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._elastic_norm(x, self.training)


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

