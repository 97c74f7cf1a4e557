"""Usage: ``optimizer = make_optimizer(model, cfg.optim)``;
``scheduler = make_scheduler(optimizer, cfg.schedule, epochs, steps_per_epoch)``.

The optimiser and the learning-rate schedule a config asks for (the schedule stepped once per batch),
and, after a checkpoint's optimiser and schedule are loaded, the config's hyperparameters put back
in them (``follow_config``: a resume may change them). Frozen parameters (``train.freeze``) are left
out; ``optim.backbone_lr`` splits the rest in two groups, the head's and the backbone's.

The optimisers are PyTorch's, run without the compiler's import (``without_compiler``): PyTorch's
own step, ``zero_grad`` and state-dict code, minus the decorators that import ``torch._dynamo`` on
first use (0.7 s of a 2.2 s start on a quiet 2-core machine, 1.5-2.7 s on a slower one). The numbers
are PyTorch's to the bit, and the state dicts load into either class.
"""

from __future__ import annotations

import functools
import inspect
import math
import types
from collections.abc import Callable
from typing import Any, TypeVar

import torch
from torch import nn

from cnnlab.config import OptimConfig, ScheduleConfig
from cnnlab.models.anatomy import head, within


def make_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """The optimiser of the parameters that train (not frozen): one group at ``lr``, or with ``backbone_lr``
    two, the head's at ``lr`` and the backbone's at ``lr * backbone_lr`` (``lr_scales`` orders them)."""
    params = param_groups(model, cfg)
    if cfg.name == "sgd":
        return without_compiler(torch.optim.SGD)(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                                                 weight_decay=cfg.weight_decay)
    kind = torch.optim.Adam if cfg.name == "adam" else torch.optim.AdamW
    return without_compiler(kind)(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


OptimizerClass = TypeVar("OptimizerClass", bound=type[torch.optim.Optimizer])


@functools.cache
def without_compiler(kind: OptimizerClass) -> OptimizerClass:
    """A subclass of PyTorch's optimiser ``kind`` whose methods never import ``torch._dynamo``.

    PyTorch wraps its optimisers' code in decorators for ``torch.compile``: ``step`` in one that imports
    ``torch._dynamo`` to mark graph breaks (and sets the grad mode), the functional update it calls and
    ``zero_grad``, ``add_param_group`` and the state-dict methods in ``torch._disable_dynamo``, which imports
    it on first call. Outside ``torch.compile`` they do nothing else. The subclass runs the undecorated
    code: ``step``'s own body with grad enabled only for a differentiable optimiser (as the wrapper does),
    the module's decorated functions seen undecorated, and the base class's methods unwrapped (where
    ``kind`` does not define its own). It is ``EagerSGD`` (and so on) in this module, so it pickles. Where
    PyTorch's code has another shape, that method is left as PyTorch's: slower to start, never different.
    cnnlab never compiles its optimisers, so nothing is lost.
    """
    names: dict[str, Any] = {}
    body = inspect.unwrap(kind.step)
    if isinstance(body, types.FunctionType) and body is not kind.step:
        seen = dict(body.__globals__)
        for name, value in body.__globals__.items():
            if isinstance(value, types.FunctionType) and value.__module__ == body.__module__:
                seen[name] = inspect.unwrap(value)
        plain = types.FunctionType(body.__code__, seen, body.__name__, body.__defaults__, body.__closure__)
        plain.__kwdefaults__ = body.__kwdefaults__

        @functools.wraps(body)
        def step(self: torch.optim.Optimizer, *args: Any, **kwargs: Any) -> Any:
            with torch.set_grad_enabled(bool(self.defaults.get("differentiable", False))):  # as PyTorch's wrapper
                return plain(self, *args, **kwargs)

        names["step"] = step
    for method in ("add_param_group", "zero_grad", "state_dict", "load_state_dict"):
        if not any(method in vars(klass) for klass in kind.__mro__[:kind.__mro__.index(torch.optim.Optimizer)]):
            names[method] = inspect.unwrap(getattr(torch.optim.Optimizer, method))  # unless kind has its own
    eager = type(kind.__name__, (kind,), {"__module__": __name__, "__qualname__": f"Eager{kind.__name__}", **names})
    globals()[eager.__qualname__] = eager  # found by name, as pickle finds classes
    return eager


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
