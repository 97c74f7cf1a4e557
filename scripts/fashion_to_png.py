"""Usage: ``python scripts/fashion_to_png.py OUT [--data-dir DIR]``: Fashion-MNIST as 70,000 PNG files in the folder layout.

Writes OUT/train/<class>/<index>.png (60,000) and OUT/test/<class>/<index>.png (10,000) from the IDX
files cnnlab finds (``--data-dir``, $CNNLAB_DATA, its cache, Debian's package), class folders named
00-tshirt-top ... 09-ankle-boot so that they sort in Fashion-MNIST's label order: training on OUT with
``data.name: folder`` then sees the same images, labels and splits as ``data.name: fashion-mnist``.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from PIL import Image

from cnnlab.data.fashion_mnist import CLASSES, find_data_dir, read_split


def folder_name(label: int) -> str:
    """``03-dress``: the label first, so that sorted folder names keep Fashion-MNIST's label order."""
    return f"{label:02d}-{re.sub(r'[^a-z0-9]+', '-', CLASSES[label].lower()).strip('-')}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="the folder to write (made; files in it are overwritten)")
    parser.add_argument("--data-dir", type=Path, default=None, help="where the IDX files are (default: searched)")
    args = parser.parse_args()
    source = find_data_dir(args.data_dir)
    for split in ("train", "test"):
        data = read_split(source, split)
        for label in range(len(CLASSES)):
            (args.out / split / folder_name(label)).mkdir(parents=True, exist_ok=True)
        for index, (image, label) in enumerate(zip(data.images[:, 0].numpy(), data.labels.tolist())):
            Image.fromarray(image, "L").save(args.out / split / folder_name(label) / f"{index:05d}.png")
        print(f"{split}: {len(data):,} PNG files in {args.out / split}")


if __name__ == "__main__":
    main()
