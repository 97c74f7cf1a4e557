"""Usage: ``data.name: mnist`` in a config; ``cnnlab data mnist``: LeCun, Cortes and Burges' handwritten digits.

MNIST: 60,000 training and 10,000 test images, 28x28 grey, the digits 0-9, as four IDX files in a
folder the user names, in cnnlab's cache (``~/.cache/cnnlab/mnist``, where ``--download`` puts them
through torchvision's mirrors) or in torchvision's ``MNIST/raw`` layout below either. The IDX family's
reader (``idx.py``) does the rest.
"""

from __future__ import annotations

from cnnlab.data.idx import IdxSet, archive_md5s

# The published MD5s of the .gz archives, as torchvision lists them (torchvision/datasets/mnist.py,
# MNIST.resources, torchvision 0.29): `cnnlab data mnist --verify` checks the .gz files it finds.
SET = IdxSet(
    name="mnist",
    title="MNIST",
    classes=tuple(str(digit) for digit in range(10)),
    checksums=archive_md5s({
        "train-images-idx3-ubyte": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
        "train-labels-idx1-ubyte": "d53e105ee54ea40749a09fcbcd1e9432",
        "t10k-images-idx3-ubyte": "9fb629c4189551a2d022fa330f9573f3",
        "t10k-labels-idx1-ubyte": "ec29112dd5afa0611ce80d1b7f02629c",
    }),
    torchvision="MNIST",
)

NAME, SPEC = SET.name, SET.spec
describe, read_splits, check, cache_state, where = SET.describe, SET.read_splits, SET.check, SET.cache_state, SET.where
