"""Usage: ``fit(cfg, reporter=FanOut(make_reporter(), EventWriter(stream)))``; ``for event in read_events(pipe)``.

A run's progress as structured events, so that whoever launched it (a sweep's local processes, a
Ray task, Ray Tune) follows it without reading console text. ``EventWriter`` is a listener of the
run (``listeners.py``) that turns its calls into JSON lines::

    {"event": "run_start", "name": "lenet", "run_dir": "/abs/results/lenet/2026...", "epochs": 10, "resumed": false}
    {"event": "batches", "epoch": 1, "done": 120}          (the epoch's batches so far, at most once a second)
    {"event": "epoch_end", "epoch": 1, "epochs": 10, "best": true, "row": {"train_loss": ..., "val_acc": ...}}
    {"event": "run_end", "run_dir": "...", "summary": {...summary.json...}}
    {"event": "error", "kind": "error", "message": "...", "exit_code": 2}

A trial started by ``cnnlab sweep`` gets an inherited pipe whose descriptor is in
``CNNLAB_EVENTS_FD``; ``event_channel()`` opens it (once) for the ``cnnlab`` command that runs there.
Lines read back are checked (JSON objects with a known ``event``); anything else is skipped.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from cnnlab.listeners import Listener

if TYPE_CHECKING:
    from cnnlab.results import RunSummary

EVENTS_FD_ENV = "CNNLAB_EVENTS_FD"
EVENTS = ("run_start", "epoch_start", "batches", "epoch_end", "message", "run_end", "error")
BATCH_EVENT_SECONDS = 1.0  # a "batches" event at most this often: a launcher's bar moves, the pipe stays quiet
MAX_EVENT_BYTES = 1 << 20  # a summary is a few kB; a longer line is not ours


class EventWriter(Listener):
    """Writes a run's events as JSON lines to ``stream`` (or hands each to ``sink``), flushing each."""

    def __init__(self, stream: IO[str] | None = None, sink: Callable[[dict[str, Any]], None] | None = None) -> None:
        self.stream = stream
        self.sink = sink
        self.epochs = self.epoch = self.done = 0
        self.last_batches = 0.0

    def emit(self, event: str, **fields: Any) -> None:
        record = {"event": event, **fields}
        try:
            if self.sink is not None:
                self.sink(record)
            if self.stream is not None:
                self.stream.write(json.dumps(record, default=str, allow_nan=True) + "\n")
                self.stream.flush()
        except (OSError, ValueError):
            self.stream = None  # the reader is gone: training goes on without it

    def start_run(self, name: str, run_dir: Path, epochs: int, resumed: bool = False,
                  config: dict[str, Any] | None = None) -> None:
        self.epochs = epochs
        self.emit("run_start", name=name, run_dir=str(Path(run_dir).resolve()), epochs=epochs, resumed=resumed)

    def start_epoch(self, epoch: int, batches: int, done: int = 0, lr: float | None = None) -> None:
        self.epoch, self.done, self.last_batches = epoch, done, time.monotonic()
        self.emit("epoch_start", epoch=epoch, epochs=self.epochs, batches=batches, done=done, lr=lr)

    def advance(self, loss_sum: Any, correct: Any, seen: int) -> None:
        self.done += 1
        now = time.monotonic()
        if now - self.last_batches >= BATCH_EVENT_SECONDS:
            self.last_batches = now
            self.emit("batches", epoch=self.epoch, done=self.done)

    def end_epoch(self, row: dict[str, Any], is_best: bool) -> None:
        self.emit("epoch_end", epoch=row["epoch"], epochs=self.epochs, best=is_best, row=row)

    def message(self, text: str) -> None:
        self.emit("message", text=text)

    def finish(self, summary: RunSummary, run_dir: Path) -> None:
        self.emit("run_end", run_dir=str(Path(run_dir).resolve()), summary=summary.to_dict())

    def error(self, kind: str, message: str, exit_code: int) -> None:
        self.emit("error", kind=kind, message=message, exit_code=exit_code)


_channel: EventWriter | None = None


def event_channel() -> EventWriter | None:
    """The launcher's event pipe (``CNNLAB_EVENTS_FD``) as an ``EventWriter``, or None when not launched so."""
    global _channel
    if _channel is None:
        fd = os.environ.get(EVENTS_FD_ENV, "")
        if not fd.isdigit():
            return None
        try:
            os.set_inheritable(int(fd), False)  # this process's children must not hold the pipe open
            _channel = EventWriter(open(int(fd), "w", encoding="utf-8", closefd=True))
        except OSError:
            return None
        finally:
            os.environ.pop(EVENTS_FD_ENV, None)
    return _channel


def read_events(lines: Iterable[str]) -> Iterator[dict[str, Any]]:
    """The well-formed events among ``lines``; anything else (a stray print, a cut line) is skipped."""
    for line in lines:
        if len(line) > MAX_EVENT_BYTES:
            continue
        try:
            record = json.loads(line, parse_constant=lambda name: math.nan)
        except (ValueError, RecursionError):
            continue
        if isinstance(record, dict) and record.get("event") in EVENTS:
            yield record
