"""Usage: ``print(printable(text_from_a_file))``; ``one_line(name)`` in a table cell; ``plot_label(name)`` in a figure.

Text that cnnlab did not write itself (names, paths, values and messages read from configs, summaries,
run folders, data folders or the command line) may hold control characters: a terminal escape sequence
such as ``\\x1b]0;TITLE\\x07\\x1b[2J`` would retitle and clear the user's terminal, a newline in a class
name would split a table's row in two, and a font has no glyph for a control character (matplotlib
draws a box and warns). This is the one place that makes such text safe, in three forms:

- ``printable``: for a line or a message. Each control character is shown as a visible escape
  instead of being sent; tab and newline are kept (a message may have several lines).
- ``one_line``: for a table cell, or a name inside a line of text: newline, tab and the Unicode line
  and paragraph separators shown as escapes too, so a name is always one line of one cell.
- ``plot_label``: for text drawn in a figure (class names, run names, variant labels, titles made of
  them): one line, with nothing a font has no glyph for.

And ``how_names_differ`` says in words why two names that look the same are different strings (Unicode
normalisation, an invisible character, a look-alike letter): a message about two such names would
otherwise show the same name twice. ``look_alike`` finds such a pair among a data set's class names.
Nothing here imports more than ``re``, ``unicodedata`` and ``collections.abc``, so the lowest modules
(errors.py) can use it.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence

CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")  # C0 and C1 controls but tab and newline
LINE_BREAKING = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")  # every control, and the line and paragraph separators


def _escape(match: re.Match[str]) -> str:
    return match.group().encode("unicode_escape").decode("ascii")


def printable(text: object) -> str:
    """``text`` with control characters written as escapes: safe to show on a terminal or in a file."""
    return CONTROL.sub(_escape, str(text))


def one_line(text: object) -> str:
    """``text`` as one line: ``printable``, with newline, tab, carriage return and the Unicode line and paragraph
    separators written as escapes too (``a\\nb``). For a table cell, or a name inside a line."""
    return LINE_BREAKING.sub(_escape, str(text))


def plot_label(text: object) -> str:
    """``text`` as a figure draws it: one line (``one_line``), every control character shown as an escape, which
    the font has glyphs for (a control character is drawn as a box, with a warning from matplotlib). For every
    label, legend entry and title of a figure that holds a name from a file; a figure's own multi-line caption
    is made of such labels joined by newlines."""
    return one_line(text)


def _code_points(text: str) -> str:
    return " ".join(f"U+{ord(c):04X}" for c in text)


def _invisible(char: str) -> bool:
    return unicodedata.category(char) in ("Cf", "Cc", "Zl", "Zp") or char in "\u034f\u115f\u1160\u3164\uffa0"


def look_alike(names: Sequence[str]) -> tuple[int, int] | None:
    """The positions of the first two of ``names`` that are different strings but look the same (the same after
    NFKC normalisation, with invisible characters left out: "café" in NFC and in NFD, "dog" and "do\u200bg"), or None.
    Names that are the same string are not reported here: that is a plain duplicate."""
    seen: dict[str, int] = {}
    for i, name in enumerate(names):
        key = "".join(c for c in unicodedata.normalize("NFKC", name) if not _invisible(c))
        if key in seen and names[seen[key]] != name:
            return seen[key], i
        seen.setdefault(key, i)
    return None


def how_names_differ(first: str, second: str) -> str:
    """Why ``first`` and ``second``, two different strings that may look the same on a screen, differ: a phrase for
    a message naming both, e.g. "they differ only in Unicode normalisation (the first writes é as U+00E9, NFC; the
    second as U+0065 U+0301, NFD)". "" when they are the same string."""
    if first == second:
        return ""
    if unicodedata.normalize("NFC", first) == unicodedata.normalize("NFC", second):
        a, b = _differing_part(first, second)
        shown = unicodedata.normalize("NFC", a) or unicodedata.normalize("NFC", b)
        return (f"they differ only in Unicode normalisation (the first writes {one_line(shown)} as {_code_points(a)}, "
                f"{_form(first)}; the second as {_code_points(b)}, {_form(second)})")
    if unicodedata.normalize("NFKC", first) == unicodedata.normalize("NFKC", second):
        a, b = _differing_part(first, second)
        return (f"they differ only in Unicode compatibility characters ({_code_points(a) or 'nothing'} in the first "
                f"against {_code_points(b) or 'nothing'} in the second; the same after NFKC normalisation)")
    visible = ["".join(c for c in name if not _invisible(c)) for name in (first, second)]
    if visible[0] == visible[1]:
        hidden = [_code_points("".join(c for c in name if _invisible(c))) for name in (first, second)]
        return ("they differ only in invisible characters (the first holds " + (hidden[0] or "none")
                + ", the second " + (hidden[1] or "none") + ")")
    if first.strip() == second.strip():
        return "they differ only in spaces at their ends"
    if first.casefold() == second.casefold():
        return "they differ only in upper and lower case"
    at = next((i for i, (a, b) in enumerate(zip(first, second)) if a != b), min(len(first), len(second)))
    a, b = first[at:at + 1], second[at:at + 1]
    return (f"they differ at character {at + 1}: {_character(a)} in the first, {_character(b)} in the second")


def _character(char: str) -> str:
    if not char:
        return "the end of the name"
    return f"{one_line(char)} (U+{ord(char):04X} {unicodedata.name(char, 'unnamed')})"


def _differing_part(first: str, second: str) -> tuple[str, str]:
    """The parts of ``first`` and ``second`` between their common start and their common end, widened to whole
    characters (a combining mark stays with the letter it marks)."""
    start = 0
    while start < min(len(first), len(second)) and first[start] == second[start]:
        start += 1
    while start > 0 and any(start < len(s) and unicodedata.combining(s[start]) for s in (first, second)):
        start -= 1
    end = 0
    while end < min(len(first), len(second)) - start and first[-1 - end] == second[-1 - end]:
        end += 1
    while end > 0 and any(unicodedata.combining(s[len(s) - end]) for s in (first, second)):
        end -= 1
    return first[start:len(first) - end], second[start:len(second) - end]


def _form(text: str) -> str:
    forms = [form for form in ("NFC", "NFD") if unicodedata.is_normalized(form, text)]
    return forms[0] if len(forms) == 1 else "neither NFC nor NFD" if not forms else "NFC and NFD alike"
