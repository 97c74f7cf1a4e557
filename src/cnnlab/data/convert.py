"""Usage: ``spec = shaped(source.describe(cfg), cfg)``; ``images = converted(images, spec)``: data.image_size and data.channels.

A data set's images made the size and channel count the config asks for, once, as they are loaded:
resized with an antialiased bilinear filter (``data.image_size``: one side or [height, width]), grey
made RGB by repeating the channel and RGB made grey by the ITU-R BT.601 luma weights
(``data.channels``: 1 or 3). The defaults (``null``, ``auto``) keep the set's own images untouched.
"""

from __future__ import annotations

from typing import Any

import torch

from cnnlab.data.spec import DataSpec
from cnnlab.errors import UserError

LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601: what PIL's convert("L") and torchvision's rgb_to_grayscale use
CHUNK = 1024  # images converted at a time: bounds the float copy a resize makes


def shaped(spec: DataSpec, cfg: Any) -> DataSpec:
    """``spec`` with the channels and image size ``cfg`` (a ``DataConfig``) asks for; a conversion that
    cannot be made (grey from a 4-channel set) is a ``UserError``."""
    channels = getattr(cfg, "channels", "auto")
    size = getattr(cfg, "image_size", None)
    changes: dict[str, Any] = {}
    if channels != "auto" and channels != spec.channels:
        if {channels, spec.channels} != {1, 3}:
            raise UserError(f"data.channels: {channels}: cnnlab converts grey (1 channel) and colour (3 channels) into each "
                            f"other; {spec.title}'s images have {spec.channels}. Use data.channels: auto")
        changes["channels"] = channels
    if size is not None:
        changes["image_size"] = (size, size) if isinstance(size, int) else tuple(size)
    return spec.model_copy(update=changes) if changes else spec


def converted(images: torch.Tensor, spec: DataSpec) -> torch.Tensor:
    """uint8 images [N, C, H, W] as ``spec`` describes them (its channels and size); the same tensor when they are."""
    size = tuple(spec.image_size)
    if images.shape[1] == spec.channels and tuple(images.shape[2:]) == size:
        return images
    out = torch.empty((len(images), spec.channels, *size), dtype=torch.uint8)
    for start in range(0, len(images), CHUNK):
        chunk = images[start : start + CHUNK]
        if spec.channels == 1 and chunk.shape[1] == 3:  # fewer channels first: less to resize
            chunk = grey(chunk)
        chunk = resized(chunk, size)
        out[start : start + CHUNK] = chunk.expand(-1, spec.channels, -1, -1)  # grey -> RGB: the channel repeated
    return out


def grey(images: torch.Tensor) -> torch.Tensor:
    """uint8 RGB [N, 3, H, W] -> uint8 grey [N, 1, H, W] by the BT.601 luma weights, rounded."""
    weights = torch.tensor(LUMA).view(1, 3, 1, 1)
    return (images.float() * weights).sum(1, keepdim=True).round_().clamp_(0, 255).to(torch.uint8)


def resized(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """uint8 [N, C, H, W] -> uint8 [N, C, *size], bilinear and antialiased (no aliasing when shrinking)."""
    if tuple(images.shape[2:]) == size:
        return images
    x = torch.nn.functional.interpolate(images.float(), size=size, mode="bilinear", antialias=True, align_corners=False)
    return x.round_().clamp_(0, 255).to(torch.uint8)
