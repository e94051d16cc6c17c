from __future__ import annotations

import pytest
from torch import nn

from dynas import DynamicConv2d, LinearAnneal, dynamic_layers, set_temperature


def test_schedule_endpoints_and_midpoint():
    s = LinearAnneal(start=30.0, end=1.0, anneal_steps=200)
    assert s(0) == 30.0
    assert s(100) == pytest.approx(15.5)
    assert s(200) == 1.0
    assert s(10_000) == 1.0
    assert s(50) > s(51)  # strictly decreasing while annealing


def test_from_fraction_of_total_steps():
    s = LinearAnneal.from_fraction(total_steps=1000, fraction=0.1)
    assert s.anneal_steps == 100
    assert s(50) == pytest.approx(15.5)
    assert s(100) == 1.0


def test_zero_anneal_steps_is_constant_end():
    assert LinearAnneal(anneal_steps=0)(0) == 1.0


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(start=0.0), r"`start` \(temperature\) must be a finite number > 0, but got start=0.0"),
        (dict(end=-1.0), r"`end` \(temperature\) must be a finite number > 0, but got end=-1.0"),
        (dict(anneal_steps=-5), r"`anneal_steps` must be an integer >= 0, but got anneal_steps=-5"),
    ],
)
def test_bad_schedule(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LinearAnneal(**kwargs)


def test_bad_fraction():
    with pytest.raises(ValueError, match=r"`fraction` must lie in \[0, 1\], but got fraction=1.5"):
        LinearAnneal.from_fraction(100, fraction=1.5)


def test_set_temperature_on_every_dynamic_layer():
    model = nn.Sequential(
        DynamicConv2d(3, 8, 3, num_kernels=2),
        nn.ReLU(),
        nn.Sequential(nn.Conv2d(8, 8, 1), DynamicConv2d(8, 8, 1, num_kernels=4)),
    )
    assert [name for name, _ in dynamic_layers(model)] == ["0", "2.1"]
    assert set_temperature(model, 7.5) == 2
    assert all(layer.temperature == 7.5 for _, layer in dynamic_layers(model))
    with pytest.raises(ValueError, match="temperature"):
        set_temperature(model, 0)


def test_current_temperature_reads_the_dynamic_layers_or_the_default():
    from torch import nn

    from dynas.ops import DynamicConv2d
    from dynas.temperature import current_temperature, set_temperature

    model = nn.Sequential(DynamicConv2d(4, 4, 3, padding=1), DynamicConv2d(4, 4, 1))
    set_temperature(model, 7.5)
    assert current_temperature(model) == 7.5
    assert current_temperature(nn.Conv2d(4, 4, 1), default=2.0) == 2.0
