from __future__ import annotations

import dataclasses
import json
import random
from fractions import Fraction

import pytest

from dynas.errors import DynasError
from dynas.spec import FORMAT_VERSION, ArchSpec, BlockSpec, StageSpec, make_divisible


def _arch(**overrides) -> ArchSpec:
    stages = (
        StageSpec((BlockSpec(3, 1, 16),)),
        StageSpec((BlockSpec(5, 6, 24, 2, True, "hswish", 4, "all"), BlockSpec(3, 4.5, 24))),
    )
    fields = dict(stem_channels=16, stages=stages, head_channels=320, stem_stride=1, num_classes=10, input_size=32)
    return ArchSpec(**{**fields, **overrides})


# ----------------------------------------------------------------------------- make_divisible


@pytest.mark.parametrize(
    "v,kwargs,expected",
    [
        (32 * 0.35, {}, 16),  # 8 would drop more than 10% of 11.2
        (16 * 0.35, {}, 8),
        (88.0, {}, 88),
        (1280 * 0.75, {}, 960),
        (1280 * 1.4, {}, 1792),
        (10, {}, 16),
        (12, {}, 16),  # rounds half up
        (3, {}, 8),  # never below divisor
        (3, {"min_value": 4, "divisor": 4}, 4),
        (100, {"divisor": 1}, 100),
    ],
)
def test_make_divisible(v, kwargs, expected):
    assert make_divisible(v, **kwargs) == expected


def test_make_divisible_never_below_90_percent():
    for v in range(1, 2000):
        out = make_divisible(v * 0.37)
        assert out % 8 == 0 and out >= 0.9 * v * 0.37


@pytest.mark.parametrize(
    "v,kwargs,match",
    [
        (0, {}, r"`v` must be a finite number > 0, but got v=0"),
        (float("nan"), {}, r"`v` must be a finite number > 0, but got v=nan"),
        (8, {"divisor": 0}, r"`divisor` must be an integer >= 1, but got divisor=0"),
    ],
)
def test_make_divisible_rejects(v, kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_divisible(v, **kwargs)


# ----------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(kernel_size=4), ValueError, r"`kernel_size` must be odd and in 1\.\.9, but got kernel_size=4\."),
        (dict(kernel_size=11), ValueError, r"`kernel_size` must be odd and in 1\.\.9, but got kernel_size=11\."),
        (dict(expansion=0.5), ValueError, r"`expansion` must be >= 1, but got expansion=0\.5\."),
        (dict(expansion="6"), TypeError, r"`expansion` must be a finite number, but got expansion='6'\."),
        (dict(expansion=float("inf")), TypeError, r"`expansion` must be a finite number, but got expansion=inf\."),
        (dict(out_channels=0), ValueError, r"`out_channels` must be an integer >= 1, but got out_channels=0\."),
        (dict(stride=3), ValueError, r"`stride` must be 1 or 2, but got stride=3\."),
        (dict(se=1), TypeError, r"`se` must be a bool, but got se=1\."),
        (dict(activation="swish"), ValueError, r"`activation` must be one of .*swish'\. Did you mean 'hswish'\?"),
        (dict(num_kernels=0), ValueError, r"`num_kernels` must be an integer >= 1, but got num_kernels=0\."),
        (dict(num_kernels=True), ValueError, r"`num_kernels` must be an integer >= 1, but got num_kernels=True\."),
        (dict(dynamic_convs="dw"), ValueError, r"`dynamic_convs` must be one of \('pw', 'all'\), but got dynamic_convs='dw'"),
    ],
)
def test_block_validation(kwargs, error, match):
    fields = dict(kernel_size=3, expansion=6, out_channels=24)
    with pytest.raises(error, match=match):
        BlockSpec(**{**fields, **kwargs})


