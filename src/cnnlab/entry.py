"""Usage: the ``cnnlab`` command and ``python -m cnnlab`` start here.

Signals are recorded from the first moment (before typer, rich or torch are imported), so a Ctrl-C
or SIGTERM during start-up is never lost: the command that then runs honours it (see stopping.py).
At the end, the objects alive are frozen out of the cyclic collector's reach: the interpreter's
shutdown then takes 0.1 s instead of 0.8 s. A process of torchrun's group ends without that shutdown
(``end_group_member``). Warnings of the libraries cnnlab uses are routed here too (``route_warnings``).
"""

# Library warnings that say nothing a user of cnnlab can act on: (the start of the message, why it is noise).
NOISE = (
    ("Unnamed CHECK constraint", "alembic's, while MLflow migrates its own tracking database"),
    ("constrained_layout not applied", "matplotlib's, when labels crowd a figure: it is still drawn, and saved whole"),
)


def main() -> None:
    from cnnlab.stopping import record_early_signals

    record_early_signals()
    route_warnings()
    from cnnlab.cpus import mark_start

    mark_start()
    from cnnlab.cli import main as cli_main

    try:
        cli_main()
    except SystemExit as stop:
        end_group_member(stop.code)
        raise
    else:
        end_group_member(0)
    finally:
        # Interpreter shutdown would have the cyclic collector walk every object that torch, its
        # compiler and matplotlib made (0.75 s of a 3-epoch run here). They are freed all the same;
        # files are closed by then (every write is a `with` block) and atexit handlers still run.
        import gc

        gc.freeze()


def end_group_member(code: object) -> None:
    """End a process that has been in torchrun's process group now, with exit status ``code``: after its
    exit handlers and with its output flushed, as Python would, but without tearing the interpreter and the
    C++ runtime down. Any other process: returns at once.

    The group's gloo threads (two workers and a socket loop) outlive ``destroy_process_group``, since DDP's
    reducer holds the backend, and stay to the process's end; a teardown with them running aborts now and
    then ("terminate called without an active exception", SIGABRT), and torchrun then fails a run that had
    completed (seen in the README's torchrun line beside a CPU hog)."""
    import sys

    distributed = sys.modules.get("cnnlab.distributed")  # never imported: no group joined (and torch need not load)
    if distributed is None or not distributed.joined_a_group():
        return
    import atexit
    import os
    import threading

    for thread in threading.enumerate():  # what the interpreter's own exit waits for
        if thread is not threading.main_thread() and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass  # nobody is reading: as at an ordinary exit, nothing more to say
    if code is None or isinstance(code, int):
        os._exit(code or 0)
    sys.stderr.write(f"{code}\n")  # sys.exit("message"): said, and status 1, as Python does
    sys.stderr.flush()
    os._exit(1)


def route_warnings() -> None:
    """Show each warning of the libraries cnnlab uses as one ``warning:`` line on stderr, as cnnlab's own are: the
    message alone (its control characters shown as escapes, its lines joined), without the file and source line
    Python adds; leave out those in ``NOISE``. Python's filters still decide which warnings are shown and how
    often; with ``-W`` or PYTHONWARNINGS given, everything is left as Python shows it (a developer asked)."""
    import re
    import sys
    import warnings

    if sys.warnoptions:
        return
    for start, _ in NOISE:
        warnings.filterwarnings("ignore", message=re.escape(start))
    warnings.showwarning = show_warning


def show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """``warnings.showwarning``, as ``route_warnings`` sets it: one cnnlab warning line."""
    from cnnlab.errors import warn

    warn(" ".join(str(message).split()))
