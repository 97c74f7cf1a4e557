"""Usage: ``model = build_model(cfg, spec=data.spec)``: the configured model for that data, with its initial weights.

Models are built here, beside their registry (``registry.py``), for everyone who needs one: training,
``summary``, ``report``, ``bench``, opening a finished run. The data's description (``DataSpec``)
gives the builder its number of classes, input channels and image size; without one, the config's
data set as known by name (no file read).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from cnnlab.config import Config
from cnnlab.data import DataSpec, describe
from cnnlab.models.layers import MapVanishes, check_fits
from cnnlab.models.registry import ModelArgumentError, get_entry, get_model


def build_model(cfg: Config, device: torch.device | None = None, *, spec: DataSpec | None = None,
                channels_last: bool = False) -> nn.Module:
    """The configured model for the data ``spec`` describes, with the configured initial weights (seeded by
    ``cfg.seed``), on ``device`` (and in the NHWC layout with ``channels_last``) when given."""
    spec = spec or describe(cfg.data)
    arguments = model_arguments(cfg.model.name, cfg.model.kwargs, spec)
    torch.manual_seed(cfg.seed)
    model = get_model(cfg.model.name, **arguments)
    try:  # models that pool adaptively build for any size, and still lose the map where a pool or conv outgrows it
        check_fits(model, spec.input_shape)
    except MapVanishes as err:
        raise ModelArgumentError(err.for_model(cfg.model.name)) from None
    init_weights(model, cfg.init)
    if device is not None:
        model = model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def model_arguments(name: str, options: dict[str, Any], spec: DataSpec) -> dict[str, Any]:
    """The builder's arguments: the config's ``options``, and from the data its number of classes, its
    channels and, for a builder with an ``image_size`` option (``img_size`` in timm) the config does not set,
    the image size (one side for square images, as builders of one side take it; (height, width) for others)."""
    arguments = {**options, "num_classes": spec.num_classes, "in_channels": spec.channels}
    fields = get_entry(name).options.model_fields
    for key in ("image_size", "img_size"):
        if key in fields and key not in options:
            height, width = spec.image_size
            arguments[key] = height if height == width else (height, width)
    return arguments


def init_weights(model: nn.Module, scheme: str) -> None:
    """``xavier_uniform`` (the report) or ``kaiming`` on every Conv2d/Linear weight; biases untouched."""
    if scheme == "default":
        return
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            if scheme == "xavier_uniform":
                nn.init.xavier_uniform_(module.weight)
            else:
                nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
