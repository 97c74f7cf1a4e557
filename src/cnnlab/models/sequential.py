"""Usage: a model written in YAML, no Python needed::

    model:
      name: sequential
      layers:
        - conv: {out: 6, kernel: 5, padding: 2}
        - sigmoid
        - pool: avg
        - conv: {out: 16, kernel: 5}
        - sigmoid
        - pool: avg
        - flatten
        - linear: 120
        - sigmoid
        - linear: 84
        - sigmoid
        - linear: 10

Each layer is a name (``flatten``, ``bn``, ``relu``...) or a one-key mapping from a layer type to its
arguments: a mapping, or one value for the first argument (``linear: 120``, ``pool: max``).
Input channels and feature sizes are inferred by passing a probe image through the layers built
so far, so nothing is hand-computed. The last layer must output ``num_classes`` features.
"""

from __future__ import annotations

import difflib
from typing import Any, Literal, get_args

import torch
from pydantic import BaseModel, ConfigDict, PositiveInt, ValidationError, confloat
from torch import nn

from cnnlab.models.layers import ActivationName, Inception, Residual, check_fits, make_activation, sides
from cnnlab.models.nin import nin_block
from cnnlab.models.registry import ModelArgumentError, register_model
from cnnlab.models.vgg import vgg_block


class Spec(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Conv(Spec):
    out: PositiveInt
    kernel: PositiveInt = 3
    stride: PositiveInt = 1
    padding: int | Literal["same"] = 0
    bias: bool = True


class Pool(Spec):
    kind: Literal["max", "avg"] = "max"
    size: PositiveInt = 2
    stride: PositiveInt | None = None  # default: size
    padding: int = 0


class GlobalPool(Spec):
    kind: Literal["avg", "max"] = "avg"


class Linear(Spec):
    out: PositiveInt
    bias: bool = True


class Dropout(Spec):
    p: confloat(ge=0, lt=1) = 0.5


class Act(Spec):
    name: ActivationName


class NoArgs(Spec):
    pass


class ResidualSpec(Spec):
    out: PositiveInt
    stride: PositiveInt = 1


class InceptionSpec(Spec):
    ch1: PositiveInt
    ch2: tuple[PositiveInt, PositiveInt]
    ch3: tuple[PositiveInt, PositiveInt]
    ch4: PositiveInt


class VGGBlock(Spec):
    convs: PositiveInt
    out: PositiveInt
    batch_norm: bool = False


class NiNBlock(Spec):
    out: PositiveInt
    kernel: PositiveInt = 3
    stride: PositiveInt = 1
    padding: int = 1


# layer type -> (argument model, builder from (spec, input shape without batch))
LAYERS: dict[str, tuple[type[Spec], Any]] = {
    "conv": (Conv, lambda s, shape: nn.Conv2d(shape[0], s.out, s.kernel, s.stride, s.padding, bias=s.bias)),
    "pool": (Pool, lambda s, shape: (nn.MaxPool2d if s.kind == "max" else nn.AvgPool2d)(s.size, s.stride or s.size, s.padding)),
    "global_pool": (GlobalPool, lambda s, shape: nn.AdaptiveMaxPool2d(1) if s.kind == "max" else nn.AdaptiveAvgPool2d(1)),
    "linear": (Linear, lambda s, shape: nn.Linear(shape[0], s.out, bias=s.bias)),
    "dropout": (Dropout, lambda s, shape: nn.Dropout(s.p)),
    "act": (Act, lambda s, shape: make_activation(s.name)),
    "bn": (NoArgs, lambda s, shape: nn.BatchNorm2d(shape[0]) if len(shape) == 3 else nn.BatchNorm1d(shape[0])),
    "flatten": (NoArgs, lambda s, shape: nn.Flatten()),
    "residual": (ResidualSpec, lambda s, shape: Residual(shape[0], s.out, s.out != shape[0] or s.stride != 1, s.stride)),
    "inception": (InceptionSpec, lambda s, shape: Inception(shape[0], s.ch1, s.ch2, s.ch3, s.ch4)),
    "vgg_block": (VGGBlock, lambda s, shape: vgg_block(s.convs, shape[0], s.out, s.batch_norm, pool=True)),
    "nin_block": (NiNBlock, lambda s, shape: nin_block(shape[0], s.out, s.kernel, s.stride, s.padding)),
}
ACTIVATIONS = get_args(ActivationName)
NEEDS_IMAGE = {"conv", "pool", "global_pool", "residual", "inception", "vgg_block", "nin_block"}


def parse_layer(item: Any, where: str) -> tuple[str, Spec]:
    """A YAML layer item -> (type, validated arguments)."""
    if isinstance(item, str):
        kind, args = item, {}
    elif isinstance(item, dict) and len(item) == 1:
        kind, args = next(iter(item.items()))
    else:
        raise ModelArgumentError(f"{where}: expected a layer name or a one-key mapping like `conv: {{out: 6}}`, got {item!r}")
    if kind in ACTIVATIONS:
        kind, args = "act", {"name": kind}
    if kind not in LAYERS:
        close = difflib.get_close_matches(str(kind), [*LAYERS, *ACTIVATIONS], n=1, cutoff=0.6)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ModelArgumentError(f"{where}: unknown layer type {kind!r}{hint}; layer types: {', '.join([*LAYERS, *ACTIVATIONS])}")
    model = LAYERS[kind][0]
    if args is None:
        args = {}
    if not isinstance(args, dict):
        first = next(iter(model.model_fields), None)
        if first is None:
            raise ModelArgumentError(f"{where} ({kind}): takes no arguments, got {args!r}")
        args = {first: args}
    try:
        return kind, model.model_validate(args)
    except ValidationError as err:
        problems = []
        for e in err.errors():
            key = ".".join(map(str, e["loc"]))
            if e["type"] == "extra_forbidden":
                close = difflib.get_close_matches(key, list(model.model_fields), n=1, cutoff=0.6)
                hint = f" (did you mean '{close[0]}'?)" if close else ""
                problems.append(f"unknown argument '{key}'{hint}; {kind} takes {', '.join(model.model_fields) or 'none'}")
            else:
                problems.append(f"{key}: {e['msg']}")
        raise ModelArgumentError(f"{where} ({kind}): " + "; ".join(problems)) from None


@register_model("sequential")
def sequential(
    num_classes: int = 10, in_channels: int = 1, *, layers: list[Any],
    image_size: PositiveInt | tuple[PositiveInt, PositiveInt] = 28,
) -> nn.Sequential:
    """Your own network as a list of layer specs in the config (conv, bn, act, pool, linear, residual, inception...)."""
    if not layers:
        raise ModelArgumentError("model.layers: give at least one layer")
    modules: list[nn.Module] = []
    x = torch.zeros(1, in_channels, *sides(image_size))
    for i, item in enumerate(layers):
        where = f"model.layers[{i}]"
        kind, spec = parse_layer(item, where)
        shape = tuple(x.shape[1:])
        if kind in NEEDS_IMAGE and len(shape) != 3:
            raise ModelArgumentError(f"{where} ({kind}): needs an image (channels x height x width) but gets {shape}; "
                                     "move it before `flatten`")
        if kind == "linear" and len(shape) != 1:
            raise ModelArgumentError(f"{where} (linear): gets a {'x'.join(map(str, shape))} image; put `flatten` before it")
        module = LAYERS[kind][1](spec, shape)
        try:
            with torch.no_grad():
                x = module.eval()(x)
        except RuntimeError as err:
            check_fits(nn.Sequential(*modules, module), (in_channels, *sides(image_size)))  # a map that vanishes: named
            raise ModelArgumentError(
                f"{where} ({kind}): cannot take a {'x'.join(map(str, shape))} input: {str(err).splitlines()[0]}"
            ) from None
        module.train()
        modules.append(module)
    if tuple(x.shape[1:]) != (num_classes,):
        raise ModelArgumentError(
            f"model.layers: the last layer outputs {'x'.join(map(str, x.shape[1:]))}, but the model must output "
            f"{num_classes} class scores; end with `flatten` (if needed) and `linear: {num_classes}`"
        )
    return nn.Sequential(*modules)
