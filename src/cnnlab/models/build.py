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
from cnnlab.models.registry import ModelArgumentError, get_entry, get_model


def build_model(cfg: Config, device: torch.device | None = None, *, spec: DataSpec | None = None,
                channels_last: bool = False) -> nn.Module:
    """The configured model for the data ``spec`` describes, with the configured initial weights (seeded by
    ``cfg.seed``), on ``device`` (and in the NHWC layout with ``channels_last``) when given."""
    arguments = model_arguments(cfg.model.name, cfg.model.kwargs, spec or describe(cfg.data))
    torch.manual_seed(cfg.seed)
    model = get_model(cfg.model.name, **arguments)
    init_weights(model, cfg.init)
    if device is not None:
        model = model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def model_arguments(name: str, options: dict[str, Any], spec: DataSpec) -> dict[str, Any]:
    """The builder's arguments: the config's ``options``, and from the data its number of classes, its
    channels and, for a builder with an ``image_size`` option the config does not set, the image size."""
    arguments = {**options, "num_classes": spec.num_classes, "in_channels": spec.channels}
    if "image_size" in get_entry(name).options.model_fields and "image_size" not in options:
        arguments["image_size"] = square_side(name, spec)
    return arguments


def square_side(name: str, spec: DataSpec) -> int:
    """The side of the data's square images: what a builder's ``image_size`` option takes."""
    height, width = spec.image_size
    if height != width:
        raise ModelArgumentError(f"model {name!r} takes one side as image_size, but the data's images are {height}x{width}; "
                                 "set model.image_size, or use a model without that option")
    return height


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
