"""Contract tests for DynamicConv2d: it must behave as nn.Conv2d with a per-sample kernel."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dynas.ops import DynamicConv2d
from dynas.ops.dynamic_conv import _scaling_inputs_is_smaller
from dynas.testing import CONV_CONFIGS, OperatorContract

# (in, out, kernel, stride, padding, dilation, groups, bias): the contract's shapes and one more
CONFIGS = [*CONV_CONFIGS, pytest.param(8, 4, 3, 1, "valid", 1, 1, True, id="valid")]


def _inputs(b: int, c: int, h: int, w: int) -> torch.Tensor:
    """Per-sample channel offsets, so GAP (and hence attention) differs between samples."""
    return torch.randn(b, c, h, w, dtype=torch.double) + 2 * torch.randn(b, c, 1, 1, dtype=torch.double)


def _make(cin, cout, k, s, p, d, g, bias, **kw) -> DynamicConv2d:
    torch.manual_seed(0)
    return DynamicConv2d(cin, cout, k, s, p, d, g, bias, **kw).double()


@pytest.mark.parametrize("cin,cout,k,s,p,d,g,bias", CONFIGS)
def test_k1_equals_conv2d(cin, cout, k, s, p, d, g, bias):
    dyn = _make(cin, cout, k, s, p, d, g, bias, num_kernels=1)
    conv = nn.Conv2d(cin, cout, k, s, p, d, g, bias).double()
    with torch.no_grad():
        conv.weight.copy_(dyn.weight[0])
        if bias:
            conv.bias.copy_(dyn.bias[0])
    x = _inputs(3, cin, 11, 13)
    torch.testing.assert_close(dyn(x), conv(x), rtol=0, atol=1e-12)


class TestDynamicConv2d(OperatorContract):
    """The operator contract (dynas.testing), softmax attention as in the paper."""

    attention = "softmax"

    def make(self, cin, cout, k, s, p, d, g, bias):
        return DynamicConv2d(cin, cout, k, s, p, d, g, bias, num_kernels=3, temperature=0.7, attention=self.attention)

    def reference(self, op, x):
        # pi = softmax(FC2(ReLU(FC1(GAP x))) / tau), then one conv with the mixed kernel: the definition.
        hidden = torch.relu(op.attention.fc1(x.mean(dim=(2, 3))))
        logits = op.attention.fc2(hidden) / op.temperature
        pi = (torch.softmax if self.attention == "softmax" else lambda t, dim: torch.sigmoid(t))(logits, dim=1)[0]
        weight = torch.einsum("k,koihw->oihw", pi, op.weight)
        bias = torch.einsum("k,ko->o", pi, op.bias) if op.bias is not None else None
        return F.conv2d(x, weight, bias, op.stride, op.padding, op.dilation, op.groups)

    def expected_macs(self, op, shape):
        cin, height, width = shape
        out = nn.Conv2d(op.in_channels, op.out_channels, op.kernel_size, op.stride, op.padding, op.dilation, op.groups)
        oh, ow = out(torch.zeros(1, *shape)).shape[2:]
        weight = op.weight[0].numel()
        hidden = op.attention.fc1.out_features
        aggregation = op.num_kernels * weight + (op.num_kernels * op.out_channels if op.bias is not None else 0)
        return weight * oh * ow + aggregation + cin * height * width + cin * hidden + hidden * op.num_kernels


class TestDynamicConv2dSigmoid(TestDynamicConv2d):
    """The same contract with CondConv-style sigmoid routing."""

    attention = "sigmoid"


def test_attention_differs_between_samples():
    # Guard for the test above: it is only meaningful if samples get different kernels.
    dyn = _make(8, 16, 3, 1, 1, 1, 1, True, num_kernels=4, temperature=1.0)
    dyn(_inputs(4, 8, 9, 9))
    pi = dyn.last_attention
    assert (pi[0] - pi[1]).abs().max() > 1e-4


def test_output_shape_matches_conv2d():
    x = torch.randn(2, 12, 17, 15)
    for kw in [dict(stride=2, padding=1), dict(padding="same", dilation=2), dict(stride=(2, 3))]:
        conv = nn.Conv2d(12, 6, 3, groups=3, **kw)
        dyn = DynamicConv2d(12, 6, 3, groups=3, num_kernels=2, **kw)
        assert dyn(x).shape == conv(x).shape


def test_attention_is_a_distribution_and_uniform_at_high_temperature():
    dyn = DynamicConv2d(16, 16, 3, padding=1, num_kernels=4, temperature=1.0)
    with torch.no_grad():  # make the logits large so low temperature is visibly peaked
        dyn.attention.fc2.weight.mul_(50)
    x = torch.randn(6, 16, 8, 8)
    dyn(x)
    pi = dyn.last_attention
    assert torch.all(pi >= 0) and torch.all(pi <= 1)
    torch.testing.assert_close(pi.sum(dim=1), torch.ones(6))
    peaked = dyn.attention_entropy()
    dyn.temperature = 1e6
    dyn(x)
    torch.testing.assert_close(dyn.last_attention, torch.full((6, 4), 0.25), atol=1e-4, rtol=0)
    assert dyn.attention_entropy() == pytest.approx(math.log(4), abs=1e-6)
    assert peaked < math.log(4) - 0.1


def test_sigmoid_attention_does_not_sum_to_one():
    dyn = DynamicConv2d(16, 16, 1, num_kernels=4, temperature=1.0, attention="sigmoid")
    dyn(torch.randn(3, 16, 5, 5))
    pi = dyn.last_attention
    assert torch.all((pi > 0) & (pi < 1))
    assert not torch.allclose(pi.sum(dim=1), torch.ones(3))


def test_last_attention_is_detached():
    dyn = DynamicConv2d(4, 4, 3, padding=1, num_kernels=2)
    dyn(torch.randn(2, 4, 6, 6, requires_grad=True))
    assert not dyn.last_attention.requires_grad and dyn.last_attention.grad_fn is None


def test_kernels_initialised_independently_like_conv2d():
    torch.manual_seed(0)
    dyn = DynamicConv2d(32, 64, 3, num_kernels=4)
    conv = nn.Conv2d(32, 64, 3)
    assert not torch.equal(dyn.weight[0], dyn.weight[1])
    bound = 1 / math.sqrt(32 * 9)  # kaiming_uniform(a=sqrt(5)) bound == 1/sqrt(fan_in)
    for k in range(4):
        assert dyn.weight[k].abs().max() <= bound
        assert dyn.weight[k].std().item() == pytest.approx(conv.weight.std().item(), rel=0.05)
    assert dyn.bias.abs().max() <= bound


def test_trace_with_even_kernel_same_padding():
    dyn = _make(4, 6, 4, 1, "same", 1, 1, True, num_kernels=2).eval()
    traced = torch.jit.trace(dyn, _inputs(1, 4, 9, 9))
    y = _inputs(3, 4, 9, 9)
    torch.testing.assert_close(traced(y), dyn(y), rtol=1e-10, atol=1e-10)


def test_bf16_autocast_cpu():
    dyn = DynamicConv2d(8, 16, 3, padding=1, num_kernels=4, temperature=1.0)
    x = torch.randn(2, 8, 9, 9)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = dyn(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), dyn(x), atol=0.1, rtol=0.05)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_fp16_autocast():
    dyn = DynamicConv2d(8, 16, 3, padding=1, num_kernels=4, temperature=1.0).cuda()
    x = torch.randn(2, 8, 9, 9, device="cuda")
    with torch.autocast("cuda", dtype=torch.float16):
        out = dyn(x)
    torch.testing.assert_close(out.float(), dyn(x), atol=0.05, rtol=0.05)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(num_kernels=0), r"`num_kernels` must be an integer >= 1, but got num_kernels=0"),
        (dict(temperature=0.0), r"`temperature` must be a finite number > 0, but got temperature=0.0"),
        (dict(temperature=-3), r"`temperature` must be a finite number > 0, but got temperature=-3"),
        (dict(groups=3), r"`in_channels` must be divisible by `groups`, but got in_channels=8, groups=3"),
        (dict(in_channels=6, groups=3), r"`out_channels` must be divisible by `groups`"),
        (dict(padding="full"), r"`padding` must be .*padding='full'"),
        (dict(padding="same", stride=2), r"`padding='same'` requires stride 1"),
        (dict(padding=-1), r"`padding` must be non-negative integers, but got padding=-1"),
        (dict(kernel_size=0), r"`kernel_size` must be an integer >= 1, but got kernel_size=0"),
        (dict(reduction=0), r"`reduction` must be an integer >= 1, but got reduction=0"),
        (dict(attention="gumbel"), r"`attention` must be one of .*attention='gumbel'"),
    ],
)
def test_bad_arguments(kwargs, match):
    args = dict(in_channels=8, out_channels=16, kernel_size=3) | kwargs
    with pytest.raises(ValueError, match=match):
        DynamicConv2d(**args)


def test_temperature_setter_validates():
    dyn = DynamicConv2d(4, 4, 1, num_kernels=2)
    dyn.temperature = 5
    assert dyn.temperature == 5.0
    with pytest.raises(ValueError, match="temperature=nan"):
        dyn.temperature = float("nan")


def test_wrong_input_channels():
    with pytest.raises(ValueError, match=r"expects input of shape \(B, 8, H, W\), but got \(1, 4, 5, 5\)"):
        DynamicConv2d(8, 8, 1)(torch.randn(1, 4, 5, 5))


# --- every execution path (pointwise aggregated / pointwise mixed / batch-1 conv / grouped conv,
# contiguous or channels_last) computes the same function and gradients as the definition.

PATH_CONFIGS = CONFIGS + [
    pytest.param(8, 16, 1, 1, 0, 1, 1, True, id="1x1-bias"),
    pytest.param(8, 16, 1, 1, "same", 1, 1, True, id="1x1-same"),
]


def _reference(dyn: DynamicConv2d, x: torch.Tensor) -> torch.Tensor:
    """The definition: aggregate each sample's kernel, convolve that sample alone."""
    pi = dyn.attention(x, dyn.temperature)  # (B, K)
    weight = torch.einsum("bk,koihw->boihw", pi, dyn.weight)  # (B, Cout, Cin/g, kh, kw)
    bias = pi @ dyn.bias if dyn.bias is not None else None  # (B, Cout)
    outs = [
        F.conv2d(x[i : i + 1], weight[i], bias[i] if bias is not None else None,
                 dyn.stride, dyn.padding, dyn.dilation, dyn.groups)
        for i in range(x.shape[0])
    ]
    return torch.cat(outs)


