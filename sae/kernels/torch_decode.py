"""Sparse decoder in plain torch: the CPU path and the reference for the Triton kernels.

x_hat[b] = sum_j values[b, j] * W_dec[indices[b, j]]. The backward never builds a dense
batch x d_sae tensor: dW_dec is accumulated per feature with index_add over the B*k kept
(token, feature) pairs, and dvalues[b, j] = <g[b], W_dec[indices[b, j]]>.
"""

from __future__ import annotations

import torch


def decode_forward_torch(indices: torch.Tensor, values: torch.Tensor, W_dec: torch.Tensor) -> torch.Tensor:
    """Gather-sum of k decoder rows per token (embedding_bag with per-sample weights)."""
    return torch.nn.functional.embedding_bag(
        indices, W_dec, per_sample_weights=values.to(W_dec.dtype), mode="sum"
    )


def decode_backward_torch(
    grad_out: torch.Tensor, indices: torch.Tensor, values: torch.Tensor, W_dec: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(dvalues [B, k], dW_dec [d_sae, d_in]) for the sparse decoder, without dense B x d_sae."""
    g = grad_out.to(W_dec.dtype)
    rows = W_dec[indices]  # [B, k, d_in]
    d_values = torch.einsum("bkd,bd->bk", rows, g)
    flat_idx = indices.reshape(-1)
    contrib = values.to(W_dec.dtype).reshape(-1, 1) * g.repeat_interleave(indices.shape[1], dim=0)
    d_W = torch.zeros_like(W_dec).index_add_(0, flat_idx, contrib)
    return d_values.to(values.dtype), d_W
