"""Usage: ``make_activation("relu")``: building blocks shared by the model builders."""

from __future__ import annotations

from typing import Literal, get_args

from torch import nn

ActivationName = Literal["sigmoid", "relu", "tanh", "gelu", "silu", "elu", "leaky_relu", "mish", "identity"]
PoolName = Literal["avg", "max"]

_ACTIVATIONS: dict[str, type[nn.Module]] = {
    "sigmoid": nn.Sigmoid,
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "elu": nn.ELU,
    "leaky_relu": nn.LeakyReLU,
    "mish": nn.Mish,
    "identity": nn.Identity,
}
assert set(_ACTIVATIONS) == set(get_args(ActivationName))


def make_activation(name: str) -> nn.Module:
    if name not in _ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; choose one of {', '.join(_ACTIVATIONS)}")
    return _ACTIVATIONS[name]()


def make_pool(kind: str, kernel_size: int = 2, stride: int = 2) -> nn.Module:
    if kind == "avg":
        return nn.AvgPool2d(kernel_size, stride)
    if kind == "max":
        return nn.MaxPool2d(kernel_size, stride)
    raise ValueError(f"unknown pooling {kind!r}; choose avg or max")
