"""Where a model's mixture-of-experts layers are, and module hooks that record what they route.

Two shapes of MoE layer exist here: TransformerLens' MoE block (a router whose softmax passes
through `hook_expert_weights`, and one small module per expert whose `W_out` is a plain
nn.Linear taking the expert's hidden activation), and the fused layers of transformers 5
(Mixtral, OLMoE, Qwen-MoE: a `gate` router returning (logits, top-k weights, top-k indices)
and one `experts` module holding 3-D `gate_up_proj` / `down_proj` weights). Fused experts cannot be hooked one by one, so their
hidden activations and down-projection outputs are recomputed from the routed inputs,
`gate_up_proj[e]` and `down_proj[e]`.

Both shapes are found by walking the model's modules, so a model wrapped by a loader
(TransformerBridge or a bare Hugging Face model) is found the same way.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from workbench.errors import WorkbenchError
from workbench.models.handle import ModelHandle


@dataclass
class MoeLayer:
    """One MoE layer: its block index, size, and the modules to hook."""

    layer: int
    n_experts: int
    top_k: int
    block: nn.Module
    style: str  # "tl" (TransformerLens MoE) or "fused" (transformers 5 fused experts)
    norm_topk_prob: bool = False


@dataclass
class RoutedBatch:
    """What one MoE layer routed in one forward pass, over the flattened [batch*pos] tokens."""

    probs: torch.Tensor  # [N, E] float32 router softmax over all experts
    indices: torch.Tensor  # [N, k] chosen experts, best first
    weights: torch.Tensor  # [N, k] the mixing weights actually applied


@dataclass
class ExpertOutputs:
    """Per expert, for every routed row: max |down-projection output| and where it was."""

    row_max: dict[int, torch.Tensor] = field(default_factory=dict)  # expert -> [n_e]
    row_channel: dict[int, torch.Tensor] = field(default_factory=dict)  # expert -> [n_e]
    row_token: dict[int, torch.Tensor] = field(default_factory=dict)  # expert -> [n_e] flat token


def _layer_number(name: str) -> int:
    numbers = re.findall(r"\.(\d+)\.", f".{name}.")
    if not numbers:
        raise WorkbenchError(f"cannot tell which layer MoE module '{name}' belongs to")
    return int(numbers[0])


def _is_tl_moe(module: nn.Module) -> bool:
    from transformer_lens.components.mlps.moe import MoE

    return isinstance(module, MoE)


def _is_fused_moe(module: nn.Module) -> bool:
    experts = getattr(module, "experts", None)
    gate = getattr(module, "gate", None)
    down = getattr(experts, "down_proj", None)
    return isinstance(gate, nn.Module) and isinstance(down, torch.Tensor) and down.dim() == 3


def find_moe_layers(model: nn.Module) -> list[MoeLayer]:
    """Every MoE layer of a model (ModelHandle.model), in layer order (empty for dense models)."""
    layers: dict[int, MoeLayer] = {}
    for name, module in model.named_modules():
        if _is_tl_moe(module):
            cfg = module.cfg
            layer = MoeLayer(
                _layer_number(name), cfg.num_experts, cfg.experts_per_token, module, "tl", bool(cfg.norm_topk_prob)
            )
        elif _is_fused_moe(module):
            layer = MoeLayer(
                _layer_number(name),
                int(module.experts.down_proj.shape[0]),
                int(module.gate.top_k),
                module,
                "fused",
            )
        else:
            continue
        layers.setdefault(layer.layer, layer)  # a wrapper may expose the same block twice
    return [layers[k] for k in sorted(layers)]


def no_moe_reason(handle: ModelHandle) -> str | None:
    """Why the MoE probes cannot run on this model, or None when they can."""
    if not find_moe_layers(handle.model):
        return f"model {handle.name} has no mixture-of-experts layers"
    return None


@contextmanager
def _removed_on_exit(handles: list[torch.utils.hooks.RemovableHandle]) -> Iterator[None]:
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextmanager
def record_routing(layers: list[MoeLayer], sink: dict[int, RoutedBatch]) -> Iterator[None]:
    """While open, every forward pass stores each layer's routing into sink[layer]."""
    handles: list[torch.utils.hooks.RemovableHandle] = []
    with _removed_on_exit(handles):
        for moe in layers:
            if moe.style == "tl":
                handles.append(moe.block.hook_expert_weights.register_forward_hook(_tl_router_hook(moe, sink)))
            else:
                handles.append(moe.block.gate.register_forward_hook(_fused_router_hook(moe, sink)))
        yield


def _tl_router_hook(moe: MoeLayer, sink: dict[int, RoutedBatch]) -> Callable[..., None]:
    def hook(module: nn.Module, args: tuple, probs: torch.Tensor) -> None:
        probs = probs.detach().float()
        weights, indices = torch.topk(probs, moe.top_k, dim=-1)
        if moe.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        sink[moe.layer] = RoutedBatch(probs, indices, weights)

    return hook


def _fused_router_hook(moe: MoeLayer, sink: dict[int, RoutedBatch]) -> Callable[..., None]:
    def hook(module: nn.Module, args: tuple, output: tuple[torch.Tensor, ...]) -> None:
        logits, weights, indices = output[0], output[1], output[2]
        probs = torch.softmax(logits.detach().float(), dim=-1)
        sink[moe.layer] = RoutedBatch(probs, indices.detach(), weights.detach().float())

    return hook


