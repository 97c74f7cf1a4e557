"""Usage: ``rows, total_flops = profile(model, spec.input_shape)``; ``flops_per_image(model, spec.input_shape)``.

What ``cnnlab summary`` prints, for one image of the shape the data's description gives (channels,
height, width).

FLOPs count the multiply-adds of convolutions and matrix products (2 FLOPs each), as
``torch.utils.flop_counter`` does; activations, pooling and normalisation are not counted.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def count_params(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


@dataclass
class LayerRow:
    name: str  # the layer's index or attribute name at the top level ("0", "features")
    layer: str  # its class and main arguments, as PyTorch prints it
    output_shape: tuple[int, ...]  # per image, without the batch dimension
    params: int
    flops: int


def _single(value):
    return value[0] if isinstance(value, tuple) and len(set(value)) == 1 else value


def short_repr(module: nn.Module) -> str:
    """A one-line description: ``Conv2d(1, 6, k=5, p=2)``, ``Linear(400, 120)``, ``AvgPool2d(2, s=2)``."""
    if isinstance(module, nn.Conv2d):
        parts = [str(module.in_channels), str(module.out_channels), f"k={_single(module.kernel_size)}"]
        if _single(module.stride) != 1:
            parts.append(f"s={_single(module.stride)}")
        if _single(module.padding) not in (0, "valid"):
            parts.append(f"p={_single(module.padding)}")
        return f"Conv2d({', '.join(parts)})"
    if isinstance(module, nn.Linear):
        return f"Linear({module.in_features}, {module.out_features})"
    if isinstance(module, (nn.AvgPool2d, nn.MaxPool2d)):
        pad = f", p={_single(module.padding)}" if _single(module.padding) else ""
        return f"{type(module).__name__}({_single(module.kernel_size)}, s={_single(module.stride)}{pad})"
    if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
        return f"{type(module).__name__}({module.num_features})"
    if isinstance(module, nn.Flatten):
        return "Flatten"
    extra = module.extra_repr()
    if not list(module.children()) and len(extra) <= 30:
        return f"{type(module).__name__}({extra})"
    return type(module).__name__


@torch.no_grad()
def profile(model: nn.Module, input_shape: tuple[int, ...]) -> tuple[list[LayerRow], int]:
    """One row per top-level layer (output shape for one image, parameters, FLOPs) and total FLOPs."""
    shapes: dict[str, tuple[int, ...]] = {}
    hooks = [
        child.register_forward_hook(lambda _m, _i, out, name=name: shapes.__setitem__(name, tuple(out.shape[1:])))
        for name, child in model.named_children()
    ]
    was_training = model.training
    model.eval()
    device = next(model.parameters(), torch.empty(0)).device
    try:
        with FlopCounterMode(display=False) as counter:
            model(torch.zeros(1, *input_shape, device=device))
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    per_module = {k: sum(v.values()) for k, v in counter.get_flop_counts().items()}
    root = type(model).__name__
    rows = [
        LayerRow(name, short_repr(child), shapes.get(name, ()), count_params(child), per_module.get(f"{root}.{name}", 0))
        for name, child in model.named_children()
    ]
    return rows, int(counter.get_total_flops())


def flops_per_image(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    return profile(model, input_shape)[1]
