"""Usage: ``folder, train, test = read_splits(CIFAR10, cfg)``; ``describe(CIFAR100, cfg)``: the CIFAR reader.

Krizhevsky's CIFAR-10 and CIFAR-100 (32x32 colour, 50,000 training and 10,000 test images), as
``cifar10.py`` and ``cifar100.py`` describe them (``Distribution``: file names, counts, class names),
read by one reader from either distribution:
- the binary one (``cifar-10-batches-bin/``, ``cifar-100-binary/``), read directly: fixed-length
  records of the label byte(s) and 3,072 pixel bytes (1,024 red, then green, then blue, row by row);
- the pickled Python one (``cifar-10-batches-py/``, ``cifar-100-python/``), only through an unpickler
  that admits exactly what those files hold (dicts, lists, bytes, numbers and NumPy uint8 arrays):
  a pickle can name any function to call, and these files come from wherever the user got them.
Files are searched in ``data.root`` or else ``~/.cache/cnnlab/<name>``, directly or in the
distribution's own folder; the binary distribution wins when both are there. ``--download`` fetches
the binary archive through torchvision's download utilities (which check its MD5), only when asked.
"""

from __future__ import annotations

import io
import pickle
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cnnlab.data.places import Whereabouts
from cnnlab.data.spec import DataSpec
from cnnlab.data.splits import Split
from cnnlab.errors import UserError

IMAGE_SIZE = 32
PIXELS = 3 * IMAGE_SIZE * IMAGE_SIZE  # bytes of one image, channel-major: [3, 32, 32] as it lies
MAX_NAME = 100  # characters in a class name read from a names file


@dataclass(frozen=True)
class Distribution:
    """One CIFAR set: its names, its files in both distributions and its published classes. Label kinds
    are ``fine`` (CIFAR-10's only kind) and ``coarse`` (CIFAR-100's 20 superclasses)."""

    name: str  # as data.name says it
    title: str
    counts: dict[str, int]  # images per split
    binary_dir: str
    binary_files: dict[str, tuple[str, ...]]  # split -> its files, in order
    label_bytes: tuple[str, ...]  # the label kinds a binary record starts with, in order
    names_files: dict[str, str]  # label kind -> the binary distribution's text file of class names
    python_dir: str
    python_files: dict[str, tuple[str, ...]]
    python_meta: str  # the Python distribution's pickled class names
    label_keys: dict[str, str]  # label kind -> a Python batch's key for the labels
    names_keys: dict[str, str]  # label kind -> the meta file's key for the class names
    classes: dict[str, tuple[str, ...]]  # label kind -> the published class names
    archive: tuple[str, str]  # (URL, MD5) of the binary distribution, from the CIFAR page

    @property
    def record(self) -> int:
        """Bytes of one binary record: the label bytes, then the pixels."""
        return len(self.label_bytes) + PIXELS

    def labels_kind(self, cfg: Any) -> str:
        """The label kind ``data.labels`` asks for; one this set lacks is a ``UserError``."""
        kind = getattr(cfg, "labels", "fine")
        if kind not in self.classes:
            raise UserError(f"data.labels: {kind}: {self.title} has only {' and '.join(self.classes)} labels")
        return kind


# ---------------------------------------------------------------------------------------------
# Finding the files


def search_dirs(dist: Distribution, root: Path | None) -> list[Path]:
    """Where the files are looked for: ``root`` alone when given, else cnnlab's cache for this set."""
    return [Path(root).expanduser()] if root is not None else [Path(f"~/.cache/cnnlab/{dist.name}").expanduser()]


def layouts(dist: Distribution, folder: Path) -> Iterator[tuple[Path, str]]:
    """(folder, distribution) pairs where ``folder``'s files may lie, the binary distribution first."""
    yield folder / dist.binary_dir, "binary"
    yield folder, "binary"
    yield folder / dist.python_dir, "python"
    yield folder, "python"


