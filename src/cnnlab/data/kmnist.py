"""Usage: ``data.name: kmnist`` in a config; ``cnnlab data kmnist``: Kuzushiji-MNIST, cursive Japanese.

KMNIST (Clanuwat et al., 2018, ROIS-DS CODH): 60,000 training and 10,000 test images, 28x28 grey, ten
hiragana characters, as four IDX files in a folder the user names, in cnnlab's cache
(``~/.cache/cnnlab/kmnist``, where ``--download`` puts them through torchvision) or in torchvision's
``KMNIST/raw`` layout below either. The IDX family's reader (``idx.py``) does the rest.
"""

from __future__ import annotations

from cnnlab.data.idx import IdxSet, archive_md5s

# The published MD5s of the .gz archives, as torchvision lists them (torchvision/datasets/mnist.py,
# KMNIST.resources, torchvision 0.29): `cnnlab data kmnist --verify` checks the .gz files it finds.
# The class names are the characters' romanisations, as torchvision's KMNIST.classes gives them.
SET = IdxSet(
    name="kmnist",
    title="KMNIST",
    classes=("o", "ki", "su", "tsu", "na", "ha", "ma", "ya", "re", "wo"),
    checksums=archive_md5s({
        "train-images-idx3-ubyte": "bdb82020997e1d708af4cf47b453dcf7",
        "train-labels-idx1-ubyte": "e144d726b3acfaa3e44228e80efcd344",
        "t10k-images-idx3-ubyte": "5c965bf0a639b31b8f53240b1b52f4d7",
        "t10k-labels-idx1-ubyte": "7320c461ea6c1c855c0b718fb2a4b134",
    }),
    torchvision="KMNIST",
)

NAME, SPEC = SET.name, SET.spec
describe, read_splits, check, cache_state, where = SET.describe, SET.read_splits, SET.check, SET.cache_state, SET.where
