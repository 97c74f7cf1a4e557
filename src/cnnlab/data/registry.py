"""Usage: ``source = data_set("fashion-mnist")``; ``describe(cfg.data).classes``; ``described("fashion-mnist")``.

The data sets cnnlab knows, by the name ``data.name`` gives them. Each is one module with:
- ``NAME``, the name configs give it;
- ``describe(cfg) -> DataSpec``: what the configured data is (classes, channels, image size; no pixel
  statistics), from its files' names and headers at most, never decoding the images;
- ``read_splits(cfg) -> (folder, train Split, test Split)``, which finds, reads and validates its files
  for a ``DataConfig``; a data set whose files hold a validation split adds it as a fourth (``data.val_size``
  then draws none from the training split);
- optionally ``read(cfg) -> (DataSpec, folder, train Split, test Split[, validation Split])``: ``describe``
  and ``read_splits`` at once, for a data set whose two would each go over the same files (a folder of
  pictures lists and stats every file); ``load_data`` uses it when there is one. Nothing is kept between
  calls: each answers from the files as they are;
- ``check(root, download, verify, check_counts)``, the lines ``cnnlab data`` prints (its files found and checked;
  ``check_counts`` is ``data.check_counts``: whether a set with known image counts holds them);
- optionally ``cache_state() -> str``, for a data set kept in a cache: where, and what it holds
  (``cnnlab data NAME`` prints it);
- optionally ``where(root) -> places.Whereabouts``, for a data set searched for in places: each folder it looks
  in with what that holds, and the one holding the set, without reading a file (``cnnlab data`` lists it for
  every set). A set without it is the user's own files, wherever ``data.root`` says (its module's ``LAYOUT``,
  when it has one, says what they hold);
- optionally ``MAPPABLE = True``, for a data set kept in a cache file that ``read`` can leave memory-mapped
  (``Split.mapped``) when ``data.placement`` asks for it or the set is larger than memory;
- and, for a data set whose description is fixed whatever the files (Fashion-MNIST's classes are), ``SPEC``:
  ``described(name)`` gives it without any config, for runs of older cnnlab versions that recorded none.
Adding a data set is adding its module here.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

from cnnlab.data import cifar10, cifar100, fashion_mnist, folder, kmnist, mnist, npz
from cnnlab.data.convert import shaped
from cnnlab.data.places import Whereabouts
from cnnlab.data.spec import DEFAULT, DataSpec
from cnnlab.errors import UserError

__all__ = ["DATA_SETS", "DEFAULT", "data_set", "describe", "described", "whereabouts"]
DATA_SETS: dict[str, ModuleType] = {module.NAME: module for module in (fashion_mnist, mnist, kmnist, cifar10, cifar100, folder,
                                                                       npz)}


def data_set(name: str) -> ModuleType:
    """The module of the data set called ``name``; an unknown name is a ``UserError`` listing the known ones."""
    if name not in DATA_SETS:
        raise UserError(f"data.name: unknown data set {name!r}; cnnlab knows {', '.join(sorted(DATA_SETS))}")
    return DATA_SETS[name]


def describe(cfg: Any) -> DataSpec:
    """What the data a ``DataConfig`` names is (no pixel statistics, no source), without decoding any image:
    as its files hold it, in the channels and size the config asks for (``data.channels``, ``data.image_size``)."""
    return shaped(data_set(getattr(cfg, "name", DEFAULT)).describe(cfg), cfg)


def whereabouts(name: str, root: Any = None) -> Whereabouts | None:
    """Where the data set called ``name`` was looked for and found (``root`` alone, when given); None for a set
    that is the user's own files, not searched for (``where`` in the module interface above)."""
    where = getattr(data_set(name), "where", None)
    return where(root) if where is not None else None


def described(name: str = DEFAULT) -> DataSpec:
    """The fixed description of the data set called ``name``, without a config or any file: for data sets
    that have one (``SPEC``); one whose classes come from its files needs ``describe(cfg)``."""
    spec = getattr(data_set(name), "SPEC", None)
    if spec is None:
        raise UserError(f"data.name: {name}'s classes and image size come from its files; give a config that names them")
    return spec
