"""Usage: ``builder = library_builder("torchvision.resnet18")``; ``builder(num_classes=10, in_channels=1)``.

Models of the libraries people use, by name: ``torchvision.NAME`` (every classification builder of
``torchvision.models``) and ``timm.NAME`` (``pip install 'cnnlab[timm]'``). Names are looked up in the
libraries' own registries, nothing is imported from the string, so a run naming one needs no
``--trust-code``. Each builder is wrapped to cnnlab's shape, ``builder(num_classes, in_channels,
**options)``, with a signature that lists the options the library's builder and its model class take
(so configs are validated before anything is built). timm takes the channel count (``in_chans``);
torchvision's models are built for 3 channels, so their first convolution is rebuilt for the data's,
said in one line. Both build their head for the data's classes. No weights are ever loaded here.
``library_names`` and ``library_params`` list them for ``cnnlab models --source``.
"""

from __future__ import annotations

import difflib
import fnmatch
import inspect
import re
import typing
from collections.abc import Callable
from typing import Any

from pydantic import TypeAdapter
from torch import nn

from cnnlab.errors import UserError, say

SOURCES = ("torchvision", "timm")
# Keywords the library builders take that cnnlab supplies itself or does not offer (weights come later).
_NOT_OPTIONS = {"self", "num_classes", "in_channels", "in_chans", "weights", "progress", "pretrained"}


class LibraryModelError(UserError):
    """A library model name that the library does not know, or a library that is not installed."""


def source_of(name: str) -> str | None:
    """``"torchvision"`` for ``"torchvision.resnet18"``, ``"timm"`` for ``"timm.resnet10t"``, else None."""
    source, dot, _ = name.partition(".")
    return source if dot and source in SOURCES else None


def library_names(source: str, pattern: str | None = None) -> list[str]:
    """The library's classification models as ``source.NAME``, those matching ``pattern`` (a glob such as
    ``resnet*``, or a part of the name) only when given."""
    if source == "torchvision":
        from torchvision import models

        names = models.list_models(module=models)
    else:
        names = _timm().list_models()
    if pattern:
        glob = pattern if any(c in pattern for c in "*?[") else f"*{pattern}*"
        names = [n for n in names if fnmatch.fnmatchcase(n, glob)]
    return sorted(f"{source}.{n}" for n in names)


def library_builder(name: str) -> Callable[..., nn.Module]:
    """cnnlab's builder for the library model ``name``; an unknown name is a LibraryModelError with its
    nearest names."""
    source = source_of(name)
    short = name.partition(".")[2]
    known = library_names(source)
    if name not in known:
        close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
        hint = f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""
        raise LibraryModelError(
            f"model.name: {source} has no classification model {short!r}{hint}; "
            f"`cnnlab models --source {source} PATTERN` lists them")
    original = _torchvision_builder(short) if source == "torchvision" else _timm().models.model_entrypoint(short)

    def build(num_classes: int = 10, in_channels: int = 1, **options: Any) -> nn.Module:
        model, note = construct(name, num_classes, in_channels, options)
        if note:
            say(note)
        return model

    build.__doc__ = f"{source}'s {short} ({original.__module__})"
    build.__signature__ = _signature(original)  # type: ignore[attr-defined]
    build.__annotations__ = {p.name: p.annotation for p in build.__signature__.parameters.values()}  # type: ignore
    return build


def construct(name: str, num_classes: int, in_channels: int, options: dict[str, Any]) -> tuple[nn.Module, str]:
    """The library model ``name`` built for the data, and one line saying what was rebuilt (or "")."""
    source, _, short = name.partition(".")
    if source == "timm":
        return _timm().create_model(short, pretrained=False, num_classes=num_classes, in_chans=in_channels, **options), ""
    builder = _torchvision_builder(short)
    if "aux_logits" in _signature(builder).parameters:
        # googlenet, inception_v3: cnnlab trains on one output; their usual initialisation, without the warning
        options = {"aux_logits": False, "init_weights": True, **options}
    model = builder(num_classes=num_classes, **options)
    if in_channels == 3:
        return model, ""
    where = rebuild_first_conv(model, in_channels)
    channels = f"{in_channels} input channel{'' if in_channels == 1 else 's'}"
    return model, f"{name}: first convolution {where} rebuilt for {channels} (torchvision builds 3)"


