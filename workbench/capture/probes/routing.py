"""Routing patterns: which experts each token was sent to, with what weight and how sure the router was.

Per batch, for every MoE layer (phenomena.md section 4):
- routing_choices (token_index, layer, rank, expert, weight, prob): one row per routing slot;
  weight is the mixing weight applied, prob the router softmax of that expert;
- routing_entropy (token_index, layer, entropy): H_t = -sum_e p_e log p_e / log E;
- routing_load (layer, expert, slots): slots each expert received;
- routing_coactivation (layer, expert_a, expert_b, tokens), a < b: tokens that chose both.
"""

from __future__ import annotations

import math
from contextlib import AbstractContextManager

import pyarrow as pa
import torch

from workbench.capture.probe import BatchContext, Probe
from workbench.capture.probes.moe_layers import RoutedBatch, find_moe_layers, no_moe_reason, record_routing
from workbench.capture.probes.rows import Rows
from workbench.models.handle import ModelHandle


def normalised_entropy(probs: torch.Tensor) -> torch.Tensor:
    """Entropy of each row of a probability matrix [N, E], divided by log E."""
    logs = torch.where(probs > 0, probs.log(), torch.zeros_like(probs))
    return -(probs * logs).sum(-1) / math.log(probs.shape[-1])


class RoutingProbe(Probe):
    """Routing slots, router entropy, expert load and co-activation for every MoE layer."""

    name = "routing"

    def __init__(self, handle: ModelHandle):
        self.layers = find_moe_layers(handle.model)
        names = set(handle.hook_names())
        last = f"blocks.{self.layers[-1].layer}.hook_resid_post" if self.layers else ""
        # Asking for the last MoE layer's output keeps a stop_at_layer from skipping MoE layers.
        self.hooks = [last] if last in names else []
        self.routed: dict[int, RoutedBatch] = {}

    unavailable = staticmethod(no_moe_reason)

    def hook_names(self, handle: ModelHandle) -> list[str]:
        return list(self.hooks)

    def attach(self, handle: ModelHandle) -> AbstractContextManager[None]:
        return record_routing(self.layers, self.routed)

    def reduce(self, ctx: BatchContext, cache: dict[str, torch.Tensor]) -> dict[str, pa.Table]:
        keep = ctx.keep.reshape(-1)
        token_index = ctx.token_index.reshape(-1)[keep]
        choices = Rows(
            token_index=pa.int64(), layer=pa.int32(), rank=pa.int32(),
            expert=pa.int32(), weight=pa.float32(), prob=pa.float32(),
        )  # fmt: skip
        entropy = Rows(token_index=pa.int64(), layer=pa.int32(), entropy=pa.float32())
        load = Rows(layer=pa.int32(), expert=pa.int32(), slots=pa.int64())
        coactivation = Rows(layer=pa.int32(), expert_a=pa.int32(), expert_b=pa.int32(), tokens=pa.int64())
        for moe in self.layers:
            routed = self.routed.pop(moe.layer, None)
            if routed is None:
                raise RuntimeError(f"no routing recorded for layer {moe.layer}: was the probe attached?")
            probs, indices, weights = routed.probs[keep], routed.indices[keep], routed.weights[keep]
            n, k = indices.shape
            choices.add(
                token_index=token_index[:, None].expand(n, k),
                layer=moe.layer,
                rank=torch.arange(k)[None, :].expand(n, k),
                expert=indices,
                weight=weights,
                prob=probs.gather(1, indices),
            )
            entropy.add(token_index=token_index, layer=moe.layer, entropy=normalised_entropy(probs))
            chosen = torch.zeros(n, moe.n_experts, device=indices.device).scatter_(1, indices, 1.0)
            load.add(layer=moe.layer, expert=torch.arange(moe.n_experts), slots=chosen.sum(0).long())
            both = (chosen.T @ chosen).long()
            a, b = torch.triu_indices(moe.n_experts, moe.n_experts, offset=1)
            coactivation.add(layer=moe.layer, expert_a=a, expert_b=b, tokens=both[a, b])
        return {
            "routing_choices": choices.table(ctx.batch),
            "routing_entropy": entropy.table(ctx.batch),
            "routing_load": load.table(ctx.batch),
            "routing_coactivation": coactivation.table(ctx.batch),
        }
