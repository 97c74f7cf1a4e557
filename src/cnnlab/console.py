"""Usage: ``out = SafeConsole()``; ``out.print(user_text)``: every console cnnlab prints through.

User text (names, paths, values, messages from files) is printed literally: rich markup is never
interpreted, so ``[/x]`` cannot crash a command and ``[old]`` is not swallowed, and control
characters (terminal escape sequences a hostile name could carry) are shown as ``\x1b``-style
escapes instead of being sent to the terminal. A table cell is ``cell(name)``: one line, a newline or tab in
the name shown as an escape too, so that it never splits a row.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

from rich.console import Console
from rich.text import Text

from cnnlab.safetext import CONTROL, one_line, printable

__all__ = ["CONTROL", "SafeConsole", "cell", "literal", "one_line", "printable"]


def literal(text: str) -> Text:
    """A rich ``Text`` that shows ``text`` exactly (markup and controls neutralised), e.g. a line of a message.
    (Build a ``Text`` only this way: rich's own drops some control characters, a bell among them, unseen.)"""
    return Text(printable(text))


def cell(text: str) -> Text:
    """A rich ``Text`` that shows ``text`` as one line (``one_line``: newline and tab as escapes too): a table cell,
    which a name from a file must never split into two rows."""
    return Text(one_line(text))


class SafeConsole(Console):
    """A console that prints user text literally (no markup) and never ends the program: when its
    reader goes away (``cnnlab run ... | head``, a dead sweep) it falls silent and training goes on,
    still recording everything in the run folder. (rich's own answer is ``SystemExit(1)``.)"""

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("highlight", False)
        super().__init__(markup=False, **kwargs)

    def print(self, *objects: Any, **kwargs: Any) -> None:
        cleaned = []
        for item in objects:
            if isinstance(item, str):
                item = printable(item)
            elif isinstance(item, Text) and CONTROL.search(item.plain):
                item = Text(printable(item.plain), style=item.style)
            cleaned.append(item)
        super().print(*cleaned, **kwargs)

    def on_broken_pipe(self) -> None:
        self.quiet = True
        with contextlib.suppress(OSError, ValueError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, self.file.fileno())
