from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from torch import nn

from dynas.builder import InvertedResidual, build_model, create_act, create_conv2d
from dynas.ops import DynamicConv2d
from dynas.spec import ArchSpec, BlockSpec, StageSpec


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models are dominated by thread overhead on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _arch(**overrides) -> ArchSpec:
    stages = (
        StageSpec((BlockSpec(3, 1, 16),)),
        StageSpec((BlockSpec(5, 6, 24, 2, True, "hswish", 4, "pw"), BlockSpec(3, 88 / 24, 24, num_kernels=2, dynamic_convs="all"))),
    )
    fields = dict(stem_channels=16, stages=stages, head_channels=64, stem_stride=1, num_classes=10, input_size=32)
    return ArchSpec(**{**fields, **overrides})


def test_checkpoint_keys_are_stable():
    keys = set(build_model(_arch(head_hidden=32)).state_dict())
    for key in (
        "stem.conv.weight",
        "stem.bn.running_mean",
        "stages.0.0.depthwise.conv.weight",
        "stages.0.0.project.conv.weight",
        "stages.1.0.expand.conv.weight",
        "stages.1.0.expand.bn.weight",
        "stages.1.0.depthwise.conv.weight",
        "stages.1.0.se.fc1.weight",
        "stages.1.0.se.fc2.bias",
        "stages.1.0.project.bn.bias",
        "stages.1.0.expand.conv.attention.fc1.weight",
        "head.conv.conv.weight",
        "head.conv.bn.weight",
        "head.hidden.0.weight",
        "head.classifier.weight",
    ):
        assert key in keys, key
    assert not any(k.startswith("stages.0.0.expand") for k in keys)  # expansion 1: no expand conv
    assert not any(k.startswith("stages.1.1.se") for k in keys)


def test_operator_per_conv():
    model = build_model(_arch())
    pw, allconv = model.stages[1][0], model.stages[1][1]
    assert isinstance(model.stem.conv, nn.Conv2d) and isinstance(model.head.conv.conv, nn.Conv2d)
    assert isinstance(model.stages[0][0].depthwise.conv, nn.Conv2d)
    # dynamic_convs="pw": both 1x1 convs dynamic, the depthwise static
    assert isinstance(pw.expand.conv, DynamicConv2d) and pw.expand.conv.num_kernels == 4
    assert isinstance(pw.project.conv, DynamicConv2d)
    assert type(pw.depthwise.conv) is nn.Conv2d
    # dynamic_convs="all": the depthwise too
    assert all(isinstance(m.conv, DynamicConv2d) and m.conv.num_kernels == 2 for m in (allconv.expand, allconv.depthwise, allconv.project))
    head_dynamic = build_model(_arch(head_num_kernels=3)).head.conv.conv
    assert isinstance(head_dynamic, DynamicConv2d) and head_dynamic.num_kernels == 3


