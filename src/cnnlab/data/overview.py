"""Usage: ``view = overview(cfg.data)``; ``view.spec``, ``view.counts["train"]``: what ``cnnlab data NAME`` prints.

A data set as its files hold it: the description (classes, channels, image size, the per-channel
mean and std of the whole training split, the folder), how many images each split has of each class,
and, for a data set kept in a cache, that cache's state. It is read the way a run reads it
(``load_data``, with every check), with no validation split held out.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cnnlab.data.loader import load_data
from cnnlab.data.registry import data_set
from cnnlab.data.spec import DataSpec


@dataclass
class Overview:
    spec: DataSpec  # mean/std of the whole training split; source: the folder read
    counts: dict[str, list[int]]  # split -> images per class, by label
    cache: str | None  # where the set's cache is and what it holds; None for a set without one

    def total(self, split: str) -> int:
        return sum(self.counts[split])


def overview(cfg) -> Overview:
    """Read the data set a ``DataConfig`` names (on the CPU) and count it."""
    data = load_data(cfg.model_copy(update={"val_size": 0}), seed=0, device=torch.device("cpu"))
    counts = {name: torch.bincount(split.labels, minlength=data.spec.num_classes).tolist()
              for name, split in (("train", data.train), ("test", data.test))}
    cache_state = getattr(data_set(cfg.name), "cache_state", None)
    return Overview(data.spec, counts, cache_state() if cache_state is not None else None)
