"""ODConv2d: the operator contract, its four attentions, its trunk's BatchNorm, export and counting."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dynas.builder import build_model
from dynas.counting import count_macs, mac_analysis
from dynas.export.formats import export_onnx, export_torchscript
from dynas.ops import ODConv2d
from dynas.ops.odconv import OmniAttention
from dynas.presets import get_preset
from dynas.spec import ArchSpec
from dynas.temperature import dynamic_layers, set_temperature
from dynas.testing import OperatorContract
from dynas.testing.operators import inputs


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _trained_heads(monkeypatch):
    """Every ODConv2d of these tests gets the official random heads, as after training (fresh
    heads are zero, which would make every attention a constant in the comparisons below)."""
    monkeypatch.setattr(OmniAttention, "reset_parameters", OmniAttention.official_init)


def test_a_fresh_layer_is_a_static_conv_of_the_mean_kernel_between_half_gates(monkeypatch):
    monkeypatch.undo()  # the real initialisation
    torch.manual_seed(0)
    op = _randomise_norm(ODConv2d(8, 16, 3, padding=1, num_kernels=4, temperature=1.0)).double().eval()
    x = inputs(3, 8)
    a_c, a_f, a_s, pi = op.attention(x, op.temperature)
    for gate in (a_c, a_f, a_s):
        assert torch.equal(gate, torch.full_like(gate, 0.5))
    assert torch.equal(pi, torch.full_like(pi, 0.25))
    expected = F.conv2d(x, op.weight.mean(0) * 0.5**3, op.bias.mean(0), padding=1)
    torch.testing.assert_close(op(x), expected)
    # The heads learn from there: a loss gives them (and only them, at first) a gradient.
    op.train()
    op(x).square().mean().backward()
    assert op.attention.heads.weight.grad.abs().sum() > 0
    assert op.attention.fc.weight.grad.abs().sum() == 0  # zero heads pass no gradient to the trunk yet


def _randomise_norm(op: ODConv2d) -> ODConv2d:
    """Non-trivial running statistics and affine of the trunk's BatchNorm, so that they matter."""
    bn = op.attention.bn
    with torch.no_grad():
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.2, 0.2)
    return op


def _attentions(op: ODConv2d, x: torch.Tensor, batch_stats: bool = False):
    """The four attentions of one sample (or a batch), from the definition."""
    att = op.attention
    z = x.mean(dim=(2, 3)) @ att.fc.weight.t()
    if batch_stats:
        mean, var = z.mean(0), z.var(0, unbiased=False)
    else:
        mean, var = att.bn.running_mean, att.bn.running_var
    z = torch.relu((z - mean) / torch.sqrt(var + att.bn.eps) * att.bn.weight + att.bn.bias)
    logits = (z @ att.heads.weight.t() + att.heads.bias) / op.temperature
    c, f, s, k = logits.split(att.sizes, dim=1)
    kh, kw = op.kernel_size
    b = x.shape[0]
    ones = torch.ones(b, 1, dtype=x.dtype)
    return (
        torch.sigmoid(c),
        torch.sigmoid(f) if f.shape[1] else ones.expand(b, op.out_channels),
        (torch.sigmoid(s) if s.shape[1] else ones).reshape(b, 1, 1, kh, kw).expand(b, 1, 1, kh, kw),
        torch.softmax(k, dim=1) if k.shape[1] else ones,
    )


