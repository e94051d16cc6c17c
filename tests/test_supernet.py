"""The weight-sharing supernet: elastic ops, extraction, training (sandwich, resume, DDP), scoring, bad input."""

from __future__ import annotations

import dataclasses
import json
import math
import re
import os
import random
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from dynas.builder import build_model
from dynas.cost import closed_form_macs
from dynas.data import load_data, normalize
from dynas.errors import DynasError
from dynas.ops import DCDConv2d, DynamicConv2d, ODConv2d
from dynas.spec import ArchSpec
from dynas.supernet import (
    ElasticConv2d,
    Supernet,
    SupernetTrainConfig,
    load_supernet,
    recalibrate_bn,
    score_subnet,
    train_supernet,
)
from dynas.supernet.elastic import RESIDUAL_INIT_SCALE
from dynas.supernet.train import sandwich
from dynas.training import TrainConfig
from search_spaces.mobile import MobileCifarSpace, MobileImageNetSpace, StageConfig
from search_spaces.mobile_ops import MobileCifarOpsSpace

SIZE = 16  # mobile_cifar at 16x16: the same layers as at 32x32, a quarter of the pixels


def _space(**kwargs) -> MobileCifarSpace:
    return MobileCifarSpace(input_size=SIZE, **kwargs)


class TinySpace(MobileCifarSpace):
    """A small mobile space (not registered) for the multi-step training tests: every kind of
    choice, a fraction of mobile_cifar's weights."""

    name = "tiny_cifar"
    widths = (0.5, 1.0)
    num_kernels = (2, 4)
    stages = (StageConfig(16, 2, (1, 2)), StageConfig(32, 2, (1, 2), activation="hswish"))
    head_channels = 64