def routed_rows(indices: torch.Tensor, expert: int) -> torch.Tensor:
    """Flat token of each row an expert receives, in the order both MoE styles process them.

    Both TransformerLens and transformers loop `torch.where(mask[expert])` over a [k, N]
    mask, i.e. rank-major then token order.
    """
    rank, token = torch.where((indices == expert).T)
    return token


#: Called once per (layer, expert) and forward pass with the flat token of every routed row,
#: the expert's hidden activation (act_fn(gate) * up) [n_e, d_expert] and its down-projection
#: output [n_e, d_model], before the routing weight.
ExpertRowsCallback = Callable[[int, int, torch.Tensor, torch.Tensor, torch.Tensor], None]


@contextmanager
def record_expert_rows(layers: list[MoeLayer], on_rows: ExpertRowsCallback) -> Iterator[None]:
    """While open, every forward pass hands each expert's routed rows to on_rows(layer, expert, tokens, hidden, output)."""
    handles: list[torch.utils.hooks.RemovableHandle] = []
    routing: dict[int, RoutedBatch] = {}
    with _removed_on_exit(handles):
        for moe in layers:
            if moe.style == "tl":
                handles.append(moe.block.hook_expert_indices.register_forward_hook(_remember_indices(moe, routing)))
                for e, expert in enumerate(moe.block.experts):
                    handles.append(expert.W_out.register_forward_hook(_tl_expert_hook(moe, e, routing, on_rows)))
            else:
                experts = moe.block.experts
                if not hasattr(experts, "gate_up_proj") or not hasattr(experts, "act_fn"):
                    raise WorkbenchError(
                        f"MoE layer {moe.layer} has fused experts without gate_up_proj/act_fn; "
                        "the expert probes know Mixtral, OLMoE and Qwen-MoE layouts"
                    )
                handles.append(experts.register_forward_hook(_fused_experts_hook(moe, on_rows), with_kwargs=True))
        yield


@contextmanager
def record_expert_outputs(layers: list[MoeLayer], sink: dict[int, ExpertOutputs]) -> Iterator[None]:
    """While open, per layer and expert, the max |down-proj output| of every routed row goes to sink."""

    def on_rows(layer: int, expert: int, tokens: torch.Tensor, hidden: torch.Tensor, output: torch.Tensor) -> None:
        _store_rows(sink.setdefault(layer, ExpertOutputs()), expert, output, tokens)

    with record_expert_rows(layers, on_rows):
        yield


def expert_down_weight(moe: MoeLayer, expert: int) -> torch.Tensor:
    """Expert `expert`'s down projection as W_out [d_expert, d_model] (row i: what hidden neuron i writes)."""
    if moe.style == "tl":
        return moe.block.experts[expert].W_out.weight.detach().T
    return moe.block.experts.down_proj[expert].detach().T


def _remember_indices(moe: MoeLayer, routing: dict[int, RoutedBatch]) -> Callable[..., None]:
    def hook(module: nn.Module, args: tuple, indices: torch.Tensor) -> None:
        routing[moe.layer] = RoutedBatch(torch.empty(0), indices.detach(), torch.empty(0))

    return hook


def _store_rows(out: ExpertOutputs, expert: int, values: torch.Tensor, tokens: torch.Tensor) -> None:
    magnitude = values.detach().abs().float()
    if magnitude.shape[0]:
        row_max, row_channel = magnitude.max(dim=-1)
    else:
        row_max = magnitude.new_zeros(0)
        row_channel = torch.zeros(0, dtype=torch.long, device=magnitude.device)
    out.row_max[expert] = row_max
    out.row_channel[expert] = row_channel
    out.row_token[expert] = tokens


def _tl_expert_hook(
    moe: MoeLayer, expert: int, routing: dict[int, RoutedBatch], on_rows: ExpertRowsCallback
) -> Callable[..., None]:
    def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        tokens = routed_rows(routing[moe.layer].indices, expert)
        if tokens.shape[0] != output.shape[0]:
            raise WorkbenchError(f"expert {expert} of layer {moe.layer} got {output.shape[0]} rows, expected {tokens.shape[0]}")
        on_rows(moe.layer, expert, tokens, args[0].detach(), output.detach())  # W_out's input is the hidden activation

    return hook


def _fused_experts_hook(moe: MoeLayer, on_rows: ExpertRowsCallback) -> Callable[..., None]:
    def hook(module: nn.Module, args: tuple, kwargs: dict, output: torch.Tensor) -> None:
        names = ("hidden_states", "top_k_index", "top_k_weights")
        values = list(args) + [kwargs[n] for n in names[len(args) :] if n in kwargs]
        hidden, indices = values[0], values[1]
        with torch.no_grad():
            for e in range(moe.n_experts):
                tokens = routed_rows(indices, e)
                gate, up = F.linear(hidden[tokens], module.gate_up_proj[e]).chunk(2, dim=-1)
                activation = module.act_fn(gate) * up
                on_rows(moe.layer, e, tokens, activation, F.linear(activation, module.down_proj[e]))

    return hook
