"""Usage: ``get_model("alexnet")`` (the textbook's, for 224x224 images) or ``get_model("alexnet", stem="small")`` (28x28).

AlexNet as d2l's chapter builds it for Fashion-MNIST resized to 224x224: five convs (96, 256, 384, 384,
256 channels), three 3x3 stride-2 max pools, a 4096-4096 dropout MLP. One flat ``nn.Sequential`` so
layer indices match the chapter's (0 = first conv, 3 = second conv).
"""

from __future__ import annotations

from typing import Literal

from pydantic import PositiveInt, confloat
from torch import nn

from cnnlab.models.layers import flat_features
from cnnlab.models.registry import register_model

CHAPTER_CHANNELS = (96, 256, 384, 384, 256)
# The first conv's (kernel, stride, padding) and the image side it is meant for: the chapter's 11x11 stride 4
# needs images of 65 pixels and up (224 in the chapter); the small stem's 3x3 stride 1 keeps 28x28 at
# 28 -> 13 -> 6 -> 2 after the pools.
STEMS = {"imagenet": ((11, 4, 1), 224), "small": ((3, 1, 1), 28)}


@register_model("alexnet")
def alexnet(
    num_classes: int = 10,
    in_channels: int = 1,
    *,
    stem: Literal["imagenet", "small"] = "imagenet",
    channels: tuple[PositiveInt, PositiveInt, PositiveInt, PositiveInt, PositiveInt] = CHAPTER_CHANNELS,
    hidden: tuple[PositiveInt, ...] = (4096, 4096),
    dropout: confloat(ge=0, lt=1) = 0.5,
    image_size: PositiveInt | tuple[PositiveInt, PositiveInt] | None = None,
) -> nn.Sequential:
    """AlexNet as the textbook (d2l) builds it: an 11x11 stride-4 conv, 4 more convs, 3 max pools, a 4096-4096 dropout MLP.

    Conv(11, s4, p1) -> 96, ReLU, MaxPool(3, 2); Conv(5, p2) -> 256, ReLU, MaxPool(3, 2); Conv(3, p1) -> 384,
    384, 256, each with a ReLU; MaxPool(3, 2); Flatten; Linear(6400, 4096), ReLU, Dropout 0.5, Linear(4096,
    4096), ReLU, Dropout 0.5, Linear(4096, 10) on 224x224 images. ``stem: small`` makes the first conv 3x3
    stride 1 so 28x28 images need no up-sampling; the flatten size follows ``image_size`` either way (cnnlab
    gives the data's; unset, the stem's own: 224 or 28).
    """
    (kernel, stride, padding), side = STEMS[stem]
    c1, c2, c3, c4, c5 = channels
    layers: list[nn.Module] = [
        nn.Conv2d(in_channels, c1, kernel, stride=stride, padding=padding), nn.ReLU(),
        nn.MaxPool2d(3, stride=2),
        nn.Conv2d(c1, c2, 5, padding=2), nn.ReLU(),
        nn.MaxPool2d(3, stride=2),
        nn.Conv2d(c2, c3, 3, padding=1), nn.ReLU(),
        nn.Conv2d(c3, c4, 3, padding=1), nn.ReLU(),
        nn.Conv2d(c4, c5, 3, padding=1), nn.ReLU(),
        nn.MaxPool2d(3, stride=2),
        nn.Flatten(),
    ]
    width = flat_features(layers, in_channels, image_size or side)
    for size in hidden:
        layers += [nn.Linear(width, size), nn.ReLU(), nn.Dropout(dropout)]
        width = size
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)