def _randomize(supernet: Supernet, seed: int = 0) -> None:
    """Weights and BN statistics far from their init, so that a wrong slice shows in the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in supernet.state_dict().items():
            if name.endswith("num_batches_tracked"):
                continue
            if name.endswith("running_var") or (name.endswith("bn.weight")):
                tensor.copy_(torch.rand(tensor.shape, generator=g) + 0.5)
            elif "attention.fc2" in name:
                tensor.copy_(torch.randn(tensor.shape, generator=g))  # attention far from uniform
            elif not name.endswith("conv.weight"):  # conv kernels keep their (distinct) kaiming draws
                tensor.copy_(0.2 * torch.randn(tensor.shape, generator=g))


@pytest.fixture(scope="module")
def supernet() -> Supernet:
    torch.manual_seed(0)
    net = Supernet(_space())
    _randomize(net)
    net.temperature = 1.0
    return net.eval()


@pytest.fixture(scope="module")
def digits():
    return load_data("digits", input_size=SIZE, train_subset=96)


def _covering_params(space: MobileCifarSpace) -> list[dict]:
    """Params in which every value of every choice occurs, mixed across blocks.

    One family keeps every block and makes it dynamic, so that each block's kernel, expansion,
    SE and K take all their values; the other rotates depth and static / dynamic too.
    """
    choices = space.choices()
    rounds = max(len(c.values) for c in choices)
    params = []
    for every_block in (True, False):
        for t in range(rounds):
            p = {c.label: c.values[(t + i) % len(c.values)] for i, c in enumerate(choices)}
            if every_block:
                p.update({c.label: max(c.values) for c in choices if c.label.endswith(("_depth", "_dynamic"))})
            params.append(p)
    return params


def _test_archs() -> list[ArchSpec]:
    space = _space()
    archs = [space.decode(p).arch for p in _covering_params(space)]
    archs += [space.sample(seed=s).arch for s in range(6)]
    for k in space.num_kernels:  # every block dynamic with one K
        params = dict(space.sample(seed=10 + k).params)
        params.update({lbl: True for lbl in params if lbl.endswith("_dynamic")})
        params.update({c.label: k for c in space.choices() if c.label.endswith("_num_kernels")})
        archs.append(space.decode(params).arch)
    return [space.largest(), space.smallest(), *archs]


ARCHS = _test_archs()


def test_the_test_archs_cover_every_value_of_every_choice(supernet):
    space = supernet.space
    seen: dict[str, set] = {}
    for arch in ARCHS:
        for label, value in supernet._params_of(arch, "arch").items():
            seen.setdefault(label, set()).add(value)
    for choice in space.choices():
        if choice.label not in ("tau_start", "anneal_fraction"):
            assert seen.get(choice.label) == set(choice.values), choice.label


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max().detach() / b.abs().max().detach())


@pytest.mark.parametrize("index", range(len(ARCHS)))
def test_extracted_subnet_computes_what_the_activated_supernet_computes(supernet, index):
    arch = ARCHS[index]
    x = torch.randn(3, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(index))
    model = supernet.extract(arch).eval()
    with torch.no_grad(), supernet.activate(arch):
        expected = supernet(x)
        got = model(x)
    assert expected.abs().max() > 1e-3  # not a degenerate output
    assert _relative_error(got, expected) < 1e-5
    assert supernet.active_arch == supernet.largest  # activate restores what was active


@pytest.mark.parametrize("space", [TinySpace(input_size=SIZE), MobileImageNetSpace(input_size=32, num_classes=7)])
def test_other_mobile_spaces_extract_exactly_too(space):
    torch.manual_seed(1)
    net = Supernet(space)
    _randomize(net, seed=1)
    net.eval().temperature = 1.0
    x = torch.randn(2, 3, space.input_size, space.input_size)
    for arch in (space.largest(), space.smallest(), space.sample(seed=2).arch):
        with torch.no_grad(), net.activate(arch):
            assert _relative_error(net.extract(arch).eval()(x), net(x)) < 1e-5


@pytest.mark.parametrize("index", [0, 1, 2, 5])
def test_extracted_module_is_what_build_model_builds(supernet, index):
    arch = ARCHS[index]
    model, built = supernet.extract(arch), build_model(arch)
    assert type(model) is type(built) and model.arch == arch
    assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in built.state_dict().items()}


def test_extract_takes_params_dicts_strings_and_candidates(supernet):
    space = supernet.space
    candidate = space.sample(seed=3)
    params = {k: v for k, v in candidate.params.items() if k not in ("tau_start", "anneal_fraction")}
    for form in (candidate, candidate.arch.to_str(), params, dict(candidate.params)):
        assert supernet.resolve(form) == candidate.arch


def test_extract_leaves_the_global_rng_alone(supernet):
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    supernet.extract(ARCHS[3])
    assert torch.equal(torch.rand(3), expected)


# ----------------------------------------------------------------------------- elastic conv


def test_k1_is_exactly_the_static_conv_of_kernel_0_without_attention():
    torch.manual_seed(0)
    conv = ElasticConv2d(8, 16, 5, num_kernels=4)
    with torch.no_grad():
        for p in conv.attention.parameters():
            p.fill_(float("nan"))  # any use of the attention would show
    conv.set_active(12, 3, 1)
    x = torch.randn(2, 6, 9, 9)
    expected = F.conv2d(x, conv.weight[0, :12, :6, 1:4, 1:4], padding=1)
    assert torch.equal(conv(x), expected)


def test_k_uses_the_first_k_kernels_and_attention_logits_only():
    torch.manual_seed(0)
    conv = ElasticConv2d(8, 16, 1, num_kernels=8)
    conv.temperature = 2.0
    conv.set_active(16, 1, 4)
    x = torch.randn(3, 8, 5, 5)
    reference = DynamicConv2d(8, 16, 1, bias=False, num_kernels=4, temperature=2.0)
    conv.copy_active_to(reference)
    out = conv(x)
    assert _relative_error(out, reference(x)) < 1e-5
    with torch.no_grad():
        conv.weight[4:].normal_()  # kernels beyond the prefix, and their logits
        conv.attention.fc2.weight[4:].normal_()
    assert torch.equal(conv(x), out)
    conv.set_active(16, 1, 8)
    assert not torch.allclose(conv(x), out)


def test_depthwise_groups_follow_the_active_channels():
    torch.manual_seed(0)
    conv = ElasticConv2d(32, 32, 7, stride=2, depthwise=True)
    conv.set_active(24, 5, 1)
    x = torch.randn(2, 24, 8, 8)
    expected = F.conv2d(x, conv.weight[0, :24, :, 1:6, 1:6], stride=2, padding=2, groups=24)
    assert torch.equal(conv(x), expected)


def test_set_active_rejects_sizes_beyond_the_largest():
    conv = ElasticConv2d(8, 16, 5, num_kernels=4)
    with pytest.raises(ValueError, match=r"`num_kernels` must be an integer in 1..4, but got num_kernels=6"):
        conv.set_active(16, 5, 6)
    with pytest.raises(ValueError, match=r"`kernel_size` must be an integer in 1..5, but got kernel_size=7"):
        conv.set_active(16, 7, 1)


# ----------------------------------------------------------------------------- gradients


def test_gradients_reach_the_shared_weights_of_the_active_slice_only():
    torch.manual_seed(0)
    net = Supernet(_space(), zero_init_residual=False)  # a zero BN scale would stop its block's gradients
    arch = net.smallest  # all static, narrowest
    with net.activate(arch):
        net(torch.randn(4, 3, SIZE, SIZE)).logsumexp(dim=1).sum().backward()
    weight = net.stages[0][0].project.conv.weight  # (K_max, Cout_max, Cin_max, 1, 1)
    cout, cin = arch.stages[0].blocks[0].out_channels, net.stages[0][0].active.mid_channels
    assert weight.grad[0, :cout, :cin].abs().sum() > 0
    outside = weight.grad.clone()
    outside[0, :cout, :cin] = 0
    assert outside.abs().sum() == 0  # kernels 1.. and channels beyond the prefix: untouched
    net.zero_grad(set_to_none=True)
    net.temperature = 1.0
    net(torch.randn(4, 3, SIZE, SIZE)).logsumexp(dim=1).sum().backward()  # the largest
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters())


# ----------------------------------------------------------------------------- files


def test_save_and_load_round_trip(supernet, tmp_path):
    supernet.progress = {"epochs_done": 3, "train_loss": [2.0, 1.5, 1.2]}
    path = supernet.save(tmp_path / "supernet.pt")
    loaded = load_supernet(path)
    assert loaded.space.name == "mobile_cifar" and loaded.space.input_size == SIZE
    assert loaded.temperature == supernet.temperature and loaded.progress == supernet.progress
    assert not loaded.training
    state = supernet.state_dict()
    assert all(torch.equal(v, state[k]) for k, v in loaded.state_dict().items())
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad(), supernet.activate(ARCHS[4]), loaded.activate(ARCHS[4]):
        assert torch.equal(loaded(x), supernet(x))
    assert not list(tmp_path.glob("*.tmp"))  # written atomically


# ----------------------------------------------------------------------------- residual kernel bank


def test_a_residual_bank_holds_kernels_1_on_as_offsets_from_kernel_0():
    torch.manual_seed(0)
    conv = ElasticConv2d(8, 16, 3, num_kernels=4, bank="residual")
    w = conv.weight.detach()
    ratio = float(w[1:].std() / w[0].std())
    assert abs(ratio - RESIDUAL_INIT_SCALE) < 0.1  # offsets start at a fraction of a kernel's scale
    conv.set_active(16, 3, 3)
    got = conv.active_weight(8)  # (3, 16, 8, 3, 3): the kernels themselves
    assert torch.equal(got[0], w[0]) and torch.allclose(got[1:], w[:1] + w[1:3])
    reference = DynamicConv2d(8, 16, 3, padding=1, bias=False, num_kernels=3, temperature=30.0)
    conv.copy_active_to(reference)  # what an extracted subnet holds
    assert torch.allclose(reference.weight, got)
    x = torch.randn(2, 8, 7, 7)
    assert _relative_error(conv(x), reference(x)) < 1e-5
    conv.set_active(12, 1, 1)  # K = 1: kernel 0 alone, the static conv
    x = torch.randn(2, 6, 9, 9)
    assert torch.equal(conv(x), F.conv2d(x, w[0, :12, :6, 1:2, 1:2]))


def test_a_residual_supernet_extracts_exactly_and_round_trips(tmp_path):
    torch.manual_seed(2)
    net = Supernet(_space())  # residual by default
    assert net.kernel_bank == "residual"
    _randomize(net, seed=2)
    net.eval().temperature = 1.0
    x = torch.randn(2, 3, SIZE, SIZE)
    loaded = load_supernet(net.save(tmp_path / "supernet.pt"))
    assert loaded.kernel_bank == "residual"
    for arch in (ARCHS[0], ARCHS[1], *ARCHS[-len(net.space.num_kernels):]):
        with torch.no_grad(), net.activate(arch), loaded.activate(arch):
            expected = net(x)
            assert _relative_error(net.extract(arch).eval()(x), expected) < 1e-5
            assert torch.equal(loaded(x), expected)


def test_a_separate_bank_holds_the_static_kernel_apart_from_the_dynamic_ones():
    torch.manual_seed(0)
    conv = ElasticConv2d(8, 16, 3, num_kernels=4, bank="separate")
    w = conv.weight.detach()
    assert w.shape == (5, 16, 8, 3, 3)  # the static kernel, then 4 dynamic ones, all at a kernel's scale
    assert all(abs(float(w[k].std() / w[0].std()) - 1) < 0.15 for k in range(1, 5))
    conv.set_active(16, 3, 3)
    assert torch.equal(conv.active_weight(8), w[1:4])  # K = 3: the dynamic kernels, not the static one
    reference = DynamicConv2d(8, 16, 3, padding=1, bias=False, num_kernels=3, temperature=30.0)
    conv.copy_active_to(reference)
    x = torch.randn(2, 8, 7, 7)
    assert torch.equal(reference.weight, w[1:4]) and _relative_error(conv(x), reference(x)) < 1e-5
    conv.set_active(12, 1, 1)  # K = 1: the static kernel alone
    x = torch.randn(2, 6, 9, 9)
    assert torch.equal(conv(x), F.conv2d(x, w[0, :12, :6, 1:2, 1:2]))
    assert ElasticConv2d(8, 16, 3, bank="separate").weight.shape[0] == 1  # no dynamic choice: one kernel
    with pytest.raises(ValueError, match="`bank` must be one of independent, residual, separate"):
        ElasticConv2d(8, 16, 3, bank="shared")


@pytest.mark.parametrize("ops", [False, True], ids=["mobile_cifar", "mobile_cifar_ops"])
def test_a_separate_supernet_extracts_exactly_and_round_trips(ops, tmp_path):
    torch.manual_seed(4)
    net = Supernet(MobileCifarOpsSpace(input_size=SIZE) if ops else _space(), kernel_bank="separate")
    _randomize(net, seed=4)
    net.eval().temperature = 1.0
    loaded = load_supernet(net.save(tmp_path / "supernet.pt"))
    assert loaded.kernel_bank == "separate"
    archs = OPS_ARCHS if ops else [ARCHS[0], ARCHS[1], *ARCHS[-len(net.space.num_kernels):]]
    x = torch.randn(2, 3, SIZE, SIZE)
    for arch in archs:
        model = net.extract(arch).eval()
        with torch.no_grad(), net.activate(arch), loaded.activate(arch):
            if not ops:
                expected = net(x)
                assert _relative_error(model(x), expected) < 1e-5 and torch.equal(loaded(x), expected)
                continue
            # Block by block, as the ops tests do (a whole random network overflows).
            for i, stage in enumerate(arch.stages):
                for j in range(len(stage.blocks)):
                    h = torch.randn(2, net.stages[i][j].active.in_channels, 8, 8)
                    expected = net.stages[i][j](h)
                    assert _relative_error(model.stages[i][j](h), expected) < 1e-5, (i, j)
                    assert torch.equal(loaded.stages[i][j](h), expected)
    if ops:  # the static conv and DCD's W0 are one kernel; DY-conv and ODConv start from their own
        space = net.space
        base = {c.label: c.values[i % len(c.values)] for i, c in enumerate(space.choices())}
        convs = [net.extract(space.decode({**base, "s1_b1_op": op, "s1_b1_num_kernels": 2, "s1_b1_od_num_kernels": 1}).arch)
                 .stages[0][0].project.conv for op in ("static", "dcd", "dy", "od")]
        assert [type(c) for c in convs] == [nn.Conv2d, DCDConv2d, DynamicConv2d, ODConv2d]
        assert torch.equal(convs[1].weight, convs[0].weight)
        assert torch.equal(convs[2].weight[0], convs[3].weight[0]) and not torch.equal(convs[2].weight[0], convs[0].weight)


def test_a_separate_supernet_trains_its_static_and_its_dynamic_kernels(digits, tmp_path):
    torch.manual_seed(0)
    net = Supernet(_space(), kernel_bank="separate")
    convs = [m for m in net.modules() if isinstance(m, ElasticConv2d) and m.dynamic_start]
    assert convs and all(c.weight.shape[0] == 1 + c.num_kernels for c in convs)
    before = [c.weight.detach().clone() for c in convs]
    train_supernet(net, digits, _tiny_config(epochs=1, steps=2, val_calib_images=0), run_dir=tmp_path)
    # The smallest subnet (all static) trains kernel 0, the largest (K_max everywhere) kernels 1..
    assert all(not torch.equal(c.weight[0], b[0]) for c, b in zip(convs, before))
    assert all(not torch.equal(c.weight[1:], b[1:]) for c, b in zip(convs, before))


def test_an_older_supernet_file_without_a_kernel_bank_loads_as_independent(supernet, tmp_path):
    path = supernet.save(tmp_path / "supernet.pt")
    payload = torch.load(path, weights_only=True)
    del payload["kernel_bank"]
    torch.save(payload, path)
    assert load_supernet(path).kernel_bank == "independent"
    torch.save({**payload, "kernel_bank": "shared"}, path)
    with pytest.raises(DynasError, match=r"supernet file .* has kernel_bank='shared'; this dynas reads independent, residual, separate"):
        load_supernet(path)


def test_a_bad_kernel_bank_is_refused():
    with pytest.raises(DynasError, match=r"unknown kernel_bank 'residul'; choose one of independent, residual, separate.*'residual'"):
        Supernet(_space(), kernel_bank="residul")


def test_zero_init_residual_starts_every_always_residual_block_as_the_identity():
    torch.manual_seed(0)
    net = Supernet(_space()).eval()  # the default
    plain = Supernet(_space(), zero_init_residual=False).eval()
    for stage, other in zip(net.stages, plain.stages):
        for j, (block, reference) in enumerate(zip(stage, other)):
            x = torch.randn(2, block.active.in_channels, 4, 4)
            with torch.no_grad():
                assert torch.equal(block(x), x) == (j > 0)  # a stage's first block is not residual
                assert not torch.equal(reference(x), x)


# ----------------------------------------------------------------------------- scoring


def test_recalibrated_bn_statistics_are_the_mean_over_calibration_images(supernet, digits):
    model = supernet.extract(ARCHS[2])
    recalibrate_bn(model, digits, 64, seed=1, batch_size=32)
    index = torch.randperm(len(digits.train), generator=torch.Generator().manual_seed(1))[:64].sort().values
    x = normalize(digits.train.images[index], digits.mean, digits.std)
    with torch.no_grad():
        stem = model.stem.conv(x)  # (64, C, H, W), the first BN's input
    assert torch.allclose(model.stem.bn.running_mean, stem.mean(dim=(0, 2, 3)), atol=1e-5)


def test_score_subnet_is_seeded_and_leaves_the_supernet_unchanged(supernet, digits):
    before = {k: v.clone() for k, v in supernet.state_dict().items()}
    first = score_subnet(supernet, ARCHS[3], digits, calib_images=48, seed=2)
    second = score_subnet(supernet, ARCHS[3], digits, calib_images=48, seed=2)
    assert first.top1 == second.top1 and 0.0 <= first.top1 <= 100.0
    assert first.arch == ARCHS[3] and first.calib_images == 48 and first.seconds > 0
    assert all(torch.equal(v, before[k]) for k, v in supernet.state_dict().items())


# ----------------------------------------------------------------------------- ODConv and DCD


def _ops_archs() -> dict[str, ArchSpec]:
    """mobile_cifar_ops subnets by name: every block one operator (each op, each K; all blocks
    there), the largest and smallest, then mixed samples."""
    space = MobileCifarOpsSpace(input_size=SIZE)
    archs = {"largest": space.largest(), "smallest": space.smallest()}
    uniform = [("static", {}), ("dcd", {})]
    uniform += [(f"dy{k}", {"num_kernels": k}) for k in space.num_kernels]
    uniform += [(f"od{k}", {"od_num_kernels": k}) for k in space.od_num_kernels]
    for t, (name, ks) in enumerate(uniform):
        params = {c.label: c.values[(t + i) % len(c.values)] for i, c in enumerate(space.choices())}
        for c in space.choices():
            if c.label.endswith("_depth"):
                params[c.label] = max(c.values)
            elif c.label.endswith("_op"):
                params[c.label] = name.rstrip("0123456789")
            elif c.label.endswith("num_kernels"):
                key = "od_num_kernels" if c.label.endswith("_od_num_kernels") else "num_kernels"
                params[c.label] = ks.get(key, max(c.values))
        archs[name] = space.decode(params).arch
    archs.update({f"sample{s}": space.sample(seed=s).arch for s in range(4)})
    return archs


OPS = _ops_archs()
OPS_ARCHS = list(OPS.values())


@pytest.fixture(scope="module")
def ops_supernet() -> Supernet:
    torch.manual_seed(0)
    net = Supernet(MobileCifarOpsSpace(input_size=SIZE))
    _randomize(net, seed=3)  # ODConv heads and DCD's P, zero at init, become random too
    net.temperature = 1.0
    return net.eval()


def test_the_ops_archs_cover_every_operator_and_k(ops_supernet):
    seen: dict[str, set] = {}
    for arch in OPS_ARCHS:
        for label, value in ops_supernet._params_of(arch, "arch").items():
            seen.setdefault(label, set()).add(value)
    for choice in ops_supernet.space.choices():
        if choice.label.endswith(("_op", "num_kernels")):
            assert seen.get(choice.label) == set(choice.values), choice.label


@pytest.mark.parametrize("index", range(len(OPS_ARCHS)))
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_odconv_and_dcd_subnets_extract_exactly_block_by_block(ops_supernet, index, mode):
    """Each block of the extracted subnet computes what the supernet's block computes, on random
    inputs (a whole untrained network gives nearly input-independent logits), in eval mode and
    in training mode (batch statistics, the ODConv trunk's BatchNorm1d included)."""
    arch = OPS_ARCHS[index]
    model = ops_supernet.extract(arch)
    gen = torch.Generator().manual_seed(index)
    with ops_supernet.activate(arch), torch.no_grad():
        for i, stage in enumerate(arch.stages):
            for j in range(len(stage.blocks)):
                ours, built = ops_supernet.stages[i][j], model.stages[i][j]
                x = torch.randn(4, ours.active.in_channels, 8, 8, generator=gen)
                ours.train(mode == "train"), built.train(mode == "train")
                expected, got = ours(x), built(x)
                assert _relative_error(got, expected) < 1e-5, (i, j, stage.blocks[j])
                if mode == "train":  # (in eval, random BN statistics can leave a ReLU6 block all zero)
                    assert (expected[0] - expected[1]).abs().max() > 1e-3  # the samples are told apart
    ops_supernet.eval()
    ops_classes = {type(m) for m in model.modules()}
    ops = {b.op if b.is_dynamic else "static" for s in arch.stages for b in s.blocks}
    assert (ODConv2d in ops_classes) == ("od" in ops) and (DCDConv2d in ops_classes) == ("dcd" in ops)


def test_every_operator_of_a_layer_starts_from_the_same_kernel_0(ops_supernet):
    """Static conv, DY-conv's and ODConv's first kernel and DCD's W0 are one shared tensor."""
    space = ops_supernet.space
    base = {c.label: c.values[i % len(c.values)] for i, c in enumerate(space.choices())}
    choices = [("static", 2, 1), ("dy", 2, 1), ("od", 2, 1), ("dcd", 2, 1)]  # (op, DY K, OD K)
    archs = [space.decode({**base, "s1_b1_op": op, "s1_b1_num_kernels": k, "s1_b1_od_num_kernels": ok}).arch
             for op, k, ok in choices]
    convs = [ops_supernet.extract(arch).stages[0][0].project.conv for arch in archs]
    assert [type(c) for c in convs] == [nn.Conv2d, DynamicConv2d, ODConv2d, DCDConv2d]
    w0 = convs[0].weight
    for conv in convs[1:]:
        kernel0 = conv.weight if isinstance(conv, DCDConv2d) else conv.weight[0]
        assert torch.equal(kernel0, w0)


def test_a_fresh_ops_supernet_starts_every_odconv_and_dcd_at_its_static_part():
    torch.manual_seed(0)
    net = Supernet(MobileCifarOpsSpace(input_size=SIZE))
    dcd = [m for m in net.extract(OPS["dcd"]).modules() if isinstance(m, DCDConv2d)]
    assert dcd and all(torch.count_nonzero(m.weight_p) == 0 for m in dcd)
    od = [m for m in net.extract(OPS["od4"]).modules() if isinstance(m, ODConv2d)]
    assert od and all(torch.count_nonzero(m.attention.heads.weight) == 0 for m in od)


def test_an_odconv_or_dcd_block_is_refused_by_a_supernet_without_them(supernet):
    arch = OPS["od2"]
    with pytest.raises(DynasError, match=r"block s1_b1's `op` must be 'dy' .* but got op='od'"):
        supernet.extract(arch)


def test_an_ops_arch_outside_the_choices_is_refused(ops_supernet):
    arch = OPS["od1"]  # every block ODConv, K = 1
    bad = _with_block(arch, 1, 0, num_kernels=3)
    with pytest.raises(DynasError, match=r"`s2_b1_od_num_kernels` must be one of \(1, 2, 4\), but got s2_b1_od_num_kernels=3"):
        ops_supernet.extract(bad)
    with pytest.raises(DynasError, match=r"block s2_b1's `dynamic_convs` must be 'all', but got dynamic_convs='pw'"):
        ops_supernet.extract(_with_block(arch, 1, 0, dynamic_convs="pw"))


def test_the_ops_supernet_trains_and_round_trips(digits, tmp_path):
    """Sandwich steps through every operator: gradients reach ODConv heads and DCD's P."""
    torch.manual_seed(0)
    net = Supernet(MobileCifarOpsSpace(input_size=SIZE))
    result = train_supernet(net, digits, _tiny_config(epochs=1, steps=2, val_calib_images=16), run_dir=tmp_path)
    state = net.state_dict()
    assert any(k.endswith("od_attention.channel.weight") and torch.count_nonzero(v) for k, v in state.items())
    assert any(k.endswith("dcd.weight_p") and torch.count_nonzero(v) for k, v in state.items())
    loaded = load_supernet(result.path)
    assert loaded.space.name == "mobile_cifar_ops"
    assert all(torch.equal(v, state[k]) for k, v in loaded.state_dict().items())


# ----------------------------------------------------------------------------- training


def _tiny_config(epochs: int = 2, steps: int = 1, **kwargs) -> SupernetTrainConfig:
    train = TrainConfig(epochs=epochs, batch_size=16, max_steps_per_epoch=steps, warmup_epochs=0.0, quiet=True)
    return SupernetTrainConfig(train=train, num_random=1, **kwargs)


def _fresh_supernet(space_class: type[MobileCifarSpace] = MobileCifarSpace) -> Supernet:
    torch.manual_seed(0)
    return Supernet(space_class(input_size=SIZE))


def test_sandwich_is_largest_smallest_then_seeded_random_subnets(supernet):
    archs = sandwich(supernet, step=7, num_random=3, seed=1)
    assert archs[:2] == [supernet.largest, supernet.smallest] and len(archs) == 5
    assert archs == sandwich(supernet, step=7, num_random=3, seed=1)
    assert archs[2:] != sandwich(supernet, step=8, num_random=3, seed=1)[2:]


def test_sandwich_with_the_largest_static_subnet_puts_it_second(supernet):
    archs = sandwich(supernet, step=7, num_random=3, seed=1, largest_static=True)
    assert archs[:3] == [supernet.largest, supernet.largest_static, supernet.smallest]
    assert archs[3:] == sandwich(supernet, step=7, num_random=3, seed=1)[2:]  # the same random draws
    assert supernet.largest_static == supernet.space.largest_static()
    with pytest.raises(DynasError, match="`largest_static` must be a bool, but got largest_static='yes'"):
        SupernetTrainConfig(largest_static="yes")


def test_sandwich_with_static_twins_follows_each_draw_by_it_made_static(supernet):
    archs = sandwich(supernet, step=7, num_random=5, seed=1, static_twins=True)
    assert archs[:2] == [supernet.largest, supernet.smallest] and len(archs) == 7
    drawn = archs[2:]
    for draw, twin in zip(drawn[0::2], drawn[1::2]):
        assert any(b.is_dynamic for b in draw.blocks) and not any(b.is_dynamic for b in twin.blocks)
        # the twin is its draw with the dynamic blocks made static, every other choice kept
        static = [dataclasses.replace(b, num_kernels=1, op="dy", dynamic_convs="pw", latent=0) for b in draw.blocks]
        assert static == list(twin.blocks)
        assert (draw.stem_channels, draw.head_channels) == (twin.stem_channels, twin.head_channels)
    assert len(set(drawn[0::2])) == 3  # three draws for five subnets (an odd count ends on a draw)
    assert drawn[0] == sandwich(supernet, step=7, num_random=1, seed=1)[2]  # the first draw is the plain sandwich's
    with pytest.raises(DynasError, match="`static_twins` must be a bool, but got static_twins=1"):
        SupernetTrainConfig(static_twins=1)


@pytest.mark.parametrize("largest_static", [False, True])
def test_the_largest_static_subnet_trains_the_static_kernels_the_smallest_never_reaches(digits, largest_static):
    # With a separate bank and no random subnets, a block beyond the smallest's depth runs its
    # static kernel only in the largest static subnet (the largest runs its dynamic kernels).
    torch.manual_seed(0)
    # (the block starts as the identity with zero_init_residual, and then none of its convs learns in step 1)
    net = Supernet(TinySpace(input_size=SIZE), kernel_bank="separate", zero_init_residual=False)
    deep = [m for m in net.stages[0][1].modules() if isinstance(m, ElasticConv2d) and m.dynamic_start]
    assert deep and net.smallest.stages[0].blocks[1:] == ()
    before = [c.weight.detach().clone() for c in deep]
    train = TrainConfig(epochs=1, batch_size=16, max_steps_per_epoch=1, warmup_epochs=0.0, weight_decay=0.0, quiet=True)
    config = SupernetTrainConfig(train=train, num_random=0, largest_static=largest_static, val_calib_images=0)
    train_supernet(net, digits, config)
    assert all(not torch.equal(c.weight[1:], b[1:]) for c, b in zip(deep, before))  # the largest's dynamic kernels
    assert all(torch.equal(c.weight[0], b[0]) != largest_static for c, b in zip(deep, before))


@pytest.fixture(scope="module")
def trained(digits, tmp_path_factory):
    """One epoch of one step, validated: (supernet, its initial state, result, run_dir)."""
    run_dir = tmp_path_factory.mktemp("trained")
    net = _fresh_supernet()
    init = {k: v.clone() for k, v in net.state_dict().items()}
    result = train_supernet(net, digits, _tiny_config(epochs=1, val_calib_images=32), run_dir=run_dir)
    return net, init, result, run_dir


def test_training_changes_the_weights_validates_and_writes_the_supernet(trained):
    net, init, result, run_dir = trained
    assert result.epochs_run == 1 and not result.stopped and result.path == run_dir / "supernet.pt"
    assert len(result.val_top1_largest) == len(result.val_top1_smallest) == 1
    assert all(0.0 <= t <= 100.0 for t in result.val_top1_largest + result.val_top1_smallest)
    assert result.tau_end == 1.0 and net.temperature == 1.0 and not net.training
    assert any(not torch.equal(v, init[k]) for k, v in net.state_dict().items())
    saved = load_supernet(result.path)
    assert saved.progress["epochs_done"] == 1 and saved.progress["val_top1_largest"] == result.val_top1_largest
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in saved.state_dict().items())


