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
Supported now: per-row selection (arch topk) with aux "none". Batch-level rules (Mutual
Choice's top k*B, GBA's statistics) and the auxiliary losses need the same global
treatment of their own batch statistics and are refused with a clear message.

Launch: torchrun --nproc_per_node N your_script.py, where the script builds a TrainConfig
and a source and calls `train_data_parallel(config, source, out)`.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from sae.config import TrainConfig
from sae.data import ActivationSource
from sae.model import SparseAutoencoder
from sae.trainer import Trainer, _check_finite
from workbench.errors import WorkbenchError


def init_process_group() -> tuple[int, int, int]:
    """Join the torchrun job (NCCL when CUDA is present, else gloo): (rank, world, local rank)."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise WorkbenchError("data-parallel training needs the torchrun environment (RANK, WORLD_SIZE); launch with torchrun --nproc_per_node N")
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0))


class DataParallelTrainer(Trainer):
    """The project's Trainer with the forward/backward split over ranks (see module doc).
    Only rank 0 writes checkpoints and the saved SAE."""

    def __init__(self, config: TrainConfig, source: ActivationSource, out: Path | None, command: list[str] | None) -> None:
        if not dist.is_initialized():
            raise WorkbenchError("call sae.distributed.init_process_group() before building a DataParallelTrainer")
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        if config.arch != "topk" or config.aux != "none":
            raise WorkbenchError(
                f"data-parallel training supports --arch topk with --aux none for now (got --arch {config.arch} --aux {config.aux}); "
                "train batch-level rules or auxiliary losses in one process"
            )
        if config.batch_size % self.world:
            raise WorkbenchError(f"--batch-size {config.batch_size} must divide evenly over {self.world} processes")
        super().__init__(config, source, out if self.rank == 0 else None, command)
        on_cuda = self.device.type == "cuda"
        self.ddp = DistributedDataParallel(self.model, device_ids=[self.device.index] if on_cuda else None)

    def _shard(self, x: torch.Tensor) -> torch.Tensor:
        per = len(x) // self.world
        return x[self.rank * per : (self.rank + 1) * per]

    def train_step(self, batch: torch.Tensor) -> dict[str, float]:
        cfg, model = self.config, self.model
        _check_finite(batch, "the training data", self.step)
        x_all = batch.to(self.device, torch.float32) * self.input_scale
        x = self._shard(x_all)
        lr = cfg.lr_at(self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        model.train()
        x_hat, code, _ = self.ddp(x)
        total_variance = (x_all - x_all.mean(dim=0)).pow(2).sum().clamp(min=1e-12)
        local_sq = (x - x_hat).pow(2).sum()
        loss = local_sq * self.world / total_variance
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        model.remove_parallel_decoder_grad()
        self.optimizer.step()
        model.normalize_decoder()
        with torch.no_grad():
            stats = torch.cat([code.fired(cfg.d_sae).float(), local_sq.detach().reshape(1), code.l0().sum().float().reshape(1)])
            dist.all_reduce(stats)
            fired, sq_sum, l0_sum = stats[:-2], stats[-2], stats[-1]
            if not torch.isfinite(sq_sum):
                raise WorkbenchError(f"training diverged: loss is {float(sq_sum)} at step {self.step}; lower --lr (the last checkpoint in --out is intact)")
            n = len(x_all)
            self.tokens_since_fired += n
            self.tokens_since_fired[fired > 0] = 0
            self.density.mul_(cfg.density_decay).add_((1 - cfg.density_decay) * fired / n)
            model.rule.after_step(model, self.step)
        self.step += 1
        return {
            "fvu": float(sq_sum / total_variance),
            "aux": 0.0,
            "l0": float(l0_sum / n),
            "dead_fraction": float((self.tokens_since_fired >= cfg.dead_tokens).float().mean()),
            "lr": lr,
        }


def train_data_parallel(config: TrainConfig, source: ActivationSource, out: str | Path | None = None) -> SparseAutoencoder:
    """Train under torchrun: joins the process group, puts each rank on its GPU (cuda:LOCAL_RANK)
    when the config asks for CUDA, trains, and leaves the process group."""
    _, _, local_rank = init_process_group()
    if config.device.startswith("cuda"):
        config = dataclasses.replace(config, device=f"cuda:{local_rank}")
        torch.cuda.set_device(local_rank)
    try:
        trainer = DataParallelTrainer.start(config, source, out)
        return trainer.fit(progress=trainer.rank == 0)
    finally:
        dist.destroy_process_group()
