"""Usage: ``source = data_set("fashion-mnist")``; ``described("fashion-mnist").classes``.

The data sets cnnlab knows, by the name ``data.name`` gives them. Each is one module with two names:
``SPEC``, a ``DataSpec`` of what the data set is (classes, channels, image size; no statistics), and
``read_splits(cfg) -> (folder, train Split, test Split)``, which finds, reads and validates its files
for a ``DataConfig``, and ``check(root, download, verify)``, the lines ``cnnlab data`` prints (its
files found and checked). Adding a data set is adding its module here.
"""

from __future__ import annotations

from types import ModuleType

from cnnlab.data import fashion_mnist
from cnnlab.data.spec import DataSpec
from cnnlab.errors import UserError

DEFAULT = "fashion-mnist"
DATA_SETS: dict[str, ModuleType] = {module.SPEC.name: module for module in (fashion_mnist,)}


def data_set(name: str) -> ModuleType:
    """The module of the data set called ``name``; an unknown name is a ``UserError`` listing the known ones."""
    if name not in DATA_SETS:
        raise UserError(f"data.name: unknown data set {name!r}; cnnlab knows {', '.join(sorted(DATA_SETS))}")
    return DATA_SETS[name]


def described(name: str = DEFAULT) -> DataSpec:
    """What the data set called ``name`` is, without reading any file (no pixel statistics, no source)."""
    return data_set(name).SPEC