def split_files(dist: Distribution, kind: str) -> dict[str, tuple[str, ...]]:
    return dist.binary_files if kind == "binary" else dist.python_files


def locate(dist: Distribution, root: Path | None) -> tuple[Path, str] | None:
    """(the folder holding every split file of one distribution, which one), or None."""
    for folder in search_dirs(dist, root):
        for candidate, kind in layouts(dist, folder):
            if all((candidate / name).is_file() for names in split_files(dist, kind).values() for name in names):
                return candidate, kind
    return None


def where(dist: Distribution, root: Path | None) -> Whereabouts:
    """Each folder searched with what it holds (either distribution, directly or in its own folder), and the
    folder holding every split file of one distribution (``locate``), if one does."""
    found = locate(dist, root)
    looked = []
    for folder in search_dirs(dist, root):
        kinds = [kind for candidate, kind in layouts(dist, folder) if all(
            (candidate / name).is_file() for names in split_files(dist, kind).values() for name in names)]
        looked.append((folder, "does not exist" if not folder.exists() else
                       f"holds the {kinds[0]} distribution" if kinds else
                       f"holds neither {dist.binary_dir}/ nor {dist.python_dir}/'s files"))
    return Whereabouts(found[0] if found is not None else None, tuple(looked))


def find(dist: Distribution, root: Path | None, download: bool) -> tuple[Path, str]:
    """``locate``, downloading into ``root`` or the cache when asked; not found is a ``UserError`` saying
    where it looked and how to get the files."""
    found = locate(dist, root)
    if found is not None:
        return found
    searched = search_dirs(dist, root)
    if download:
        fetch(dist, searched[0])
        return searched[0] / dist.binary_dir, "binary"
    binary = ", ".join(name for names in dist.binary_files.values() for name in names)
    lines = "\n".join(f"  {folder}{'' if folder.exists() else ' (does not exist)'}" for folder in searched)
    raise UserError(
        f"{dist.title} not found. Searched (and their {dist.binary_dir}/, {dist.python_dir}/ folders):\n{lines}\n"
        f"To get the data: extract the binary version from {dist.archive[0]} ({dist.binary_dir}/: {binary}) "
        "into data.root, or with internet access add --download"
    )


def fetch(dist: Distribution, folder: Path) -> None:
    """The binary archive through torchvision (which checks its MD5), extracted into ``folder``. Only on request."""
    from torchvision.datasets.utils import download_and_extract_archive

    url, md5 = dist.archive
    try:
        download_and_extract_archive(url, str(folder), md5=md5)
    except Exception as err:  # network and archive errors come in many types; all mean the same to the user
        raise UserError(f"download of {url} into {folder} failed: {err}. Put the extracted files in data.root instead") \
            from None


# ---------------------------------------------------------------------------------------------
# Reading the binary distribution


def read_binary(path: Path, dist: Distribution, kind: str, expected: int | None) -> Split:
    """A binary batch file as uint8 images [N, 3, 32, 32] and ``kind`` labels [N]; its length is checked
    against ``expected`` records (any whole number of them when None)."""
    raw = path.read_bytes()
    if len(raw) % dist.record or not raw or (expected is not None and len(raw) != expected * dist.record):
        layout = f"records of {dist.record:,} bytes ({' + '.join(dist.label_bytes)} label byte, 3,072 pixel bytes)"
        want = f"{expected * dist.record:,} bytes ({expected:,} {layout})" if expected is not None else \
            f"a whole number of {layout}"
        raise UserError(f"{path}: {len(raw):,} bytes, expected {want}; the file is truncated or not a {dist.title} "
                        "binary file. Replace it with a fresh copy")
    records = torch.frombuffer(bytearray(raw), dtype=torch.uint8).reshape(-1, dist.record)
    labels = records[:, dist.label_bytes.index(kind)].long()
    images = records[:, len(dist.label_bytes):].reshape(-1, 3, IMAGE_SIZE, IMAGE_SIZE).contiguous()
    return Split(images, checked_labels(labels, path, dist, kind))


