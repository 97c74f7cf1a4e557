"""Usage: ``train_idx, val_idx = stratified_split(train.labels, 5000, seed=0)``.

A split of a data set as uint8 images and int64 labels (``Split``), whatever data set it comes from,
and the stratified validation split drawn from the training images.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Split:
    """A split's pixels and labels. A memory-mapped split (``mapped``) is never copied to make smaller ones:
    its ``images`` stay the mapped set's, and ``rows`` says which of them are the split's."""

    images: torch.Tensor  # uint8 [N, channels, height, width] (with ``rows``: a larger set, of which these are some)
    labels: torch.Tensor  # int64 [N]
    skipped: tuple[str, ...] = ()  # pictures passed over as undecodable (data.skip_bad), "file: problem" each
    mapped: bool = False  # ``images`` is a view of a memory-mapped file
    rows: torch.Tensor | None = None  # int64 [N]: the rows of ``images`` that are this split's, in order

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def shape(self) -> tuple[int, ...]:
        """[N, channels, height, width] of the split's pixels."""
        return (len(self), *self.images.shape[1:])

    def take(self, index: torch.Tensor) -> torch.Tensor:
        """The pixels of the images at positions ``index`` (on the pixels' device), gathered."""
        return self.images[index if self.rows is None else self.rows[index]]

    def window(self, start: int, stop: int) -> torch.Tensor:
        """The pixels of the images ``start`` to ``stop``: a view when they are stored in order."""
        return self.images[start:stop] if self.rows is None else self.images[self.rows[start:stop]]

    def subset(self, index: torch.Tensor) -> Split:
        """The images at positions ``index``: copied out, or for a mapped split, their rows noted."""
        if not self.mapped:
            return Split(self.images[index], self.labels[index])
        rows = index if self.rows is None else self.rows[index]
        return Split(self.images, self.labels[index], mapped=True, rows=rows)

    def to(self, device: torch.device) -> Split:
        """The split whole on ``device`` (a mapped one read into memory)."""
        return Split(self.window(0, len(self)).to(device), self.labels.to(device))


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

