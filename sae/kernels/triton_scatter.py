"""Triton kernel for the sparse-transpose-dense product: per-feature accumulation.

out[f] = sum over kept pairs (b, j) with indices[b, j] == f of coef[b, j] * src[b]
This is dW_dec (coef = values, src = grad of x_hat) and dW_enc^T (coef = grad of the
kept pre-activations, src = centred input). The B*k pairs are sorted by feature once
(torch.sort, no host sync), each program owns one feature row block and writes it once:
no atomics, deterministic, and features with no pair get an exact zero row. Optionally
also writes coef_sum[f] = sum of coef over the feature's pairs (db_enc).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sae.kernels.checks import require


@triton.jit
def _feature_scatter_kernel(
    order_ptr, offsets_ptr, coef_ptr, src_ptr, out_ptr, coef_sum_ptr,
    K, D, stride_src, stride_of, stride_od,
    WRITE_COEF_SUM: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr,
):
    feat = tl.program_id(0)
    dblk = tl.program_id(1)
    offs_d = dblk * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    start = tl.load(offsets_ptr + feat)
    end = tl.load(offsets_ptr + feat + 1)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    csum = tl.zeros([BLOCK_P], dtype=tl.float32)
    for p0 in range(start, end, BLOCK_P):
        offs_p = p0 + tl.arange(0, BLOCK_P)
        mask_p = offs_p < end
        pair = tl.load(order_ptr + offs_p, mask=mask_p, other=0)
        row = pair // K
        c = tl.load(coef_ptr + pair, mask=mask_p, other=0.0).to(tl.float32)
        s = tl.load(
            src_ptr + row[:, None] * stride_src + offs_d[None, :],
            mask=mask_p[:, None] & mask_d[None, :],
            other=0.0,
        ).to(tl.float32)
        acc += tl.sum(s * c[:, None], axis=0)
        csum += c
    tl.store(out_ptr + feat * stride_of + offs_d * stride_od, acc.to(out_ptr.dtype.element_ty), mask=mask_d)
    if WRITE_COEF_SUM:
        if dblk == 0:
            tl.store(coef_sum_ptr + feat, tl.sum(csum, axis=0).to(coef_sum_ptr.dtype.element_ty))


def sort_pairs_by_feature(indices: torch.Tensor, n_features: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(order, offsets): flat pair ids sorted by feature, and offsets[f]:offsets[f+1] the
    slice of order holding feature f. searchsorted instead of bincount: no host sync.
    The narrowest keys that hold the feature ids: the radix sort makes one pass per byte."""
    key_dtype = next(d for d in (torch.int16, torch.int32, torch.int64) if n_features <= torch.iinfo(d).max)
    sorted_feat, order = torch.sort(indices.reshape(-1).to(key_dtype))
    bounds = torch.arange(n_features + 1, device=indices.device, dtype=key_dtype)
    offsets = torch.searchsorted(sorted_feat, bounds)
    return order, offsets


def feature_scatter(
    order: torch.Tensor,
    offsets: torch.Tensor,
    k: int,
    coef: torch.Tensor,
    src: torch.Tensor,
    out: torch.Tensor,
    coef_sum: torch.Tensor | None = None,
    block_d: int = 1024,
    block_p: int = 8,
    num_warps: int = 4,
) -> None:
    """Fill out [F, D] (any strides) with out[f] = sum_{pairs of f} coef * src[row]; if
    coef_sum [F] is given, fill it with the per-feature sum of coef. The default blocks won
    the sweep in bench/kernels_scatter.py on an H100 at all three training shapes (e.g.
    4096 x 131072, B8192: 2.3 ms against 19.7 ms for BLOCK_D=256, BLOCK_P=16)."""
    F, D = out.shape
    if F == 0 or D == 0:
        return
    require(src.stride(1) == 1, "`src` must have contiguous rows")
    block_d = min(triton.next_power_of_2(D), block_d)
    _feature_scatter_kernel[(F, triton.cdiv(D, block_d))](
        order, offsets, coef.reshape(-1), src, out, coef_sum if coef_sum is not None else out,
        k, D, src.stride(0), out.stride(0), out.stride(1),
        WRITE_COEF_SUM=coef_sum is not None, BLOCK_P=block_p, BLOCK_D=block_d, num_warps=num_warps,
    )
