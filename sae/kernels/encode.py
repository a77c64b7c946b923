"""The fused encoder + selection, with a backward that touches only the kept entries.

Forward: z = (x - b_dec) @ W_enc + b_enc as one dense product (in bf16 under CUDA
autocast), then `select(z) -> (values, indices)` keeps a few entries per row, and the
dense z is dropped at once: nothing of size B x d_sae is saved for backward.
Backward, with G the gradient of z, non-zero only at the kept entries:
  dW_enc[:, f] = sum over kept (b, j) with i_bj = f of G_bj * (x - b_dec)[b]
  db_enc[f]    = sum of G_bj over the same pairs
  dx[b]        = sum_j G_bj * W_enc[:, i_bj]
  db_dec       = -sum_b dx[b] = -W_enc @ db_enc     (a mat-vec; dx is built only if x needs it)
The selection contract: values[b, j] is z[b, indices[b, j]] passed through the rule's
activation, where the activation's slope is 1 wherever the value is non-zero (ReLU,
JumpReLU, TopK over ReLU) and 0 elsewhere; padding entries carry value 0. So G = dvalues *
[values != 0]. Fast path: W_enc stored feature-major, i.e. W_enc is the transpose view of
a contiguous [d_sae, d_in] tensor. A row-major W_enc (SAELens layout) costs one extra
transposing copy of dW_enc (and slower gathers for dx, which training does not need).
"""

from __future__ import annotations

from typing import Callable

import torch

from sae.kernels.backend import resolve_backend, sparse_ops

Selection = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def _compute_dtype(device: torch.device) -> torch.dtype | None:
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return None


def _feature_major_empty(W_enc: torch.Tensor) -> torch.Tensor:
    """An uninitialised [d_in, d_sae] tensor whose transpose is contiguous."""
    return torch.empty(W_enc.shape[1], W_enc.shape[0], device=W_enc.device, dtype=W_enc.dtype).t()


class SparseEncode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, W_enc, b_enc, b_dec, select, backend: str, compute_dtype):
        xc = x - b_dec
        dt = compute_dtype or W_enc.dtype
        with torch.no_grad(), torch.autocast(x.device.type, enabled=False):
            xc_c = xc.to(dt)
            z = torch.addmm(b_enc.to(dt), xc_c, W_enc.to(dt))
            values, indices = select(z)
            del z
        ctx.save_for_backward(xc_c, W_enc, values, indices)
        ctx.backend = backend
        ctx.x_dtype = x.dtype
        ctx.mark_non_differentiable(indices)
        return values, indices

    @staticmethod
    def backward(ctx, d_values, _d_indices):
        xc, W_enc, values, indices = ctx.saved_tensors
        ops = sparse_ops(ctx.backend)
        acc = torch.promote_types(W_enc.dtype, torch.float32)
        g = torch.where(values != 0, d_values, torch.zeros_like(d_values)).to(acc).contiguous()
        W_t = W_enc.t()  # [d_sae, d_in] view
        d_W = d_b_enc = d_x = d_b_dec = None
        need_x, need_W, need_b_enc, need_b_dec = ctx.needs_input_grad[:4]
        if need_W or need_b_enc or need_b_dec:
            d_b_enc = torch.empty(W_enc.shape[1], device=W_enc.device, dtype=acc)
            if need_W:
                d_W = _feature_major_empty(W_enc)
                ops.feature_scatter(indices, g, xc, d_W.t(), d_b_enc)
                if not W_enc.t().is_contiguous():
                    d_W = d_W.contiguous()  # one transposing copy beats strided row writes
            else:
                d_b_enc.zero_().index_add_(0, indices.reshape(-1), g.reshape(-1))
        if need_x:
            d_x = ops.gather_sum(indices, g, W_t, out_dtype=ctx.x_dtype)
        if need_b_dec:
            d_b_dec = -(W_enc.to(acc) @ d_b_enc).to(ctx.x_dtype)
        if d_b_enc is not None:
            d_b_enc = d_b_enc.to(W_enc.dtype) if need_b_enc else None
        return d_x, d_W, d_b_enc, d_b_dec, None, None, None


def sparse_encode(
    x: torch.Tensor,
    W_enc: torch.Tensor,
    b_enc: torch.Tensor,
    b_dec: torch.Tensor,
    select: Selection,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Encode x [B, d_in] with W_enc [d_in, d_sae], b_enc [d_sae], b_dec [d_in] and keep
    the entries `select` picks: returns (values [B, k], indices LongTensor [B, k]).
    Gradients reach x, W_enc, b_enc and b_dec through the kept entries only. backend:
    sae.kernels.backend.resolve_backend's (None: by W_enc's device)."""
    return SparseEncode.apply(x, W_enc, b_enc, b_dec, select, resolve_backend(W_enc.device, backend), _compute_dtype(x.device))
