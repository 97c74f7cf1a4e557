"""Usage: ``x = TrivialAugment()(x, generator)`` on a float batch in [0, 1], (N, C, H, W), C 1 or 3.

TrivialAugment (Müller and Hutter, 2021; ``data.augment.trivial``) on a whole batch on the device: each
picture gets one operation drawn uniformly from the list below, at a strength drawn uniformly from 31
levels (and a random sign where the operation has one), every draw from the data's augmentation
generator, so seeded runs repeat and resume exactly. The strengths are those of torchvision's
``TrivialAugmentWide``, except that translations go up to a third of the side (torchvision's 32 pixels
would move a 28x28 picture out of sight).

torchvision.transforms.v2's ``TrivialAugmentWide`` takes a batch too, but gives every picture of it the
same operation and draws from torch's global generator; this one draws per picture. ``equalize`` is
left out (a histogram per picture does not batch); the other 13 operations are here. Geometric ones
sample the nearest pixel and fill with black, as torchvision's do.
"""

from __future__ import annotations

import math

import torch

OPERATIONS = ("identity", "shear_x", "shear_y", "translate_x", "translate_y", "rotate", "brightness", "color",
              "contrast", "sharpness", "posterize", "solarize", "autocontrast")
GEOMETRIC = ("shear_x", "shear_y", "translate_x", "translate_y", "rotate")
LEVELS = 31
MAX_SHEAR = 0.99
MAX_TRANSLATE = 1 / 3  # of the side
MAX_DEGREES = 135.0
MAX_ENHANCE = 0.99  # brightness, colour, contrast, sharpness: a factor of 1 +- this
LUMA = (0.2989, 0.587, 0.114)  # ITU-R BT.601 as torchvision rounds it in its grey conversion


class TrivialAugment:
    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        n = len(x)
        dev = x.device
        op = torch.randint(0, len(OPERATIONS), (n,), device=dev, generator=generator)
        level = torch.randint(0, LEVELS, (n,), device=dev, generator=generator).float() / (LEVELS - 1)  # 0 to 1
        sign = torch.where(torch.rand(n, device=dev, generator=generator) < 0.5, -1.0, 1.0)
        return apply(x, op, level, level * sign)


def apply(x: torch.Tensor, op: torch.Tensor, level: torch.Tensor, signed: torch.Tensor) -> torch.Tensor:
    """Each picture ``x[i]`` under operation ``OPERATIONS[op[i]]`` at strength ``level[i]`` in [0, 1]
    (``signed[i]``: the same with its sign, for those that have one)."""
    def chosen(name: str) -> torch.Tensor:
        return (op == OPERATIONS.index(name)).view(-1, 1, 1, 1)

    first, last = OPERATIONS.index(GEOMETRIC[0]), OPERATIONS.index(GEOMETRIC[-1])  # the geometric ones are in a row
    x = torch.where(((op >= first) & (op <= last)).view(-1, 1, 1, 1), warped(x, op, signed), x)
    grey = x if x.shape[1] == 1 else sum(w * x[:, i:i + 1] for i, w in enumerate(LUMA))
    factor = (1 + MAX_ENHANCE * signed).view(-1, 1, 1, 1)
    x = torch.where(chosen("brightness"), x * factor, x)
    x = torch.where(chosen("color"), grey + (x - grey) * factor, x)
    mean = grey.mean((1, 2, 3), keepdim=True)
    x = torch.where(chosen("contrast"), mean + (x - mean) * factor, x)
    x = torch.where(chosen("sharpness"), sharpened(x, factor), x)
    bits = (8 - (level * 6).round()).view(-1, 1, 1, 1)  # 8 to 2 bits
    step = 2 ** (8 - bits)
    x = torch.where(chosen("posterize"), ((x * 255).round() / step).floor() * step / 255, x)
    threshold = (1 - level).view(-1, 1, 1, 1)
    x = torch.where(chosen("solarize") & (x >= threshold), 1 - x, x)
    low, high = x.amin((2, 3), keepdim=True), x.amax((2, 3), keepdim=True)
    stretched = torch.where(high > low, (x - low) / (high - low).clamp_min(1e-8), x)
    x = torch.where(chosen("autocontrast"), stretched, x)
    return x.clamp(0, 1)


def warped(x: torch.Tensor, op: torch.Tensor, signed: torch.Tensor) -> torch.Tensor:
    """Every picture under its affine operation (shear, translate, rotate; others unmoved), nearest pixel,
    black outside. The matrices map output coordinates to input ones, in grid_sample's [-1, 1] units."""
    n, _, h, w = x.shape
    theta = torch.zeros(n, 2, 3, device=x.device)
    theta[:, 0, 0] = theta[:, 1, 1] = 1

    def is_(name: str) -> torch.Tensor:
        return op == OPERATIONS.index(name)

    shear = MAX_SHEAR * signed
    theta[:, 0, 1] = torch.where(is_("shear_x"), shear * h / w, theta[:, 0, 1])
    theta[:, 1, 0] = torch.where(is_("shear_y"), shear * w / h, theta[:, 1, 0])
    shift = 2 * MAX_TRANSLATE * signed  # the side is 2 units
    theta[:, 0, 2] = torch.where(is_("translate_x"), shift, theta[:, 0, 2])
    theta[:, 1, 2] = torch.where(is_("translate_y"), shift, theta[:, 1, 2])
    angle = signed * math.radians(MAX_DEGREES)
    rotate = is_("rotate")
    cos, sin = angle.cos(), angle.sin()
    theta[:, 0, 0] = torch.where(rotate, cos, theta[:, 0, 0])
    theta[:, 0, 1] = torch.where(rotate, -sin * h / w, theta[:, 0, 1])
    theta[:, 1, 0] = torch.where(rotate, sin * w / h, theta[:, 1, 0])
    theta[:, 1, 1] = torch.where(rotate, cos, theta[:, 1, 1])
    grid = torch.nn.functional.affine_grid(theta, list(x.shape), align_corners=False)
    return torch.nn.functional.grid_sample(x, grid, mode="nearest", padding_mode="zeros", align_corners=False)


def sharpened(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """PIL's sharpness: a blend of each picture with its smoothed self (3x3 kernel, centre 5, border kept)."""
    c = x.shape[1]
    kernel = torch.ones(3, 3, device=x.device)  # made on the device: a captured step copies nothing from the host
    kernel[1, 1] = 5
    kernel = kernel / 13
    smooth = torch.nn.functional.conv2d(x, kernel.expand(c, 1, 3, 3), padding=1, groups=c)
    inner = torch.zeros_like(x, dtype=torch.bool)
    inner[..., 1:-1, 1:-1] = True
    smooth = torch.where(inner, smooth, x)
    return smooth + (x - smooth) * factor