def test_training_resumes_from_the_epoch_checkpoint_exactly(digits, tmp_path):
    config = _tiny_config(steps=2, val_calib_images=16)
    straight = _fresh_supernet(TinySpace)
    result = train_supernet(straight, digits, config)
    assert result.epochs_run == 2 and result.path is None

    stop = lambda epoch, top1: True  # noqa: E731
    first = train_supernet(_fresh_supernet(TinySpace), digits, config, run_dir=tmp_path, callback=stop)
    assert first.stopped and first.epochs_run == 1 and (tmp_path / "checkpoint.pt").is_file()
    resumed = _fresh_supernet(TinySpace)
    second = train_supernet(resumed, digits, config, run_dir=tmp_path)  # the same command again
    assert second.epochs_run == 2 and not second.stopped and second.train_loss == result.train_loss
    state = straight.state_dict()
    assert all(torch.equal(v, state[k]) for k, v in resumed.state_dict().items())
    assert load_supernet(tmp_path / "supernet.pt").progress["train_loss"] == result.train_loss


def test_a_checkpoint_of_another_supernet_or_run_is_refused(trained, digits, tmp_path):
    state = torch.load(trained[3] / "checkpoint.pt", weights_only=True)
    config = _tiny_config(epochs=1, val_calib_images=0)
    torch.save({**state, "space": "mobile_imagenet"}, tmp_path / "checkpoint.pt")
    with pytest.raises(DynasError, match=r"checkpoint .* is of another supernet: `space` must be 'mobile_cifar'.*"
                                         r"space='mobile_imagenet'"):
        train_supernet(_fresh_supernet(), digits, config, run_dir=tmp_path)
    torch.save({**state, "kernel_bank": "independent"}, tmp_path / "checkpoint.pt")
    with pytest.raises(DynasError, match=r"`kernel_bank` must be 'residual'.*kernel_bank='independent'; to go on with it, use --kernel-bank independent"):
        train_supernet(_fresh_supernet(), digits, config, run_dir=tmp_path)
    torch.save({**state, "total_steps": 99}, tmp_path / "checkpoint.pt")
    with pytest.raises(DynasError, match=r"total_steps=99, but this run has 1"):
        train_supernet(_fresh_supernet(), digits, config, run_dir=tmp_path)
    (tmp_path / "checkpoint.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(DynasError, match=r"supernet checkpoint .* cannot be read as a torch file"):
        train_supernet(_fresh_supernet(), digits, config, run_dir=tmp_path)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, run_dir: str) -> None:
    """One torchrun-like process: the environment torchrun sets, then train_supernet."""
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    torch.set_num_threads(1)
    torch.manual_seed(100 + rank)  # different inits: DDP must broadcast process 0's
    net = Supernet(TinySpace(input_size=SIZE))
    data = load_data("digits", input_size=SIZE, train_subset=96)
    config = _tiny_config(epochs=1, steps=2, val_calib_images=0)
    result = train_supernet(net, data, config, run_dir=run_dir)
    torch.save({"state": net.state_dict(), "world_size": result.world_size}, Path(run_dir) / f"rank{rank}.pt")


