"""TopK (Gao et al. 2024): each token keeps its k largest pre-activations, then ReLU.

Registers the training rule "topk" (autograd and fused steps, data-parallel) and the SAELens
architecture "topk" it saves as.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from sae.code import SparseCode
from sae.errors import SAEError
from sae.kernels import topk_rows
from sae.registry import Architecture, RuleConfig, TrainingRule, register_architecture, register_rule
from sae.rules.base import SparsityRule

if TYPE_CHECKING:
    from sae.config import TrainConfig


class TopKRule(SparsityRule):
    """f(z) = ReLU on the k largest entries of each row, 0 elsewhere: at most k active per token.

    Selection on z before the ReLU, as SAELens's TopK does, so rows with fewer than k
    positive entries get zeros (padding) and both implementations agree bit for bit.
    """

    name = "topk"
    saelens_architecture = "topk"
    fused_graph = True
    scale_free_selection = True

    def __init__(self, k: int) -> None:
        super().__init__()
        self.k = int(k)

    def infer(self, z: torch.Tensor) -> SparseCode:
        values, indices = topk_rows(z, self.k)
        return SparseCode(indices=indices, values=values.to(z.dtype))

    def fused_select(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The training selection as sae.fused_step trains it: (values [B, k] float32,
        indices [B, k]) of sae.kernels.triton_topk.row_topk."""
        from sae.kernels.triton_topk import row_topk

        values, indices, _ = row_topk(z, self.k)
        return values, indices

    def saelens_config(self) -> dict[str, Any]:
        return {"k": self.k, "rescale_acts_by_decoder_norm": False}


@dataclass
class TopKConfig(RuleConfig):
    """TopK's one setting, k (required), which Mutual Choice shares."""

    shape_keys: ClassVar[tuple[str, ...]] = ("k",)
    k: int | None = field(default=None, metadata={"help": "Active features per token."})

    def check(self, run: TrainConfig) -> None:
        if self.k is None:
            raise SAEError(f'`arch="{run.arch}"` needs `k` (active features per token)')
        if not 0 < self.k <= run.d_sae:
            raise SAEError(f"`k={self.k}` must be between 1 and d_sae={run.d_sae}; lower `k` or widen the SAE")


def expected_density(rule: SparsityRule, run: TrainConfig) -> float:
    """k of d_sae features per token (the density estimate's start for rules with a k)."""
    return run.rule.k / run.d_sae


def load_topk(cfg: dict[str, Any], weights: dict[str, torch.Tensor]) -> TopKRule:
    """A SAELens "topk" folder's rule; a folder that rescales activations by the decoder
    norms has the norms folded into W_enc and b_enc, and W_dec's rows made unit."""
    if cfg.get("rescale_acts_by_decoder_norm", False):
        norms = weights["W_dec"].norm(dim=1).clamp(min=1e-8)
        weights["W_enc"], weights["b_enc"] = weights["W_enc"] * norms, weights["b_enc"] * norms
        weights["W_dec"] = weights["W_dec"] / norms[:, None]
    return TopKRule(int(cfg["k"]))


register_rule(TrainingRule(
    name="topk", config=TopKConfig, build=lambda settings, run: TopKRule(settings.k), default_aux="auxk",
    initial_density=expected_density, steps=("autograd", "fused"), data_parallel=True, short_run_settings={"k": 16},
))
register_architecture(Architecture(name="topk", load=load_topk))
