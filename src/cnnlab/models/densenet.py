"""Usage: ``get_model("densenet")`` (the textbook's, for 96x96 images) or ``get_model("densenet", stem="small")`` (28x28).

DenseNet as d2l's chapter builds it: a ResNet-like stem, dense blocks whose convs each add
``growth_rate`` channels concatenated onto their input, transition blocks that halve the channels and
the map between them, then BatchNorm, ReLU, global average pooling and a Linear head.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Literal

import torch
from pydantic import PositiveInt
from torch import nn

from cnnlab.models.registry import register_model
from cnnlab.models.resnet import make_stem


def conv_block(in_channels: int, out_channels: int) -> nn.Sequential:
    """The pre-activation conv of a dense block: BatchNorm, ReLU, 3x3 conv."""
    return nn.Sequential(nn.BatchNorm2d(in_channels), nn.ReLU(), nn.Conv2d(in_channels, out_channels, 3, padding=1))


class DenseBlock(nn.Module):
    """``num_convs`` conv blocks, each fed everything before it: the output has ``in + num_convs * growth`` channels."""

    def __init__(self, num_convs: int, in_channels: int, growth_rate: int) -> None:
        super().__init__()
        self.net = nn.Sequential(*(conv_block(in_channels + i * growth_rate, growth_rate) for i in range(num_convs)))
        self.out_channels = in_channels + num_convs * growth_rate

    def forward(self, x):
        for block in self.net:
            x = torch.cat((x, block(x)), dim=1)
        return x


def transition_block(in_channels: int, out_channels: int) -> nn.Sequential:
    """BatchNorm, ReLU, a 1x1 conv to ``out_channels`` and a 2x2 average pool: fewer channels, half the map."""
    return nn.Sequential(nn.BatchNorm2d(in_channels), nn.ReLU(), nn.Conv2d(in_channels, out_channels, 1),
                         nn.AvgPool2d(2, stride=2))


@register_model("densenet")
def densenet(
    num_classes: int = 10,
    in_channels: int = 1,
    *,
    blocks: tuple[PositiveInt, ...] = (4, 4, 4, 4),
    growth_rate: PositiveInt = 32,
    stem: Literal["imagenet", "small"] = "imagenet",
    stem_channels: PositiveInt = 64,
) -> nn.Sequential:
    """DenseNet as the textbook (d2l) builds it: 7x7 stem, 4 dense blocks of 4 convs (growth 32), halving transitions.

    Stem: Conv7x7 s2 p3 -> 64, BN, ReLU, MaxPool3 s2 p1. Dense blocks of ``blocks`` convs each add
    ``growth_rate`` channels (64 -> 192 -> 96 -> 224 -> 112 -> 240 -> 120 -> 248); a transition block
    (BN, ReLU, 1x1 conv to half the channels, AvgPool 2) between blocks. Then BN, ReLU, global average
    pool, Linear(248, 10). The chapter resizes Fashion-MNIST to 96x96: on 28x28 the map is gone by
    the third transition, so ``stem: small`` (one 3x3 conv, no downsampling, as in ``resnet``) fits it.
    """
    layers: OrderedDict[str, nn.Module] = OrderedDict(stem=make_stem(stem, in_channels, stem_channels))
    channels = stem_channels
    for i, num_convs in enumerate(blocks):
        block = DenseBlock(num_convs, channels, growth_rate)
        layers[f"block{i + 1}"] = block
        channels = block.out_channels
        if i < len(blocks) - 1:
            layers[f"transition{i + 1}"] = transition_block(channels, channels // 2)
            channels //= 2
    layers["norm"] = nn.BatchNorm2d(channels)
    layers["relu"] = nn.ReLU()
    layers["pool"] = nn.AdaptiveAvgPool2d(1)
    layers["flatten"] = nn.Flatten()
    layers["fc"] = nn.Linear(channels, num_classes)
    return nn.Sequential(layers)