def test_ddp_with_two_gloo_processes_keeps_them_in_step(tmp_path):
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    a, b = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert a["world_size"] == b["world_size"] == 2
    # Parameters: gradients were reduced; BN statistics: process 0's were kept.
    assert all(torch.equal(v, b["state"][k]) for k, v in a["state"].items())
    torch.manual_seed(100)
    init = Supernet(TinySpace(input_size=SIZE)).state_dict()
    assert any(not torch.equal(v, init[k]) for k, v in a["state"].items())  # and it trained
    assert load_supernet(tmp_path / "supernet.pt").progress["world_size"] == 2


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("space", "match"),
    [
        (MobileImageNetSpace(input_size=SIZE, num_classes=10), r"`space` must be 'mobile_imagenet'.*space='mobile_cifar'"),
        (MobileCifarSpace(input_size=32), r"`input_size` must be 32 .*input_size=16"),
        (MobileCifarSpace(input_size=SIZE, num_classes=100), r"`num_classes` must be 100 .*num_classes=10"),
    ],
)
def test_a_supernet_file_of_another_space_size_or_class_count_is_refused(supernet, tmp_path, space, match):
    path = supernet.save(tmp_path / "supernet.pt")
    with pytest.raises(DynasError, match=r"supernet file .*supernet.pt' is of another supernet: " + match):
        load_supernet(path, space=space)


