"""Plain ReLU: f(z) = max(z, 0); sparsity comes from the encoder biases alone.

The inference form of GBA and of SAELens "standard" folders (L1-trained SAEs).
"""

from __future__ import annotations

import torch

from sae.code import SparseCode, code_from_mask
from sae.rules.base import SparsityRule


class ReLURule(SparsityRule):
    name = "relu"
    saelens_architecture = "standard"

    def infer(self, z: torch.Tensor) -> SparseCode:
        return code_from_mask(z.relu(), z > 0)

