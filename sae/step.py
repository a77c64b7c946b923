"""The training-step interface every step implementation follows, and its statistics.

A step trains one SparseAutoencoder in place: step(x, step.prepare_aux(aux_weights)) takes
one optimiser step on x, the scaled global batch on the model's device (with `target`,
a transcoder's scaled target batch, the loss is the FVU of the target; None: of x), and returns
StepStats as device tensors (reading one is a host-device sync, so the Trainer reads them
only when logging). aux_weights is the per-feature weight of the auxiliary loss (None: no
auxiliary loss this step); prepare_aux turns it into the step's own form, or None where
the step would train without it (what lets a CUDA graph replay such steps). The Trainer
around a step owns the loop, the dead-feature counters, the NaN/Inf guard and
checkpoints; the optimiser's state crosses checkpoints in torch.optim.Adam's state_dict
layout (float32 moments, parameters numbered in model.parameters() order among those that
train), so any step resumes any other's checkpoint.

Implementations: sae.autograd_step.AutogradStep (every rule; torch Adam),
sae.fused_step.FusedTopKStep (TopK as Triton kernels, Adam inside them),
sae.distributed.DataParallelStep (the autograd step over torchrun's processes),
sae.fused_data_parallel.FusedDataParallelStep (the fused step over them),
sae.latent_shard.ShardedTopKStep (the features split over them) and
sae.graph_step.CudaGraphStep (replays any capturable step as CUDA graphs);
sae.step_choice.build_step picks one for a config.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch


@dataclass(frozen=True)
class StepStats:
    """One step's statistics over the global batch, as device tensors."""

    sq_err: torch.Tensor  # sum over the batch of ||target - x_hat||^2 (target: x for an autoencoder)
    loss: torch.Tensor  # what the step descended: (sq_err + the rule's term) / variance + aux_alpha * aux
    l0: torch.Tensor  # sum over the batch of the number of active features (float32)
    fired: torch.Tensor  # [d_sae] float32: active tokens per feature
    aux: torch.Tensor  # the auxiliary loss (0 without one)
    variance: torch.Tensor  # the batch's sum ||target - mean(target)||^2, the FVU's denominator
    tokens: int  # tokens in the global batch


class TrainStep(Protocol):
    """What the Trainer calls (see the module doc)."""

    #: Which implementation trains: recorded as training.json's "step_kind".
    kind: str

    def prepare_aux(self, aux_weights: torch.Tensor | None) -> Any:
        """What this step's call takes as `aux` for these per-feature weights of the
        auxiliary loss: None when the step would train without it (no weights, or none it
        can use), else the step's own form of them."""
        ...

    def __call__(self, x: torch.Tensor, aux: Any = None, target: torch.Tensor | None = None) -> StepStats:
        """One optimiser step on the scaled global batch x [B, d_in] (float32, on the
        device); aux from prepare_aux; target [B, d_out], a transcoder's scaled target
        (None: x; a step that trains autoencoders only refuses one)."""
        ...

    def set_lr(self, lr: float) -> None:
        """The learning rate of the following steps."""
        ...

    def optimizer_state(self) -> dict[str, Any]:
        """The optimiser's state in torch.optim.Adam.state_dict()'s layout."""
        ...

    def load_optimizer_state(self, state: dict[str, Any]) -> None:
        """Take over optimizer_state() of this or another step (moments and step count)."""
        ...

    def weights_changed(self) -> None:
        """Call after the model's weights were written from outside the step (initialised,
        loaded from a checkpoint), so copies the step keeps of them are refreshed."""
        ...

    def weights_to_model(self) -> None:
        """Make the model hold the trained weights before it is saved: a step that trains
        them elsewhere (sae.latent_shard's shards) copies them back; the others train the
        model itself and have nothing to do."""
        ...