def _definition(op: ODConv2d, x: torch.Tensor, batch_stats: bool = False) -> torch.Tensor:
    """W(x) = sum_i a_w[i] (a_f x a_c x a_s) W_i per sample, one conv each (no batching tricks)."""
    a_c, a_f, a_s, pi = _attentions(op, x, batch_stats)
    g, cin, cout = op.groups, op.in_channels, op.out_channels
    group = torch.arange(cout) // (cout // g)  # filter o sees input channels of its group
    outs = []
    for i in range(x.shape[0]):
        weight = torch.einsum("k,koihw->oihw", pi[i], op.weight) * a_s[i]
        weight = weight * a_f[i].view(cout, 1, 1, 1) * a_c[i].view(g, cin // g)[group][:, :, None, None]
        bias = pi[i] @ op.bias if op.bias is not None else None
        outs.append(F.conv2d(x[i : i + 1], weight, bias, op.stride, op.padding, op.dilation, op.groups))
    return torch.cat(outs)


def _formula_macs(op: ODConv2d, shape: tuple[int, int, int]) -> int:
    cin, height, width = shape
    conv = nn.Conv2d(op.in_channels, op.out_channels, op.kernel_size, op.stride, op.padding, op.dilation, op.groups)
    oh, ow = conv(torch.zeros(1, *shape)).shape[2:]
    weight = op.weight[0].numel()
    hidden = op.attention.fc.out_features
    k = op.num_kernels
    aggregation = k * weight + (k * op.out_channels if op.bias is not None else 0) if k > 1 else 0
    return weight * oh * ow + aggregation + cin * height * width + cin * hidden + hidden * sum(op.attention.sizes)


class TestODConv2d(OperatorContract):
    """The operator contract (dynas.testing) for ODConv with K = 3.

    Ops are made in eval mode: the trunk's BatchNorm (official) then uses its running statistics
    and each sample is a function of itself, which is the contract's per-sample definition; the
    training-mode behaviour is checked by ``test_train_and_eval_agree`` below, which replaces
    the contract's.
    """

    num_kernels = 3

    def make(self, cin, cout, k, s, p, d, g, bias):
        op = ODConv2d(cin, cout, k, s, p, d, g, bias, num_kernels=self.num_kernels, temperature=0.7)
        return _randomise_norm(op).eval()

    def reference(self, op, x):
        return _definition(op, x)

    def expected_macs(self, op, shape):
        return _formula_macs(op, shape)

    def test_train_and_eval_agree(self, config):
        """Replaces the contract's: with BatchNorm in the attention, train and eval differ by design.

        What holds instead: eval is deterministic (and, by the contract's other tests, independent
        of the batch); training normalises a batch of >= 2 with its own statistics (the
        definition with batch statistics) and updates the running ones; training at batch 1 falls
        back to the running statistics, equals eval, and leaves them unchanged.
        """
        op = self._op(config)
        x = inputs(3, config[0])
        in_eval = op(x)
        torch.testing.assert_close(op(x), in_eval, rtol=0, atol=0)
        running = op.attention.bn.running_mean.clone()
        op.train()
        torch.testing.assert_close(op(x[:1]), in_eval[:1], rtol=self.tolerance, atol=self.tolerance)
        assert torch.equal(op.attention.bn.running_mean, running)
        expected = _definition(op, x, batch_stats=True)
        torch.testing.assert_close(op(x), expected, rtol=self.tolerance, atol=self.tolerance)
        assert not torch.allclose(op.attention.bn.running_mean, running)
        assert not torch.allclose(expected, in_eval)  # the check above could tell the two apart


class TestODConv2dOneKernel(TestODConv2d):
    """The same contract at K = 1 (the paper's 1x): no kernel attention; 1x1 convs share their kernel."""

    num_kernels = 1


@pytest.mark.parametrize("k,groups,kernels,expected", [
    (1, 1, 1, (8, 16, 0, 0)),  # 1x1: no spatial attention; K = 1: no kernel attention
    (3, 1, 4, (8, 16, 9, 4)),
    (3, 8, 4, (8, 16, 9, 4)),  # grouped but not depthwise: filter attention kept
])
def test_attentions_the_official_code_keeps(k, groups, kernels, expected):
    assert ODConv2d(8, 16, k, groups=groups, num_kernels=kernels).attention.sizes == expected
    assert ODConv2d(8, 8, 3, groups=8, num_kernels=2).attention.sizes == (8, 0, 9, 2)  # depthwise: no filter attention


def test_attention_width_is_official():
    assert ODConv2d(64, 64, 1).attention.fc.out_features == 16  # max(64 // 16, 16)
    assert ODConv2d(960, 160, 1).attention.fc.out_features == 60
    assert ODConv2d(960, 160, 1, reduction=4, min_hidden=8).attention.fc.out_features == 240


def test_one_kernel_pointwise_is_a_static_conv_between_channel_attentions():
    """The official _forward_impl_pw1x: a_f * conv(a_c * x, W) with the one shared kernel."""
    torch.manual_seed(0)
    op = _randomise_norm(ODConv2d(8, 16, 1, num_kernels=1, bias=False)).double().eval()
    x = inputs(4, 8)
    a_c, a_f, _, _ = _attentions(op, x)
    expected = F.conv2d(x * a_c[:, :, None, None], op.weight[0]) * a_f[:, :, None, None]
    torch.testing.assert_close(op(x), expected, rtol=1e-12, atol=1e-12)
    assert op.last_attention is None and op.attention_entropy() is None


@pytest.mark.parametrize("cin,cout,k,g", [(8, 16, 1, 1), (8, 16, 3, 1), (12, 12, 3, 12), (64, 8, 1, 1)], ids=["pw", "3x3", "dw", "narrow"])
@pytest.mark.parametrize("size", [2, 12], ids=["small-map", "large-map"])
@pytest.mark.parametrize("num_kernels", [1, 3])
def test_every_attention_placement_matches_the_definition_with_gradients(cin, cout, k, g, size, num_kernels):
    """Channel attentions go on the kernel or on the features, whichever is smaller: both exact."""
    torch.manual_seed(0)
    op = _randomise_norm(ODConv2d(cin, cout, k, 1, k // 2, 1, g, True, num_kernels=num_kernels, temperature=0.7))
    op = op.double().eval()
    x = inputs(3, cin, size, size + 1).requires_grad_()
    grad = torch.randn(3, cout, size, size + 1, dtype=torch.double)
    results = []
    for fn in (op, lambda y: _definition(op, y)):
        op.zero_grad(set_to_none=True)
        x.grad = None
        out = fn(x)
        out.backward(grad)
        results.append([out.detach(), x.grad.clone()] + [p.grad.clone() for p in op.parameters()])
    for got, expected in zip(*results):
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)


def test_training_at_batch_1_does_not_fail():
    op = ODConv2d(8, 16, 3, padding=1).train()
    out = op(torch.randn(1, 8, 5, 5))  # BatchNorm over one sample would raise
    out.sum().backward()
    assert op.attention.bn.num_batches_tracked == 0


def test_temperature_divides_every_attention_and_set_temperature_reaches_it():
    model = nn.Sequential(ODConv2d(8, 16, 3, padding=1, num_kernels=4), nn.Conv2d(16, 4, 1)).eval()
    assert [name for name, _ in dynamic_layers(model)] == ["0"]
    assert set_temperature(model, 5.0) == 1 and model[0].temperature == 5.0
    x = torch.randn(2, 8, 6, 6)
    model(x)
    sharp = model[0].attention_entropy()
    set_temperature(model, 1e6)
    model(x)
    assert model[0].attention_entropy() == pytest.approx(math.log(4), abs=1e-6)
    assert sharp < math.log(4) - 1e-3
    a_c, a_f, a_s, _ = model[0].attention(x, 1e6)
    for a in (a_c, a_f, a_s):  # sigmoid(logits / tau) -> 1/2 as tau grows
        torch.testing.assert_close(a, torch.full_like(a, 0.5), atol=1e-5, rtol=0)


@pytest.mark.parametrize("kwargs,match", [
    (dict(num_kernels=0), r"`num_kernels` must be an integer >= 1, but got num_kernels=0"),
    (dict(temperature=0.0), r"`temperature` must be a finite number > 0, but got temperature=0\.0"),
    (dict(groups=3), r"`in_channels` and `out_channels` must be divisible by `groups`, but got in_channels=8, out_channels=16, groups=3"),
    (dict(padding="full"), r"`padding` must be an int, a pair or one of 'same', 'valid', but got padding='full'"),
    (dict(padding="same", stride=2), r"`padding='same'` requires stride 1"),
    (dict(padding=-1), r"`padding` must be non-negative integers, but got padding=-1"),
    (dict(kernel_size=0), r"`kernel_size` must be an integer >= 1, but got kernel_size=0"),
    (dict(reduction=0), r"`reduction` must be an integer >= 1, but got reduction=0"),
    (dict(min_hidden=0), r"`min_hidden` must be an integer >= 1, but got min_hidden=0"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ODConv2d(**{"in_channels": 8, "out_channels": 16, "kernel_size": 3, **kwargs})


def test_wrong_input_channels():
    with pytest.raises(ValueError, match=r"ODConv2d expects input of shape \(B, 8, H, W\), but got \(1, 4, 5, 5\)"):
        ODConv2d(8, 8, 1)(torch.randn(1, 4, 5, 5))


@pytest.mark.parametrize("k,g,num_kernels", [(1, 1, 1), (3, 1, 4), (3, 8, 1)], ids=["pw-1x", "3x3-4x", "dw-1x"])
def test_mac_count_is_per_sample(k, g, num_kernels):
    op = ODConv2d(8, 8, k, padding=k // 2, groups=g, num_kernels=num_kernels).eval()
    with torch.no_grad():
        batch1, batch4 = (int(mac_analysis(op, torch.zeros(b, 8, 9, 9)).total()) for b in (1, 4))
    assert batch4 == 4 * batch1 == 4 * count_macs(op, (8, 9, 9)).total_macs


@pytest.mark.parametrize("k,g,num_kernels", [(1, 1, 1), (1, 1, 4), (3, 1, 4), (3, 12, 1)], ids=["pw-1x", "pw-4x", "3x3-4x", "dw-1x"])
def test_onnx_export_runs_in_onnxruntime_at_batch_1_and_8(k, g, num_kernels, tmp_path):
    pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    op = _randomise_norm(ODConv2d(12, 12, k, padding=k // 2, groups=g, num_kernels=num_kernels, temperature=2.0))
    diff = export_onnx(nn.Sequential(op).eval(), tmp_path / "od.onnx", torch.randn(2, 12, 9, 9))
    assert diff <= 1e-4  # export_onnx raises above that at batch 1 or 8


def test_onnx_export_of_an_odconv_network(tmp_path):
    pytest.importorskip("onnxruntime")
    arch = ArchSpec.from_str("r32_in3_stem16s1_relu6 / k3e1c16s1_relu6_od1all / k3e6c24s2_relu6_se_od4all / head64_relu6_od4_cls10_drop0.2")
    model = build_model(arch).eval()
    assert export_onnx(model, tmp_path / "net.onnx", torch.randn(1, 3, 32, 32)) <= 1e-4
    assert export_torchscript(model, tmp_path / "net.pt", torch.randn(1, 3, 32, 32)) <= 1e-4  # also at batch 1 and 8


def test_official_parameter_counts():
    # OSVAI/ODConv models/od_mobilenetv2.py at HEAD, counted: 4,940,185 (1x) and 11,512,149 (4x) at x1.0,
    # the README's 4.94M and 11.51M; 2,425,537 and 4,435,501 at x0.5 (README: 2.43M, 4.44M).
    counts = {name: sum(p.numel() for p in build_model(get_preset(name)).parameters())
              for name in ("od1_mobilenetv2_100", "od4_mobilenetv2_100", "od1_mobilenetv2_050", "od4_mobilenetv2_050")}
    assert counts == {"od1_mobilenetv2_100": 4_940_185, "od4_mobilenetv2_100": 11_512_149,
                      "od1_mobilenetv2_050": 2_425_537, "od4_mobilenetv2_050": 4_435_501}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("k,g,num_kernels", [(1, 1, 1), (1, 1, 4), (3, 1, 4), (3, 16, 1)], ids=["pw-1x", "pw-4x", "3x3-4x", "dw-1x"])
def test_cuda_matches_cpu_with_gradients(k, g, num_kernels):
    torch.manual_seed(0)
    cpu = _randomise_norm(ODConv2d(16, 16, k, padding=k // 2, groups=g, num_kernels=num_kernels, temperature=2.0))
    gpu = ODConv2d(16, 16, k, padding=k // 2, groups=g, num_kernels=num_kernels, temperature=2.0).cuda()
    gpu.load_state_dict(cpu.state_dict())
    x = torch.randn(4, 16, 14, 14)
    outs = []
    for op, device in ((cpu, "cpu"), (gpu, "cuda")):
        out = op.train()(x.to(device))
        out.square().sum().backward()
        outs.append((out.cpu(), [p.grad.cpu() for p in op.parameters()]))
    torch.testing.assert_close(outs[1][0], outs[0][0], rtol=1e-4, atol=1e-4)
    for a, b in zip(outs[1][1], outs[0][1]):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)
