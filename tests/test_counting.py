"""MAC counting: fvcore with dynas' handles equals the formulas; the closed form equals fvcore."""

from __future__ import annotations

import dataclasses
import time

import pytest
import torch
from torch import nn

from dynas.cost import closed_form_macs, closed_form_params, format_count, input_shape
from dynas.counting import IGNORED_OPS, UnsupportedOpError, count_macs, mac_analysis
from dynas.ops import DynamicConv2d
from dynas.presets import get_preset, list_presets
from dynas.spaces import get_space, list_spaces

# (in, out, kernel, stride, padding, dilation, groups, bias)
CONV_CONFIGS = [
    pytest.param(8, 16, 3, 1, 1, 1, 1, True, id="3x3"),
    pytest.param(8, 16, 1, 1, 0, 1, 1, False, id="1x1-nobias"),
    pytest.param(8, 16, 1, 2, 0, 1, 1, False, id="1x1-strided"),
    pytest.param(12, 12, 3, 2, 1, 1, 12, False, id="depthwise-strided"),
    pytest.param(12, 24, 5, 1, 2, 1, 4, True, id="grouped"),
    pytest.param(8, 8, 3, 1, 2, 2, 1, True, id="dilated"),
    pytest.param(6, 10, (3, 5), (2, 1), (0, 2), 1, 2, True, id="rect-padded"),
    pytest.param(8, 8, 3, 1, "same", 1, 8, True, id="same-depthwise"),
]
HEIGHT, WIDTH = 9, 11


def _out_size(size: int, k: int, s: int, p: int | str, d: int) -> int:
    if p == "same":
        return size
    return (size + 2 * p - d * (k - 1) - 1) // s + 1


def _pair(v):
    return v if isinstance(v, tuple) else (v, v)


