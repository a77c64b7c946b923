"""Data-parallel SAE training across the processes torchrun starts (DDP).

Every rank reads the same batch stream and trains on its contiguous 1/W slice of each
global batch; the model runs inside torch's DistributedDataParallel (NCCL on CUDA, gloo on
CPU), which averages the gradients, so every rank steps its own Adam on the same gradient
and all ranks keep identical weights. The result equals one process training on the
global batch, because each batch-level quantity is made global:
- the FVU's denominator sum ||x - mean(x)||^2 is taken over the global batch (every rank
  holds it), and each rank's numerator is scaled by W to undo DDP's gradient mean;
- the per-feature firing counts behind dead-feature tracking and densities are summed
  over ranks, and token counts are global.
DataParallelStep is sae.autograd_step.AutogradStep with its per-process places replaced:
shard (the rank's slice), forward (through DDP), loss_scale (W) and reduce (one all-reduce
of the firing counts, squared error, L0 and loss, which also makes the NaN/Inf guard
global). It trains rules whose registration says data_parallel (per-row selection: topk) with aux "none". Batch-level rules
(Mutual Choice's top k*B, GBA's statistics) and the auxiliary losses need the same global
treatment of their own batch statistics and are refused with a clear message.

Launch: `torchrun --nproc_per_node N -m workbench.cli train ...` (workbench/commands/train.py
joins the group through process_group), or torchrun --nproc_per_node N your_script.py,
where the script builds a TrainConfig and a source and calls
`train_data_parallel(config, source, out)`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from sae.autograd_step import AutogradStep
from sae.code import SparseCode
from sae.config import TrainConfig
from sae.data import ActivationSource
from sae.errors import SAEError
from sae.model import SparseAutoencoder
from sae.registry import rule_names, training_rule
from sae.trainer import Trainer


def init_process_group() -> tuple[int, int, int]:
    """Join the torchrun job (NCCL when CUDA is present, else gloo): (rank, world, local rank)."""
    if not dist.is_initialized():
        try:
            dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
        except ValueError as err:  # env:// rendezvous without torchrun's RANK, WORLD_SIZE, ...
            raise SAEError("data-parallel training needs the torchrun environment (RANK, WORLD_SIZE); "
                           "launch with torchrun --nproc_per_node N") from err
    return dist.get_rank(), dist.get_world_size(), dist.get_node_local_rank(fallback_rank=0)


class DataParallelStep(AutogradStep):
    """The autograd step with the forward/backward split over ranks (see the module doc)."""

    kind = "data-parallel"

    def __init__(self, config: TrainConfig, model: SparseAutoencoder, **options: Any) -> None:
        """options: AutogradStep's keywords."""
        if not dist.is_initialized():
            raise SAEError("call sae.distributed.init_process_group() before building a data-parallel step")
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        if not training_rule(config.arch).data_parallel or config.aux != "none":
            per_token = " or ".join(f'`arch="{name}"`' for name in rule_names() if training_rule(name).data_parallel)
            raise SAEError(
                f'data-parallel training supports {per_token} with `aux="none"` for now (got arch {config.arch}, aux {config.aux}); '
                "train batch-level rules or auxiliary losses in one process"
            )
        if config.batch_size % self.world:
            raise SAEError(f"`batch_size={config.batch_size}` must divide evenly over {self.world} processes")
        super().__init__(model, config.learning_rate, **options)
        on_cuda = model.W_dec.device.type == "cuda"
        self.ddp = DistributedDataParallel(model, device_ids=[model.W_dec.device.index] if on_cuda else None)

    def shard(self, x: torch.Tensor) -> torch.Tensor:
        per = len(x) // self.world
        return x[self.rank * per : (self.rank + 1) * per]

    def forward(self, x: torch.Tensor, select_aux: Any) -> tuple[torch.Tensor, SparseCode, SparseCode | None]:
        return self.ddp(x, select_aux)

    @property
    def loss_scale(self) -> int:
        return self.world

    def reduce(self, stats: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(stats)  # in place, and asynchronous to the host on NCCL
        return stats


def launched_by_torchrun() -> bool:
    """Whether this process is one of several torchrun started (WORLD_SIZE > 1 in its environment)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


@contextlib.contextmanager
def process_group(device: str) -> Iterator[tuple[int, str]]:
    """Join the torchrun job for the block: yields (rank, the device this rank trains on:
    its own GPU, cuda:LOCAL_RANK, where `device` is CUDA). On leaving, waits for every
    rank, then leaves the group. Drop any DDP-wrapped model before the block ends: gloo
    can abort the process at exit when the group goes first."""
    rank, _, local_rank = init_process_group()
    if device.startswith("cuda"):
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(local_rank)
    try:
        yield rank, device
        dist.barrier()
    finally:
        dist.destroy_process_group()


def train_data_parallel(config: TrainConfig, source: ActivationSource, out: str | Path | None = None,
                        step: str = "data-parallel", backend: str | None = None) -> SparseAutoencoder:
    """Train under torchrun (process_group; only rank 0 writes checkpoints and the saved
    SAE). step, backend: the Trainer's ("fused": the fused TopK step over the ranks,
    sae.fused_data_parallel; "shard-latents": the features split over them,
    sae.latent_shard)."""
    with process_group(config.device) as (rank, device):
        config = dataclasses.replace(config, device=device)
        trainer = Trainer.start(config, source, out, step=step, backend=backend)
        trainer.writer = rank == 0
        model = trainer.fit(progress=rank == 0)
        del trainer  # its DDP reducer, before the group goes
    return model
