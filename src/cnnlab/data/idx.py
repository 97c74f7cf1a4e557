"""Usage: ``folder = SET.find_data_dir(root)``; ``train = SET.read_split(folder, "train")``, for an ``IdxSet`` SET.

The IDX family: Fashion-MNIST, MNIST and KMNIST all ship as four IDX files (plain or gzipped) of 28x28
grey images and their labels. An ``IdxSet`` says what differs between them (name, classes, expected
counts, checksums, where a copy may already be, torchvision's name for it); everything else is here,
once: finding the files in the usual places, downloading them through torchvision only when asked to,
reading and validating them (magic number, image size, length, labels; a bad file is named: the header is
read first, then only the bytes it declares and one more, so a gzip bomb is never inflated), and the
module interface the registry expects (``describe``, ``read_splits``, ``check``, ``where``, ``SPEC``), which each
data set's own module takes from its ``IdxSet``.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from cnnlab.data.bounded import fits_memory, read_declared
from cnnlab.data.places import Whereabouts
from cnnlab.data.spec import DataSpec
from cnnlab.data.splits import Split
from cnnlab.errors import UserError

FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
STEMS = tuple(stem for pair in FILES.values() for stem in pair)
IMAGE_SIZE = 28
IMAGES_MAGIC, LABELS_MAGIC = 0x00000803, 0x00000801
CACHE_ROOT = Path("~/.cache/cnnlab")  # each set's cache (and download target) is CACHE_ROOT/<name>
GZIP_MAGIC = b"\x1f\x8b"
HASH_CHUNK = 1 << 22  # bytes hashed at a time


@dataclass(frozen=True)
class Checksum:
    """A file's known digest: ``algorithm`` as hashlib names it, of the published ``.gz`` archive
    (``archive``) or of the decompressed file."""

    algorithm: str
    digest: str
    archive: bool = False


def archive_md5s(digests: dict[str, str]) -> dict[str, Checksum]:
    """The published MD5s of a set's ``.gz`` archives, by file stem, as ``Checksum``s."""
    return {stem: Checksum("md5", digest, archive=True) for stem, digest in digests.items()}


