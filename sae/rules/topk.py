"""TopK (Gao et al. 2024): each token keeps its k largest pre-activations, then ReLU."""

from __future__ import annotations

from typing import Any

import torch

from sae.code import SparseCode
from sae.kernels import topk_rows
from sae.rules.base import SparsityRule


class TopKRule(SparsityRule):
    """f(z) = ReLU on the k largest entries of each row, 0 elsewhere: at most k active per token.

    Selection on z before the ReLU, as SAELens's TopK does, so rows with fewer than k
    positive entries get zeros (padding) and both implementations agree bit for bit.
    """

    name = "topk"
    saelens_architecture = "topk"

    def __init__(self, k: int) -> None:
        super().__init__()
        self.k = int(k)

    def infer(self, z: torch.Tensor) -> SparseCode:
        values, indices = topk_rows(z, self.k)
        return SparseCode(indices=indices, values=values.to(z.dtype))

    def saelens_config(self) -> dict[str, Any]:
        return {"k": self.k, "rescale_acts_by_decoder_norm": False}
