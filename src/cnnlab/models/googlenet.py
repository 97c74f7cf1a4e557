"""Usage: ``get_model("googlenet")``: Inception v1 as the report built it (no auxiliary classifiers)."""

from __future__ import annotations

from torch import nn

from cnnlab.models.layers import Inception
from cnnlab.models.registry import register_model

# (in, ch1, (ch2 in, out), (ch3 in, out), ch4) per Inception block, as in the report
STAGE3 = ((192, 64, (96, 128), (16, 32), 32), (256, 128, (128, 192), (32, 96), 64))
STAGE4 = (
    (480, 192, (96, 208), (16, 48), 64),
    (512, 160, (112, 224), (24, 64), 64),
    (512, 128, (128, 256), (24, 64), 64),
    (512, 112, (144, 288), (32, 64), 64),
    (528, 256, (160, 320), (32, 128), 128),
)
STAGE5 = ((832, 256, (160, 320), (32, 128), 128), (832, 384, (192, 384), (48, 128), 128))


@register_model("googlenet")
def googlenet(num_classes: int = 10, in_channels: int = 1) -> nn.Sequential:
    """GoogLeNet (Inception v1) exactly as the report's code: 9 Inception blocks, global average pool, Linear(1024, 10).

    Stem: Conv7x7 s2 p1 (->64), ReLU, MaxPool3 s2 p1, Conv1x1 (64), Conv3x3 p1 (->192), MaxPool3 s2 p1
    (the report put no ReLU after the stem's 1x1 and 3x3 convs; kept as it was). On 28x28 the maps are
    12, 6, 3, 2 and 1 pixels wide after the stem's conv and each pool.
    """
    return nn.Sequential(
        nn.Sequential(
            nn.Conv2d(in_channels, 64, 7, stride=2, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(3, stride=2, padding=1),
            nn.Conv2d(64, 64, 1),
            nn.Conv2d(64, 192, 3, padding=1),
            nn.MaxPool2d(3, stride=2, padding=1),
        ),
        nn.Sequential(*(Inception(*spec) for spec in STAGE3), nn.MaxPool2d(3, stride=2, padding=1)),
        nn.Sequential(*(Inception(*spec) for spec in STAGE4), nn.MaxPool2d(3, stride=2, padding=1)),
        nn.Sequential(*(Inception(*spec) for spec in STAGE5)),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(1024, num_classes),
    )
