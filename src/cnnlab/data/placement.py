"""Usage: ``where = choose(nbytes, device, cfg.placement, mapped)``; ``for x, y in ahead(batches, device): ...``.

Where a data set's pixels stay while a run trains (``data.placement``), and the batches of a set that is
not whole on the training device:

- ``device``: whole on the training device, as uint8; batches are slices there (the fastest path, and the
  only one a CUDA-graph step can read from);
- ``host``: in host memory (pinned when training on CUDA); each batch is gathered on a thread while the
  one before it trains, and copied to the device without blocking;
- ``mapped``: the cache file memory-mapped (``data.name: folder``): the operating system reads the pages
  the batches touch, so a set larger than memory trains too; batches are gathered ahead as for ``host``.

``auto`` takes the first that fits: the device when the set is at most half its free memory (the rest is
the model's, its activations' and the optimiser's), host memory when the set is at most half of what is
available, else the cache file mapped. On the CPU the device is host memory.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import torch

SHARE = 0.5  # of the device's free memory, or of the host's available memory, that a set may take
Batch = tuple[torch.Tensor, torch.Tensor]
Span = TypeVar("Span")


def host_memory_available() -> int | None:
    """Bytes of host memory available to a new allocation (Linux's MemAvailable), None where unknown."""
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, AttributeError):
        return None


def device_memory_free(device: torch.device) -> int | None:
    """Bytes free on a CUDA device; None for other devices (the CPU's is host memory; MPS shares it)."""
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    return free


def keep_mapped(nbytes: int, asked: str) -> bool:
    """Whether a set of ``nbytes`` whose cache file can be mapped stays mapped instead of being read into memory."""
    if asked == "mapped":
        return True
    available = host_memory_available()
    return asked == "auto" and available is not None and nbytes > SHARE * available


def choose(nbytes: int, device: torch.device, asked: str, mapped: bool) -> str:
    """``device``, ``host`` or ``mapped``: where a set of ``nbytes`` stays, for training on ``device``."""
    if mapped:
        return "mapped"
    if asked in ("device", "host"):
        return asked
    free = device_memory_free(device)
    return "host" if free is not None and nbytes > SHARE * free else "device"


def line(where: str, nbytes: int, images: int, device: torch.device, source: str) -> str:
    """The one line that says which path a run's data takes."""
    size = f"{images:,} images, {nbytes / 2**20:,.1f} MiB"
    if where == "device":
        return f"data: {size}, whole on {device} (data.placement: device)"
    if where == "host":
        pinned = "pinned host memory" if device.type == "cuda" else "host memory"
        return f"data: {size}, in {pinned}; batches gathered and copied ahead to {device} (data.placement: host)"
    return (f"data: {size}, memory-mapped from the cache file of {source}; batches read and copied ahead to {device} "
            "(data.placement: mapped)")


def ahead(gather: Callable[[Span], Batch], spans: Sequence[Span] | Iterator[Span], device: torch.device) -> Iterator[Batch]:
    """``gather(span)`` for each span, on ``device``: the next batch is gathered (and pinned, for CUDA) on a
    thread while the caller works on the current one, and copied without blocking the host."""
    pin = device.type == "cuda"

    def load(span: Span) -> Batch:
        images, labels = gather(span)
        return (images.pin_memory(), labels.pin_memory()) if pin else (images, labels)

    def moved(batch: Batch) -> Batch:
        # Pinned memory stays reserved by PyTorch's host allocator until the copy that reads it is done.
        return batch[0].to(device, non_blocking=pin), batch[1].to(device, non_blocking=pin)

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="cnnlab-batches") as pool:
        pending = None
        for span in spans:
            following = pool.submit(load, span)
            if pending is not None:
                yield moved(pending.result())
            pending = following
        if pending is not None:
            yield moved(pending.result())
