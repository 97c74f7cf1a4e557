"""Usage: ``optimizer = make_optimizer(model, cfg.optim)``;
``scheduler = make_scheduler(optimizer, cfg.schedule, epochs, steps_per_epoch)``.

The optimiser and the learning-rate schedule a config asks for (the schedule stepped once per batch),
and, after a checkpoint's optimiser and schedule are loaded, the config's hyperparameters put back
in them (``follow_config``: a resume may change them). Frozen parameters (``train.freeze``) are left
out; ``optim.backbone_lr`` splits the rest in two groups, the head's and the backbone's.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from cnnlab.config import OptimConfig, ScheduleConfig
from cnnlab.models.anatomy import head, within


def make_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """The optimiser of the parameters that train (not frozen): one group at ``lr``, or with ``backbone_lr``
    two, the head's at ``lr`` and the backbone's at ``lr * backbone_lr`` (``lr_scales`` orders them)."""
    params = param_groups(model, cfg)
    if cfg.name == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov, weight_decay=cfg.weight_decay)
    if cfg.name == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def param_groups(model: nn.Module, cfg: OptimConfig) -> list[dict[str, Any]]:
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    if cfg.backbone_lr is None:
        return [{"params": [p for _, p in trainable]}]
    classifier = head(model)
    groups = [[p for name, p in trainable if within(name, classifier) is in_head] for in_head in (True, False)]
    return [{"params": params, "lr": cfg.lr * scale} for params, scale in zip(groups, lr_scales(cfg, 2))]


def lr_scales(cfg: OptimConfig, groups: int) -> list[float]:
    """Each parameter group's learning rate as a fraction of ``lr``: the head's first, then the backbone's."""
    return [1.0] if groups == 1 else [1.0, cfg.backbone_lr or 1.0]


def lr_factor(cfg: ScheduleConfig, epochs: int) -> Callable[[float], float]:
    """The learning rate, as a fraction of ``optim.lr``, at a (fractional) epoch ``t``."""
    warmup = cfg.warmup_epochs
    if cfg.name == "onecycle" and warmup == 0:
        warmup = cfg.pct_start * epochs

    def factor(t: float) -> float:
        if t < warmup:
            return (t + 1e-3) / warmup if warmup else 1.0
        if cfg.name == "constant":
            return 1.0
        if cfg.name == "step":
            return cfg.gamma ** math.floor(t / cfg.step_size)
        progress = min(1.0, (t - warmup) / max(epochs - warmup, 1e-9))
        cosine = 0.5 * (1 + math.cos(math.pi * progress))
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cosine

    return factor


def make_scheduler(
    optimizer: torch.optim.Optimizer, cfg: ScheduleConfig, epochs: int, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Stepped once per batch, so warm-up and cosine move smoothly within an epoch."""
    factor = lr_factor(cfg, epochs)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: factor(step / steps_per_epoch))


def follow_config(optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LambdaLR, cfg: OptimConfig) -> None:
    """After loading a checkpoint's optimiser and schedule, which carry the hyperparameters they were
    saved with: ``cfg``'s instead (a resume may change them), the learning rate where the (maybe new)
    schedule puts it at the saved step. Unchanged values give back exactly the saved ones."""
    scales = lr_scales(cfg, len(optimizer.param_groups))
    for group, scale in zip(optimizer.param_groups, scales):
        group["initial_lr"], group["weight_decay"] = cfg.lr * scale, cfg.weight_decay
        if "momentum" in group:  # SGD's; its momentum buffers are kept
            group["momentum"] = cfg.momentum
    scheduler.base_lrs = [cfg.lr * scale for scale in scales]  # what LambdaLR scales from, saved in its state
    for group, base, factor in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base * factor(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
