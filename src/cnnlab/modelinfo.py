"""Usage: ``rows, total_flops = profile(model, spec.input_shape)``; ``flops_per_image(model, spec.input_shape)``.

What ``cnnlab summary`` prints, for one image of the shape the data's description gives (channels,
height, width).

FLOPs count the multiply-adds of convolutions and matrix products (2 FLOPs each), as
``torch.utils.flop_counter`` does; activations, pooling and normalisation are not counted. cnnlab's own
models are counted layer by layer here; others by PyTorch's counter (``countable``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


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


# Layers whose FLOPs are counted here without PyTorch's FLOP counter (whose import pulls in torch._dynamo, 0.7 to
# 1.4 s of a run's start): convolutions and matrix products, and layers that compute neither (counted 0, as
# ``torch.utils.flop_counter`` counts them). A model with any other layer, or a class from outside cnnlab's own model
# families (a library's or the user's, whose forward may multiply matrices itself), is counted by PyTorch's counter.
ZERO_FLOP_LAYERS = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid,
    nn.Mish, nn.Softmax, nn.LogSoftmax, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d,
    nn.BatchNorm1d, nn.BatchNorm2d, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm, nn.Dropout, nn.Dropout2d,
    nn.Flatten, nn.Identity,
)
CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


def countable(model: nn.Module) -> bool:
    """Whether ``layer_flops`` counts every FLOP ``model`` computes (see ``ZERO_FLOP_LAYERS``)."""
    for module in model.modules():
        kind = type(module)
        if kind in (nn.Conv2d, nn.Linear) or kind in CONTAINERS or kind in ZERO_FLOP_LAYERS:
            continue
        if not kind.__module__.startswith("cnnlab.models."):  # its forward may do what no layer shows
            return False
    return True


def layer_flops(module: nn.Module, output: torch.Tensor) -> int:
    """FLOPs of one Conv2d or Linear call that produced ``output`` (2 per multiply-add, bias not counted)."""
    if isinstance(module, nn.Conv2d):
        kernel = module.kernel_size[0] * module.kernel_size[1]
        return 2 * output.numel() * (module.in_channels // module.groups) * kernel
    if isinstance(module, nn.Linear):
        return 2 * output.numel() * module.in_features
    return 0


@torch.no_grad()
def profile(model: nn.Module, input_shape: tuple[int, ...]) -> tuple[list[LayerRow], int]:
    """One row per top-level layer (output shape for one image, parameters, FLOPs) and total FLOPs."""
    shapes: dict[str, tuple[int, ...]] = {}
    flops: dict[str, int] = {}  # per top-level layer
    count = countable(model)
    hooks = [
        child.register_forward_hook(lambda _m, _i, out, name=name: shapes.__setitem__(name, tuple(out.shape[1:])))
        for name, child in model.named_children()
    ]
    if count:
        for name, module in model.named_modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                top = name.split(".", 1)[0]
                hooks.append(module.register_forward_hook(
                    lambda m, _i, out, top=top: flops.__setitem__(top, flops.get(top, 0) + layer_flops(m, out))))
    was_training = model.training
    model.eval()
    device = next(model.parameters(), torch.empty(0)).device
    try:
        image = torch.zeros(1, *input_shape, device=device)
        if count:
            model(image)
            total = sum(flops.values())
        else:
            from torch.utils.flop_counter import FlopCounterMode

            with FlopCounterMode(display=False) as counter:
                model(image)
            root = type(model).__name__
            flops = {k.removeprefix(f"{root}."): sum(v.values()) for k, v in counter.get_flop_counts().items()}
            total = int(counter.get_total_flops())
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    rows = [
        LayerRow(name, short_repr(child), shapes.get(name, ()), count_params(child), flops.get(name, 0))
        for name, child in model.named_children()
    ]
    return rows, total


def flops_per_image(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    return profile(model, input_shape)[1]
