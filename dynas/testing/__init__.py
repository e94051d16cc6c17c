"""Contract test classes that every operator and every search space passes (as ``optuna.testing``).

Subclass one in a test module (a class named ``Test...``) and provide its fixture; pytest then
runs every contract test against your operator or space::

    from dynas.testing import OperatorContract

    class TestMyConv(OperatorContract):
        def make(self, in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias):
            return MyConv(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias)

        def reference(self, op, x):          # one sample (1, C, H, W), float64: the definition
            ...

        def expected_macs(self, op, x_shape):  # MACs per image under dynas's convention
            ...

dynas's own tests use these classes for ``DynamicConv2d`` and every registered space, so a new
operator or space is held to the same rules. Needs pytest (the ``test`` extra).
"""

from dynas.testing.operators import CONV_CONFIGS, OperatorContract
from dynas.testing.spaces import FakeTrial, SearchSpaceContract

__all__ = ["CONV_CONFIGS", "FakeTrial", "OperatorContract", "SearchSpaceContract"]
