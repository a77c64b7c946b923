"""JumpReLU inference: f(z) = ReLU(z) * [z > threshold_j], one threshold per feature.

What a SAELens "jumprelu" folder computes, so any such folder (ours from Mutual Choice, or
a peer's) loads into our evaluation. Inference only: nothing here learns the thresholds.
Registers the SAELens architecture "jumprelu" (Mutual Choice and GBA save as it).
"""

from __future__ import annotations

import torch

from sae.code import SparseCode, code_from_mask
from sae.registry import Architecture, register_architecture
from sae.rules.base import SparsityRule


class JumpReLURule(SparsityRule):
    name = "jumprelu"
    saelens_architecture = "jumprelu"

    def __init__(self, threshold: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("threshold", threshold.detach().clone())

    def infer(self, z: torch.Tensor) -> SparseCode:
        return code_from_mask(z.relu(), z > self.threshold)


    def saelens_tensors(self, d_sae: int) -> dict[str, torch.Tensor]:
        return {"threshold": self.threshold.detach().clone()}


register_architecture(Architecture(name="jumprelu", load=lambda cfg, weights: JumpReLURule(weights["threshold"]),
                                   tensors=("threshold",)))
