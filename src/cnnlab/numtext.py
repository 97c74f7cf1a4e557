"""Usage: ``number_text(0.8635)`` -> ``"0.864"``; ``number_text(float("nan"))`` -> ``"nan"``.

The one way cnnlab writes a number into a table, a report or a message. Numbers read back from
files may be anything JSON allows (``NaN``, ``Infinity``, ``1e308``): each is shown as what it is,
never crashes a format, and never runs to hundreds of digits.
"""

from __future__ import annotations

import math
from typing import Any

MISSING = "–"  # no value at all (a metric the run never measured)
LARGE = 1e9  # from here on, scientific notation: 1e308 must not print 309 digits


def number_text(value: Any, decimals: int = 3, *, grouped: bool = False, significant: int | None = None,
                missing: str = MISSING) -> str:
    """``value`` as text, in one of two styles:

    - a table's or a message's (the default): ``decimals`` decimals (none for whole numbers), thousands
      separated when ``grouped``, very large numbers as ``1.23e+15``;
    - a data file's (``significant`` digits, as metrics.csv keeps them): ``1.23457e+06``, whole numbers in full.

    In both, ``nan``, ``inf`` and ``-inf`` as such, ``None`` as ``missing``, anything else as text."""
    if value is None:
        return missing
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if significant is not None:
        return f"{value:.{significant}g}" if isinstance(value, float) else str(value)
    if abs(value) >= LARGE:
        return f"{value:.3g}" if isinstance(value, float) or abs(value) >= 1e15 else f"{value:,}"
    if isinstance(value, int):
        return f"{value:,}" if grouped else str(value)
    return f"{value:,.{decimals}f}" if grouped else f"{value:.{decimals}f}"


def finite(value: Any) -> bool:
    """A real number one can plot or average (not None, NaN or infinite)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def duration_text(seconds: float) -> str:
    """A duration as a person reads it: ``"45 s"``, ``"3.5 min"``, ``"2.1 h"``; ``"?"`` for none that is finite."""
    if not finite(seconds) or seconds < 0:
        return "?"
    if seconds < 90:
        return f"{seconds:.0f} s" if seconds >= 10 else f"{seconds:.1f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"
