"""Usage: ``data.name: cifar10``: CIFAR-10, 60,000 32x32 colour images of 10 classes (``cifar.py`` reads it).

Its files: the binary distribution ``cifar-10-batches-bin/`` (``data_batch_1.bin`` .. ``data_batch_5.bin``,
``test_batch.bin``: records of 1 label byte and 3,072 pixel bytes; class names in ``batches.meta.txt``)
or the Python one ``cifar-10-batches-py/`` (read without running any pickled code).
"""

from __future__ import annotations

from functools import partial

from cnnlab.data import cifar

NAME = "cifar10"
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
DISTRIBUTION = cifar.Distribution(
    name=NAME,
    title="CIFAR-10",
    counts={"train": 50_000, "test": 10_000},
    binary_dir="cifar-10-batches-bin",
    binary_files={"train": tuple(f"data_batch_{i}.bin" for i in range(1, 6)), "test": ("test_batch.bin",)},
    label_bytes=("fine",),
    names_files={"fine": "batches.meta.txt"},
    python_dir="cifar-10-batches-py",
    python_files={"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",)},
    python_meta="batches.meta",
    label_keys={"fine": "labels"},
    names_keys={"fine": "label_names"},
    classes={"fine": CLASSES},
    archive=("https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz", "c32a1d4ab5d03f1284b67883e8d87530"),
)


# The module interface (data/registry.py), each CIFAR function bound to this distribution.
describe = partial(cifar.describe, DISTRIBUTION)
read_splits = partial(cifar.read_splits, DISTRIBUTION)
check = partial(cifar.check, DISTRIBUTION)
where = partial(cifar.where, DISTRIBUTION)