@pytest.mark.parametrize(
    "blocks,error,match",
    [
        ((), ValueError, r"`blocks` must hold at least one BlockSpec, but got blocks=\(\)\."),
        ("k3", TypeError, r"`blocks` must be a tuple of BlockSpec, but got blocks='k3'\."),
        ((BlockSpec(3, 6, 8), {"kernel_size": 3}), TypeError, r"`blocks\[1\]` must be a BlockSpec, but got dict"),
    ],
)
def test_stage_validation(blocks, error, match):
    with pytest.raises(error, match=match):
        StageSpec(blocks)


@pytest.mark.parametrize(
    "overrides,error,match",
    [
        (dict(stem_channels=0), ValueError, r"`stem_channels` must be an integer >= 1, but got stem_channels=0\."),
        (dict(head_channels=-1), ValueError, r"`head_channels` must be an integer >= 1, but got head_channels=-1\."),
        (dict(num_classes=0), ValueError, r"`num_classes` must be an integer >= 1, but got num_classes=0\."),
        (dict(input_size=2.5), ValueError, r"`input_size` must be an integer >= 1, but got input_size=2\.5\."),
        (dict(in_channels=0), ValueError, r"`in_channels` must be an integer >= 1, but got in_channels=0\."),
        (dict(head_num_kernels=0), ValueError, r"`head_num_kernels` must be an integer >= 1"),
        (dict(attention_reduction=0), ValueError, r"`attention_reduction` must be an integer >= 1"),
        (dict(attention_min_hidden=0), ValueError, r"`attention_min_hidden` must be an integer >= 1"),
        (dict(head_hidden=-1), ValueError, r"`head_hidden` must be an integer >= 0, but got head_hidden=-1\."),
        (dict(stem_stride=4), ValueError, r"`stem_stride` must be 1 or 2, but got stem_stride=4\."),
        (dict(stem_activation="gelu"), ValueError, r"`stem_activation` must be one of .* but got stem_activation='gelu'"),
        (dict(head_activation="hswsh"), ValueError, r"head_activation='hswsh'\. Did you mean 'hswish'\?"),
        (dict(dropout=1.0), ValueError, r"`dropout` must lie in \[0, 1\), but got dropout=1\.0\."),
        (dict(dropout=None), TypeError, r"`dropout` must be a finite number, but got dropout=None\."),
        (dict(stages=()), ValueError, r"`stages` must hold at least one StageSpec, but got stages=\(\)\."),
        (dict(stages="s"), TypeError, r"`stages` must be a tuple of StageSpec, but got stages='s'\."),
        (dict(stages=(BlockSpec(3, 6, 8),)), TypeError, r"`stages\[0\]` must be a StageSpec, but got BlockSpec"),
    ],
)
def test_arch_validation(overrides, error, match):
    with pytest.raises(error, match=match):
        _arch(**overrides)


def test_normalisation_makes_equal_architectures_equal():
    assert BlockSpec(3, 6, 24).expansion == 6.0 and isinstance(BlockSpec(3, 6, 24).expansion, float)
    # dynamic_convs means nothing for a static block
    assert BlockSpec(3, 6, 24, dynamic_convs="all") == BlockSpec(3, 6, 24)
    assert BlockSpec(3, 6, 24, num_kernels=4, dynamic_convs="all") != BlockSpec(3, 6, 24, num_kernels=4)
    assert StageSpec([BlockSpec(3, 6, 24)]) == StageSpec((BlockSpec(3, 6, 24),))
    assert _arch(stages=list(_arch().stages)) == _arch()


def test_equal_specs_hash_equal():
    a, b = _arch(), ArchSpec.from_str(_arch().to_str())
    assert a is not b and a == b and hash(a) == hash(b)
    assert len({a, b, _arch(num_classes=100)}) == 2
    assert _arch() != _arch(dropout=0.1)


def test_specs_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        _arch().num_classes = 3  # type: ignore[misc]


# ----------------------------------------------------------------------------- JSON form


