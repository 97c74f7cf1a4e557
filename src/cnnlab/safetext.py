"""Usage: ``print(printable(text_from_a_file))``: the one place that makes text safe for a terminal.

Text that cnnlab did not write itself (names, paths, values and messages read from configs, summaries,
run folders or the command line) may hold control characters: a terminal escape sequence such as
``\\x1b]0;TITLE\\x07\\x1b[2J`` would retitle and clear the user's terminal. Every line cnnlab prints,
warnings included, passes through ``printable``, which shows each control character as a visible
escape instead of sending it. Tab and newline are kept. Nothing here imports more than ``re``, so the
lowest modules (errors.py) can use it.
"""

from __future__ import annotations

import re

CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")  # C0 and C1 controls but tab and newline


def printable(text: object) -> str:
    """``text`` with control characters written as escapes: safe to show on a terminal or in a file."""
    return CONTROL.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), str(text))
