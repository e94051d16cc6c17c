"""DynamicConvChoice: static/dynamic and K as one NNI choice inside a user's own ModelSpace."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

nni = pytest.importorskip("nni")
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from nni.nas.evaluator import FunctionalEvaluator
    from nni.nas.execution import SequentialExecutionEngine
    from nni.nas.nn.pytorch import ModelSpace
    from nni.nas.space import SimplifiedModelSpace
    from nni.nas.strategy import GridSearch

from dynas.engines.nni_blocks import DynamicConvChoice, count_frozen_macs  # noqa: E402
from dynas.ops import DynamicConv2d  # noqa: E402


class Net(ModelSpace):
    def __init__(self) -> None:
        super().__init__()
        self.conv = DynamicConvChoice(3, 16, 3, num_kernels=nni.choice("conv_k", [1, 2, 4]))
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv(x).mean((2, 3)))


def _expected_macs(k: int) -> int:
    conv = 16 * 3 * 9 * 8 * 8  # Cout * Cin * k * k * H * W
    pooling_and_fc = 16 * 8 * 8 + 16 * 10
    hidden = 4  # max(3 // 4, min_hidden=4)
    dynamic = 0 if k == 1 else k * 16 * 3 * 9 + 3 * 8 * 8 + 3 * hidden + hidden * k  # aggregation + attention
    return conv + pooling_and_fc + dynamic


@pytest.mark.parametrize("k", [1, 2, 4])
def test_one_choice_says_static_or_dynamic_and_k(k):
    model = Net().freeze({"conv_k": k})
    layer = model.conv.conv
    if k == 1:
        assert type(layer) is nn.Conv2d
    else:
        assert isinstance(layer, DynamicConv2d) and layer.num_kernels == k
    assert model(torch.randn(2, 3, 8, 8)).shape == (2, 10)
    assert count_frozen_macs(model, 8) == _expected_macs(k)


def test_the_space_exposes_the_choice_to_nni():
    assert {label: list(m.values) for label, m in Net().simplify().items()} == {"conv_k": [1, 2, 4]}


def test_a_multi_trial_strategy_explores_every_k():
    seen: list[int] = []

    def evaluate(model: nn.Module) -> None:
        layer = model.conv.conv
        seen.append(layer.num_kernels if isinstance(layer, DynamicConv2d) else 1)
        nni.report_final_result(float(count_frozen_macs(model, 8)))

    strategy = GridSearch()
    engine = SequentialExecutionEngine()
    strategy.initialize(SimplifiedModelSpace.from_model(Net(), FunctionalEvaluator(evaluate)), engine)
    try:
        strategy.run()
    finally:
        engine.shutdown()
    assert sorted(seen) == [1, 2, 4]