def test_dict_round_trip_through_json():
    arch = _arch(head_hidden=1024, head_num_kernels=4, attention_reduction=8, dropout=0.25)
    data = json.loads(json.dumps(arch.to_dict()))
    assert data["format_version"] == FORMAT_VERSION == 1
    assert data["stages"][1]["blocks"][0]["dynamic_convs"] == "all"
    assert ArchSpec.from_dict(data) == arch
    assert ArchSpec.from_dict(data).to_dict() == arch.to_dict()


def test_old_files_without_optional_keys_still_load():
    data = _arch().to_dict()
    for key in ("format_version", "attention_reduction", "attention_min_hidden", "head_hidden"):
        del data[key]
    del data["stages"][0]["blocks"][0]["dynamic_convs"]
    assert ArchSpec.from_dict(data) == _arch()


@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda d: d.update(stem_chanels=16), r"unknown key 'stem_chanels' in an arch spec\. Did you mean 'stem_channels'\?"),
        (lambda d: d.pop("head_channels"), r"an arch spec is missing the required key\(s\) 'head_channels'"),
        (lambda d: d.update(format_version=2), r"`format_version` must be an integer in 1\.\.1 .* but got format_version=2\."),
        (lambda d: d["stages"][0]["blocks"][0].update(kernal_size=3), r"unknown key 'kernal_size' in a block\. Did you mean 'kernel_size'\?"),
        (lambda d: d["stages"][0].update(block=[]), r"unknown key 'block' in a stage\. Did you mean 'blocks'\?"),
        (lambda d: d.update(stages={"a": 1}), r"an arch spec's `stages` must be a list"),
        (lambda d: d.update(dropout=2.0), r"invalid arch spec: `dropout` must lie in \[0, 1\), but got dropout=2\.0\."),
        (lambda d: d["stages"].__setitem__(0, "k3e1c16s1_relu6"), r"a stage must be a JSON object \(dict\), but got str"),
    ],
)
def test_from_dict_rejects(mutate, match):
    data = _arch().to_dict()
    mutate(data)
    with pytest.raises(DynasError, match=match):
        ArchSpec.from_dict(data)


# ----------------------------------------------------------------------------- string form


def test_block_string_form():
    block = BlockSpec(5, 6, 40, 2, True, "hswish", 4, "pw")
    assert block.to_str() == "k5e6c40s2_hswish_se_dy4pw" == BlockSpec.EXAMPLE
    assert BlockSpec.from_str(block.to_str()) == block
    assert BlockSpec(3, 4.5, 24).to_str() == "k3e4.5c24s1_relu6"  # static: no dy part


def test_arch_string_form_example():
    arch = ArchSpec.from_str(ArchSpec.EXAMPLE)
    assert arch.to_str() == ArchSpec.EXAMPLE
    assert [len(s.blocks) for s in arch.stages] == [1, 2]
    assert arch.stages[1].blocks[0] == BlockSpec(5, 6, 24, 2, True, "relu6", 4, "pw")
    assert (arch.input_size, arch.in_channels, arch.num_classes, arch.dropout) == (32, 3, 10, 0.2)


def test_arch_string_writes_optional_head_tokens():
    arch = _arch(head_hidden=1024, head_num_kernels=4, attention_reduction=8, attention_min_hidden=16, in_channels=1)
    s = arch.to_str()
    assert s.startswith("r32_in1_stem16s1_relu6 / ")
    assert s.endswith(" / head320_relu6_fc1024_dy4_cls10_drop0.2_att8m16")
    assert ArchSpec.from_str(s) == arch


def test_float_fields_round_trip_exactly():
    rng = random.Random(0)
    values = [1 + rng.random() * 9 for _ in range(200)] + [float(Fraction(a, b)) for a in range(8, 97, 7) for b in (3, 7, 24)]
    values = [v for v in values if v >= 1] + [88 / 24, 4.5, 1.0, 6.0, 1e16, 1 / 3 + 1]
    for v in values:
        block = BlockSpec(3, v, 24)
        parsed = BlockSpec.from_str(block.to_str())
        assert parsed.expansion == v and parsed == block, block.to_str()
    for p in [rng.random() * 0.99 for _ in range(100)] + [0.0, 0.2, 1 / 3]:
        arch = _arch(dropout=p)
        assert ArchSpec.from_str(arch.to_str()).dropout == p


