"""Usage: ``data.name: cifar100`` (``data.labels: coarse`` for its 20 superclasses): CIFAR-100 (``cifar.py`` reads it).

60,000 32x32 colour images of 100 fine classes in 20 coarse superclasses. Its files: the binary
distribution ``cifar-100-binary/`` (``train.bin``, ``test.bin``: records of a coarse and a fine label
byte and 3,072 pixel bytes; class names in ``fine_label_names.txt``, ``coarse_label_names.txt``) or the
Python one ``cifar-100-python/`` (read without running any pickled code).
"""

from __future__ import annotations

from functools import partial

from cnnlab.data import cifar

NAME = "cifar100"
FINE = (
    "apple", "aquarium_fish", "baby", "bear", "beaver", "bed", "bee", "beetle", "bicycle", "bottle",
    "bowl", "boy", "bridge", "bus", "butterfly", "camel", "can", "castle", "caterpillar", "cattle",
    "chair", "chimpanzee", "clock", "cloud", "cockroach", "couch", "crab", "crocodile", "cup", "dinosaur",
    "dolphin", "elephant", "flatfish", "forest", "fox", "girl", "hamster", "house", "kangaroo", "keyboard",
    "lamp", "lawn_mower", "leopard", "lion", "lizard", "lobster", "man", "maple_tree", "motorcycle", "mountain",
    "mouse", "mushroom", "oak_tree", "orange", "orchid", "otter", "palm_tree", "pear", "pickup_truck", "pine_tree",
    "plain", "plate", "poppy", "porcupine", "possum", "rabbit", "raccoon", "ray", "road", "rocket",
    "rose", "sea", "seal", "shark", "shrew", "skunk", "skyscraper", "snail", "snake", "spider",
    "squirrel", "streetcar", "sunflower", "sweet_pepper", "table", "tank", "telephone", "television", "tiger", "tractor",
    "train", "trout", "tulip", "turtle", "wardrobe", "whale", "willow_tree", "wolf", "woman", "worm",
)
COARSE = (
    "aquatic_mammals", "fish", "flowers", "food_containers", "fruit_and_vegetables", "household_electrical_devices",
    "household_furniture", "insects", "large_carnivores", "large_man-made_outdoor_things",
    "large_natural_outdoor_scenes", "large_omnivores_and_herbivores", "medium_mammals", "non-insect_invertebrates",
    "people", "reptiles", "small_mammals", "trees", "vehicles_1", "vehicles_2",
)
DISTRIBUTION = cifar.Distribution(
    name=NAME,
    title="CIFAR-100",
    counts={"train": 50_000, "test": 10_000},
    binary_dir="cifar-100-binary",
    binary_files={"train": ("train.bin",), "test": ("test.bin",)},
    label_bytes=("coarse", "fine"),
    names_files={"fine": "fine_label_names.txt", "coarse": "coarse_label_names.txt"},
    python_dir="cifar-100-python",
    python_files={"train": ("train",), "test": ("test",)},
    python_meta="meta",
    label_keys={"fine": "fine_labels", "coarse": "coarse_labels"},
    names_keys={"fine": "fine_label_names", "coarse": "coarse_label_names"},
    classes={"fine": FINE, "coarse": COARSE},
    archive=("https://www.cs.toronto.edu/~kriz/cifar-100-binary.tar.gz", "03b5dce01913d631647c71ecec9e9cb8"),
)


# The module interface (data/registry.py), each CIFAR function bound to this distribution.
describe = partial(cifar.describe, DISTRIBUTION)
read_splits = partial(cifar.read_splits, DISTRIBUTION)
check = partial(cifar.check, DISTRIBUTION)
where = partial(cifar.where, DISTRIBUTION)