def checked_labels(labels: torch.Tensor, path: Path, dist: Distribution, kind: str) -> torch.Tensor:
    top = len(dist.classes[kind]) - 1
    if len(labels) and (int(labels.max()) > top or int(labels.min()) < 0):
        bad = int(labels.max()) if int(labels.max()) > top else int(labels.min())
        raise UserError(f"{path}: {kind} label {bad} found; {dist.title}'s {kind} labels are 0-{top}")
    return labels


# ---------------------------------------------------------------------------------------------
# Reading the Python distribution, without running what a pickle names


class _NdarrayType:
    """What a pickle's ``numpy.ndarray`` stands for: only the type ``_reconstruct`` is asked to make, never
    a callable itself (``numpy.ndarray(shape)`` would allocate whatever a file asks)."""

    def __call__(self, *args: Any) -> None:
        raise pickle.UnpicklingError("numpy.ndarray called directly, which numpy's own pickles never do")


_NDARRAY = _NdarrayType()


def _reconstruct(subtype: Any, shape: Any, dtype: Any) -> np.ndarray:
    """numpy's ``_reconstruct`` as an array's pickle calls it: an empty array its state then fills in
    (and checks against its shape and dtype). Nothing but that one call is made."""
    if subtype is not _NDARRAY or shape != (0,):
        raise pickle.UnpicklingError("an array pickled in a way numpy never writes")
    return np.ndarray((0,), dtype=np.uint8)


# Exactly what CIFAR's pickles name: numpy arrays (``_reconstruct`` filled in by ``ndarray.__setstate__``) and
# their dtype. numpy 2 writes ``numpy._core``; the published files, written by numpy 1, ``numpy.core``.
ADMITTED = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy", "ndarray"): _NDARRAY,
    ("numpy", "dtype"): np.dtype,
}


class CifarUnpickler(pickle.Unpickler):
    """Loads CIFAR's Python batches: any other global a pickle names is refused before it is looked up."""

    def find_class(self, module: str, name: str) -> Any:
        found = ADMITTED.get((module, name))
        if found is None:
            raise pickle.UnpicklingError(f"it names {module}.{name}, which no CIFAR file holds; cnnlab runs no code "
                                         "from a data file")
        return found


def load_pickle(path: Path, what: str) -> dict[str, Any]:
    """A CIFAR Python file's dict (keys as text), through ``CifarUnpickler``; anything else is a ``UserError``."""
    try:
        # Python 2 wrote these files: its byte strings stay bytes (numpy's array data among them).
        loaded = CifarUnpickler(io.BytesIO(path.read_bytes()), encoding="bytes").load()
    except Exception as err:  # every way an untrusted pickle can fail is the same to the user: a bad file
        raise UserError(f"{path}: refused, not a CIFAR Python {what} ({err}). Replace it with a fresh copy, or use "
                        "the binary distribution") from None
    if not isinstance(loaded, dict):
        raise UserError(f"{path}: holds a {type(loaded).__name__}, not the dict of a CIFAR Python {what}")
    return {key.decode("latin-1") if isinstance(key, bytes) else str(key): value for key, value in loaded.items()}


def read_python(path: Path, dist: Distribution, kind: str, expected: int | None) -> Split:
    """A Python batch file as uint8 images [N, 3, 32, 32] and ``kind`` labels [N], checked."""
    batch = load_pickle(path, "batch")
    data, labels = batch.get("data"), batch.get(dist.label_keys[kind])
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != PIXELS:
        found = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise UserError(f"{path}: 'data' is {found}, expected uint8 images of {PIXELS:,} bytes each (N x {PIXELS})")
    if not isinstance(labels, list) or not all(type(label) is int for label in labels) or len(labels) != len(data):
        raise UserError(f"{path}: '{dist.label_keys[kind]}' is not a list of {len(data):,} whole numbers, one per image")
    if expected is not None and len(data) != expected:
        raise UserError(f"{path}: {len(data):,} images, expected {expected:,}. Replace the file, or set "
                        f"data.check_counts: false to use other data in {dist.title}'s format")
    images = torch.from_numpy(np.ascontiguousarray(data)).reshape(-1, 3, IMAGE_SIZE, IMAGE_SIZE)
    return Split(images, checked_labels(torch.tensor(labels, dtype=torch.long), path, dist, kind))


