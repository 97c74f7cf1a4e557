"""Usage: ``class MyLauncher(Launcher): ...`` runs a sweep's ``Trial``s somewhere (see sweep.py, cluster.py).

What a sweep's trial is (one config and seed, its status as the sweep goes) and what a launcher is
(where and how trials run: processes on this machine in sweep.py, Ray tasks in cluster.py). The
launchers build on this module; nothing here knows any of them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cnnlab.config import Config
from cnnlab.trial import TrialResult


@dataclass
class Trial:
    name: str  # the variant: a config's file name, or the grid point; runs of every seed share it
    seed: int
    swept: dict[str, Any] = field(default_factory=dict)  # grid key -> value ({} for folder sweeps)
    config: Config | None = None
    error: str = ""  # why the config could not be loaded
    status: str = "pending"  # pending, completed, skipped (done before), failed, interrupted, not started
    run_dir: Path | None = None

    @property
    def label(self) -> str:
        return f"{self.name} seed {self.seed}"

    @property
    def swept_text(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.swept.items())


EventSink = Callable[[dict[str, Any]], None]


class Launcher:
    """Where and how a sweep's trials run. ``launch`` runs one trial to its end (called from one of
    ``jobs`` threads) and returns its result, passing its events to ``on_event`` as they come;
    ``stop`` asks every running trial to checkpoint and stop. Used as a context manager."""

    name = "base"

    def __enter__(self) -> Launcher:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def launch(self, trial: Trial, config_path: Path, slot: int, on_event: EventSink) -> TrialResult:
        raise NotImplementedError

    def stop(self, signum: int) -> None:
        raise NotImplementedError
