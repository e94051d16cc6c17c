"""Dynamic convolution decomposition, DCD (Li et al., ICLR 2021, arXiv 2103.08756; code liyunsheng13/dcd).

A 1x1 conv whose kernel is a static one scaled per output channel plus a dynamic channel fusion
in a latent space of L << C channels::

    Lambda(x) = diag(relu6(FC_l(z) + 3) / 3)     # (B, Cout), in [0, 2]: 1 at z = 0
    Phi(x)    = FC_phi(z).view(L, L)               # (B, L, L)
    W(x)      = Lambda(x) W0 + P Phi(x) Q^T        # W0 (Cout, Cin), P (Cout, L), Q (Cin, L)
    y         = W(x) x + b                         # b: an optional static bias

with ``z`` from the official attention branch: the input pooled (a 2x2 average pool for a
widening conv, ``in < out``, else global), then FC -> ``z * hsigmoid(FC(z))`` (the official
``SEModule_small``). Default widths are the official code's (``DYModule``, fc-squeeze 16):
:func:`~dynas.spec.dcd_latent_channels`, :func:`~dynas.spec.dcd_hidden_channels`. There is no
temperature. The official module also adds the identity to Phi and BatchNorms after ``Q^T x`` and
after ``Phi``; they are left out: the paper's W(x) has neither, a BatchNorm inside a per-sample
kernel makes a training sample depend on its batch, and neither changes the cost beyond 4L
parameters per conv.

How it runs (both compute ``W(x) x + b`` exactly; :func:`~dynas.spec.dcd_factorized` picks the one
with fewer MACs, from the map size): on small maps factorized, ``Lambda (W0 x) + P (Phi (Q^T x))``
-- one shared 1x1 conv with ``[W0; Q^T]``, a per-sample L x L matmul, a shared 1x1 conv with P --
with no per-sample kernel; on large maps merged, one ``(Cout, Cin)`` kernel per sample
(``Cout * L * (L + Cin)`` MACs to build) and one batched matmul. Traces take the same path, so
fvcore counts what runs.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.utils import _pair

from dynas.checks import check_int
from dynas.ops.odconv import conv_padding, explicit_pad
from dynas.spec import dcd_factorized, dcd_hidden_channels, dcd_latent_channels, dcd_pooled_width

__all__ = ["DCDAttention", "DCDConv2d", "dcd_hsigmoid", "dcd_pool"]


def dcd_hsigmoid(t: torch.Tensor) -> torch.Tensor:
    """The official ``Hsigmoid``: ``relu6(t + 3) / 3``, in [0, 2].

    Not ``2 * F.hardsigmoid``: its backward on CPU uses a float32 1/6, off by 3e-8 in float64.
    """
    return F.relu6(t + 3.0) / 3.0


def dcd_pool(x: torch.Tensor, quadrants: bool) -> torch.Tensor:
    """DCD's attention input: (B, Cin) averages, or with ``quadrants`` (B, 4 * Cin) for a 2x2
    adaptive average pool (channel-major, as the official ``.view``)."""
    if not quadrants:
        return x.sum(dim=(2, 3)) / (x.shape[2] * x.shape[3])
    h, w = x.shape[2], x.shape[3]
    top, left = (h + 1) // 2, (w + 1) // 2  # adaptive pooling's bins: [0, ceil(n/2)) and [n//2, n)
    rows = (x[:, :, :top], x[:, :, h // 2 :])
    cells = [r[:, :, :, cols] for r in rows for cols in (slice(None, left), slice(w // 2, None))]
    return torch.stack([c.mean(dim=(2, 3)) for c in cells], dim=2).flatten(1)  # (B, Cin * 4)


class DCDAttention(nn.Module):
    """DCD's dynamic branch: pool -> FC -> ``z * hsigmoid(FC(z))`` -> one FC for ``Phi`` and ``Lambda``."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        latent: int,
        reduction: int = 16,
        min_hidden: int = 4,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        check_int("reduction", reduction)
        check_int("min_hidden", min_hidden)
        self.quadrants = in_channels < out_channels  # a 2x2 pool (official, widening convs)
        pooled = dcd_pooled_width(in_channels, out_channels)
        hidden = dcd_hidden_channels(pooled, latent, reduction, min_hidden)
        self.latent, self.out_channels = latent, out_channels
        factory = {"device": device, "dtype": dtype}
        self.fc = nn.Linear(pooled, hidden, bias=False, **factory)
        self.gate = nn.Linear(hidden, hidden, bias=False, **factory)
        self.heads = nn.Linear(hidden, latent * latent + out_channels, bias=False, **factory)  # Phi, Lambda

    def _pool(self, x: torch.Tensor) -> torch.Tensor:
        return dcd_pool(x, self.quadrants)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(Lambda (B, Cout), Phi (B, L, L))``."""
        z = F.linear(self._pool(x), self.fc.weight)  # (B, hidden)
        z = z * dcd_hsigmoid(F.linear(z, self.gate.weight))
        phi, scale = F.linear(z, self.heads.weight).split([self.latent**2, self.out_channels], dim=1)
        return dcd_hsigmoid(scale), phi.reshape(-1, self.latent, self.latent)


class DCDConv2d(nn.Module):
    """A drop-in for a 1x1 :class:`torch.nn.Conv2d` computing ``(Lambda(x) W0 + P Phi(x) Q^T) x + b``.

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias:
            as in :class:`torch.nn.Conv2d`; ``kernel_size`` must be 1 and ``groups`` 1.
        latent: L, the latent width (default: the official rule,
            :func:`~dynas.spec.dcd_latent_channels`).
        reduction, min_hidden: attention width ``max(max(pooled, L**2) // reduction, min_hidden)``
            (the official fc-squeeze 16 and 4).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int] = 1,
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] | str = 0,
        dilation: int | tuple[int, int] = 1,
        groups: int = 1,
        bias: bool = True,
        *,
        latent: int | None = None,
        reduction: int = 16,
        min_hidden: int = 4,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        check_int("in_channels", in_channels)
        check_int("out_channels", out_channels)
        if _pair(kernel_size) != (1, 1):
            raise ValueError(f"DCDConv2d is a 1x1 conv: `kernel_size` must be 1, but got {kernel_size=!r}.")
        if groups != 1:
            raise ValueError(f"DCDConv2d is a dense conv: `groups` must be 1, but got {groups=!r}.")
        self.kernel_size, self.stride, self.dilation = (1, 1), _pair(stride), _pair(dilation)
        for name in ("stride", "dilation"):
            for v in getattr(self, name):
                check_int(name, v)
        self.padding = conv_padding(padding, self.stride)
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, 1
        self.latent = dcd_latent_channels(in_channels, out_channels) if latent is None else check_int("latent", latent)
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, 1, 1, **factory))  # W0, as nn.Conv2d's
        self.weight_q = nn.Parameter(torch.empty(self.latent, in_channels, **factory))  # Q^T (L, Cin)
        self.weight_p = nn.Parameter(torch.empty(out_channels, self.latent, **factory))  # P (Cout, L)
        self.bias = nn.Parameter(torch.empty(out_channels, **factory)) if bias else None
        self.attention = DCDAttention(in_channels, out_channels, self.latent, reduction, min_hidden, **factory)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """W0 and Q as nn.Conv2d initialises a kernel (each a 1x1 conv), the bias likewise; P zero.

        With P = 0 a fresh layer is its static part ``Lambda(x) W0 x + b``, and the dynamic branch
        grows from zero (as a residual branch initialised to zero). The official module keeps that
        branch in check with the BatchNorms left out here; with P initialised like W0 instead, a
        DCD-MobileNetV2 x0.35 on digits (16x16, 6 epochs, lr 0.05) diverged to chance (11.8% val
        top-1; it learned at lr 0.02), and with P = 0 it reached 96.5% (static 97.9%).
        """
        for weight in (self.weight, self.weight_q):
            nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
        nn.init.zeros_(self.weight_p)
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_channels)
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"DCDConv2d expects input of shape (B, {self.in_channels}, H, W), but got {tuple(x.shape)}."
            )
        lam, phi = self.attention(x)  # (B, Cout), (B, L, L)
        x = explicit_pad(x, self.padding, self.kernel_size, self.dilation)
        if self.stride != (1, 1):
            x = x[:, :, :: self.stride[0], :: self.stride[1]]
        pixels = int(x.shape[2]) * int(x.shape[3])
        if dcd_factorized(pixels, self.in_channels, self.out_channels, self.latent):
            out = self._factorized(x, lam, phi)
        else:
            out = self._merged(x, lam, phi)
        return out if self.bias is None else out + self.bias[:, None, None]

    def _factorized(self, x: torch.Tensor, lam: torch.Tensor, phi: torch.Tensor) -> torch.Tensor:
        """``Lambda (W0 x) + P (Phi (Q^T x))``: two shared 1x1 convs and one per-sample L x L matmul."""
        cout, latent = self.out_channels, self.latent
        if torch.is_grad_enabled():  # one conv with [W0; Q^T]: the faster under autograd
            stacked = torch.cat([self.weight, self.weight_q[:, :, None, None]])  # (Cout + L, Cin, 1, 1)
            static, z = F.conv2d(x, stacked).split([cout, latent], dim=1)  # (B, Cout, H, W), (B, L, H, W)
        else:  # two convs, no copy of the weights: 0.75x the time at batch 1 (960 -> 160 at 7x7)
            static, z = F.conv2d(x, self.weight), F.conv2d(x, self.weight_q[:, :, None, None])
        h, w = z.shape[2], z.shape[3]
        z = torch.matmul(phi, z.reshape(-1, latent, h * w)).reshape(-1, latent, h, w)  # (B, L, H, W)
        return static * lam[:, :, None, None] + F.conv2d(z, self.weight_p[:, :, None, None])

    def _merged(self, x: torch.Tensor, lam: torch.Tensor, phi: torch.Tensor) -> torch.Tensor:
        """One kernel ``Lambda W0 + P Phi Q^T`` per sample, then one batched matmul over pixels."""
        b, cin, h, w = x.shape
        cout = self.out_channels
        p_phi = torch.matmul(phi.transpose(1, 2), self.weight_p.t()).transpose(1, 2)  # (B, Cout, L)
        kernels = torch.matmul(p_phi, self.weight_q) + lam[:, :, None] * self.weight.reshape(cout, cin)  # (B, Cout, Cin)
        if not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
            cols = x.permute(0, 2, 3, 1).reshape(-1, h * w, cin)  # (B, L, Cin), a view
            return torch.matmul(cols, kernels.transpose(1, 2)).reshape(-1, h, w, cout).permute(0, 3, 1, 2)
        out = torch.matmul(kernels, x.reshape(-1, cin, h * w))  # (B, Cout, L)
        return out.reshape(-1, cout, h, w)

    def extra_repr(self) -> str:
        s = f"{self.in_channels}, {self.out_channels}, kernel_size=(1, 1), stride={self.stride}, padding={self.padding}"
        if self.bias is None:
            s += ", bias=False"
        return s + f", latent={self.latent}"
