"""Usage: ``reporter = make_reporter(quiet=False)``: what a run prints while it trains.

On a terminal: a rich progress bar per epoch with the running loss and accuracy (read from the
device at most four times a second, never per batch), images per second, the learning rate the
epoch started at, and the epoch's time so far, the time it has left and the time the whole run has
left, each labelled and written as ``duration_text`` writes durations. Otherwise, or with
``--quiet``: one line per epoch, fit for logs, ending with the time the run has left. Times left
come from what this process measured (``Pace``): its batches, and its whole epochs with their
evaluation.
"""

from __future__ import annotations

import shlex
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, Task, TextColumn
from rich.text import Text

from cnnlab.console import SafeConsole
from cnnlab.listeners import Listener
from cnnlab.numtext import duration_text, number_text
from cnnlab.results import figure_label

if TYPE_CHECKING:
    from cnnlab.results import RunSummary

REFRESH_SECONDS = 0.25
PACE_EPOCHS = 3  # the time of an epoch to come: the mean of the last few measured (a busy machine changes speed)


class Pace:
    """How fast a run goes, as this process measures it: seconds a batch in the epoch at hand, and seconds
    a whole epoch (training and evaluation) over the last ``PACE_EPOCHS``; from them, the time the run has
    left. ``clock`` is time.monotonic, or a test's."""

    def __init__(self, clock: Any = time.monotonic) -> None:
        self.clock = clock
        self.epochs = self.epoch = self.batches = self.first_batch = 0
        self.started = 0.0
        self.whole: list[float] = []  # seconds of each epoch this process trained from its first batch

    def start_epoch(self, epochs: int, epoch: int, batches: int, done: int) -> None:
        self.epochs, self.epoch, self.batches, self.first_batch, self.started = epochs, epoch, batches, done, self.clock()

    def end_epoch(self) -> None:
        if self.first_batch == 0:  # a resumed epoch's time is only its rest
            self.whole.append(self.clock() - self.started)

    def epoch_seconds(self) -> float | None:
        recent = self.whole[-PACE_EPOCHS:]
        return sum(recent) / len(recent) if recent else None

    def elapsed(self) -> float:
        """Seconds since this process started the epoch at hand."""
        return self.clock() - self.started

    def epoch_left(self, done: int) -> float | None:
        """Seconds the epoch at hand has left, ``done`` batches into it; None until a batch of this process has been
        timed. Never more than ``left(done)``: the run's time left is this and the epochs after it."""
        per_epoch = self.epoch_seconds()
        if per_epoch is not None:
            return per_epoch * (self.batches - done) / max(self.batches, 1)
        if done <= self.first_batch:
            return None
        return (self.clock() - self.started) / (done - self.first_batch) * (self.batches - done)

    def left(self, done: int | None = None) -> float | None:
        """Seconds the run has left, ``done`` batches into the epoch at hand (None: at its end); None until a
        batch of this process has been timed."""
        per_epoch = self.epoch_seconds()
        if done is None:
            return (self.epochs - self.epoch) * per_epoch if per_epoch is not None else None
        if per_epoch is None:  # the first epoch: from its batches (its evaluation is not timed yet)
            if done <= self.first_batch:
                return None
            per_batch = (self.clock() - self.started) / (done - self.first_batch)
            return per_batch * ((self.batches - done) + (self.epochs - self.epoch) * self.batches)
        return per_epoch * (self.batches - done) / max(self.batches, 1) + (self.epochs - self.epoch) * per_epoch


class ConsoleReporter(Listener):
    """The console as a run's listener: one line when the run starts, one per epoch, one at the end
    (with the command that continues a run that ended early)."""

    def __init__(self, console: Console | None = None, clock: Any = time.monotonic) -> None:
        self.console = console or SafeConsole()
        self.epochs = 0
        self.config: dict[str, Any] = {}  # the run's resolved config, from start_run
        self.pace = Pace(clock)

    def start_run(self, name: str, run_dir: Path, epochs: int, resumed: bool = False,
                  config: dict[str, Any] | None = None) -> None:
        self.epochs, self.config = epochs, config or {}
        self.message(f"{'resume' if resumed else 'run'} {name}: {epochs} epoch{'s' * (epochs != 1)} -> {run_dir}")

    def start_epoch(self, epoch: int, batches: int, done: int = 0, lr: float | None = None) -> None:
        self.pace.start_epoch(self.epochs, epoch, batches, done)

    def end_epoch(self, row: dict[str, Any], is_best: bool) -> None:
        self.pace.end_epoch()
        left = self.pace.left()
        best = ("  *best" if is_best else "") + (f"  run left {duration_text(left)}" if left is not None and left > 0 else "")
        self.message(
            f"epoch {row['epoch']:>3}/{self.epochs}  train loss {number_text(row['train_loss'], 4)}  "
            f"train acc {number_text(row['train_acc'], 4)}  val loss {number_text(row['val_loss'], 4)}  "
            f"val acc {number_text(row['val_acc'], 4)}  "
            + (f"ema val acc {number_text(row['val_acc_ema'], 4)}  " if "val_acc_ema" in row else "")
            + f"lr {number_text(row['lr'], significant=3)}  "
            f"{number_text(row['epoch_seconds'], 1)}s  {number_text(row['train_examples_per_sec'], 0, grouped=True)} img/s{best}"
        )

    def message(self, text: str) -> None:
        self.console.print(text, soft_wrap=True)

    def finish(self, summary: RunSummary, run_dir: Path) -> None:
        if summary.status == "completed":
            self.message(f"done: {done_text(summary)}, {number_text(summary.wall_seconds, 1)}s -> {run_dir}")
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


