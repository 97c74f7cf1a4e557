"""Usage: ``with StopSignals() as stop: ... stop.check()`` between batches.

The one place signal handlers are installed: ``handling_signals(on_signal)`` (used by a run's
``StopSignals``, a sweep's ``Runner`` and a tune's ``TuneSignals``, which only say what a signal means
to them) and, for the command's start-up, ``record_early_signals``/``settle_signals``.

How a run ends when asked to: SIGINT (Ctrl-C), SIGTERM (``kill``, ``timeout``, every scheduler's
preemption) and SIGHUP (a closed terminal) only *request* a stop; the loop honours it at the next
batch boundary, where the model, optimiser and generators agree, checkpoints there and exits with
128 + the signal number (130, 143, 129). A second Ctrl-C stops at once, except while the run's ending
is being written down (``deferred``): from the moment a stop is acted on until summary.json says so,
further signals are only noted. A trial started by a sweep also stops this way when the sweep that
started it dies (its parent process changes).
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Callable, Iterator
from types import FrameType
from typing import Any

HANDLED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
PARENT_ENV = "CNNLAB_PARENT_PID"  # set by the sweep launcher for its trials


_pending: int | None = None  # a signal that came while the process was starting
_recording = False


def record_early_signals() -> None:
    """Called first thing by the ``cnnlab`` command: until a command settles its signal handling,
    SIGINT/SIGTERM/SIGHUP are only recorded. (A KeyboardInterrupt raised inside ``import torch`` can
    be swallowed by it, and the run then starts as if nothing had happened.)"""
    global _recording
    if threading.current_thread() is threading.main_thread():
        for signum in HANDLED:
            signal.signal(signum, _record)
        _recording = True


def _record(signum: int, frame: FrameType | None) -> None:
    global _pending
    if _pending is None:
        _pending = signum
    elif signum == signal.SIGINT:
        raise KeyboardInterrupt


def pending_signal() -> int | None:
    return _pending


def settle_signals() -> None:
    """For commands that do not train: the usual signal behaviour from here on, and ``Interrupted``
    now if a signal came while starting."""
    global _recording
    if not _recording:
        return
    _recording = False
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGHUP, signal.SIG_DFL)
    if _pending is not None:
        raise Interrupted(_pending)


@contextlib.contextmanager
def handling_signals(on_signal: Callable[[int], None]) -> Iterator[int | None]:
    """SIGINT, SIGTERM and SIGHUP call ``on_signal(signum)`` while the block runs; the handlers that were
    there before (the start-up's recorder, Ray's) are put back after it. Yields the signal that came
    while the command was starting, if one did: the block takes it over (``on_signal`` is not called
    for it). Outside the main thread, where Python runs no signal handler, nothing is installed."""
    previous: dict[int, Any] = {}
    if threading.current_thread() is threading.main_thread():
        for signum in HANDLED:
            previous[signum] = signal.signal(signum, lambda signum, frame: on_signal(signum))
    try:
        yield _pending
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


class Interrupted(Exception):
    """A run stopped on a signal, at a batch boundary."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        self.exit_code = 128 + signum
        super().__init__(f"interrupted by {signal_name(signum)}")


class Pruned(Exception):
    """A run its tuner stopped on purpose after an epoch (ASHA: not promising enough to go on).
    Not a failure: recorded as ``pruned``, with the epoch's checkpoint."""


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


class StopSignals:
    """Turns SIGINT/SIGTERM/SIGHUP into a stop request for the duration of a ``with`` block."""

    def __init__(self) -> None:
        self.requested: int | None = None
        self._handlers = contextlib.ExitStack()
        self._deferring = False  # the ending is being recorded: a second Ctrl-C must not cut it short
        parent = os.environ.get(PARENT_ENV, "")
        self._parent = int(parent) if parent.isdigit() else None

    def __enter__(self) -> StopSignals:
        # a signal that came while the command was starting is a stop request like any other
        self.requested = self._handlers.enter_context(handling_signals(self._handle))
        return self

    def __exit__(self, *exc: object) -> None:
        self._handlers.close()

    def _handle(self, signum: int) -> None:
        if self.requested is not None and signum == signal.SIGINT and not self._deferring:
            self._deferring = True  # the stop starts here: the next Ctrl-C waits for its record
            raise KeyboardInterrupt  # a second Ctrl-C: the user does not want to wait
        if self.requested is None:
            self.requested = signum

    def check(self) -> None:
        """Raise ``Interrupted`` if a stop was requested (or the launching sweep is gone)."""
        if self.requested is None and self._parent is not None and os.getppid() != self._parent:
            self.requested = signal.SIGHUP
        if self.requested is not None:
            self._deferring = True  # from here a second Ctrl-C waits for the record of this stop
            raise Interrupted(self.requested)

    @contextlib.contextmanager
    def deferred(self) -> Iterator[None]:
        """Signals only noted while the block runs (the run's ending being written down); from the
        stop that began the ending (``check`` raising, or a second Ctrl-C) to the end of the block."""
        self._deferring = True
        try:
            yield
        finally:
            self._deferring = False
