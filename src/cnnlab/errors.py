"""Usage: ``raise UserError("what is wrong; how to fix it")``.

Two kinds of failure, told apart because the CLI maps them to different exit codes:
bad input from the user (exit 2, checked before anything is written) and failures while
training (exit 1, recorded in the run's summary.json).
"""

import contextlib
import contextvars
import sys
from collections.abc import Iterator

from cnnlab.safetext import printable

_HUSHED = contextvars.ContextVar("hushed", default=False)


@contextlib.contextmanager
def hushed() -> Iterator[None]:
    """Inside it, ``say`` is silent: for notes about building something the user did not ask to build now
    (a finished run's model rebuilt to evaluate it says again what its training said)."""
    token = _HUSHED.set(True)
    try:
        yield
    finally:
        _HUSHED.reset(token)


def say(text: str) -> None:
    """One line on stderr, printed literally (control characters from files are shown as escapes); a line
    nobody can read never stops the command. Silent inside ``hushed``."""
    if not _HUSHED.get():
        _write(text)


def warn(text: str) -> None:
    """One warning line on stderr, printed literally (even inside ``hushed``: a warning is never a repeat)."""
    _write(f"warning: {text}")


def _write(text: str) -> None:
    try:
        sys.stderr.write(f"{printable(text)}\n")
        sys.stderr.flush()
    except (OSError, ValueError):
        pass


class UserError(Exception):
    """Bad input: a config, an override, a path or a data file. The message says how to fix it."""

    exit_code = 2


class TrainingError(RuntimeError):
    """Training started but could not finish (for example the loss diverged)."""

    exit_code = 1
