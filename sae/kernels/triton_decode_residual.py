"""Decoder forward and the MSE's backward to the codes, in one pass over the gathered rows.

For token b with kept (indices[b, j], values[b, j]):
  x_hat[b]       = sum_j values[b, j] * W_dec[indices[b, j]] + b_dec
  e[b]           = x_hat[b] - x[b]
  grad_out[b]    = 2 * scale * e[b]                 (the gradient of scale * ||e||^2)
  grad_val[b, j] = <grad_out[b], W_dec[indices[b, j]]> where values[b, j] > 0, else 0
  sq_err[b]      = ||e[b]||^2
  residual[b]    = -e[b] = x[b] - x_hat[b]          (optional: what AuxK reconstructs)
The k decoder rows of a token are read once, for both x_hat and grad_val; the separate
forward gather and backward gather-dot of sae.kernels.decode read them twice. grad_val is
already the gradient of the kept pre-activations (TopK over ReLU has slope 1 where the
value is positive). scale is a device scalar (1 / the batch's variance), so no host sync.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sae.kernels.checks import require


@triton.jit
def _decode_residual_kernel(
    idx_ptr, val_ptr, w_ptr, b_dec_ptr, x_ptr, scale_ptr, grad_out_ptr, grad_val_ptr, sq_ptr, residual_ptr,
    K, D, WRITE_RESIDUAL: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    mask_k = offs_k < K
    idx = tl.load(idx_ptr + row * K + offs_k, mask=mask_k, other=0)
    val = tl.load(val_ptr + row * K + offs_k, mask=mask_k, other=0.0).to(tl.float32)
    two_scale = 2.0 * tl.load(scale_ptr).to(tl.float32)
    grad_val = tl.zeros([BLOCK_K], dtype=tl.float32)
    sq = tl.zeros([BLOCK_D], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask_d = offs_d < D
        w = tl.load(w_ptr + idx[:, None] * D + offs_d[None, :], mask=mask_k[:, None] & mask_d[None, :], other=0.0)
        x_hat = tl.sum(w * val[:, None], axis=0) + tl.load(b_dec_ptr + offs_d, mask=mask_d, other=0.0)
        e = x_hat - tl.load(x_ptr + row * D + offs_d, mask=mask_d, other=0.0)
        g = two_scale * e
        tl.store(grad_out_ptr + row * D + offs_d, g.to(grad_out_ptr.dtype.element_ty), mask=mask_d)
        if WRITE_RESIDUAL:
            tl.store(residual_ptr + row * D + offs_d, -e, mask=mask_d)
        sq += e * e
        grad_val += tl.sum(w * g[None, :], axis=1)
    tl.store(grad_val_ptr + row * K + offs_k, tl.where(val > 0, grad_val, 0.0), mask=mask_k)
    tl.store(sq_ptr + row, tl.sum(sq, axis=0))


def decode_residual(
    indices: torch.Tensor,
    values: torch.Tensor,
    W_dec: torch.Tensor,
    b_dec: torch.Tensor,
    x: torch.Tensor,
    scale: torch.Tensor,
    grad_out_dtype: torch.dtype = torch.float32,
    residual: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_out [B, D] in grad_out_dtype, grad_val [B, k], sq_err [B] float32) for indices
    [B, k], values [B, k] float32, W_dec [F, D] float32 or bfloat16 contiguous (bf16 halves
    the bytes gathered; sums stay float32),
    b_dec [D], x [B, D] float32 contiguous and scale a one-element float32 tensor (see the
    module doc).
    grad_val and sq_err are computed from the float32 grad_out whatever grad_out_dtype.
    residual: a contiguous float32 [B, D] tensor to fill with x - x_hat."""
    B, K = indices.shape
    D = W_dec.shape[1]
    require(x.is_contiguous() and x.dtype == torch.float32, f"`x` must be contiguous float32 (got {x.dtype})")
    require(W_dec.is_contiguous() and W_dec.dtype in (torch.float32, torch.bfloat16),
            f"`W_dec` must be contiguous float32 or bfloat16 (got {W_dec.dtype})")
    grad_out = torch.empty(B, D, device=x.device, dtype=grad_out_dtype)
    if residual is not None:
        require(residual.shape == (B, D) and residual.is_contiguous() and residual.dtype == torch.float32,
                f"`residual` must be contiguous float32 of shape ({B}, {D})")
    grad_val = torch.empty(B, K, device=x.device, dtype=torch.float32)
    sq_err = torch.empty(B, device=x.device, dtype=torch.float32)
    if B == 0:
        return grad_out, grad_val, sq_err
    block_k = triton.next_power_of_2(max(K, 1))
    # tiles of 8 KiB of weights, 2 warps: the best at 768 x 24576 k32 (bench/kernels_decode_residual.py)
    tile = 4096 if W_dec.dtype == torch.bfloat16 else 2048
    block_d = max(16, min(triton.next_power_of_2(D), tile // block_k))
    _decode_residual_kernel[(B,)](
        indices.contiguous(), values.contiguous(), W_dec, b_dec, x, scale, grad_out, grad_val, sq_err,
        residual if residual is not None else sq_err, K, D, WRITE_RESIDUAL=residual is not None,
        BLOCK_K=block_k, BLOCK_D=block_d, num_warps=2,
    )
    return grad_out, grad_val, sq_err
