"""Models for any data: every family builds for the data's channels, classes and image size, and a size
that does not fit is named at the layer where the feature map vanishes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from cnnlab.cli import app
from cnnlab.config import load_config
from cnnlab.data import DataSpec, describe, load_data
from cnnlab.data.convert import converted, grey, resized
from cnnlab.errors import UserError
from cnnlab.models import get_model
from cnnlab.models.build import build_model, init_weights
from cnnlab.models.layers import shape_trace, vanishing_point

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
FAMILIES = ["lenet", "vgg", "vgg11", "nin", "googlenet", "resnet", "resnet18", "resnet9", "sequential"]
SEQUENTIAL = ["model.layers=[{conv: {out: 8, kernel: 3, padding: 1}}, relu, {pool: max}, flatten, {linear: 5}]"]


def spec(channels: int, height: int, width: int | None = None, classes: int = 5) -> DataSpec:
    return DataSpec(name="made", title="Made", classes=tuple(f"c{i}" for i in range(classes)), channels=channels,
                    image_size=(height, width or height))


def config(name: str, *overrides: str):
    return load_config(None, [f"model.name={name}", *(SEQUENTIAL if name == "sequential" else []), *overrides])


@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32), (3, 64, 64), (3, 24, 40)])
@pytest.mark.parametrize("name", FAMILIES)
def test_every_family_builds_for_the_datas_channels_classes_and_size(name, shape):
    model = build_model(config(name), spec=spec(*shape)).eval()
    with torch.no_grad():
        assert model(torch.zeros(2, *shape)).shape == (2, 5)


def test_a_size_that_does_not_fit_names_the_layer_where_the_map_vanishes():
    with pytest.raises(UserError, match=r"^model vgg11 does not fit 1x8x8 images: the feature map vanishes at 3.4 \(MaxPool2d\): "
                                        r"1x1 -> 0x0; use data.image_size >= 32$"):
        build_model(config("vgg11", "model.pooled_blocks=5"), spec=spec(1, 8))
    # Models that pool adaptively build for any size, and are checked all the same.
    with pytest.raises(UserError, match=r"^model resnet9 does not fit 1x4x4 images: the feature map vanishes at layer3.0.1 "
                                        r"\(MaxPool2d\): 1x1 -> 0x0; use data.image_size >= 8$"):
        build_model(config("resnet9"), spec=spec(1, 4))
    valid = nn.Sequential(nn.Conv2d(1, 4, 3, padding="valid"), nn.Conv2d(4, 4, 3, padding="same"), nn.Conv2d(4, 4, 5))
    assert vanishing_point(valid, (1, 6, 6)) == ("2", "Conv2d", (4, 4), (0, 0)) and vanishing_point(valid, (1, 7, 7)) is None
    with pytest.raises(UserError, match=r"^model sequential does not fit 3x1x1 images: the feature map vanishes at 2 "
                                        r"\(MaxPool2d\)"):
        build_model(config("sequential"), spec=spec(3, 1))


class Viewing(nn.Module):
    """A forward written as many are (``x.view(x.size(0), -1)``): it cannot take an empty batch."""

    def __init__(self, pool: int) -> None:
        super().__init__()
        self.conv, self.pool = nn.Conv2d(1, 4, 3), nn.MaxPool2d(pool)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.conv(x))
        return x.view(x.size(0), -1).sum(1, keepdim=True)


class Asserting(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert len(x) > 0, "no images"
        return x


def test_the_shape_trace_takes_a_forward_that_refuses_an_empty_batch_and_leaves_the_modes():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 26 * 26, 7))
    assert shape_trace(model, (1, 28, 28)) == (7,) and model.training
    viewing = Viewing(pool=2)
    assert shape_trace(viewing, (1, 10, 10)) == (1,) and viewing.training  # by way of the meta device
    assert vanishing_point(Viewing(pool=5), (1, 6, 6)) == ("pool", "MaxPool2d", (4, 4), (0, 0))
    asserting = nn.Sequential(Asserting(), nn.MaxPool2d(9))  # refuses an empty batch with an AssertionError
    assert vanishing_point(asserting, (1, 6, 6)) == ("1", "MaxPool2d", (6, 6), (0, 0))
    torch.manual_seed(0)
    lazy, before = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.LazyLinear(3)), torch.random.get_rng_state()
    assert vanishing_point(lazy, (1, 8, 8)) is None  # not traced: the lazy layer makes no weights here (run will)
    assert torch.equal(torch.random.get_rng_state(), before) and lazy[2].has_uninitialized_params()


def test_the_shape_trace_draws_no_random_numbers():
    """The trace runs between building and initialising: a 1x28x28 model's weights are those of a plain build."""
    for name in ("lenet", "vgg", "resnet9"):
        torch.manual_seed(0)
        expected = get_model(name)
        init_weights(expected, "xavier_uniform")
        got = build_model(config(name, "seed=0"), spec=spec(1, 28, classes=10)).state_dict()
        assert all(torch.equal(got[key], value) for key, value in expected.state_dict().items())


