"""Mutual Choice (Ayonrinde 2024; the same operation as BatchTopK): one budget of k*B
token-feature matches for the whole batch, so hard tokens get more features, easy ones fewer.

Training: keep the k*B largest entries of ReLU(z) over the whole [B, d_sae] matrix.
Inference has no batch, so the rule learns a threshold theta, an exponential moving average
of the smallest value kept in each training batch, and uses the JumpReLU form
f(z) = z * [z > theta] (saved to SAELens as architecture "jumprelu" with threshold theta).
Registers the training rule "mutual-choice" (autograd step, one process).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from sae.code import SparseCode, code_from_mask
from sae.errors import SAEError
from sae.kernels import batch_topk
from sae.registry import TrainingRule, register_rule
from sae.rules.base import SparsityRule
from sae.rules.topk import TopKConfig, expected_density

if TYPE_CHECKING:
    from sae.config import TrainConfig


class MutualChoiceRule(SparsityRule):
    """Batch-level top k*B with a learned inference threshold (a buffer: checkpointed)."""

    name = "mutual-choice"
    saelens_architecture = "jumprelu"

    def __init__(self, k: int, theta_decay: float = 0.99, row_cap_factor: int = 8) -> None:
        super().__init__()
        self.k = int(k)
        self.row_cap = self.k * int(row_cap_factor)
        self.theta_decay = float(theta_decay)
        self.register_buffer("theta", torch.zeros(()))
        self.register_buffer("theta_updates", torch.zeros((), dtype=torch.long))

    def select(self, z: torch.Tensor) -> SparseCode:
        """Exact batch top-k*B. Fast path: sae.kernels.batch_topk cuts each row to its
        row_cap (8k) largest candidates first, and the code is trimmed to the widest row
        actually kept; if any row may hold more of the batch's winners than row_cap (its
        overflow count), the selection is redone exactly over the whole matrix. One host
        read (the overflow and the widest row together); nothing after batch_topk is dense."""
        z = z.detach()
        selected = batch_topk(z, self.k, cap=self.row_cap)
        kept = selected.values > 0
        overflow, widest = torch.stack([selected.overflow, kept.sum(dim=1).max()]).tolist()
        if overflow == 0:
            values, position = selected.values.topk(max(widest, 1), dim=1, sorted=False)
            code = SparseCode(indices=selected.indices.gather(1, position), values=values.to(z.dtype))
            smallest = torch.where(kept, selected.values, torch.inf).amin()
        else:
            acts = z.relu()
            budget = min(self.k * z.shape[0], acts.numel())
            kept_values, kept_flat = torch.topk(acts.reshape(-1), budget, sorted=False)
            keep = torch.zeros(acts.numel(), dtype=torch.bool, device=z.device).index_fill_(0, kept_flat, True)
            code = code_from_mask(acts, keep.view_as(acts))
            smallest = torch.where(kept_values > 0, kept_values, torch.inf).amin()
        if self.training:
            self._update_theta(smallest)
        return code

    @torch.no_grad()
    def _update_theta(self, smallest: torch.Tensor) -> None:
        """theta <- EMA of the smallest kept value (the first batch sets it directly); a batch
        that kept nothing (smallest = inf) leaves it. On the device: no host read."""
        found = torch.isfinite(smallest)
        smallest = smallest.clamp(min=0).to(self.theta.dtype)
        ema = self.theta * self.theta_decay + (1 - self.theta_decay) * smallest
        self.theta.copy_(torch.where(found, torch.where(self.theta_updates == 0, smallest, ema), self.theta))
        self.theta_updates += found.long()

    def infer(self, z: torch.Tensor) -> SparseCode:
        return code_from_mask(z.relu(), z > self.theta)

    def saelens_tensors(self, d_sae: int) -> dict[str, torch.Tensor]:
        return {"threshold": self.theta.detach().expand(d_sae).clone()}


@dataclass
class MutualChoiceConfig(TopKConfig):
    """k, now the mean per token of the batch's budget, and theta's EMA decay."""

    k: int | None = field(default=None, metadata={"help": "Mean active features per token (the batch keeps k * batch-size)."})
    theta_decay: float = field(default=0.99, metadata={"help": "EMA decay of the inference threshold."})

    def check(self, run: TrainConfig) -> None:
        super().check(run)
        if not 0 <= self.theta_decay <= 1:
            raise SAEError(f"`theta_decay={self.theta_decay}` must be between 0 and 1")


register_rule(TrainingRule(
    name="mutual-choice", config=MutualChoiceConfig, default_aux="aux-zipf", initial_density=expected_density,
    build=lambda settings, run: MutualChoiceRule(settings.k, theta_decay=settings.theta_decay), short_run_settings={"k": 16},
))
