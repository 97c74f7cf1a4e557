"""Usage: ``get_model("vgg")`` (the report's two-block VGG) or ``get_model("vgg11")``."""

from __future__ import annotations

from pydantic import NonNegativeInt, PositiveInt, confloat
from torch import nn

from cnnlab.models.layers import flat_features
from cnnlab.models.registry import register_model

REPORT_ARCH = ((1, 32), (1, 64))  # the report's cut-down VGG: (convs, out channels) per block
VGG11_ARCH = ((1, 64), (1, 128), (2, 256), (2, 512), (2, 512))


def vgg_block(num_convs: int, in_channels: int, out_channels: int, batch_norm: bool, pool: bool) -> nn.Sequential:
    layers: list[nn.Module] = []
    for _ in range(num_convs):
        layers.append(nn.Conv2d(in_channels, out_channels, 3, padding=1))
        if batch_norm:
            layers.append(nn.BatchNorm2d(out_channels))
        layers.append(nn.ReLU())
        in_channels = out_channels
    if pool:
        layers.append(nn.MaxPool2d(2, 2))
    return nn.Sequential(*layers)


@register_model("vgg")
def vgg(
    num_classes: int = 10,
    in_channels: int = 1,
    *,
    conv_arch: tuple[tuple[PositiveInt, PositiveInt], ...] = REPORT_ARCH,
    pooled_blocks: NonNegativeInt | None = None,
    hidden: tuple[PositiveInt, ...] = (1024, 512),
    dropout: confloat(ge=0, lt=1) = 0.5,
    batch_norm: bool = False,
    image_size: PositiveInt | tuple[PositiveInt, PositiveInt] = 28,
) -> nn.Sequential:
    """VGG as the report built it: blocks of 3x3 convs + ReLU, each then a 2x2 max pool; a dropout MLP head.

    ``conv_arch`` lists ``(num_convs, out_channels)`` per block (the report wrote ``(num_convs, in, out)``;
    ``in`` is implied). The default is the report's two blocks ``((1, 32), (1, 64))`` with the head
    Linear(64*7*7, 1024), ReLU, Dropout, Linear(1024, 512), ReLU, Dropout, Linear(512, 10).
    ``pooled_blocks`` pools after only the first N blocks (default: all).
    """
    pooled = len(conv_arch) if pooled_blocks is None else pooled_blocks
    layers: list[nn.Module] = []
    channels = in_channels
    for i, (num_convs, out_channels) in enumerate(conv_arch):
        layers.append(vgg_block(num_convs, channels, out_channels, batch_norm, pool=i < pooled))
        channels = out_channels
    layers.append(nn.Flatten())
    width = flat_features(layers, in_channels, image_size)
    for size in hidden:
        layers += [nn.Linear(width, size), nn.ReLU(), nn.Dropout(dropout)]
        width = size
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


@register_model("vgg11")
def vgg11(num_classes: int = 10, in_channels: int = 1, *, batch_norm: bool = False, pooled_blocks: NonNegativeInt = 3,
          image_size: PositiveInt | tuple[PositiveInt, PositiveInt] = 28) -> nn.Sequential:
    """The full VGG-11 conv stack (8 convs, 64-512 channels); on 28x28 it pools after the first 3 blocks only.

    Five 2x2 pools would shrink 28x28 to nothing (28-14-7-3-1-0), so by default the last two blocks run
    at 3x3; ``pooled_blocks: 5`` is the original VGG-11 for images of 32x32 and up. The head is the
    report's (1024, 512) dropout MLP on the last block's features.
    """
    return vgg(num_classes, in_channels, conv_arch=VGG11_ARCH, pooled_blocks=pooled_blocks, batch_norm=batch_norm,
               image_size=image_size)
