"""Usage: ``model = build_model(cfg)``: the configured model, with its initial weights.

Models are built here, beside their registry (``registry.py``), for everyone who needs one: training,
``summary``, ``report``, ``bench``, opening a finished run.
"""

from __future__ import annotations

import torch
from torch import nn

from cnnlab.config import Config
from cnnlab.models.registry import get_model


def build_model(cfg: Config, device: torch.device | None = None, *, channels_last: bool = False) -> nn.Module:
    """The configured model with the configured initial weights (seeded by ``cfg.seed``), on ``device``
    (and in the NHWC layout with ``channels_last``) when given."""
    torch.manual_seed(cfg.seed)
    model = get_model(cfg.model.name, **cfg.model.kwargs)
    init_weights(model, cfg.init)
    if device is not None:
        model = model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


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
