"""Usage: the ``cnnlab`` command and ``python -m cnnlab`` start here.

Signals are recorded from the first moment (before typer, rich or torch are imported), so a Ctrl-C
or SIGTERM during start-up is never lost: the command that then runs honours it (see stopping.py).
"""


def main() -> None:
    from cnnlab.stopping import record_early_signals

    record_early_signals()
    from cnnlab.cli import main as cli_main

    cli_main()
