"""Usage: ``@register_model("lenet")`` on a builder; ``get_model("lenet", activation="relu")``.

A small explicit registry, after torchvision's ``models/_api.py``. Every builder has the same shape,
``builder(num_classes: int = 10, in_channels: int = 1, **options) -> nn.Module``, with type hints on
its options: they are what configs are validated against before anything is built. ``num_classes``
and ``in_channels`` come from the data (``build.py``), never from a config; so does a builder's
``image_size`` option, unless the config sets it.
"""

from __future__ import annotations

import difflib
import functools
import importlib
import inspect
import json
import os
import sys
import typing
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError, create_model
from torch import nn

from cnnlab.errors import UserError
from cnnlab.models.layers import MapVanishes
from cnnlab.models.library import LibraryModelError, library_builder, library_names, source_of

Builder = Callable[..., nn.Module]
RESERVED = ("num_classes", "in_channels")  # supplied by cnnlab from the data, not by configs


class ModelArgumentError(UserError):
    """A model name or a model argument in a config is wrong."""


@dataclass(frozen=True)
class ModelEntry:
    name: str
    builder: Builder

    @property
    def description(self) -> str:
        doc = inspect.getdoc(self.builder) or ""
        return doc.splitlines()[0] if doc else ""

    @cached_property
    def options(self) -> type[BaseModel]:
        """A pydantic model of the builder's keyword options, built from its signature."""
        hints = typing.get_type_hints(self.builder, include_extras=True)
        fields: dict[str, Any] = {}
        for param in inspect.signature(self.builder).parameters.values():
            if param.name in RESERVED or param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
                continue
            default = ... if param.default is param.empty else param.default
            fields[param.name] = (hints.get(param.name, Any), default)
        config = ConfigDict(extra="forbid", arbitrary_types_allowed=True, allow_inf_nan=False)
        return create_model(f"{self.name}_options", __config__=config, **fields)


_REGISTRY: dict[str, ModelEntry] = {}


def register_model(name: str) -> Callable[[Builder], Builder]:
    """Register ``builder`` under ``name``; registering a name twice is a programming error."""

    def decorator(builder: Builder) -> Builder:
        if name in _REGISTRY:
            raise ValueError(f"a model named {name!r} is already registered ({_REGISTRY[name].builder.__qualname__})")
        _REGISTRY[name] = ModelEntry(name, builder)
        return builder

    return decorator


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def import_builder(spec: str) -> ModelEntry:
    """``"my_module:build_net"`` -> the builder ``build_net`` from the user's module ``my_module``.

    The module is imported from ``sys.path``, with the current folder added (as ``python -m`` would).
    """
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ModelArgumentError(f"model.name: {spec!r} should be 'module:function', e.g. my_models:build_net")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name != module_name.split(".")[0] and err.name != module_name:
            raise ModelArgumentError(f"model.name: importing module {module_name!r} failed: {_describe(err)}") from None
        raise ModelArgumentError(
            f"model.name: cannot find module {module_name!r}; put {module_name.replace('.', '/')}.py in the current "
            "folder or on PYTHONPATH"
        ) from None
    except KeyboardInterrupt:
        raise
    except BaseException as err:  # the module's own code failed (SyntaxError, an exception, even sys.exit)
        raise ModelArgumentError(f"model.name: importing module {module_name!r} failed: {_describe(err)}") from None
    builder = getattr(module, attr, None)
    if not callable(builder):
        raise ModelArgumentError(f"model.name: module {module_name!r} has no function {attr!r}")
    return ModelEntry(spec, builder)


def _describe(err: BaseException) -> str:
    if isinstance(err, SystemExit):
        return f"it called sys.exit({err.code!r})"
    if isinstance(err, SyntaxError):
        return f"SyntaxError in {err.filename} line {err.lineno}: {err.msg}"
    return f"{type(err).__name__}: {err}"


