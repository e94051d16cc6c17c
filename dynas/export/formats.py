"""Deployable formats of a model, each checked against PyTorch before it is kept.

Both exports take a model in eval mode at its inference temperature and an example input at
batch 1; both keep a dynamic batch axis and are checked at batch 8 (ONNX at 1 and 8) so that
no shape bakes the batch size in.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import torch
from torch import nn

from dynas.errors import DynasError

__all__ = ["EXPORT_ATOL", "ONNX_OPSET", "export_onnx", "export_torchscript"]

EXPORT_ATOL = 1e-4
"""An export fails unless TorchScript's and onnxruntime's outputs lie this close to PyTorch's."""

ONNX_OPSET = 17
"""ONNX opset of :func:`export_onnx` (MatMul, Conv, Softmax, ... : run by onnxruntime, TensorRT, OpenVINO)."""


def _check_close(diff: float, what: str, name: str, batch: int) -> None:
    if not diff <= EXPORT_ATOL:
        raise DynasError(
            f"the {what} export of {name} must match PyTorch within {EXPORT_ATOL:g}, "
            f"but got a max abs difference of {diff:.3g} at batch {batch}."
        )


def export_torchscript(model: nn.Module, path: str | Path, example_input: torch.Tensor, *, name: str = "the model") -> float:
    """Trace ``model`` at ``example_input``'s shape, check it at batch 8, save it; return the max abs diff.

    Raises:
        DynasError: the traced module differs from PyTorch by more than :data:`EXPORT_ATOL`.
    """
    with warnings.catch_warnings():  # the operators' input checks are constant in a trace
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        traced = torch.jit.trace(model, example_input, check_trace=False)  # checked below, at another batch
    x = torch.randn(8, *example_input.shape[1:])
    with torch.no_grad():
        diff = float((traced(x) - model(x)).abs().max())
    _check_close(diff, "TorchScript", name, 8)
    traced.save(str(path))
    return diff


def export_onnx(
    model: nn.Module,
    path: str | Path,
    example_input: torch.Tensor,
    *,
    opset: int = ONNX_OPSET,
    name: str = "the model",
) -> float:
    """Export ``model`` to ONNX with a dynamic batch axis; return the max |onnxruntime - PyTorch|.

    The input is named ``input`` (batch, C, H, W), the output ``logits``. The file is checked in
    onnxruntime at batch 1 and 8; without onnxruntime the file is written unchecked and NaN is
    returned.

    Raises:
        DynasError: onnxruntime's outputs differ from PyTorch's by more than :data:`EXPORT_ATOL`.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        torch.onnx.export(
            model,
            (example_input,),
            str(path),
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
            opset_version=opset,
            dynamo=False,
        )
    try:
        import onnxruntime as ort
    except ImportError:
        return math.nan
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    worst = 0.0
    for batch in (1, 8):
        x = torch.randn(batch, *example_input.shape[1:])
        with torch.no_grad():
            expected = model(x).numpy()
        diff = float(abs(session.run(None, {"input": x.numpy()})[0] - expected).max())
        _check_close(diff, "ONNX (onnxruntime)", name, batch)
        worst = max(worst, diff)
    return worst