@pytest.mark.parametrize(
    "text,match",
    [
        ("k5e6c40s2_relu6_foo", r"unknown, repeated or misplaced token 'foo'.*looks like 'k5e6c40s2_hswish_se_dy4pw'"),
        ("k5e6c40s2_relu6_se_se", r"unknown, repeated or misplaced token 'se'"),
        ("k5e6c40s2_relu6_dy4pw_se", r"unknown, repeated or misplaced token 'se'"),
        ("k5e6c40s2_gelu", r"expected the `activation` token .* but got 'gelu'"),
        ("k5e6c40_relu6", r"expected the `shape` token .* but got 'k5e6c40'"),
        ("k5e6c40s2", r"expected the `activation` token .* but the section ended"),
        ("k5e6c40s2_relu6_dy1pw", r"`dy1` asks for fewer than 2 kernels; leave out the dy token"),
        ("k5e6c40s2_relu6_dy4dw", r"unknown, repeated or misplaced token 'dy4dw'"),
        ("k4e6c40s2_relu6", r"invalid block 'k4e6c40s2_relu6': `kernel_size` must be odd and in 1\.\.9, but got kernel_size=4\."),
        ("k5e0.5c40s2_relu6", r"`expansion` must be >= 1, but got expansion=0\.5\."),
    ],
)
def test_block_from_str_rejects(text, match):
    with pytest.raises(DynasError, match=match):
        BlockSpec.from_str(text)


_STEM, _STAGE, _HEAD = "r32_in3_stem16s1_relu6", "k3e1c16s1_relu6", "head320_relu6_cls10_drop0.2"


@pytest.mark.parametrize(
    "text,match",
    [
        (f"{_STEM} / {_HEAD}", r"at least 3 sections .* but got 2\. A valid arch looks like 'r32_in3_stem16s1"),
        (f"{_STEM} /  / {_HEAD}", r"cannot parse an empty stage"),
        (f"{_STEM} / {_STAGE} / head320_relu6_drop0.2", r"expected the `num_classes` token .* but got 'drop0\.2'"),
        (f"{_STEM} / {_STAGE} / {_HEAD}_bn", r"unknown, repeated or misplaced token 'bn'.*looks like 'head320_relu6_cls10_drop0\.2'"),
        (f"{_STEM} / {_STAGE} / head320_relu6_dy1_cls10_drop0.2", r"the head's `dy` token needs K >= 2"),
        (f"r32_stem16s1_relu6 / {_STAGE} / {_HEAD}", r"expected the `in_channels` token .* but got 'stem16s1'"),
        (f"r32_in3_stem16s3_relu6 / {_STAGE} / {_HEAD}", r"invalid arch string: `stem_stride` must be 1 or 2, but got stem_stride=3\."),
        (f"{_STEM} / {_STAGE} / head320_relu6_cls10_drop1.5", r"`dropout` must lie in \[0, 1\), but got dropout=1\.5\."),
    ],
)
def test_arch_from_str_rejects(text, match):
    with pytest.raises(DynasError, match=match):
        ArchSpec.from_str(text)


def test_blocks_property_flattens_stages():
    assert _arch().blocks == _arch().stages[0].blocks + _arch().stages[1].blocks


# ----------------------------------------------------------------------------- operators (ODConv, DCD)

import hashlib  # noqa: E402

from dynas.spec import OPS, dcd_latent_channels  # noqa: E402