# ---------------------------------------------------------------------------------------------
# data.image_size and data.channels


def test_grey_is_the_bt601_luma_and_rgb_repeats_the_grey():
    rgb = torch.tensor([[255, 0, 0], [0, 255, 0], [0, 0, 255], [10, 20, 30]], dtype=torch.uint8).T.reshape(1, 3, 2, 2)
    assert grey(rgb).flatten().tolist() == [76, 150, 29, 18]  # 0.299, 0.587, 0.114 of 255; 2.99 + 11.74 + 3.42
    made = converted(grey(rgb), spec(3, 2))
    assert made.shape == (1, 3, 2, 2) and all(torch.equal(made[:, c], grey(rgb)[:, 0]) for c in range(3))


def test_resizing_is_antialiased_and_keeps_flat_images_flat():
    checkerboard = ((torch.arange(32)[:, None] + torch.arange(32)[None]) % 2 * 255).to(torch.uint8).view(1, 1, 32, 32)
    small = resized(checkerboard, (8, 8))
    assert small.shape == (1, 1, 8, 8) and 120 <= small.min() and small.max() <= 135  # averaged, not sampled (0 or 255)
    flat = torch.full((2, 3, 28, 28), 77, dtype=torch.uint8)
    assert torch.equal(resized(flat, (40, 24)), torch.full((2, 3, 40, 24), 77, dtype=torch.uint8))


def test_image_size_and_channels_convert_the_data_once_and_the_spec_says_so(tiny_data):
    plain = load_config(None, [f"data.root={tiny_data}", "data.check_counts=false", "data.val_size=100"])
    before = load_data(plain.data, seed=0, device=torch.device("cpu"))
    cfg = load_config(None, [f"data.root={tiny_data}", "data.check_counts=false", "data.val_size=100",
                             "data.image_size=[32, 40]", "data.channels=3"])
    data = load_data(cfg.data, seed=0, device=torch.device("cpu"))
    assert data.spec.input_shape == (3, 32, 40) == describe(cfg.data).input_shape
    assert data.train.images.shape[1:] == data.test.images.shape[1:] == (3, 32, 40)
    assert torch.equal(data.train.images[:, 0], data.train.images[:, 2]) and torch.equal(data.train.labels, before.train.labels)
    assert len(set(data.spec.mean)) == 1 and data.spec.mean[0] == pytest.approx(before.spec.mean[0], abs=0.01)
    assert torch.equal(data.test.images[:, :1], resized(before.test.images, (32, 40)))
    # Back to grey: the luma of three equal channels is that channel.
    back = load_config(None, [f"data.root={tiny_data}", "data.check_counts=false", "data.val_size=100",
                                   "data.channels=1"])
    assert torch.equal(load_data(back.data, seed=0, device=torch.device("cpu")).test.images, before.test.images)


def test_the_defaults_leave_the_data_untouched(tiny_data):
    cfg = load_config(None, [f"data.root={tiny_data}", "data.check_counts=false", "data.val_size=0", "data.image_size=28",
                             "data.channels=1"])
    plain = load_config(None, [f"data.root={tiny_data}", "data.check_counts=false", "data.val_size=0"])
    assert cfg.data.channels == 1 and plain.data.image_size is None and plain.data.channels == "auto"
    a, b = (load_data(c.data, seed=0, device=torch.device("cpu")) for c in (cfg, plain))
    assert torch.equal(a.train.images, b.train.images) and a.spec == b.spec


def test_a_model_that_does_not_fit_the_resized_data_is_exit_2_before_anything_is_written(tiny_data, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["run", str(CONFIGS / "lenet.yaml"), "--data-dir", str(tiny_data),
                                      "--results", str(tmp_path / "results"), "--device", "cpu",
                                      *(arg for setting in ("data.check_counts=false", "data.val_size=100", "data.image_size=8",
                                                            "model.name=vgg11", "model.pooled_blocks=5")
                                        for arg in ("--set", setting))])
    assert result.exit_code == 2, result.output
    assert "model vgg11 does not fit 1x8x8 images: the feature map vanishes at 3.4 (MaxPool2d): 1x1 -> 0x0; " \
           "use data.image_size >= 32" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "results").exists()


@pytest.mark.parametrize("setting, message", [("data.channels=2", "data.channels: Input should be 'auto', 1 or 3"),
                                              ("data.image_size=0", "data.image_size")])
def test_bad_shape_settings_are_named(setting, message):
    with pytest.raises(UserError, match=message):
        load_config(None, [setting])
