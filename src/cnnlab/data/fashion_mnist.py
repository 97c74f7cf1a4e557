"""Usage: ``folder = find_data_dir(root)``; ``train = read_split(folder, "train")``: Fashion-MNIST.

Zalando's Fashion-MNIST: 60,000 training and 10,000 test images, 28x28 grey, 10 garment classes, as
four IDX files found in a folder the user names, in $CNNLAB_DATA, in cnnlab's cache or in Debian's
``dataset-fashion-mnist``; downloaded through torchvision only when asked to. What it is lives here
(``SET``); finding, reading and validating the files is the IDX family's (``idx.py``).
"""

from __future__ import annotations

from pathlib import Path

from cnnlab.data.idx import FILES, Checksum, IdxSet, read_bytes

__all__ = ["FILES", "NAME", "SET", "SPEC", "cache_state", "check", "describe", "find_data_dir", "find_file", "read_bytes",
           "read_idx", "read_split", "read_splits", "where"]

CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
# SHA-256 of the decompressed files (identical for Debian's and upstream's copies; their .gz differ).
SET = IdxSet(
    name="fashion-mnist",
    title="Fashion-MNIST",
    classes=CLASSES,
    checksums={stem: Checksum("sha256", digest) for stem, digest in {
        "train-images-idx3-ubyte": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
        "train-labels-idx1-ubyte": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
        "t10k-images-idx3-ubyte": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
        "t10k-labels-idx1-ubyte": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
    }.items()},
    torchvision="FashionMNIST",
    env_var="CNNLAB_DATA",  # cnnlab's data folder has always been Fashion-MNIST's; the other sets have their own
    system_dir=Path("/usr/share/datasets/fashion-mnist"),  # Debian's dataset-fashion-mnist
    install_hint="on Debian/Ubuntu run `sudo apt-get install dataset-fashion-mnist` (or `make data`); or ",
)

NAME, SPEC = SET.name, SET.spec
describe, read_splits, check, cache_state, where = SET.describe, SET.read_splits, SET.check, SET.cache_state, SET.where
find_data_dir, find_file, read_idx, read_split = SET.find_data_dir, SET.find_file, SET.read_idx, SET.read_split