def _grads(fn, dyn: DynamicConv2d, x: torch.Tensor, grad_out: torch.Tensor) -> list[torch.Tensor]:
    dyn.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_()
    out = fn(x)
    out.backward(grad_out)
    return [out.detach(), x.grad] + [p.grad for p in dyn.parameters()]


@pytest.mark.parametrize("cin,cout,k,s,p,d,g,bias", PATH_CONFIGS)
@pytest.mark.parametrize("batch,size", [(1, 7), (3, 7), (3, 3)], ids=["b1", "b3", "b3-narrow"])
@pytest.mark.parametrize("mix_max_pixels", [0, 10**9], ids=["aggregate", "mix"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
def test_every_path_matches_definition_with_gradients(
    cin, cout, k, s, p, d, g, bias, batch, size, mix_max_pixels, channels_last
):
    dyn = _make(cin, cout, k, s, p, d, g, bias, num_kernels=3, temperature=0.7)
    dyn.mix_max_pixels = mix_max_pixels
    x = _inputs(batch, cin, size + 4, size)  # non-square, so H/W mix-ups show
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    grad_out = torch.randn_like(_reference(dyn, x))
    got = _grads(dyn, dyn, x, grad_out)
    expected = _grads(lambda y: _reference(dyn, y), dyn, x, grad_out)
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("cin,cout,k,s,p,d,g,bias", PATH_CONFIGS)
@pytest.mark.parametrize("batch", [1, 3], ids=["b1", "b3"])
@pytest.mark.parametrize("mix_max_pixels", [0, 10**9], ids=["aggregate", "mix"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
def test_every_path_matches_definition_in_inference_mode(
    cin, cout, k, s, p, d, g, bias, batch, mix_max_pixels, channels_last
):
    # Without autograd some paths read their kernels differently (no gradient layout to keep).
    dyn = _make(cin, cout, k, s, p, d, g, bias, num_kernels=3, temperature=0.7)
    dyn.mix_max_pixels = mix_max_pixels
    x = _inputs(batch, cin, 11, 7)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        got = dyn(x)
    with torch.no_grad():
        expected = _reference(dyn, x)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("k,g", [(1, 1), (3, 1), (3, 8)], ids=["pointwise", "3x3", "depthwise"])
@pytest.mark.parametrize("batch,size", [(1, 6), (4, 6), (4, 2)], ids=["b1", "b4", "b4-small-map"])
def test_output_keeps_input_memory_format(k, g, batch, size):
    dyn = DynamicConv2d(8, 8, k, padding=k // 2, groups=g, num_kernels=4)
    x = torch.randn(batch, 8, size, size)
    assert dyn(x).is_contiguous()
    out_cl = dyn(x.contiguous(memory_format=torch.channels_last))
    assert out_cl.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out_cl, dyn(x))


@pytest.mark.parametrize(
    "cin,cout,batch,size,scales",
    [
        (4, 16, 3, 4, True),  # widening: the K-fold input is the smaller intermediate
        (16, 4, 3, 4, False),  # narrowing: the K-fold output is
        (4, 64, 8, 1, True),  # 1x1 map, batch large enough to amortise the kernel reshuffle
        (8, 16, 3, 1, False),  # 1x1 map, kernel reshuffle larger than the K-fold output
    ],
    ids=["scale", "mix", "scale-1x1-map", "mix-1x1-map"],
)
@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
def test_both_mixing_branches_match_definition(cin, cout, batch, size, scales, channels_last):
    assert _scaling_inputs_is_smaller(batch * size * size, cin, cout) == scales  # the branch under test
    dyn = _make(cin, cout, 1, 1, 0, 1, 1, True, num_kernels=3, temperature=0.7)
    dyn.mix_max_pixels = 10**9
    x = _inputs(batch, cin, size, size)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    grad_out = torch.randn_like(_reference(dyn, x))
    got = _grads(dyn, dyn, x, grad_out)
    expected = _grads(lambda y: _reference(dyn, y), dyn, x, grad_out)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    assert got[0].is_contiguous(memory_format=layout)


@pytest.mark.parametrize(
    "size,mix_max_pixels,path",
    [(2, None, "_pointwise_mixed"), (3, None, "_pointwise_aggregated"), (2, 0, "_pointwise_aggregated"), (8, 10**9, "_pointwise_mixed")],
    ids=["small-map-default", "large-map-default", "forced-aggregate", "forced-mix"],
)
def test_pointwise_dispatch_takes_the_measured_path(monkeypatch, size, mix_max_pixels, path):
    # The crossover was measured for K=4 (benchmarks/bench_ops.py): maps of <= 4 pixels mix the
    # K kernels' outputs. A spy on both paths says which one ran (their results are equal).
    calls: list[str] = []
    for name in ("_pointwise_mixed", "_pointwise_aggregated"):
        original = getattr(DynamicConv2d, name)
        monkeypatch.setattr(DynamicConv2d, name, lambda self, *a, _o=original, _n=name: calls.append(_n) or _o(self, *a))
    dyn = DynamicConv2d(8, 16, 1, num_kernels=4)
    assert dyn.mix_max_pixels == 4
    if mix_max_pixels is not None:
        dyn.mix_max_pixels = mix_max_pixels
    dyn(_inputs(3, 8, size, size).float())
    assert calls == [path]
