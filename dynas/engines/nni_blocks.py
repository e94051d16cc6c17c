"""NNI building blocks: convolutions whose static/dynamic choice and K are NNI choices.

Use them inside your own ``nni.nas.nn.pytorch.ModelSpace`` with any of NNI's multi-trial
strategies; ``num_kernels=1`` is a plain ``nn.Conv2d`` and ``num_kernels >= 2`` a
:class:`~dynas.ops.DynamicConv2d` with K kernels, so one categorical choice says both whether
the layer is dynamic and with which K::

    import nni
    from nni.nas.nn.pytorch import ModelSpace
    from dynas.engines.nni_blocks import DynamicConvChoice

    class Net(ModelSpace):
        def __init__(self):
            super().__init__()
            self.conv = DynamicConvChoice(3, 16, 3, num_kernels=nni.choice("conv_k", [1, 2, 4]))
            ...

A frozen model is plain PyTorch: count it with :func:`count_frozen_macs` (fvcore with dynas's
handles; NNI's own FLOPs profiler counts modules it does not know as zero).
"""

from __future__ import annotations

import warnings
from typing import Any

from torch import nn

from dynas.builder import create_conv2d

try:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # NNI 3.0 warns at import about every newer torch class
        from nni.nas.nn.pytorch import ParametrizedModule
except ImportError as err:
    raise ImportError("NNI building blocks need the nni extra: pip install 'dynas[nni]'") from err

__all__ = ["DynamicConvChoice", "count_frozen_macs"]


class DynamicConvChoice(ParametrizedModule):
    """A "same"-padded conv whose ``num_kernels`` may be an ``nni.choice``: 1 static, K >= 2 dynamic.

    Arguments are :func:`dynas.builder.create_conv2d`'s (``nn.Conv2d``'s names); any of them
    may be an NNI choice. ``temperature`` of the dynamic layer follows
    :func:`dynas.temperature.set_temperature` as every DynamicConv2d's does.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        groups: int = 1,
        bias: bool = False,
        *,
        num_kernels: int = 1,
        reduction: int = 4,
        min_hidden: int = 4,
    ) -> None:
        super().__init__()
        # ParametrizedModule hands __init__ the frozen values: num_kernels is an int here.
        self.conv = create_conv2d(
            in_channels, out_channels, kernel_size, stride, groups, bias,
            num_kernels=num_kernels, reduction=reduction, min_hidden=min_hidden,
        )

    def forward(self, x: Any) -> Any:
        return self.conv(x)


def count_frozen_macs(model: nn.Module, input_size: int | tuple[int, ...]) -> int:
    """MACs per image of a frozen NNI model built from dynas blocks (fvcore with dynas's handles)."""
    from dynas.counting import count_macs

    return count_macs(model, input_size).total_macs