@dataclass(eq=False)
class IdxSet:
    """One data set of the IDX family. Its module exposes ``NAME``, ``SPEC`` and the methods below."""

    name: str  # data.name: mnist
    title: str  # as people write it: MNIST
    classes: tuple[str, ...]  # index = label
    checksums: dict[str, Checksum]  # by file stem
    torchvision: str  # torchvision.datasets' class for it, also its folder in torchvision's layout: <root>/<it>/raw
    counts: dict[str, int] = field(default_factory=lambda: {"train": 60_000, "test": 10_000})
    env_var: str | None = None  # an environment variable naming the set's folder, searched first
    system_dir: Path | None = None  # a distribution's package of it, searched last
    install_hint: str = ""  # how to install that package, for the message when nothing is found

    @property
    def spec(self) -> DataSpec:
        return DataSpec(name=self.name, title=self.title, classes=self.classes, channels=1,
                        image_size=(IMAGE_SIZE, IMAGE_SIZE), dark_background=True)  # light strokes on black, all three

    @property
    def cache_dir(self) -> Path:
        return (CACHE_ROOT / self.name).expanduser()

    @property
    def by_hand(self) -> str:
        files = ", ".join(f"{stem}[.gz]" for stem in STEMS)
        env = f" or set ${self.env_var}" if self.env_var else ""
        return f"put the four IDX files ({files}) in a folder and pass --data-dir (data.root){env}"

    @property
    def how_to_get(self) -> str:
        return f"To get the data: {self.install_hint}{self.by_hand}; or, with internet access, add --download"

    # -----------------------------------------------------------------------------------------
    # Finding the files

    def search_dirs(self, root: Path | None = None) -> list[Path]:
        """Where the data is looked for, in order. An explicit ``root`` is the only place searched."""
        if root is not None:
            return [Path(root).expanduser()]
        dirs = []
        if self.env_var and os.environ.get(self.env_var):
            dirs.append(Path(os.environ[self.env_var]).expanduser())
        dirs.append(self.cache_dir)
        if self.system_dir is not None:
            dirs.append(self.system_dir)
        return dirs

    def find_file(self, folder: Path, stem: str) -> Path | None:
        """``stem`` or ``stem.gz`` in ``folder`` or in torchvision's ``folder/<Set>/raw`` layout."""
        for base in (folder, folder / self.torchvision / "raw"):
            for candidate in (base / stem, base / f"{stem}.gz"):
                if candidate.is_file():
                    return candidate
        return None

    def holds_files(self, folder: Path) -> bool:
        return all(self.find_file(folder, stem) for stem in STEMS)

    def where(self, root: Path | None = None) -> Whereabouts:
        """Each folder searched (``search_dirs``) with what it holds, and the first holding all four files."""
        looked = []
        for folder in self.search_dirs(root):
            missing = [stem for stem in STEMS if not self.find_file(folder, stem)]
            looked.append((folder, "does not exist" if not folder.exists() else
                           f"lacks {', '.join(missing)}" if missing else "holds the files"))
        return Whereabouts(next((folder for folder, state in looked if state == "holds the files"), None), tuple(looked))

    def find_data_dir(self, root: Path | None = None, download: bool = False) -> Path:
        """The first folder holding all four files; downloads (into ``root``, else the cache) only when asked to."""
        looked = self.where(root)
        if looked.found is not None:
            return looked.found
        if download:
            return self.download(looked.looked[0][0] if root is not None else self.cache_dir)
        lines = [f"  {folder}: {state}" for folder, state in looked.looked]
        raise UserError(f"{self.title} not found. Searched:\n" + "\n".join(lines) + f"\n{self.how_to_get}.")

    def download(self, folder: Path) -> Path:
        """Fetch through torchvision (into ``folder/<Set>/raw``), which checks each archive's MD5. Only
        ever called on request; any failure (offline, a mirror down, a bad archive) is one line."""
        import torchvision.datasets

        folder.mkdir(parents=True, exist_ok=True)
        fetch = getattr(torchvision.datasets, self.torchvision)
        try:
            for train in (True, False):
                fetch(str(folder), train=train, download=True)
        except Exception as err:  # network errors come in many types and lines; all mean the same to the user
            reason = " ".join(str(err).split()) or type(err).__name__
            raise UserError(f"{self.title}: download into {folder} failed ({reason}). Without internet access, "
                            f"{self.by_hand}") from None
        return folder

    # -----------------------------------------------------------------------------------------
    # Reading and validating

    def read_idx(self, path: Path, kind: str, split: str | None = None) -> torch.Tensor:
        """An IDX images file as uint8 [N, 1, 28, 28], or a labels file as int64 [N]; checked, never short. Its header
        is read first: with ``split``, its count must be the set's (``data.check_counts``); then the bytes it declares
        are checked against the memory available, and only they are read (and one more, which must not be there)."""
        magic, header = (IMAGES_MAGIC, 16) if kind == "images" else (LABELS_MAGIC, 8)
        gzipped = False
        try:
            with path.open("rb") as raw:
                gzipped = raw.read(2) == GZIP_MAGIC
                raw.seek(0)
                handle = gzip.GzipFile(fileobj=raw) if gzipped else raw
                count, shape = self._header(path, kind, magic, handle.read(header))
                if split is not None and count != self.counts[split]:
                    raise UserError(f"{path}: {count:,} {kind}, {self.title}'s {split} set has {self.counts[split]:,}. "
                                    "Replace the file, or set data.check_counts: false to use a different IDX data set")
                nbytes = count * (IMAGE_SIZE * IMAGE_SIZE if kind == "images" else 1)
                declared = f"{path}: header says {count:,} {kind} ({header + nbytes:,} bytes) but the file"
                size = os.fstat(raw.fileno()).st_size
                if not gzipped and size != header + nbytes:  # a plain file's length is known before reading it
                    raise UserError(f"{declared} has {size:,} bytes; it is truncated or corrupted. Replace it with a "
                                    "fresh copy")
                fits_memory(nbytes, f"{path}: its header declares {count:,} {kind},")
                data, more = read_declared(handle, nbytes)
        except (EOFError, OSError, zlib.error) as err:
            what = "truncated or corrupted gzip file" if gzipped else "cannot be read"
            raise UserError(f"{path}: {what} ({err}). Replace it with a fresh copy (reinstall it, or delete it and use "
                            "--download)") from None
        if len(data) < nbytes:
            raise UserError(f"{declared} has {header + len(data):,} bytes; it is truncated or corrupted. Replace it with "
                            "a fresh copy")
        if more:
            raise UserError(f"{declared} holds more; it is corrupted or not an IDX {kind} file. Replace it with a fresh copy")
        tensor = torch.from_numpy(data).reshape(shape)
        if kind == "labels":
            if int(tensor.max()) > len(self.classes) - 1:
                raise UserError(f"{path}: label {int(tensor.max())} found; {self.title} labels are 0-{len(self.classes) - 1}")
            tensor = tensor.long()
        return tensor

    def _header(self, path: Path, kind: str, magic: int, data: bytes) -> tuple[int, tuple[int, ...]]:
        """(the count, the array's shape) an IDX header declares, checked: magic number, image size, some data."""
        if len(data) < (16 if kind == "images" else 8):
            raise UserError(f"{path}: only {len(data)} bytes, too short for an IDX header; the file is truncated")
        found = struct.unpack(">I", data[:4])[0]
        if found != magic:
            raise UserError(
                f"{path}: wrong magic number 0x{found:08x}, expected 0x{magic:08x} (an IDX {kind} file). "
                "Is this the right file, and decompressed correctly?"
            )
        count = struct.unpack(">I", data[4:8])[0]
        if count == 0:
            raise UserError(f"{path}: its header says 0 {kind}; a data set's file holds some. Replace it with a fresh copy")
        if kind == "labels":
            return count, (count,)
        rows, cols = struct.unpack(">II", data[8:16])
        if (rows, cols) != (IMAGE_SIZE, IMAGE_SIZE):
            raise UserError(f"{path}: images are {rows}x{cols}, expected {IMAGE_SIZE}x{IMAGE_SIZE}")
        return count, (count, 1, rows, cols)

    def read_split(self, folder: Path, split: str, check_counts: bool = True) -> Split:
        images_stem, labels_stem = FILES[split]
        images_path, labels_path = self.find_file(folder, images_stem), self.find_file(folder, labels_stem)
        if images_path is None or labels_path is None:
            missing = images_stem if images_path is None else labels_stem
            raise UserError(f"{folder}: {missing}[.gz] is missing. {self.how_to_get}")
        counted = split if check_counts else None
        images, labels = self.read_idx(images_path, "images", counted), self.read_idx(labels_path, "labels", counted)
        if len(images) != len(labels):
            raise UserError(f"{images_path} holds {len(images):,} images but {labels_path} holds {len(labels):,} labels")
        return Split(images, labels)

    def verify(self, folder: Path) -> Iterator[str]:
        """One line per file: its checksum against the known one (a mismatch is a ``UserError`` after its line).
        A digest of the published archive checks the ``.gz`` beside the file; without one it says so."""
        for stem in STEMS:
            known = self.checksums[stem]
            path = self.find_file(folder, stem)
            if known.archive:
                path = path.with_name(f"{stem}.gz")
                if not path.is_file():
                    yield f"  {stem}: not checked ({self.title}'s published {known.algorithm} is of {stem}.gz, not here)"
                    continue
            ok = file_digest(path, known.algorithm, decompressed=not known.archive) == known.digest
            yield f"  {path.name}: {known.algorithm} {'ok' if ok else 'MISMATCH'}"
            if not ok:
                raise UserError(f"{path}: checksum differs from {self.title}'s; replace the file")

    # -----------------------------------------------------------------------------------------
    # The module interface (registry.py)

    def describe(self, cfg) -> DataSpec:
        """What the data set is, whatever the config: ``spec``."""
        return self.spec

    def read_splits(self, cfg) -> tuple[Path, Split, Split]:
        """(the folder, the training split, the test split) for a ``DataConfig``, validated."""
        root = self.find_data_dir(cfg.root, cfg.download)
        return root, self.read_split(root, "train", cfg.check_counts), self.read_split(root, "test", cfg.check_counts)

    def check(self, root: Path | None = None, download: bool = False, verify: bool = False,
              check_counts: bool = True) -> Iterator[str]:
        """What ``cnnlab data`` says, line by line: where the files are, what each split holds and, with
        ``verify``, whether each file's checksum is the known one; ``check_counts`` as ``data.check_counts``."""
        folder = self.find_data_dir(root, download)
        yield f"{self.title} found in {folder}"
        for split in FILES:
            loaded = self.read_split(folder, split, check_counts)
            yield f"  {split}: {len(loaded):,} images, {IMAGE_SIZE}x{IMAGE_SIZE}, labels 0-{len(self.classes) - 1}"
        if verify:
            yield from self.verify(folder)

    def cache_state(self) -> str:
        """The set's cache folder and whether it holds the files (``cnnlab data NAME`` says it)."""
        state = "holds the files" if self.holds_files(self.cache_dir) else \
            "empty" if self.cache_dir.is_dir() else "not made yet"
        return f"{self.cache_dir} ({state}; --download fills it)"


def file_digest(path: Path, algorithm: str, decompressed: bool) -> str:
    """The hex digest of a file's bytes (``decompressed``: of what it holds, when it is gzipped), read in chunks."""
    digest = hashlib.new(algorithm)
    try:
        with path.open("rb") as raw:
            gzipped = decompressed and raw.read(2) == GZIP_MAGIC
            raw.seek(0)
            handle = gzip.GzipFile(fileobj=raw) if gzipped else raw
            while chunk := handle.read(HASH_CHUNK):
                digest.update(chunk)
    except (EOFError, OSError, zlib.error) as err:
        raise UserError(f"{path}: cannot be read to check it ({err}); replace it with a fresh copy") from None
    return digest.hexdigest()


def read_bytes(path: Path) -> bytes:
    """A file's bytes, decompressed when it is gzipped (by its magic, not its name)."""
    raw = path.read_bytes()
    if raw[:2] != b"\x1f\x8b":
        return raw
    try:
        return gzip.decompress(raw)
    except (EOFError, OSError, zlib.error) as err:
        raise UserError(
            f"{path}: truncated or corrupted gzip file ({err}). Replace it with a fresh copy "
            "(reinstall it, or delete it and use --download)"
        ) from None
