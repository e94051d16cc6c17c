"""Exact multiply-add (MAC) and parameter counting: fvcore as ground truth, a closed form for speed.

One multiply-add is one MAC (fvcore calls it one "flop"). Counts are per image: a model is
traced at batch 1 (a traced :class:`~dynas.ops.DynamicConv2d` costs exactly B times as much at
batch B, so nothing is hidden by counting one sample).

The convention -- the one MobileNet papers use, under which torchvision's MobileNetV2 x1.0 at
224x224 costs 300.8M MACs (the paper's "300M"), and DY-MobileNetV2 x1.0 costs 313.3M (the
paper's 312.9M):

Counted
    * convolutions (dense, grouped, depthwise): ``Cout * Cin/g * kh * kw * H' * W'``; a
      dynamic convolution costs the same per sample, with the sample's own kernel;
    * linear layers (classifier, MobileNetV3 head FC, squeeze-excite FCs, the attention FCs of
      DY-conv, ODConv and DCD): ``in * out``;
    * kernel aggregation of a dynamic convolution: ``K * |W|`` per sample, plus ``K * Cout``
      for its bias when it has one (DY-conv; ODConv when K > 1 -- its attentions multiply the
      kernel or the features elementwise, which is not counted);
    * DCD (:class:`~dynas.ops.DCDConv2d`): the form it runs -- factorized, the shared convs
      ``(Cout + L) * Cin`` and ``L * Cout`` and the ``L * L`` fusion per pixel; or merged,
      ``Cout * L * (L + Cin)`` per sample to build its kernel, then the conv
      (:func:`~dynas.spec.dcd_factorized` picks the cheaper);
    * global average pooling (classifier GAP, squeeze-excite GAP, the attention GAP):
      one add per input element, ``C * H * W`` (DCD's 2x2 pool: one per element of each cell). The DY-CNN paper counts the attention GAP in
      its overhead (``HW * Cin``), and the DY-MobileNetV2 MACs only match the paper with it.

Not counted (:data:`IGNORED_OPS`, each with its reason)
    * BatchNorm: folded into the preceding convolution at inference;
    * elementwise ops: activations, softmax / sigmoid of the attention, division by the
      temperature, residual adds, the squeeze-excite multiply, bias adds of convolutions;
    * data movement: padding, im2col, reshapes, dropout at inference.

Any other op that fvcore cannot count raises :class:`UnsupportedOpError` (or warns, on request)
-- an op is never silently counted as zero.

Parameters are all ``nn.Parameter`` elements (BatchNorm's affine weight and bias included,
running statistics excluded), as torchvision's "3.5M" for MobileNetV2 counts them.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Literal

import pandas as pd
import torch
from fvcore.nn import FlopCountAnalysis
from fvcore.nn.jit_handles import (
    Handle,
    addmm_flop_jit,
    bmm_flop_jit,
    conv_flop_count,
    conv_flop_jit,
    einsum_flop_jit,
    elementwise_flop_counter,
    linear_flop_jit,
    matmul_flop_jit,
)
from torch import nn

from dynas.builder import build_model
from dynas.errors import DynasError
from dynas.cost import input_shape
from dynas.spec import ArchSpec

__all__ = [
    "COUNTED_OPS",
    "IGNORED_OPS",
    "MacReport",
    "UnsupportedOpError",
    "count_macs",
    "mac_analysis",
]

_ELEMENTWISE = "elementwise: papers do not count it"
_MOVEMENT = "data movement, no arithmetic"

#: Ops deliberately counted as zero MACs, with the reason. Anything else fvcore cannot count is
#: reported by :func:`count_macs`.
IGNORED_OPS: Mapping[str, str] = MappingProxyType(
    {
        "aten::batch_norm": "folded into the preceding convolution at inference",
        # Residual add, squeeze-excite multiply, bias add, division by the temperature, and the
        # scalar shape arithmetic a trace records (e.g. H' = (H - k) // s + 1).
        "aten::add": _ELEMENTWISE,
        "aten::add_": _ELEMENTWISE,
        "aten::sub": _ELEMENTWISE,
        "aten::mul": _ELEMENTWISE,
        "aten::mul_": _ELEMENTWISE,
        "aten::div": _ELEMENTWISE,
        "aten::div_": _ELEMENTWISE,
        "aten::relu": _ELEMENTWISE,
        "aten::relu_": _ELEMENTWISE,
        "aten::relu6": _ELEMENTWISE,  # DCD's hard sigmoid, relu6(t + 3) / 3, as the official code writes it
        "aten::relu6_": _ELEMENTWISE,
        "aten::hardtanh": _ELEMENTWISE,
        "aten::hardtanh_": _ELEMENTWISE,
        "aten::hardswish": _ELEMENTWISE,
        "aten::hardswish_": _ELEMENTWISE,
        "aten::hardsigmoid": _ELEMENTWISE,
        "aten::hardsigmoid_": _ELEMENTWISE,
        "aten::sigmoid": _ELEMENTWISE,
        "aten::sigmoid_": _ELEMENTWISE,
        "aten::silu": _ELEMENTWISE,
        "aten::silu_": _ELEMENTWISE,
        "aten::softmax": _ELEMENTWISE,
        "aten::pad": _MOVEMENT,
        "aten::constant_pad_nd": _MOVEMENT,
        # F.unfold; the matmul that consumes its columns carries the convolution's MACs.
        "aten::im2col": _MOVEMENT,
        "aten::dropout": _MOVEMENT,
        "aten::feature_dropout": _MOVEMENT,
        "aten::flatten": _MOVEMENT,
    }
)


class UnsupportedOpError(DynasError):
    """A traced model holds an op that is neither counted nor deliberately ignored."""


def _reduction_macs(inputs: list[Any], outputs: list[Any]) -> int:
    """One add per input element: a global average pool written as ``x.mean()`` or ``x.sum() / n``."""
    return int(torch.Size(inputs[0].type().sizes()).numel())


def _conv_mode_macs(inputs: list[Any], outputs: list[Any]) -> int:
    """``nn.Conv2d(padding="same" | "valid")`` traces to ``aten::_convolution_mode``."""
    shapes = [value.type().sizes() for value in (inputs[0], inputs[1], outputs[0])]
    return int(conv_flop_count(*shapes))


#: Ops counted, with their fvcore handle. fvcore's defaults for normalization, upsampling and
#: grid sampling are left out on purpose: BatchNorm is folded (see :data:`IGNORED_OPS`), and
#: the others are not part of dynas' models, so they are reported rather than guessed.
COUNTED_OPS: Mapping[str, Handle] = MappingProxyType(
    {
        "aten::_convolution": conv_flop_jit,
        "aten::_convolution_mode": _conv_mode_macs,
        "aten::linear": linear_flop_jit,
        "aten::addmm": addmm_flop_jit,
        "aten::matmul": matmul_flop_jit,
        "aten::mm": matmul_flop_jit,
        "aten::bmm": bmm_flop_jit,
        "aten::einsum": einsum_flop_jit,
        "aten::adaptive_avg_pool2d": elementwise_flop_counter(1, 0),
        "aten::mean": _reduction_macs,
        "aten::sum": _reduction_macs,  # DynamicConv2d's attention pools as x.sum() / (H * W)
    }
)


def mac_analysis(model: nn.Module, inputs: torch.Tensor | tuple[torch.Tensor, ...]) -> FlopCountAnalysis:
    """Return an fvcore analysis of ``model`` on ``inputs`` with dynas' MAC convention set up.

    The caller chooses the batch; :func:`count_macs` uses batch 1. fvcore's own warnings are
    silenced because :func:`count_macs` reports unsupported ops itself.

    Args:
        model: the model to trace (put it in eval mode first: tracing runs a forward).
        inputs: the input tensor, or a tuple of the forward's positional inputs.

    Returns:
        The configured (not yet run) :class:`fvcore.nn.FlopCountAnalysis`.
    """
    analysis = FlopCountAnalysis(model, inputs).clear_op_handles()
    analysis.set_op_handle(**COUNTED_OPS)
    analysis.set_op_handle(**{op: None for op in IGNORED_OPS})
    analysis.unsupported_ops_warnings(False)
    analysis.uncalled_modules_warnings(False)
    return analysis


@dataclass(frozen=True)
class MacReport:
    """MACs and parameters of a model at batch 1.

    Attributes:
        total_macs: multiply-adds of one forward pass of one image.
        params: number of parameter elements.
        by_module: one row per submodule, in definition order, with columns ``module``
            (dotted name), ``depth`` (number of dots + 1), ``macs`` and ``params``.
        by_operator: MACs per counted op kind (``conv``, ``matmul``, ``linear``, ...).
        unsupported_ops: ops fvcore could not count and that are not in :data:`IGNORED_OPS`
            (non-empty only when :func:`count_macs` was asked to warn instead of raise).
    """

    total_macs: int
    params: int
    by_module: pd.DataFrame
    by_operator: Mapping[str, int]
    unsupported_ops: Mapping[str, int]

    def at_depth(self, depth: int) -> pd.DataFrame:
        """Rows of :attr:`by_module` at one nesting depth (1 = children of the model)."""
        return self.by_module[self.by_module["depth"] == depth].reset_index(drop=True)


def _module_table(model: nn.Module, macs_by_module: Mapping[str, int]) -> pd.DataFrame:
    rows = [
        {
            "module": name,
            "depth": name.count(".") + 1,
            "macs": int(macs_by_module.get(name, 0)),
            "params": sum(p.numel() for p in module.parameters()),
        }
        for name, module in model.named_modules()
        if name
    ]
    return pd.DataFrame(rows, columns=["module", "depth", "macs", "params"])


def _report_unsupported(ops: Mapping[str, int], on_unsupported: str) -> None:
    if not ops:
        return
    listed = ", ".join(f"{op} (x{n})" for op, n in sorted(ops.items()))
    message = (
        f"fvcore cannot count these ops, and they are not in dynas.counting.IGNORED_OPS: {listed}. "
        "Register a handle for them with mac_analysis(...).set_op_handle(), or add them to "
        "IGNORED_OPS with the reason they cost no MACs."
    )
    if on_unsupported == "raise":
        raise UnsupportedOpError(message)
    warnings.warn(message, RuntimeWarning, stacklevel=3)


def _resolve_input(
    model_or_spec: nn.Module | ArchSpec, input_size: int | tuple[int, ...] | None
) -> tuple[nn.Module, tuple[int, int, int]]:
    """Build the model if given a spec, and return it with the (C, H, W) it is counted at."""
    if isinstance(model_or_spec, nn.Module):
        if input_size is None:
            raise TypeError("`input_size` is required when counting an nn.Module, but got input_size=None.")
        return model_or_spec, input_shape(input_size)
    arch = model_or_spec
    size = arch.input_size if input_size is None else input_size
    return build_model(arch), input_shape(size, arch.in_channels)


def count_macs(
    model_or_spec: nn.Module | ArchSpec,
    input_size: int | tuple[int, ...] | None = None,
    *,
    on_unsupported: Literal["raise", "warn"] = "raise",
) -> MacReport:
    """Count MACs (with fvcore, at batch 1) and parameters of a model or an architecture spec.

    Args:
        model_or_spec: an ``nn.Module``, or an :class:`~dynas.spec.ArchSpec` (built with
            :func:`~dynas.builder.build_model`).
        input_size: an int (square), ``(height, width)`` or ``(channels, height, width)``;
            required for a module (3 channels unless given); for a spec it overrides
            ``arch.input_size`` (channels: ``arch.in_channels`` unless given).
        on_unsupported: ``"raise"`` an :class:`UnsupportedOpError`, or ``"warn"`` and report
            the ops in :attr:`MacReport.unsupported_ops`, when the model holds an op that is
            neither counted nor in :data:`IGNORED_OPS`.

    Returns:
        A :class:`MacReport`.

    Raises:
        UnsupportedOpError: an op cannot be counted and ``on_unsupported == "raise"``.
        TypeError: no ``input_size`` for a module.
        ValueError: ``input_size`` is malformed.
    """
    if on_unsupported not in ("raise", "warn"):
        raise ValueError(f"`on_unsupported` must be 'raise' or 'warn', but got {on_unsupported=!r}.")
    model, (channels, height, width) = _resolve_input(model_or_spec, input_size)
    was_training, threads = model.training, torch.get_num_threads()
    model.eval()  # a trace runs a forward: it must not update BatchNorm statistics
    # Only shapes matter; on small tensors extra threads only add synchronisation (3-4x slower
    # on a busy machine).
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            dtype = next(model.parameters(), torch.empty(0)).dtype
            analysis = mac_analysis(model, torch.zeros(1, channels, height, width, dtype=dtype))
            total = int(analysis.total())
            unsupported = dict(analysis.unsupported_ops())
    finally:
        model.train(was_training)
        torch.set_num_threads(threads)
    _report_unsupported(unsupported, on_unsupported)
    return MacReport(
        total_macs=total,
        params=sum(p.numel() for p in model.parameters()),
        by_module=_module_table(model, analysis.by_module()),
        by_operator=MappingProxyType({k: int(v) for k, v in analysis.by_operator().items()}),
        unsupported_ops=MappingProxyType(unsupported),
    )
