"""Usage: ``get_model("lenet", activation="relu", pool="max")``: LeNet-5 and section 5's variants."""

from __future__ import annotations

from pydantic import NonNegativeFloat, NonNegativeInt, PositiveInt
from torch import nn

from cnnlab.models.layers import ActivationName, PoolName, flat_features, make_activation, make_pool
from cnnlab.models.registry import register_model


@register_model("lenet")
def lenet(
    num_classes: int = 10,
    in_channels: int = 1,
    *,
    activation: ActivationName = "sigmoid",
    pool: PoolName = "avg",
    batch_norm: bool = False,
    kernel_size: PositiveInt | tuple[PositiveInt, PositiveInt] = 5,
    channels: tuple[PositiveInt, PositiveInt] = (6, 16),
    hidden: tuple[PositiveInt, ...] = (120, 84),
    padding: NonNegativeInt | None = None,
    dropout: NonNegativeFloat = 0.0,
    image_size: PositiveInt | tuple[PositiveInt, PositiveInt] = 28,
) -> nn.Sequential:
    """LeNet-5 as the lab report built it (sigmoid, average pooling); every section-5 variant by option.

    One flat ``nn.Sequential`` so layer indices match the report's (0 = first conv, 3 = second conv).
    ``kernel_size`` is one size for both convs or a pair; ``padding`` pads the first conv only and
    defaults to ``kernel_size // 2`` (the report's padding=2 for 5x5 keeps 28x28). ``batch_norm`` puts a
    BatchNorm after every conv and hidden Linear, before the activation, as the report did. ``dropout``
    (off in the report) drops hidden activations. The flatten size is computed for ``image_size`` (one side, or
    (height, width); cnnlab gives the data's), not hard-coded.
    """
    k1, k2 = (kernel_size, kernel_size) if isinstance(kernel_size, int) else kernel_size
    pad = k1 // 2 if padding is None else padding
    c1, c2 = channels
    layers: list[nn.Module] = [nn.Conv2d(in_channels, c1, k1, padding=pad)]
    if batch_norm:
        layers.append(nn.BatchNorm2d(c1))
    layers += [make_activation(activation), make_pool(pool), nn.Conv2d(c1, c2, k2)]
    if batch_norm:
        layers.append(nn.BatchNorm2d(c2))
    layers += [make_activation(activation), make_pool(pool), nn.Flatten()]

    flat = flat_features(layers, in_channels, image_size)

    width = flat
    for size in hidden:
        layers.append(nn.Linear(width, size))
        if batch_norm:
            layers.append(nn.BatchNorm1d(size))
        layers.append(make_activation(activation))
        if dropout:
            layers.append(nn.Dropout(dropout))
        width = size
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)
