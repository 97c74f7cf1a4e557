"""Usage: ``first_conv(model)`` -> ``"conv1"``; ``head(model)`` -> ``"fc"``; ``select(model, ["backbone"])``.

The two parts of a model that fine-tuning treats apart, by dotted name: its first convolution, which
takes the data's channels, and its head, the last layer with weights of its own, which gives the
classes (``fc`` of a ResNet, ``classifier.3`` of MobileNetV3, the last 1x1 convolution of NiN or
SqueezeNet). Everything else is the backbone. Modules are taken in the order the model registers
them, which for every built-in and library model puts the classifier last. ``select`` turns
``train.freeze``'s module prefixes (or ``backbone``) into parameter names.
"""

from __future__ import annotations

from torch import nn

from cnnlab.errors import UserError


def first_conv(model: nn.Module) -> str | None:
    """The dotted name of the model's first ``Conv2d``; None for a model without one."""
    return next((name for name, module in model.named_modules() if isinstance(module, nn.Conv2d)), None)


def head(model: nn.Module) -> str:
    """The dotted name of the last module holding parameters of its own ("" for a model that is one layer)."""
    last = ""
    for name, module in model.named_modules():
        if next(module.parameters(recurse=False), None) is not None:
            last = name
    return last


def within(name: str, prefix: str) -> bool:
    """Whether the dotted ``name`` (a parameter's, a module's) lies in the module ``prefix`` ("" holds everything)."""
    return not prefix or name == prefix or name.startswith(prefix + ".")


BACKBONE = "backbone"  # in train.freeze: every parameter but the head's


def select(model: nn.Module, prefixes: list[str]) -> list[str]:
    """The names of the parameters that ``prefixes`` (module names, or ``backbone``) cover. A prefix that covers
    none is a ``UserError`` listing the model's top-level modules."""
    names = [name for name, _ in model.named_parameters()]
    classifier = head(model)
    chosen: set[str] = set()
    for prefix in prefixes:
        covered = [n for n in names if (not within(n, classifier) if prefix == BACKBONE else within(n, prefix))]
        if not covered:
            tops = ", ".join(dict.fromkeys(n.partition(".")[0] for n in names))
            raise UserError(f"train.freeze: {prefix!r} names no part of the model with parameters; its top-level parts are "
                            f"{tops}, and {BACKBONE} is all but the head ({classifier or 'the whole model'})")
        chosen.update(covered)
    return [n for n in names if n in chosen]
