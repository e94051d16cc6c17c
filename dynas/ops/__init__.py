"""Operators. Imports torch only (no NNI, Optuna, pandas or fvcore here)."""

from dynas.ops.dynamic_conv import DynamicConv2d, KernelAttention

__all__ = ["DynamicConv2d", "KernelAttention"]
