"""Usage: ``class Mine(Listener): def end_epoch(self, row, is_best): ...``; ``fit(cfg, reporter=FanOut(a, b))``.

What hears a run as it happens. A ``Listener`` has one hook per moment of a run, each doing nothing:
a listener overrides those it needs (as Lightning's ``Callback``). The console (progress.py), the
run's own record (record.py), the loggers (loggers.py), a launcher's event writer (events.py) and
Ray Tune's reporter (tune.py) are listeners; ``FanOut`` passes every call on to several.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cnnlab.errors import warn

if TYPE_CHECKING:
    import torch

    from cnnlab.results import RunSummary


class Listener:
    """A run's listener: start_run (with the resolved config), start_epoch (with the learning rate it starts
    at), advance (after every batch, with the epoch's running sums on the device), end_epoch (with the
    metrics row), message, finish (with the summary, however the run ended). Every hook does nothing here."""

    def start_run(self, name: str, run_dir: Path, epochs: int, resumed: bool = False,
                  config: dict[str, Any] | None = None) -> None:
        pass

    def start_epoch(self, epoch: int, batches: int, done: int = 0, lr: float | None = None) -> None:
        pass

    def advance(self, loss_sum: torch.Tensor, correct: torch.Tensor, seen: int) -> None:
        pass

    def end_epoch(self, row: dict[str, Any], is_best: bool) -> None:
        pass

    def message(self, text: str) -> None:
        pass

    def finish(self, summary: RunSummary, run_dir: Path) -> None:
        pass


def start_epoch(listener: Listener, epoch: int, batches: int, done: int, lr: float | None) -> None:
    """``listener.start_epoch`` with the learning rate; a listener written before start_epoch took it
    (``def start_epoch(self, epoch, batches, done=0)``) is called as it expects."""
    try:
        params = inspect.signature(listener.start_epoch).parameters.values()
    except (TypeError, ValueError):  # a callable without a signature to read: the old call, which every listener takes
        params = ()
    if any(p.name == "lr" or p.kind == p.VAR_KEYWORD for p in params):
        listener.start_epoch(epoch, batches, done, lr=lr)
    else:
        listener.start_epoch(epoch, batches, done)


class FanOut(Listener):
    """Passes every call on to each of ``listeners``, in order."""

    def __init__(self, *listeners: Listener | None) -> None:
        self.listeners = [listener for listener in listeners if listener is not None]

    def start_run(self, name: str, run_dir: Path, epochs: int, resumed: bool = False,
                  config: dict[str, Any] | None = None) -> None:
        for listener in self.listeners:
            listener.start_run(name, run_dir, epochs, resumed, config)

    def start_epoch(self, epoch: int, batches: int, done: int = 0, lr: float | None = None) -> None:
        for listener in self.listeners:
            start_epoch(listener, epoch, batches, done, lr)

    def advance(self, loss_sum: torch.Tensor, correct: torch.Tensor, seen: int) -> None:
        for listener in self.listeners:
            listener.advance(loss_sum, correct, seen)

    def end_epoch(self, row: dict[str, Any], is_best: bool) -> None:
        for listener in self.listeners:
            listener.end_epoch(row, is_best)

    def message(self, text: str) -> None:
        for listener in self.listeners:
            listener.message(text)

    def finish(self, summary: RunSummary, run_dir: Path) -> None:
        for listener in self.listeners:
            listener.finish(summary, run_dir)

    def finish_each(self, summary: RunSummary, run_dir: Path) -> None:
        """``finish`` for a run that ended early: every listener hears it, each on its own. One that fails
        (a record that cannot be written on a full disk, a logger whose server is gone) is said, and the
        others still hear, those of a fan-out among them too."""
        for listener in self.listeners:
            if isinstance(listener, FanOut):
                listener.finish_each(summary, run_dir)
                continue
            with ending_guarded(run_dir):
                listener.finish(summary, run_dir)


@contextlib.contextmanager
def ending_guarded(run_dir: Path) -> Iterator[None]:
    """A failure while writing down a run's ending is said, naming its folder, and goes no further: the
    error that ended the run is the one to raise."""
    try:
        yield
    except Exception as second:
        warn(f"could not record the ending in {run_dir}: {type(second).__name__}: {second}")