# ---------------------------------------------------------------------------------------------
# The data set: its splits, its description, what `cnnlab data` says


def read_split(dist: Distribution, folder: Path, layout: str, split: str, kind: str, check_counts: bool) -> Split:
    """One split, its files read and joined in order."""
    names = split_files(dist, layout)[split]
    expected = dist.counts[split] // len(names) if check_counts else None
    reader = read_binary if layout == "binary" else read_python
    parts = [reader(folder / name, dist, kind, expected) for name in names]
    return Split(torch.cat([p.images for p in parts]), torch.cat([p.labels for p in parts]))


def class_names(dist: Distribution, folder: Path, layout: str, kind: str) -> tuple[tuple[str, ...], Path | None]:
    """(the class names the files give, the file), when they give them; else (the published ones, None)."""
    published = dist.classes[kind]
    if layout == "binary":
        path = folder / dist.names_files[kind]
        if not path.is_file():
            return published, None
        try:
            names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        except (OSError, UnicodeDecodeError) as err:
            raise UserError(f"{path}: cannot read its class names ({err}); delete it to use the published names") from None
    else:
        path = folder / dist.python_meta
        if not path.is_file():
            return published, None
        found = load_pickle(path, "meta file").get(dist.names_keys[kind])
        if not isinstance(found, list) or not all(isinstance(name, bytes) for name in found):
            raise UserError(f"{path}: '{dist.names_keys[kind]}' is not a list of names; delete it to use the published names")
        names = [name.decode("utf-8", "replace").strip() for name in found]
    if len(names) != len(published) or not all(0 < len(name) <= MAX_NAME for name in names):
        raise UserError(f"{path}: {len(names)} class names of 1-{MAX_NAME} characters expected {len(published)}; "
                        "delete it to use the published names")
    return tuple(names), path


def describe(dist: Distribution, cfg: Any) -> DataSpec:
    """The set's description for ``cfg``: class names from its files when they are found (no image read); names
    that cannot be (one named twice) are a ``UserError`` naming their file."""
    kind = dist.labels_kind(cfg)
    found = locate(dist, getattr(cfg, "root", None))
    classes, source = class_names(dist, *found, kind) if found is not None else (dist.classes[kind], None)
    title = dist.title if len(dist.classes) == 1 else f"{dist.title} ({kind})"
    return DataSpec.made(str(source or (found[0] if found else dist.title)), name=dist.name, title=title, classes=classes,
                         channels=3, image_size=(IMAGE_SIZE, IMAGE_SIZE))


def read_splits(dist: Distribution, cfg: Any) -> tuple[Path, Split, Split]:
    """(the folder, the training split, the test split) for a ``DataConfig``, validated."""
    kind = dist.labels_kind(cfg)
    folder, layout = find(dist, cfg.root, cfg.download)
    return folder, *(read_split(dist, folder, layout, split, kind, cfg.check_counts) for split in ("train", "test"))


def check(dist: Distribution, root: Path | None, download: bool, verify: bool, check_counts: bool = True) -> Iterator[str]:
    """What ``cnnlab data`` says, line by line: where the files are and what each split holds."""
    folder, layout = find(dist, root, download)
    yield f"{dist.title} found in {folder} ({layout} distribution)"
    for split in dist.counts:
        loaded = read_split(dist, folder, layout, split, "fine", check_counts)
        yield f"  {split}: {len(loaded):,} images, {IMAGE_SIZE}x{IMAGE_SIZE} RGB"
    if verify:
        yield "  (no checksums are known for the extracted files: --download checks the archive's MD5)"
