"""Usage: ``ema = WeightAverage(model, decay=0.999)``; ``ema.update()`` after each optimiser step; evaluate ``ema.module``.
``swa = WeightAverage(model)``: ``swa.update()`` at the end of each epoch averaged; ``recompute_batchnorm(swa.module, ...)``.

An exponential moving average of a model's weights (``train.ema``), the recipe of timm's ModelEma and
airbench's lookahead: after every optimiser step each parameter and floating-point buffer (BatchNorm's
running statistics too) of the average moves towards the model's by ``1 - decay``; integer buffers
(BatchNorm's batch count) are copied. The average is a second module of the same class, so that
everything that evaluates a model evaluates it. Early on the average follows faster
(``decay_t = min(decay, (1 + t) / (10 + t))`` at its t-th update, TensorFlow's ``ExponentialMovingAverage``
with ``num_updates``), so that it is not held back by the random initial weights for thousands of steps.

Without a decay the average is an equal one (``train.swa``, SWA: Izmailov et al. 2018, PyTorch's
``swa_utils.AveragedModel``): the t-th update weighs the model by ``1 / t``. An average of weights is not
an average of the BatchNorm statistics those weights would see, so ``recompute_batchnorm`` measures them
again over the training images, as ``swa_utils.update_bn`` does.

Its weights go into checkpoints (``ema``, ``swa``) and its update count into the training state, so a
resumed run continues the same average.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable

import torch
from torch import nn


class WeightAverage:
    """The average of ``model``'s weights, kept in ``module`` (a copy of ``model``, in eval mode): a moving one with
    ``decay``, an equal one without."""

    def __init__(self, model: nn.Module, decay: float | None = None) -> None:
        if decay is not None and not 0 < decay < 1:
            raise ValueError(f"decay {decay} is not between 0 and 1")
        self.decay = decay
        self.updates = 0
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        live = {**dict(model.named_parameters()), **dict(model.named_buffers())}
        mine = {**dict(self.module.named_parameters()), **dict(self.module.named_buffers())}
        floats = [name for name, value in live.items() if value.is_floating_point()]
        self._averaged = [mine[name] for name in floats]
        self._followed = [live[name].detach() for name in floats]
        self._copied = [(mine[name], live[name]) for name in live if not live[name].is_floating_point()]

    def current_decay(self) -> float:
        """The decay of the next update (lower at first: the warm-up; the share of the updates so far when equal)."""
        t = self.updates + 1
        if self.decay is None:
            return (t - 1) / t
        return min(self.decay, (1 + t) / (10 + t))

    @torch.no_grad()
    def update(self) -> None:
        """Move the average towards the model's weights as they are now (after an optimiser step)."""
        weight = 1 - self.current_decay()
        self.updates += 1
        if self._averaged:
            torch._foreach_lerp_(self._averaged, self._followed, weight)
        for mine, live in self._copied:
            mine.copy_(live)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The averaged weights, a state dict like the model's (a checkpoint's ``ema``)."""
        return self.module.state_dict()

    def load_state_dict(self, weights: dict[str, torch.Tensor], updates: int) -> None:
        self.module.load_state_dict(weights)
        self.updates = updates


@torch.no_grad()
def recompute_batchnorm(module: nn.Module, inputs: Iterable[torch.Tensor], forward: Callable[[torch.Tensor], object]) -> bool:
    """Set ``module``'s BatchNorm running statistics to those of ``inputs`` (each batch weighing the same, as
    ``torch.optim.swa_utils.update_bn``), calling ``forward`` (the module, maybe under autocast) on each; False when
    the module has no BatchNorm. Only BatchNorm is put in training mode: dropout stays off, as when testing, and
    draws no random numbers. The module is left in eval mode."""
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not norms:
        return False
    momenta = {m: m.momentum for m in norms}
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average over the batches
    module.eval()
    for m in norms:
        m.train()
    try:
        for x in inputs:
            forward(x)
    finally:
        for m, momentum in momenta.items():
            m.momentum = momentum
        module.eval()
    return True
