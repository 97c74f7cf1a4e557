"""Usage: ``path = cache_file("folder", key)``; ``write(path, arrays)``; ``arrays = read(path, names)``.

Decoded data kept on disk, so that a data set is decoded once: one uncompressed ``.npz`` file per
content key, under ``$CNNLAB_CACHE`` (default ``~/.cache/cnnlab``). Written to a temporary file and
renamed into place, so a file under its final name is always whole; read without pickles, and a file
that does not read back whole (zip CRC-32 of every array checked, the names expected) is reported
as corrupt (``CorruptCache``) for the caller to rebuild: a cache file is never trusted.
"""

from __future__ import annotations

import contextvars
import errno
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
CHUNK = 1 << 24  # bytes read at a time when a mapped array's checksum is checked
WRITES = contextvars.ContextVar("cache_writes", default=True)  # False: nothing is written (a dry run: dryrun.py)


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
    """Write ``arrays`` to ``path`` atomically: another process sees the old file, or none, or the whole new one.
    Refused as a read-only disk would refuse it (``OSError``) while ``WRITES`` is False."""
    if not WRITES.get():
        raise OSError(errno.EROFS, "a dry run writes nothing")
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


def read(path: Path, names: tuple[str, ...], only: tuple[str, ...] | None = None,
         mapped: tuple[str, ...] = ()) -> dict[str, np.ndarray] | None:
    """The arrays called ``names`` in the cache file ``path`` (or those of them in ``only``: the rest stay
    on disk); None when there is none; ``CorruptCache`` when it is not whole (truncated, a flipped bit,
    arrays missing or not plain arrays). The arrays named in ``mapped`` are memory-mapped from the file
    (copy-on-write: writing to them never changes it), not read into memory; their bytes are still checked."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as stored:
            if set(stored.files) != set(names):
                raise CorruptCache(f"holds {sorted(stored.files)}, expected {sorted(names)}")
            wanted = only or names
            arrays = {name: stored[name] for name in wanted if name not in mapped}
        with zipfile.ZipFile(path) as archive:
            arrays.update({name: mapped_member(path, archive.getinfo(f"{name}.npy")) for name in wanted if name in mapped})
        return arrays
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, zlib.error) as err:
        raise CorruptCache(str(err) or type(err).__name__) from None


def mapped_member(path: Path, member: zipfile.ZipInfo) -> np.ndarray:
    """The array a stored (uncompressed) ``.npy`` member of the zip file ``path`` holds, memory-mapped, after its
    bytes were checked against the member's CRC-32 (read in chunks: a file larger than memory is checked too)."""
    if member.compress_type != zipfile.ZIP_STORED:
        raise CorruptCache(f"{member.filename} is compressed, so it cannot be mapped")
    with open(path, "rb") as file:
        file.seek(member.header_offset)
        local = file.read(30)  # the member's local header: its name and extra field come before the data
        if len(local) != 30 or local[:4] != b"PK\x03\x04":
            raise CorruptCache(f"{member.filename}: no local header where the directory says")
        start = member.header_offset + 30 + int.from_bytes(local[26:28], "little") + int.from_bytes(local[28:30], "little")
        file.seek(start)
        crc, left = 0, member.file_size
        while left:
            chunk = file.read(min(left, CHUNK))
            if not chunk:
                raise CorruptCache(f"{member.filename}: the file ends {left:,} bytes early")
            crc, left = zlib.crc32(chunk, crc), left - len(chunk)
        if crc != member.CRC:
            raise CorruptCache(f"{member.filename}: its bytes do not match their CRC-32")
        file.seek(start)
        version = np.lib.format.read_magic(file)
        header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = header(file)
        offset = file.tell()
    if fortran or dtype.hasobject or offset - start + dtype.itemsize * int(np.prod(shape)) != member.file_size:
        raise CorruptCache(f"{member.filename}: its header does not describe its bytes")
    return np.memmap(path, dtype=dtype, mode="c", offset=offset, shape=shape)
