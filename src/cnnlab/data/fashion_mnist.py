"""Usage: ``folder = find_data_dir(root)``; ``train = read_split(folder, "train")``: everything Fashion-MNIST.

Zalando's Fashion-MNIST: 60,000 training and 10,000 test images, 28x28 grey, 10 classes, as four IDX
files (plain or gzipped) found in a folder the user names, in $CNNLAB_DATA, in cnnlab's cache or in
Debian's ``dataset-fashion-mnist``; downloaded through torchvision only when asked to. Every file is
validated as it is read (magic number, image size, length, labels), and a bad one is named.
The data layer finds this module by its name, ``fashion-mnist`` (``registry.py``): ``SPEC`` says
what the data set is, ``read_splits`` reads it, ``check`` is what ``cnnlab data`` says of it.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path

import torch

from cnnlab.data.spec import DataSpec
from cnnlab.data.splits import Split
from cnnlab.errors import UserError

CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
EXPECTED_COUNTS = {"train": 60_000, "test": 10_000}
IMAGE_SIZE = 28
IMAGES_MAGIC, LABELS_MAGIC = 0x00000803, 0x00000801
# SHA-256 of the decompressed files (identical for Debian's and upstream's copies; their .gz differ).
SHA256 = {
    "train-images-idx3-ubyte": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
    "train-labels-idx1-ubyte": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
    "t10k-images-idx3-ubyte": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
    "t10k-labels-idx1-ubyte": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
}
CACHE_DIR = Path("~/.cache/cnnlab/fashion-mnist")
SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")  # Debian's dataset-fashion-mnist
HOW_TO_GET = (
    "To get the data: on Debian/Ubuntu run `sudo apt-get install dataset-fashion-mnist` (or `make data`); "
    "or put the four IDX files (train-images-idx3-ubyte[.gz], train-labels-idx1-ubyte[.gz], "
    "t10k-images-idx3-ubyte[.gz], t10k-labels-idx1-ubyte[.gz]) in a folder and pass --data-dir or set "
    "$CNNLAB_DATA; or, with internet access, add --download"
)


# ---------------------------------------------------------------------------------------------
# Finding the files


def search_dirs(root: Path | None = None) -> list[Path]:
    """Where the data is looked for, in order. An explicit ``root`` is the only place searched."""
    if root is not None:
        return [Path(root).expanduser()]
    dirs = []
    if os.environ.get("CNNLAB_DATA"):
        dirs.append(Path(os.environ["CNNLAB_DATA"]).expanduser())
    dirs += [CACHE_DIR.expanduser(), SYSTEM_DIR]
    return dirs


def find_file(folder: Path, stem: str) -> Path | None:
    """``stem`` or ``stem.gz`` in ``folder`` or in torchvision's ``folder/FashionMNIST/raw`` layout."""
    for base in (folder, folder / "FashionMNIST" / "raw"):
        for candidate in (base / stem, base / f"{stem}.gz"):
            if candidate.is_file():
                return candidate
    return None


def find_data_dir(root: Path | None = None, download: bool = False) -> Path:
    """The first folder holding all four files; downloads into the cache only when asked to."""
    searched = search_dirs(root)
    for folder in searched:
        if all(find_file(folder, stem) for pair in FILES.values() for stem in pair):
            return folder
    if download:
        return download_data(searched[0] if root is not None else CACHE_DIR.expanduser())
    lines = []
    for folder in searched:
        missing = [stem for pair in FILES.values() for stem in pair if not find_file(folder, stem)]
        state = "does not exist" if not folder.exists() else f"lacks {', '.join(missing)}"
        lines.append(f"  {folder}: {state}")
    raise UserError("Fashion-MNIST not found. Searched:\n" + "\n".join(lines) + f"\n{HOW_TO_GET}.")


def download_data(folder: Path) -> Path:
    """Fetch through torchvision, which verifies each archive's MD5. Only ever called on request."""
    from torchvision.datasets import FashionMNIST

    folder.mkdir(parents=True, exist_ok=True)
    try:
        for train in (True, False):
            FashionMNIST(str(folder), train=train, download=True)
    except Exception as err:  # network errors come in many types; all mean the same to the user
        raise UserError(f"download into {folder} failed: {err}. {HOW_TO_GET}.") from None
    return folder


# ---------------------------------------------------------------------------------------------
# Reading and validating IDX files


def read_bytes(path: Path) -> bytes:
    raw = path.read_bytes()
    if raw[:2] != b"\x1f\x8b":
        return raw
    try:
        return gzip.decompress(raw)
    except (EOFError, OSError, zlib.error) as err:
        raise UserError(
            f"{path}: truncated or corrupted gzip file ({err}). Replace it with a fresh copy "
            "(reinstall dataset-fashion-mnist, or delete it and use --download)"
        ) from None