class TimesColumn(ProgressColumn):
    """The bar's times, as ``pace`` measures them, drawn afresh at each refresh: "elapsed 3.0 s  epoch left 7.0 s
    run left 1.2 min", the last only where epochs come after this one (in the last, the epoch's time left is the
    run's)."""

    def __init__(self, pace: Pace) -> None:
        super().__init__()
        self.pace = pace

    def render(self, task: Task) -> Text:
        done = int(task.completed)
        text = f"elapsed {duration_text(self.pace.elapsed())}  epoch left {duration_text(self.pace.epoch_left(done))}"
        if self.pace.epoch < self.pace.epochs:
            text += f"  run left {duration_text(self.pace.left(done))}"
        return Text(text)


class LiveReporter(ConsoleReporter):
    """A live bar per epoch: batches done, running loss and accuracy, images per second, the epoch's learning
    rate, time elapsed, time left in the epoch and in the run (``TimesColumn``)."""

    def __init__(self, console: Console | None = None, clock: Any = time.monotonic) -> None:
        super().__init__(console, clock)
        self.progress = Progress(
            TextColumn("epoch {task.fields[epoch]}", markup=False),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}  acc {task.fields[acc]}  {task.fields[speed]} img/s  lr {task.fields[lr]}",
                       markup=False),
            TimesColumn(self.pace),
            console=self.console,
            transient=True,
        )
        self.task = None
        self.last_refresh = 0.0
        self.done = 0  # batches of the epoch done
        self.first: tuple[int, float] | None = None  # (images seen, when) at this process's first batch of the epoch

    def start_epoch(self, epoch: int, batches: int, done: int = 0, lr: float | None = None) -> None:
        super().start_epoch(epoch, batches, done, lr)
        self.done, self.first = done, None
        self.progress.start()
        self.task = self.progress.add_task("", total=batches, completed=done, epoch=f"{epoch}/{self.epochs}", loss="-",
                                           acc="-", speed="-", lr=number_text(lr, significant=3))
        self.last_refresh = self.pace.clock()

    def advance(self, loss_sum: torch.Tensor, correct: torch.Tensor, seen: int) -> None:
        now = self.pace.clock()
        self.done += 1
        if self.first is None:
            self.first = (seen, now)
        if now - self.last_refresh < REFRESH_SECONDS:
            self.progress.advance(self.task)
            return
        self.last_refresh = now
        images, since = seen - self.first[0], now - self.first[1]
        self.progress.update(
            self.task, advance=1, loss=number_text(loss_sum.item() / seen, 4), acc=number_text(correct.item() / seen, 4),
            speed=number_text(images / since, 0, grouped=True) if images and since > 0 else "-",
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


def tta_text(summary: RunSummary, acc: float | None = None) -> str:
    """", with flip TTA 0.9161" where the run's test pass also ran with test-time augmentation (``eval.tta``)."""
    acc = summary.test_acc_tta if acc is None else acc
    if not summary.test_tta or acc is None:
        return ""
    return f", with {'+'.join(summary.test_tta)} TTA {number_text(acc, 4)}"


def done_text(summary: RunSummary) -> str:
    """A completed run's figures: its headline first and labelled (eval.headline), then every test figure, then the
    epochs they were tested at and why (train.select)."""
    name, value = summary.headline_figure()
    every = f"test acc {number_text(summary.test_acc, 4)}{tta_text(summary)}{ema_text(summary)}"
    lead = f"{figure_label(name, summary.test_tta)} {number_text(value, 4)}; " if name != "test_acc" else ""
    return f"{lead}{every} ({selection_text(summary)})"


def selection_text(summary: RunSummary) -> str:
    """"the last epoch's weights (50): the onecycle schedule ends at 0 x optim.lr" or "each at its best val epoch:
    raw 44 (0.9512), ema 33 (0.9552)": where the test figures' weights come from."""
    chosen = summary.selection
    if chosen is None:  # a summary written before runs recorded their selection
        return f"best epoch {summary.best_epoch}, {summary.eval_split} acc {number_text(summary.best_val_acc, 4)}"
    why = chosen.why.removeprefix("auto: ")
    tested = [(name, weights) for name in ("raw", "ema") if (weights := getattr(chosen, name)) is not None]
    if all(weights.checkpoint == "last" for _, weights in tested):
        return f"the last epoch's weights ({chosen.raw.epoch}): {why}"
    each = ", ".join(f"{name} {weights.epoch} ({number_text(weights.val_acc, 4)})" for name, weights in tested)
    return f"each at its best {summary.eval_split} epoch: {each}; {why}"


def ema_text(summary: RunSummary) -> str:
    """"; ema 0.9180, with flip TTA 0.9201, the best on val" where the run averaged its weights (``train.ema``), and
    "; swa (last 5 epochs, val 0.9210) 0.9190" where it averaged its last epochs' (``train.swa``)."""
    text = ""
    if summary.test_acc_ema is not None:
        text += f"; ema {number_text(summary.test_acc_ema, 4)}{tta_text(summary, summary.test_acc_ema_tta)}"
        text += ", the best on val" if summary.better_weights == "ema" else ""
    if summary.test_acc_swa is not None:
        epochs = f"last {summary.swa_epochs} epoch{'s' * (summary.swa_epochs != 1)}"
        text += (f"; swa ({epochs}, val {number_text(summary.val_acc_swa, 4)}) {number_text(summary.test_acc_swa, 4)}"
                 f"{tta_text(summary, summary.test_acc_swa_tta)}")
        text += ", the best on val" if summary.better_weights == "swa" else ""
    return text
