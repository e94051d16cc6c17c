"""Deployed graphs (``dynas.export.formats``): exact at any batch size, standard ops, the intended form.

Every model is exported once per module (ONNX and TorchScript, with a dynamic batch axis and
specialised to one batch size) and run at batch 1, 3 and 8. BatchNorm statistics are random, so
that folding them is tested, and inputs carry per-sample channel offsets, so that every sample
gets its own mixed kernel.
"""

from __future__ import annotations

import collections
import copy
import math

import pytest
import torch
from torch import nn

from dynas.errors import DynasError
from dynas.export.formats import (
    EXPORT_ATOL,
    ONNX_OPSET,
    export_onnx,
    export_torchscript,
    fold_batchnorm,
    onnx_latency_ms,
)
from dynas.models import create_model
from dynas.ops import DCDConv2d, DynamicConv2d, ODConv2d
from dynas.ops.odconv import OmniAttention
from dynas.temperature import set_temperature

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

BATCHES = (1, 3, 8)
# Every kind of dynamic conv: depthwise and k x k (dy...all), strided, and a dynamic head.
DY_ALL = "r16_in3_stem8s1_relu6 / k3e4c16s2_relu6_se_dy4all k5e3c16s1_hswish_dy2all / head64_relu6_dy2_cls10_drop0"


class _SigmoidBias(nn.Sequential):
    """Sigmoid attention (its BN cannot be folded) and biased convs (their biases do not mix to a constant)."""

    def __init__(self) -> None:
        super().__init__(
            DynamicConv2d(3, 8, 3, padding=1, bias=True, attention="sigmoid", temperature=1.0),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            DynamicConv2d(8, 6, 1, bias=True, temperature=1.0),
            nn.BatchNorm2d(6),
        )


def _randomise_bn(model: nn.Module) -> nn.Module:
    torch.manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.running_mean.normal_(0, 0.2)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.2)
    return model.eval()


def _model(name: str) -> tuple[nn.Module, int]:
    torch.manual_seed(0)
    if name == "sigmoid_bias":
        return _randomise_bn(_SigmoidBias()), 12
    model = create_model(DY_ALL if name == "dy_all" else name)
    set_temperature(model, 1.0)
    return _randomise_bn(model), model.arch.input_size


MODELS = ["dy_mobilenetv2_035_cifar", "mobilenetv2_035_cifar", "dy_all", "sigmoid_bias"]
# (format, dynamic batch) exported per model: a static graph is the same either way, and TorchScript
# specialised to a batch size differs from its dynamic form only for k x k dynamic convs.
FORMATS = {
    "dy_mobilenetv2_035_cifar": [("onnx", True), ("onnx", False), ("ts", True)],
    "mobilenetv2_035_cifar": [("onnx", True), ("ts", True)],
    "dy_all": [("onnx", True), ("onnx", False), ("ts", True), ("ts", False)],
    "sigmoid_bias": [("onnx", True), ("onnx", False), ("ts", True), ("ts", False)],
}
FIXED = [(name, fmt) for name, formats in FORMATS.items() for fmt, dynamic in formats if not dynamic]


