"""Usage: ``data = load_data(cfg.data, seed=0, device=torch.device("cpu"))``; ``for x, y in data.batches("train", 256)``.

The generic data layer: the configured data set (``data.name``, looked up in ``registry.py``) read
once, split, and held whole as uint8 tensors on the training device, with its description
(``Data.spec``: classes, channels, size, the training split's per-channel mean and std) made here
for every consumer. Batches are slices of a shuffled index permutation; conversion to float,
normalisation and optional augmentation happen per batch on the device. No DataLoader, no worker
processes: at 28x28 the whole training set of Fashion-MNIST is 47 MB, and copying it once beats
streaming it every epoch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch

from cnnlab.data.convert import converted, shaped
from cnnlab.data.mixing import Mix
from cnnlab.data.placement import ahead, choose, line
from cnnlab.data.registry import DEFAULT, data_set
from cnnlab.data.spec import DataSpec
from cnnlab.data.splits import Split, stratified_split
from cnnlab.data.trivial import TrivialAugment
from cnnlab.errors import UserError
from cnnlab.safetext import printable


@dataclass
class Augment:
    """What ``data.augment`` asks of every training batch: ``trivial`` on its pixels in [0, 1] (``pixels``),
    the rest on the normalised model input (``__call__``)."""

    crop_padding: int = 0
    flip: bool = False
    erasing: float = 0.0
    trivial: bool = False

    @property
    def active(self) -> bool:
        return bool(self.crop_padding or self.flip or self.erasing or self.trivial)

    def pixels(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return TrivialAugment()(x, generator) if self.trivial else x

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
    spec: DataSpec  # what the data set is, with the training split's per-channel statistics and the folder
    normalize: bool = True
    augment: Augment | None = None
    channels_last: bool = False
    augment_generator: torch.Generator | None = None
    mix: Mix | None = None  # Mixup / CutMix of training batches, applied by the training step (it changes the targets)
    skipped: tuple[str, ...] = ()  # pictures the data set passed over as undecodable (data.skip_bad), "file: problem"
    device: torch.device | None = None  # the training device (None: where the pixels are)
    placement: str = "device"  # where the pixels stay (placement.py): device, host or mapped
    placement_line: str = ""  # the one line that says so

    def __post_init__(self) -> None:
        # One channel: plain numbers, subtracted as they always were. Several: (1, C, 1, 1) tensors made
        # once on the device, never per batch (a captured CUDA-graph step cannot copy from the host).
        mean, std = self.spec.mean or (0.0,), self.spec.std or (1.0,)
        device = self.device = self.device or self.train.images.device
        self._shift, self._scale = (mean[0], std[0]) if len(mean) == 1 else \
            (torch.tensor(mean, device=device).view(1, -1, 1, 1), torch.tensor(std, device=device).view(1, -1, 1, 1))

    @property
    def root(self) -> Path:
        return Path(self.spec.source or ".")

    @property
    def mean(self) -> float | None:
        """The training split's pixel mean as summary.json's ``pixel_mean`` records it (one channel's; None for several)."""
        return self.spec.mean[0] if self.spec.mean is not None and self.spec.channels == 1 else None

    @property
    def std(self) -> float | None:
        return self.spec.std[0] if self.spec.std is not None and self.spec.channels == 1 else None

    @property
    def eval_split_name(self) -> str:
        return "val" if self.val is not None else "test"

    def split(self, name: str) -> Split:
        split = {"train": self.train, "val": self.val, "test": self.test}[name]
        if split is None:
            raise UserError("this run has no validation split (data.val_size: 0); use the test split")
        return split

    def training_input(self, images: torch.Tensor) -> torch.Tensor:
        """A training batch's uint8 pixels -> augmented float model input (``data.augment``)."""
        if self.augment is None:
            return self.prepare(images)
        return self.augment(self.prepare(images, self.augment.pixels if self.augment.trivial else None),
                            self.augment_generator)

    def prepare(self, images: torch.Tensor,
                before: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None) -> torch.Tensor:
        """uint8 [N, channels, height, width] -> float model input, on the same device; ``before`` (an augmentation
        of pixels in [0, 1]) is applied before normalising."""
        x = images.float().div_(255)
        if before is not None:
            x = before(x, self.augment_generator)
        if self.normalize:
            x = x.sub_(self._shift).div_(self._scale)
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
        order = None
        if shuffle:
            order = torch.randperm(n, generator=generator).to(split.images.device)
            n = _without_short_last(n, batch_size, min_last)

        def gather(start: int) -> tuple[torch.Tensor, torch.Tensor]:
            stop = min(start + batch_size, n)
            if order is None:
                return split.window(start, stop), split.labels[start:stop]
            idx = order[start:stop]
            return split.take(idx), split.labels[idx]

        starts = range(skip * batch_size, n, batch_size)
        raw = map(gather, starts) if self.placement == "device" else ahead(gather, starts, self.device)
        for images, labels in raw:
            yield self.training_input(images) if shuffle else self.prepare(images), labels

    def num_batches(self, name: str, batch_size: int, shuffle: bool = False, min_last: int = 2) -> int:
        n = len(self.split(name))
        if shuffle:
            n = _without_short_last(n, batch_size, min_last)
        return -(-n // batch_size)


def _without_short_last(n: int, batch_size: int, min_last: int) -> int:
    """How many of ``n`` shuffled images the batches use: all but a last batch shorter than ``min_last``."""
    short = n % batch_size
    return n - short if 0 < short < min_last and n > short else n


def channel_stats(split: Split, chunk: int = 8192) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean per channel, std per channel) of a split's uint8 pixels, scaled to [0, 1]: from histograms counted
    ``chunk`` images at a time (no float copy of the set; a memory-mapped one is read once, in order)."""
    channels = split.shape[1]
    counts = torch.zeros(channels, 256, dtype=torch.long)
    for start in range(0, len(split), chunk):
        images = split.window(start, start + chunk)
        for c in range(channels):
            counts[c] += torch.bincount(images[:, c].flatten(), minlength=256).cpu()
    values = torch.arange(256, dtype=torch.float64) / 255
    means, stds = [], []
    for histogram in counts.double():
        total = histogram.sum()
        mean = (histogram * values).sum() / total
        var = (histogram * (values - mean) ** 2).sum() / total
        means.append(mean.item())
        stds.append(var.sqrt().item())
    return tuple(means), tuple(stds)


def read(source: ModuleType, cfg) -> tuple:
    """(description, folder, train, test[, val]) of a data set module: through its ``read`` when it has one
    (one pass over its files), else its ``describe`` and ``read_splits``."""
    both = getattr(source, "read", None)
    return both(cfg) if both is not None else (source.describe(cfg), *source.read_splits(cfg))


def held_out(val_size: int | float, total: int) -> int:
    """How many of ``total`` training images ``data.val_size`` holds out for validation: a count as it is, a fraction
    (below 1) of ``total``, rounded; one that leaves no training images, or a positive fraction that holds out none,
    is a ``UserError``."""
    count = round(val_size * total) if isinstance(val_size, float) else val_size
    if isinstance(val_size, float) and val_size > 0 and count == 0:
        raise UserError(f"data.val_size: {val_size} of the training set's {total:,} images is 0; give a larger fraction, "
                        "a count, or 0 to evaluate on the test set")
    if count >= total:
        asked = f"{val_size} of the training set's images is {count:,}, which" if isinstance(val_size, float) \
            else f"{val_size:,}"
        raise UserError(
            f"data.val_size: {asked} leaves no training images (the training set has {total:,}); "
            f"choose a value below {total:,}, e.g. {max(1, total // 10):,} or 0.1, or 0 to evaluate on the test set"
        )
    return count


def read_data(cfg) -> tuple[DataSpec, Path, Split, Split, Split | None]:
    """(its description, in the channels and size asked for, without statistics; its folder; the training split;
    the test split; the validation split its files hold, or None) of the data set a ``DataConfig`` names: read,
    validated and converted as ``data.image_size`` and ``data.channels`` ask, not yet split for validation."""
    source = data_set(getattr(cfg, "name", DEFAULT))
    # A data set whose files hold a validation split (a folder's val/) gives it last.
    described, root, train, test, *given_val = read(source, cfg)
    wanted = shaped(described, cfg)  # as data.image_size and data.channels ask
    for split in (train, test, *given_val):
        if tuple(split.images.shape[1:]) != described.input_shape:
            raise UserError(f"{root}: images of {'x'.join(map(str, split.images.shape[1:]))}, but {described.title}'s are "
                            f"{described.shape_text} (channels x height x width)")
    if wanted.input_shape != described.input_shape:  # (a mapped set is cached as asked, so never converted here)
        train, test, *given_val = (Split(converted(split.images, wanted), split.labels, split.skipped)
                                   for split in (train, test, *given_val))
    return wanted, root, train, test, (given_val[0] if given_val else None)


def validation_split(cfg, train: Split, given_val: Split | None, seed: int) -> tuple[Split, Split | None]:
    """(training split, validation split or None) as a run makes them: the set's own validation split when it has
    one (``data.val_size: 0`` still means none), else ``data.val_size`` of the training images, stratified and
    drawn by ``seed`` (``held_out``: a size that cannot be held out is a ``UserError``)."""
    if given_val is not None:
        return train, given_val if cfg.val_size else None
    count = held_out(cfg.val_size, len(train))
    if not count:
        return train, None
    train_idx, val_idx = stratified_split(train.labels, count, seed)
    return train.subset(train_idx), train.subset(val_idx)


def with_statistics(wanted: DataSpec, root: Path, train: Split) -> DataSpec:
    """The description a run records and normalises with: the training split's per-channel mean and std, its folder."""
    mean, std = channel_stats(train)
    flat = [channel for channel, spread in enumerate(std) if not spread > 0]
    if flat:  # no picture differs from another there: nothing to learn, and nothing to normalise by
        which = f"channel {flat[0]}" if len(std) > 1 else "every pixel"
        raise UserError(f"{printable(str(root))}: in every training picture {which} has the same value ({mean[flat[0]]:.4g} "
                        "on a 0-1 scale); check that the files hold the pictures you mean")
    return DataSpec.made(printable(str(root)), **{**wanted.model_dump(), "mean": mean, "std": std, "source": str(root)})


def load_data(cfg, seed: int, device: torch.device, channels_last: bool = False) -> Data:
    """Read, validate and split the data set described by a ``DataConfig``, onto ``device``."""
    source = data_set(getattr(cfg, "name", DEFAULT))
    asked = getattr(cfg, "placement", "auto")
    if asked == "mapped" and not getattr(source, "MAPPABLE", False):
        raise UserError(f"data.placement: mapped maps a data set's cache file, and data.name: {source.NAME} has none "
                        "(data.name: folder has one); use auto, device or host")
    wanted, root, train, test, given_val = read_data(cfg)
    skipped = train.skipped
    train, val = validation_split(cfg, train, given_val, seed)
    spec = with_statistics(wanted, root, train)
    splits = [s for s in (train, val, test) if s is not None]
    nbytes = sum(len(s) * s.images[:1].nbytes for s in splits)
    where = choose(nbytes, device, asked, mapped=train.mapped)
    if where == "device":
        train, test = train.to(device), test.to(device)
        val = val.to(device) if val is not None else None
    augment = Augment(cfg.augment.crop_padding, cfg.augment.flip, cfg.augment.erasing, cfg.augment.trivial)
    return Data(
        train=train,
        val=val,
        test=test,
        spec=spec,
        normalize=cfg.normalize,
        augment=augment if augment.active else None,
        channels_last=channels_last,
        augment_generator=torch.Generator(device=device).manual_seed((seed + 1) % 2**63) if augment.active else None,
        mix=Mix(cfg.augment.mixup, cfg.augment.cutmix, spec.num_classes, torch.Generator().manual_seed((seed + 2) % 2**63))
        if cfg.augment.mixup or cfg.augment.cutmix else None,
        skipped=skipped,
        device=device,
        placement=where,
        placement_line=line(where, nbytes, sum(len(s) for s in splits), device, str(root)),
    )
