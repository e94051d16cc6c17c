"""DCDConv2d: the operator contract on 1x1 convs, both execution paths, the official widths, export."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dynas.builder import build_model
from dynas.counting import count_macs, mac_analysis
from dynas.export.formats import export_onnx, export_torchscript
from dynas.ops import DCDConv2d
from dynas.presets import get_preset
from dynas.spec import ArchSpec, dcd_factorized, dcd_hidden_channels, dcd_latent_channels, dcd_pooled_width
from dynas.temperature import dynamic_layers
from dynas.testing import OperatorContract
from dynas.testing.operators import inputs

# (in, out, kernel, stride, padding, dilation, groups, bias): 1x1 convs only
DCD_CONFIGS = [
    pytest.param(8, 16, 1, 1, 0, 1, 1, True, id="widening"),  # 2x2 pooled attention
    pytest.param(16, 8, 1, 1, 0, 1, 1, False, id="narrowing-nobias"),  # global pooling
    pytest.param(8, 16, 1, 2, 0, 1, 1, False, id="strided"),
    pytest.param(8, 8, 1, 1, 1, 1, 1, True, id="padded"),
    pytest.param(12, 12, 1, 1, "same", 1, 1, True, id="same"),
    pytest.param(64, 24, 1, 1, 0, 1, 1, False, id="wide-in"),
]


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _trained_latent_projection(monkeypatch):
    """Every DCDConv2d of these tests gets a random P, as after training (a fresh one has P = 0,
    which would make the dynamic branch vanish from every comparison below)."""
    fresh = DCDConv2d.reset_parameters

    def reset(self):
        fresh(self)
        nn.init.kaiming_uniform_(self.weight_p, a=5**0.5)

    monkeypatch.setattr(DCDConv2d, "reset_parameters", reset)


def test_a_fresh_layer_is_its_static_part(monkeypatch):
    monkeypatch.undo()  # the real initialisation
    torch.manual_seed(0)
    op = DCDConv2d(8, 16, 1).double()
    x = inputs(3, 8)
    assert not op.weight_p.any()
    lam, _ = op.attention(x)
    static = F.conv2d(x, op.weight) * lam[:, :, None, None] + op.bias[:, None, None]
    torch.testing.assert_close(op(x), static)
    op(x).square().sum().backward()
    assert op.weight_p.grad.abs().sum() > 0  # the dynamic branch grows from zero


def _hsigmoid(t: torch.Tensor) -> torch.Tensor:
    return F.relu6(t + 3) / 3  # the official Hsigmoid


def _definition(op: DCDConv2d, x: torch.Tensor) -> torch.Tensor:
    """W(x) = Lambda(x) W0 + P Phi(x) Q^T, per sample, one conv each; pooling as the official code's."""
    att = op.attention
    quadrants = op.in_channels < op.out_channels
    pooled = F.adaptive_avg_pool2d(x, 2 if quadrants else 1).flatten(1)  # (B, Cin * 4) or (B, Cin)
    z = pooled @ att.fc.weight.t()
    z = z * _hsigmoid(z @ att.gate.weight.t())
    heads = z @ att.heads.weight.t()
    latent = op.latent
    phi, lam = heads[:, : latent * latent].reshape(-1, latent, latent), _hsigmoid(heads[:, latent * latent :])
    outs = []
    for i in range(x.shape[0]):
        weight = lam[i][:, None] * op.weight[:, :, 0, 0] + op.weight_p @ phi[i] @ op.weight_q  # (Cout, Cin)
        outs.append(F.conv2d(x[i : i + 1], weight[:, :, None, None], op.bias, op.stride, op.padding))
    return torch.cat(outs)


