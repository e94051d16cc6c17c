"""Operators. Imports torch only (no NNI, Optuna, pandas or fvcore here).

* :class:`DynamicConv2d` -- DY-conv (Chen et al., CVPR 2020): K kernels mixed by a softmax;
* :class:`ODConv2d` -- ODConv (Li et al., ICLR 2022): K kernels and four attentions;
* :class:`DCDConv2d` -- DCD (Li et al., ICLR 2021): a 1x1 conv with dynamic channel fusion.

:data:`TEMPERATURE_LAYERS` are the operators with a settable ``temperature`` (DCD has none).
"""

from dynas.ops.dcd import DCDAttention, DCDConv2d
from dynas.ops.dynamic_conv import DynamicConv2d, KernelAttention
from dynas.ops.odconv import ODConv2d, OmniAttention

__all__ = [
    "TEMPERATURE_LAYERS",
    "DCDAttention",
    "DCDConv2d",
    "DynamicConv2d",
    "KernelAttention",
    "ODConv2d",
    "OmniAttention",
]

#: The operators whose attention has a temperature (annealed by :mod:`dynas.temperature`).
TEMPERATURE_LAYERS = (DynamicConv2d, ODConv2d)