def _inputs(batch: int, size: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(batch)
    return torch.randn(batch, 3, size, size, generator=gen) + torch.randn(batch, 3, 1, 1, generator=gen)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict:
    """name -> (model, size, {(format, dynamic_batch): path}); fixed-batch graphs are for batch 3."""
    folder = tmp_path_factory.mktemp("deploy")
    out = {}
    for name in MODELS:
        model, size = _model(name)
        paths = {}
        for fmt, dynamic in FORMATS[name]:
            paths[fmt, dynamic] = folder / f"{name}_{'dyn' if dynamic else 'b3'}.{fmt}"
            export = export_onnx if fmt == "onnx" else export_torchscript
            export(model, paths[fmt, dynamic], _inputs(1 if dynamic else 3, size), dynamic_batch=dynamic, name=name)
        out[name] = (model, size, paths)
    return out


def _reference(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


@pytest.mark.parametrize("name", MODELS)
def test_onnx_matches_pytorch_at_every_batch(exported, name):
    model, size, paths = exported[name]
    session = ort.InferenceSession(str(paths["onnx", True]), providers=["CPUExecutionProvider"])
    for batch in BATCHES:
        x = _inputs(batch, size)
        got = torch.from_numpy(session.run(None, {"input": x.numpy()})[0])
        assert got.shape[0] == batch
        torch.testing.assert_close(got, _reference(model, x), rtol=0, atol=EXPORT_ATOL)


@pytest.mark.parametrize("name", MODELS)
def test_torchscript_matches_pytorch_at_every_batch(exported, name):
    model, size, paths = exported[name]
    loaded = torch.jit.load(str(paths["ts", True]))
    for batch in BATCHES:
        x = _inputs(batch, size)
        with torch.no_grad():
            got = loaded(x)
        torch.testing.assert_close(got, _reference(model, x), rtol=0, atol=EXPORT_ATOL)


@pytest.mark.parametrize("name,fmt", FIXED)
def test_fixed_batch_graphs_match_pytorch_at_their_batch(exported, name, fmt):
    model, size, paths = exported[name]
    x = _inputs(3, size)
    if fmt == "onnx":
        session = ort.InferenceSession(str(paths["onnx", False]), providers=["CPUExecutionProvider"])
        got = torch.from_numpy(session.run(None, {"input": x.numpy()})[0])
    else:
        with torch.no_grad():
            got = torch.jit.load(str(paths["ts", False]))(x)
    torch.testing.assert_close(got, _reference(model, x), rtol=0, atol=EXPORT_ATOL)


# One layer per deployment path: (in, out, kernel, stride, padding, dilation, groups, bias, attention, map size)
LAYERS = [
    pytest.param(6, 8, 1, 1, 0, 1, 1, False, "softmax", 5, id="1x1"),
    pytest.param(6, 8, 1, 1, 0, 1, 1, True, "sigmoid", 2, id="1x1-small-map-sigmoid-bias"),
    pytest.param(8, 8, 3, 2, 1, 1, 8, False, "softmax", 7, id="depthwise-strided"),
    pytest.param(6, 4, 4, 1, "same", 2, 2, True, "softmax", 6, id="even-same-dilated-grouped"),
]


@pytest.mark.parametrize("cin,cout,k,s,p,d,g,bias,attention,size", LAYERS)
def test_every_layer_form_matches_pytorch(tmp_path, cin, cout, k, s, p, d, g, bias, attention, size):
    torch.manual_seed(0)
    layer = DynamicConv2d(cin, cout, k, s, p, d, g, bias, attention=attention, temperature=0.5).eval()
    x = lambda batch: torch.randn(batch, cin, size, size) + torch.randn(batch, cin, 1, 1)  # noqa: E731
    for dynamic, batches in ((True, BATCHES), (False, (3,))):
        onnx_path, ts_path = tmp_path / f"{dynamic}.onnx", tmp_path / f"{dynamic}.ts"
        export_onnx(layer, onnx_path, x(batches[0]), dynamic_batch=dynamic)
        export_torchscript(layer, ts_path, x(batches[0]), dynamic_batch=dynamic)
        session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
        loaded = torch.jit.load(str(ts_path))
        for batch in batches:
            xb = x(batch)
            expected = _reference(layer, xb)
            torch.testing.assert_close(torch.from_numpy(session.run(None, {"input": xb.numpy()})[0]), expected,
                                       rtol=0, atol=EXPORT_ATOL)
            with torch.no_grad():
                torch.testing.assert_close(loaded(xb), expected, rtol=0, atol=EXPORT_ATOL)


def _graph(path) -> onnx.GraphProto:
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    return model


ONNX_GRAPHS = [(name, dynamic) for name, formats in FORMATS.items() for fmt, dynamic in formats if fmt == "onnx"]


@pytest.mark.parametrize("name,dynamic", ONNX_GRAPHS)
def test_onnx_uses_only_standard_ops_at_the_stated_opset(exported, name, dynamic):
    model = onnx.load(str(exported[name][2]["onnx", dynamic]))
    assert {n.domain for n in model.graph.node} <= {"", "ai.onnx"}
    assert [(o.domain, o.version) for o in model.opset_import if o.domain in ("", "ai.onnx")] == [("", ONNX_OPSET)]
    _graph(exported[name][2]["onnx", dynamic])


@pytest.mark.parametrize("name,dynamic", ONNX_GRAPHS)
def test_batch_axis_is_dynamic_or_fixed_as_asked(exported, name, dynamic):
    graph = onnx.load(str(exported[name][2]["onnx", dynamic])).graph
    for value in (graph.input[0], graph.output[0]):
        dim = value.type.tensor_type.shape.dim[0]
        assert (dim.dim_param, dim.dim_value) == (("batch", 0) if dynamic else ("", 3))
    assert all(d.dim_value > 0 for d in graph.input[0].type.tensor_type.shape.dim[1:])


def _counts(path) -> collections.Counter:
    return collections.Counter(n.op_type for n in onnx.load(str(path)).graph.node)


def _layers(name: str, exported) -> tuple[int, int]:
    """(dynamic convs, static convs) of a model."""
    model = exported[name][0]
    dynamic = sum(isinstance(m, DynamicConv2d) for m in model.modules())
    return dynamic, sum(type(m) is nn.Conv2d for m in model.modules())


def test_dynamic_batch_graph_is_folded_per_sample_matmuls_with_constant_shapes(exported):
    """Each dynamic 1x1 conv: one MatMul mixing the kernels, one per-sample MatMul; no BN, no shape ops."""
    name = "dy_mobilenetv2_035_cifar"
    counts = _counts(exported[name][2]["onnx", True])
    dynamic, static = _layers(name, exported)
    assert counts["MatMul"] == 2 * dynamic
    assert counts["Conv"] == static  # the static depthwise convs and the stem
    assert counts["ReduceMean"] == dynamic  # the attention's pooling, one op
    for op in ("BatchNormalization", "Shape", "Gather", "Unsqueeze", "Concat"):
        assert counts[op] == 0, op


def test_fixed_batch_graph_is_one_conv_per_layer(exported):
    """Specialised to a batch size, a dynamic conv is a (grouped) Conv reading its mixed kernel."""
    name = "dy_mobilenetv2_035_cifar"
    counts = _counts(exported[name][2]["onnx", False])
    dynamic, static = _layers(name, exported)
    assert counts["Conv"] == static + dynamic
    assert counts["MatMul"] == dynamic  # the kernel mixing only; biases are the folded BN shift
    assert counts["BatchNormalization"] == 0


def test_sigmoid_attention_keeps_its_batchnorm_and_mixes_biases(exported):
    counts = _counts(exported["sigmoid_bias"][2]["onnx", True])
    assert counts["BatchNormalization"] == 1  # the sigmoid layer's
    # per layer: kernels mixed, biases mixed (sigmoid; BN-folded biases that differ), the per-sample MatMul
    assert counts["MatMul"] == 3 + 3


def test_torchscript_graph_has_no_batchnorm_and_runs_eager_kernels(exported):
    graph = str(torch.jit.load(str(exported["dy_mobilenetv2_035_cifar"][2]["ts", True])).inlined_graph)
    assert "aten::batch_norm" not in graph
    assert "aten::baddbmm" in graph  # the eager 1x1 path (with the folded bias), batch read at run time
    assert "aten::im2col" not in graph and "aten::unfold" not in graph
    dy_all = str(torch.jit.load(str(exported["dy_all"][2]["ts", True])).inlined_graph)
    assert "aten::im2col" not in dy_all and "aten::unfold" not in dy_all  # k x k: the scripted grouped conv
    assert "prim::If" in dy_all


def test_fold_batchnorm_is_exact_and_leaves_the_model_alone():
    model, size = _model("dy_all")
    before = copy.deepcopy(model.state_dict())
    folded = fold_batchnorm(model)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    x = _inputs(4, size)
    torch.testing.assert_close(_reference(folded, x), _reference(model, x), rtol=0, atol=1e-5)
    sigmoid = fold_batchnorm(_model("sigmoid_bias")[0])
    assert [type(m).__name__ for m in sigmoid] == ["DynamicConv2d", "BatchNorm2d", "ReLU", "DynamicConv2d", "Identity"]


@pytest.mark.parametrize("name", ["od1_mobilenetv2_050_cifar", "od4_mobilenetv2_050_cifar", "dcd_mobilenetv2_050_cifar"])
def test_fold_batchnorm_folds_odconv_and_dcd_exactly(name):
    """Every BatchNorm after an ODConv or DCD conv folds away, and each conv + BN keeps its output.

    Compared conv by conv on random inputs (a whole untrained network in eval mode maps every input
    to nearly the same logits, which would hide a wrong fold), with trained-like weights.
    """
    model, _ = _model(name)
    torch.manual_seed(2)
    for m in model.modules():
        if isinstance(m, OmniAttention):
            m.official_init()  # random heads: the attentions vary per sample
        elif isinstance(m, DCDConv2d):
            nn.init.normal_(m.weight_p, 0.0, 0.1)  # a dynamic branch that is not zero
    folded = dict(fold_batchnorm(model).named_modules())
    checked = 0
    for path, seq in model.named_modules():
        if not (isinstance(seq, nn.Sequential) and isinstance(seq[0], (ODConv2d, DCDConv2d))):
            continue
        assert isinstance(seq[1], nn.BatchNorm2d) and isinstance(folded[path][1], nn.Identity), path
        x = torch.randn(4, seq[0].in_channels, 8, 8, generator=torch.Generator().manual_seed(checked))
        with torch.no_grad():
            expected = seq[1](seq[0](x))
            torch.testing.assert_close(folded[path][1](folded[path][0](x)), expected, rtol=1e-4, atol=1e-5)
        assert (expected[0] - expected[1]).abs().max() > 1e-2  # per-sample attentions that differ
        checked += 1
    assert checked >= 10


def test_onnx_latency_ms(exported):
    _, size, paths = exported["mobilenetv2_035_cifar"]
    ms = onnx_latency_ms(paths["onnx", True], _inputs(1, size), threads=1, warmup=1, runs=3)
    assert math.isfinite(ms) and ms > 0
    with pytest.raises(DynasError, match=r"`runs` must be an integer >= 1, but got runs=0"):
        onnx_latency_ms(paths["onnx", True], _inputs(1, size), runs=0)


def test_export_fails_loudly_when_the_graph_is_wrong(tmp_path, monkeypatch):
    """The parity check is real: a traced graph that differs from PyTorch is refused."""
    model, size = _model("sigmoid_bias")
    monkeypatch.setattr(DynamicConv2d, "_deploy_forward", lambda self, x, pi, dynamic: self._conv_matmul(
        x, *self.aggregate(torch.ones_like(pi))))
    with pytest.raises(DynasError, match="must match PyTorch within"):
        export_onnx(model, tmp_path / "m.onnx", _inputs(1, size))
    with pytest.raises(DynasError, match="must match PyTorch within"):
        export_torchscript(model, tmp_path / "m.ts", _inputs(1, size))
