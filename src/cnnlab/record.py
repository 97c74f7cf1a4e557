"""Usage: ``listeners = run_listeners(cfg, world, run, reporter)``; ``with recording_ending(listeners, summary, run, stop): ...``.

A run's own record, kept as a listener of the run (first after the start-up clock): metrics.csv after every epoch,
summary.json and curves.png at the end, however the run ended (the folder and its opening summary
are made before the run starts, by ``fit`` or ``resume``). Beside it, who hears a run (its record,
the console or a launcher, the loggers; under torchrun, rank 0 alone) and how a run that ended early
is told so.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from cnnlab.config import Config
from cnnlab.distributed import World
from cnnlab.listeners import FanOut, Listener, ending_guarded
from cnnlab.results import RunDir, RunSummary, StartupRecord
from cnnlab.runtime import process_age
from cnnlab.stopping import StopSignals


class StartupClock(Listener):
    """summary.json's ``startup``: the stages ``prepare`` timed (imports, data, model), the set-up after them up to
    the run's start, and its first batch's step, from the start to the first ``advance``."""

    def __init__(self, summary: RunSummary, stages: dict[str, float | None]) -> None:
        self.summary, self.stages = summary, stages
        self.started: float | None = None

    def start_run(self, name: str, run_dir: Path, epochs: int, resumed: bool = False,
                  config: dict[str, Any] | None = None) -> None:
        age, known = process_age(), [value for value in self.stages.values() if value is not None]
        setup = age - sum(known) if age is not None and len(known) == len(self.stages) else None
        figures = {**self.stages, "setup": setup}
        self.summary.startup = StartupRecord(**{k: None if v is None else round(max(v, 0.0), 3) for k, v in figures.items()})
        self.started = time.perf_counter()

    def advance(self, loss_sum: torch.Tensor, correct: torch.Tensor, seen: int) -> None:
        if self.started is not None and self.summary.startup is not None:
            self.summary.startup.first_step = round(time.perf_counter() - self.started, 3)
            self.started = None


class RunRecord(Listener):
    """cnnlab's own record of a run as a listener: metrics.csv after every epoch, summary.json and
    curves.png at the end, however the run ended (the folder and its opening summary are made before
    the run starts, by ``fit`` or ``resume``).

    The curves of a run that trains to its last epoch are drawn off the training path: on a thread
    started when that epoch's metrics are written, while the best checkpoint is read back and the test
    set evaluated; ``finish`` waits for the picture (and draws it again should the metrics have
    changed since), so it is never lost and the run's end waits only for what is left of it."""

    def __init__(self, run: RunDir) -> None:
        self.run = run
        self.epochs = 0
        self.drawing: threading.Thread | None = None
        self.drawn = 0  # the metrics rows in the curves the thread drew (0: none, or it failed)

    def start_run(self, name: str, run_dir: Path, epochs: int, resumed: bool = False,
                  config: dict[str, Any] | None = None) -> None:
        self.epochs = epochs

    def end_epoch(self, row: dict[str, Any], is_best: bool) -> None:
        self.run.write_metrics()
        if row.get("epoch") == self.epochs and self.run.writer and self.drawing is None:
            self.drawing = threading.Thread(target=self._draw_ahead, args=(len(self.run.metrics),), name="cnnlab-curves",
                                            daemon=True)
            self.drawing.start()

    def _draw_ahead(self, rows: int) -> None:
        try:
            _draw_curves(self.run)
        except Exception:  # finish draws them again, where a failure is reported as every ending's is
            return
        self.drawn = rows

    def finish(self, summary: RunSummary, run_dir: Path) -> None:
        self.run.write_summary(summary)
        if self.drawing is not None:
            self.drawing.join()
        if self.run.metrics and summary.status != "pruned" and self.drawn != len(self.run.metrics):
            _draw_curves(self.run)  # a pruned trial's process is about to be ended; not drawn, or drawn too early

    @staticmethod
    def guarded(run: RunDir) -> contextlib.AbstractContextManager[None]:
        """A failure while recording how ``run`` ended is said, and goes no further."""
        return ending_guarded(run.path)


def run_listeners(cfg: Config, world: World, run: RunDir, reporter: Listener, *first: Listener) -> FanOut:
    """Everything that hears this run: ``first``, its record, the console (or a launcher), and the loggers of
    ``output.loggers``; under torchrun, rank 0 alone."""
    if not world.is_main:
        return FanOut()
    loggers: list[Listener] = []
    if cfg.output.loggers:
        from cnnlab.loggers import make_loggers

        loggers = make_loggers(cfg.to_dict(), run.path)
    return FanOut(*first, RunRecord(run), reporter, *loggers)


@contextlib.contextmanager
def recording_ending(listeners: FanOut, summary: RunSummary, run: RunDir, stop: StopSignals) -> Iterator[None]:
    """For a run that ended early: the block writes down how (in ``summary``) while a second Ctrl-C
    only waits (``stop.deferred``); on leaving it every listener hears the ending, each on its own
    (``FanOut.finish_each``): the run's record first, still deferred, so that summary.json is never
    left saying "running", then the others, which a second Ctrl-C may cut short."""
    record = FanOut(*(listener for listener in listeners.listeners if isinstance(listener, RunRecord)))
    others = FanOut(*(listener for listener in listeners.listeners if not isinstance(listener, RunRecord)))
    with stop.deferred():
        yield
        record.finish_each(summary, run.path)
    others.finish_each(summary, run.path)


def for_rank(reporter: Listener, world: World) -> Listener:
    """Under torchrun only rank 0 reports (prints, tells a launcher); the others train in silence."""
    return reporter if world.is_main else Listener()


def _draw_curves(run: RunDir) -> None:
    if not run.writer:
        return
    from cnnlab.plots import plot_curves  # matplotlib is slow to import; only load it when drawing

    plot_curves(run.path / "metrics.csv", run.path / "curves.png")