def _formula_macs(op: DCDConv2d, shape: tuple[int, int, int]) -> int:
    cin, height, width = shape
    cout, latent = op.out_channels, op.latent
    out = F.conv2d(torch.zeros(1, *shape), torch.zeros(cout, cin, 1, 1), None, op.stride, op.padding)
    pixels = out.shape[2] * out.shape[3]
    pooled = dcd_pooled_width(cin, cout)
    hidden = op.attention.fc.out_features
    pool = 4 * cin * -(-height // 2) * -(-width // 2) if pooled > cin else cin * height * width
    attention = pool + pooled * hidden + hidden * hidden + hidden * (latent * latent + cout)
    if dcd_factorized(pixels, cin, cout, latent):
        return attention + pixels * ((cout + latent) * cin + latent * latent + latent * cout)
    return attention + cout * latent * (latent + cin) + pixels * cin * cout


class TestDCDConv2d(OperatorContract):
    """The operator contract (dynas.testing) over 1x1 configurations; no BatchNorm, so train = eval."""

    @pytest.fixture(params=[pytest.param(c.values, id=c.id) for c in DCD_CONFIGS])
    def config(self, request):
        return request.param

    def make(self, cin, cout, k, s, p, d, g, bias):
        return DCDConv2d(cin, cout, k, s, p, d, g, bias)

    def reference(self, op, x):
        return _definition(op, x)

    def expected_macs(self, op, shape):
        return _formula_macs(op, shape)


@pytest.mark.parametrize("cin,cout", [(8, 16), (64, 24), (24, 144)], ids=["widening", "narrowing", "expand"])
@pytest.mark.parametrize("size", [1, 2, 7, 24])
@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
def test_both_paths_match_the_definition_with_gradients(cin, cout, size, channels_last):
    torch.manual_seed(0)
    op = DCDConv2d(cin, cout, 1).double()
    x = inputs(3, cin, size, size + 1)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
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


@pytest.mark.parametrize("size", [1, 3, 24])
def test_inference_mode_matches_the_definition(size):
    """Without autograd the factorized form runs two convs instead of one on stacked weights."""
    torch.manual_seed(0)
    op = DCDConv2d(64, 24, 1).double()
    x = inputs(3, 64, size, size)
    with torch.inference_mode():
        got = op(x)
    with torch.no_grad():
        torch.testing.assert_close(got, _definition(op, x), rtol=1e-10, atol=1e-10)


def test_small_maps_run_factorized_and_large_maps_merged():
    # The rule is the MAC count of the two forms: factorized costs per pixel, merged per sample.
    assert dcd_factorized(7 * 7, 960, 160, dcd_latent_channels(960, 160))
    assert not dcd_factorized(56 * 56, 24, 144, dcd_latent_channels(24, 144))
    for pixels in (4, 49, 196, 3136):
        op = DCDConv2d(96, 24, 1)
        side = int(pixels**0.5)
        counted = count_macs(op, (96, side, side)).total_macs
        assert counted == _formula_macs(op, (96, side, side))


@pytest.mark.parametrize("cin,cout,latent,hidden", [
    # the official DYModule's widths (liyunsheng13/dcd, MobileNetV2 x1.0, fc-squeeze 16)
    (16, 96, 8, 4), (96, 24, 12, 9), (24, 144, 12, 9), (144, 24, 12, 9),
])
def test_latent_and_attention_widths_are_official(cin, cout, latent, hidden):
    assert dcd_latent_channels(cin, cout) == latent
    assert dcd_hidden_channels(dcd_pooled_width(cin, cout), latent) == hidden
    op = DCDConv2d(cin, cout, 1)
    assert (op.latent, op.attention.fc.out_features, op.attention.fc.in_features) == (latent, hidden, dcd_pooled_width(cin, cout))
    assert DCDConv2d(cin, cout, 1, latent=5).weight_q.shape == (5, cin)


def test_parameters_match_the_official_model_but_its_classifier_and_latent_norms():
    # liyunsheng13/dcd mobilenetv2_dcd(width_mult=1.0, fc_squeeze=16), counted at HEAD: 5,720,028. Its
    # dynamic classifier DYCls has 179,840 more than a Linear(1280, 1000), its latent BatchNorms 2,496 (4L per conv).
    assert sum(p.numel() for p in build_model(get_preset("dcd_mobilenetv2_100")).parameters()) == 5_720_028 - 179_840 - 2_496


def test_has_no_temperature():
    model = nn.Sequential(DCDConv2d(8, 16, 1))
    assert dynamic_layers(model) == [] and not hasattr(model[0], "temperature")


def test_mac_count_is_per_sample():
    op = DCDConv2d(8, 16, 1).eval()
    for size in (2, 16):  # factorized, merged
        with torch.no_grad():
            batch1, batch4 = (int(mac_analysis(op, torch.zeros(b, 8, size, size)).total()) for b in (1, 4))
        assert batch4 == 4 * batch1 == 4 * count_macs(op, (8, size, size)).total_macs


@pytest.mark.parametrize("size", [3, 16], ids=["factorized", "merged"])
def test_onnx_export_runs_in_onnxruntime_at_batch_1_and_8(size, tmp_path):
    pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    model = nn.Sequential(DCDConv2d(8, 24, 1), DCDConv2d(24, 8, 1)).eval()
    assert export_onnx(model, tmp_path / "dcd.onnx", torch.randn(2, 8, size, size)) <= 1e-4


def test_onnx_export_of_a_dcd_network(tmp_path):
    pytest.importorskip("onnxruntime")
    arch = ArchSpec.from_str("r32_in3_stem16s1_relu6 / k3e1c16s1_relu6 / k3e6c24s2_relu6_dcd k3e6c24s1_relu6_dcd8 / head64_relu6_dcd_cls10_drop0.2")
    model = build_model(arch).eval()
    assert export_onnx(model, tmp_path / "net.onnx", torch.randn(1, 3, 28, 28)) <= 1e-4
    assert export_torchscript(model, tmp_path / "net.pt", torch.randn(1, 3, 28, 28)) <= 1e-4  # also at batch 1 and 8


@pytest.mark.parametrize("kwargs,match", [
    (dict(kernel_size=3), r"DCDConv2d is a 1x1 conv: `kernel_size` must be 1, but got kernel_size=3"),
    (dict(groups=2), r"DCDConv2d is a dense conv: `groups` must be 1, but got groups=2"),
    (dict(latent=0), r"`latent` must be an integer >= 1, but got latent=0"),
    (dict(padding="same", stride=2), r"`padding='same'` requires stride 1"),
    (dict(reduction=0), r"`reduction` must be an integer >= 1, but got reduction=0"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DCDConv2d(**{"in_channels": 8, "out_channels": 16, **kwargs})


def test_wrong_input_channels():
    with pytest.raises(ValueError, match=r"DCDConv2d expects input of shape \(B, 8, H, W\), but got \(1, 4, 5, 5\)"):
        DCDConv2d(8, 8)(torch.randn(1, 4, 5, 5))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("size", [3, 28], ids=["factorized", "merged"])
def test_cuda_matches_cpu_with_gradients(size):
    torch.manual_seed(0)
    cpu = DCDConv2d(24, 96, 1)
    gpu = DCDConv2d(24, 96, 1).cuda()
    gpu.load_state_dict(cpu.state_dict())
    x = torch.randn(4, 24, size, size)
    outs = []
    for op, device in ((cpu, "cpu"), (gpu, "cuda")):
        out = op(x.to(device))
        out.square().sum().backward()
        outs.append((out.cpu(), [p.grad.cpu() for p in op.parameters()]))
    torch.testing.assert_close(outs[1][0], outs[0][0], rtol=1e-4, atol=1e-4)
    for a, b in zip(outs[1][1], outs[0][1]):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)
