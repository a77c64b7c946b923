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

decode_residual_entries computes the same for a code of RowEntries (sae.kernels.select:
rows of any width, Mutual Choice's batch budget), one program per row walking its own
entries: a first walk sums x_hat, a second (its rows now in cache) the grad_val dots.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sae.kernels.checks import require
from sae.kernels.select import RowEntries


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


@triton.jit
def _decode_residual_entries_kernel(
    ptr_ptr, idx_ptr, val_ptr, w_ptr, b_dec_ptr, x_ptr, scale_ptr, grad_out_ptr, grad_val_ptr, sq_ptr, residual_ptr,
    D, WRITE_RESIDUAL: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    start = tl.load(ptr_ptr + row)
    end = tl.load(ptr_ptr + row + 1)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for p0 in range(start, end, BLOCK_K):
        offs_p = p0 + tl.arange(0, BLOCK_K)
        mask_p = offs_p < end
        idx = tl.load(idx_ptr + offs_p, mask=mask_p, other=0)
        val = tl.load(val_ptr + offs_p, mask=mask_p, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + idx[:, None] * D + offs_d[None, :], mask=mask_p[:, None] & mask_d[None, :], other=0.0)
        acc += tl.sum(w * val[:, None], axis=0)
    x_hat = acc + tl.load(b_dec_ptr + offs_d, mask=mask_d, other=0.0)
    e = x_hat - tl.load(x_ptr + row * D + offs_d, mask=mask_d, other=0.0)
    g = 2.0 * tl.load(scale_ptr).to(tl.float32) * e
    tl.store(grad_out_ptr + row * D + offs_d, g.to(grad_out_ptr.dtype.element_ty), mask=mask_d)
    if WRITE_RESIDUAL:
        tl.store(residual_ptr + row * D + offs_d, -e, mask=mask_d)
    tl.store(sq_ptr + row, tl.sum(e * e, axis=0))
    for p0 in range(start, end, BLOCK_K):
        offs_p = p0 + tl.arange(0, BLOCK_K)
        mask_p = offs_p < end
        idx = tl.load(idx_ptr + offs_p, mask=mask_p, other=0)
        val = tl.load(val_ptr + offs_p, mask=mask_p, other=0.0)
        w = tl.load(w_ptr + idx[:, None] * D + offs_d[None, :], mask=mask_p[:, None] & mask_d[None, :], other=0.0)
        grad_val = tl.sum(w * g[None, :], axis=1)
        tl.store(grad_val_ptr + offs_p, tl.where(val > 0, grad_val, 0.0), mask=mask_p)


def _outputs(B: int, D: int, x: torch.Tensor, W_dec: torch.Tensor, grad_out_dtype: torch.dtype,
             residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Check the dense arguments both decodes share; (grad_out [B, D], sq_err [B]) to fill."""
    require(x.is_contiguous() and x.dtype == torch.float32, f"`x` must be contiguous float32 (got {x.dtype})")
    require(W_dec.is_contiguous() and W_dec.dtype in (torch.float32, torch.bfloat16),
            f"`W_dec` must be contiguous float32 or bfloat16 (got {W_dec.dtype})")
    if residual is not None:
        require(residual.shape == (B, D) and residual.is_contiguous() and residual.dtype == torch.float32,
                f"`residual` must be contiguous float32 of shape ({B}, {D})")
    grad_out = torch.empty(B, D, device=x.device, dtype=grad_out_dtype)
    return grad_out, torch.empty(B, device=x.device, dtype=torch.float32)


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
    grad_out, sq_err = _outputs(B, D, x, W_dec, grad_out_dtype, residual)
    grad_val = torch.empty(B, K, device=x.device, dtype=torch.float32)
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


def decode_residual_entries(
    code: RowEntries,
    W_dec: torch.Tensor,
    b_dec: torch.Tensor,
    x: torch.Tensor,
    scale: torch.Tensor,
    grad_out_dtype: torch.dtype = torch.float32,
    residual: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """decode_residual for a code of RowEntries over x's rows: (grad_out [B, D], grad_val [P]
    float32 per entry, sq_err [B]); the other arguments as decode_residual's."""
    B, D = x.shape
    require(code.row_ptr.numel() == B + 1, f"`code` has {code.row_ptr.numel() - 1} rows, `x` {B}")
    grad_out, sq_err = _outputs(B, D, x, W_dec, grad_out_dtype, residual)
    grad_val = torch.empty(code.values.numel(), device=x.device, dtype=torch.float32)
    if B == 0:
        return grad_out, grad_val, sq_err
    block_d = triton.next_power_of_2(D)
    # the row's decoder columns in one tile: tiles of 16 KiB of weights, 4 warps
    block_k = max(1, (8192 if W_dec.dtype == torch.bfloat16 else 4096) // block_d)
    _decode_residual_entries_kernel[(B,)](
        code.row_ptr, code.indices, code.values, W_dec, b_dec, x, scale, grad_out, grad_val, sq_err,
        residual if residual is not None else sq_err, D, WRITE_RESIDUAL=residual is not None,
        BLOCK_K=block_k, BLOCK_D=block_d, num_warps=4,
    )
    return grad_out, grad_val, sq_err
