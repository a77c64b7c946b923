"""Lazy neurons: how many MLP neurons fire per token, and how often each neuron fires.

Dense MLPs: reads the post-activation (blocks.L.mlp.hook_post) and keeps only counts: per
batch, per (layer, rule, neuron) how many tokens it fired on (lazy_neuron_counts); per
(token, layer, rule) the active fraction (lazy_token_activity); per (layer, neuron) its
largest activation and the token that produced it (lazy_neuron_top).

Mixture-of-experts layers: an expert's hidden neurons (act_fn(gate) * up, the input of its
down projection) only see the tokens routed to it, so they are counted over those tokens:
lazy_expert_counts (layer, expert, rule, neuron, fired, tokens) with tokens = the batch's
tokens routed to the expert, lazy_expert_top (layer, expert, neuron, value, token_index) and,
per token, lazy_token_activity's active fraction over the k * d_expert hidden neurons of the
experts it was routed to. An expert that got no tokens has rows with tokens = 0: its neurons
are unrouted, not lazy. The CETT threshold is set per (layer, expert) on the expert's own
output (lazy_expert_cett_threshold). lazy_neuron_counts is always written (empty when every
MLP is an MoE layer): its presence marks a store captured with the lazy probe.

Rules for "active" (phenomena.md section 1):
- zero: a != 0, exact zeros (the ReLU definition; GELU/SiLU almost never give them);
- fat:  |a| >= eps (FAT-eps), for GELU/SiLU models;
- cett: |a_i| * ||W_out[i]|| >= t_l, with t_l chosen per layer (on each batch) so that the
        part of the MLP output carried by the dropped neurons has, averaged over tokens,
        relative norm `cett` ("Sparsing Law", 2024). The threshold is found by bisection on
        up to `calibration_tokens` tokens of the batch and stored in lazy_cett_threshold.
"""

from __future__ import annotations

from contextlib import AbstractContextManager

import pyarrow as pa
import torch

from workbench.capture.probe import BatchContext, Probe
from workbench.capture.probes.moe_layers import expert_down_weight, find_moe_layers, record_expert_rows
from workbench.capture.probes.rows import Rows
from workbench.models.handle import ModelHandle

RELU_LIKE = {"relu"}


def mlp_post_hooks(handle: ModelHandle) -> list[str]:
    """The dense MLP post-activation hook of every layer that has one."""
    names = set(handle.hook_names())
    return [f"blocks.{l}.mlp.hook_post" for l in range(handle.n_layers) if f"blocks.{l}.mlp.hook_post" in names]


def activation_name(handle: ModelHandle) -> str:
    cfg = getattr(handle.model, "cfg", None)
    return str(getattr(cfg, "act_fn", "") or "").lower()


def mlp_out_weight(handle: ModelHandle, layer: int) -> torch.Tensor | None:
    """W_out [d_mlp, d_model] of a layer's MLP, or None where the model does not expose it."""
    try:
        weight = handle.model.blocks[layer].mlp.W_out
    except (AttributeError, IndexError, TypeError):
        return None
    return weight.detach() if isinstance(weight, torch.Tensor) and weight.dim() == 2 else None


def cett_score(acts: torch.Tensor, w_out: torch.Tensor) -> torch.Tensor:
    """|a_i| * ||W_out[i]||: how much neuron i can contribute to the MLP output."""
    return acts.abs() * w_out.float().norm(dim=1)


def _dropped_norm(acts: torch.Tensor, w_out: torch.Tensor, score: torch.Tensor, full: torch.Tensor, t: float) -> float:
    dropped = torch.where(score < t, acts, torch.zeros_like(acts))
    return float(((dropped @ w_out).norm(dim=1) / full).mean())


def dropped_output_norm(acts: torch.Tensor, w_out: torch.Tensor, threshold: float) -> float:
    """Mean over tokens of ||sum_{i: score_i < t} a_i W_i|| / ||sum_i a_i W_i||."""
    acts, w_out = acts.float(), w_out.float()
    full = (acts @ w_out).norm(dim=1).clamp_min(1e-12)
    return _dropped_norm(acts, w_out, cett_score(acts, w_out), full, threshold)