def test_truncated_foreign_or_missing_files_are_refused(supernet, tmp_path):
    path = supernet.save(tmp_path / "supernet.pt")
    data = path.read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(DynasError, match=r"supernet file .*cut.pt' cannot be read as a torch file"):
        load_supernet(tmp_path / "cut.pt")
    torch.save({"state_dict": {}, "arch": {}}, tmp_path / "model.pt")
    with pytest.raises(DynasError, match=r"model.pt' is not a dynas supernet: `format` must be 'dynas-supernet', "
                                         r"but it holds format=None"):
        load_supernet(tmp_path / "model.pt")
    torch.save(torch.zeros(3), tmp_path / "tensor.pt")
    with pytest.raises(DynasError, match=r"tensor.pt' is not a dynas supernet: .*but it holds a Tensor"):
        load_supernet(tmp_path / "tensor.pt")
    torch.save(nn.Linear(2, 2), tmp_path / "pickle.pt")  # a pickled module: weights_only refuses it
    with pytest.raises(DynasError, match=r"pickle.pt' cannot be read as a torch file"):
        load_supernet(tmp_path / "pickle.pt")
    with pytest.raises(DynasError, match=r"supernet file .*absent.pt' does not exist"):
        load_supernet(tmp_path / "absent.pt")


def _with_block(arch: ArchSpec, stage: int, block: int, **changes) -> ArchSpec:
    stages = list(arch.stages)
    blocks = list(stages[stage].blocks)
    blocks[block] = dataclasses.replace(blocks[block], **changes)
    stages[stage] = dataclasses.replace(stages[stage], blocks=tuple(blocks))
    return dataclasses.replace(arch, stages=tuple(stages))


