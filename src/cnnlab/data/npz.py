"""Usage: ``data: {name: npz, root: pneumoniamnist.npz}``: a data set in one NumPy archive, as MedMNIST ships them.

The archive holds ``train_images``, ``train_labels``, ``test_images`` and ``test_labels``, and may hold
``val_images`` and ``val_labels``; images are uint8, N x H x W (grey) or N x H x W x C; labels are
integers 0 to K-1, N or N x 1. It is read with ``numpy.load(allow_pickle=False)``: a pickled (object)
array is refused, as is a missing key, a bad dtype or shape, or images and labels of different
lengths, each naming the file and the problem. Class names are ``data.classes`` when the config gives
them, else "0" to "K-1" (K: the largest label + 1). The archive's own validation images, when it has
them, join its training images: a run's validation split is drawn from those as for every data set
(``data.val_size``, stratified and seeded). ``describe`` reads the arrays' headers and labels only.
"""

from __future__ import annotations

import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cnnlab.data.spec import MAX_CLASSES, DataSpec
from cnnlab.data.splits import Split
from cnnlab.errors import UserError

NAME = "npz"
SPLITS = ("train", "val", "test")
REQUIRED = ("train_images", "train_labels", "test_images", "test_labels")
LAYOUT = ("an npz data set holds train_images, train_labels, test_images and test_labels (val_images and val_labels "
          "optional): uint8 images N x H x W or N x H x W x C, integer labels N or N x 1")


@dataclass(frozen=True)
class Header:
    """What a .npy member's header says: enough to check an array without reading it."""

    shape: tuple[int, ...]
    dtype: np.dtype


def archive_path(root: Path | None) -> Path:
    """The configured .npz file (``data.root``), which must exist and be a file."""
    if root is None:
        raise UserError("data.root: give the .npz file to read (data.name: npz reads one NumPy archive), "
                        "e.g. --data-dir pneumoniamnist.npz")
    path = Path(root).expanduser()
    if not path.is_file():
        raise UserError(f"{path}: {'is a folder' if path.is_dir() else 'no such file'}; data.root names the .npz file itself")
    return path


def read_headers(path: Path) -> dict[str, Header]:
    """Each array's shape and dtype from its .npy header, by name (``train_images``), without its data."""
    headers = {}
    try:
        with zipfile.ZipFile(path) as archive:
            for member in archive.namelist():
                if not member.endswith(".npy"):
                    continue
                with archive.open(member) as handle:
                    version = np.lib.format.read_magic(handle)
                    if version == (1, 0):
                        shape, _, dtype = np.lib.format.read_array_header_1_0(handle)
                    elif version == (2, 0):
                        shape, _, dtype = np.lib.format.read_array_header_2_0(handle)
                    else:
                        raise UserError(f"{path}: {member} is a .npy file of version {version}; save it with numpy.savez")
                headers[member.removesuffix(".npy")] = Header(tuple(shape), dtype)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as err:
        raise UserError(f"{path}: not a NumPy .npz archive cnnlab can read ({err}); {LAYOUT}") from None
    return headers


def check_headers(path: Path, headers: dict[str, Header]) -> list[str]:
    """The splits the archive holds (train, [val,] test), its arrays checked; a bad one is a ``UserError``."""
    missing = [key for key in REQUIRED if key not in headers]
    if missing:
        raise UserError(f"{path}: lacks {', '.join(missing)}; {LAYOUT}")
    if ("val_images" in headers) != ("val_labels" in headers):
        raise UserError(f"{path}: has {'val_images' if 'val_images' in headers else 'val_labels'} without its pair; "
                        "give both or neither")
    splits = [split for split in SPLITS if f"{split}_images" in headers]
    for split in splits:
        images, labels = headers[f"{split}_images"], headers[f"{split}_labels"]
        for key, header in ((f"{split}_images", images), (f"{split}_labels", labels)):
            if header.dtype.hasobject:
                raise UserError(f"{path}: {key} is a pickled (object) array, which cnnlab never loads; save plain "
                                "numeric arrays")
        if images.dtype != np.uint8:
            raise UserError(f"{path}: {split}_images are {images.dtype}; images must be uint8 (0-255)")
        if len(images.shape) not in (3, 4) or (len(images.shape) == 4 and not 1 <= images.shape[3] <= 64):
            raise UserError(f"{path}: {split}_images has shape {images.shape}; {LAYOUT}")
        if labels.dtype.kind not in "iu":
            raise UserError(f"{path}: {split}_labels are {labels.dtype}; labels must be integers 0 to K-1")
        if not (len(labels.shape) == 1 or (len(labels.shape) == 2 and labels.shape[1] == 1)):
            raise UserError(f"{path}: {split}_labels has shape {labels.shape}; labels are N or N x 1 (one class an image; "
                            "multi-label sets are not supported)")
        if images.shape[0] != labels.shape[0]:
            raise UserError(f"{path}: {split}_images holds {images.shape[0]:,} images but {split}_labels "
                            f"{labels.shape[0]:,} labels")
        if images.shape[0] == 0:
            raise UserError(f"{path}: {split}_images holds no images")
        if image_shape(images) != image_shape(headers["train_images"]):
            raise UserError(f"{path}: {split}_images are {'x'.join(map(str, image_shape(images)))} but train_images "
                            f"{'x'.join(map(str, image_shape(headers['train_images'])))} (channels x height x width)")
    return splits