def cett_threshold(acts: torch.Tensor, w_out: torch.Tensor, target: float, steps: int = 14) -> tuple[float, float]:
    """Bisect the largest t whose dropped output norm stays <= target; returns (t, norm at t).

    The bracket starts at [0, 99th percentile of the scores] (dropping 99% of the neurons
    almost always removes more than the target), else [that percentile, max score].
    """
    acts, w_out = acts.float(), w_out.float()
    score = cett_score(acts, w_out)
    if not acts.numel():
        return 0.0, 0.0
    full = (acts @ w_out).norm(dim=1).clamp_min(1e-12)
    q99 = float(torch.quantile(score.reshape(-1)[:: max(1, score.numel() // 100_000)], 0.99))
    lo, hi = (0.0, q99) if _dropped_norm(acts, w_out, score, full, q99) > target else (q99, float(score.max()))
    for _ in range(steps):
        mid = (lo + hi) / 2
        if _dropped_norm(acts, w_out, score, full, mid) > target:
            hi = mid
        else:
            lo = mid
    return lo, _dropped_norm(acts, w_out, score, full, lo)


class LazyNeuronProbe(Probe):
    """Per-neuron firing counts and per-token active fractions of every dense MLP and MoE expert."""

    name = "lazy"

    def __init__(self, handle: ModelHandle, fat_eps: float = 1e-2, cett: float = 0.2, calibration_tokens: int = 128):
        self.moe = find_moe_layers(handle.model)
        moe_layers = {moe.layer for moe in self.moe}
        self.hooks = [h for h in mlp_post_hooks(handle) if int(h.split(".")[1]) not in moe_layers]
        self.layers = [int(h.split(".")[1]) for h in self.hooks]
        relu = activation_name(handle) in RELU_LIKE
        self.rules = ["zero"] if relu else ["zero", "fat"]
        self.w_out: dict[int, torch.Tensor] = {}
        if not relu:
            weights = {l: mlp_out_weight(handle, l) for l in self.layers}
            if all(w is not None for w in weights.values()):  # experts always expose their down projection
                self.w_out = {l: w.float() for l, w in weights.items() if w is not None}
                self.rules.append("cett")
        names = set(handle.hook_names())
        last = f"blocks.{self.moe[-1].layer}.hook_resid_post" if self.moe else ""
        if last in names:  # keeps a stop_at_layer from skipping the last MoE layer
            self.hooks.append(last)
        self.fat_eps = fat_eps
        self.cett = cett
        self.calibration_tokens = calibration_tokens
        self.expert_rows: dict[int, dict[int, tuple[torch.Tensor, torch.Tensor]]] = {}

    @staticmethod
    def unavailable(handle: ModelHandle) -> str | None:
        """Why the probe cannot run on this model, or None."""
        if not find_moe_layers(handle.model) and not mlp_post_hooks(handle):
            return f"model {handle.name} has neither a dense MLP hook_post nor mixture-of-experts layers"
        return None

    def hook_names(self, handle: ModelHandle) -> list[str]:
        return list(self.hooks)

    def attach(self, handle: ModelHandle) -> AbstractContextManager[None]:
        def on_rows(layer: int, expert: int, tokens: torch.Tensor, hidden: torch.Tensor, output: torch.Tensor) -> None:
            self.expert_rows.setdefault(layer, {})[expert] = (tokens, hidden)

        return record_expert_rows(self.moe, on_rows)

    def _fire(self, rule: str, acts: torch.Tensor, w_out: torch.Tensor | None) -> tuple[torch.Tensor, tuple[float, float] | None]:
        """Which (token, neuron) entries are active under rule, and the CETT (threshold, reached) it used."""
        if rule == "zero":
            return acts != 0, None
        if rule == "fat":
            return acts.abs() >= self.fat_eps, None
        assert w_out is not None
        if not acts.shape[0]:
            return torch.zeros_like(acts, dtype=torch.bool), None
        stride = max(1, acts.shape[0] // self.calibration_tokens)
        threshold, reached = cett_threshold(acts[::stride][: self.calibration_tokens], w_out, self.cett)
        return cett_score(acts, w_out) >= threshold, (threshold, reached)

    def reduce(self, ctx: BatchContext, cache: dict[str, torch.Tensor]) -> dict[str, pa.Table]:
        keep = ctx.keep.reshape(-1)
        token_index = ctx.token_index.reshape(-1)[keep]
        n = int(keep.sum())
        counts = Rows(layer=pa.int32(), rule=pa.string(), neuron=pa.int32(), fired=pa.int64(), tokens=pa.int64())
        activity = Rows(token_index=pa.int64(), layer=pa.int32(), rule=pa.string(), active_frac=pa.float32())
        top = Rows(layer=pa.int32(), neuron=pa.int32(), value=pa.float32(), token_index=pa.int64())
        thresholds = Rows(layer=pa.int32(), threshold=pa.float32(), cett=pa.float32())
        for hook, layer in zip(self.hooks, self.layers):
            acts = cache[hook].reshape(-1, cache[hook].shape[-1])[keep].float()
            d_mlp = acts.shape[1]
            neurons = torch.arange(d_mlp)
            for rule in self.rules:
                w_out = self.w_out[layer].to(acts.device) if rule == "cett" else None
                active, cett = self._fire(rule, acts, w_out)
                if cett is not None:
                    thresholds.add(layer=torch.tensor([layer]), threshold=cett[0], cett=cett[1])
                counts.add(layer=layer, rule=rule, neuron=neurons, fired=active.sum(0), tokens=n)
                activity.add(token_index=token_index, layer=layer, rule=rule, active_frac=active.sum(1).float() / d_mlp)
            if n:
                value, where = acts.max(dim=0)
                top.add(layer=layer, neuron=neurons, value=value, token_index=token_index[where])
        tables = {"lazy_neuron_counts": counts.table(ctx.batch), "lazy_neuron_top": top.table(ctx.batch)}
        if "cett" in self.rules and self.layers:
            tables["lazy_cett_threshold"] = thresholds.table(ctx.batch)
        if self.moe:
            tables.update(self._reduce_experts(ctx, activity))
        tables["lazy_token_activity"] = activity.table(ctx.batch)
        return tables

    def _reduce_experts(self, ctx: BatchContext, activity: Rows) -> dict[str, pa.Table]:
        """Per (layer, expert, neuron) counts over the tokens routed to the expert; per token the
        active fraction of the hidden neurons of the experts it was routed to (into `activity`)."""
        keep = ctx.keep.reshape(-1)
        flat_index = ctx.token_index.reshape(-1)
        counts = Rows(layer=pa.int32(), expert=pa.int32(), rule=pa.string(), neuron=pa.int32(), fired=pa.int64(), tokens=pa.int64())
        top = Rows(layer=pa.int32(), expert=pa.int32(), neuron=pa.int32(), value=pa.float32(), token_index=pa.int64())
        thresholds = Rows(layer=pa.int32(), expert=pa.int32(), threshold=pa.float32(), cett=pa.float32())
        for moe in self.moe:
            rows = self.expert_rows.pop(moe.layer, None)
            if rows is None or len(rows) != moe.n_experts:
                raise RuntimeError(f"no expert activations recorded for layer {moe.layer}: was the probe attached?")
            active_per_token = {rule: torch.zeros(keep.numel(), device=keep.device) for rule in self.rules}
            d_expert = 0
            for e in range(moe.n_experts):
                tokens, hidden = rows[e]
                kept = keep[tokens.to(keep.device)]
                tokens, acts = tokens.to(keep.device)[kept], hidden[kept.to(hidden.device)].float()
                d_expert = acts.shape[1]
                neurons = torch.arange(d_expert)
                for rule in self.rules:
                    w_out = expert_down_weight(moe, e).float().to(acts.device) if rule == "cett" else None
                    active, cett = self._fire(rule, acts, w_out)
                    if cett is not None:
                        thresholds.add(layer=moe.layer, expert=torch.tensor([e]), threshold=cett[0], cett=cett[1])
                    counts.add(layer=moe.layer, expert=e, rule=rule, neuron=neurons, fired=active.sum(0), tokens=tokens.numel())
                    active_per_token[rule].index_add_(0, tokens, active.sum(1).float().to(keep.device))
                if tokens.numel():
                    value, where = acts.max(dim=0)
                    top.add(layer=moe.layer, expert=e, neuron=neurons, value=value, token_index=flat_index[tokens[where.to(keep.device)]])
            for rule in self.rules:
                activity.add(
                    token_index=flat_index[keep], layer=moe.layer, rule=rule,
                    active_frac=active_per_token[rule][keep] / (moe.top_k * d_expert),
                )  # fmt: skip
        tables = {"lazy_expert_counts": counts.table(ctx.batch), "lazy_expert_top": top.table(ctx.batch)}
        if "cett" in self.rules:
            tables["lazy_expert_cett_threshold"] = thresholds.table(ctx.batch)
        return tables
