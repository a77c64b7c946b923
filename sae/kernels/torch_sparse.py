"""The three sparse primitives in plain torch: the CPU path and the tests' second opinion.

gather_sum:      out[b] = sum_j coef[b, j] * W[indices[b, j]]
gather_dot:      out[b, j] = <g[b], W[indices[b, j]]>
feature_scatter: out[f] = sum over pairs (b, j) with indices[b, j] == f of coef[b, j] * src[b]
None of them builds a dense B x n_features tensor; memory is O(B * k * D) at most.
"""

from __future__ import annotations

import torch


def gather_sum(indices: torch.Tensor, coef: torch.Tensor, W: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """Gather-sum of k rows of W per token (embedding_bag with per-sample weights)."""
    out = torch.nn.functional.embedding_bag(indices, W, per_sample_weights=coef.to(W.dtype), mode="sum")
    return out.to(out_dtype)


def gather_dot(indices: torch.Tensor, g: torch.Tensor, W: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """Dot product of each token's g with each of its k gathered rows of W."""
    return torch.einsum("bkd,bd->bk", W[indices], g.to(W.dtype)).to(out_dtype)


def feature_scatter(
    indices: torch.Tensor,
    coef: torch.Tensor,
    src: torch.Tensor,
    out: torch.Tensor,
    coef_sum: torch.Tensor | None = None,
) -> None:
    """Fill out [F, D] with the per-feature sum of coef * src rows (index_add over pairs);
    fill coef_sum [F] with the per-feature sum of coef if given."""
    k = indices.shape[1]
    flat_idx = indices.reshape(-1)
    flat_coef = coef.reshape(-1).to(out.dtype)
    contrib = flat_coef[:, None] * src.to(out.dtype).repeat_interleave(k, dim=0)
    out.copy_(torch.zeros(out.shape, dtype=out.dtype, device=out.device).index_add_(0, flat_idx, contrib))
    if coef_sum is not None:
        zeros = torch.zeros(coef_sum.shape, dtype=coef_sum.dtype, device=coef_sum.device)
        coef_sum.copy_(zeros.index_add_(0, flat_idx, flat_coef.to(coef_sum.dtype)))
