"""Usage: ``make_activation("relu")``: building blocks shared by the model builders."""

from __future__ import annotations

from typing import Literal, get_args

import torch
from torch import nn

ActivationName = Literal["sigmoid", "relu", "tanh", "gelu", "silu", "elu", "leaky_relu", "mish", "identity"]
PoolName = Literal["avg", "max"]

_ACTIVATIONS: dict[str, type[nn.Module]] = {
    "sigmoid": nn.Sigmoid,
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "elu": nn.ELU,
    "leaky_relu": nn.LeakyReLU,
    "mish": nn.Mish,
    "identity": nn.Identity,
}
assert set(_ACTIVATIONS) == set(get_args(ActivationName))


def make_activation(name: str) -> nn.Module:
    if name not in _ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; choose one of {', '.join(_ACTIVATIONS)}")
    return _ACTIVATIONS[name]()


def make_pool(kind: str, kernel_size: int = 2, stride: int = 2) -> nn.Module:
    if kind == "avg":
        return nn.AvgPool2d(kernel_size, stride)
    if kind == "max":
        return nn.MaxPool2d(kernel_size, stride)
    raise ValueError(f"unknown pooling {kind!r}; choose avg or max")


class Residual(nn.Module):
    """The report's (and d2l's) basic block: conv3x3-BN-ReLU-conv3x3-BN, plus the input, then ReLU.

    The shortcut goes through a 1x1 conv with the same stride when ``use_1x1conv`` (shapes change).
    """

    def __init__(self, in_channels: int, out_channels: int, use_1x1conv: bool = False, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1, stride=stride)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.conv3 = nn.Conv2d(in_channels, out_channels, 1, stride=stride) if use_1x1conv else None

    def forward(self, x):
        y = nn.functional.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        shortcut = self.conv3(x) if self.conv3 is not None else x
        return nn.functional.relu(y + shortcut)


class Inception(nn.Module):
    """GoogLeNet's Inception block as the report built it: four branches concatenated on channels.

    1x1; 1x1 -> 3x3; 1x1 -> 5x5; 3x3 max pool -> 1x1. A ReLU only between a branch's two convs
    (the report applied none to the branch outputs).
    """

    def __init__(self, in_channels: int, ch1: int, ch2: tuple[int, int], ch3: tuple[int, int], ch4: int) -> None:
        super().__init__()
        self.p1_1 = nn.Conv2d(in_channels, ch1, 1)
        self.p2_1 = nn.Conv2d(in_channels, ch2[0], 1)
        self.p2_2 = nn.Conv2d(ch2[0], ch2[1], 3, padding=1)
        self.p3_1 = nn.Conv2d(in_channels, ch3[0], 1)
        self.p3_2 = nn.Conv2d(ch3[0], ch3[1], 5, padding=2)
        self.p4_1 = nn.MaxPool2d(3, stride=1, padding=1)
        self.p4_2 = nn.Conv2d(in_channels, ch4, 1)
        self.out_channels = ch1 + ch2[1] + ch3[1] + ch4

    def forward(self, x):
        relu = nn.functional.relu
        p1 = self.p1_1(x)
        p2 = self.p2_2(relu(self.p2_1(x)))
        p3 = self.p3_2(relu(self.p3_1(x)))
        p4 = self.p4_2(self.p4_1(x))
        return torch.cat((p1, p2, p3, p4), dim=1)


def flat_features(layers: list[nn.Module], in_channels: int, image_size: int) -> int:
    """Features per image after ``layers``, found by passing one blank image through them."""
    with torch.no_grad():
        probe = torch.zeros(1, in_channels, image_size, image_size)
        try:
            out = nn.Sequential(*layers).eval()(probe)
        except RuntimeError as err:
            raise ValueError(
                f"the layers shrink a {image_size}x{image_size} image to nothing ({str(err).splitlines()[0]}); "
                "use fewer pools, smaller kernels or more padding"
            ) from None
    return out[0].numel()
