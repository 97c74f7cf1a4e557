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
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from cnnlab.console import SafeConsole

REFRESH_SECONDS = 0.25


class Reporter:
    """A run's listener: start_run (with the resolved config), start_epoch, advance, end_epoch (with
    the metrics row), message, finish (with the summary). This base prints one line per epoch;
    subclasses add live progress, and the loggers (loggers.py) and launchers' event writers
    (events.py) are listeners of the same shape."""

    def __init__(self, console: Console | None = None, enabled: bool = True) -> None:
        self.console = console or SafeConsole()
        self.enabled = enabled
        self.epochs = 0
        self.config: dict[str, Any] = {}  # the run's resolved config, from start_run

    def start_run(self, name: str, run_dir: Path, epochs: int, resumed: bool = False,
                  config: dict[str, Any] | None = None) -> None:
        self.epochs, self.config = epochs, config or {}
        self.message(f"{'resume' if resumed else 'run'} {name}: {epochs} epochs -> {run_dir}")

    def start_epoch(self, epoch: int, batches: int, done: int = 0) -> None:
        pass

    def advance(self, loss_sum: torch.Tensor, correct: torch.Tensor, seen: int) -> None:
        pass

    def end_epoch(self, row: dict[str, Any], is_best: bool) -> None:
        best = "  *best" if is_best else ""
        self.message(
            f"epoch {row['epoch']:>3}/{self.epochs}  train loss {row['train_loss']:.4f}  train acc {row['train_acc']:.4f}  "
            f"val loss {row['val_loss']:.4f}  val acc {row['val_acc']:.4f}  lr {row['lr']:.3g}  "
            f"{row['epoch_seconds']:.1f}s  {row['train_examples_per_sec']:,.0f} img/s{best}"
        )

    def message(self, text: str) -> None:
        if self.enabled:
            self.console.print(text, soft_wrap=True)

    def finish(self, summary: dict[str, Any], run_dir: Path) -> None:
        if summary.get("status") == "completed":
            self.message(
                f"done: test acc {summary['test_acc']:.4f} (best epoch {summary['best_epoch']}, "
                f"{summary['eval_split']} acc {summary['best_val_acc']:.4f}), {summary['wall_seconds']:.1f}s -> {run_dir}"
            )
        else:
            where = f" ({summary['stopped_at']})" if summary.get("stopped_at") else ""
            self.message(f"run {summary.get('status')}{where}; partial results in {run_dir}")
            if (Path(run_dir) / "checkpoints" / "last.pt").is_file():
                self.message(continue_advice(run_dir, summary, self.config))


def continue_advice(run_dir: Path, summary: dict[str, Any], config: dict[str, Any]) -> str:
    """The command that continues a run that ended early; after a diverged loss, with half the learning rate."""
    command = f"cnnlab resume {shlex.quote(str(run_dir))}"
    lr = (config.get("optim") or {}).get("lr")
    if "loss diverged" in str(summary.get("error")) and isinstance(lr, (int, float)):  # engine.train's TrainingError
        return f"continue it with a lower learning rate: {command} --set optim.lr={lr / 2:.3g}"
    return f"continue it with: {command}"


class ProgressReporter(Reporter):
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
            self.task, advance=1, loss=f"{loss_sum.item() / seen:.4f}", acc=f"{correct.item() / seen:.4f}"
        )

    def end_epoch(self, row: dict[str, Any], is_best: bool) -> None:
        self.progress.remove_task(self.task)
        self.progress.stop()
        super().end_epoch(row, is_best)

    def finish(self, summary: dict[str, Any], run_dir: Path) -> None:
        self.progress.stop()
        super().finish(summary, run_dir)


def make_reporter(quiet: bool = False, silent: bool = False) -> Reporter:
    """A live bar on a terminal; one line per epoch when ``quiet`` or not a terminal; nothing if ``silent``."""
    if silent:
        return Reporter(enabled=False)
    if quiet or not sys.stdout.isatty():
        return Reporter()
    return ProgressReporter()