def _conv_formula(cin, cout, k, s, p, d, g) -> tuple[int, int]:
    """(MACs of the convolution of one sample, elements of one kernel)."""
    (kh, kw), (sh, sw), (dh, dw) = _pair(k), _pair(s), _pair(d)
    ph, pw = (p, p) if p == "same" else _pair(p)
    ho, wo = _out_size(HEIGHT, kh, sh, ph, dh), _out_size(WIDTH, kw, sw, pw, dw)
    weight = cout * (cin // g) * kh * kw
    return weight * ho * wo, weight


@pytest.mark.parametrize("cin,cout,k,s,p,d,g,bias", CONV_CONFIGS)
def test_static_conv_equals_formula(cin, cout, k, s, p, d, g, bias):
    conv = nn.Conv2d(cin, cout, k, s, p, d, g, bias)
    report = count_macs(conv, (cin, HEIGHT, WIDTH))
    assert report.total_macs == _conv_formula(cin, cout, k, s, p, d, g)[0]
    assert report.params == sum(t.numel() for t in conv.parameters())


@pytest.mark.parametrize("attention", ["softmax", "sigmoid"])
@pytest.mark.parametrize("num_kernels,reduction,min_hidden", [(4, 4, 4), (2, 2, 16), (8, 4, 1)])
@pytest.mark.parametrize("cin,cout,k,s,p,d,g,bias", CONV_CONFIGS)
def test_dynamic_conv_equals_formula(cin, cout, k, s, p, d, g, bias, num_kernels, reduction, min_hidden, attention):
    layer = DynamicConv2d(
        cin, cout, k, s, p, d, g, bias,
        num_kernels=num_kernels, reduction=reduction, min_hidden=min_hidden, attention=attention,
    )
    conv, weight = _conv_formula(cin, cout, k, s, p, d, g)
    aggregation = num_kernels * weight + (num_kernels * cout if bias else 0)
    hidden = max(cin // reduction, min_hidden)
    attention_macs = cin * HEIGHT * WIDTH + cin * hidden + hidden * num_kernels  # GAP, FC1, FC2
    report = count_macs(layer, (cin, HEIGHT, WIDTH))
    assert report.total_macs == conv + aggregation + attention_macs
    assert report.params == num_kernels * weight + (num_kernels * cout if bias else 0) + (
        cin * hidden + hidden + hidden * num_kernels + num_kernels
    )


@pytest.mark.parametrize("cin,cout,k,s,p,d,g,bias", CONV_CONFIGS)
def test_dynamic_conv_counts_per_sample(cin, cout, k, s, p, d, g, bias):
    """Each sample is convolved with its own kernel: batch 4 costs exactly 4 x batch 1."""
    layer = DynamicConv2d(cin, cout, k, s, p, d, g, bias).eval()

    def total(batch: int) -> int:
        with torch.no_grad():
            return int(mac_analysis(layer, torch.zeros(batch, cin, HEIGHT, WIDTH)).total())

    assert total(4) == 4 * total(1) == 4 * count_macs(layer, (cin, HEIGHT, WIDTH)).total_macs


class _InvertedResidual(nn.Module):
    """Expand -> depthwise -> SE (multiply) -> project, plus a residual add: adds/muls are free."""

    def __init__(self, channels: int, dynamic: bool) -> None:
        super().__init__()
        conv = (lambda *a, **kw: DynamicConv2d(*a, **kw, num_kernels=3)) if dynamic else nn.Conv2d
        self.expand = nn.Sequential(conv(channels, 4 * channels, 1, bias=False), nn.BatchNorm2d(4 * channels), nn.ReLU6())
        self.depthwise = nn.Sequential(
            nn.Conv2d(4 * channels, 4 * channels, 3, padding=1, groups=4 * channels, bias=False),
            nn.BatchNorm2d(4 * channels),
            nn.Hardswish(),
        )
        self.se = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Conv2d(4 * channels, channels, 1), nn.ReLU(),
            nn.Conv2d(channels, 4 * channels, 1), nn.Hardsigmoid(),
        )
        self.project = nn.Sequential(conv(4 * channels, channels, 1, bias=False), nn.BatchNorm2d(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.depthwise(self.expand(x))
        return x + self.project(y * self.se(y))


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
def test_small_model_equals_formula(dynamic):
    c, hw, k = 8, 6 * 6, 3
    model = nn.Sequential(
        _InvertedResidual(c, dynamic), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.2), nn.Linear(c, 10)
    )
    expand, depthwise, project = 4 * c * c * hw, 4 * c * 9 * hw, 4 * c * c * hw
    se = 4 * c * hw + 4 * c * c + c * 4 * c  # GAP + two 1x1 FCs (their biases are not MACs)
    head = c * hw + c * 10  # GAP + classifier
    expected = expand + depthwise + project + se + head
    if dynamic:
        hidden_e, hidden_p = max(c // 4, 4), max(4 * c // 4, 4)
        expected += k * 4 * c * c + c * hw + c * hidden_e + hidden_e * k  # expand: aggregation, attention
        expected += k * 4 * c * c + 4 * c * hw + 4 * c * hidden_p + hidden_p * k  # project
    report = count_macs(model, (c, 6, 6))
    assert report.total_macs == expected
    assert report.params == sum(t.numel() for t in model.parameters())
    blocks = report.at_depth(1)
    assert blocks["module"].tolist() == ["0", "1", "2", "3", "4"]
    assert blocks["macs"].sum() == expected
    assert blocks["params"].sum() == report.params


def test_count_restores_training_mode_threads_and_batchnorm_statistics():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    before, threads = model[1].running_mean.clone(), torch.get_num_threads()
    count_macs(model, (3, 8, 8))
    assert model.training
    assert torch.get_num_threads() == threads
    assert torch.equal(model[1].running_mean, before)


class _Cumsum(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cumsum(self.conv(x), dim=1)


def test_unsupported_op_raises():
    with pytest.raises(UnsupportedOpError, match=r"aten::cumsum \(x1\)"):
        count_macs(_Cumsum(), (3, 4, 4))


def test_unsupported_op_warns_on_request():
    with pytest.warns(RuntimeWarning, match="aten::cumsum"):
        report = count_macs(_Cumsum(), (3, 4, 4), on_unsupported="warn")
    assert dict(report.unsupported_ops) == {"aten::cumsum": 1}
    assert report.total_macs == 4 * 3 * 16


def test_ignored_ops_are_only_free_ops():
    """Nothing that holds multiply-adds may hide in the ignore list."""
    for op in ("aten::_convolution", "aten::linear", "aten::matmul", "aten::mean", "aten::sum", "aten::einsum"):
        assert op not in IGNORED_OPS
    assert all(reason for reason in IGNORED_OPS.values())


def test_module_needs_input_size():
    with pytest.raises(TypeError, match="`input_size` is required when counting an nn.Module"):
        count_macs(nn.Conv2d(3, 4, 1))


@pytest.mark.parametrize("size", [0, (3, 4, 4, 4), (4.0, 4), True, "32"])
def test_input_size_must_be_positive_ints(size):
    with pytest.raises(ValueError, match=r"`input_size` must be a positive int \(square\)"):
        input_shape(size)


def test_input_size_forms():
    assert input_shape(32) == (3, 32, 32)
    assert input_shape((32, 48), in_channels=1) == (1, 32, 48)
    assert input_shape((2, 32, 48)) == (2, 32, 48)
    assert count_macs(nn.Conv2d(3, 4, 1), 5).total_macs == count_macs(nn.Conv2d(3, 4, 1), (3, 5, 5)).total_macs


def test_on_unsupported_must_be_known():
    with pytest.raises(ValueError, match="`on_unsupported` must be 'raise' or 'warn'"):
        count_macs(nn.Conv2d(3, 4, 1), (3, 4, 4), on_unsupported="ignore")


@pytest.mark.parametrize(
    "value,text", [(12_345_678, "12.3M"), (10_000_000, "10M"), (950, "950"), (2_500, "2.5K"), (1.25e9, "1.2G")]
)
def test_format_count(value, text):
    assert format_count(value) == text


# ----------------------------------------------------------------------------- closed form


def _assert_closed_form_matches(arch, input_size=None) -> None:
    report = count_macs(arch, input_size)
    assert closed_form_macs(arch, input_size) == report.total_macs, arch.to_str()
    assert closed_form_params(arch) == report.params, arch.to_str()


@pytest.mark.parametrize("name", list_presets())
def test_closed_form_equals_fvcore_on_presets(name):
    _assert_closed_form_matches(get_preset(name))


# Every 8th sample at the space's own resolution; the rest at small odd and even sizes, which
# exercise the stride rounding (and keep fvcore's forward cheap for the 224x224 space).
_SMALL_SIZES = (31, 48, 65)


@pytest.mark.parametrize("space_name", list_spaces())
def test_closed_form_equals_fvcore_on_space_samples(space_name):
    space = get_space(space_name)
    for seed in range(40):
        size = None if seed % 8 == 0 else _SMALL_SIZES[seed % len(_SMALL_SIZES)]
        _assert_closed_form_matches(space.sample(seed=seed).arch, size)


@pytest.mark.slow
@pytest.mark.parametrize("space_name", list_spaces())
def test_closed_form_equals_fvcore_on_500_space_samples(space_name):
    space = get_space(space_name)
    for seed in range(500):
        _assert_closed_form_matches(space.sample(seed=seed).arch)


@pytest.mark.parametrize("space_name", list_spaces())
def test_closed_form_equals_fvcore_on_space_extremes(space_name):
    space = get_space(space_name)
    _assert_closed_form_matches(space.smallest())
    _assert_closed_form_matches(space.largest())


def test_closed_form_non_square_input():
    arch = get_preset("dy_mobilenetv3_small")
    _assert_closed_form_matches(arch, (97, 130))


def test_closed_form_counts_every_part():
    """Each switch of the spec changes the count by exactly its formula."""
    base = get_preset("mobilenetv2_035")
    dy_head = dataclasses.replace(base, head_num_kernels=3)
    cin, cout, k, hw = base.stages[-1].blocks[-1].out_channels, base.head_channels, 3, 7 * 7
    hidden = max(cin // base.attention_reduction, base.attention_min_hidden)
    assert closed_form_macs(dy_head) - closed_form_macs(base) == k * cin * cout + cin * hw + cin * hidden + hidden * k
    assert closed_form_params(dy_head) - closed_form_params(base) == (k - 1) * cin * cout + cin * hidden + hidden + hidden * k + k
    with_fc = dataclasses.replace(base, head_hidden=100)
    assert closed_form_macs(with_fc) - closed_form_macs(base) == cout * 100 + 100 * base.num_classes - cout * base.num_classes


def test_closed_form_is_much_faster_than_fvcore():
    arch = get_preset("dy_mobilenetv2_100")
    start = time.perf_counter()
    count_macs(arch)
    fvcore_s = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(200):
        closed_form_macs(arch)
    closed_s = (time.perf_counter() - start) / 200
    assert fvcore_s / closed_s >= 1000


def test_closed_form_rejects_non_spec():
    with pytest.raises(TypeError, match="`arch` must be an ArchSpec"):
        closed_form_macs("mobilenetv2_100")


@pytest.mark.parametrize("name", ["od4_mobilenetv2_050", "od1_mobilenetv2_050", "dcd_mobilenetv2_050"])
@pytest.mark.parametrize("size", [(97, 130), (7, 9)], ids=["odd", "tiny"])
def test_closed_form_follows_odconv_and_dcd_on_odd_maps(name, size):
    """DCD's 2x2 pool cells overlap on odd maps and its path flips with the map size: both are counted."""
    _assert_closed_form_matches(get_preset(name), size)


def test_closed_form_counts_an_operator_swap_by_its_formula():
    base = get_preset("mobilenetv2_035")
    block = base.stages[-1].blocks[-1]  # 7x7, 96 -> 576 -> 112 at x0.35
    cin = base.stages[-2].blocks[-1].out_channels
    mid, out = 6 * cin, block.out_channels
    od = dataclasses.replace(base, stages=(*base.stages[:-1], dataclasses.replace(base.stages[-1], blocks=(dataclasses.replace(block, op="od"),))))
    hidden = lambda c: max(c // 16, 16)  # noqa: E731
    # ODConv 1x on both 1x1s: GAP, FC, one FC for the channel and filter heads (1x1: no spatial, K = 1: no kernel)
    expand = cin * 49 + cin * hidden(cin) + hidden(cin) * (cin + mid)
    project = mid * 49 + mid * hidden(mid) + hidden(mid) * (mid + out)
    assert closed_form_macs(od) - closed_form_macs(base) == expand + project