@pytest.mark.parametrize(
    "block,text",
    [
        (BlockSpec(3, 6, 24, 2, op="od", num_kernels=4, dynamic_convs="all"), "k3e6c24s2_relu6_od4all"),
        (BlockSpec(3, 6, 24, op="od", num_kernels=1), "k3e6c24s1_relu6_od1pw"),
        (BlockSpec(5, 6, 40, 2, True, "hswish", op="dcd"), "k5e6c40s2_hswish_se_dcd"),
        (BlockSpec(3, 6, 24, op="dcd", latent=8), "k3e6c24s1_relu6_dcd8"),
        (BlockSpec(3, 6, 24, num_kernels=4), "k3e6c24s1_relu6_dy4pw"),  # DY-conv: unchanged
    ],
)
def test_operator_tokens_round_trip(block, text):
    assert block.to_str() == text and BlockSpec.from_str(text) == block
    assert BlockSpec.from_dict(json.loads(json.dumps(block.to_dict()))) == block
    assert block.is_dynamic


def test_op_is_what_makes_a_k1_block_dynamic():
    assert not BlockSpec(3, 6, 24).is_dynamic and BlockSpec(3, 6, 24, op="od").is_dynamic
    assert BlockSpec(3, 6, 24, op="od", dynamic_convs="all") != BlockSpec(3, 6, 24, op="od")  # not normalised
    assert OPS == ("dy", "od", "dcd")


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(op="cond"), ValueError, r"`op` must be one of \('dy', 'od', 'dcd'\), but got op='cond'"),
        (dict(op="dcd", num_kernels=4), ValueError, r"`num_kernels` must be 1 for op='dcd' .* but got num_kernels=4\."),
        (dict(op="dcd", dynamic_convs="all"), ValueError, r"`dynamic_convs` must be 'pw' for op='dcd' .* but got dynamic_convs='all'\."),
        (dict(latent=8), ValueError, r"`latent` must be 0 unless op='dcd', but got latent=8 with op='dy'\."),
        (dict(op="dcd", latent=-1), ValueError, r"`latent` must be an integer >= 0, but got latent=-1\."),
    ],
)
def test_operator_validation(kwargs, error, match):
    with pytest.raises(error, match=match):
        BlockSpec(3, 6, 24, **kwargs)


@pytest.mark.parametrize(
    "text,match",
    [
        ("k3e6c24s1_relu6_od0all", r"`od0` asks for no kernels; ODConv needs K >= 1"),
        ("k3e6c24s1_relu6_od4", r"unknown, repeated or misplaced token 'od4'"),
        ("k3e6c24s1_relu6_dcd0", r"unknown, repeated or misplaced token 'dcd0'"),
        ("k3e6c24s1_relu6_dcd_se", r"unknown, repeated or misplaced token 'se'"),
        ("k3e6c24s1_relu6_dy4pw_dcd", r"unknown, repeated or misplaced token 'dcd'"),
    ],
)
def test_operator_tokens_reject(text, match):
    with pytest.raises(DynasError, match=match):
        BlockSpec.from_str(text)


@pytest.mark.parametrize("head,op,k", [("head64_relu6_od4_cls10_drop0.2", "od", 4), ("head64_relu6_od1_cls10_drop0.2", "od", 1),
                                       ("head64_relu6_dcd_cls10_drop0.2", "dcd", 1), ("head64_relu6_dy3_cls10_drop0.2", "dy", 3)])
def test_head_operator_tokens_round_trip(head, op, k):
    arch = ArchSpec.from_str(f"r32_in3_stem16s1_relu6 / k3e1c16s1_relu6 / {head}")
    assert (arch.head_op, arch.head_num_kernels, arch.head_is_dynamic) == (op, k, True)
    assert arch.to_str().endswith(head) and ArchSpec.from_dict(json.loads(json.dumps(arch.to_dict()))) == arch


def test_head_operator_validation():
    with pytest.raises(ValueError, match=r"`head_op` must be one of \('dy', 'od', 'dcd'\), but got head_op='odd'"):
        _arch(head_op="odd")
    with pytest.raises(ValueError, match=r"`head_num_kernels` must be 1 for head_op='dcd', but got head_num_kernels=4\."):
        _arch(head_op="dcd", head_num_kernels=4)
    with pytest.raises(DynasError, match=r"the head's `od` token needs K >= 1"):
        ArchSpec.from_str("r32_in3_stem16s1_relu6 / k3e1c16s1_relu6 / head64_relu6_od0_cls10_drop0.2")


