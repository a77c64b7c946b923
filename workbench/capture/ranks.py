"""Capture over the processes torchrun starts (`torchrun --nproc_per_node N -m workbench.cli
capture ...`): which batches each rank computes, and the points where the ranks wait.

Rank r of W runs the model over the batches whose number is r modulo W: disjoint sets of
one store's batches, each committed whole by its own rank (a batch is a folder
renamed into place, so ranks never write the same file). Rank 0 alone checks or writes
the manifest and clears what killed writers left, before any rank starts (a barrier); it
alone marks the store complete, after every rank's batches are on disk (a sum of the
ranks' new tokens). The promises of one process hold: a killed rank (torchrun then stops
the others) leaves whole batches, and rerunning the command, with any number of processes
or one, captures only the batches missing. The ranks talk over gloo (CPU), whatever device
the model runs on; each rank's model runs on its own GPU (cuda:LOCAL_RANK) where the
device is CUDA. On several machines the store must be one shared folder.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist

from sae.distributed import launched_by_torchrun


@dataclass(frozen=True)
class CaptureRanks:
    """This process's place among the capture's processes (rank 0 of 1 outside torchrun)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    def owns(self, batch: int) -> bool:
        """Whether this rank computes batch number `batch`."""
        return batch % self.world == self.rank

    def device(self, device: str) -> str:
        """The device this rank's model runs on: its own GPU where `device` is CUDA."""
        return f"cuda:{self.local_rank}" if self.world > 1 and device.startswith("cuda") else device

    def barrier(self) -> None:
        """Wait until every rank gets here."""
        if self.world > 1:
            dist.barrier()

    def total(self, count: int) -> int:
        """The sum of every rank's count."""
        if self.world == 1:
            return count
        summed = torch.tensor([count], dtype=torch.long)
        dist.all_reduce(summed)
        return int(summed)


@contextlib.contextmanager
def capture_ranks() -> Iterator[CaptureRanks]:
    """The ranks of this capture for the block: under torchrun, joined over gloo (and the
    group left at the end); else one process."""
    if not launched_by_torchrun():
        yield CaptureRanks()
        return
    dist.init_process_group(backend="gloo")
    try:
        yield CaptureRanks(dist.get_rank(), dist.get_world_size(), dist.get_node_local_rank(fallback_rank=0))
    finally:
        dist.destroy_process_group()
