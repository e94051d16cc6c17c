"""create_model / list_models (the timm-style front door) and model files."""

from __future__ import annotations

import json

import pytest
import torch

import dynas
from dynas.errors import DynasError
from dynas.models import create_model, list_models, load_model, save_model
from dynas.presets import cifar_variant, get_preset
from dynas.temperature import current_temperature, set_temperature


def test_list_models_filters_like_fnmatch():
    assert list_models() == sorted(list_models())
    assert list_models("dy_*_cifar") == [n for n in list_models() if n.startswith("dy_") and n.endswith("_cifar")]
    assert "dy_mobilenetv2_050" in list_models("dy_*") and "mobilenetv2_050" not in list_models("dy_*")


@pytest.mark.parametrize(
    "overrides, expected",
    [({}, (32, 10, 3)), ({"num_classes": 100}, (32, 100, 3)), ({"input_size": 48, "in_channels": 1}, (48, 10, 1))],
)
def test_create_model_from_a_preset_name_with_overrides(overrides, expected):
    model = create_model("dy_mobilenetv2_035_cifar", **overrides)
    arch = model.arch
    assert (arch.input_size, arch.num_classes, arch.in_channels) == expected
    out = model(torch.randn(2, arch.in_channels, arch.input_size, arch.input_size))
    assert out.shape == (2, arch.num_classes)


def test_create_model_takes_every_form_of_an_arch(tmp_path):
    arch = cifar_variant(get_preset("dy_mobilenetv2_035"))
    path = tmp_path / "arch.json"
    path.write_text(json.dumps({"arch": arch.to_dict()}), encoding="utf-8")
    for form in (arch, arch.to_str(), str(path), path):
        assert create_model(form).arch == arch


def test_features_head_and_classifier_compose_to_forward():
    model = create_model("dy_mobilenetv3_small_cifar").eval()
    x = torch.randn(2, 3, 32, 32)
    features = model.forward_features(x)
    assert features.shape == (2, model.arch.head_channels, 4, 4)  # total stride 8 in the CIFAR variant
    assert torch.allclose(model.forward_head(features), model(x), atol=1e-6)
    assert model.forward_head(features, pre_logits=True).shape == (2, model.arch.head_hidden)
    assert model.get_classifier() is model.head.classifier
    model.reset_classifier(7)
    assert model(x).shape == (2, 7) and model.arch.num_classes == 7 and model.get_classifier().out_features == 7


def test_model_file_round_trip_and_a_new_classifier(tmp_path):
    model = create_model("dy_mobilenetv2_035_cifar").eval()
    set_temperature(model, 3.0)
    save_model(tmp_path / "model.pt", model, model.arch, 3.0)
    x = torch.randn(2, 3, 32, 32)
    loaded = create_model(tmp_path / "model.pt")
    assert not loaded.training and current_temperature(loaded) == 3.0
    assert torch.allclose(loaded(x), model(x), atol=1e-6)
    assert torch.allclose(load_model(tmp_path / "model.pt")(x), model(x), atol=1e-6)
    five = create_model(tmp_path / "model.pt", num_classes=5)
    assert five(x).shape == (2, 5)
    assert torch.equal(five.stem.conv.weight, model.stem.conv.weight)  # the body's weights are kept
    into = create_model("dy_mobilenetv2_035_cifar", checkpoint_path=tmp_path / "model.pt")
    assert torch.allclose(into(x), model(x), atol=1e-6)


def test_create_model_refuses_bad_inputs(tmp_path):
    with pytest.raises(DynasError, match=r"unknown preset 'mobilenetv2_05'.*Did you mean"):
        create_model("mobilenetv2_05")
    with pytest.raises(DynasError, match=r"arch file .* does not exist"):
        create_model(str(tmp_path / "missing.json"))
    (tmp_path / "bad.json").write_text("{", encoding="utf-8")
    with pytest.raises(DynasError, match=r"is not valid JSON"):
        create_model(str(tmp_path / "bad.json"))
    (tmp_path / "latin.json").write_bytes(b"\xff\xfe{}")
    with pytest.raises(DynasError, match=r"is not UTF-8 text"):
        create_model(str(tmp_path / "latin.json"))
    with pytest.raises(DynasError, match=r"is a folder"):
        create_model(str(tmp_path))
    model = create_model("mobilenetv2_035_cifar")
    save_model(tmp_path / "model.pt", model, model.arch, 1.0)
    with pytest.raises(DynasError, match=r"`checkpoint_path` .* holds the weights of"):
        create_model("dy_mobilenetv2_035_cifar", checkpoint_path=tmp_path / "model.pt")
    (tmp_path / "torn.pt").write_bytes((tmp_path / "model.pt").read_bytes()[:100])
    with pytest.raises(DynasError, match=r"is not a dynas model file"):
        create_model(tmp_path / "torn.pt")
    with pytest.raises(TypeError, match=r"`name_or_arch` must be"):
        create_model(3)


def test_the_package_front_door_names():
    assert dynas.create_model is create_model and dynas.list_models is list_models
    from dynas.study import search

    assert dynas.search is search
