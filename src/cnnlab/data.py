"""Usage: ``data = load_data(cfg.data, seed=0, device=torch.device("cpu"))``; ``for x, y in data.batches("train", 256)``.

Fashion-MNIST from IDX files, validated as it is read, held whole as uint8 tensors on the training
device. Batches are slices of a shuffled index permutation; conversion to float, normalisation and
optional augmentation happen per batch on the device. No DataLoader, no worker processes: at 28x28
the whole training set is 47 MB, and copying it once beats streaming it every epoch.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

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


@dataclass
class Split:
    images: torch.Tensor  # uint8 [N, 1, 28, 28]
    labels: torch.Tensor  # int64 [N]

    def __len__(self) -> int:
        return len(self.labels)

    def to(self, device: torch.device) -> Split:
        return Split(self.images.to(device), self.labels.to(device))


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


# ---------------------------------------------------------------------------------------------
# Splitting and batching


def stratified_split(labels: torch.Tensor, val_size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train indices, val indices): ``val_size`` images drawn per class in proportion, fixed by ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(labels), generator=generator)
    classes, counts = torch.unique(labels, return_counts=True)
    exact = counts.double() * val_size / len(labels)
    quota = exact.floor().long()
    # Largest remainders get the leftover images so the split has exactly val_size.
    for i in torch.argsort(exact - quota, descending=True)[: val_size - int(quota.sum())]:
        quota[i] += 1
    shuffled = labels[order]
    val_parts = [order[shuffled == c][: int(q)] for c, q in zip(classes, quota)]
    val_idx = torch.cat(val_parts).sort().values
    keep = torch.ones(len(labels), dtype=torch.bool)
    keep[val_idx] = False
    return keep.nonzero().squeeze(1), val_idx


@dataclass
class Augment:
    crop_padding: int = 0
    flip: bool = False
    erasing: float = 0.0

    @property
    def active(self) -> bool:
        return bool(self.crop_padding or self.flip or self.erasing)

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        n, c, h, w = x.shape
        dev = x.device
        if self.crop_padding:
            p = self.crop_padding
            padded = torch.nn.functional.pad(x, (p, p, p, p))
            dy = torch.randint(0, 2 * p + 1, (n,), device=dev, generator=generator)
            dx = torch.randint(0, 2 * p + 1, (n,), device=dev, generator=generator)
            rows = (dy[:, None] + torch.arange(h, device=dev))[:, None, :, None]
            cols = (dx[:, None] + torch.arange(w, device=dev))[:, None, None, :]
            batch = torch.arange(n, device=dev)[:, None, None, None]
            chan = torch.arange(c, device=dev)[None, :, None, None]
            x = padded[batch, chan, rows, cols]
        if self.flip:
            flip = torch.rand(n, device=dev, generator=generator) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(3), x)
        if self.erasing:
            # One rectangle per chosen image, 2%-33% of its area, aspect 0.3-3.3 (as torchvision's default).
            area = torch.empty(n, device=dev).uniform_(0.02, 0.33, generator=generator) * h * w
            log_ratio = torch.empty(n, device=dev).uniform_(-1.2, 1.2, generator=generator)
            eh = (area * log_ratio.exp()).sqrt().round().clamp(1, h).long()
            ew = (area / log_ratio.exp()).sqrt().round().clamp(1, w).long()
            top = (torch.rand(n, device=dev, generator=generator) * (h - eh + 1)).long()
            left = (torch.rand(n, device=dev, generator=generator) * (w - ew + 1)).long()
            ys, xs = torch.arange(h, device=dev), torch.arange(w, device=dev)
            inside_y = (ys[None] >= top[:, None]) & (ys[None] < (top + eh)[:, None])
            inside_x = (xs[None] >= left[:, None]) & (xs[None] < (left + ew)[:, None])
            chosen = torch.rand(n, device=dev, generator=generator) < self.erasing
            mask = inside_y[:, :, None] & inside_x[:, None, :] & chosen[:, None, None]
            x = x.masked_fill(mask[:, None], 0.0)
        return x


@dataclass
class Data:
    """The splits on the training device, and how to turn their uint8 pixels into model inputs."""

    train: Split
    val: Split | None  # None in the report's mode: the test set stands in every epoch
    test: Split
    root: Path
    mean: float
    std: float
    normalize: bool = True
    augment: Augment | None = None
    channels_last: bool = False
    augment_generator: torch.Generator | None = None

    @property
    def eval_split_name(self) -> str:
        return "val" if self.val is not None else "test"

    def split(self, name: str) -> Split:
        split = {"train": self.train, "val": self.val, "test": self.test}[name]
        if split is None:
            raise UserError("this run has no validation split (data.val_size: 0); use the test split")
        return split

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [N, 1, 28, 28] -> float model input, on the same device."""
        x = images.float().div_(255)
        if self.normalize:
            x = x.sub_(self.mean).div_(self.std)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def batches(
        self,
        name: str,
        batch_size: int,
        *,
        shuffle: bool = False,
        generator: torch.Generator | None = None,
        skip: int = 0,
        min_last: int = 2,
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Model-ready (x, y) batches. Training batches (``shuffle``) are augmented when configured.

        A last batch of fewer than ``min_last`` images is dropped when shuffling (BatchNorm cannot
        train on one image; under torchrun every process needs two of its own: ``2 x world size``).
        ``skip`` leaves out the first batches of the (same) permutation: a resumed epoch goes on
        where it stopped.
        """
        split = self.split(name)
        n = len(split)
        if shuffle:
            order = torch.randperm(n, generator=generator).to(split.images.device)
            n = _without_short_last(n, batch_size, min_last)
        for start in range(skip * batch_size, n, batch_size):
            if shuffle:
                idx = order[start : min(start + batch_size, n)]
                images, labels = split.images[idx], split.labels[idx]
            else:
                images, labels = split.images[start : start + batch_size], split.labels[start : start + batch_size]
            x = self.prepare(images)
            if shuffle and self.augment is not None and self.augment.active:
                x = self.augment(x, self.augment_generator)
            yield x, labels

    def num_batches(self, name: str, batch_size: int, shuffle: bool = False, min_last: int = 2) -> int:
        n = len(self.split(name))
        if shuffle:
            n = _without_short_last(n, batch_size, min_last)
        return -(-n // batch_size)


def _without_short_last(n: int, batch_size: int, min_last: int) -> int:
    """How many of ``n`` shuffled images the batches use: all but a last batch shorter than ``min_last``."""
    short = n % batch_size
    return n - short if 0 < short < min_last and n > short else n


def pixel_stats(images: torch.Tensor) -> tuple[float, float]:
    """Mean and std of uint8 pixels, scaled to [0, 1], from a histogram (no float copy of the set)."""
    counts = torch.bincount(images.flatten(), minlength=256).double()
    values = torch.arange(256, dtype=torch.float64) / 255
    total = counts.sum()
    mean = (counts * values).sum() / total
    var = (counts * (values - mean) ** 2).sum() / total
    return mean.item(), var.sqrt().item()


def load_data(cfg, seed: int, device: torch.device, channels_last: bool = False) -> Data:
    """Read, validate and split the data set described by a ``DataConfig``, onto ``device``."""
    root = find_data_dir(cfg.root, cfg.download)
    train = read_split(root, "train", cfg.check_counts)
    test = read_split(root, "test", cfg.check_counts)
    if cfg.val_size >= len(train):
        raise UserError(
            f"data.val_size: {cfg.val_size:,} leaves no training images (the training set has {len(train):,}); "
            f"choose a value below {len(train):,}, e.g. 5000, or 0 to evaluate on the test set"
        )
    val = None
    if cfg.val_size:
        train_idx, val_idx = stratified_split(train.labels, cfg.val_size, seed)
        train, val = Split(train.images[train_idx], train.labels[train_idx]), Split(train.images[val_idx], train.labels[val_idx])
    mean, std = pixel_stats(train.images)
    augment = Augment(cfg.augment.crop_padding, cfg.augment.flip, cfg.augment.erasing)
    return Data(
        train=train.to(device),
        val=val.to(device) if val is not None else None,
        test=test.to(device),
        root=root,
        mean=mean,
        std=std,
        normalize=cfg.normalize,
        augment=augment if augment.active else None,
        channels_last=channels_last,
        augment_generator=torch.Generator(device=device).manual_seed((seed + 1) % 2**63) if augment.active else None,
    )
