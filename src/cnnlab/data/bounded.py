"""Usage: ``fits_memory(nbytes, where)``; ``data, more = read_declared(handle, nbytes)``.

Reading what a data file's header declares, and not a byte more: a file is untrusted, and a compressed
one may inflate to far more than it says (a few MB of gzip or zip holding GBs of zeros). A reader
checks the header first, then the size it declares against the memory available (``fits_memory``),
then reads that many bytes and one more (``read_declared``): a short file or one with bytes beyond what
it declares is named as damaged, without inflating the rest.
"""

from __future__ import annotations

from typing import BinaryIO

import numpy as np

from cnnlab.data.placement import host_memory_available
from cnnlab.errors import UserError

CHUNK = 1 << 22  # bytes read at a time: what a read holds beside the array it fills


def size_text(nbytes: int) -> str:
    """``235,200 bytes``, or ``3.2 GiB`` for a size of a GiB or more."""
    return f"{nbytes / (1 << 30):,.1f} GiB" if nbytes >= 1 << 30 else f"{nbytes:,} bytes"


def fits_memory(nbytes: int, where: str) -> None:
    """A ``UserError`` when ``nbytes`` (what ``where`` declares: "PATH: ... declares") exceed the memory available."""
    available = host_memory_available()
    if available is not None and nbytes > available:
        raise UserError(f"{where} {size_text(nbytes)}, more than the {size_text(available)} of memory available now; "
                        "if the file is not that large, it is damaged: replace it with a fresh copy")


def read_declared(handle: BinaryIO, nbytes: int) -> tuple[np.ndarray, bool]:
    """(the next ``nbytes`` bytes of ``handle`` as uint8, fewer when it ends first; whether it holds more after them)."""
    out = np.empty(nbytes, dtype=np.uint8)
    view, got = memoryview(out), 0
    while got < nbytes:
        chunk = handle.read(min(CHUNK, nbytes - got))
        if not chunk:
            return out[:got], False
        view[got:got + len(chunk)] = chunk
        got += len(chunk)
    return out, bool(handle.read(1))
