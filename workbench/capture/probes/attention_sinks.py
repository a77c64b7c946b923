"""Attention sinks: how much attention each key position receives, reduced from the patterns.

Importance of key position k in head (l, h) (Gu et al. 2024, phenomena.md section 3), with
A the post-softmax pattern of one sample:
    alpha_k = (1 / #queries that can see k) * sum_{t that can see k} A[t, k]
Decoders: the queries t >= k (causal); encoders: every query. Positions beyond the capture's
token count (ctx.keep False) are neither queries nor keys.

Per batch the probe writes, never a T x T pattern:
- sink_attention (layer, head, pos, attention_sum, n_queries): summed over the batch's
  samples, so sum(attention_sum) / sum(n_queries) over batches is exactly the mean alpha;
- sink_first_alpha (layer, head, first_token_index, alpha_1): alpha of the first position per
  sample, from which Sink_1 = % of (sample, layer, head) with alpha_1 > eps at any eps;
- sink_hidden (layer, head, token_index, pos, alpha): per sample, the later positions with
  alpha > hidden_threshold (ACT's hidden sinks), with the token that sat there;
- sink_special_alpha (layer, head, token_index, pos, alpha): per sample, alpha of every
  position holding one of the tokenizer's special tokens ([CLS], [SEP], [UNK]... for BERT
  encoders, <bos>/<eos> for decoders; the tokens table names which), so the mass special
  tokens take is read per token kind, not only at position 0.
"""

from __future__ import annotations

import pyarrow as pa
import torch

from workbench.capture.probe import BatchContext, Probe
from workbench.capture.probes.rows import Rows
from workbench.models.handle import ModelHandle


def pattern_hooks(handle: ModelHandle) -> list[str]:
    names = set(handle.hook_names())
    hooks = [f"blocks.{l}.attn.hook_pattern" for l in range(handle.n_layers)]
    return [h for h in hooks if h in names]


def special_token_ids(handle: ModelHandle) -> list[int]:
    """Ids of every special token of the model's tokenizer and of its window frame."""
    ids = {int(i) for i in getattr(handle.tokenizer, "all_special_ids", None) or []}
    return sorted(ids | set(handle.prefix_ids) | set(handle.suffix_ids))


def key_importance(pattern: torch.Tensor, keep: torch.Tensor, causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sample: (attention summed over queries [B, H, T], number of those queries [B, T]).

    pattern [B, H, T, T] (query, key); keep [B, T] bool. Keys that are not kept get 0 queries.
    """
    kept = keep.float()
    sums = torch.einsum("bhtk,bt->bhk", pattern.float(), kept)
    if causal:
        queries = kept.flip(1).cumsum(1).flip(1)  # kept queries at t >= k
    else:
        queries = kept.sum(1, keepdim=True).expand_as(kept)
    return sums * kept[:, None, :], queries * kept


class AttentionSinkProbe(Probe):
    """Key-position importance per (layer, head), first-position alpha per sample, hidden sinks."""

    name = "sinks"

    def __init__(self, handle: ModelHandle, hidden_threshold: float = 0.1):
        self.hooks = pattern_hooks(handle)
        self.causal = handle.kind != "encoder"
        self.hidden_threshold = hidden_threshold
        self.special_ids = special_token_ids(handle)

    @staticmethod
    def unavailable(handle: ModelHandle) -> str | None:
        if not pattern_hooks(handle):
            return f"model {handle.name} exposes no attention pattern hooks (blocks.L.attn.hook_pattern)"
        return None

    def hook_names(self, handle: ModelHandle) -> list[str]:
        return list(self.hooks)

    def reduce(self, ctx: BatchContext, cache: dict[str, torch.Tensor]) -> dict[str, pa.Table]:
        keep = ctx.keep.to(torch.bool)
        attention = Rows(layer=pa.int32(), head=pa.int32(), pos=pa.int32(), attention_sum=pa.float64(), n_queries=pa.int64())
        first = Rows(layer=pa.int32(), head=pa.int32(), first_token_index=pa.int64(), alpha_1=pa.float32())
        hidden = Rows(layer=pa.int32(), head=pa.int32(), token_index=pa.int64(), pos=pa.int32(), alpha=pa.float32())
        special = Rows(layer=pa.int32(), head=pa.int32(), token_index=pa.int64(), pos=pa.int32(), alpha=pa.float32())
        samples = keep[:, 0]
        special_ids = torch.tensor(self.special_ids, dtype=ctx.tokens.dtype, device=ctx.tokens.device)
        sb, sk = torch.nonzero(torch.isin(ctx.tokens, special_ids) & keep.to(ctx.tokens.device), as_tuple=True)
        for hook in self.hooks:
            layer = int(hook.split(".")[1])
            pattern = cache[hook]
            sums, queries = key_importance(pattern, keep.to(pattern.device), self.causal)
            n_heads, ctx_len = sums.shape[1], sums.shape[2]
            heads = torch.arange(n_heads)[:, None].expand(n_heads, ctx_len)
            positions = torch.arange(ctx_len)[None, :].expand(n_heads, ctx_len)
            attention.add(
                layer=layer,
                head=heads,
                pos=positions,
                attention_sum=sums.double().sum(0),
                n_queries=queries.sum(0).long()[None, :].expand(n_heads, ctx_len),
            )
            alpha = sums / queries[:, None, :].clamp_min(1)  # [B, H, T]
            a1 = alpha[samples, :, 0]  # [S, H]
            first.add(
                layer=layer,
                head=torch.arange(n_heads)[None, :].expand_as(a1),
                first_token_index=ctx.token_index[samples, 0][:, None].expand_as(a1),
                alpha_1=a1,
            )
            later = keep.to(alpha.device)[:, None, :] & (alpha > self.hidden_threshold)
            later[:, :, 0] = False
            b, h, k = torch.nonzero(later, as_tuple=True)
            hidden.add(layer=layer, head=h, token_index=ctx.token_index[b, k], pos=k, alpha=alpha[b, h, k])
            for head in range(n_heads):
                where = (sb.to(alpha.device), head, sk.to(alpha.device))
                special.add(layer=layer, head=head, token_index=ctx.token_index[sb, sk], pos=sk, alpha=alpha[where])
        return {
            "sink_attention": attention.table(ctx.batch),
            "sink_first_alpha": first.table(ctx.batch),
            "sink_hidden": hidden.table(ctx.batch),
            "sink_special_alpha": special.table(ctx.batch),
        }
