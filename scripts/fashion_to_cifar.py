"""Usage: ``python scripts/fashion_to_cifar.py OUT [--data-dir DIR]``: Fashion-MNIST as 32x32 RGB in CIFAR-10's binary layout.

Writes OUT/cifar-10-batches-bin/ as the CIFAR-10 binary distribution is laid out (data_batch_1.bin ..
data_batch_5.bin of 10,000 records each, test_batch.bin, batches.meta.txt with Fashion-MNIST's class
names), from the IDX files cnnlab finds (``--data-dir``, $CNNLAB_DATA, its cache, Debian's package):
the first 50,000 training images (CIFAR-10's count; the last 10,000 are left out) and the 10,000 test
images. ``data.name: cifar10`` with ``data.root`` OUT then trains on a real RGB set where no CIFAR-10
is at hand.

Each 28x28 image is padded by 2 black pixels a side to 32x32, as LeNet-5's authors padded MNIST: the
pixels stay exactly Fashion-MNIST's (an upscale would blur them, and there is nothing to antialias).
It is then tinted: multiplied per channel by a colour drawn for that image from a generator seeded
with SEED, whatever its label, so that the three channels differ but colour says nothing of the class.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from cnnlab.data import cifar10
from cnnlab.data.cifar import IMAGE_SIZE
from cnnlab.data.fashion_mnist import CLASSES, find_data_dir, read_split

SEED = 0
PAD = (IMAGE_SIZE - 28) // 2
DARKEST = 0.2  # the least a channel is scaled by: every channel keeps some of the garment


def tints(count: int, rng: np.random.Generator) -> np.ndarray:
    """``count`` colours [count, 3], each channel's factor in [DARKEST, 1], the brightest channel 1: hue, not brightness."""
    colours = rng.uniform(DARKEST, 1.0, (count, 3))
    return colours / colours.max(axis=1, keepdims=True)


def coloured(grey: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """uint8 grey images [N, 28, 28] as uint8 tinted RGB images [N, 3, 32, 32] (channel-major, as CIFAR stores them)."""
    padded = np.pad(grey, ((0, 0), (PAD, PAD), (PAD, PAD)))
    tinted = padded[:, None].astype(np.float32) * tints(len(grey), rng)[:, :, None, None].astype(np.float32)
    return np.rint(tinted).astype(np.uint8)


def records(grey: np.ndarray, labels: np.ndarray, rng: np.random.Generator) -> bytes:
    """CIFAR-10 binary records: per image its label byte, then 3,072 bytes of red, green and blue planes."""
    pixels = coloured(grey, rng).reshape(len(grey), -1)
    return np.concatenate([labels.astype(np.uint8)[:, None], pixels], axis=1).tobytes()


def write_cifar(out: Path, splits: dict[str, tuple[np.ndarray, np.ndarray]], seed: int = SEED) -> Path:
    """``splits`` (split -> grey images [N, 28, 28], labels [N]) written under ``out`` in CIFAR-10's binary
    layout, each split cut into its files' equal shares in order; returns the distribution's folder."""
    dist = cifar10.DISTRIBUTION
    folder = out / dist.binary_dir
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for split in ("train", "test"):  # in this order, so that each image's tint is fixed by the seed
        images, labels = splits[split]
        files = dist.binary_files[split]
        share = len(images) // len(files)
        for part, name in enumerate(files):
            rows = slice(part * share, (part + 1) * share)
            (folder / name).write_bytes(records(images[rows], labels[rows], rng))
    (folder / dist.names_files["fine"]).write_text("\n".join(CLASSES) + "\n", encoding="utf-8")
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="the folder to write OUT/cifar-10-batches-bin/ in (files there are overwritten)")
    parser.add_argument("--data-dir", type=Path, default=None, help="where the IDX files are (default: searched)")
    args = parser.parse_args()
    source = find_data_dir(args.data_dir)
    splits = {}
    for split in ("train", "test"):
        data = read_split(source, split)
        count = cifar10.DISTRIBUTION.counts[split]
        splits[split] = (data.images[:count, 0].numpy(), data.labels[:count].numpy())
    folder = write_cifar(args.out, splits)
    for split, (images, _) in splits.items():
        print(f"{split}: {len(images):,} 32x32 RGB images in {', '.join(cifar10.DISTRIBUTION.binary_files[split])}")
    print(f"written to {folder}")


if __name__ == "__main__":
    main()
