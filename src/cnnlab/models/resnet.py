"""Usage: ``get_model("resnet")`` (the report's), ``get_model("resnet18")``, ``get_model("resnet9")``.

One parameterised family (after timm's ``ResNet``): a stem, stages of ``Residual`` blocks, global
average pooling and a Linear head; named variants are thin calls with other stages and stems.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Literal

from pydantic import PositiveInt
from torch import nn

from cnnlab.models.layers import Residual
from cnnlab.models.registry import register_model

REPORT_STAGES = ((1, 64), (2, 128), (2, 256), (2, 512))  # (residual blocks, channels) per stage


def make_stem(kind: str, in_channels: int, channels: int) -> nn.Sequential:
    if kind == "imagenet":  # the report's: 7x7 stride-2 conv and a max pool (28x28 -> 7x7)
        return nn.Sequential(
            nn.Conv2d(in_channels, channels, 7, stride=2, padding=3),
            nn.BatchNorm2d(channels),
            nn.ReLU(),
            nn.MaxPool2d(3, stride=2, padding=1),
        )
    # small-image stem: one 3x3 conv, no downsampling, as CIFAR ResNets do
    return nn.Sequential(nn.Conv2d(in_channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels), nn.ReLU())


@register_model("resnet")
def resnet(
    num_classes: int = 10,
    in_channels: int = 1,
    *,
    stages: tuple[tuple[PositiveInt, PositiveInt], ...] = REPORT_STAGES,
    stem: Literal["imagenet", "small"] = "imagenet",
    stem_channels: PositiveInt = 64,
) -> nn.Sequential:
    """ResNet as the report built it: 7x7 stem, stages ((1, 64), (2, 128), (2, 256), (2, 512)), avg pool, Linear.

    Each stage after the first starts with a stride-2 block whose shortcut is a 1x1 conv. ``stages``
    lists (blocks, channels); ``stem: small`` swaps the 7x7 stride-2 stem for one 3x3 conv.
    """
    layers: OrderedDict[str, nn.Module] = OrderedDict(stem=make_stem(stem, in_channels, stem_channels))
    channels = stem_channels
    for i, (blocks, out_channels) in enumerate(stages):
        downsample = i > 0
        stage = [Residual(channels, out_channels, use_1x1conv=downsample or channels != out_channels,
                          stride=2 if downsample else 1)]
        stage += [Residual(out_channels, out_channels) for _ in range(blocks - 1)]
        layers[f"stage{i + 1}"] = nn.Sequential(*stage)
        channels = out_channels
    layers["pool"] = nn.AdaptiveAvgPool2d(1)
    layers["flatten"] = nn.Flatten()
    layers["fc"] = nn.Linear(channels, num_classes)
    return nn.Sequential(layers)


@register_model("resnet18")
def resnet18(num_classes: int = 10, in_channels: int = 1) -> nn.Sequential:
    """ResNet-18 (stages of 2, 2, 2, 2 blocks) with the small-image stem: 3x3 conv, no max pool."""
    return resnet(num_classes, in_channels, stages=((2, 64), (2, 128), (2, 256), (2, 512)), stem="small")


@register_model("resnet34")
def resnet34(num_classes: int = 10, in_channels: int = 1) -> nn.Sequential:
    """ResNet-34 (stages of 3, 4, 6, 3 blocks) with the small-image stem: 3x3 conv, no max pool."""
    return resnet(num_classes, in_channels, stages=((3, 64), (4, 128), (6, 256), (3, 512)), stem="small")


def conv_bn(in_channels: int, out_channels: int, pool: bool = False) -> nn.Sequential:
    layers: list[nn.Module] = [
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    ]
    if pool:
        layers.insert(1, nn.MaxPool2d(2))
    return nn.Sequential(*layers)


class AddInput(nn.Module):
    """``x + body(x)``: the identity-shortcut residual used by ResNet-9."""

    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.body = body

    def forward(self, x):
        return x + self.body(x)


class Scale(nn.Module):
    def __init__(self, factor: float) -> None:
        super().__init__()
        self.factor = factor

    def forward(self, x):
        return x * self.factor

    def extra_repr(self) -> str:
        return f"{self.factor}"


@register_model("resnet9")
def resnet9(num_classes: int = 10, in_channels: int = 1, *, width: PositiveInt = 32) -> nn.Sequential:
    """ResNet-9 (the fast DAWNBench/airbench family): 8 convs, 3 poolings, 2 residuals; the zoo's speed/accuracy yardstick.

    prep conv(w) -> conv(2w)+pool + residual(2 convs) -> conv(4w)+pool -> conv(8w)+pool + residual
    -> global max pool -> Linear scaled by 1/8. ``width`` w = 32 keeps it CPU-friendly (64 is the original).
    """
    w = width
    return nn.Sequential(
        OrderedDict(
            prep=conv_bn(in_channels, w),
            layer1=nn.Sequential(conv_bn(w, 2 * w, pool=True),
                                 AddInput(nn.Sequential(conv_bn(2 * w, 2 * w), conv_bn(2 * w, 2 * w)))),
            layer2=conv_bn(2 * w, 4 * w, pool=True),
            layer3=nn.Sequential(conv_bn(4 * w, 8 * w, pool=True),
                                 AddInput(nn.Sequential(conv_bn(8 * w, 8 * w), conv_bn(8 * w, 8 * w)))),
            pool=nn.AdaptiveMaxPool2d(1),
            flatten=nn.Flatten(),
            fc=nn.Linear(8 * w, num_classes, bias=False),
            scale=Scale(0.125),
        )
    )
