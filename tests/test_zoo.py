"""The report's section-6 networks, user-defined models, and their parameter counts by hand."""

import textwrap
from pathlib import Path

import pytest
import torch

from cnnlab.config import load_config
from cnnlab.errors import UserError
from cnnlab.modelinfo import count_params
from cnnlab.models import get_model
from cnnlab.models.build import build_model


def conv(cin, cout, k):
    return cin * cout * k * k + cout


def linear(n_in, n_out):
    return n_in * n_out + n_out


def residual(cin, cout, shortcut):
    return conv(cin, cout, 3) + conv(cout, cout, 3) + 4 * cout + (conv(cin, cout, 1) if shortcut else 0)


def inception(cin, c1, c2, c3, c4):
    return (conv(cin, c1, 1) + conv(cin, c2[0], 1) + conv(c2[0], c2[1], 3) + conv(cin, c3[0], 1)
            + conv(c3[0], c3[1], 5) + conv(cin, c4, 1))


def nin_block(cin, cout, k):
    return conv(cin, cout, k) + 2 * conv(cout, cout, 1)


CONFIGS = Path(__file__).resolve().parent.parent / "configs"

HAND_COUNTS = {
    "lenet": conv(1, 6, 5) + conv(6, 16, 5) + linear(400, 120) + linear(120, 84) + linear(84, 10),
    "vgg": conv(1, 32, 3) + conv(32, 64, 3) + linear(64 * 7 * 7, 1024) + linear(1024, 512) + linear(512, 10),
    "nin": nin_block(1, 96, 5) + nin_block(96, 256, 3) + nin_block(256, 384, 3) + conv(384, 10, 3),
    "googlenet": conv(1, 64, 7) + conv(64, 64, 1) + conv(64, 192, 3) + sum(inception(*spec) for spec in [
        (192, 64, (96, 128), (16, 32), 32), (256, 128, (128, 192), (32, 96), 64),
        (480, 192, (96, 208), (16, 48), 64), (512, 160, (112, 224), (24, 64), 64),
        (512, 128, (128, 256), (24, 64), 64), (512, 112, (144, 288), (32, 64), 64),
        (528, 256, (160, 320), (32, 128), 128), (832, 256, (160, 320), (32, 128), 128),
        (832, 384, (192, 384), (48, 128), 128)]) + linear(1024, 10),
    "resnet": conv(1, 64, 7) + 2 * 64 + residual(64, 64, False) + residual(64, 128, True) + residual(128, 128, False)
    + residual(128, 256, True) + residual(256, 256, False) + residual(256, 512, True) + residual(512, 512, False)
    + linear(512, 10),
}


@pytest.mark.parametrize("name", HAND_COUNTS)
def test_the_reports_networks_have_the_hand_computed_parameter_counts(name):
    assert count_params(get_model(name)) == HAND_COUNTS[name]


def test_small_image_resnets_keep_resolution_in_the_stem():
    model = get_model("resnet18")
    assert model.stem[0].kernel_size == (3, 3) and not any(isinstance(m, torch.nn.MaxPool2d) for m in model.stem)
    assert [len(getattr(model, f"stage{i}")) for i in range(1, 5)] == [2, 2, 2, 2]
    assert [len(getattr(get_model("resnet34"), f"stage{i}")) for i in range(1, 5)] == [3, 4, 6, 3]


def test_vgg11_runs_on_28x28_with_eight_convs():
    model = get_model("vgg11")
    assert sum(isinstance(m, torch.nn.Conv2d) for m in model.modules()) == 8
    assert model(torch.zeros(1, 1, 28, 28)).shape == (1, 10)


LENET_AS_LAYERS = """
model:
  name: sequential
  layers:
    - conv: {out: 6, kernel: 5, padding: 2}
    - sigmoid
    - pool: avg
    - conv: {out: 16, kernel: 5}
    - sigmoid
    - pool: {kind: avg, size: 2}
    - flatten
    - linear: 120
    - sigmoid
    - linear: 84
    - sigmoid
    - linear: 10
"""


def test_sequential_lenet_equals_the_registered_lenet(tmp_path):
    path = tmp_path / "seq.yaml"
    path.write_text("seed: 3\n" + LENET_AS_LAYERS)
    seq = build_model(load_config(path))
    ref = build_model(load_config(None, ["seed=3"]))
    assert count_params(seq) == count_params(ref) == 61_706
    x = torch.randn(4, 1, 28, 28)
    assert torch.equal(seq(x), ref(x))  # same seed, same init order: identical outputs


@pytest.mark.parametrize("layers, expected", [
    (["flatten", {"linear": 10}, "relu", {"convv": 3}], "model.layers[3]: unknown layer type 'convv' (did you mean 'conv'?)"),
    ([{"conv": {"out": 6, "kernal": 3}}], "model.layers[0] (conv): unknown argument 'kernal' (did you mean 'kernel'?)"),
    ([{"linear": 10}], "model.layers[0] (linear): gets a 1x28x28 image; put `flatten` before it"),
    (["flatten", {"conv": 4}], "model.layers[1] (conv): needs an image"),
    (["flatten", {"linear": 7}], "the last layer outputs 7, but the model must output 10 class scores"),
    ([{"pool": {"size": 64}}], "model sequential does not fit 1x28x28 images: the feature map vanishes at 0 (MaxPool2d): "
                               "28x28 -> 0x0; use data.image_size >= 64"),
    ([{"conv": {"out": "six"}}], "model.layers[0] (conv): out: Input should be a valid integer"),
])
def test_sequential_errors_point_at_the_layer(layers, expected):
    with pytest.raises(UserError) as info:
        get_model("sequential", layers=layers)
    assert expected in str(info.value)


def test_sequential_zoo_blocks_infer_their_inputs():
    model = get_model("sequential", layers=[
        {"conv": {"out": 32, "padding": 1}}, "bn", "relu", {"residual": {"out": 64, "stride": 2}},
        {"inception": {"ch1": 16, "ch2": [16, 32], "ch3": [8, 16], "ch4": 16}}, {"global_pool": "avg"}, "flatten",
        {"dropout": 0.2}, {"linear": 10}])
    assert model[4].p1_1.in_channels == 64 and model[-1].in_features == 80
    assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 10)


def test_user_module_builder(tmp_path, monkeypatch):
    (tmp_path / "my_models.py").write_text(textwrap.dedent("""
        from torch import nn

        def tiny(num_classes: int = 10, in_channels: int = 1, *, hidden: int = 32) -> nn.Module:
            '''A two-layer MLP.'''
            return nn.Sequential(nn.Flatten(), nn.Linear(784 * in_channels, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = load_config(None, ["model.name=my_models:tiny", "model.hidden=16"])
    assert count_params(build_model(cfg)) == linear(784, 16) + linear(16, 10)
    with pytest.raises(UserError, match="model 'my_models:tiny' takes no argument 'width'"):
        load_config(None, ["model.name=my_models:tiny", "model.width=16"])
    with pytest.raises(UserError, match="cannot find module 'no_such_module'"):
        load_config(None, ["model.name=no_such_module:net"])
    with pytest.raises(UserError, match="has no function 'nothing'"):
        load_config(None, ["model.name=my_models:nothing"])


def test_changing_model_name_drops_the_base_models_options():
    cfg = load_config(CONFIGS / "seed" / "s6_1_vgg.yaml")
    assert cfg.model.name == "vgg" and cfg.model.kwargs == {}
    assert load_config(CONFIGS / "lenet.yaml", ["model.name=nin"]).model.kwargs == {}