def test_dcd_reduction_is_written_only_when_not_the_default():
    arch = _arch(dcd_reduction=8)
    assert arch.to_str().endswith("_drop0.2_dcdsq8")
    assert ArchSpec.from_str(arch.to_str()) == arch and "dcd_reduction" in arch.to_dict()
    assert "dcd_reduction" not in _arch().to_dict() and "_dcdsq" not in _arch().to_str()


# sha256 of (the JSON the previous dynas wrote, sort_keys=True) and of the string, computed with the spec
# before operators existed: a DY-conv or static arch keeps both byte for byte, since a study finds its
# duplicates and interrupted trials by that JSON.
_LEGACY = {
    "test_spec": ("f23a2bcd6623283ec3905888f6b8e565194b084c9a625afc22e21f6b92ae9f91", "f075669f8101ac7a7e26a5ae67214cfdf9606f2bde433aecee78f21a1d8ce12f"),
    "dy_mobilenetv3_small_cifar": ("1f76479bf60aa8c419892d8119153c58a48075730ce5c73d9f1701e6dc7bc078", "754de514b0784b0a9116f7976cdec4dd7e4f30d12df262c1f00f50cbf5755492"),
    "mobilenetv2_050": ("b05aa476b53f46c12445478d70b3f2337a348fd5ab4b6fcecc63815c05ce6930", "b64e7fd5c5ba7f5f510ead7937e036c670c90454fc79e8bff0fd9abb86194bbc"),
    "dy_mobilenetv2_100": ("04b8823dbfebf3677142a547fb7cc41288442bb2e4303c4298fd7f29d5dda051", "d761ae7a2d6b13b024cd5a2c773dcc2375973d1c5024e880f53f1b4946c3fe13"),
}
_LEGACY_SAMPLES = {  # 20 samples (seeds 0-19) of each space, their JSONs joined by newlines
    "mobile_cifar": "3bf46c7314253c067a819d9dd2b75747e861de09b480898b30eb5df0f2a9b7a9",
    "mobile_imagenet": "ae6edb7c81d5b6e667a09dea9bacfea414e59f9f28404c0011ac8866ec6ad0ae",
    "k_tau": "40359a673331afd8bfb37b2b4affdb963a05f2791fddfcd25c7b25d5c9b43e0e",
}


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def test_existing_archs_keep_their_json_and_string_byte_for_byte():
    from dynas.presets import get_preset

    archs = {"test_spec": _arch(head_hidden=1024, head_num_kernels=4, attention_reduction=8, dropout=0.25)}
    archs |= {name: get_preset(name) for name in _LEGACY if name != "test_spec"}
    for name, arch in archs.items():
        text, data = arch.to_str(), json.dumps(arch.to_dict(), sort_keys=True)
        assert (_sha(data), _sha(text)) == _LEGACY[name], name
        assert ArchSpec.from_str(text) == ArchSpec.from_dict(json.loads(data)) == arch


@pytest.mark.parametrize("space_name", list(_LEGACY_SAMPLES))
def test_existing_spaces_samples_keep_their_json(space_name):
    from dynas.spaces import get_space

    space = get_space(space_name)
    archs = [space.sample(seed).arch for seed in range(20)]
    assert _sha("\n".join(json.dumps(a.to_dict(), sort_keys=True) for a in archs)) == _LEGACY_SAMPLES[space_name]
    assert all(ArchSpec.from_str(a.to_str()) == a for a in archs)


def test_dcd_latent_rule():
    assert [dcd_latent_channels(cin, cout) for cin, cout in ((8, 48), (48, 16), (16, 96), (96, 16), (960, 160))] == [4, 8, 8, 8, 40]
