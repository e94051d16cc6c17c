"""Omni-dimensional dynamic convolution, ODConv (Li, Zhou and Yao, ICLR 2022; official code OSVAI/ODConv).

A layer holds K kernels ``W_i`` (and biases ``b_i``) and, per sample, four attentions from one trunk::

    z   = ReLU(BN(FC(GAP(x))))            # (B, hidden), hidden = max(Cin // 16, 16)
    a_c = sigmoid(FC_c(z) / tau)          # (B, Cin)    input channels
    a_f = sigmoid(FC_f(z) / tau)          # (B, Cout)   filters; none (1) for a depthwise conv
    a_s = sigmoid(FC_s(z) / tau)          # (B, kh*kw)  kernel positions; none (1) for a 1x1 conv
    a_w = softmax(FC_w(z) / tau)          # (B, K)      kernels; none (1) for K = 1
    W(x) = sum_i a_w[i] * (a_f x a_c x a_s) . W_i,   b(x) = sum_i a_w[i] b_i

where ``a_f x a_c x a_s`` is the outer product along the kernel's (Cout, Cin/g, kh, kw) axes
(``a_c`` indexed by each filter's own input channels). The official code's choices are kept:
BatchNorm in the trunk, no bias in its first FC, the attentions it skips, every attention divided
by the temperature (annealed 30 -> 1 in the paper's training, like DY-conv's), and its init, except
that the heads start at zero (:meth:`OmniAttention.reset_parameters` says why and what it measured;
:meth:`OmniAttention.official_init` restores the official heads).

How it runs (every path computes ``conv(x, W(x)) + b(x)`` exactly):

* the kernel: ``a_w @ W`` (a matmul, as DY-conv's aggregation; none for K = 1) times ``a_s``
  (none for 1x1). For K = 1 and 1x1 it is the one static kernel of every sample: the layer is a
  static conv between two channel scalings, ``a_f * conv(a_c * x, W_1)`` (the official
  ``_forward_impl_pw1x``), no per-sample kernel counted or needed;
* each channel attention multiplies whichever is smaller, the kernel or the feature map (the
  official code always scales the features, the cheaper choice on late, small maps but not on
  early, large ones: scaling the 3,456-element kernel of a 1x 24 -> 144 conv at 56x56 instead of
  its 75K input and 452K output elements takes 0.39x the time at batch 1, 0.28x at batch 32,
  1 thread, channels_last; 144 -> 24: 0.76x). A kernel that stays shared runs as
  one conv; per-sample kernels run, for a 1x1 conv, as one batched matmul over pixels (as
  DY-conv: 1.2-2x faster than a grouped conv in a training step), else as a plain conv at batch 1
  or one grouped conv over the batch folded into channels (a depthwise conv stays depthwise);
* traced (``torch.jit.trace``, ONNX, fvcore): every attention folded into the per-sample kernel,
  then im2col + one matmul, so that no shape depends on the batch size.

BatchNorm at batch 1: in training, BatchNorm over one sample has no statistics (PyTorch raises);
the trunk then normalises with the running statistics, exactly as in eval mode, and leaves them
unchanged. Batches of 2 and more train as in the official code. (A norm defined per sample would
change the official model; falling back keeps it and makes a single sample -- a latency probe,
the last batch of an epoch -- give the inference result.)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.utils import _pair

from dynas.checks import check_int
from dynas.spec import odconv_hidden_channels

__all__ = ["ODConv2d", "OmniAttention"]


class OmniAttention(nn.Module):
    """ODConv's attention branch: GAP -> FC -> BN -> ReLU, then one FC for all four heads.

    The four heads of the official code (channel, filter, spatial, kernel) are rows of one
    ``heads`` Linear (one matmul instead of four); a head the layer skips has no rows.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: tuple[int, int],
        groups: int,
        num_kernels: int,
        reduction: int = 16,
        min_hidden: int = 16,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        check_int("reduction", reduction)
        check_int("min_hidden", min_hidden)
        hidden = odconv_hidden_channels(in_channels, reduction, min_hidden)
        depthwise = in_channels == groups == out_channels
        #: Rows of each head: channel, filter, spatial, kernel (0 = skipped, as officially).
        self.sizes = (
            in_channels,
            0 if depthwise else out_channels,
            0 if kernel_size == (1, 1) else kernel_size[0] * kernel_size[1],
            0 if num_kernels == 1 else num_kernels,
        )
        factory = {"device": device, "dtype": dtype}
        self.fc = nn.Linear(in_channels, hidden, bias=False, **factory)
        self.bn = nn.BatchNorm1d(hidden, **factory)
        self.heads = nn.Linear(hidden, sum(self.sizes), **factory)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The official init of the trunk (kaiming normal, fan_out, ReLU; BN 1 / 0), zero heads.

        Zero heads make every logit 0 at any temperature: each gate starts at 1/2 and the kernel
        attention uniform, so a fresh layer is a static conv (of the mean kernel) times constant
        gates, and the gates grow from there as they learn. The official heads (kaiming normal,
        :meth:`official_init`) give raw logits of several units that the BatchNorm'd trunk keeps
        at that size; once tau nears 1 before the heads have learned, which a short run reaches in
        tens of steps instead of ImageNet's 10 epochs, those random gates multiply three ways and
        the network stops learning. digits x0.35 at 16x16, 6 epochs, lr 0.05, tau 30 -> 1 over
        half the steps, seed 0: 1x 11.9% test with the official heads, 93.6% with zero heads
        (4x: 91.9%; static 94.9%).
        """
        self.official_init()
        with torch.no_grad():
            nn.init.zeros_(self.heads.weight)

    def official_init(self) -> None:
        """The official init: kaiming normal (fan_out, ReLU) per FC and per head, zero biases, BN 1 / 0."""
        with torch.no_grad():
            nn.init.kaiming_normal_(self.fc.weight, mode="fan_out", nonlinearity="relu")
            for rows in self.heads.weight.split(self.sizes):
                if rows.numel():
                    nn.init.kaiming_normal_(rows, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(self.heads.bias)
        nn.init.ones_(self.bn.weight)
        nn.init.zeros_(self.bn.bias)

    def _norm(self, z: torch.Tensor) -> torch.Tensor:
        bn = self.bn
        if self.training and z.shape[0] == 1:  # no batch statistics in one sample: use the running ones
            return F.batch_norm(z, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)
        return bn(z)

    def forward(
        self, x: torch.Tensor, temperature: float
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """``(a_c (B, Cin), a_f (B, Cout), a_s (B, kh*kw), a_w (B, K))``; a skipped attention is ``None``."""
        pooled = x.sum(dim=(2, 3)) / (x.shape[2] * x.shape[3])  # (B, Cin); a sum's backward is a broadcast view
        z = self._norm(F.linear(pooled, self.fc.weight)).relu()  # (B, hidden)
        inv_tau = 1.0 / temperature  # folded into the matmul's scalars
        logits = torch.addmm(self.heads.bias, z, self.heads.weight.t(), beta=inv_tau, alpha=inv_tau)
        channel, filters, spatial, kernels = logits.split(self.sizes, dim=1)
        return (
            torch.sigmoid(channel),
            torch.sigmoid(filters) if self.sizes[1] else None,
            torch.sigmoid(spatial) if self.sizes[2] else None,
            torch.softmax(kernels, dim=1) if self.sizes[3] else None,
        )


def _column_major(pi: torch.Tensor) -> torch.Tensor:
    """``pi`` (B, K) column-major under autograd: its gradient GEMM then runs as ``(W @ grad.T).T``.

    The same trick as :mod:`dynas.ops.dynamic_conv` (a GEMM with K output columns is 10-20x slower).
    """
    return pi.t().contiguous().t() if pi.requires_grad else pi


def conv_padding(padding: int | tuple[int, int] | str, stride: tuple[int, int]) -> tuple[int, int] | str:
    """``padding`` checked as ``nn.Conv2d`` takes it: non-negative ints, a pair, ``"same"`` (stride 1) or ``"valid"``."""
    if isinstance(padding, str):
        if padding not in ("same", "valid"):
            raise ValueError(f"`padding` must be an int, a pair or one of 'same', 'valid', but got {padding=!r}.")
        if padding == "same" and any(s != 1 for s in stride):
            raise ValueError(f"`padding='same'` requires stride 1 (as in nn.Conv2d), but got stride={stride}.")
        return padding
    pad = _pair(padding)
    if any(isinstance(p, bool) or not isinstance(p, int) or p < 0 for p in pad):
        raise ValueError(f"`padding` must be non-negative integers, but got {padding=!r}.")
    return pad


def explicit_pad(
    x: torch.Tensor, padding: tuple[int, int] | str, kernel_size: tuple[int, int], dilation: tuple[int, int]
) -> torch.Tensor:
    """``x`` zero-padded as the conv would pad it ('same' asymmetric for an even receptive field)."""
    if padding == "valid":
        return x
    if padding == "same":
        pads: list[int] = []
        for k, d in zip(reversed(kernel_size), reversed(dilation)):
            total = d * (k - 1)
            pads += [total // 2, total - total // 2]
        return F.pad(x, pads) if any(pads) else x
    ph, pw = padding
    return F.pad(x, [pw, pw, ph, ph]) if ph or pw else x


class ODConv2d(nn.Module):
    """A drop-in for :class:`torch.nn.Conv2d` with ODConv's four attentions over K kernels.

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias:
            as in :class:`torch.nn.Conv2d` (``padding`` accepts ``"same"`` and ``"valid"``;
            depthwise is ``groups == in_channels == out_channels``, which has no filter attention).
        num_kernels: K >= 1 (the paper's "1x" and "4x"); K = 1 has no kernel attention.
        reduction, min_hidden: attention width ``max(in_channels // reduction, min_hidden)``
            (the official 1/16 and 16).
        temperature: tau > 0 of every attention; settable at any time
            (:func:`dynas.temperature.set_temperature` reaches it).

    The kernel attention of the most recent forward is kept, detached, in :attr:`last_attention`
    (``(B, K)``; ``None`` for K = 1) for logging.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] | str = 0,
        dilation: int | tuple[int, int] = 1,
        groups: int = 1,
        bias: bool = True,
        *,
        num_kernels: int = 4,
        reduction: int = 16,
        min_hidden: int = 16,
        temperature: float = 30.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        for name, value in (("in_channels", in_channels), ("out_channels", out_channels), ("groups", groups)):
            check_int(name, value)
        check_int("num_kernels", num_kernels)
        if in_channels % groups or out_channels % groups:
            raise ValueError(
                "`in_channels` and `out_channels` must be divisible by `groups`, "
                f"but got {in_channels=}, {out_channels=}, {groups=}."
            )
        self.kernel_size, self.stride, self.dilation = _pair(kernel_size), _pair(stride), _pair(dilation)
        for name in ("kernel_size", "stride", "dilation"):
            for v in getattr(self, name):
                check_int(name, v)
        self.padding = conv_padding(padding, self.stride)
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        self.num_kernels = num_kernels
        self.temperature = temperature
        factory = {"device": device, "dtype": dtype}
        kh, kw = self.kernel_size
        # (K, Cout, Cin/g, kh, kw)
        self.weight = nn.Parameter(torch.empty(num_kernels, out_channels, in_channels // groups, kh, kw, **factory))
        self.bias = nn.Parameter(torch.empty(num_kernels, out_channels, **factory)) if bias else None  # (K, Cout)
        self.attention = OmniAttention(
            in_channels, out_channels, self.kernel_size, groups, num_kernels, reduction, min_hidden, **factory
        )
        self.last_attention: torch.Tensor | None = None
        self.reset_parameters()

    @property
    def temperature(self) -> float:
        """Temperature tau (> 0) of every attention."""
        return self._temperature

    @temperature.setter
    def temperature(self, value: float) -> None:
        value = float(value)
        if not (value > 0 and math.isfinite(value)):
            raise ValueError(f"`temperature` must be a finite number > 0, but got temperature={value}.")
        self._temperature = value

    def reset_parameters(self) -> None:
        """Each kernel as the official code draws it (kaiming normal, fan_out); biases as nn.Conv2d's."""
        for k in range(self.num_kernels):
            nn.init.kaiming_normal_(self.weight[k], mode="fan_out", nonlinearity="relu")
        if self.bias is not None:
            fan_in = self.weight[0, 0].numel()
            bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"ODConv2d expects input of shape (B, {self.in_channels}, H, W), but got {tuple(x.shape)}."
            )
        a_c, a_f, a_s, pi = self.attention(x, self.temperature)
        self.last_attention = pi.detach() if pi is not None else None
        bias = self._mixed_bias(pi)  # (B, Cout), (Cout,) or None
        weight = self._kernels(pi, a_s)  # (B, Cout, Cin/g, kh, kw); (1, ...) when shared by the batch
        if torch.jit.is_tracing():  # batch-agnostic: every attention in the kernel, im2col + matmul
            return self._conv_matmul(x, self._scale_filters(self._scale_inputs(weight, a_c), a_f), bias)
        per_sample = weight[0].numel()  # kernel elements per sample
        if per_sample <= self.in_channels * x.shape[2] * x.shape[3]:
            weight = self._scale_inputs(weight, a_c)
        else:
            x = x * a_c[:, :, None, None]
        fold_filters = a_f is not None and per_sample <= self.out_channels * self._out_pixels(x.shape[2], x.shape[3])
        if fold_filters:
            weight = self._scale_filters(weight, a_f)
        if weight.shape[0] == 1 and x.shape[0] > 1:  # K = 1, 1x1, attentions on the features: one shared conv
            out = F.conv2d(x, weight[0], None, self.stride, self.padding, self.dilation, self.groups)
        elif self._pointwise:  # a batched matmul over pixels: 1.2-2x faster than a grouped conv (training)
            out = self._conv_matmul(x, weight, None)
        else:
            out = self._per_sample_conv(x, weight)
        return self._scale_and_shift(out, None if fold_filters else a_f, bias)

    @property
    def _pointwise(self) -> bool:
        """A 1x1, stride-1, unpadded, ungrouped conv: a plain matmul over pixels."""
        unpadded = self.padding in ("same", "valid", (0, 0))
        return self.kernel_size == (1, 1) and self.stride == (1, 1) and self.groups == 1 and unpadded

    def _out_pixels(self, height: int, width: int) -> int:
        """H' * W' of the conv on an H x W map."""
        if self.padding == "same":
            return height * width
        pad = (0, 0) if self.padding == "valid" else self.padding
        sizes = zip((height, width), pad, self.dilation, self.kernel_size, self.stride)
        h, w = ((n + 2 * p - d * (k - 1) - 1) // s + 1 for n, p, d, k, s in sizes)
        return h * w

    def _mixed_bias(self, pi: torch.Tensor | None) -> torch.Tensor | None:
        if self.bias is None:
            return None
        return self.bias[0] if pi is None else torch.mm(pi, self.bias)  # (Cout,) or (B, Cout)

    def _kernels(self, pi: torch.Tensor | None, a_s: torch.Tensor | None) -> torch.Tensor:
        """``sum_i a_w[i] W_i`` times the spatial attention: (B, Cout, Cin/g, kh, kw) (B = 1 if shared)."""
        k, shape = self.num_kernels, self.weight.shape[1:]
        if pi is None:
            weight = self.weight  # (1, Cout, Cin/g, kh, kw)
        else:
            pi = pi if torch.jit.is_tracing() else _column_major(pi)  # a trace records no layout tricks
            weight = torch.mm(pi, self.weight.reshape(k, -1)).reshape(-1, *shape)
        if a_s is not None:
            weight = weight * a_s.reshape(-1, 1, 1, *self.kernel_size)
        return weight

    def _scale_inputs(self, weight: torch.Tensor, a_c: torch.Tensor) -> torch.Tensor:
        """The kernel times the input-channel attention, each filter by its own group's channels."""
        g, cout, cin = self.groups, self.out_channels, self.in_channels
        kh, kw = self.kernel_size
        scaled = weight.reshape(-1, g, cout // g, cin // g, kh, kw) * a_c.reshape(-1, g, 1, cin // g, 1, 1)
        return scaled.reshape(-1, cout, cin // g, kh, kw)

    def _scale_filters(self, weight: torch.Tensor, a_f: torch.Tensor | None) -> torch.Tensor:
        return weight if a_f is None else weight * a_f.reshape(-1, self.out_channels, 1, 1, 1)

    @staticmethod
    def _scale_and_shift(out: torch.Tensor, a_f: torch.Tensor | None, bias: torch.Tensor | None) -> torch.Tensor:
        """``a_f * out + b``: the filter attention on the output (unless folded), then the bias."""
        if a_f is not None:
            out = out * a_f[:, :, None, None]
        if bias is not None:
            out = out + (bias[:, :, None, None] if bias.dim() == 2 else bias[:, None, None])
        return out

    def _per_sample_conv(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """Sample i convolved with ``weight[i]``: a plain conv at batch 1, else one grouped conv."""
        b = x.shape[0]
        if b == 1:
            return F.conv2d(x, weight[0], None, self.stride, self.padding, self.dilation, self.groups)
        out = F.conv2d(
            x.reshape(1, b * self.in_channels, *x.shape[2:]),  # (1, B*Cin, H, W)
            weight.reshape(b * self.out_channels, *weight.shape[2:]),  # (B*Cout, Cin/g, kh, kw)
            None, self.stride, self.padding, self.dilation, b * self.groups,
        )
        return out.reshape(b, self.out_channels, *out.shape[2:])  # (B, Cout, H', W')

    def _conv_matmul(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """im2col + one batched matmul with per-sample kernels; no shape depends on the batch size."""
        g, cin, cout = self.groups, self.in_channels, self.out_channels
        (kh, kw), (sh, sw), (dh, dw) = self.kernel_size, self.stride, self.dilation
        x = explicit_pad(x, self.padding, self.kernel_size, self.dilation)
        h, w = int(x.shape[2]), int(x.shape[3])
        ho, wo = (h - dh * (kh - 1) - 1) // sh + 1, (w - dw * (kw - 1) - 1) // sw + 1
        if (kh, kw, sh, sw) == (1, 1, 1, 1):
            cols = x.reshape(-1, cin, h * w)  # (B, Cin, L)
        else:
            cols = F.unfold(x, (kh, kw), (dh, dw), 0, (sh, sw))  # (B, Cin*kh*kw, L)
        cols = cols.reshape(-1, g, (cin // g) * kh * kw, ho * wo)  # (B, g, Cin/g*kh*kw, L)
        w_mat = weight.reshape(-1, g, cout // g, (cin // g) * kh * kw)  # (B, g, Cout/g, Cin/g*kh*kw)
        out = torch.matmul(w_mat, cols).reshape(-1, cout, ho, wo)  # (B, Cout, H', W')
        return self._scale_and_shift(out, None, bias)

    def attention_entropy(self) -> float | None:
        """Mean entropy (nats) of the most recent kernel attention (``log K`` when uniform); None for K = 1."""
        if self.last_attention is None:
            return None
        p = self.last_attention.float().clamp_min(1e-12)
        return float(-(p * p.log()).sum(dim=1).mean())

    def extra_repr(self) -> str:
        s = (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, padding={self.padding}"
        )
        if self.dilation != (1, 1):
            s += f", dilation={self.dilation}"
        if self.groups != 1:
            s += f", groups={self.groups}"
        if self.bias is None:
            s += ", bias=False"
        return s + f", num_kernels={self.num_kernels}, temperature={self.temperature:g}"
