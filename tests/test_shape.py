"""Models for any data: every family builds for the data's channels, classes and image size, and a size
that does not fit is named at the layer where the feature map vanishes."""

from __future__ import annotations

import pytest
import torch

from cnnlab.config import load_config
from cnnlab.data import DataSpec
from cnnlab.errors import UserError
from cnnlab.models import get_model
from cnnlab.models.build import build_model, init_weights

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
    with pytest.raises(UserError, match=r"^model sequential does not fit 3x1x1 images: the feature map vanishes at 2 "
                                        r"\(MaxPool2d\)"):
        build_model(config("sequential"), spec=spec(3, 1))


def test_the_shape_trace_draws_no_random_numbers():
    """The trace runs between building and initialising: a 1x28x28 model's weights are those of a plain build."""
    for name in ("lenet", "vgg", "resnet9"):
        torch.manual_seed(0)
        expected = get_model(name)
        init_weights(expected, "xavier_uniform")
        got = build_model(config(name, "seed=0"), spec=spec(1, 28, classes=10)).state_dict()
        assert all(torch.equal(got[key], value) for key, value in expected.state_dict().items())
