"""The autograd-aware sparse decoder: x_hat = sum_j values[:, j] * W_dec[indices[:, j]]."""

from __future__ import annotations

import torch

from sae.kernels.backend import resolve_backend, sparse_ops


class SparseDecode(torch.autograd.Function):
    """Forward is a gather-sum of k rows per token. Backward: dvalues[b, j] =
    <g[b], W_dec[i_bj]>, and dW_dec accumulated per feature over the kept pairs."""

    @staticmethod
    def forward(ctx, indices, values, W_dec, backend: str):
        ctx.save_for_backward(indices, values, W_dec)
        ctx.backend = backend
        return sparse_ops(backend).gather_sum(indices, values, W_dec, out_dtype=W_dec.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        indices, values, W_dec = ctx.saved_tensors
        ops = sparse_ops(ctx.backend)
        grad_out = grad_out.contiguous()
        d_values = d_W = None
        if ctx.needs_input_grad[1]:
            d_values = ops.gather_dot(indices, grad_out, W_dec, out_dtype=values.dtype)
        if ctx.needs_input_grad[2]:
            d_W = torch.empty_like(W_dec)
            ops.feature_scatter(indices, values, grad_out, d_W)
        return None, d_values, d_W, None


def sparse_decode(
    indices: torch.Tensor, values: torch.Tensor, W_dec: torch.Tensor, backend: str | None = None
) -> torch.Tensor:
    """Decode k sparse codes per row: indices LongTensor[B, k], values [B, k], W_dec
    [d_sae, d_in] -> [B, d_in] in W_dec's dtype. Padding entries (value 0, any valid
    index) contribute nothing to the output or to dW_dec. No dense B x d_sae tensor is
    made in forward or backward. backend: sae.kernels.backend.resolve_backend's (None: by
    W_dec's device)."""
    return SparseDecode.apply(indices.contiguous(), values.contiguous(), W_dec, resolve_backend(W_dec.device, backend))
