"""Usage: ``raise UserError("what is wrong; how to fix it")``.

Two kinds of failure, told apart because the CLI maps them to different exit codes:
bad input from the user (exit 2, checked before anything is written) and failures while
training (exit 1, recorded in the run's summary.json).
"""

import sys

from cnnlab.safetext import printable


def say(text: str) -> None:
    """One line on stderr, printed literally (control characters from files are shown as escapes); a line
    nobody can read never stops the command."""
    try:
        sys.stderr.write(f"{printable(text)}\n")
        sys.stderr.flush()
    except (OSError, ValueError):
        pass


def warn(text: str) -> None:
    """One warning line on stderr, printed literally."""
    say(f"warning: {text}")


class UserError(Exception):
    """Bad input: a config, an override, a path or a data file. The message says how to fix it."""

    exit_code = 2


class TrainingError(RuntimeError):
    """Training started but could not finish (for example the loss diverged)."""

    exit_code = 1
