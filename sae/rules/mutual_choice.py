"""Mutual Choice (Ayonrinde 2024; the same operation as BatchTopK): one budget of k*B
token-feature matches for the whole batch, so hard tokens get more features, easy ones fewer.

Training: keep the k*B largest entries of ReLU(z) over the whole [B, d_sae] matrix.
Inference has no batch, so the rule learns a threshold theta, an exponential moving average
of the smallest value kept in each training batch, and uses the JumpReLU form
f(z) = z * [z > theta] (saved to SAELens as architecture "jumprelu" with threshold theta).
"""

from __future__ import annotations

import torch

from sae.code import SparseCode, code_from_mask
from sae.kernels import batch_topk
from sae.rules.base import SparsityRule


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
        overflow count), the selection is redone exactly over the whole matrix."""
        z = z.detach()
        selected = batch_topk(z, self.k, cap=self.row_cap)
        if int(selected.overflow) == 0:
            kept = selected.values > 0
            kept_values = selected.values[kept]
            width = max(int(kept.sum(dim=1).max()), 1)
            values, position = selected.values.topk(width, dim=1, sorted=False)
            code = SparseCode(indices=selected.indices.gather(1, position), values=values.to(z.dtype))
        else:
            acts = z.relu()
            budget = min(self.k * z.shape[0], acts.numel())
            kept_values, kept_flat = torch.topk(acts.reshape(-1), budget, sorted=False)
            keep = torch.zeros(acts.numel(), dtype=torch.bool, device=z.device).index_fill_(0, kept_flat, True)
            code = code_from_mask(acts, keep.view_as(acts))
        if self.training and kept_values.numel():
            self._update_theta(kept_values)
        return code

    @torch.no_grad()
    def _update_theta(self, kept_values: torch.Tensor) -> None:
        """theta <- EMA of the smallest kept value (the first batch sets it directly)."""
        smallest = kept_values.min().clamp(min=0).to(self.theta.dtype)
        if int(self.theta_updates) == 0:
            self.theta.copy_(smallest)
        else:
            self.theta.mul_(self.theta_decay).add_((1 - self.theta_decay) * smallest)
        self.theta_updates += 1

    def infer(self, z: torch.Tensor) -> SparseCode:
        return code_from_mask(z.relu(), z > self.theta)

    def saelens_tensors(self, d_sae: int) -> dict[str, torch.Tensor]:
        return {"threshold": self.theta.detach().expand(d_sae).clone()}
