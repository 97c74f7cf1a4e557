"""Usage: ``data: {name: npz, root: pneumoniamnist.npz}``: a data set in one NumPy archive, as MedMNIST ships them.

The archive holds ``train_images``, ``train_labels``, ``test_images`` and ``test_labels``, and may hold
``val_images`` and ``val_labels``; images are uint8, N x H x W (grey) or N x H x W x C; labels are
integers 0 to K-1, N or N x 1. It is read with ``numpy.load(allow_pickle=False)``: a pickled (object)
array is refused, as is a missing key, a bad dtype or shape, or images and labels of different
lengths, each naming the file and the problem. No array is read before its .npy header is checked
(its shape, and its bytes against what the archive stores of it and the memory available), and then
no byte past what it declares is inflated. Class names are ``data.classes`` when the config gives
them, else "0" to "K-1" (K: the largest label + 1). The archive's own validation images, when it has
them, join its training images: a run's validation split is drawn from those as for every data set
(``data.val_size``, stratified and seeded). ``describe`` reads the arrays' headers and labels only.
"""

from __future__ import annotations

import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cnnlab.data.bounded import fits_memory, read_declared
from cnnlab.data.spec import MAX_CLASSES, MAX_SIDE, DataSpec
from cnnlab.data.splits import Split
from cnnlab.errors import UserError

NAME = "npz"
SPLITS = ("train", "val", "test")
REQUIRED = ("train_images", "train_labels", "test_images", "test_labels")
LAYOUT = ("an npz data set holds train_images, train_labels, test_images and test_labels (val_images and val_labels "
          "optional): uint8 images N x H x W or N x H x W x C, integer labels N or N x 1")


# What reading a zip member can raise: a bad CRC or header, a stream cut short, a method zipfile lacks, encryption
DAMAGED = (zipfile.BadZipFile, OSError, ValueError, EOFError, zlib.error, NotImplementedError, RuntimeError)


@dataclass(frozen=True)
class Header:
    """What a .npy member's header says, and what the archive stores of it: enough to check an array without
    reading it."""

    shape: tuple[int, ...]
    dtype: np.dtype
    fortran: bool = False  # its bytes in column-major order
    offset: int = 0  # bytes of the member before the array's: the .npy magic and header
    stored: int = 0  # the member's bytes, as the archive's directory declares them

    @property
    def nbytes(self) -> int:
        """The array's bytes, as its shape and dtype declare them."""
        return int(np.prod(self.shape, dtype=object)) * self.dtype.itemsize


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
            for member in archive.infolist():
                if not member.filename.endswith(".npy"):
                    continue
                with archive.open(member) as handle:
                    version = np.lib.format.read_magic(handle)
                    if version == (1, 0):
                        shape, fortran, dtype = np.lib.format.read_array_header_1_0(handle)
                    elif version == (2, 0):
                        shape, fortran, dtype = np.lib.format.read_array_header_2_0(handle)
                    else:
                        raise UserError(f"{path}: {member.filename} is a .npy file of version {version}; save it with "
                                        "numpy.savez")
                    offset = handle.tell()
                headers[member.filename.removesuffix(".npy")] = Header(tuple(shape), dtype, bool(fortran), offset,
                                                                       member.file_size)
    except DAMAGED as err:
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
            if header.stored - header.offset != header.nbytes:
                raise damaged(path, key, header, header.stored - header.offset)
        if images.dtype != np.uint8:
            raise UserError(f"{path}: {split}_images are {images.dtype}; images must be uint8 (0-255)")
        if len(images.shape) not in (3, 4) or (len(images.shape) == 4 and not 1 <= images.shape[3] <= 64):
            raise UserError(f"{path}: {split}_images has shape {images.shape}; {LAYOUT}")
        if not all(1 <= side <= MAX_SIDE for side in images.shape[1:3]):
            raise UserError(f"{path}: {split}_images has shape {images.shape}: images of {images.shape[1]}x"
                            f"{images.shape[2]} pixels; each side must be 1 to {MAX_SIDE:,} pixels")
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


def damaged(path: Path, key: str, header: Header, held: int | None) -> UserError:
    """The error for an array member holding ``held`` bytes (None: more, how many unread) where its header declares
    another number."""
    holds = "more" if held is None else f"{held:,}" if held < header.nbytes else f"{held - header.nbytes:,} more"
    return UserError(f"{path}: {key}: its header declares {header.nbytes:,} bytes of {header.dtype.name} numbers, and the "
                     f"archive holds {holds}; the archive is damaged: save it again with numpy.savez")


