"""A batch of sparse feature activations as fixed-width (indices, values) rows.

Every rule hands the decoder the same shape, [B, w] indices and values, so one gather-sum
kernel (sae.kernels.sparse_decode) serves TopK (w = k), Mutual Choice and GBA (w = the most
features any row of the batch kept). Rows with fewer active features are padded with value
0 at a valid index, which contributes nothing to the output or to dW_dec.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SparseCode:
    """indices LongTensor[B, w], values Tensor[B, w] (>= 0; 0 marks padding)."""

    indices: torch.Tensor
    values: torch.Tensor

    @property
    def width(self) -> int:
        return int(self.indices.shape[1])

    def active(self) -> torch.Tensor:
        """Bool [B, w]: which entries are real (non-zero) activations."""
        return self.values > 0

    def l0(self) -> torch.Tensor:
        """Active features per row, [B]."""
        return self.active().sum(dim=1)

    def to_dense(self, d_sae: int) -> torch.Tensor:
        """[B, d_sae] activations (differentiable in values)."""
        dense = self.values.new_zeros(self.values.shape[0], d_sae)
        return dense.scatter_add(1, self.indices, self.values)

    def outside(self, z: torch.Tensor) -> torch.Tensor:
        """z [B, d_sae] with -inf at this code's active entries: what the auxiliary loss
        chooses from. Its features reconstruct what a token's own code left unexplained, so
        a feature already in that code takes no aux slot there (for AuxK's dead features a
        no-op; aux_zipf's under-used ones are live, and would otherwise be trained twice on
        the same token, to fit x and the residual at once)."""
        taken = torch.zeros(z.shape, dtype=torch.float32, device=z.device)
        taken.scatter_add_(1, self.indices, self.active().float())  # padding repeats an index with 0
        return z.masked_fill(taken > 0, float("-inf"))

    def fired(self, d_sae: int) -> torch.Tensor:
        """Per-feature count of rows in which it fired, [d_sae] (no gradient, no host sync)."""
        counts = torch.zeros(d_sae, dtype=torch.long, device=self.indices.device)
        # every entry adds its 0/1 activity: no boolean-mask gather, so no host-device sync
        return counts.index_add_(0, self.indices.reshape(-1), self.active().reshape(-1).long())


def code_from_mask(acts: torch.Tensor, keep: torch.Tensor) -> SparseCode:
    """Pack ReLU(acts) at the kept entries of acts [B, d_sae] into the narrowest padded code.

    The width is the largest number of kept entries in any row (at least 1); each row lists
    its kept columns in ascending order, padded with value 0 at column 0. Only keep is read
    whole (one nonzero pass, no sort); values are gathered from `acts`, so gradients flow
    back to the kept pre-activations only.
    """
    counts = keep.sum(dim=1)
    width = max(int(counts.max()) if keep.numel() else 0, 1)
    rows, cols = keep.nonzero(as_tuple=True)  # row-major: each row's columns in order
    slot = torch.arange(len(rows), device=keep.device) - (counts.cumsum(0) - counts)[rows]
    indices = torch.zeros(keep.shape[0], width, dtype=torch.long, device=keep.device)
    indices[rows, slot] = cols
    present = torch.zeros(keep.shape[0], width, dtype=torch.bool, device=keep.device)
    present[rows, slot] = True
    values = torch.where(present, acts.gather(1, indices).relu(), torch.zeros((), dtype=acts.dtype, device=acts.device))
    return SparseCode(indices=indices, values=values)
