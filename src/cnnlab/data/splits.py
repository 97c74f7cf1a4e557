"""Usage: ``train_idx, val_idx = stratified_split(train.labels, 5000, seed=0)``.

A split of a data set as uint8 images and int64 labels (``Split``), whatever data set it comes from,
and the stratified validation split drawn from the training images.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Split:
    images: torch.Tensor  # uint8 [N, channels, height, width]
    labels: torch.Tensor  # int64 [N]
    skipped: tuple[str, ...] = ()  # pictures passed over as undecodable (data.skip_bad), "file: problem" each

    def __len__(self) -> int:
        return len(self.labels)

    def to(self, device: torch.device) -> Split:
        return Split(self.images.to(device), self.labels.to(device))


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

