"""Usage: ``mix = Mix(mixup=0.2, cutmix=1.0, num_classes=10, generator=torch.Generator().manual_seed(2))``;
``x, targets = mix(x, y)``.

Mixup and CutMix (``data.augment.mixup``, ``data.augment.cutmix``) on whole training batches on the
device, as timm's ``Mixup`` does in its batch mode: each batch is blended with itself in reverse order,
so no second batch is read and no index is drawn. Mixup blends the pictures by a weight drawn from
Beta(alpha, alpha); CutMix pastes a rectangle of the reversed batch in, of an area drawn the same way,
and weighs the labels by the area actually pasted (the rectangle is clipped at the edges). The
targets are class probabilities, ``weight * one_hot(y) + (1 - weight) * one_hot(y reversed)``,
which ``nn.CrossEntropyLoss`` takes as they are (label smoothing applied on top).

One weight per batch, drawn on the host from the mixing generator (a CPU ``torch.Generator``, saved
in checkpoints with the others): the rectangle's corners are Python numbers, so the device is never
read back, and a seeded run draws the same weights again, after a resume too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class Mix:
    mixup: float  # Beta(mixup, mixup) draws Mixup's weight; 0 = no Mixup
    cutmix: float  # Beta(cutmix, cutmix) draws CutMix's kept area; 0 = no CutMix
    num_classes: int
    generator: torch.Generator  # on the CPU

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mixed images, target probabilities of shape (N, num_classes)) of a batch ``x`` with labels ``y``."""
        cut = self.cutmix > 0 and (self.mixup == 0 or self._uniform() < 0.5)
        if cut:
            weight = beta(self.cutmix, self.generator)
            x, weight = self._cutmix(x, weight)
        else:
            weight = beta(self.mixup, self.generator)
            x = x * weight + x.flip(0) * (1 - weight)
        one_hot = torch.nn.functional.one_hot(y, self.num_classes).float()
        return x, one_hot * weight + one_hot.flip(0) * (1 - weight)

    def _cutmix(self, x: torch.Tensor, weight: float) -> tuple[torch.Tensor, float]:
        """``x`` with a rectangle of about ``1 - weight`` of its area from the reversed batch; the weight of the
        kept picture, as pasted after clipping."""
        h, w = x.shape[-2:]
        ratio = math.sqrt(1 - weight)
        cut_h, cut_w = int(h * ratio), int(w * ratio)
        cy, cx = int(self._uniform() * h), int(self._uniform() * w)
        top, bottom = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, h)
        left, right = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, w)
        mixed = x.clone()
        mixed[..., top:bottom, left:right] = x.flip(0)[..., top:bottom, left:right]
        return mixed, 1 - (bottom - top) * (right - left) / (h * w)

    def _uniform(self) -> float:
        return torch.rand((), generator=self.generator).item()


def beta(alpha: float, generator: torch.Generator) -> float:
    """A draw from Beta(alpha, alpha) with ``generator``: the first of two Gamma(alpha) draws over their sum
    (torch's own Beta and Gamma samplers take no generator)."""
    first, second = gamma(alpha, generator), gamma(alpha, generator)
    total = first + second
    return first / total if total > 0 else 0.5


def gamma(shape: float, generator: torch.Generator) -> float:
    """A draw from Gamma(shape, 1) by Marsaglia and Tsang's method (2000); shapes below 1 by its boost,
    Gamma(shape + 1) * U^(1/shape)."""
    if shape < 1:
        boost = (1 - torch.rand((), generator=generator).item()) ** (1 / shape)  # U in (0, 1]
        return gamma(shape + 1, generator) * boost
    d = shape - 1 / 3
    c = 1 / math.sqrt(9 * d)
    while True:
        z = torch.randn((), generator=generator).item()
        v = (1 + c * z) ** 3
        if v <= 0:
            continue
        u = 1 - torch.rand((), generator=generator).item()
        if math.log(u) < 0.5 * z * z + d - d * v + d * math.log(v):
            return d * v