def test_attention_width_follows_the_spec():
    model = build_model(_arch(attention_reduction=8, attention_min_hidden=6))
    expand = model.stages[1][0].expand.conv  # 16 -> 96
    project = model.stages[1][0].project.conv  # 96 -> 24
    assert expand.attention.fc1.out_features == max(16 // 8, 6) == 6
    assert project.attention.fc1.out_features == 96 // 8


def test_channel_rules():
    model = build_model(_arch())
    block = model.stages[1][0]
    assert block.expand.conv.out_channels == 96  # make_divisible(16 * 6, 8)
    assert block.se.fc1.out_channels == 24  # make_divisible(96 // 4, 8)
    assert model.stages[1][1].expand.conv.out_channels == 88  # make_divisible(24 * 88/24, 8)
    assert block.depthwise.conv.groups == 96 and block.depthwise.conv.kernel_size == (5, 5)
    assert block.depthwise.conv.stride == (2, 2)


def test_convs_have_no_bias_except_squeeze_excite():
    model = build_model(_arch())
    for name, module in model.named_modules():
        if isinstance(module, (nn.Conv2d, DynamicConv2d)):
            assert (module.bias is not None) == (".se." in name), name


def test_residual_only_when_stride_1_and_same_width():
    model = build_model(_arch())
    assert model.stages[0][0].use_residual  # 16 -> 16, stride 1
    assert not model.stages[1][0].use_residual  # stride 2
    assert model.stages[1][1].use_residual
    block = InvertedResidual(24, BlockSpec(3, 6, 24)).eval()
    nn.init.zeros_(block.project.bn.weight)  # the branch now outputs exactly zero
    x = torch.randn(2, 24, 8, 8)
    assert torch.equal(block(x), x)
    assert not InvertedResidual(16, BlockSpec(3, 6, 24)).use_residual


@pytest.mark.parametrize("size,classes", [(32, 10), (57, 3), (96, 1000), (7, 2)])
def test_any_resolution_and_number_of_classes(size, classes):
    model = build_model(_arch(num_classes=classes, head_hidden=16))
    out = model(torch.randn(2, 3, size, size))
    assert out.shape == (2, classes)
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_each_sample_is_independent_of_the_batch_in_eval():
    model = build_model(_arch()).eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        together = model(x)
        alone = torch.cat([model(x[i : i + 1]) for i in range(4)])
    torch.testing.assert_close(together, alone, rtol=1e-4, atol=1e-5)


def test_init_as_torchvision_mobilenetv2():
    torch.manual_seed(0)
    arch = ArchSpec(64, (StageSpec((BlockSpec(3, 6, 64), BlockSpec(3, 6, 64, num_kernels=4))),), 512, num_classes=1000)
    model = build_model(arch)
    static = model.stages[0][0].expand.conv  # (384, 32, 1, 1): fan_out = 384
    assert static.weight.std().item() == pytest.approx(math.sqrt(2 / 384), rel=0.05)
    assert model.stages[0][0].expand.bn.weight.eq(1).all() and model.stages[0][0].expand.bn.bias.eq(0).all()
    assert model.head.classifier.weight.std().item() == pytest.approx(0.01, rel=0.05)
    assert model.head.classifier.bias.eq(0).all()
    dynamic = model.stages[0][1].expand.conv  # (K=4, 384, 64, 1, 1)
    for k in range(4):  # each kernel drawn on its own, at the static conv's scale
        assert dynamic.weight[k].std().item() == pytest.approx(math.sqrt(2 / 384), rel=0.05)
    assert not torch.allclose(dynamic.weight[0], dynamic.weight[1])
    # the attention keeps the operator's init (default nn.Linear: non-zero bias, std >> 0.01)
    assert dynamic.attention.fc1.bias.abs().sum() > 0
    assert dynamic.attention.fc1.weight.std().item() > 0.05


def test_create_conv2d_keeps_size_and_picks_operator():
    x = torch.randn(2, 8, 9, 9)
    static = create_conv2d(8, 16, 5)
    dynamic = create_conv2d(8, 16, 5, stride=2, groups=8, num_kernels=3, reduction=2, min_hidden=3)
    assert type(static) is nn.Conv2d and static(x).shape == (2, 16, 9, 9)
    assert isinstance(dynamic, DynamicConv2d) and dynamic(x).shape == (2, 16, 5, 5)
    assert dynamic.attention.fc1.out_features == 4 and dynamic.bias is None


def test_model_keeps_its_spec():
    arch = _arch()
    assert build_model(arch).arch is arch
    assert build_model(dataclasses.replace(arch, dropout=0.0)).head.dropout.p == 0.0


def test_build_model_rejects_non_spec():
    with pytest.raises(TypeError, match=r"`arch` must be an ArchSpec, but got dict"):
        build_model({"stem_channels": 16})  # type: ignore[arg-type]


def test_create_act_rejects_unknown():
    assert isinstance(create_act("hswish"), nn.Hardswish)
    with pytest.raises(ValueError, match=r"`name` must be one of \('relu', 'relu6', 'hswish'\), but got name='gelu'\."):
        create_act("gelu")


# ----------------------------------------------------------------------------- ODConv and DCD blocks

from dynas.ops import DCDConv2d, ODConv2d  # noqa: E402


def test_create_conv2d_picks_odconv_and_dcd():
    x = torch.randn(2, 8, 9, 9)
    od = create_conv2d(8, 16, 3, stride=2, op="od", num_kernels=1)
    assert isinstance(od, ODConv2d) and od.num_kernels == 1 and od(x).shape == (2, 16, 5, 5)
    dcd = create_conv2d(8, 16, 1, op="dcd", latent=6, reduction=8)
    assert isinstance(dcd, DCDConv2d) and dcd.latent == 6 and dcd(x).shape == (2, 16, 9, 9)
    assert dcd.attention.fc.out_features == max(max(32, 36) // 8, 4)  # widening: a 2x2 pool, 4 * 8 inputs
    with pytest.raises(ValueError, match=r"op='dcd' is a dense 1x1 conv, but got kernel_size=3, groups=1\."):
        create_conv2d(8, 16, 3, op="dcd")
    with pytest.raises(ValueError, match=r"`op` must be one of \('dy', 'od', 'dcd'\), but got op='cond'\."):
        create_conv2d(8, 16, 1, op="cond")


def _ops_arch(**overrides) -> ArchSpec:
    stages = (
        StageSpec((BlockSpec(3, 1, 16, op="od", num_kernels=1, dynamic_convs="all"),)),
        StageSpec((BlockSpec(5, 6, 24, 2, True, "hswish", 4, "pw", "od"), BlockSpec(3, 4, 24, op="dcd"))),
    )
    fields = dict(stem_channels=16, stages=stages, head_channels=64, stem_stride=1, num_classes=10, input_size=32,
                  head_op="od", head_num_kernels=2)
    return ArchSpec(**{**fields, **overrides})


def test_operator_per_conv_for_odconv_and_dcd_blocks():
    model = build_model(_ops_arch())
    first, od_pw, dcd = model.stages[0][0], model.stages[1][0], model.stages[1][1]
    assert isinstance(first.depthwise.conv, ODConv2d) and isinstance(first.project.conv, ODConv2d)  # "all"
    assert first.project.conv.num_kernels == 1
    assert isinstance(od_pw.expand.conv, ODConv2d) and od_pw.expand.conv.num_kernels == 4
    assert type(od_pw.depthwise.conv) is nn.Conv2d  # "pw": the depthwise stays static
    assert isinstance(dcd.expand.conv, DCDConv2d) and isinstance(dcd.project.conv, DCDConv2d)
    assert type(dcd.depthwise.conv) is nn.Conv2d
    assert isinstance(model.head.conv.conv, ODConv2d) and model.head.conv.conv.num_kernels == 2
    assert isinstance(build_model(_ops_arch(head_op="dcd", head_num_kernels=1)).head.conv.conv, DCDConv2d)


def test_odconv_and_dcd_checkpoint_keys_are_stable():
    keys = set(build_model(_ops_arch()).state_dict())
    for key in (
        "stages.0.0.depthwise.conv.weight",
        "stages.0.0.depthwise.conv.attention.fc.weight",
        "stages.0.0.depthwise.conv.attention.bn.running_mean",
        "stages.0.0.depthwise.conv.attention.heads.weight",
        "stages.1.1.expand.conv.weight",
        "stages.1.1.expand.conv.weight_p",
        "stages.1.1.expand.conv.weight_q",
        "stages.1.1.project.conv.attention.gate.weight",
        "stages.1.1.project.conv.attention.heads.weight",
        "head.conv.conv.attention.heads.bias",
    ):
        assert key in keys, key


def test_dcd_reduction_reaches_every_dcd_conv():
    model = build_model(_ops_arch(dcd_reduction=2))
    project = model.stages[1][1].project.conv  # 96 -> 24: global pool, L = 12
    assert project.attention.fc.out_features == max(96, project.latent**2) // 2


def test_init_of_odconv_and_dcd():
    torch.manual_seed(0)
    model = build_model(_ops_arch())
    od = model.stages[1][0].expand.conv  # (K=4, 96, 16, 1, 1)
    for k in range(4):
        assert od.weight[k].std().item() == pytest.approx(math.sqrt(2 / 96), rel=0.1)
    assert od.attention.fc.weight.std().item() > 0.05  # the official kaiming trunk, not normal(0, 0.01)
    assert torch.count_nonzero(od.attention.heads.weight) == 0  # zero heads: gates start at 1/2
    assert torch.count_nonzero(model.stages[1][1].expand.conv.weight_p) == 0  # DCD's P starts at 0
    dcd = model.stages[1][1].expand.conv  # 24 -> 96
    assert dcd.weight.std().item() == pytest.approx(math.sqrt(2 / 96), rel=0.1)
    assert dcd.attention.fc.weight.std().item() == pytest.approx(0.01, rel=0.1)  # the official DCD init
    x = torch.randn(2, 24, 8, 8)
    lam, _ = dcd.attention(x)
    torch.testing.assert_close(lam, torch.ones_like(lam), atol=0.01, rtol=0)  # starts as its static conv


def test_odconv_and_dcd_networks_train_at_any_resolution():
    model = build_model(_ops_arch())
    for size in (32, 17):
        out = model(torch.randn(2, 3, size, size))
        out.sum().backward()
        assert out.shape == (2, 10) and all(p.grad is not None for p in model.parameters())
