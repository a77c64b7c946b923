"""Triton kernels that gather k weight rows per token.

gather_sum: out[b] = sum_j values[b, j] * W[indices[b, j]]  (decoder forward; encoder dX)
gather_dot: out[b, j] = <g[b], W[indices[b, j]]>            (decoder dvalues)
W is addressed through its two strides, so a transposed view works; rows that are
contiguous (feature-major storage, stride 1 along d) give coalesced 16-byte loads.
Accumulation is float32 whatever the storage dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sae.kernels.checks import require


@triton.jit
def _gather_sum_kernel(
    idx_ptr, val_ptr, w_ptr, out_ptr,
    K, D, stride_wf, stride_wd,
    BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        idx = tl.load(idx_ptr + row * K + offs_k, mask=mask_k, other=0)
        val = tl.load(val_ptr + row * K + offs_k, mask=mask_k, other=0.0).to(tl.float32)
        w = tl.load(
            w_ptr + idx[:, None] * stride_wf + offs_d[None, :] * stride_wd,
            mask=mask_k[:, None] & mask_d[None, :],
            other=0.0,
        ).to(tl.float32)
        acc += tl.sum(w * val[:, None], axis=0)
    tl.store(out_ptr + row * D + offs_d, acc.to(out_ptr.dtype.element_ty), mask=mask_d)


@triton.jit
def _gather_dot_kernel(
    idx_ptr, g_ptr, w_ptr, out_ptr,
    K, D, stride_g, stride_wf, stride_wd,
    BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_k = offs_k < K
    idx = tl.load(idx_ptr + row * K + offs_k, mask=mask_k, other=0)
    acc = tl.zeros([BLOCK_K], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask_d = offs_d < D
        g = tl.load(g_ptr + row * stride_g + offs_d, mask=mask_d, other=0.0).to(tl.float32)
        w = tl.load(
            w_ptr + idx[:, None] * stride_wf + offs_d[None, :] * stride_wd,
            mask=mask_k[:, None] & mask_d[None, :],
            other=0.0,
        ).to(tl.float32)
        acc += tl.sum(w * g[None, :], axis=1)
    tl.store(out_ptr + row * K + offs_k, acc.to(out_ptr.dtype.element_ty), mask=mask_k)


def _block_d(D: int) -> int:
    return min(triton.next_power_of_2(D), 256)


def gather_sum(
    indices: torch.Tensor, values: torch.Tensor, W: torch.Tensor, out_dtype: torch.dtype, out: torch.Tensor | None = None
) -> torch.Tensor:
    """out[b] = sum_j values[b, j] * W[indices[b, j]] for indices/values [B, k], W [F, D];
    `out` (contiguous [B, D]) may be given, every element of it is written."""
    B, K = indices.shape
    D = W.shape[1]
    out = torch.empty(B, D, device=W.device, dtype=out_dtype) if out is None else out
    if B == 0:
        return out
    block_d = _block_d(D)
    block_k = min(triton.next_power_of_2(max(K, 1)), 16)
    _gather_sum_kernel[(B, triton.cdiv(D, block_d))](
        indices, values, W, out, K, D, W.stride(0), W.stride(1), BLOCK_K=block_k, BLOCK_D=block_d
    )
    return out


def gather_dot(
    indices: torch.Tensor, g: torch.Tensor, W: torch.Tensor, out_dtype: torch.dtype, out: torch.Tensor | None = None
) -> torch.Tensor:
    """out[b, j] = <g[b], W[indices[b, j]]> for indices [B, k], g [B, D], W [F, D];
    `out` (contiguous [B, k]) may be given, every element of it is written."""
    B, K = indices.shape
    D = W.shape[1]
    out = torch.empty(B, K, device=W.device, dtype=out_dtype) if out is None else out
    if B == 0 or K == 0:
        return out
    require(g.stride(1) == 1, "`g` must have contiguous rows")
    block_k = min(triton.next_power_of_2(max(K, 1)), 32)
    block_d = min(triton.next_power_of_2(D), 128)
    _gather_dot_kernel[(B, triton.cdiv(K, block_k))](
        indices, g, W, out, K, D, g.stride(0), W.stride(0), W.stride(1), BLOCK_K=block_k, BLOCK_D=block_d
    )
    return out
