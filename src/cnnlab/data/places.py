"""Usage: ``looked = data_set(name).where(root)``; ``looked.found``, ``looked.text()``: where a data set's files are.

What a data set that is searched for in places (the IDX sets, CIFAR) says of them without reading a file:
each folder it looks in, in order, with what that folder holds, and the first that holds the set. ``cnnlab
data`` lists it for every data set cnnlab knows. A set that is the user's own files (a folder of pictures,
an npz archive) is not searched for: it is wherever ``data.root`` says.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Whereabouts:
    found: Path | None  # the folder holding the set's files (the first one looked in that does), or None
    looked: tuple[tuple[Path, str], ...]  # each folder looked in, in order, with what it holds ("does not exist")

    def text(self) -> str:
        """The folders looked in, each with what it holds: ``/a (does not exist), /b (holds the files)``."""
        return ", ".join(f"{folder} ({state})" for folder, state in self.looked)