def read_idx(path: Path, kind: str) -> torch.Tensor:
    """An IDX images file as uint8 [N, 1, 28, 28], or a labels file as int64 [N]; checked, never short."""
    data = read_bytes(path)
    magic, header = (IMAGES_MAGIC, 16) if kind == "images" else (LABELS_MAGIC, 8)
    if len(data) < header:
        raise UserError(f"{path}: only {len(data)} bytes, too short for an IDX header; the file is truncated")
    found = struct.unpack(">I", data[:4])[0]
    if found != magic:
        raise UserError(
            f"{path}: wrong magic number 0x{found:08x}, expected 0x{magic:08x} (an IDX {kind} file). "
            "Is this the right file, and decompressed correctly?"
        )
    count = struct.unpack(">I", data[4:8])[0]
    shape: tuple[int, ...] = (count,)
    if kind == "images":
        rows, cols = struct.unpack(">II", data[8:16])
        if (rows, cols) != (IMAGE_SIZE, IMAGE_SIZE):
            raise UserError(f"{path}: images are {rows}x{cols}, expected {IMAGE_SIZE}x{IMAGE_SIZE}")
        shape = (count, 1, rows, cols)
    expected = header + count * (shape[2] * shape[3] if kind == "images" else 1)
    if len(data) != expected:
        raise UserError(
            f"{path}: header says {count:,} {kind} ({expected:,} bytes) but the file has {len(data):,} bytes; "
            "it is truncated or corrupted. Replace it with a fresh copy"
        )
    tensor = torch.frombuffer(bytearray(data), dtype=torch.uint8, offset=header).reshape(shape)
    if kind == "labels":
        if count and int(tensor.max()) > len(CLASSES) - 1:
            raise UserError(f"{path}: label {int(tensor.max())} found; Fashion-MNIST labels are 0-9")
        tensor = tensor.long()
    return tensor


def sha256_of(path: Path) -> str:
    return hashlib.sha256(read_bytes(path)).hexdigest()


def read_split(folder: Path, split: str, check_counts: bool = True) -> Split:
    images_stem, labels_stem = FILES[split]
    images_path, labels_path = find_file(folder, images_stem), find_file(folder, labels_stem)
    if images_path is None or labels_path is None:
        raise UserError(f"{folder}: {images_stem if images_path is None else labels_stem}[.gz] is missing. {HOW_TO_GET}")
    images, labels = read_idx(images_path, "images"), read_idx(labels_path, "labels")
    if len(images) != len(labels):
        raise UserError(f"{images_path} holds {len(images):,} images but {labels_path} holds {len(labels):,} labels")
    if check_counts and len(labels) != EXPECTED_COUNTS[split]:
        raise UserError(
            f"{images_path}: {len(labels):,} images, Fashion-MNIST's {split} set has {EXPECTED_COUNTS[split]:,}. "
            "Replace the file, or set data.check_counts: false to use a different IDX data set"
        )
    return Split(images, labels)



def check(root: Path | None = None, download: bool = False, verify: bool = False) -> Iterator[str]:
    """What ``cnnlab data`` says, line by line: where the files are, what each split holds and, with
    ``verify``, whether each file's SHA-256 is the known one (a mismatch is a ``UserError`` after its line)."""
    folder = find_data_dir(root, download)
    yield f"Fashion-MNIST found in {folder}"
    for split in FILES:
        loaded = read_split(folder, split)
        yield f"  {split}: {len(loaded):,} images, {IMAGE_SIZE}x{IMAGE_SIZE}, labels 0-{len(CLASSES) - 1}"
    if verify:
        for stem in (s for pair in FILES.values() for s in pair):
            path = find_file(folder, stem)
            ok = sha256_of(path) == SHA256[stem]
            yield f"  {path.name}: {'sha256 ok' if ok else 'sha256 MISMATCH'}"
            if not ok:
                raise UserError(f"{path}: checksum differs from Fashion-MNIST's; replace the file")


NAME = "fashion-mnist"
SPEC = DataSpec(name=NAME, title="Fashion-MNIST", classes=CLASSES, channels=1, image_size=(IMAGE_SIZE, IMAGE_SIZE))


def describe(cfg) -> DataSpec:
    """What Fashion-MNIST is, whatever the config: ``SPEC``."""
    return SPEC


def read_splits(cfg) -> tuple[Path, Split, Split]:
    """(the folder, the training split, the test split) for a ``DataConfig``, validated."""
    root = find_data_dir(cfg.root, cfg.download)
    return root, read_split(root, "train", cfg.check_counts), read_split(root, "test", cfg.check_counts)