def rebuild_first_conv(model: nn.Module, in_channels: int) -> str:
    """Replace the first convolution of ``model`` by a new one taking ``in_channels``; its dotted name."""
    for where, conv in model.named_modules():
        if isinstance(conv, nn.Conv2d):
            break
    else:
        raise ValueError("it has no convolution to take the input channels")
    new = nn.Conv2d(in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                    bias=conv.bias is not None, padding_mode=conv.padding_mode, device=conv.weight.device,
                    dtype=conv.weight.dtype)
    parent_name, _, attr = where.rpartition(".")
    setattr(model.get_submodule(parent_name), attr, new)
    return where


def _signature(original: Callable[..., nn.Module]) -> inspect.Signature:
    """``(num_classes, in_channels, *, OPTION=...)``: the keyword options of the library's builder and of the
    model class it returns (named by its return annotation), each with its type hint where pydantic can
    check it. The class's parameters that torchvision's builder fills itself are left out (see _filled)."""
    options: dict[str, inspect.Parameter] = {}
    model_init = _model_class_init(original)
    filled = _filled(original, model_init)
    for function in (original, model_init):
        if function is None:
            continue
        hints = _hints(function)
        for param in inspect.signature(function).parameters.values():
            if param.name in _NOT_OPTIONS or param.name in filled or param.name in options or \
                    param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
                continue
            default = None if param.default is param.empty else param.default
            options[param.name] = inspect.Parameter(param.name, param.KEYWORD_ONLY, default=default,
                                                    annotation=hints.get(param.name, Any))
    data = [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=d, annotation=int)
            for n, d in (("num_classes", 10), ("in_channels", 1))]
    return inspect.Signature([*data, *options.values()])


def _filled(original: Callable[..., nn.Module], model_init: Callable[..., Any] | None) -> set[str]:
    """The model class's parameters without a default that a torchvision builder passes itself (ResNet's
    ``block`` and ``layers``): giving one is a collision, so it is no option. The exceptions are those its
    module reads from the builder's ``**kwargs`` with a default (ViT's ``image_size``, EfficientNet's
    ``dropout``), found in that module's source. timm's builders let the caller's keywords win, so all are options."""
    if model_init is None or not original.__module__.startswith("torchvision."):
        return set()
    required = {p.name for p in inspect.signature(model_init).parameters.values()
                if p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
    try:
        source = inspect.getsource(inspect.getmodule(original))
    except (OSError, TypeError):  # no source installed: every required parameter counts as filled
        source = ""
    return required - set(re.findall(r"""kwargs\.pop\(["'](\w+)["'],""", source))


def _model_class_init(original: Callable[..., nn.Module]) -> Callable[..., Any] | None:
    try:
        returns = typing.get_type_hints(original).get("return")
    except Exception:  # an annotation that does not resolve: the builder's own options only
        return None
    return returns.__init__ if isinstance(returns, type) and issubclass(returns, nn.Module) else None


def _hints(function: Callable[..., Any]) -> dict[str, Any]:
    """The type hints pydantic can check; the others (and any it cannot resolve) are left out (Any)."""
    try:
        hints = typing.get_type_hints(function)
    except Exception:  # a library's forward reference that does not resolve: no hints is still correct
        return {}
    checkable = {}
    for key, hint in hints.items():
        try:
            TypeAdapter(hint)
        except Exception:  # pydantic cannot build a validator for it (a torch class, a callable protocol)
            continue
        checkable[key] = hint
    return checkable


def _torchvision_builder(short: str) -> Callable[..., nn.Module]:
    from torchvision import models

    return models.get_model_builder(short)


def _timm() -> Any:
    try:
        import timm
    except ImportError:
        raise LibraryModelError("model.name: timm models need timm: pip install 'cnnlab[timm]'") from None
    return timm


COUNT_AT_MOST = 100  # parameter counts for this many models at most (timm's ~1,300 would take minutes)


def library_params(name: str, num_classes: int, in_channels: int, **options: Any) -> int | None:
    """The parameter count of library model ``name`` built for the data, without allocating its weights (built
    on the meta device); None for a model whose builder needs real numbers while building (torchvision's regnets)."""
    import torch

    try:
        with torch.device("meta"):
            model, _ = construct(name, num_classes, in_channels, options)
    except Exception:  # a builder that computes with tensors cannot build on meta; the count is unknown
        return None
    return sum(p.numel() for p in model.parameters())
