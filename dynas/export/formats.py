"""Deployable formats of a model, each checked against PyTorch before it is kept.

Both exports take a model in eval mode at its inference temperature and an example input, and
trace a copy of it with every BatchNorm that follows a conv folded into that conv
(:func:`fold_batchnorm`) and each :class:`~dynas.ops.DynamicConv2d` in its deployment form
(:func:`~dynas.ops.dynamic_conv.deploy_trace`). By default both keep a dynamic batch axis and
are checked at batch 1 and 8, so that no shape bakes the batch size in; ``dynamic_batch=False``
specialises the graph to the example's batch size (in ONNX each dynamic layer then is a plain Conv with
its mixed kernel), checked at that batch size only.
"""

from __future__ import annotations

import contextlib
import copy
import math
import statistics
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from dynas.checks import check_int
from dynas.errors import DynasError
from dynas.ops import DCDConv2d, DynamicConv2d, ODConv2d
from dynas.ops.dynamic_conv import deploy_trace

__all__ = [
    "EXPORT_ATOL",
    "ONNX_OPSET",
    "export_onnx",
    "export_torchscript",
    "fold_batchnorm",
    "onnx_latency_ms",
]

EXPORT_ATOL = 1e-4
"""An export fails unless TorchScript's and onnxruntime's outputs lie this close to PyTorch's (or
within 10x the float32 model's own rounding error, where that is larger: ``_tolerance``)."""

ONNX_OPSET = 17
"""ONNX opset of :func:`export_onnx`: standard ``ai.onnx`` ops only (Conv, MatMul, Gemm, Softmax,
ReduceMean, Reshape, Clip, ...), which onnxruntime, TensorRT and OpenVINO all run."""

_CHECK_BATCHES = (1, 8)


