"""Usage: ``reporter = make_reporter(quiet=False)``: what a run prints while it trains.

On a terminal: a rich progress bar per epoch with the running loss and accuracy (read from the
device at most four times a second, never per batch). Otherwise, or with ``--quiet``: one line per
epoch, fit for logs.
"""

from __future__ import annotations

import shlex
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from cnnlab.console import SafeConsole
from cnnlab.listeners import Listener
from cnnlab.numtext import number_text

if TYPE_CHECKING:
    from cnnlab.results import RunSummary

REFRESH_SECONDS = 0.25


class ConsoleReporter(Listener):
    """The console as a run's listener: one line when the run starts, one per epoch, one at the end
    (with the command that continues a run that ended early)."""

    def __init__(self, console: Console | None = None) -> None:
        self.console = console or SafeConsole()
        self.epochs = 0
        self.config: dict[str, Any] = {}  # the run's resolved config, from start_run

    def start_run(self, name: str, run_dir: Path, epochs: int, resumed: bool = False,
                  config: dict[str, Any] | None = None) -> None:
        self.epochs, self.config = epochs, config or {}
        self.message(f"{'resume' if resumed else 'run'} {name}: {epochs} epochs -> {run_dir}")

    def end_epoch(self, row: dict[str, Any], is_best: bool) -> None:
        best = "  *best" if is_best else ""
        self.message(
            f"epoch {row['epoch']:>3}/{self.epochs}  train loss {number_text(row['train_loss'], 4)}  "
            f"train acc {number_text(row['train_acc'], 4)}  val loss {number_text(row['val_loss'], 4)}  "
            f"val acc {number_text(row['val_acc'], 4)}  lr {number_text(row['lr'], significant=3)}  "
            f"{number_text(row['epoch_seconds'], 1)}s  {number_text(row['train_examples_per_sec'], 0, grouped=True)} img/s{best}"
        )

    def message(self, text: str) -> None:
        self.console.print(text, soft_wrap=True)

    def finish(self, summary: RunSummary, run_dir: Path) -> None:
        if summary.status == "completed":
            self.message(
                f"done: test acc {number_text(summary.test_acc, 4)} (best epoch {summary.best_epoch}, "
                f"{summary.eval_split} acc {number_text(summary.best_val_acc, 4)}), "
                f"{number_text(summary.wall_seconds, 1)}s -> {run_dir}"
            )
        else:
            where = f" ({summary.stopped_at})" if summary.stopped_at else ""
            self.message(f"run {summary.status}{where}; partial results in {run_dir}")
            if (Path(run_dir) / "checkpoints" / "last.pt").is_file():
                self.message(continue_advice(run_dir, summary, self.config))


def continue_advice(run_dir: Path, summary: RunSummary, config: dict[str, Any]) -> str:
    """The command that continues a run that ended early; after a diverged loss, with half the learning rate."""
    command = f"cnnlab resume {shlex.quote(str(run_dir))}"
    lr = (config.get("optim") or {}).get("lr")
    if "loss diverged" in str(summary.error) and isinstance(lr, (int, float)):  # engine.train's TrainingError
        return f"continue it with a lower learning rate: {command} --set optim.lr={number_text(lr / 2, significant=3)}"
    return f"continue it with: {command}"


class LiveReporter(ConsoleReporter):
    """A live bar per epoch: batches done, running loss and accuracy, time left."""

    def __init__(self, console: Console | None = None) -> None:
        super().__init__(console)
        self.progress = Progress(
            TextColumn("epoch {task.fields[epoch]}", markup=False),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}  acc {task.fields[acc]}", markup=False),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=self.console,
            transient=True,
        )
        self.task = None
        self.last_refresh = 0.0

    def start_epoch(self, epoch: int, batches: int, done: int = 0) -> None:
        self.progress.start()
        self.task = self.progress.add_task("", total=batches, completed=done, epoch=f"{epoch}/{self.epochs}",
                                           loss="-", acc="-")
        self.last_refresh = time.monotonic()

    def advance(self, loss_sum: torch.Tensor, correct: torch.Tensor, seen: int) -> None:
        now = time.monotonic()
        if now - self.last_refresh < REFRESH_SECONDS:
            self.progress.advance(self.task)
            return
        self.last_refresh = now
        self.progress.update(
            self.task, advance=1, loss=number_text(loss_sum.item() / seen, 4), acc=number_text(correct.item() / seen, 4)
        )

    def end_epoch(self, row: dict[str, Any], is_best: bool) -> None:
        self.progress.remove_task(self.task)
        self.progress.stop()
        super().end_epoch(row, is_best)

    def finish(self, summary: RunSummary, run_dir: Path) -> None:
        self.progress.stop()
        super().finish(summary, run_dir)


def make_reporter(quiet: bool = False) -> ConsoleReporter:
    """A live bar on a terminal; one line per epoch when ``quiet`` or not a terminal."""
    if quiet or not sys.stdout.isatty():
        return ConsoleReporter()
    return LiveReporter()
