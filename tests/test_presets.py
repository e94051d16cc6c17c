from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from dynas.builder import build_model
from dynas.errors import DynasError
from dynas.ops import DynamicConv2d
from dynas.presets import PRESETS, cifar_variant, get_preset, list_presets, mobilenet_v2, mobilenet_v3_small
from dynas.spec import ArchSpec


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _params(arch: ArchSpec) -> int:
    return sum(p.numel() for p in build_model(arch).parameters())


def test_preset_names():
    widths = ("100", "075", "050", "035")
    imagenet = {f"{dy}mobilenetv2_{w}" for dy in ("", "dy_") for w in widths} | {"mobilenetv3_small", "dy_mobilenetv3_small"}
    imagenet |= {f"{op}_mobilenetv2_{w}" for op in ("od1", "od4", "dcd") for w in ("100", "050")}
    expected = imagenet | {f"{name}_cifar" for name in imagenet}
    assert set(list_presets()) == expected == set(PRESETS)
    assert list_presets() == sorted(expected)


@pytest.mark.parametrize("name", list_presets())
def test_every_preset_builds_trains_and_round_trips(name):
    arch = get_preset(name)
    assert (arch.input_size, arch.num_classes) == ((32, 10) if name.endswith("_cifar") else (224, 1000))
    assert ArchSpec.from_str(arch.to_str()) == arch
    assert ArchSpec.from_dict(json.loads(json.dumps(arch.to_dict()))) == arch
    model = build_model(arch)
    out = model(torch.randn(2, 3, 64, 64))  # reduced resolution keeps the test fast
    assert out.shape == (2, arch.num_classes) and torch.isfinite(out).all()
    out.logsumexp(1).mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_static_mobilenets_match_torchvision_parameter_counts():
    assert _params(get_preset("mobilenetv2_100")) == pytest.approx(3.50e6, abs=0.05e6)
    assert _params(get_preset("mobilenetv2_100")) == 3_504_872  # torchvision.models.mobilenet_v2()
    assert _params(get_preset("mobilenetv3_small")) == 2_542_856  # torchvision.models.mobilenet_v3_small()


def test_dy_mobilenetv2_matches_the_paper():
    # DY-CNN (Chen et al. 2020), Table: DY-MobileNetV2 x1.0 has 11.1M parameters
    assert _params(get_preset("dy_mobilenetv2_100")) == pytest.approx(11.1e6, rel=0.02)


def test_dy_presets_are_dynamic_everywhere_but_the_stem():
    for name in ("dy_mobilenetv2_050", "dy_mobilenetv3_small"):
        arch = get_preset(name)
        assert all(b.num_kernels == 4 and b.dynamic_convs == "pw" for b in arch.blocks)
        assert arch.head_num_kernels == 4
        static = get_preset(name.removeprefix("dy_"))
        assert [(b.kernel_size, b.expansion, b.out_channels, b.stride) for b in arch.blocks] == [
            (b.kernel_size, b.expansion, b.out_channels, b.stride) for b in static.blocks
        ]
    assert all(b.num_kernels == 1 for b in get_preset("mobilenetv2_100").blocks)


def test_dynamic_layer_rule_is_a_parameter():
    arch = mobilenet_v2(num_kernels=4, dynamic_convs="all", head_num_kernels=1)
    model = build_model(arch)
    assert isinstance(model.stages[1][0].depthwise.conv, DynamicConv2d)
    assert not isinstance(model.head.conv.conv, DynamicConv2d)
    assert all(b.dynamic_convs == "all" for b in arch.blocks)


def test_mobilenetv2_width_rules():
    narrow = get_preset("mobilenetv2_035")
    assert narrow.stem_channels == 16 and narrow.stages[0].blocks[0].out_channels == 8
    assert narrow.head_channels == 1280  # the head is only widened, never narrowed
    assert [s.blocks[-1].out_channels for s in get_preset("mobilenetv2_075").stages] == [16, 24, 24, 48, 72, 120, 240]
    assert mobilenet_v2(1.4).head_channels == 1792
    depth = [len(s.blocks) for s in get_preset("mobilenetv2_100").stages]
    assert depth == [1, 2, 3, 4, 3, 3, 1]
    assert get_preset("mobilenetv2_100").stages[0].blocks[0].expansion == 1.0


def test_mobilenetv3_small_expanded_widths_are_torchvision_s():
    model = build_model(mobilenet_v3_small())
    widths = [block.depthwise.conv.out_channels for stage in model.stages for block in stage]
    assert widths == [16, 72, 88, 96, 240, 240, 120, 144, 288, 576, 576]
    assert model.stages[0][0].se.fc1.out_channels == 8
    assert model.head.hidden[0].out_features == 1024


def test_cifar_variant():
    arch = cifar_variant(get_preset("mobilenetv2_100"), num_classes=100)
    assert (arch.stem_stride, arch.input_size, arch.num_classes) == (1, 32, 100)
    strides = [b.stride for b in arch.blocks]
    original = [b.stride for b in get_preset("mobilenetv2_100").blocks]
    first = original.index(2)
    assert strides[first] == 1 and strides[:first] + strides[first + 1 :] == original[:first] + original[first + 1 :]
    model = build_model(arch)
    features = torch.randn(2, 3, 32, 32)
    features = model.stem(features)
    for stage in model.stages:
        features = stage(features)
    assert features.shape[-2:] == (4, 4)  # total stride 8 instead of 32


def test_get_preset_suggests_close_names():
    with pytest.raises(DynasError, match=r"unknown preset 'mobilenetv2_10'\. Did you mean 'mobilenetv2_100'\?"):
        get_preset("mobilenetv2_10")


@pytest.mark.parametrize("name", ["mobilenetv2_050", "dy_mobilenetv3_small"])
def test_cifar_presets_are_the_cifar_variants(name):
    assert get_preset(f"{name}_cifar") == cifar_variant(get_preset(name))
    assert (get_preset(f"{name}_cifar").input_size, get_preset(f"{name}_cifar").num_classes) == (32, 10)


@pytest.mark.parametrize("width", ["100", "050"])
@pytest.mark.parametrize("k", [1, 4])
def test_odconv_presets_are_the_official_od_mobilenetv2(width, k):
    arch, static = get_preset(f"od{k}_mobilenetv2_{width}"), get_preset(f"mobilenetv2_{width}")
    assert all((b.op, b.num_kernels, b.dynamic_convs) == ("od", k, "all") for b in arch.blocks)
    assert (arch.head_op, arch.head_num_kernels) == ("od", k)
    assert [dataclasses.replace(b, op="dy", num_kernels=1, dynamic_convs="pw") for b in arch.blocks] == list(static.blocks)


@pytest.mark.parametrize("width,squeeze", [("100", 16), ("050", 8)])
def test_dcd_presets_are_the_official_mobilenetv2_dcd(width, squeeze):
    arch = get_preset(f"dcd_mobilenetv2_{width}")
    first, *rest = arch.blocks
    assert not first.is_dynamic and first.expansion == 1  # the official first block has no DCD
    assert all(b.op == "dcd" and b.latent == 0 for b in rest)
    assert not arch.head_is_dynamic and arch.dcd_reduction == squeeze
    model = build_model(arch)
    assert type(model.stages[1][0].depthwise.conv) is torch.nn.Conv2d


@pytest.mark.parametrize("name", ["od4_mobilenetv2_050", "dcd_mobilenetv2_100"])
def test_operator_cifar_presets_are_the_cifar_variants(name):
    assert get_preset(f"{name}_cifar") == cifar_variant(get_preset(name))