def _bn_affine(bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """``(s, t)`` of ``BN(y) = s y + t`` in eval mode, per channel: ``s = gamma / sqrt(var + eps)``."""
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    return scale, bn.bias - bn.running_mean * scale


def _fold_kernels(conv: DynamicConv2d | ODConv2d, bn: nn.BatchNorm2d) -> bool:
    """Scale the K kernels ``(K, Cout, ...)`` per filter by ``s`` and make each bias ``s b_k + t``, in place.

    Exact for an ODConv: ``s (a_f . conv(x, W(x)) + sum_i a_w[i] b_i) + t`` equals
    ``a_f . conv(x, W'(x)) + sum_i a_w[i] (s b_i + t)``, since ``s`` commutes with the filter,
    channel and spatial attentions and the kernel attention is a softmax (or, at K = 1, none).
    """
    with torch.no_grad():
        scale, shift = _bn_affine(bn)
        conv.weight.mul_(scale.view(1, -1, 1, 1, 1))  # (K, Cout, Cin/g, kh, kw)
        bias = shift.expand(conv.num_kernels, -1) if conv.bias is None else conv.bias * scale + shift
        conv.bias = nn.Parameter(bias.clone(), requires_grad=False)  # (K, Cout)
    return True


def _fold_dynamic(conv: DynamicConv2d, bn: nn.BatchNorm2d) -> bool:
    """Fold ``bn`` into the K kernels of ``conv`` in place; False (nothing done) under sigmoid attention.

    ``BN(sum_k pi_k W_k * x + b) = sum_k pi_k (s W_k) * x + s b + t`` with ``t = beta - s mean``:
    exact since mixing is linear. The shift ``t`` joins every ``b_k``, which is exact because
    softmax weights sum to one; sigmoid weights do not, so that BN stays.
    """
    return conv.attention.attention == "softmax" and _fold_kernels(conv, bn)


def _fold_dcd(conv: DCDConv2d, bn: nn.BatchNorm2d) -> bool:
    """Fold ``bn`` into a DCD conv in place (always exact): ``s`` scales the rows of ``W0`` and ``P``.

    ``s ((Lambda W0 + P Phi Q^T) x + b) + t = (Lambda (s W0) + (s P) Phi Q^T) x + (s b + t)``, since
    ``Lambda`` is diagonal over the output channels.
    """
    with torch.no_grad():
        scale, shift = _bn_affine(bn)
        conv.weight.mul_(scale.view(-1, 1, 1, 1))  # W0 (Cout, Cin, 1, 1)
        conv.weight_p.mul_(scale.view(-1, 1))  # P (Cout, L)
        bias = shift if conv.bias is None else conv.bias * scale + shift
        conv.bias = nn.Parameter(bias.clone(), requires_grad=False)  # (Cout,)
    return True


_FOLDS = {DynamicConv2d: _fold_dynamic, ODConv2d: _fold_kernels, DCDConv2d: _fold_dcd}


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """A copy of ``model`` (eval mode) with each BatchNorm2d that directly follows a conv folded into it.

    Convs are :class:`torch.nn.Conv2d`, :class:`~dynas.ops.DynamicConv2d` (see ``_fold_dynamic``),
    :class:`~dynas.ops.ODConv2d` and :class:`~dynas.ops.DCDConv2d`, followed by a BatchNorm2d in
    the same :class:`torch.nn.Sequential` (as in ``ConvBnAct``); a folded BatchNorm becomes :class:`torch.nn.Identity`. Same outputs up to float rounding, one pass fewer
    per conv, and the conv + activation pattern that runtimes fuse.
    """
    folded = copy.deepcopy(model).eval()
    for seq in folded.modules():
        if not isinstance(seq, nn.Sequential):
            continue
        names = list(seq._modules)
        for conv_name, bn_name in zip(names, names[1:]):
            conv, bn = seq._modules[conv_name], seq._modules[bn_name]
            if not isinstance(bn, nn.BatchNorm2d) or bn.running_var is None:
                continue
            if type(conv) is nn.Conv2d:
                seq._modules[conv_name] = fuse_conv_bn_eval(conv, bn)
            elif not (type(conv) in _FOLDS and _FOLDS[type(conv)](conv, bn)):
                continue
            seq._modules[bn_name] = nn.Identity()
    return folded


def _tolerance(model: nn.Module, x: torch.Tensor, expected: torch.Tensor) -> float:
    """:data:`EXPORT_ATOL`, or 10x the float32 model's own rounding error on ``x`` when that is larger.

    A network with a near-constant channel (running variance ~ 0, so BatchNorm scales by
    ``1 / sqrt(eps)`` ~ 316) amplifies float32 rounding: a subnet of a briefly trained supernet,
    recalibrated on 32 images, differed from its float64 self by 3.4e-5, and its correct
    TorchScript graph from eager PyTorch by up to 1.6e-4. Such a graph is not wrong.
    """
    exact = copy.deepcopy(model).double()
    with torch.no_grad():
        rounding = float((expected.double() - exact(x.double())).abs().max())
    return max(EXPORT_ATOL, 10 * rounding)


def _check_close(diff: float, what: str, name: str, batch: int, tolerance: float = EXPORT_ATOL) -> None:
    if not diff <= tolerance:
        rule = f"{EXPORT_ATOL:g}" if tolerance == EXPORT_ATOL else f"{tolerance:.3g} (10x the model's own float32 rounding)"
        raise DynasError(
            f"the {what} export of {name} must match PyTorch within {rule}, "
            f"but got a max abs difference of {diff:.3g} at batch {batch}."
        )


def _check_batches(example_input: torch.Tensor, dynamic_batch: bool) -> tuple[int, ...]:
    return _CHECK_BATCHES if dynamic_batch else (example_input.shape[0],)


@contextlib.contextmanager
def _tracing(dynamic_batch: bool) -> Iterator[None]:
    """Trace in the deployment form, without autograd, with TracerWarnings silenced.

    The warnings are about values a trace records as constants: the operators' input checks and
    the deployment form's map sizes, both constant by design.
    """
    with warnings.catch_warnings(), deploy_trace(dynamic_batch=dynamic_batch), torch.no_grad():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        yield


def export_torchscript(
    model: nn.Module,
    path: str | Path,
    example_input: torch.Tensor,
    *,
    dynamic_batch: bool = True,
    name: str = "the model",
) -> float:
    """Trace ``model`` (BatchNorm folded) at ``example_input``, check it, save it; return the max abs diff.

    Checked at batch 1 and 8, or with ``dynamic_batch=False`` at the example's batch size only.

    Raises:
        DynasError: the traced module differs from PyTorch by more than :data:`EXPORT_ATOL` (or,
            when larger, 10x the float32 model's own rounding error: ``_tolerance``).
    """
    with _tracing(dynamic_batch):
        traced = torch.jit.trace(fold_batchnorm(model), example_input, check_trace=False)  # checked below
    worst = 0.0
    for batch in _check_batches(example_input, dynamic_batch):
        x = torch.randn(batch, *example_input.shape[1:])
        with torch.no_grad():
            expected = model(x)
            diff = float((traced(x) - expected).abs().max())
        if diff > EXPORT_ATOL:
            _check_close(diff, "TorchScript", name, batch, _tolerance(model, x, expected))
        worst = max(worst, diff)
    traced.save(str(path))
    return worst


def export_onnx(
    model: nn.Module,
    path: str | Path,
    example_input: torch.Tensor,
    *,
    opset: int = ONNX_OPSET,
    dynamic_batch: bool = True,
    name: str = "the model",
) -> float:
    """Export ``model`` (BatchNorm folded) to ONNX; return the max |onnxruntime - PyTorch|.

    The input is named ``input`` (batch, C, H, W), the output ``logits``; the batch axis is dynamic
    unless ``dynamic_batch=False``, which specialises the graph to the example's batch size (the
    fastest graph at that size in onnxruntime: each dynamic layer a plain Conv with its mixed
    kernel, which TensorRT accepts from 8.5 on; the dynamic-batch graph uses MatMul instead). The
    file is checked in onnxruntime at batch 1 and 8 (or at the example's batch size); without
    onnxruntime it is written unchecked and NaN is returned.

    Raises:
        DynasError: onnxruntime's outputs differ from PyTorch's by more than :data:`EXPORT_ATOL` (or,
            when larger, 10x the float32 model's own rounding error: ``_tolerance``).
    """
    axes = {"input": {0: "batch"}, "logits": {0: "batch"}} if dynamic_batch else None
    with _tracing(dynamic_batch):
        torch.onnx.export(
            fold_batchnorm(model),
            (example_input,),
            str(path),
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes=axes,
            opset_version=opset,
            dynamo=False,
        )
    try:
        import onnxruntime as ort
    except ImportError:
        return math.nan
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    worst = 0.0
    for batch in _check_batches(example_input, dynamic_batch):
        x = torch.randn(batch, *example_input.shape[1:])
        with torch.no_grad():
            expected = model(x)
        diff = float(abs(session.run(None, {"input": x.numpy()})[0] - expected.numpy()).max())
        if diff > EXPORT_ATOL:
            _check_close(diff, "ONNX (onnxruntime)", name, batch, _tolerance(model, x, expected))
        worst = max(worst, diff)
    return worst


def onnx_latency_ms(
    path: str | Path,
    example_input: torch.Tensor,
    *,
    threads: int | None = None,
    warmup: int = 5,
    runs: int = 20,
) -> float:
    """Median wall time of one onnxruntime CPU run of the ONNX file at ``path`` on ``example_input``, in ms.

    Args:
        path: an ONNX file with an input named ``input`` (as :func:`export_onnx` writes).
        example_input: the input to time, e.g. ``torch.randn(1, 3, 224, 224)``.
        threads: onnxruntime intra-op threads; default torch's (``torch.get_num_threads()``), so that
            the number is comparable with a PyTorch latency measured alongside.
        warmup: untimed runs first.
        runs: timed runs.

    Returns:
        NaN when onnxruntime is not installed.
    """
    if threads is not None:
        check_int("threads", threads)
    check_int("warmup", warmup, 0)
    check_int("runs", runs)
    try:
        import onnxruntime as ort
    except ImportError:
        return math.nan
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feed = {"input": example_input.detach().cpu().numpy()}
    times = []
    for i in range(warmup + runs):
        start = time.perf_counter()
        session.run(None, feed)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3