def image_shape(header: Header) -> tuple[int, int, int]:
    """(channels, height, width) of the images an images array holds."""
    shape = header.shape
    return (1, shape[1], shape[2]) if len(shape) == 3 else (shape[3], shape[1], shape[2])


def read_labels(path: Path, archive: np.lib.npyio.NpzFile, split: str, classes: int | None) -> torch.Tensor:
    """A split's labels as int64 [N], each 0 to ``classes`` - 1 (or any non-negative one, when None)."""
    labels = np.asarray(archive[f"{split}_labels"]).reshape(-1).astype(np.int64)
    if len(labels) and labels.min() < 0:
        raise UserError(f"{path}: {split}_labels holds {labels.min()}; labels are 0 to K-1")
    if classes is not None and len(labels) and labels.max() >= classes:
        raise UserError(f"{path}: {split}_labels holds label {labels.max()}, but data.classes names {classes} classes")
    if len(labels) and labels.max() >= MAX_CLASSES:
        raise UserError(f"{path}: {split}_labels holds label {labels.max():,}; at most {MAX_CLASSES:,} classes")
    return torch.from_numpy(labels)


def open_archive(path: Path) -> np.lib.npyio.NpzFile:
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as err:
        raise UserError(f"{path}: not a NumPy .npz archive cnnlab can read ({err}); {LAYOUT}") from None


def describe(cfg) -> DataSpec:
    """The archive's classes, channels and image size, from its headers and labels (no image is read)."""
    path = archive_path(cfg.root)
    headers = read_headers(path)
    splits = check_headers(path, headers)
    given = named_classes(cfg)
    with open_archive(path) as archive:
        top = max(int(read_labels(path, archive, split, len(given) if given else None).max()) for split in splits)
    classes = given or tuple(str(c) for c in range(top + 1))
    channels, height, width = image_shape(headers["train_images"])
    return DataSpec(name=NAME, title=path.name[:100], classes=classes, channels=channels, image_size=(height, width),
                    dark_background=False)


def named_classes(cfg) -> tuple[str, ...] | None:
    """``data.classes`` when the config gives them (each name once), else None."""
    given = getattr(cfg, "classes", None)
    if given and len(set(given)) != len(given):
        raise UserError(f"data.classes: {sorted({c for c in given if given.count(c) > 1})} named more than once")
    return tuple(given) if given else None


def read_split(path: Path, archive: np.lib.npyio.NpzFile, split: str, classes: int | None) -> Split:
    images = np.asarray(archive[f"{split}_images"])
    if images.ndim == 3:
        images = images[:, None]
    else:
        images = np.ascontiguousarray(images.transpose(0, 3, 1, 2))
    return Split(torch.from_numpy(np.ascontiguousarray(images)), read_labels(path, archive, split, classes))


def read_splits(cfg) -> tuple[Path, Split, Split]:
    """(the archive, the training split with the archive's validation images, the test split), validated."""
    path = archive_path(cfg.root)
    splits = check_headers(path, read_headers(path))
    given = named_classes(cfg)
    classes = len(given) if given else None
    try:
        with open_archive(path) as archive:
            read = {split: read_split(path, archive, split, classes) for split in splits}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as err:  # a member cut short or corrupted
        raise UserError(f"{path}: damaged archive ({err})") from None
    train = read["train"]
    if "val" in read:
        train = Split(torch.cat((train.images, read["val"].images)), torch.cat((train.labels, read["val"].labels)))
    return path, train, read["test"]


def check(root: Path | None = None, download: bool = False, verify: bool = False,
          check_counts: bool = True) -> Iterator[str]:
    """What ``cnnlab data`` says of an archive: each split's images, size and labels."""
    if download:
        raise UserError("data.name: npz: an archive is yours to give; there is nothing to download")
    path = archive_path(root)
    headers = read_headers(path)
    yield f"npz archive {path}"
    for split in check_headers(path, headers):
        channels, height, width = image_shape(headers[f"{split}_images"])
        yield f"  {split}: {headers[f'{split}_images'].shape[0]:,} images, {height}x{width}, {channels} channel(s)"
