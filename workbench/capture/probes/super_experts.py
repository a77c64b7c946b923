"""Super experts and massive activations: the extreme outputs of experts and of the residual stream.

Su et al. (2025) take, for every (layer l, expert e), a_{l,e} = max over routed tokens of
|down_proj output| (over all routed tokens, not the first routed row their script reads);
Sun et al. (2024) track the top-1/2/3 and the median |h| of the residual stream per layer.
Per batch this probe writes:
- expert_max (layer, expert, rank, value, token_index, channel, routed): the `top` largest
  per-row maxima of each expert with the token and output channel that produced them, and
  how many tokens the expert received in the batch;
- massive_activations (layer, rank, value, token_index, channel, median): per sample (context
  window), the 3 largest |h| of blocks.L.hook_resid_post, where they sit, and the sample's
  (lower) median |h| (Sun et al. average these per-sequence statistics over sequences).
"""

from __future__ import annotations

from contextlib import AbstractContextManager

import pyarrow as pa
import torch

from workbench.capture.probe import BatchContext, Probe
from workbench.capture.probes.moe_layers import ExpertOutputs, find_moe_layers, no_moe_reason, record_expert_outputs
from workbench.capture.probes.rows import Rows
from workbench.models.handle import ModelHandle


def residual_hooks(handle: ModelHandle) -> list[str]:
    names = set(handle.hook_names())
    hooks = [f"blocks.{l}.hook_resid_post" for l in range(handle.n_layers)]
    return [h for h in hooks if h in names]


class SuperExpertProbe(Probe):
    """Per-(layer, expert) output maxima with their tokens, per-layer residual extremes."""

    name = "experts"

    def __init__(self, handle: ModelHandle, top: int = 3):
        self.layers = find_moe_layers(handle.model)
        self.hooks = residual_hooks(handle)
        self.top = top
        self.outputs: dict[int, ExpertOutputs] = {}

    unavailable = staticmethod(no_moe_reason)

    def hook_names(self, handle: ModelHandle) -> list[str]:
        return list(self.hooks)

    def attach(self, handle: ModelHandle) -> AbstractContextManager[None]:
        return record_expert_outputs(self.layers, self.outputs)

    def reduce(self, ctx: BatchContext, cache: dict[str, torch.Tensor]) -> dict[str, pa.Table]:
        keep = ctx.keep.reshape(-1)
        flat_index = ctx.token_index.reshape(-1)
        experts = Rows(
            layer=pa.int32(), expert=pa.int32(), rank=pa.int32(), value=pa.float32(),
            token_index=pa.int64(), channel=pa.int32(), routed=pa.int64(),
        )  # fmt: skip
        for moe in self.layers:
            out = self.outputs.pop(moe.layer, None)
            if out is None:
                raise RuntimeError(f"no expert outputs recorded for layer {moe.layer}: was the probe attached?")
            for e in range(moe.n_experts):
                tokens = out.row_token[e]
                kept = keep[tokens]
                values, channels, tokens = out.row_max[e][kept], out.row_channel[e][kept], tokens[kept]
                best = torch.topk(values, min(self.top, values.numel()))
                experts.add(
                    layer=moe.layer,
                    expert=e,
                    rank=torch.arange(best.indices.numel()),
                    value=best.values,
                    token_index=flat_index[tokens[best.indices]],
                    channel=channels[best.indices],
                    routed=int(values.numel()),
                )
        massive = Rows(
            layer=pa.int32(), rank=pa.int32(), value=pa.float32(),
            token_index=pa.int64(), channel=pa.int32(), median=pa.float32(),
        )  # fmt: skip
        whole = ctx.keep.all(dim=1)  # the last window may be cut short: only whole samples count
        sample_index = ctx.token_index[whole]  # [S, T]
        for hook in self.hooks:
            magnitude = cache[hook][whole].abs().float()  # [S, T, d]
            samples, positions, d = magnitude.shape
            if not samples:
                continue
            flat = magnitude.reshape(samples, -1)
            best = torch.topk(flat, 3, dim=1)  # [S, 3]
            massive.add(
                layer=int(hook.split(".")[1]),
                rank=torch.arange(1, 4).expand(samples, 3),
                value=best.values,
                token_index=sample_index.gather(1, best.indices // d),
                channel=best.indices % d,
                median=flat.median(dim=1).values[:, None].expand(samples, 3),
            )
        return {"expert_max": experts.table(ctx.batch), "massive_activations": massive.table(ctx.batch)}
