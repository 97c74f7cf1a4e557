"""Usage: ``get_model("nin")``: the report's modified Network in Network."""

from __future__ import annotations

from pydantic import PositiveInt, confloat
from torch import nn

from cnnlab.models.registry import register_model


def nin_block(in_channels: int, out_channels: int, kernel_size: int, stride: int, padding: int) -> nn.Sequential:
    """A conv followed by two 1x1 convs ("MLP over channels"), each with a ReLU."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding),
        nn.ReLU(),
        nn.Conv2d(out_channels, out_channels, 1),
        nn.ReLU(),
        nn.Conv2d(out_channels, out_channels, 1),
        nn.ReLU(),
    )


@register_model("nin")
def nin(
    num_classes: int = 10,
    in_channels: int = 1,
    *,
    channels: tuple[PositiveInt, PositiveInt, PositiveInt] = (96, 256, 384),
    dropout: confloat(ge=0, lt=1) = 0.5,
) -> nn.Sequential:
    """NiN as the report modified it for 28x28: three NiN blocks, 2x2 max pools, a conv head and global average pooling.

    nin_block(1, 96, k5, p2), MaxPool 2; nin_block(96, 256, k3, p1), MaxPool 2; nin_block(256, 384, k3, p1);
    Dropout 0.5; Conv(384, 10, k3, p1); AdaptiveAvgPool(1); Flatten.
    """
    c1, c2, c3 = channels
    return nn.Sequential(
        nin_block(in_channels, c1, 5, 1, 2),
        nn.MaxPool2d(2, 2),
        nin_block(c1, c2, 3, 1, 1),
        nn.MaxPool2d(2, 2),
        nin_block(c2, c3, 3, 1, 1),
        nn.Dropout(dropout),
        nn.Conv2d(c3, num_classes, 3, padding=1),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
    )
