"""The fused TopK step (sae.fused_step) over the processes torchrun starts: data parallel.

Every rank reads the same global batch (as sae.distributed's data-parallel step) and runs
the step's dense work, the encoder product, the top-k and the decode, on its contiguous
1/W of the rows only. The fused step never forms a weight gradient: its kernel sums each
feature's gradient from the step's kept (row, feature) pairs and applies Adam in the same
pass. So instead of all-reducing gradients of the weights' size (2 * d_sae * d_in numbers),
the ranks all-gather what those sums read, per row of the batch: the top-k values and
indices, the reconstruction gradient grad_out [B, d_in], grad_val [B, k] and the squared
errors (with AuxK also the dead features' pre-activations and the residual), B * (d_in + 3k)
numbers, about 1/30 of the gradients at d_in 2048, d_sae 65536, k 64, B 4096. Every rank
then runs the rest of the step (the pairs' sort, the per-feature sums and Adam, b_dec's Adam) on the same global
tensors, so the ranks apply the identical update and keep bit-identical weights, and the
step is the one-process step up to the encoder product's rounding on a block of rows.
The centring (x - b_dec and the batch variance) reads the whole batch on every rank: the
variance and xc are global, with no exchange.
Overlap: the gather of the top-k codes is launched asynchronously right after the top-k
and runs while the rank decodes; the gradients' gather follows the decode. Collectives
cannot be replayed in the fused step's CUDA graph here, so the step runs eagerly.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from sae.aux_capacity import AuxCapacity
from sae.errors import SAEError
from sae.fused_step import FusedTopKStep
from sae.model import SparseAutoencoder


class FusedDataParallelStep(FusedTopKStep):
    """FusedTopKStep with the rows of each batch split over the process group's ranks."""

    kind = "fused-data-parallel"

    def __init__(self, model: SparseAutoencoder, lr: float, batch_size: int, **options: Any) -> None:
        """batch_size: the global batch, which must divide evenly over the ranks; options:
        FusedTopKStep's keywords."""
        if not dist.is_initialized():
            raise SAEError("call sae.distributed.init_process_group() before building a data-parallel step")
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        if batch_size % self.world:
            raise SAEError(f"`batch_size={batch_size}` must divide evenly over {self.world} processes")
        super().__init__(model, lr, **options)
        self._aux_capacity = AuxCapacity(model.d_sae, wait=True)  # the same aux columns on every rank

    def shard(self, x: torch.Tensor) -> torch.Tensor:
        per = len(x) // self.world
        return x[self.rank * per : (self.rank + 1) * per]

    def gather_rows(self, *parts: torch.Tensor) -> Callable[[], list[torch.Tensor]]:
        """Launch one asynchronous all-gather per tensor, each into the rows of its global
        tensor in rank order; the returned call waits for all of them."""
        gathered, pending = [], []
        for part in parts:
            part = part.contiguous()
            out = part.new_empty((part.shape[0] * self.world, *part.shape[1:]))
            pending.append(dist.all_gather_into_tensor(out, part, async_op=True))
            gathered.append(out)

        def wait() -> list[torch.Tensor]:
            for work in pending:
                work.wait()
            return gathered

        return wait
