"""Lazy neurons: how many MLP neurons fire per token, and how often each neuron fires.

Reads the MLP post-activation (blocks.L.mlp.hook_post) and keeps only counts: per batch,
per (layer, rule, neuron) how many tokens it fired on; per (token, layer, rule) the active
fraction; per (layer, neuron) its largest activation and the token that produced it.

Rules for "active" (phenomena.md section 1):
- zero: a != 0, exact zeros (the ReLU definition; GELU/SiLU almost never give them);
- fat:  |a| >= eps (FAT-eps), for GELU/SiLU models;
- cett: |a_i| * ||W_out[i]|| >= t_l, with t_l chosen per layer (on each batch) so that the
        part of the MLP output carried by the dropped neurons has, averaged over tokens,
        relative norm `cett` ("Sparsing Law", 2024). The threshold is found by bisection on
        up to `calibration_tokens` tokens of the batch and stored in lazy_cett_threshold.
"""

from __future__ import annotations

import pyarrow as pa
import torch

from workbench.capture.probe import BatchContext, Probe
from workbench.capture.probes.moe_layers import find_moe_layers
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
    """Per-neuron firing counts and per-token active fractions of every dense MLP."""

    name = "lazy"

    def __init__(self, handle: ModelHandle, fat_eps: float = 1e-2, cett: float = 0.2, calibration_tokens: int = 128):
        self.hooks = mlp_post_hooks(handle)
        self.layers = [int(h.split(".")[1]) for h in self.hooks]
        relu = activation_name(handle) in RELU_LIKE
        self.rules = ["zero"] if relu else ["zero", "fat"]
        self.w_out: dict[int, torch.Tensor] = {}
        if not relu:
            weights = {l: mlp_out_weight(handle, l) for l in self.layers}
            if all(w is not None for w in weights.values()):
                self.w_out = {l: w.float() for l, w in weights.items() if w is not None}
                self.rules.append("cett")
        self.fat_eps = fat_eps
        self.cett = cett
        self.calibration_tokens = calibration_tokens

    @staticmethod
    def unavailable(handle: ModelHandle) -> str | None:
        """Why the probe cannot run on this model, or None."""
        if find_moe_layers(handle.model):
            return f"model {handle.name} has mixture-of-experts MLPs (the lazy probe reads dense MLPs)"
        if not mlp_post_hooks(handle):
            return f"model {handle.name} has no dense MLP hook_post"
        return None

    def hook_names(self, handle: ModelHandle) -> list[str]:
        return list(self.hooks)

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
                if rule == "zero":
                    active = acts != 0
                elif rule == "fat":
                    active = acts.abs() >= self.fat_eps
                else:
                    w_out = self.w_out[layer].to(acts.device)
                    stride = max(1, n // self.calibration_tokens)
                    sample = acts[::stride][: self.calibration_tokens]
                    threshold, reached = cett_threshold(sample, w_out, self.cett)
                    thresholds.add(layer=torch.tensor([layer]), threshold=threshold, cett=reached)
                    active = cett_score(acts, w_out) >= threshold
                counts.add(layer=layer, rule=rule, neuron=neurons, fired=active.sum(0), tokens=n)
                activity.add(token_index=token_index, layer=layer, rule=rule, active_frac=active.sum(1).float() / d_mlp)
            if n:
                value, where = acts.max(dim=0)
                top.add(layer=layer, neuron=neurons, value=value, token_index=token_index[where])
        tables = {
            "lazy_neuron_counts": counts.table(ctx.batch),
            "lazy_token_activity": activity.table(ctx.batch),
            "lazy_neuron_top": top.table(ctx.batch),
        }
        if "cett" in self.rules:
            tables["lazy_cett_threshold"] = thresholds.table(ctx.batch)
        return tables
