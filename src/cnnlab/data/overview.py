"""Usage: ``view = overview(cfg.data, seed=cfg.seed)``; ``view.spec``, ``view.counts["val"]``: what ``cnnlab data NAME``
prints; ``survey(root)``: what ``cnnlab data`` lists.

A data set as a run reads it: the description (classes, channels, image size, the folder, and the
per-channel mean and std of the training split a run normalises with), how many images of each class the
run's train, validation and test splits hold (the validation split as ``data.val_size`` and the seed
make it), and, for a data set kept in a cache, that cache's state. It is read the way a run reads it
(``load_data``'s steps, with every check); where a run could not hold out its validation split (a
``data.val_size`` larger than the training split), the set is still described, without one, and
``val_problem`` says why a run would stop.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from cnnlab.data.loader import read_data, validation_split, with_statistics
from cnnlab.data.places import Whereabouts
from cnnlab.data.registry import DATA_SETS, data_set, whereabouts
from cnnlab.data.spec import DataSpec
from cnnlab.errors import UserError


@dataclass
class Overview:
    spec: DataSpec  # mean/std of the training split a run normalises with; source: the folder read
    counts: dict[str, list[int]]  # split (train, val when there is one, test) -> images per class, by label
    cache: str | None  # where the set's cache is and what it holds; None for a set without one
    val_problem: str | None = None  # why a run could not hold out its validation split, when it could not

    def total(self, split: str) -> int:
        return sum(self.counts[split])


def overview(cfg, seed: int = 0) -> Overview:
    """Read the data set a ``DataConfig`` names (on the CPU), split it as a run with ``seed`` does, and count it."""
    wanted, root, train, test, given_val = read_data(cfg)
    problem = None
    try:
        train, val = validation_split(cfg, train, given_val, seed)
    except UserError as error:  # a run would stop here; the data set itself is described all the same
        val, problem = None, str(error)
    spec = with_statistics(wanted, root, train)
    splits = {"train": train, **({"val": val} if val is not None else {}), "test": test}
    counts = {name: torch.bincount(split.labels, minlength=spec.num_classes).tolist() for name, split in splits.items()}
    cache_state = getattr(data_set(cfg.name), "cache_state", None)
    return Overview(spec, counts, cache_state() if cache_state is not None else None, problem)


@dataclass
class Listed:
    """One data set as ``cnnlab data`` lists it: where it was looked for, or, for a set that is the user's own
    files, what they hold."""

    name: str
    where: Whereabouts | None  # None: not searched for; data.root names its files
    layout: str | None = None  # what such files hold (the module's LAYOUT), when it says

    def text(self) -> str:
        if self.where is None:
            return (f"your own files, wherever data.root says: cnnlab data {self.name} --data-dir PATH describes them"
                    + (f" ({self.layout})" if self.layout else ""))
        if self.where.found is not None:
            return f"found in {self.where.found}; searched {self.where.text()}"
        return f"missing; searched {self.where.text()}; cnnlab data {self.name} says how to get it"


def survey(root: Path | None = None) -> list[Listed]:
    """Every data set cnnlab knows, with where its files were looked for (``root`` alone, when given) and found."""
    return [Listed(name, whereabouts(name, root), getattr(module, "LAYOUT", None)) for name, module in DATA_SETS.items()]
