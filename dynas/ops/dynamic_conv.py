"""Dynamic convolution (Chen et al., CVPR 2020, arXiv 1912.03458).

A layer holds K kernels ``W_k`` (and biases ``b_k``) and mixes them per input sample::

    pi(x) = softmax(FC2(ReLU(FC1(GAP(x)))) / tau)        # (B, K), pi >= 0, sum_k pi_k = 1
    W(x)  = sum_k pi_k(x) W_k,   b(x) = sum_k pi_k(x) b_k

Each sample is convolved with its own aggregated kernel. The aggregation is one matmul
(fvcore counts matmul; it cannot see an elementwise mul + sum).

How the per-sample convolution runs (all paths compute the same function; each was kept because
it measured fastest for its shapes, see ``benchmarks/bench_ops.py``):

* traced (``torch.jit.trace``, fvcore): aggregate, then im2col + one matmul (a reshape + matmul
  for 1x1 stride 1) -- no shape depends on the batch size;
* traced for deployment (inside :func:`deploy_trace`, as :mod:`dynas.export.formats` does): every
  shape but the batch size is a constant, so that the graph has no shape arithmetic. With a dynamic
  batch axis, ONNX gets a per-sample MatMul for 1x1 convs (ONNX's Conv takes one kernel for the
  whole batch, and its group count is an attribute, so the batch cannot be folded into channels)
  and im2col + MatMul otherwise. Specialised to one batch size (``dynamic_batch=False``), ONNX
  gets a plain Conv with the mixed kernel (a grouped Conv over the batch folded into channels
  above batch 1), which runtimes fuse with the following activation. TorchScript gets the eager
  1x1 paths either way (batch-agnostic as traced, and faster than a conv there) and, for other
  convs, a scripted conv that folds the batch into channels at run time (or, specialised, the
  conv of that batch size);
* 1x1, stride 1, unpadded, ungrouped (most of a MobileNet's MACs), on a map of more than
  :attr:`DynamicConv2d.mix_max_pixels` pixels: aggregate, then one batched matmul over pixels,
  which reads either memory format in place (no oneDNN reorder of input, kernel or output);
* the same conv on a small map (the last stages of a net on 32x32 inputs): one matmul with all
  K kernels shared by the batch -- K times the conv MACs, but no (Cout, Cin) kernel per sample
  written and read back, which costs more when pixels are few. Either the input is scaled by
  each pi_k and the K kernels run as one (Cout, K*Cin) kernel, or the K kernels run and their
  outputs are mixed by pi, whichever writes the smaller intermediate;
* any other conv at batch 1: aggregate, then a plain ``conv2d`` with ``groups=groups``;
* any other conv at batch B > 1: aggregate, then one grouped conv with ``groups = B * groups``
  on the batch folded into channels (never K separate convolutions). Folding needs a
  contiguous tensor, so a channels_last input is copied in and the output copied back.

Autograd: ``pi`` enters every aggregation column-major, so that its gradient is computed as
``(W @ grad.T).T``, not as ``grad @ W.T`` (a GEMM with K output columns, 10-20x slower on CPU);
a channels_last input under autograd gets its kernels aggregated as (Cin, Cout), so that the
per-sample kernel's gradient needs no transposing copy.

Memory format: the output has the input's format on every path. The fastest layout is
channels_last for static and dynamic networks alike (oneDNN convolutions run without reorders,
and the pointwise matmuls read it in place); a depthwise or k x k *dynamic* conv at batch > 1 is
the exception, it pays two copies in channels_last. ``model.to(memory_format=torch.channels_last)``
refuses 5-D parameters such as :attr:`DynamicConv2d.weight` ``(K, Cout, Cin/g, kh, kw)``:
convert the input (convs follow it) and, if wanted, only the 4-D parameters.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math
from collections.abc import Callable, Iterator
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.utils import _pair

from dynas.checks import check_int

__all__ = ["DynamicConv2d", "KernelAttention", "deploy_trace"]

_ATTENTIONS = ("softmax", "sigmoid")


class KernelAttention(nn.Module):
    """The routing branch: GAP -> FC -> ReLU -> FC -> (/tau) -> softmax (or sigmoid).

    ``hidden = max(in_channels // reduction, min_hidden)``, as in squeeze-and-excitation.
    """

    def __init__(
        self,
        in_channels: int,
        num_kernels: int,
        reduction: int = 4,
        min_hidden: int = 4,
        attention: Literal["softmax", "sigmoid"] = "softmax",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        check_int("reduction", reduction)
        check_int("min_hidden", min_hidden)
        if attention not in _ATTENTIONS:
            raise ValueError(f"`attention` must be one of {_ATTENTIONS}, but got {attention=!r}.")
        self.attention = attention
        self.num_kernels = num_kernels
        hidden = max(in_channels // reduction, min_hidden)
        factory = {"device": device, "dtype": dtype}
        self.fc1 = nn.Linear(in_channels, hidden, **factory)
        self.fc2 = nn.Linear(hidden, num_kernels, **factory)

    def forward(self, x: torch.Tensor, temperature: float) -> torch.Tensor:
        # x: (B, Cin, H, W) -> pi: (B, K).
        # GAP as a sum, not x.mean: mean's backward writes a full-size (B, Cin, H, W) gradient
        # and then adds it to x's; the sum's is a broadcast view, added in one pass.
        if _DEPLOY.get() is not None and torch.jit.is_tracing():
            pooled = x.mean(dim=(2, 3))  # one ReduceMean, no shape arithmetic in the graph
        else:
            pooled = x.sum(dim=(2, 3)) / (x.shape[2] * x.shape[3])  # (B, Cin)
        hidden = torch.addmm(self.fc1.bias, pooled, self.fc1.weight.t()).relu_()  # (B, hidden)
        inv_tau = 1.0 / temperature  # folded into the matmul's scalars: one op fewer per layer
        logits = torch.addmm(self.fc2.bias, hidden, self.fc2.weight.t(), beta=inv_tau, alpha=inv_tau)
        if self.attention == "softmax":
            return torch.softmax(logits, dim=1)
        return torch.sigmoid(logits)


#: Inside :func:`deploy_trace`: whether the traced graph keeps a dynamic batch axis.
_DEPLOY: contextvars.ContextVar[bool | None] = contextvars.ContextVar("dynas_deploy_trace", default=None)


@contextlib.contextmanager
def deploy_trace(*, dynamic_batch: bool = True) -> Iterator[None]:
    """Trace :class:`DynamicConv2d` layers in their deployment form (see the module docstring).

    Inside it, ``torch.jit.trace`` and ``torch.onnx.export`` record graphs whose shapes are
    constants except the batch size; with ``dynamic_batch=False`` the batch size too, which
    lets each layer run as a plain conv with its mixed kernel. Outside it, tracing records the
    batch-agnostic matmul form that fvcore counts.
    """
    token = _DEPLOY.set(dynamic_batch)
    try:
        yield
    finally:
        _DEPLOY.reset(token)


@functools.cache
def _scripted_per_sample_conv() -> Callable[..., torch.Tensor]:
    """A TorchScript conv with per-sample kernels whose batch size is read at run time.

    A traced conv bakes ``groups = B * g`` into the graph; this one, called from a trace,
    computes it per call (compiled on first use, not at import).
    """

    def per_sample_conv(
        x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
        stride: list[int], dilation: list[int], groups: int,
    ) -> torch.Tensor:
        # x: (B, Cin, H, W) already padded, weight: (B, Cout, Cin/g, kh, kw), bias: (B, Cout) or (Cout,)
        b, cout = x.size(0), weight.size(1)
        if bias is not None:  # (B*Cout)
            bias = bias.repeat(b) if bias.dim() == 1 else bias.reshape(-1)
        if b == 1:
            return F.conv2d(x, weight[0], bias, stride, 0, dilation, groups)
        out = F.conv2d(
            x.reshape(1, -1, x.size(2), x.size(3)),  # (1, B*Cin, H, W)
            weight.reshape(b * cout, weight.size(2), weight.size(3), weight.size(4)),  # (B*Cout, Cin/g, kh, kw)
            bias, stride, 0, dilation, b * groups,
        )
        return out.reshape(b, cout, out.size(2), out.size(3))  # (B, Cout, H', W')

    return torch.jit.script(per_sample_conv)


def _column_major(pi: torch.Tensor) -> torch.Tensor:
    """``pi`` (B, K) with column-major strides, the same values.

    The gradient of ``pi @ W`` w.r.t. ``pi`` is ``grad @ W.T``, a GEMM with only K output
    columns and a long inner dimension, which CPU BLAS runs 10-20x slower than its transpose
    ``(W @ grad.T).T``; autograd computes the latter when ``pi`` is column-major. Without
    autograd ``pi`` is returned as it is.
    """
    return pi.t().contiguous().t() if pi.requires_grad else pi


def _scaling_inputs_is_smaller(pixels: int, cin: int, cout: int) -> bool:
    """Whether the mixed 1x1 conv writes less by scaling its input than by mixing its outputs.

    Per kernel: a scaled copy of the input (pixels * Cin) plus the kernel reshuffled to
    (Cout, K*Cin) (Cout * Cin), against an output (pixels * Cout).
    """
    return pixels * cin + cout * cin < pixels * cout


def _channels_last(x: torch.Tensor) -> bool:
    """Channels_last and not also contiguous (1x1 maps and single channels are both)."""
    return not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


class DynamicConv2d(nn.Module):
    """A drop-in for :class:`torch.nn.Conv2d` with K kernels mixed per sample by attention.

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias:
            as in :class:`torch.nn.Conv2d` (``padding`` accepts ``"same"`` and ``"valid"``;
            depthwise is ``groups == in_channels``).
        num_kernels: K, the number of kernels mixed (K = 1 is a plain convolution with a
            constant attention of 1 under softmax).
        reduction: attention hidden width is ``max(in_channels // reduction, min_hidden)``.
        min_hidden: lower bound of the attention hidden width.
        temperature: softmax temperature tau > 0; settable at any time (see
            :mod:`dynas.temperature` for the annealing schedule).
        attention: ``"softmax"`` (the paper: pi >= 0, sum to one) or ``"sigmoid"``
            (CondConv-style routing, no sum-to-one constraint) for the paper's ablation.

    The attention weights of the most recent forward are kept, detached, in
    :attr:`last_attention` (``(B, K)``) for logging.
    """

    #: A pointwise conv on a map of at most this many pixels runs all K kernels shared by the
    #: batch instead of aggregating a kernel per sample (see ``_pointwise_mixed``); measured
    #: for K=4 (2x2 maps mix, 4x4 maps aggregate; ``benchmarks/bench_ops.py``).
    mix_max_pixels: int = 4

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
        reduction: int = 4,
        min_hidden: int = 4,
        temperature: float = 30.0,
        attention: Literal["softmax", "sigmoid"] = "softmax",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        check_int("in_channels", in_channels)
        check_int("out_channels", out_channels)
        check_int("groups", groups)
        check_int("num_kernels", num_kernels)
        if in_channels % groups:
            raise ValueError(
                f"`in_channels` must be divisible by `groups`, but got {in_channels=}, {groups=}."
            )
        if out_channels % groups:
            raise ValueError(
                f"`out_channels` must be divisible by `groups`, but got {out_channels=}, {groups=}."
            )
        self.kernel_size = _pair(kernel_size)
        self.stride = _pair(stride)
        self.dilation = _pair(dilation)
        for name in ("kernel_size", "stride", "dilation"):
            for v in getattr(self, name):
                check_int(name, v)
        self.padding = self._check_padding(padding)
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.groups = groups
        self.num_kernels = num_kernels
        self.temperature = temperature

        factory = {"device": device, "dtype": dtype}
        kh, kw = self.kernel_size
        # (K, Cout, Cin/g, kh, kw)
        self.weight = nn.Parameter(
            torch.empty(num_kernels, out_channels, in_channels // groups, kh, kw, **factory)
        )
        # (K, Cout)
        self.bias = nn.Parameter(torch.empty(num_kernels, out_channels, **factory)) if bias else None
        self.attention = KernelAttention(
            in_channels, num_kernels, reduction, min_hidden, attention, **factory
        )
        self.last_attention: torch.Tensor | None = None
        self.reset_parameters()

    def _check_padding(self, padding: int | tuple[int, int] | str) -> tuple[int, int] | str:
        if isinstance(padding, str):
            if padding not in ("same", "valid"):
                raise ValueError(
                    f"`padding` must be an int, a pair or one of 'same', 'valid', "
                    f"but got {padding=!r}."
                )
            if padding == "same" and any(s != 1 for s in self.stride):
                raise ValueError(
                    f"`padding='same'` requires stride 1 (as in nn.Conv2d), but got stride={self.stride}."
                )
            return padding
        pad = _pair(padding)
        if any(isinstance(p, bool) or not isinstance(p, int) or p < 0 for p in pad):
            raise ValueError(f"`padding` must be non-negative integers, but got {padding=!r}.")
        return pad

    @property
    def temperature(self) -> float:
        """Softmax temperature tau (> 0)."""
        return self._temperature

    @temperature.setter
    def temperature(self, value: float) -> None:
        value = float(value)
        if not (value > 0 and math.isfinite(value)):
            raise ValueError(f"`temperature` must be a finite number > 0, but got temperature={value}.")
        self._temperature = value

    def reset_parameters(self) -> None:
        """Initialise each of the K kernels independently, exactly as nn.Conv2d does its weight."""
        for k in range(self.num_kernels):
            nn.init.kaiming_uniform_(self.weight[k], a=math.sqrt(5))
        if self.bias is not None:
            fan_in = self.weight[0].shape[1] * self.kernel_size[0] * self.kernel_size[1]
            bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0
            nn.init.uniform_(self.bias, -bound, bound)

    def aggregate(self, pi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Mix the K kernels with attention ``pi`` (B, K) into per-sample kernels and biases.

        Returns ``(B, Cout, Cin/g, kh, kw)`` weights and ``(B, Cout)`` biases (or ``None``).
        """
        k = self.num_kernels
        weight = torch.matmul(pi, self.weight.reshape(k, -1))  # (B, Cout*Cin/g*kh*kw)
        weight = weight.reshape(pi.shape[0], *self.weight.shape[1:])
        bias = torch.matmul(pi, self.bias) if self.bias is not None else None  # (B, Cout)
        return weight, bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"DynamicConv2d expects input of shape (B, {self.in_channels}, H, W), "
                f"but got {tuple(x.shape)}."
            )
        pi = self.attention(x, self.temperature)  # (B, K)
        self.last_attention = pi.detach()
        if torch.jit.is_tracing():
            dynamic_batch = _DEPLOY.get()
            if dynamic_batch is not None:
                return self._deploy_forward(x, pi, dynamic_batch)
            # Tracing for analysis (torch.jit.trace, fvcore) must not bake the batch size into
            # `groups`, so it uses the batch-agnostic matmul formulation.
            return self._conv_matmul(x, *self.aggregate(pi))
        if self._pointwise:
            if x.shape[2] * x.shape[3] <= self.mix_max_pixels:
                return self._pointwise_mixed(x, pi)
            return self._pointwise_aggregated(x, _column_major(pi))
        weight, bias = self.aggregate(_column_major(pi))
        if x.shape[0] == 1:
            # One sample: its kernel is a plain conv weight, no batch folded into channels.
            b0 = bias[0] if bias is not None else None
            # (1, Cout, H', W'), in the input's memory format
            return F.conv2d(x, weight[0], b0, self.stride, self.padding, self.dilation, self.groups)
        return self._conv_grouped(x, weight, bias)

    @property
    def _pointwise(self) -> bool:
        """A 1x1, stride-1, unpadded, ungrouped conv: a plain matmul over pixels."""
        unpadded = self.padding in ("same", "valid", (0, 0))
        return self.kernel_size == (1, 1) and self.stride == (1, 1) and self.groups == 1 and unpadded

    def _pointwise_aggregated(self, x: torch.Tensor, pi: torch.Tensor) -> torch.Tensor:
        """Per-sample 1x1 conv as one batched matmul with the aggregated kernels.

        Works on either memory format without copies of the input and returns the input's
        format. A channels_last input reads its (Cout, Cin) kernels transposed, except under
        autograd: then the kernels are aggregated as (Cin, Cout), since a kernel read
        transposed would make autograd copy its (B, Cout, Cin) gradient.
        """
        b, cin, h, w = x.shape
        k, cout = self.num_kernels, self.out_channels
        bias = torch.matmul(pi, self.bias) if self.bias is not None else None  # (B, Cout)
        if _channels_last(x):
            if torch.is_grad_enabled():
                w_t = self.weight.reshape(k, cout, cin).transpose(1, 2).reshape(k, cin * cout)  # (K, Cin*Cout)
                w_t = torch.mm(pi, w_t).view(b, cin, cout)  # (B, Cin, Cout)
            else:
                w_mat = torch.mm(pi, self.weight.reshape(k, cout * cin)).view(b, cout, cin)  # (B, Cout, Cin)
                w_t = w_mat.transpose(1, 2)  # (B, Cin, Cout), a view
            cols = x.permute(0, 2, 3, 1).reshape(b, h * w, cin)  # (B, L, Cin), a view
            if bias is None:
                out = torch.bmm(cols, w_t)
            else:
                out = torch.baddbmm(bias.unsqueeze(1), cols, w_t)  # (B, L, Cout)
            return out.view(b, h, w, cout).permute(0, 3, 1, 2)  # (B, Cout, H, W) channels_last
        w_mat = torch.mm(pi, self.weight.reshape(k, cout * cin)).view(b, cout, cin)  # (B, Cout, Cin)
        cols = x.reshape(b, cin, h * w)  # (B, Cin, L), a view of a contiguous input
        if bias is None:
            out = torch.bmm(w_mat, cols)
        else:
            out = torch.baddbmm(bias.unsqueeze(2), w_mat, cols)  # (B, Cout, L)
        return out.view(b, cout, h, w)

    def _pointwise_mixed(self, x: torch.Tensor, pi: torch.Tensor) -> torch.Tensor:
        """Per-sample 1x1 conv with the K kernels shared by the batch, mixed by pi (linearity).

        Cheaper than aggregating when a feature map has few pixels: K*Cout*Cin MACs per pixel
        in one large matmul, instead of writing and reading a (Cout, Cin) kernel per sample.
        Of the two ways to mix, the one with the smaller intermediate runs: scale the input by
        each pi_k and run the K kernels as one (Cout, K*Cin) kernel (a K-fold copy of the input,
        plus the kernels reshuffled), or run the K kernels and mix their K outputs.

        Pixels are rows, (B*L, Cin): a view of a channels_last input, a small copy of a
        contiguous one (the map is small), which also gets a contiguous output back.
        """
        b, cin, h, w = x.shape
        k, cout = self.num_kernels, self.out_channels
        pixels = b * h * w
        cols = x.permute(0, 2, 3, 1).reshape(pixels, cin)  # (B*L, Cin)
        if _scaling_inputs_is_smaller(pixels, cin, cout):
            w_cat = self.weight.reshape(k, cout, cin).transpose(0, 1).reshape(cout, k * cin)  # (Cout, K*Cin)
            scaled = cols.view(b, h * w, 1, cin) * pi.view(b, 1, k, 1)  # (B, L, K, Cin)
            out = torch.mm(scaled.reshape(pixels, k * cin), w_cat.t()).view(b, h * w, cout)  # (B, L, Cout)
        else:
            y = torch.mm(cols, self.weight.reshape(k * cout, cin).t())  # (B*L, K*Cout)
            if h * w == 1:
                out = torch.bmm(pi.view(b, 1, k), y.view(b, k, cout))  # (B, 1, Cout)
            else:
                out = (y.view(b, h * w, k, cout) * pi.view(b, 1, k, 1)).sum(dim=2)  # (B, L, Cout)
        if self.bias is not None:
            out = out + torch.matmul(pi, self.bias).unsqueeze(1)  # (B, 1, Cout) mixed bias
        out = out.view(b, h, w, cout).permute(0, 3, 1, 2)  # (B, Cout, H, W) channels_last
        return out if _channels_last(x) else out.contiguous()

    def _conv_grouped(
        self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor:
        """One grouped conv over the batch: sample i only sees its own kernel.

        Folding the batch into channels needs a contiguous input (a view then); a
        channels_last input is copied in, and the output copied back to channels_last.
        """
        b = x.shape[0]
        channels_last = _channels_last(x)
        out = F.conv2d(
            x.reshape(1, b * self.in_channels, *x.shape[2:]),  # (1, B*Cin, H, W)
            weight.reshape(b * self.out_channels, *weight.shape[2:]),  # (B*Cout, Cin/g, kh, kw)
            bias.reshape(-1) if bias is not None else None,
            self.stride,
            self.padding,
            self.dilation,
            b * self.groups,
        )
        out = out.reshape(b, self.out_channels, *out.shape[2:])  # (B, Cout, H', W')
        return out.contiguous(memory_format=torch.channels_last) if channels_last else out

    def _deploy_forward(self, x: torch.Tensor, pi: torch.Tensor, dynamic_batch: bool) -> torch.Tensor:
        """The traced form for deployment (see the module docstring); shapes are constants but B."""
        if not torch.onnx.is_in_onnx_export():  # TorchScript: the eager kernels
            if self._pointwise:  # batch-agnostic as traced, and faster than a conv with the mixed kernel
                if x.shape[2] * x.shape[3] <= self.mix_max_pixels:
                    return self._pointwise_mixed(x, pi)
                return self._pointwise_aggregated(x, pi)
            if not dynamic_batch:
                return self._conv_fixed_batch(x, pi)
            return _scripted_per_sample_conv()(  # groups = B * g read at run time
                self._pad(x), self._mixed_kernels(pi), self._mixed_bias(pi),
                list(self.stride), list(self.dilation), self.groups,
            )
        if not dynamic_batch:
            return self._conv_fixed_batch(x, pi)
        if self._pointwise:
            return self._pointwise_matmul(x, pi)
        return self._conv_matmul(x, self._mixed_kernels(pi), self._mixed_bias(pi), constant_shapes=True)

    def _mixed_kernels(self, pi: torch.Tensor) -> torch.Tensor:
        """``pi @ W`` as ``(B, Cout, Cin/g, kh, kw)``, reshaped with -1 for B (no traced batch size)."""
        k = self.num_kernels
        return torch.matmul(pi, self.weight.reshape(k, -1)).reshape(-1, *self.weight.shape[1:])

    def _mixed_bias(self, pi: torch.Tensor) -> torch.Tensor | None:
        """``pi @ b`` (B, Cout), or the constant ``b_0`` (Cout,) when softmax mixes K equal biases.

        Folding a BatchNorm into a bias-free conv leaves K equal biases (the BN shift); softmax
        weights sum to one, so they mix to that shift, and the graph gets a constant bias, which
        runtimes fuse into the conv. Decided when tracing, from the parameters' values.
        """
        if self.bias is None:
            return None
        with torch.no_grad():
            shared = self.attention.attention == "softmax" and bool((self.bias == self.bias[:1]).all())
        return self.bias[0] if shared else torch.matmul(pi, self.bias)

    def _conv_fixed_batch(self, x: torch.Tensor, pi: torch.Tensor) -> torch.Tensor:
        """One conv with the mixed kernels, for the traced batch size only (``dynamic_batch=False``)."""
        b, cin, cout = int(x.shape[0]), self.in_channels, self.out_channels
        x = self._pad(x)  # explicit, so that 'same' with an even kernel exports too
        weight = self._mixed_kernels(pi)  # (B, Cout, Cin/g, kh, kw)
        bias = self._mixed_bias(pi)
        if bias is not None and not (b == 1 and bias.dim() == 1):  # (B*Cout); a shared one stays constant
            bias = bias.repeat(b) if bias.dim() == 1 else bias.reshape(b * cout)
        if b == 1:  # a reshape, not weight[0]: no Gather in the graph
            kernel = weight.reshape(weight.shape[1:])  # (Cout, Cin/g, kh, kw)
            return F.conv2d(x, kernel, bias, self.stride, 0, self.dilation, self.groups)
        out = F.conv2d(
            x.reshape(1, b * cin, int(x.shape[2]), int(x.shape[3])),  # (1, B*Cin, H, W)
            weight.reshape(b * cout, *weight.shape[2:]),  # (B*Cout, Cin/g, kh, kw)
            bias, self.stride, 0, self.dilation, b * self.groups,
        )
        return out.reshape(b, cout, int(out.shape[2]), int(out.shape[3]))  # (B, Cout, H', W')

    def _pointwise_matmul(self, x: torch.Tensor, pi: torch.Tensor) -> torch.Tensor:
        """Per-sample 1x1 conv as one batched MatMul, batch-agnostic, constant shapes (ONNX)."""
        cin, cout = self.in_channels, self.out_channels
        h, w = int(x.shape[2]), int(x.shape[3])
        w_mat = self._mixed_kernels(pi).reshape(-1, cout, cin)  # (B, Cout, Cin)
        out = torch.matmul(w_mat, x.reshape(-1, cin, h * w))  # (B, Cout, L)
        bias = self._mixed_bias(pi)
        if bias is not None:
            out = out + bias.reshape(-1, cout, 1)  # (B or 1, Cout, 1)
        return out.reshape(-1, cout, h, w)

    def _conv_matmul(
        self,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        constant_shapes: bool = False,
    ) -> torch.Tensor:
        """im2col + one batched matmul; no shape depends on the batch size.

        ``bias`` is (B, Cout) or a shared (Cout,). With ``constant_shapes`` the map size is read
        as Python ints (a trace for deployment: no shape arithmetic in the graph).
        """
        g, cin, cout = self.groups, self.in_channels, self.out_channels
        (kh, kw), (sh, sw), (dh, dw) = self.kernel_size, self.stride, self.dilation
        x = self._pad(x)
        h, w = x.shape[2], x.shape[3]
        if constant_shapes:
            h, w = int(h), int(w)
        ho, wo = (h - dh * (kh - 1) - 1) // sh + 1, (w - dw * (kw - 1) - 1) // sw + 1
        if (kh, kw, sh, sw) == (1, 1, 1, 1):
            cols = x.reshape(-1, cin, h * w)  # (B, Cin, L)
        else:
            cols = F.unfold(x, (kh, kw), (dh, dw), 0, (sh, sw))  # (B, Cin*kh*kw, L)
        cols = cols.reshape(-1, g, (cin // g) * kh * kw, ho * wo)  # (B, g, Cin/g*kh*kw, L)
        w_mat = weight.reshape(-1, g, cout // g, (cin // g) * kh * kw)  # (B, g, Cout/g, Cin/g*kh*kw)
        out = torch.matmul(w_mat, cols).reshape(-1, cout, ho, wo)  # (B, Cout, H', W')
        if bias is not None:
            out = out + bias.reshape(-1, cout, 1, 1)
        return out

    def _pad(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the padding explicitly (asymmetric for 'same' with an even receptive field)."""
        if self.padding == "valid":
            return x
        if self.padding == "same":
            pads: list[int] = []
            for k, d in zip(reversed(self.kernel_size), reversed(self.dilation)):
                total = d * (k - 1)
                pads += [total // 2, total - total // 2]
            return F.pad(x, pads) if any(pads) else x
        ph, pw = self.padding
        return F.pad(x, [pw, pw, ph, ph]) if ph or pw else x

    def attention_entropy(self) -> float | None:
        """Mean entropy (nats) of the most recent attention, ``log K`` when uniform."""
        if self.last_attention is None:
            return None
        p = self.last_attention.float().clamp_min(1e-12)
        p = p / p.sum(dim=1, keepdim=True)
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
