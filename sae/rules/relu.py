"""Plain ReLU: f(z) = max(z, 0); sparsity comes from the encoder biases alone.

The inference form of SAELens "standard" folders (L1-trained SAEs), which it registers.
"""

from __future__ import annotations

import torch

from sae.code import SparseCode, code_from_mask
from sae.registry import Architecture, register_architecture
from sae.rules.base import SparsityRule


class ReLURule(SparsityRule):
    name = "relu"
    saelens_architecture = "standard"

    def infer(self, z: torch.Tensor) -> SparseCode:
        return code_from_mask(z.relu(), z > 0)



register_architecture(Architecture(name="standard", load=lambda cfg, weights: ReLURule()))
