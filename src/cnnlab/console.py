"""Usage: ``out = SafeConsole()``; ``out.print(user_text)``: every console cnnlab prints through.

User text (names, paths, values, messages from files) is printed literally: rich markup is never
interpreted, so ``[/x]`` cannot crash a command and ``[old]`` is not swallowed.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

from rich.console import Console


class SafeConsole(Console):
    """A console that prints user text literally (no markup) and never ends the program: when its
    reader goes away (``cnnlab run ... | head``, a dead sweep) it falls silent and training goes on,
    still recording everything in the run folder. (rich's own answer is ``SystemExit(1)``.)"""

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("highlight", False)
        super().__init__(markup=False, **kwargs)

    def on_broken_pipe(self) -> None:
        self.quiet = True
        with contextlib.suppress(OSError, ValueError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, self.file.fileno())