def get_entry(name: str) -> ModelEntry:
    if ":" in name:
        return import_builder(name)
    if source_of(name):  # torchvision.NAME, timm.NAME: looked up in the library's registry, nothing imported
        return _library_entry(name)
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=3, cutoff=0.5)
        hint = f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""
        if f"torchvision.{name}" in library_names("torchvision"):
            hint = f" (torchvision's is model.name: torchvision.{name})"
        raise ModelArgumentError(
            f"model.name: unknown model {name!r}{hint}. Registered models: {', '.join(list_models())} "
            "(`cnnlab models` describes them)"
        )
    return _REGISTRY[name]


@functools.lru_cache(maxsize=64)  # a config is validated, then built: its options are read from signatures once
def _library_entry(name: str) -> ModelEntry:
    try:
        return ModelEntry(name, library_builder(name))
    except LibraryModelError as err:
        raise ModelArgumentError(str(err)) from None


FROM_DATA = ("image_size", "img_size")  # options cnnlab sets from the data where a config leaves them out (build.py)


def option_defaults(name: Any, *, from_data: bool = False) -> dict[str, Any]:
    """A registered model's options with defaults, as plain YAML/JSON values (tuples as lists); {} for a name the
    registry does not hold (a library model, a Python one: nothing named by a file is imported). The options the
    data sets where a config leaves them out (``FROM_DATA``) only with ``from_data``: their defaults are not what
    a run uses."""
    if not isinstance(name, str) or name not in list_models():
        return {}
    fields = get_entry(name).options.model_fields
    defaults = {k: f.get_default(call_default_factory=True) for k, f in fields.items()
                if not f.is_required() and (from_data or k not in FROM_DATA)}
    return json.loads(json.dumps(defaults, default=str))


def validate_model_args(name: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The builder's options as given, type-checked and coerced; errors name ``model.<key>``."""
    entry = get_entry(name)
    fields = list(entry.options.model_fields)
    problems = []
    for key in kwargs:
        if key in RESERVED:
            problems.append(f"model.{key}: set by cnnlab from the data set; remove it from the config")
        elif key not in fields:
            close = difflib.get_close_matches(key, fields, n=1, cutoff=0.6)
            hint = f" (did you mean 'model.{close[0]}'?)" if close else ""
            takes = ", ".join(fields) or "no options"
            problems.append(f"model.{key}: model {name!r} takes no argument {key!r}{hint}; it takes: {takes}")
    if problems:
        raise ModelArgumentError("\n  ".join(problems))
    try:
        checked = entry.options.model_validate(kwargs)
    except ValidationError as err:
        # A union type (int or pair) reports once per member; keep the first message per key path.
        lines: dict[str, str] = {}
        for e in err.errors():
            path = ".".join(str(p) for p in (e["loc"][0], *(p for p in e["loc"][1:] if isinstance(p, int))))
            lines.setdefault(path, f"model.{path}: {e['msg']} (got {e.get('input')!r})")
        raise ModelArgumentError("\n  ".join(lines.values())) from None
    return checked.model_dump(exclude_unset=True)


def get_model(name: str, num_classes: int = 10, in_channels: int = 1, **kwargs: Any) -> nn.Module:
    """Build a registered model; ``kwargs`` are validated as a config's would be."""
    options = validate_model_args(name, kwargs)
    user_code = ":" in name or source_of(name) is not None  # code cnnlab does not own: its failures are bad options
    try:
        model = get_entry(name).builder(num_classes=num_classes, in_channels=in_channels, **options)
    except MapVanishes as err:
        raise ModelArgumentError(err.for_model(name)) from None
    except ValueError as err:  # builders raise ValueError for options that cannot work together
        raise ModelArgumentError(f"model {name!r} cannot be built with {options}: {err}") from None
    except KeyboardInterrupt:
        raise
    except BaseException as err:
        if not user_code:
            raise  # a bug in cnnlab's own builders: let it show
        raise ModelArgumentError(f"model {name!r}: the builder failed: {_describe(err)}") from None
    if not isinstance(model, nn.Module):
        raise ModelArgumentError(
            f"model {name!r}: the builder returned {type(model).__name__}, not a torch.nn.Module; return the network"
        )
    return model
