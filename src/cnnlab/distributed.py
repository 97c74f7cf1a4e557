"""Usage: ``torchrun --nproc-per-node 2 -m cnnlab run configs/lenet.yaml``: one run, data-parallel.

When torchrun starts cnnlab (it sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``...),
every process joins one process group (NCCL for CUDA tensors, gloo for CPU ones) and trains the
same model under DistributedDataParallel:

- every rank draws the same seeded permutation (and the same augmentation) for each global batch of
  ``train.batch_size`` images and takes its own slice of it, so every rank makes the same number of
  steps, and ``train.batch_size`` means what it means in one process (per rank: batch / world size);
- loss and correct counts are summed over ranks before the epoch's one read-back, so the divergence
  check, the best epoch and early stopping are decided on the same numbers everywhere (no rank hangs);
- evaluation is sharded the same way and summed;
- only rank 0 writes the run folder, checkpoints and plots, and prints; at the end it loads the best
  checkpoint and sends the weights to the others for the sharded test.

``World`` is this process's place in the group; a plain ``cnnlab run`` is a world of one, for which
every method is a no-op.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from cnnlab.errors import UserError

TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
# How long a rank waits for the others in one collective before giving up (a dead peer is normally
# noticed at once: its connection closes). Long enough for the slowest rank to draw the curves.
TIMEOUT = datetime.timedelta(minutes=10)


@dataclass
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    backend: str | None = None  # set once the process group exists
    # Once a member, always: the group's backend threads (gloo's) outlive destroy_process_group while DDP's
    # reducer holds the backend, to the process's end; entry.py ends such a process without teardown.
    joined: bool = False

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def join(self, device_type: str) -> None:
        """Join torchrun's process group (once); ``device_type`` is where this rank trains."""
        if not self.distributed or self.backend is not None:
            return
        import torch.distributed as dist

        if device_type == "cuda":
            torch.cuda.set_device(self.local_rank)
            backend = "cpu:gloo,cuda:nccl"  # NCCL for the model's tensors, gloo for small host objects
        else:
            backend = "gloo"
        try:
            # torchrun's store outlives a restart of the workers; under keys of their own per attempt, the
            # restarted ranks never read the addresses their dead predecessors published (a hang otherwise).
            store, _, _ = next(dist.rendezvous("env://", timeout=TIMEOUT))
            store = dist.PrefixStore(f"cnnlab/attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/", store)
            dist.init_process_group(backend=backend, store=store, rank=self.rank, world_size=self.size, timeout=TIMEOUT)
        except (RuntimeError, ValueError) as err:
            raise UserError(f"could not join torchrun's process group ({err}); check --rdzv-endpoint / "
                            "MASTER_ADDR and that every node runs the same command") from None
        self.backend = "nccl" if device_type == "cuda" else "gloo"
        self.joined = True

    def leave(self) -> None:
        if self.backend is not None:
            import torch.distributed as dist

            dist.destroy_process_group()
            self.backend = None

    def device_name(self, requested: str) -> str:
        """This rank's device: each rank on a node takes the GPU of its local rank."""
        if not self.distributed or requested in ("cpu", "mps"):
            return requested
        if requested == "auto" and not torch.cuda.is_available():
            return "cpu"
        if requested.startswith("cuda:"):
            raise UserError(f"train.device: {requested} names one GPU, but under torchrun each process takes the GPU "
                            "of its local rank; use cuda (or auto)")
        return f"cuda:{self.local_rank}"

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        """``values`` summed over every rank (the input is left alone)."""
        if not self.distributed:
            return values
        import torch.distributed as dist

        total = values.clone()
        dist.all_reduce(total)
        return total

    def broadcast(self, value: Any) -> Any:
        """Rank 0's ``value`` (a small picklable object: a path, a decision), on every rank."""
        if not self.distributed:
            return value
        import torch.distributed as dist

        box = [value if self.is_main else None]
        dist.broadcast_object_list(box, src=0, device=torch.device("cpu"))
        return box[0]

    def broadcast_module(self, module: nn.Module) -> None:
        """Give every rank rank 0's parameters and buffers."""
        if not self.distributed:
            return
        import torch.distributed as dist

        with torch.no_grad():
            for tensor in module.state_dict().values():
                dist.broadcast(tensor, src=0)

    def barrier(self) -> None:
        if self.distributed:
            import torch.distributed as dist

            dist.barrier()

    def shard(self, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's slice of each (global) batch."""
        if not self.distributed:
            yield from batches
            return
        for x, y in batches:
            yield x.tensor_split(self.size)[self.rank], y.tensor_split(self.size)[self.rank]

    @property
    def min_last_batch(self) -> int:
        """The shortest last training batch kept: two images per process (BatchNorm trains on no fewer;
        an empty shard would average a NaN gradient into every rank)."""
        return 2 * self.size

    def check_batch_size(self, batch_size: int) -> None:
        if batch_size % self.size:
            raise UserError(f"train.batch_size: {batch_size} images cannot be split evenly over {self.size} processes; "
                            f"use a multiple of {self.size} (it stays the global batch: {self.size} x per-process batch)")


def _env_int(name: str) -> int | None:
    value = os.environ.get(name, "")
    return int(value) if value.isdigit() else None


_world: World | None = None


def current_world() -> World:
    """This process's place in torchrun's group, read from the environment torchrun sets (once)."""
    global _world
    if _world is None:
        rank, size, local_rank = (_env_int(name) for name in TORCHRUN_ENV)
        if size is None or size <= 1 or rank is None or not 0 <= rank < size:
            _world = World()
        else:
            _world = World(rank=rank, size=size, local_rank=local_rank or 0)
    return _world


def joined_a_group() -> bool:
    """Whether this process has been a member of torchrun's process group (left or not)."""
    return _world is not None and _world.joined


def use_sync_batchnorm(model: nn.Module, wanted: bool, world: World, device: torch.device) -> tuple[nn.Module, bool]:
    """(model, whether its BatchNorm layers are synchronised): SyncBatchNorm under DDP on GPUs, where
    each rank's batch is a slice; PyTorch has no SyncBatchNorm on the CPU, so there each rank keeps
    its own statistics (said in summary.json)."""
    has_batchnorm = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    if not (wanted and world.distributed and has_batchnorm and device.type == "cuda"):
        return model, False
    return nn.SyncBatchNorm.convert_sync_batchnorm(model), True
