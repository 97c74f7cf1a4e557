"""Usage: ``path = cache_file("folder", key)``; ``write(path, arrays)``; ``arrays = read(path, names)``.

Decoded data kept on disk, so that a data set is decoded once: one uncompressed ``.npz`` file per
content key, under ``$CNNLAB_CACHE`` (default ``~/.cache/cnnlab``). Written to a temporary file and
renamed into place, so a file under its final name is always whole; read without pickles, and a file
that does not read back whole (zip CRC-32 of every array checked, the names expected) is reported
as corrupt (``CorruptCache``) for the caller to rebuild: a cache file is never trusted.
"""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np

ENV = "CNNLAB_CACHE"
DEFAULT_ROOT = Path("~/.cache/cnnlab")


class CorruptCache(Exception):
    """A cache file that does not read back as written; the message says how."""


def cache_root() -> Path:
    """Where cnnlab keeps what it derives from data: ``$CNNLAB_CACHE``, else ``~/.cache/cnnlab``."""
    return Path(os.environ.get(ENV) or DEFAULT_ROOT).expanduser()


def content_key(parts: Any) -> str:
    """A name for the data ``parts`` (JSON values) describe: 32 hex digits of their SHA-256."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


def cache_file(kind: str, key: str) -> Path:
    return cache_root() / kind / f"{key}.npz"


def write(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write ``arrays`` to ``path`` atomically: another process sees the old file, or none, or the whole new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(temporary, "wb") as out:
            np.savez(out, **arrays)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def read(path: Path, names: tuple[str, ...], only: tuple[str, ...] | None = None) -> dict[str, np.ndarray] | None:
    """The arrays called ``names`` in the cache file ``path`` (or those of them in ``only``: the rest stay
    on disk); None when there is none; ``CorruptCache`` when it is not whole (truncated, a flipped bit,
    arrays missing or not plain arrays)."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as stored:
            if set(stored.files) != set(names):
                raise CorruptCache(f"holds {sorted(stored.files)}, expected {sorted(names)}")
            return {name: stored[name] for name in (only or names)}
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, zlib.error) as err:
        raise CorruptCache(str(err) or type(err).__name__) from None
