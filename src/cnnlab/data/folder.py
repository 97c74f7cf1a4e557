"""Usage: ``data.name: folder`` and ``data.root: DIR`` in a config: your own pictures, one folder per class.

The layout (torchvision's ImageFolder): ``DIR/train/<class>/<pictures>``, and optionally
``DIR/val/<class>/...`` and ``DIR/test/<class>/...``; pictures may sit in sub-folders of a class
folder. Class names are train/'s sub-folder names, sorted (label = position). A file whose ending belongs to
one of ``pictures.FORMATS`` is a picture (``pictures.extensions()``); other files and hidden ones (``.DS_Store``)
are passed over. Without test/, ``data.test_size`` of train/'s pictures are held out as the test
split, stratified and fixed by the file list (never by the run's seed: runs with different seeds are
tested on the same pictures). With val/, it is the validation split and ``data.val_size`` draws none
from train/ (0 still means no validation split).

Every picture is made one size and one channel count: ``data.image_size`` and ``data.channels``
when the config has them, else the most common size in train/, and grey when every train/ picture
is grey, RGB otherwise. Every picture is made 8-bit by ``pictures``' mode rule, the one ``predict`` uses.

The decoded pixels are cached (``cache.py``) under a key that identifies the data (``cache_key``): the
folder's resolved path, its classes, each file's name, size and a hash of all its bytes (BLAKE2b, 128
bits), the size/channel settings, the Pillow version and ``CACHE_VERSION``. So another folder never
reads this one's cache, even one of the same names, sizes and times (a reproducible archive unpacked
twice, a Nix store), and a file whose bytes change is decoded again however its time is kept; a file
only touched keeps the cache. The bytes that are decoded are the bytes that were hashed: a file that
changes between the two is decoded as it is then, and that load writes no cache. Hashing reads every
file on each load (the cached load of 70,000 PNGs of Fashion-MNIST, 35 MB: README, "Decoded once").
The second load reads the cache. One line on stderr says which happened. Bad data is a ``UserError``
naming the file, before anything is written; ``data.skip_bad: true`` passes over pictures that cannot
be decoded (or that the mode rule refuses), and the run records them.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import stat
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import PIL
import torch

from cnnlab.data import cache, pictures
from cnnlab.data.placement import keep_mapped
from cnnlab.data.spec import DataSpec
from cnnlab.data.splits import Split, stratified_split
from cnnlab.errors import UserError, say
from cnnlab.safetext import how_names_differ, look_alike, one_line, printable

NAME = "folder"
MAPPABLE = True  # its cache file can be memory-mapped (data.placement: mapped)
SPLITS = ("train", "val", "test")
CACHE_VERSION = 3  # bump when what a cache file holds, what its key means, or how pictures are decoded, changes
READ_CHUNK = 1 << 20  # bytes read at a time of a picture file larger than its listed size
ARRAYS = ("images", "labels", "splits", "meta")
LAYOUT = "the layout is DIR/train/<class>/<pictures>, with optional DIR/val/<class>/ and DIR/test/<class>/"


@dataclass(frozen=True)
class Picture:
    path: str
    name: str  # relative to the data folder, with / separators: train/cat/001.png
    label: int
    size: int  # bytes, as listed


@dataclass(frozen=True)
class Layout:
    """What a data folder holds, from its file names alone."""

    root: Path
    classes: tuple[str, ...]
    splits: dict[str, list[Picture]]  # train, and val and test when their folders exist


@dataclass(frozen=True)
class Decoded:
    """A folder's pictures as pixels: every split's, in ``Layout`` order, less any skipped."""

    images: np.ndarray  # uint8 [N, channels, height, width]
    labels: np.ndarray  # int64 [N]
    splits: np.ndarray  # uint8 [N]: the position in SPLITS of each picture's split
    skipped: tuple[str, ...]  # "train/cat/7.png: cannot be decoded (...)", for each picture passed over
    mapped: bool = False  # ``images`` is memory-mapped from the cache file


# ---------------------------------------------------------------------------------------------
# The folder's files


def entries(folder: str) -> Iterator[tuple[str, str, os.stat_result]]:
    """(path, name, stat) of each non-hidden entry of ``folder``, sorted by name, symlinks followed; a
    link that loops or leads nowhere is a ``UserError`` naming it. (Plain strings: a folder may hold
    hundreds of thousands of pictures, and pathlib costs more than the stat.)"""
    with os.scandir(folder) as found:
        listed = sorted((entry for entry in found if not entry.name.startswith(".")), key=lambda entry: entry.name)
    for entry in listed:
        path, name = entry.path, entry.name
        try:
            yield path, name, entry.stat()
        except OSError as err:
            what = "a symlink loop (the link leads back to itself)" if err.errno == errno.ELOOP else \
                f"cannot be read ({err.strerror or err})"
            raise UserError(f"{printable(path)}: {what}; remove or fix it") from None


def is_picture(name: str) -> bool:
    dot = name.rfind(".")
    return dot > 0 and name[dot:].lower() in pictures.extensions()


def pictures_in(folder: str, relative: str, ancestors: tuple[tuple[int, int], ...]) -> Iterator[tuple[str, str, os.stat_result]]:
    """(path, path below the data folder, stat) of every picture under ``folder`` (whose path below the
    data folder is ``relative``), sub-folders included, in name order. ``ancestors`` are the (device,
    inode) of the folders above: a sub-folder that is one of them is a symlink loop."""
    for path, name, info in entries(folder):
        if stat.S_ISDIR(info.st_mode):
            if (info.st_dev, info.st_ino) in ancestors:
                raise UserError(f"{printable(path)}: a symlink loop (it leads back to a folder above it); remove the link")
            yield from pictures_in(path, f"{relative}/{name}", (*ancestors, (info.st_dev, info.st_ino)))
        elif stat.S_ISREG(info.st_mode) and is_picture(name):
            yield path, f"{relative}/{name}", info


def class_folders(split_dir: Path) -> list[Path]:
    """The class folders of a split folder; a picture beside them (in no class) is a ``UserError``."""
    folders = []
    for path, name, info in entries(str(split_dir)):
        if stat.S_ISDIR(info.st_mode):
            folders.append(Path(path))
        elif is_picture(name):
            raise UserError(f"{printable(str(path))}: a picture outside any class folder; move it into "
                            f"{split_dir.name}/<class>/ ({LAYOUT})")
    return folders


def scan(root: Path | None) -> Layout:
    """The pictures of the data folder ``root`` and their classes; a layout that cannot be trained on is a ``UserError``."""
    if root is None:
        raise UserError(f"data.root: data.name: folder needs the folder of your pictures ({LAYOUT})")
    root = Path(root).expanduser()
    where = printable(str(root))
    if not (root / "train").is_dir():
        state = "does not exist" if not root.exists() else "has no train/ folder"
        raise UserError(f"data.root: {where} {state}; {LAYOUT}")
    folders = class_folders(root / "train")
    if not folders:
        raise UserError(f"{where}/train: no class folders, so no pictures; {LAYOUT}")
    classes = tuple(folder.name for folder in folders)
    if len(classes) == 1:
        raise UserError(f"{where}/train: only one class ({printable(classes[0])}); a classifier needs two or more class folders")
    alike = look_alike(classes)
    if alike is not None:  # two folders whose names look the same: two classes no table or plot could tell apart
        first, second = (classes[i] for i in alike)
        raise UserError(f"{where}/train: class folders {one_line(first)!r} and {one_line(second)!r} look the same but "
                        f"{how_names_differ(first, second)}; merge them or rename one")
    splits = {}
    for split in SPLITS:
        if split == "train" or (root / split).is_dir():
            splits[split] = split_pictures(root, split, classes)
    return Layout(root=root, classes=classes, splits=splits)


def split_pictures(root: Path, split: str, classes: tuple[str, ...]) -> list[Picture]:
    """The pictures of one split folder, labelled by ``classes`` (train/'s)."""
    found = []
    folders = class_folders(root / split)
    if not folders:
        raise UserError(f"{printable(str(root / split))}: no class folders, so no pictures; {LAYOUT}")
    for folder in folders:
        if folder.name not in classes:
            twin = next((name for name in classes if look_alike((name, folder.name))), None)
            if twin is not None:  # the same name to the eye, another string: say how, or the message shows it twice
                raise UserError(f"{printable(str(folder))}: class {one_line(folder.name)!r} is not train/'s {one_line(twin)!r}: "
                                f"{how_names_differ(folder.name, twin)}; rename the folder to match train/'s")
            raise UserError(f"{printable(str(folder))}: class {one_line(folder.name)!r} is not in train/ (whose classes are "
                            f"{one_line(', '.join(classes))}); rename or remove the folder")
        before = len(found)
        above = tuple((info.st_dev, info.st_ino) for info in (root.stat(), (root / split).stat(), folder.stat()))
        label = classes.index(folder.name)
        for path, name, info in pictures_in(str(folder), f"{split}/{folder.name}", above):
            found.append(Picture(path, name, label, info.st_size))
        if len(found) == before:
            raise UserError(f"{printable(str(folder))}: an empty class folder (no pictures: files ending in .png, .jpg, "
                            ".webp, .tif... that Pillow reads); add pictures or remove the folder")
    return found


# ---------------------------------------------------------------------------------------------
# What the pictures become: one size, one channel count


def asked_size(cfg) -> tuple[int, int] | None:
    """``data.image_size`` as (height, width), when the config has it and sets it."""
    size = getattr(cfg, "image_size", None)
    if size is None:
        return None
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def asked_channels(cfg) -> int | None:
    """``data.channels`` when the config has it and sets it (1 or 3); None for auto."""
    channels = getattr(cfg, "channels", None)
    return None if channels in (None, "auto") else int(channels)


def settings(cfg, layout: Layout, problems: dict[str, str]) -> tuple[tuple[int, int], int]:
    """(height and width, channels) the pictures become: as asked, else from train/'s pictures' headers
    (the most common size; grey when all are grey). Pictures whose header cannot be read go in ``problems``."""
    size, channels = asked_size(cfg), asked_channels(cfg)
    if size is not None and channels is not None:
        return size, channels
    train = layout.splits["train"]
    headers = pictures.each_file(pictures.probe, [picture.path for picture in train])
    sizes, grey = Counter(), True
    for picture, header in zip(train, headers):
        if isinstance(header, str):
            problems[picture.name] = header
        else:
            sizes[header[:2]] += 1
            grey = grey and header[2]
    if not sizes:
        raise UserError(f"{printable(str(layout.root))}/train: none of its pictures can be read ({first_problem(problems)})")
    return size or sizes.most_common(1)[0][0], channels or (1 if grey else 3)


def first_problem(problems: dict[str, str]) -> str:
    name, problem = next(iter(problems.items()))
    return f"{printable(name)}: {problem}"


# ---------------------------------------------------------------------------------------------
# Decoding, once


def read_bytes(picture: Picture) -> bytes:
    """All of a picture file's bytes, read to its end (whatever its listed size): one read of a byte more than
    listed, which comes back short at the end of an unchanged file, then more reads only for a file that grew."""
    fd = os.open(picture.path, os.O_RDONLY)
    try:
        parts = [os.read(fd, picture.size + 1)]
        while len(parts[-1]) == (picture.size + 1 if len(parts) == 1 else READ_CHUNK):
            parts.append(os.read(fd, READ_CHUNK))
    finally:
        os.close(fd)
    return parts[0] if len(parts) == 1 else b"".join(parts)


def digest(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=16).digest()


def file_digest(picture: Picture) -> bytes:
    """The hash of a picture file's bytes; for a file that cannot be read, what kept it from being read (its
    decode then fails and names it)."""
    try:
        return digest(read_bytes(picture))
    except OSError as err:
        return f"unreadable: {err.errno} {err.strerror}".encode()


def each_picture(layout: Layout) -> list[tuple[int, Picture]]:
    """(position of its split in SPLITS, picture) of every picture of ``layout``, in ``Layout`` order."""
    return [(SPLITS.index(split), picture) for split, found in layout.splits.items() for picture in found]


def file_digests(found: Sequence[Picture]) -> list[bytes]:
    """``file_digest`` of each picture, in order, on a thread per CPU core (reading and hashing release the GIL),
    each thread taking a run of files (one task per file would cost more than hashing a small one)."""
    workers = min(os.cpu_count() or 1, max(1, len(found) // 256))
    if workers == 1:
        return [file_digest(picture) for picture in found]
    step = -(-len(found) // (4 * workers))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        runs = pool.map(lambda start: [file_digest(p) for p in found[start:start + step]], range(0, len(found), step))
        return [one for run in runs for one in run]


def cache_key(layout: Layout, size_asked: tuple[int, int] | None, channels_asked: int | None,
              digests: Sequence[bytes] | None = None) -> str:
    """What the decoded pixels depend on, and where they come from: the folder's resolved path, its classes, each
    file's name, size and content hash (``digests``, in ``each_picture`` order: computed here when not given), the
    settings, the Pillow version that decodes them and ``CACHE_VERSION``."""
    if digests is None:
        digests = file_digests([picture for _, picture in each_picture(layout)])
    files, at = hashlib.sha256(), 0
    for split, listed in layout.splits.items():
        files.update("".join(f"{p.name}\0{p.size}\0{d.hex()}\n" for p, d in zip(listed, digests[at:at + len(listed)]))
                     .encode("utf-8", "surrogateescape"))
        files.update(f"-- end of {split}\n".encode())
        at += len(listed)
    root = str(layout.root.resolve()).encode("utf-8", "surrogateescape").hex()  # any bytes a path holds, as JSON text
    return cache.content_key({"version": CACHE_VERSION, "root": root, "classes": layout.classes,
                              "files": files.hexdigest(), "image_size": size_asked, "channels": channels_asked,
                              "pillow": PIL.__version__})


def decode(cfg, layout: Layout, digests: Sequence[bytes] | None = None) -> tuple[Decoded, tuple[int, int], int, int]:
    """Every picture of ``layout`` decoded (in parallel) to one size and channel count: (the pixels, size, channels,
    how many files' bytes were not those ``digests`` hashed: changed since). A picture that cannot be decoded is a
    ``UserError`` naming it, unless ``data.skip_bad``."""
    problems: dict[str, str] = {}
    size, channels = settings(cfg, layout, problems)
    every = each_picture(layout)
    images = np.zeros((len(every), channels, *size), dtype=np.uint8)
    changed = []

    def job(i: int) -> None:  # the bytes decoded are the bytes checked against the key's hash
        data = read_bytes(every[i][1])
        if digests is not None and digest(data) != digests[i]:
            changed.append(i)
        pictures.decode_into(io.BytesIO(data), images[i], size, channels)

    outcomes = pictures.each_file(job, range(len(every)))
    for (_, picture), outcome in zip(every, outcomes):
        if isinstance(outcome, str):
            problems.setdefault(picture.name, outcome)
    if problems and not getattr(cfg, "skip_bad", False):
        raise UserError(f"{printable(str(layout.root))}/{first_problem(problems)}; remove or replace it, or set "
                        "data.skip_bad: true to train without the pictures that cannot be decoded")
    keep = np.array([picture.name not in problems for _, picture in every], dtype=bool)
    decoded = Decoded(images=images[keep],
                      labels=np.array([picture.label for _, picture in every], dtype=np.int64)[keep],
                      splits=np.array([split for split, _ in every], dtype=np.uint8)[keep],
                      skipped=tuple(f"{name}: {problem}" for name, problem in problems.items()))
    return decoded, size, channels, len(changed)


def meta_array(layout: Layout, size: tuple[int, int], channels: int, skipped: tuple[str, ...]) -> np.ndarray:
    meta = {"classes": list(layout.classes), "image_size": list(size), "channels": channels, "skipped": list(skipped)}
    return np.array(json.dumps(meta))


def read_meta(value: np.ndarray, images: np.ndarray | None = None) -> tuple[tuple[int, int], int, tuple[str, ...]]:
    """(size, channels, skipped) from a cache file's meta array, checked against its pixels when given."""
    meta = json.loads(str(value[()]))
    size, channels = tuple(meta["image_size"]), meta["channels"]
    skipped = tuple(meta["skipped"])
    if not (len(size) == 2 and all(isinstance(v, int) and v > 0 for v in size) and channels in (1, 3)
            and all(isinstance(s, str) for s in skipped)):
        raise ValueError(f"its description is not valid: {meta}")
    if images is not None and images.shape[1:] != (channels, *size):
        raise ValueError(f"its pixels are {images.shape[1:]}, its description says {(channels, *size)}")
    return size, channels, skipped


def cached(layout: Layout, key: str, only_meta: bool = False) -> dict[str, np.ndarray] | None:
    """The cache file's arrays for ``key`` when it holds a whole, consistent copy; None when there is none
    or it is corrupt (which is said, and it is rebuilt)."""
    path = cache.cache_file(NAME, key)
    try:
        arrays = cache.read(path, ARRAYS, only=("meta",) if only_meta else None, mapped=("images",))
        if arrays is None:
            return None
        read_meta(arrays["meta"], None if only_meta else arrays["images"])
        if not only_meta:
            labels, splits, images = arrays["labels"], arrays["splits"], arrays["images"]
            if not (images.dtype == np.uint8 and images.ndim == 4 and labels.dtype == np.int64 and splits.dtype == np.uint8
                    and len(images) == len(labels) == len(splits)
                    and (len(labels) == 0 or (labels.min() >= 0 and labels.max() < len(layout.classes)
                                              and splits.max() < len(SPLITS) and (np.diff(splits) >= 0).all()))):
                raise ValueError("its arrays do not agree")
        return arrays
    except (cache.CorruptCache, ValueError, KeyError, TypeError, json.JSONDecodeError) as err:
        say(f"cache {path} is corrupt ({err}); decoding again")
        return None


def load(cfg, layout: Layout) -> tuple[Decoded, tuple[int, int], int]:
    """``layout``'s pixels: read from the cache, or decoded and cached; left memory-mapped in the cache file
    when ``data.placement`` asks for it or (auto) they would take more than half the memory available."""
    size_asked, channels_asked = asked_size(cfg), asked_channels(cfg)
    started = time.perf_counter()
    digests = file_digests([picture for _, picture in each_picture(layout)])
    key = cache_key(layout, size_asked, channels_asked, digests)
    path = cache.cache_file(NAME, key)
    arrays = cached(layout, key)
    asked = getattr(cfg, "placement", "auto")
    if arrays is not None:
        size, channels, skipped = read_meta(arrays["meta"], arrays["images"])
        if skipped and not getattr(cfg, "skip_bad", False):
            raise UserError(f"{printable(str(layout.root))}/{printable(skipped[0])}; remove or replace it, or set "
                            "data.skip_bad: true to train without the pictures that cannot be decoded")
        mapped = keep_mapped(arrays["images"].nbytes, asked)
        images = arrays["images"] if mapped else np.array(arrays["images"])
        say(f"read {len(arrays['labels']):,} images from cache {path} in {time.perf_counter() - started:.1f} s")
        return Decoded(images, arrays["labels"], arrays["splits"], skipped, mapped), size, channels
    decoded, size, channels, changed = decode(cfg, layout, digests)
    if changed:  # its key names bytes some of these pixels do not come from
        where = f"no cache ({changed:,} picture file(s) changed while the folder was read; the next load decodes again)"
    else:
        try:
            cache.write(path, {"images": decoded.images, "labels": decoded.labels, "splits": decoded.splits,
                               "meta": meta_array(layout, size, channels, decoded.skipped)})
            where = f"cache {path}"
        except OSError as err:  # a full disk or a read-only home: the data is decoded, the next run decodes again
            where = f"no cache ({path}: {err.strerror or err})"
    say(f"decoded {len(decoded.labels):,} images in {time.perf_counter() - started:.1f} s -> {where}")
    if where.startswith("cache") and keep_mapped(decoded.images.nbytes, asked):
        arrays = cached(layout, key)  # the file just written, mapped: the decoded copy in memory is let go
        if arrays is not None:
            decoded = Decoded(arrays["images"], arrays["labels"], arrays["splits"], decoded.skipped, mapped=True)
    return decoded, size, channels


# ---------------------------------------------------------------------------------------------
# The data set interface (registry.py)


def title(layout: Layout) -> str:
    return printable(layout.root.resolve().name or str(layout.root))[:100]


def describe(cfg) -> DataSpec:
    """What the folder ``data.root`` holds: classes from its folder names, size and channels as they will
    be (from the cache when there is one, else from the pictures' headers: nothing is decoded)."""
    layout = scan(cfg.root)
    key = cache_key(layout, asked_size(cfg), asked_channels(cfg))
    arrays = cached(layout, key, only_meta=True)
    if arrays is not None:
        size, channels, _ = read_meta(arrays["meta"])
    else:
        size, channels = settings(cfg, layout, {})
    return spec_of(layout, size, channels)


def spec_of(layout: Layout, size: tuple[int, int], channels: int) -> DataSpec:
    return DataSpec(name=NAME, title=title(layout), classes=layout.classes, channels=channels, image_size=size,
                    dark_background=False)  # pictures of anything: never inverted by predict


def held_out_test(cfg, train: Split, names: list[str]) -> tuple[Split, Split]:
    """(train, test): ``data.test_size`` of the pictures, stratified, chosen by a seed made from train/'s
    file ``names``: the same pictures whatever the run's seed."""
    count = round(cfg.test_size * len(train)) if isinstance(cfg.test_size, float) else cfg.test_size
    if not 1 <= count < len(train):
        raise UserError(f"data.test_size: {cfg.test_size} of train/'s {len(train):,} pictures is {count:,}; the test split "
                        f"needs at least one and must leave some to train on (or make a test/ folder)")
    seed = int.from_bytes(hashlib.sha256("\n".join(names).encode("utf-8", "surrogateescape")).digest()[:8], "big") % 2**63
    keep, test = stratified_split(train.labels, count, seed)
    return train.subset(keep), train.subset(test)


def read(cfg) -> tuple:
    """(the description, the folder, the training split, the test split[, the validation split when there is
    a val/ folder]) from one listing of the folder: a load lists (and stats) its files once, not once for
    ``describe`` and again for ``read_splits``."""
    layout = scan(cfg.root)
    decoded, size, channels = load(cfg, layout)
    return (spec_of(layout, size, channels), *splits(cfg, layout, decoded))


def read_splits(cfg) -> tuple:
    """(the folder, the training split, the test split[, the validation split when there is a val/ folder])."""
    return read(cfg)[1:]


def splits(cfg, layout: Layout, decoded: Decoded) -> tuple:
    """``read_splits``' answer from the folder's decoded pixels, whose splits are stored one after another:
    each is a view of them, never a copy (a mapped set stays mapped)."""
    images, labels = torch.from_numpy(decoded.images), torch.from_numpy(decoded.labels)
    ends = np.searchsorted(decoded.splits, np.arange(len(SPLITS) + 1), side="left")
    parts = {split: Split(images[ends[i]:ends[i + 1]], labels[ends[i]:ends[i + 1]], mapped=decoded.mapped)
             for i, split in enumerate(SPLITS) if split in layout.splits}
    train = parts["train"]
    if "test" in parts:
        test = parts["test"]
    else:
        train, test = held_out_test(cfg, train, [picture.name for picture in layout.splits["train"]])
    train = replace(train, skipped=decoded.skipped)
    return (layout.root, train, test, *((parts["val"],) if "val" in parts else ()))


def check(root: Path | None = None, download: bool = False, verify: bool = False,
          check_counts: bool = True) -> Iterator[str]:
    """What ``cnnlab data`` says of a data folder: its classes and the pictures each split holds."""
    layout = scan(root)
    classes = printable(", ".join(layout.classes))
    yield f"a folder of pictures, {printable(str(layout.root))}: {len(layout.classes)} classes ({classes})"
    for split, found in layout.splits.items():
        yield f"  {split}: {len(found):,} pictures"
