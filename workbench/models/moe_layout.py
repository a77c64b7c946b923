"""Where the router and the fused experts of each MoE layer live in a transformers-5 model, for the phenomena code.

In transformers 5 the experts of one MoE layer (Mixtral, OLMoE, Qwen2-MoE, Qwen3-MoE) are
one module holding 3-D weights, `gate_up_proj` [E, 2*d_expert, d_model] and `down_proj`
[E, d_model, d_expert], so no per-expert module exists to hook. What can be hooked is the
router: `gate(x)` takes the routed input x [tokens, d_model] and returns
(router logits [tokens, E], top-k weights [tokens, k], top-k indices [tokens, k]).
Expert e's output for x is then recomputed as

    gate, up = (x @ gate_up_proj[e].T).chunk(2, dim=-1)
    down_proj[e] applied to act_fn(gate) * up   ->   [tokens, d_model]

which is what the fused module computes before weighting (checked in tests/test_hf_local.py).
The bridge hook names give the same tensors through `handle.run`: `router_input_hook` is
the routed input x and `router_logits_hook` the router logits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class MoeLayerLayout:
    """One MoE layer: module paths relative to the bridge (`handle.model`), sizes, hook names.

    layer: block index. router_path / experts_path: `handle.model.get_submodule(path)` gives
    the router and the fused experts module (the bridge forwards attribute access to the
    Hugging Face modules it wraps). n_experts, top_k: routing sizes. norm_topk_prob:
    whether the top-k weights are renormalised to sum to 1. shared_expert_path: Qwen2-MoE's
    always-on expert (a plain MLP with gate_proj/up_proj/down_proj), else None.
    router_input_hook / router_logits_hook: bridge hook names for x [tokens, d_model] and the
    router logits [tokens, E] (tokens = batch * positions, flattened).
    """

    layer: int
    router_path: str
    experts_path: str
    n_experts: int
    top_k: int
    norm_topk_prob: bool
    d_expert: int
    shared_expert_path: str | None
    router_input_hook: str
    router_logits_hook: str

    def router(self, model: nn.Module) -> nn.Module:
        """The router module: router(x) -> (logits, top-k weights, top-k indices)."""
        return model.get_submodule(self.router_path)

    def experts(self, model: nn.Module) -> nn.Module:
        """The fused experts module (gate_up_proj, down_proj, act_fn)."""
        return model.get_submodule(self.experts_path)

    def down_proj(self, model: nn.Module, expert: int) -> torch.Tensor:
        """Expert `expert`'s down-projection weight [d_model, d_expert] (nn.Linear layout: out x in)."""
        return self.experts(model).down_proj[expert]

    def expert_output(self, model: nn.Module, x: torch.Tensor, expert: int) -> torch.Tensor:
        """Expert `expert`'s down-projection output for routed inputs x [n, d_model], before the routing weight."""
        experts = self.experts(model)
        gate, up = F.linear(x, experts.gate_up_proj[expert]).chunk(2, dim=-1)
        return F.linear(experts.act_fn(gate) * up, experts.down_proj[expert])


def _is_fused_moe_block(module: object) -> bool:
    experts = getattr(module, "experts", None)
    down = getattr(experts, "down_proj", None)
    gate_up = getattr(experts, "gate_up_proj", None)
    return (
        isinstance(getattr(module, "gate", None), nn.Module)
        and isinstance(down, torch.Tensor)
        and down.dim() == 3
        and isinstance(gate_up, torch.Tensor)
    )


def describe_moe_layers(model: nn.Module) -> list[MoeLayerLayout]:
    """Every fused MoE layer of a TransformerBridge over a transformers-5 model, in layer order (empty if dense)."""
    layouts: list[MoeLayerLayout] = []
    for layer, block in enumerate(getattr(model, "blocks", [])):
        moe = getattr(block, "mlp", None)
        if not _is_fused_moe_block(moe):
            continue
        n_experts, _, d_expert = moe.experts.down_proj.shape
        has_shared = isinstance(getattr(moe, "shared_expert", None), nn.Module)
        prefix = f"blocks.{layer}.mlp"
        layouts.append(
            MoeLayerLayout(
                layer=layer,
                router_path=f"{prefix}.gate",
                experts_path=f"{prefix}.experts",
                n_experts=int(n_experts),
                top_k=int(moe.gate.top_k),
                # Mixtral's router always renormalises and has no flag; the others carry their config's.
                norm_topk_prob=bool(getattr(moe.gate, "norm_topk_prob", True)),
                d_expert=int(d_expert),
                shared_expert_path=f"{prefix}.shared_expert" if has_shared else None,
                router_input_hook=f"{prefix}.gate.hook_in",
                router_logits_hook=f"{prefix}.gate.hook_out",
            )
        )
    return layouts