def _bad_archs() -> list[tuple[object, str]]:
    base = _space().sample(seed=4).arch
    three_blocks = dataclasses.replace(base.stages[0], blocks=base.stages[0].blocks[:1] * 3)
    return [
        (_with_block(base, 0, 0, kernel_size=9), r"`s1_b1_kernel` must be one of \(3, 5, 7\), but got s1_b1_kernel=9"),
        (_with_block(base, 1, 0, num_kernels=3), r"`s2_b1_num_kernels` must be one of \(2, 4, 6, 8\), but got s2_b1_num_kernels=3"),
        (_with_block(base, 2, 0, expansion=5.0), r"`s3_b1_expansion` must be one of \(3.0, 4.0, 6.0\), but got s3_b1_expansion=5.0"),
        (_with_block(base, 0, 0, activation="hswish"), r"block s1_b1's `activation` must be 'relu6', but got activation='hswish'"),
        (_with_block(base, 0, 0, out_channels=24), r"channels \(stem, stages, head\) .* match no `width` of \(0.5, 0.75, 1.0\)"),
        (dataclasses.replace(base, stages=(three_blocks, *base.stages[1:])), r"`s1_depth` must be one of \(1, 2\), but got s1_depth=3"),
        (dataclasses.replace(base, stages=base.stages[:4]), r"it must have 5 stages, but got 4"),
        (dataclasses.replace(base, num_classes=100), r"`num_classes` must be 10, but got num_classes=100"),
        (dataclasses.replace(base, dropout=0.1), r"`dropout` must be 0.2, but got dropout=0.1"),
        ({"width": 0.6}, r"params is not a subnet .*`width` must be one of \(0.5, 0.75, 1.0\), but got width=0.6"),
        ({"widht": 0.5}, r"unknown label 'widht' .* Did you mean 'width'"),
    ]


@pytest.mark.parametrize(("arch", "match"), _bad_archs())
def test_an_arch_outside_the_supernets_choices_is_refused(supernet, arch, match):
    with pytest.raises(DynasError, match=match):
        supernet.extract(arch)
    with pytest.raises(DynasError, match=match):
        with supernet.activate(arch):
            pass


def test_data_that_does_not_fit_the_supernet_is_refused(supernet, digits):
    wide = load_data("digits", input_size=32, train_subset=32)
    with pytest.raises(DynasError, match=r"data 'digits' does not fit the 'mobile_cifar' supernet: `input_size` must be 16, but the data has input_size=32"):
        score_subnet(supernet, supernet.smallest, wide)
    with pytest.raises(DynasError, match=r"`input_size` must be 16"):
        train_supernet(_fresh_supernet(), wide, _tiny_config())
    with pytest.raises(DynasError, match=r"`split` must be one of \('train', 'val', 'test'\), but got 'vla'"):
        score_subnet(supernet, supernet.smallest, digits, split="vla")
    with pytest.raises(DynasError, match=r"`num_images` must be an integer >= 2, but got num_images=1"):
        score_subnet(supernet, supernet.smallest, digits, calib_images=1)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_random": -1}, r"`num_random` must be an integer >= 0, but got num_random=-1"),
        ({"val_calib_images": 1}, r"`val_calib_images` must be 0 \(no validation\) or >= 2"),
        ({"distill": "yes"}, r"`distill` must be a bool, but got distill='yes'"),
        ({"train": {"epochs": 1}}, r"`train` must be a TrainConfig"),
    ],
)
def test_bad_training_settings_are_refused(kwargs, match):
    with pytest.raises(DynasError, match=match):
        SupernetTrainConfig(**kwargs)


# ----------------------------------------------------------------------------- the ranking experiment


