"""Usage: ``from cnnlab.data import load_data, Data, DataSpec``: the data layer.

``loader`` reads the configured data set, splits and batches it; ``spec`` describes it
(``DataSpec``); ``registry`` knows the data sets by name; each data set is one module of its own
(``fashion_mnist``). Nothing outside this package needs to know which data set it is.

The names below are imported when first asked for (PEP 562), so that ``cnnlab.data.spec`` and the
config, which need no tensors, load without PyTorch: a config error is said before torch is imported.
"""

import importlib
from typing import Any

_HOMES = {
    "Augment": "loader", "Data": "loader", "channel_stats": "loader", "load_data": "loader",
    "DATA_SETS": "registry", "data_set": "registry", "describe": "registry", "described": "registry",
    "DEFAULT": "spec", "DataSpec": "spec",
    "Split": "splits", "stratified_split": "splits",
}

__all__ = sorted(_HOMES)


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'cnnlab.data' has no attribute {name!r}")
    return getattr(importlib.import_module(f"cnnlab.data.{home}"), name)
