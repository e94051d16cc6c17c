"""The operator contract: a drop-in for ``nn.Conv2d`` whose kernel may depend on each sample."""

from __future__ import annotations

import pytest
import torch
from torch import nn

__all__ = ["CONV_CONFIGS", "OperatorContract"]

#: (in, out, kernel, stride, padding, dilation, groups, bias): the shapes every operator must take.
CONV_CONFIGS = [
    pytest.param(8, 16, 3, 1, 1, 1, 1, True, id="3x3"),
    pytest.param(8, 16, 1, 1, 0, 1, 1, False, id="1x1-nobias"),
    pytest.param(12, 12, 3, 2, 1, 1, 12, False, id="depthwise-strided"),
    pytest.param(12, 24, 5, 1, 2, 1, 4, True, id="grouped"),
    pytest.param(8, 8, 3, 1, 2, 2, 1, True, id="dilated"),
    pytest.param(6, 10, (3, 5), (2, 1), (0, 2), 1, 2, True, id="rect-padded"),
    pytest.param(8, 8, 3, 1, "same", 1, 8, True, id="same-depthwise"),
]

_HEIGHT, _WIDTH = 11, 13


def inputs(batch: int, channels: int, height: int = _HEIGHT, width: int = _WIDTH) -> torch.Tensor:
    """float64 inputs with per-sample channel offsets, so that each sample's attention differs."""
    return torch.randn(batch, channels, height, width, dtype=torch.double) + 2 * torch.randn(
        batch, channels, 1, 1, dtype=torch.double
    )


class OperatorContract:
    """Contract tests of a conv-like operator; subclasses implement :meth:`make`, :meth:`reference`, :meth:`expected_macs`.

    The ``config`` fixture runs every test over :data:`CONV_CONFIGS`; an operator that takes only
    some shapes (e.g. 1x1 only) overrides the fixture with its own ``params``.
    """

    tolerance = 1e-10  # float64 outputs against the reference

    def make(self, in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias) -> nn.Module:  # noqa: ANN001
        raise NotImplementedError

    def reference(self, op: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The operator's definition on one sample ``x`` (1, C, H, W), float64, no batching tricks."""
        raise NotImplementedError

    def expected_macs(self, op: nn.Module, shape: tuple[int, int, int]) -> int:
        """MACs per image of ``op`` on (C, H, W) inputs, from its formula."""
        raise NotImplementedError

    def _op(self, config) -> nn.Module:  # noqa: ANN001
        torch.manual_seed(0)
        return self.make(*config).double()

    @pytest.fixture(params=[pytest.param(c.values, id=c.id) for c in CONV_CONFIGS])
    def config(self, request):  # noqa: ANN001, ANN201
        return request.param

    def test_output_shape_is_conv2d_s(self, config):  # noqa: ANN001
        cin, cout, k, s, p, d, g, bias = config
        x = inputs(2, cin)
        assert self._op(config)(x).shape == nn.Conv2d(cin, cout, k, s, p, d, g, bias).double()(x).shape

    def test_matches_the_per_sample_reference(self, config):  # noqa: ANN001
        op = self._op(config)
        x = inputs(4, config[0])
        out = op(x)
        for i in range(4):
            torch.testing.assert_close(out[i : i + 1], self.reference(op, x[i : i + 1]), rtol=self.tolerance, atol=self.tolerance)

    def test_each_sample_is_independent_of_the_batch(self, config):  # noqa: ANN001
        op = self._op(config)
        x = inputs(5, config[0])
        out = op(x)
        for i in range(5):
            torch.testing.assert_close(out[i : i + 1], op(x[i : i + 1]), rtol=self.tolerance, atol=self.tolerance)

    def test_every_parameter_gets_a_gradient(self, config):  # noqa: ANN001
        op = self._op(config)
        op(inputs(3, config[0])).square().sum().backward()
        for name, p in op.named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, name

    def test_train_and_eval_agree(self, config):  # noqa: ANN001
        op = self._op(config)
        x = inputs(3, config[0])
        torch.testing.assert_close(op.train()(x), op.eval()(x), rtol=self.tolerance, atol=self.tolerance)

    def test_channels_last_input(self, config):  # noqa: ANN001
        op = self._op(config)
        x = inputs(3, config[0])
        torch.testing.assert_close(op(x.to(memory_format=torch.channels_last)), op(x), rtol=1e-9, atol=1e-9)

    def test_jit_trace_matches_eager_at_another_batch_size(self, config):  # noqa: ANN001
        op = self._op(config).eval()
        traced = torch.jit.trace(op, inputs(2, config[0]))
        y = inputs(5, config[0])
        torch.testing.assert_close(traced(y), op(y), rtol=self.tolerance, atol=self.tolerance)

    def test_mac_count_equals_the_formula(self, config):  # noqa: ANN001
        from dynas.counting import count_macs

        op = self._op(config).float()
        shape = (config[0], _HEIGHT, _WIDTH)
        assert count_macs(op, shape).total_macs == self.expected_macs(op, shape)