def _ranking():
    import importlib.util
    import sys

    path = Path(__file__).resolve().parents[1] / "experiments" / "supernet_ranking.py"
    if str(path.parent) not in sys.path:  # as `python experiments/supernet_ranking.py` does: _args imports
        sys.path.insert(0, str(path.parent))
    spec = importlib.util.spec_from_file_location("experiments_supernet_ranking", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def test_kendall_tau_b_counts_pairs_and_ties():
    tau = _ranking().kendall_tau
    assert tau([1, 2, 3, 4], [10, 20, 30, 40]) == 1.0 and tau([1, 2, 3], [3, 2, 1]) == -1.0
    assert tau([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(4 / 6)
    assert tau([1, 1, 2], [1, 2, 3]) == pytest.approx(2 / math.sqrt(2 * 3))  # tau-b: ties shrink the denominator
    assert math.isnan(tau([1, 1], [1, 2])) and math.isnan(tau([1], [2]))


def test_the_bootstrap_interval_of_tau_brackets_it_and_narrows_with_more_subnets():
    ranking = _ranking()
    interval = ranking.kendall_tau_interval
    assert interval(list(range(8)), list(range(8))) == (1.0, 1.0)  # every resample agrees perfectly
    assert interval(list(range(8)), list(range(8, 0, -1))) == (-1.0, -1.0)
    rng = random.Random(0)
    def noisy(n):  # a true order seen through noise
        x = [float(i) for i in range(n)]
        return x, [v + rng.gauss(0, n / 3) for v in x]
    small, large = noisy(16), noisy(128)
    lo16, hi16 = interval(*small)
    lo128, hi128 = interval(*large)
    assert lo16 < ranking.kendall_tau(*small) < hi16 and lo128 < ranking.kendall_tau(*large) < hi128
    assert hi128 - lo128 < (hi16 - lo16) / 2  # about 1 / sqrt(n)
    assert interval(*small) == interval(*small) != interval(*small, seed=1)  # seeded
    assert all(math.isnan(v) for v in interval([1, 1], [1, 2]))


def test_subnets_are_stratified_over_the_mac_band_by_kind():
    ranking = _ranking()
    band = ranking.parse_band("0.8M:2.5M")
    subnets = ranking.sample_in_band(_space(), band, num_subnets=8, strata=2, seed=3)
    assert len({s.arch for s in subnets}) == 8
    for s in subnets:
        assert band[0] <= closed_form_macs(s.arch) == s.macs < band[1]
        assert (s.kind == "dynamic") == any(b.is_dynamic for b in s.arch.blocks)
        assert s.stratum == (s.macs - band[0]) * 2 // (band[1] - band[0])
    cells = [(s.stratum, s.kind) for s in subnets]
    assert sorted(set(cells)) == [(0, "dynamic"), (0, "static"), (1, "dynamic"), (1, "static")]
    assert all(cells.count(c) == 2 for c in set(cells))


def test_twins_are_one_draw_with_and_without_its_dynamic_blocks():
    ranking = _ranking()
    subnets = ranking.sample_in_band(_space(), ranking.parse_band("0.8M:2.5M"), num_subnets=16, strata=2, seed=0)
    pairs = ranking.twins(subnets)
    assert pairs and len(pairs) <= 8
    assert [s.macs for s, _ in pairs] == sorted(s.macs for s, _ in pairs)
    for static, dynamic in pairs:
        assert (static.kind, dynamic.kind) == ("static", "dynamic") and static.draw == dynamic.draw >= 0
        made_static = [dataclasses.replace(b, num_kernels=1) for b in dynamic.arch.blocks]
        assert list(static.arch.blocks) == made_static and static.arch.head_num_kernels == 1
        same_rest = dataclasses.replace(dynamic.arch, stages=static.arch.stages, head_num_kernels=1)
        assert same_rest == static.arch  # stem, widths, head: the one draw
    # A subnet whose draw's other half fell outside the band (or its quota) has no twin.
    paired = {s.arch for pair in pairs for s in pair}
    assert all(s.draw not in {p.draw for p, _ in pairs} for s in subnets if s.arch not in paired)
    assert ranking.twins([s for s in subnets if s.kind == "static"]) == []


def test_standalone_runs_are_scored_after_bn_recalibration_and_reruns_skip_them(digits, tmp_path):
    ranking = _ranking()
    subnet = ranking.sample_in_band(_space(), ranking.parse_band("0.8M:2.5M"), 2, 1, seed=0)[0]
    recipe = TrainConfig(epochs=1, batch_size=16, max_steps_per_epoch=2, warmup_epochs=0.0, quiet=True, device="cpu")
    path = tmp_path / "standalone.jsonl"
    path.write_text(json.dumps({"arch": subnet.arch.to_str(), "seed": 0, "top1": 50.0, "seconds": 1.0}) + "\n")
    done = ranking._standalone([subnet], digits, recipe, 1, path, calib_images=32, seed=0, setting={"calib_images": 32})
    row = done[(subnet.arch.to_str(), 0)]
    assert set(row) == {"top1", "top1_raw", "seconds", "train_top1", "final_loss", "min_attention_entropy"} and row["top1"] != 50.0  # the old raw-only row retrained
    assert ranking._standalone([subnet], digits, recipe, 1, path, calib_images=32, seed=0, setting={"calib_images": 32}) == done  # read back
    assert len(path.read_text().splitlines()) == 2
    # another calibration (or recipe) is another measurement: trained again, the first row kept
    other = ranking._standalone([subnet], digits, recipe, 1, path, calib_images=48, seed=0, setting={"calib_images": 48})
    assert len(path.read_text().splitlines()) == 3
    assert ranking._standalone([subnet], digits, recipe, 1, path, calib_images=48, seed=0, setting={"calib_images": 48}) == other
    assert ranking._standalone([subnet], digits, recipe, 1, path, calib_images=32, seed=0, setting={"calib_images": 32}) == done
    assert len(path.read_text().splitlines()) == 3


def test_the_summary_gives_the_twins_gap_in_the_supernet_and_stand_alone():
    ranking = _ranking()

    def row(kind, draw, supernet, standalone, macs):
        return {"kind": kind, "draw": draw, "macs": macs, "supernet_top1": supernet, "standalone_top1": [standalone] * 2,
                "standalone_top1_mean": standalone, "score_seconds": 1.0, "standalone_seconds": [2.0, 2.0]}

    rows = [row("static", 0, 40.0, 45.0, 1), row("dynamic", 0, 41.0, 44.0, 2), row("static", 3, 38.0, 42.0, 3),
            row("dynamic", 3, 35.0, 41.0, 4), row("dynamic", 5, 39.0, 43.0, 5)]  # draw 5: no static twin
    summary = ranking._summary(rows, seeds=2, supernet_seconds=10.0)
    assert summary["twins"] == 2
    assert summary["twin_gap_supernet"] == pytest.approx((1.0 - 3.0) / 2)
    assert summary["twin_gap_standalone"] == pytest.approx((-1.0 - 1.0) / 2)
    old = ranking._summary([{k: v for k, v in r.items() if k != "draw"} for r in rows], seeds=2, supernet_seconds=1.0)
    assert old["twins"] == 0 and math.isnan(old["twin_gap_supernet"])  # rows from before draws were kept


def test_standalone_setting_holds_what_a_result_depends_on():
    ranking = _ranking()
    args = ranking.build_parser().parse_args(["--epochs", "7", "--calib-images", "99"])
    setting = ranking.standalone_setting(args)
    assert setting["epochs"] == 7 and setting["calib_images"] == 99
    assert {"supernet_epochs", "num_random", "num_threads", "out"}.isdisjoint(setting)  # not the stand-alone runs'
    json.dumps(setting)


def test_the_supernet_may_anneal_over_its_own_share_and_the_standalone_truth_is_kept():
    ranking = _ranking()
    parser = ranking.build_parser()
    base = ranking.build_parser().parse_args(["--anneal-fraction", "1.0"])
    args = parser.parse_args(["--anneal-fraction", "1.0", "--supernet-anneal-fraction", "0.8"])
    supernet, recipe = ranking._configs(args)
    assert supernet.train.anneal_fraction == 0.8 and recipe.anneal_fraction == 1.0
    assert ranking.standalone_setting(args) == ranking.standalone_setting(base)  # the truth's rows are reused
    assert ranking._configs(base)[0].train.anneal_fraction == 1.0  # unset: the stand-alone runs' share


def test_a_supernet_seed_changes_the_supernet_not_the_truth():
    ranking = _ranking()
    base = ranking.build_parser().parse_args(["--seed", "3"])
    args = ranking.build_parser().parse_args(["--seed", "3", "--supernet-seed", "7", "--largest-static"])
    (supernet, recipe), (base_supernet, base_recipe) = ranking._configs(args), ranking._configs(base)
    assert (supernet.train.seed, base_supernet.train.seed, recipe.seed) == (7, 3, 3) and recipe == base_recipe
    assert supernet.largest_static and not base_supernet.largest_static
    assert ranking.standalone_setting(args) == ranking.standalone_setting(base)  # the same rows score both


def test_the_ops_space_is_stratified_too_its_static_subnets_all_static():
    ranking = _ranking()
    subnets = ranking.sample_in_band(MobileCifarOpsSpace(input_size=SIZE), ranking.parse_band("0.8M:2.5M"), 4, 2, seed=1)
    kinds = {s.kind for s in subnets}
    assert kinds == {"static", "dynamic"}
    for s in subnets:
        ops = {b.op if b.is_dynamic else "static" for b in s.arch.blocks}
        assert (ops == {"static"}) == (s.kind == "static")


@pytest.mark.parametrize(
    ("text", "match"),
    [("15M:5M", r"LOW < HIGH, such as 5M:15M, but got '15M:5M'"), ("5M", r"LOW:HIGH MACs"), ("5Q:9M", r"expected a count")],
)
def test_a_bad_mac_band_is_refused(text, match):
    with pytest.raises(DynasError, match=match):
        _ranking().parse_band(text)


def test_a_band_the_space_cannot_fill_is_refused():
    with pytest.raises(DynasError, match=r"`--mac-band` 100:200 is barely reached by 'mobile_cifar': after 5 draws"):
        _ranking().sample_in_band(_space(), (100, 200), 4, 2, max_draws=5)


def test_shards_split_the_standalone_runs_and_each_reads_the_others(digits, tmp_path):
    ranking = _ranking()
    subnets = ranking.sample_in_band(_space(), ranking.parse_band("0.8M:2.5M"), 2, 1, seed=0)
    recipe = TrainConfig(epochs=1, batch_size=16, max_steps_per_epoch=1, warmup_epochs=0.0, quiet=True, device="cpu")
    path, setting = tmp_path / "standalone.jsonl", {"calib_images": 16}
    first = ranking._standalone(subnets, digits, recipe, 2, path, 16, 0, setting, shard=(0, 2))
    # positions 0 and 2 of (subnet, seed) order: every subnet's seed 0, no seed 1
    assert sorted(first) == sorted((s.arch.to_str(), 0) for s in subnets)
    both = ranking._standalone(subnets, digits, recipe, 2, path, 16, 0, setting, shard=(1, 2))
    assert len(both) == 4 and {k: both[k] for k in first} == first  # shard 1 trained seed 1 and read shard 0's rows
    assert len(path.read_text().splitlines()) == 4
    assert ranking._standalone(subnets, digits, recipe, 2, path, 16, 0, setting) == both  # nothing left to train
    assert len(path.read_text().splitlines()) == 4


@pytest.mark.parametrize("text", ["2/2", "-1/2", "1", "a/b", "0/0"])
def test_a_bad_shard_is_refused(text):
    with pytest.raises(DynasError, match=rf"`--shard` must be I/N with 0 <= I < N, such as 0/2, but got '{re.escape(text)}'"):
        _ranking().parse_shard(text)
    assert _ranking().parse_shard("1/3") == (1, 3)


def test_the_scratch_proxy_is_ranked_one_run_per_subnet_against_the_truth():
    rows = [
        {"kind": kind, "macs": i, "supernet_top1": float(i), "score_seconds": 1.0, "standalone_top1": [t, t],
         "standalone_top1_mean": t, "standalone_seconds": [10.0, 10.0], "proxy_top1": list(p), "proxy_seconds": [2.0, 4.0]}
        for i, (kind, t, p) in enumerate([
            ("static", 50.0, (1, 3)), ("static", 60.0, (2, 1)), ("dynamic", 70.0, (3, 4)), ("dynamic", 80.0, (4, 2)),
        ])
    ]
    summary = _ranking()._summary(rows, seeds=2, supernet_seconds=0.0)
    tau = _ranking().kendall_tau
    truth = [50, 60, 70, 80]
    assert summary["kendall_tau_proxy"] == pytest.approx((tau([1, 2, 3, 4], truth) + tau([3, 1, 4, 2], truth)) / 2)
    assert summary["kendall_tau_proxy"] == pytest.approx(0.5)  # seed 0 orders all 6 pairs, seed 1 nets 0
    assert summary["kendall_tau_proxy_static"] == pytest.approx(0.0)  # +1 and -1
    assert summary["kendall_tau_proxy_dynamic"] == pytest.approx(0.0)
    assert summary["kendall_tau_proxy_across"] == pytest.approx((1.0 + 0.5) / 2)  # seed 1: 3 of 4 cross pairs
    assert summary["seconds_per_proxy_training"] == pytest.approx(3.0)
    assert summary["kendall_tau_supernet"] == 1.0 and summary["kendall_tau_supernet_interval"] == [1.0, 1.0]
    assert "kendall_tau_proxy" not in _ranking()._summary([{k: v for k, v in r.items() if not k.startswith("proxy")}
                                                           for r in rows], seeds=2, supernet_seconds=0.0)


def test_across_kind_tau_counts_only_static_against_mixed_pairs_and_the_offset_is_the_kind_bias():
    ranking = _ranking()
    kinds = ["static", "static", "dynamic", "dynamic"]
    truth = [50.0, 60.0, 55.0, 65.0]
    # within each kind the order is right; across, (s60, d55) is swapped: 3 of 4 cross pairs agree
    supernet = [40.0, 41.0, 42.0, 45.0]
    assert ranking.kendall_tau_across(supernet, truth, kinds) == pytest.approx(0.5)
    assert ranking.kendall_tau_across(truth, truth, kinds) == 1.0
    assert math.isnan(ranking.kendall_tau_across(supernet, truth, ["static"] * 4))  # no cross pair
    with pytest.raises(ValueError, match="same length"):
        ranking.kendall_tau_across(supernet, truth, kinds[:3])
    rows = [
        {"kind": k, "macs": i, "supernet_top1": sn, "score_seconds": 1.0, "standalone_top1": [t, t],
         "standalone_top1_mean": t, "standalone_seconds": [10.0, 10.0]}
        for i, (k, t, sn) in enumerate(zip(kinds, truth, supernet))
    ]
    summary = ranking._summary(rows, seeds=2, supernet_seconds=0.0)
    assert summary["kendall_tau_supernet_across"] == pytest.approx(0.5)
    assert summary["kendall_tau_supernet_static"] == summary["kendall_tau_supernet_dynamic"] == 1.0
    # static: 40-50, 41-60 -> -14.5 on average; dynamic: 42-55, 45-65 -> -16.5; mixed favoured by -2
    assert summary["dynamic_offset_points"] == pytest.approx(-2.0)
    assert "favours mixed subnets by -2.00 points" in ranking._report(summary, (1, 2))


@pytest.mark.parametrize("proxy", ["0", "6", "9"])
def test_a_proxy_as_long_as_the_truth_is_refused(proxy, tmp_path):
    with pytest.raises(DynasError, match=rf"`--proxy-epochs` must be an integer in \[1, --epochs\).*got proxy_epochs={proxy}\."):
        _ranking().main(["--dataset", "digits", "--epochs", "6", "--proxy-epochs", proxy, "--out", str(tmp_path / "o")])
    assert not (tmp_path / "o").exists()


def test_shards_started_together_leave_the_supernet_to_shard_0_and_the_last_writes_the_results(tmp_path, capsys):
    out = tmp_path / "rank"
    argv = ["--dataset", "digits", "--input-size", "16", "--train-subset", "200", "--supernet-epochs", "1",
            "--epochs", "2", "--max-steps-per-epoch", "1", "--batch-size", "16", "--num-subnets", "2", "--strata", "1",
            "--mac-band", "0.8M:2.5M", "--calib-images", "16", "--seeds", "2", "--device", "cpu", "--quiet",
            "--kernel-bank", "independent", "--no-zero-init-residual", "--out", str(out)]
    assert _ranking().main([*argv, "--shard", "1/2"]) == 0  # seed 1 of each subnet; no supernet yet
    assert "left to the other shards" in capsys.readouterr().out
    assert not (out / "supernet").exists() and not (out / "summary.json").exists()
    assert len((out / "standalone.jsonl").read_text().splitlines()) == 2
    assert _ranking().main([*argv, "--shard", "0/2"]) == 0  # the supernet, seed 0, then the results
    assert load_supernet(out / "supernet" / "supernet.pt").kernel_bank == "independent"  # as asked
    assert len((out / "results.jsonl").read_text().splitlines()) == 2
    assert len((out / "standalone.jsonl").read_text().splitlines()) == 4
    def no_nan(constant):
        raise AssertionError(f"summary.json is not strict JSON: {constant}")
    summary = json.loads((out / "summary.json").read_text(), parse_constant=no_nan)  # NaN (2 subnets) written null
    assert len(summary["kendall_tau_supernet_interval"]) == 2
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert {r["score_calib_images"] for r in rows} == {16}
    standalone = (out / "standalone.jsonl").read_text()
    # scoring the trained supernet again at another calibration count keeps the stand-alone rows
    assert _ranking().main([*argv, "--score-calib-images", "8"]) == 0
    assert (out / "standalone.jsonl").read_text() == standalone
    again = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert {r["score_calib_images"] for r in again} == {8}
    assert [r["standalone_top1"] for r in again] == [r["standalone_top1"] for r in rows]


def test_a_row_cut_short_by_a_killed_write_is_trained_again_and_the_rest_kept(digits, tmp_path):
    ranking = _ranking()
    subnets = ranking.sample_in_band(_space(), ranking.parse_band("0.8M:2.5M"), 2, 1, seed=0)
    recipe = TrainConfig(epochs=1, batch_size=16, max_steps_per_epoch=1, warmup_epochs=0.0, quiet=True, device="cpu")
    path, setting = tmp_path / "standalone.jsonl", {"calib_images": 16}
    done = ranking._standalone(subnets, digits, recipe, 1, path, 16, 0, setting)
    lines = path.read_text().splitlines()
    path.write_text(lines[0] + "\n" + lines[1][: len(lines[1]) // 2])  # the second row half written
    again = ranking._standalone(subnets, digits, recipe, 1, path, 16, 0, setting)
    assert again[(subnets[0].arch.to_str(), 0)] == done[(subnets[0].arch.to_str(), 0)]  # kept, not retrained
    text = path.read_text().splitlines()
    assert len(text) == 3 and text[0] == lines[0] and json.loads(text[2])["arch"] == subnets[1].arch.to_str()
    assert ranking._standalone(subnets, digits, recipe, 1, path, 16, 0, setting) == again  # all read back


def test_supernet_objective_of_several_supernets_scores_their_mean(supernet, digits):
    from dynas.study import supernet_objective

    torch.manual_seed(1)
    other = Supernet(_space())
    _randomize(other, seed=1)
    other.temperature = 1.0
    other.eval()
    arch = _space().largest()
    alone = [score_subnet(net, arch, digits, calib_images=32, seed=0, device="cpu").top1 for net in (supernet, other)]
    both = supernet_objective([supernet, other], digits, calib_images=32, device="cpu")(arch, None)
    assert alone[0] != alone[1] and both == pytest.approx(sum(alone) / 2)
    with pytest.raises(DynasError, match="a non-empty list of them, but got an empty list"):
        supernet_objective([], digits)
    with pytest.raises(TypeError, match="item 1 is str"):
        supernet_objective([supernet, "b.pt"], digits)
    wide = Supernet(MobileCifarSpace(input_size=24))
    with pytest.raises(DynasError, match=r"supernet 1 is of \('mobile_cifar', 24, 10, 3\) and supernet 0 of \('mobile_cifar', 16"):
        supernet_objective([supernet, wide], digits)