def image_shape(header: Header) -> tuple[int, int, int]:
    """(channels, height, width) of the images an images array holds."""
    shape = header.shape
    return (1, shape[1], shape[2]) if len(shape) == 3 else (shape[3], shape[1], shape[2])


def read_member(path: Path, archive: zipfile.ZipFile, key: str, header: Header) -> np.ndarray:
    """The array ``key`` as its (checked) header declares it: its bytes checked against the memory available before
    any is read, and no byte inflated past them; a member that does not hold them is a ``UserError``."""
    fits_memory(header.nbytes, f"{path}: {key}: its header declares")
    try:
        with archive.open(f"{key}.npy") as handle:
            handle.read(header.offset)  # the .npy header, checked before
            data, more = read_declared(handle, header.nbytes)
    except DAMAGED as err:
        raise UserError(f"{path}: {key}: damaged archive ({err}); save it again with numpy.savez") from None
    if len(data) < header.nbytes or more:  # the directory's size agreed: the zip's own records are wrong
        raise damaged(path, key, header, len(data) if len(data) < header.nbytes else None)
    return data.view(header.dtype).reshape(header.shape, order="F" if header.fortran else "C")


def read_labels(path: Path, archive: zipfile.ZipFile, headers: dict[str, Header], split: str,
                classes: int | None) -> torch.Tensor:
    """A split's labels as int64 [N], each 0 to ``classes`` - 1 (or any non-negative one, when None)."""
    key = f"{split}_labels"
    labels = read_member(path, archive, key, headers[key]).reshape(-1)
    if len(labels):
        low, high = int(labels.min()), int(labels.max())  # as written: a uint64 beyond int64 is no negative number
        if low < 0:
            raise UserError(f"{path}: {key} holds {low:,}; labels are 0 to K-1")
        if classes is not None and high >= classes:
            raise UserError(f"{path}: {key} holds label {high:,}, but data.classes names {classes} classes")
        if high >= MAX_CLASSES:
            raise UserError(f"{path}: {key} holds label {high:,}; at most {MAX_CLASSES:,} classes")
    return torch.from_numpy(labels.astype(np.int64))


def open_archive(path: Path) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(path)
    except DAMAGED as err:
        raise UserError(f"{path}: not a NumPy .npz archive cnnlab can read ({err}); {LAYOUT}") from None


def describe(cfg) -> DataSpec:
    """The archive's classes, channels and image size, from its headers and labels (no image is read)."""
    path = archive_path(cfg.root)
    headers = read_headers(path)
    splits = check_headers(path, headers)
    given = named_classes(cfg)
    with open_archive(path) as archive:
        top = max(int(read_labels(path, archive, headers, split, len(given) if given else None).max())
                  for split in splits)
    classes = given or tuple(str(c) for c in range(top + 1))
    channels, height, width = image_shape(headers["train_images"])
    return DataSpec.made(str(path), name=NAME, title=path.name[:100], classes=classes, channels=channels,
                         image_size=(height, width), dark_background=False)


def named_classes(cfg) -> tuple[str, ...] | None:
    """``data.classes`` when the config gives them (each name once), else None."""
    given = getattr(cfg, "classes", None)
    if given and len(set(given)) != len(given):
        raise UserError(f"data.classes: {sorted({c for c in given if given.count(c) > 1})} named more than once")
    return tuple(given) if given else None


def read_split(path: Path, archive: zipfile.ZipFile, headers: dict[str, Header], split: str, classes: int | None) -> Split:
    images = read_member(path, archive, f"{split}_images", headers[f"{split}_images"])
    images = images[:, None] if images.ndim == 3 else images.transpose(0, 3, 1, 2)
    return Split(torch.from_numpy(np.ascontiguousarray(images)), read_labels(path, archive, headers, split, classes))


def read_splits(cfg) -> tuple[Path, Split, Split]:
    """(the archive, the training split with the archive's validation images, the test split), validated."""
    path = archive_path(cfg.root)
    headers = read_headers(path)
    splits = check_headers(path, headers)
    given = named_classes(cfg)
    classes = len(given) if given else None
    with open_archive(path) as archive:
        read = {split: read_split(path, archive, headers, split, classes) for split in splits}
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
